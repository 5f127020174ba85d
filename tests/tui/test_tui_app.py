"""The app as a whole: the keymap and settings file, the command palette, errors that keep it running,
merging a flood of worker events, and what ``workbench`` does outside a terminal."""

from __future__ import annotations

import copy
import subprocess
import sys
import tomllib
from importlib import resources

import pytest

from tui_support import SMALL, fake_backend, make_app, wait_for, worker_ready
from worker_support import async_test
from workbench.errors import UserError
from workbench.screens.app import WorkbenchApp
from workbench.screens.config import load_config
from workbench.screens.session import Backend, Session
from workbench.screens.widgets import MessageModal
from workbench.spec import spec_from_dict


def _settings(tmp_path, monkeypatch, text: str):
    """Write a settings file under a fresh XDG_CONFIG_HOME; returns its path."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = tmp_path / "config" / "workbench" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")
    return path


def _app_with_settings(**kwargs) -> WorkbenchApp:
    """The app reading the settings file as ``workbench`` does, on a fake worker."""
    return WorkbenchApp(Session("quickstart", fake_backend()), config=load_config(), **kwargs)


def _modals(app) -> list[MessageModal]:
    return [s for s in app.screen_stack if isinstance(s, MessageModal)]


async def _switch(pilot, key: str, mode: str) -> None:
    await pilot.press(key)
    await wait_for(pilot, lambda: pilot.app.current_mode == mode and pilot.app.screen.id == f"screen-{mode}",
                   what=f"key {key} to show {mode}")


# ---------------------------------------------------------------- keymap and settings


@async_test
async def test_keymap_in_the_settings_file_moves_a_screen_key(tmp_path, monkeypatch):
    _settings(tmp_path, monkeypatch, '[keymap]\n"screen.history" = "h"\n')
    app = _app_with_settings(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await wait_for(pilot, lambda: app.screen.id == "screen-run", what="the first screen")
        assert not _modals(app)  # a valid file: no complaint
        app.screen.set_focus(None)
        await _switch(pilot, "h", "history")
        # the screen bar names the remapped key, not the default
        bar = str(app.screen.query_one("#screen-bar").render())
        assert "h History" in bar and "6 History" not in bar
        await _switch(pilot, "4", "run")
        app.screen.set_focus(None)
        await pilot.press("6")
        await pilot.pause(0.2)
        assert app.current_mode == "run"  # 6 is no longer bound


@async_test
async def test_a_malformed_settings_file_is_reported_once_and_defaults_apply(tmp_path, monkeypatch):
    path = _settings(tmp_path, monkeypatch, '[keymap\n"screen.history" = "h"\n')
    app = _app_with_settings(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await wait_for(pilot, lambda: _modals(app), what="the settings error")
        [modal] = _modals(app)
        assert str(path) in modal.message and modal.hint
        await pilot.press("enter")
        await wait_for(pilot, lambda: not _modals(app), what="the modal to close")
        app.screen.set_focus(None)
        await _switch(pilot, "6", "history")  # the default keys work
        await pilot.press("h")
        await pilot.pause(0.2)
        assert app.current_mode == "history" and not _modals(app)


# ---------------------------------------------------------------- command palette


async def _palette(pilot, text: str, choose: str) -> None:
    """Open the palette, type ``text``, and run the command ``choose`` once it is the top hit."""
    from textual.command import CommandList, CommandPalette

    app = pilot.app
    await pilot.press("ctrl+p")
    await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="the command palette")
    await pilot.press(*text)

    def top_hit() -> str | None:
        hits = app.screen.query_one(CommandList)
        return hits.get_option_at_index(hits.highlighted).hit.text if hits.highlighted is not None else None

    await wait_for(pilot, lambda: top_hit() == choose, what=f"{choose!r} as the top hit for {text!r}")
    await pilot.press("enter")
    await wait_for(pilot, lambda: not isinstance(app.screen, CommandPalette), what="the palette to close")


@pytest.mark.slow
@async_test
async def test_command_palette_switches_screen_and_opens_a_preset():
    app = make_app()
    async with app.run_test(size=SMALL) as pilot:
        await _palette(pilot, "history", "Screen: History")
        await wait_for(pilot, lambda: app.current_mode == "history", what="the History screen")

        await _palette(pilot, "Open preset: wanda-50", "Open preset: wanda-50")
        await wait_for(pilot, lambda: app.session.preset == "wanda-50", what="the preset to load")
        expected = tomllib.loads((resources.files("workbench.presets") / "wanda-50.toml").read_text(encoding="utf-8"))
        expected.pop("guide", None)
        assert app.session.data == expected
        assert app.session.guide is not None  # the palette opens a guided walk
        assert app.current_mode == "model"


# ---------------------------------------------------------------- errors keep the app running


@async_test
async def test_a_worker_that_cannot_start_is_reported_and_the_app_keeps_working():
    app = make_app(backend=Backend(worker_command="/nonexistent/worker"))
    async with app.run_test(size=SMALL) as pilot:
        await wait_for(pilot, lambda: _modals(app), what="the start error")
        [modal] = _modals(app)
        assert modal.title_text == "The worker could not start"
        assert "/nonexistent/worker" in modal.message
        assert modal.hint == "check that this command runs: /nonexistent/worker"
        assert [w.status for w in app.state.workers.values()] == ["dead"]
        await pilot.press("enter")
        await wait_for(pilot, lambda: not _modals(app), what="the modal to close")
        app.screen.set_focus(None)
        await _switch(pilot, "6", "history")
        await _switch(pilot, "1", "model")


@async_test
async def test_ctrl_r_on_an_invalid_setup_shows_the_validator_message_and_submits_nothing():
    app = make_app()
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        app.session.set("steps.0.sparsity", 1.5)
        app.session_changed()
        with pytest.raises(UserError) as expected:
            spec_from_dict(copy.deepcopy(app.session.data))
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: _modals(app), what="the validation error")
        [modal] = _modals(app)
        assert modal.message == expected.value.message and modal.hint == expected.value.hint
        assert "1.5" in modal.message
        await pilot.pause(0.2)
        assert app.state.jobs == {}

        # fixed, the same key runs it: the fake worker's perplexities are 30 dense, 30 * (1 + 4 * 0.5^2) after
        await pilot.press("enter")
        await wait_for(pilot, lambda: not _modals(app), what="the modal to close")
        app.session.set("steps.0.sparsity", 0.5)
        app.session_changed()
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.jobs and not app.state.latest().active, what="the run to finish")
        job = app.state.latest()
        assert job.status == "finished" and app.current_mode == "run"
        assert job.metric_value("wikitext2", "before") == pytest.approx(30.0)
        assert job.metric_value("wikitext2", "after") == pytest.approx(60.0)


# ---------------------------------------------------------------- a flood of events


@async_test
async def test_a_flood_of_progress_events_is_merged_into_few_repaints():
    events = 3000
    app = make_app(backend=fake_backend("--fake-stream", str(events), "--fake-rate", "0"))
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        published: list[set[str]] = []
        app.changed.subscribe(app, lambda changes: published.append(set(changes)), immediate=True)
        job = await app.submit("run", app.session.spec().to_dict(), "stream")
        assert job is not None
        await wait_for(pilot, lambda: not job.active, what="the stream to end")
        await pilot.pause(0.2)  # the last repaint after the result
        assert job.status == "finished" and job.events == events
        assert job.stages["stream"].done == events and job.stages["stream"].total == events
        repaints = sum(job.id in changes for changes in published)
        assert 1 <= repaints < events / 10, f"{repaints} repaints for {events} events"


# ---------------------------------------------------------------- outside a terminal


def _workbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def test_workbench_without_arguments_outside_a_terminal_prints_the_help():
    out = _workbench()
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and " ui " in out.stdout and " run " in out.stdout


def test_workbench_ui_outside_a_terminal_exits_2_with_the_reason():
    out = _workbench("ui")
    assert out.returncode == 2
    assert "needs a terminal" in out.stderr and "workbench run PRESET" in out.stderr
    assert "Traceback" not in out.stderr

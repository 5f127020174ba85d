"""The workbench as a daily tool: what a whole sitting with it asks of it, on the fake worker.

Quitting asks when work would be lost; one key that starts hours of compute asks first; help for each
screen's keys; the guided walk's banner; run and evaluation settings editable and named for what they
are; memory a machine cannot hold refused; focus visible everywhere; no keystroke lost while the worker
floods the UI with events.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from textual.widgets import Checkbox, Input, TabbedContent

from test_tui_run import screen_text
from tui_support import LARGE, SMALL, fake_backend, job_done, make_app, type_into, wait_for, worker_ready
from worker_support import async_test
from workbench.history import History
from workbench.memory_estimate import human_bytes
from workbench.screens.commands import WorkbenchCommands
from workbench.screens.evaluate import progress_text
from workbench.screens.session import SCREEN_ORDER
from workbench.screens.widgets import SCREENS, ConfirmModal, HelpModal, MessageModal


async def _show(pilot, app, mode: str):
    app.switch_mode(mode)
    await wait_for(pilot, lambda: app.screen.id == f"screen-{mode}" and app.screen.query("KeyBar"), what=f"the {mode} screen")
    app.screen.set_focus(None)
    return app.screen


# ---------------------------------------------------------------- quitting


@async_test
async def test_ctrl_q_quits_at_once_when_nothing_would_be_lost():
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await pilot.press("ctrl+q")
        await pilot.pause(0.2)
    assert app.return_code == 0 and not any(isinstance(s, ConfirmModal) for s in app.screen_stack)


@async_test
async def test_ctrl_q_asks_first_when_a_run_would_stop_or_edits_would_be_lost():
    app = make_app(backend=fake_backend(delay=0.2))
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        app.session.set("steps.0.sparsity", 0.6)
        app.session_changed()
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.latest("run") is not None and app.state.latest("run").active, what="a run")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the question")
        question = app.screen.question
        assert "1 job(s) stop" in question and "demo wanda 60%" in question and "not saved as a preset" in question
        await pilot.press("enter")  # the focused button is the safe one
        await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmModal), what="the question to close")
        assert app.is_running and app.state.latest("run").active
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the question again")
        await pilot.press("y")
        await pilot.pause(0.3)
    assert app.return_code == 0


# ---------------------------------------------------------------- help, palette, tabs, tables


@async_test
async def test_question_mark_and_f1_list_the_keys_of_the_shown_screen():
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _show(pilot, app, "history")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpModal), what="the help")
        rows = app.screen.rows
        shown = {(where, what) for where, _, what in rows}
        assert ("this screen", "Re-run") in shown and ("this screen", "Compare") in shown
        assert ("everywhere", "Run") in shown and any(what.startswith("Quit") for _, what in shown)
        assert set(next(keys for _, keys, what in rows if what == "Keys of this screen").split(" / ")) == {"?", "f1"}
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen.id == "screen-history", what="History again")

        await _show(pilot, app, "model")
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpModal), what="the Model help")
        assert ("this screen", "Inspect") in {(w, what) for w, _, what in app.screen.rows}
        await pilot.press("escape")
        # typed into a field, ? is a character, not the help
        await type_into(pilot, "#model-device", "?")
        assert not isinstance(app.screen, HelpModal) and app.screen.query_one("#model-device", Input).value == "?"


@async_test
async def test_the_palette_shows_each_commands_key():
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await pilot.pause()
        commands = {title: help_text for title, _, help_text in WorkbenchCommands(app.screen).commands()}
        assert commands["Run the current setup"].startswith("ctrl+r")
        assert commands["Compare runs"].startswith("c on History")
        assert commands["Show the keys of this screen"].startswith("?")
        for _name, title, key in SCREENS:
            assert commands[f"Screen: {title}"] == key


@async_test
async def test_tabs_have_keys_and_tables_go_home_and_end():
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show(pilot, app, "model")
        tabs = screen.query_one(TabbedContent)
        assert tabs.active == "tab-model"
        await pilot.press("]")
        await wait_for(pilot, lambda: tabs.active == "tab-backend", what="the next tab")
        assert app.focused is not None and app.focused.id == "backend-where"  # the focus moves into the tab
        app.screen.set_focus(None)
        await pilot.press("]", "]")
        await wait_for(pilot, lambda: tabs.active == "tab-model", what="round to the first tab")
        await pilot.press("[")
        await wait_for(pilot, lambda: tabs.active == "tab-inspect", what="the previous tab")

    spec = {"name": "r", "steps": []}
    with History() as history:
        for i in range(12):
            history.create_run(f"20250101-0000{i:02d}-run{i:03d}", spec, name=f"run {i}", model="demo")
            history.finish_run(f"20250101-0000{i:02d}-run{i:03d}", {"steps": []})
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show(pilot, app, "history")
        table = screen.query_one("#history-table")
        await wait_for(pilot, lambda: table.row_count == 12, what="the runs")
        table.focus()
        await pilot.press("end")
        assert table.cursor_row == 11
        await pilot.press("home")
        assert table.cursor_row == 0


# ---------------------------------------------------------------- the guided walk


@async_test
async def test_the_guide_banner_names_its_keys_where_they_work_and_escape_ends_the_walk():
    app = make_app(backend=fake_backend(delay=0.2))
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        app.session.set("evaluate.limit", 1)
        await pilot.press("ctrl+r")  # a run, then cancelled: it must not show as the walk's run
        await wait_for(pilot, lambda: app.state.latest("run") is not None and app.state.latest("run").active, what="a run")
        await app.bridge.cancel(app.state.latest("run").id)
        assert (await job_done(pilot, app)).status == "cancelled"
        assert app.open_preset("wanda-50", guided=True)
        for i, name in enumerate(SCREEN_ORDER):
            await wait_for(pilot, lambda: app.screen.id == f"screen-{name}" and app.screen.query("#guide"),
                           what=f"the {name} screen")
            banner = app.screen.query_one("#guide")
            await wait_for(pilot, lambda: banner.display and "wanda-50" in str(banner.render()), what="the banner")
            text = str(banner.render())
            assert ("ctrl+b back" in text) == (i > 0)
            assert ("ctrl+n next" in text) == (i < len(SCREEN_ORDER) - 1)
            assert "esc ends the walk" in text
            assert banner.region.height == 1  # one line at 80x24 (the whole note is in the help)
            if i < len(SCREEN_ORDER) - 1:
                await pilot.press("ctrl+n")
        assert "ctrl+r runs it" in str(banner.render())
        text = screen_text(app)
        assert "Ready to run" in text and "wanda-50" in text  # the walk's setup, not the cancelled run before it
        assert "The last run (demo wanda 50%, cancelled) is in History" in text  # named from its edited setup
        # screens outside the walk show no banner
        await _show(pilot, app, "history")
        assert not app.screen.query_one("#guide").display
        await _show(pilot, app, "run")
        await pilot.press("escape")  # leaves a focused widget first, if the screen gave one the focus back
        await pilot.pause()
        if app.session.guide is not None:
            assert app.focused is None
            await pilot.press("escape")  # nothing focused: escape ends the walk
        await wait_for(pilot, lambda: app.session.guide is None, what="the walk to end")
        await wait_for(pilot, lambda: not app.screen.query_one("#guide").display, what="the banner to go")


# ---------------------------------------------------------------- memory a machine cannot hold


@async_test
async def test_calibration_sizes_the_machine_cannot_hold_are_flagged_inline_and_run_refuses():
    app = make_app(start_worker=True)
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        screen = await _show(pilot, app, "calibration")
        await type_into(pilot, "#f-nsamples", "999999")
        note = screen.query_one("#memory-note")
        await wait_for(pilot, lambda: note.display and "cannot run" in str(note.render()), what="the inline problem")
        # the figure, computed here: a sample's layer input and output (2 x seqlen x hidden values of the demo model,
        # in its checkpoint's bfloat16 on a GPU) times the samples, on the fake worker's 80 GiB GPU (its hello)
        seqlen, hidden = app.session.get("calibration.seqlen"), 256
        need = 2 * seqlen * hidden * 2 * 999999
        assert need > 80 * 2**30
        text = " ".join(str(note.render()).split())
        assert f"need {human_bytes(need)}" in text and "999999 samples" in text and "Fake GPU 0" in text
        assert "what to do: use at most" in text
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: isinstance(app.screen, MessageModal), what="the refusal")
        assert app.screen.title_text == "The setup cannot run on this machine" and "999999" in app.screen.message
        assert not app.state.jobs or all(j.kind != "run" for j in app.state.jobs.values())
        await pilot.press("escape")
        await type_into(pilot, "#f-nsamples", "64")
        await wait_for(pilot, lambda: not note.display, what="the problem to go")


def test_validate_warns_and_refuses_from_the_same_estimate(tmp_path):
    def validate(text: str) -> subprocess.CompletedProcess:
        path = tmp_path / "p.toml"
        path.write_text(text)
        return subprocess.run([sys.executable, "-m", "workbench", "validate", str(path)], capture_output=True, text=True,
                              timeout=60)

    base = 'name = "p"\n[model]\nname = "demo"\ndevice = "cpu"\n[[steps]]\nmethod = "wanda"\nsparsity = 0.5\n'
    out = validate(base + '[calibration]\nnsamples = 128\nseqlen = 4096\n')
    assert out.returncode == 0, out.stderr
    assert "warning: calibration.seqlen = 4096 exceeds the model's context of 512 tokens" in out.stdout
    out = validate(base + '[calibration]\nnsamples = 99999999\nseqlen = 512\n')
    assert out.returncode == 2
    assert "calibration.nsamples" in out.stderr and "more than host memory holds" in out.stderr
    assert "use at most" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- run settings, export, evaluation names


@pytest.mark.slow
@async_test
async def test_export_and_evaluation_settings_are_edited_in_the_ui_and_the_kept_model_is_evaluated_by_name(tmp_path):
    app = make_app(backend=fake_backend(delay=0.01))
    async with app.run_test(size=LARGE) as pilot:
        await worker_ready(pilot, app)
        screen = await _show(pilot, app, "evaluate")
        tabs = screen.query_one("#eval-tabs", TabbedContent)
        await pilot.press("]")
        await wait_for(pilot, lambda: tabs.active == "tab-run-settings", what="the Run settings tab")
        await type_into(pilot, "#run-limit", "3")
        await wait_for(pilot, lambda: app.session.get("evaluate.limit") == 3, what="the window limit in the setup")
        screen.query_one("#run-save", Checkbox).value = True
        await wait_for(pilot, lambda: app.session.get("export.save") is True, what="export on")
        out = tmp_path / "kept"
        out.mkdir()
        (out / "compression.json").write_text('{"exported_by": "workbench", "files": ["compression.json"]}')  # an earlier export
        await type_into(pilot, "#run-out", str(out))
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the question about the folder")
        assert "earlier workbench export" in app.screen.question
        await pilot.press("y")
        await wait_for(pilot, lambda: app.screen is screen, what="the form again")
        screen.query_one("#run-overwrite", Checkbox).value = True
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the question about overwrite")
        await pilot.press("n")
        await wait_for(pilot, lambda: not screen.query_one("#run-overwrite", Checkbox).value, what="overwrite off again")
        assert app.session.get("export.overwrite", False) is False
        screen.query_one("#run-overwrite", Checkbox).value = True
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the question again")
        await pilot.press("y")
        await wait_for(pilot, lambda: app.session.get("export.overwrite") is True, what="overwrite on")
        assert app.session.spec().export.out == str(out)

        await pilot.press("ctrl+r")
        run = await job_done(pilot, app)
        assert run.status == "finished" and run.spec["evaluate"]["limit"] == 3
        with History() as history:
            assert history.get(run.run_id).summary["export"] == str(out)

        screen = await _show(pilot, app, "evaluate")
        tabs.active = "tab-eval-now"
        targets = screen.query_one("#eval-target")
        key = f"run:{run.run_id}"
        await wait_for(pilot, lambda: any(o.id == key for o in targets.options), what="the kept model as a target")
        targets.highlighted = targets.get_option_index(key)
        await pilot.pause()
        await pilot.press("ctrl+e")
        await pilot.pause(0.5)
        assert not isinstance(app.screen, MessageModal), (app.screen.message, app.screen.hint)
        await wait_for(pilot, lambda: app.state.latest("evaluate") is not None, what="the evaluation")
        job = app.state.latest("evaluate")
        await wait_for(pilot, lambda: "Perplexity of" in str(screen.query_one("#eval-progress").render()) or not job.active,
                       what="the progress line")
        await job_done(pilot, app, job)
        # named for what was measured: the run (named from its edited setup) and its steps, never "dense"
        assert run.title == "demo wanda 50%"
        assert job.title == f"demo wanda 50% ({run.run_id[-6:]}): wanda 50%"
        running = copy.copy(job)
        running.status = "running"  # what the progress line said while it ran (the worker's stage: "Perplexity (dense)")
        assert progress_text(running).startswith(f"Perplexity of {job.title} (wikitext2)")
        with History() as history:
            record = history.get(job.run_id)
        assert record.name == f"eval of demo wanda 50% ({run.run_id[-6:]})"
        # History names what the evaluation measured; the target list does not grow an entry per evaluation
        history_screen = await _show(pilot, app, "history")
        table = history_screen.query_one("#history-table")
        await wait_for(pilot, lambda: table.row_count == 2, what="both runs listed")
        steps = [str(table.get_row_at(i)[3]) for i in range(2)]
        assert steps == ["eval · wanda 50%", "wanda 50%"]
        screen = await _show(pilot, app, "evaluate")
        await wait_for(pilot, lambda: not screen._stale, what="the targets read again")
        assert [o.id for o in targets.options] == ["dense", key]


# ---------------------------------------------------------------- focus you can see


FOCUS_SCREENS = ("model", "calibration", "compression", "evaluate", "presets")


def _region_render(app, widget) -> list:
    """The segments (text and style) the compositor draws in ``widget``'s region."""
    strips = app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    from rich.console import Console
    import io

    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False)
    console.print(strips)
    lines = console.export_text(styles=True).splitlines()
    r = widget.region
    return [line for line in lines[r.y:r.bottom]]


@pytest.mark.slow
@async_test
async def test_every_tab_stop_shows_its_focus():
    app = make_app(start_worker=False)
    async with app.run_test(size=LARGE) as pilot:
        for mode in FOCUS_SCREENS:
            screen = await _show(pilot, app, mode)
            seen = []
            for _ in range(40):
                await pilot.press("tab")
                await pilot.pause()
                widget = app.focused
                if widget is None or widget in seen:
                    break
                seen.append(widget)
                focused = _region_render(app, widget)
                screen.set_focus(None)
                await pilot.pause()
                blurred = _region_render(app, widget)
                assert focused != blurred, f"{mode}: focus on {widget!r} does not show"
                widget.focus()
                await pilot.pause()
            assert len(seen) >= 2, mode


@async_test
async def test_check_boxes_show_their_state_without_colour():
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show(pilot, app, "model")
        box = screen.query_one("#model-trust", Checkbox)
        off = str(box.render())
        box.value = True
        await pilot.pause()
        on = str(box.render())
        assert "✓" in on and "✓" not in off


# ---------------------------------------------------------------- no keystroke lost under load


@pytest.mark.slow
@async_test
async def test_every_character_typed_arrives_while_the_worker_floods_the_ui():
    from textual import events

    app = make_app(backend=fake_backend("--fake-stream", "100000", "--fake-rate", "1000"))
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        screen = await _show(pilot, app, "model")
        screen.query_one(TabbedContent).active = "tab-backend"
        await pilot.pause()
        field = screen.query_one("#backend-command", Input)
        field.focus()
        await pilot.pause()
        job = await app.submit("run", app.session.spec().to_dict(), "stream")
        await wait_for(pilot, lambda: job.events > 200, what="the flood")
        text = "workbench worker --a-long-option=" + "abcdefghijklmnopqrstuvwxyz0123456789" * 3
        before = job.events
        for char in text:  # as a terminal delivers keys: one after another, nothing waits for the app in between
            event = events.Key(char, char)
            event.set_sender(app)
            app._driver.send_message(event)
        await wait_for(pilot, lambda: len(field.value) >= len(text), timeout=30, what="every character")
        assert field.value == text
        assert job.events > before and job.active  # the flood went on while the keys arrived


@async_test
async def test_keys_typed_right_after_a_tab_key_go_to_the_new_tab():
    from textual import events

    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _show(pilot, app, "evaluate")
        for key in ("right_square_bracket", "tab", "tab"):  # one burst, as a terminal delivers a fast typist's keys
            event = events.Key(key, None)
            event.set_sender(app)
            app._driver.send_message(event)
        await wait_for(pilot, lambda: app.screen.query_one("#eval-tabs").active == "tab-run-settings", what="the tab")
        await pilot.pause(0.2)
        assert app.focused is not None and app.focused.id == "run-reference"  # name, then two tabs on


@async_test
async def test_a_died_run_shows_as_died_in_history_styled_as_a_failure():
    spec = {"name": "gone", "steps": []}
    with History() as history:
        history.create_run("20250101-000000-die001", spec, name="gone", model="demo")
        history.fail_run("20250101-000000-die001", "died", "its owning process is gone")
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show(pilot, app, "history")
        table = screen.query_one("#history-table")
        await wait_for(pilot, lambda: table.row_count == 1, what="the run")
        status = table.get_row_at(0)[2]
        assert str(status) == "died" and "red" in str(status.style)

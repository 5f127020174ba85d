"""What keeps keys fast: the one-widget key bar, screens shown again at once without a restyle, a worker line
and a History table left alone when nothing they show changed."""

from __future__ import annotations

from textual import events
from textual.app import App
from textual.color import Color
from textual.command import CommandPalette
from textual.css.stylesheet import Stylesheet
from textual.widgets import DataTable

from tui_support import SMALL, fake_backend, make_app, wait_for, worker_ready
from worker_support import async_test
from workbench.history import History
from workbench.screens import history as history_screen
from workbench.screens.app import WorkbenchApp
from workbench.screens.config import Config
from workbench.screens.session import Session
from workbench.screens.state import WorkerState
from workbench.screens.widgets import ConfirmModal, KeyBar, WorkerLine
from workbench.spec import load_preset


async def _show(pilot, mode: str, key: str | None = None):
    """Show ``mode`` (with its key when given, else as a screen's code does) and return its screen."""
    if key:
        await pilot.press(key)
    else:
        pilot.app.switch_mode(mode)
    await wait_for(pilot, lambda: pilot.app.screen.id == f"screen-{mode}" and pilot.app.screen.query(KeyBar),
                   what=f"the {mode} screen")
    return pilot.app.screen


def _bar(app) -> KeyBar:
    return app.screen.query_one(KeyBar)


async def _shown_twice(pilot):
    """History and Run each shown twice: Textual refreshes the stylesheet once at a mode's second visit (a screen
    mounted by a mode switch is marked as needing it), so from the third visit on a switch is what it always is."""
    for _ in range(2):
        await _show(pilot, "history", "6")
        await _show(pilot, "run", "4")
    await pilot.pause()


def _restyles(monkeypatch) -> list:
    """The nodes Textual restyles from now on, in order."""
    restyled, update_nodes = [], Stylesheet.update_nodes

    def spy(self, nodes, animate: bool = False) -> None:
        nodes = list(nodes)
        restyled.extend(nodes)
        update_nodes(self, nodes, animate=animate)

    monkeypatch.setattr(Stylesheet, "update_nodes", spy)
    return restyled


def _add_runs(*names: str) -> list[str]:
    """Runs recorded in the history as a headless ``workbench run`` records them; their ids."""
    spec = load_preset("quickstart").to_dict()
    with History() as history:
        for name in names:
            history.create_run(name, spec, name=name, model="demo")
            history.finish_run(name, {"steps": [{"label": "wanda 50%", "sparsity": 0.5}]})
    return list(names)


# ---------------------------------------------------------------- the key bar


@async_test
async def test_the_key_bar_draws_the_screens_keys_as_remapped_dims_disabled_ones_and_presses_a_clicked_key():
    app = WorkbenchApp(Session("quickstart", fake_backend()), config=Config(keymap={"history.compare": "x"}),
                       start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _show(pilot, "history", "6")
        bar = _bar(app)
        await wait_for(pilot, lambda: bar.keys, what="the History keys")
        # the screen's bindings ("c" moved to "x" by the keymap, which puts it after the screen's others, as in
        # Textual's Footer), then ctrl+r from the app, and the palette on the right
        line = bar.render()
        expected = " ⏎ Open  space Mark  r Re-run  e Export  x Compare  ^r Run  ? Help "
        assert line.plain == expected.ljust(80 - len("▏^p palette ")) + "▏^p palette "
        assert len(app.screen.query("FooterKey")) == 0  # one widget, no widget per key

        # a click on a key presses it: "x Compare" with nothing marked says how to mark runs
        column = line.plain.index("x Compare")
        await pilot.click(KeyBar, offset=(column + 1, 0))
        await wait_for(pilot, lambda: any("to compare them" in n.message for n in app._notifications),
                       what="the compare action's hint")
        # and the palette's key opens the palette
        await pilot.click(KeyBar, offset=(78, 0))
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="the command palette")


@async_test
async def test_the_key_bar_shows_cancel_only_while_a_run_can_be_cancelled():
    app = make_app(backend=fake_backend(delay=0.2))
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        await _show(pilot, "run", "4")
        bar = _bar(app)
        await wait_for(pilot, lambda: bar.keys, what="the Run keys")
        # nothing to cancel yet: no "c Cancel" at all (a greyed key still reads as something to press)
        assert [k[1:] for k in bar.keys] == [("^r", "Run", True), ("?", "Help", True)]
        line = bar.render()
        assert "Cancel" not in line.plain
        assert not line.get_style_at_offset(app.console, line.plain.index("Run")).dim

        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: ("c", "Cancel", True) in [k[1:] for k in bar.keys], what="Cancel enabled")
        assert not bar.render().get_style_at_offset(app.console, bar.render().plain.index("Cancel")).dim
        await pilot.press("c")  # the key the bar shows asks to cancel the run
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the cancel question")
        await pilot.press("y")
        await wait_for(pilot, lambda: app.state.latest("run").status == "cancelled", timeout=60, what="the cancel")
        await wait_for(pilot, lambda: "Cancel" not in [k[2] for k in bar.keys], what="Cancel gone again")


# ---------------------------------------------------------------- switching screens


@async_test
async def test_a_screen_shown_again_is_drawn_without_textuals_switch_delay_or_a_restyle(monkeypatch):
    delays, delay_update = [], App.delay_update

    def spy_delay(self, delay: float = 0.05) -> None:
        delays.append(self._current_mode)  # the mode being left: switch_mode asks before it changes
        delay_update(self, delay)

    monkeypatch.setattr(App, "delay_update", spy_delay)
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        history = await _show(pilot, "history", "6")
        assert "run" in delays  # the first visit of History (from Run) hides its build behind Textual's delay
        await _shown_twice(pilot)
        delays.clear()
        restyled = _restyles(monkeypatch)
        drawn, display = [], app._display
        app._display = lambda screen, update: (drawn.append((screen.id, update)), display(screen, update))[1]

        assert await _show(pilot, "history", "6") is history
        # drawn whole: a full frame of History went out, and nothing waited for Textual's 50 ms or restyled it
        await wait_for(pilot, lambda: any(sid == "screen-history" and getattr(u, "region", None) is not None
                                          and u.region.size == app.size for sid, u in drawn),
                       what="a full frame of History")
        assert delays == []
        assert not [n for n in restyled if n is history or history in n.ancestors]


@async_test
async def test_a_theme_changed_while_a_screen_was_hidden_shows_when_it_is_shown_again():
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _shown_twice(pilot)
        history = await _show(pilot, "history", "6")
        await _show(pilot, "run", "4")
        bar = history.query_one("#screen-bar")
        before = bar.styles.background
        app.theme = "textual-light"
        await pilot.pause()
        assert await _show(pilot, "history", "6") is history
        await pilot.pause()
        panel = Color.parse(app.get_css_variables()["panel"])
        assert panel != before  # the light theme's panel is another colour than the dark one's
        assert bar.styles.background == panel


@async_test
async def test_a_screen_hidden_while_the_terminal_lost_focus_is_restyled_when_shown(monkeypatch):
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _shown_twice(pilot)
        history = await _show(pilot, "history", "6")
        app.post_message(events.AppBlur())
        await wait_for(pilot, lambda: not app.app_focus, what="the terminal's focus to go")
        await _show(pilot, "run")  # hidden without the terminal's focus
        app.post_message(events.AppFocus())
        await wait_for(pilot, lambda: app.app_focus, what="the terminal's focus back")
        restyled = _restyles(monkeypatch)
        await _show(pilot, "history")
        await pilot.pause()
        assert history in restyled and history.query_one(DataTable) in restyled


# ---------------------------------------------------------------- lines and tables left alone


@async_test
async def test_the_worker_line_is_redrawn_only_when_its_text_changes():
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await wait_for(pilot, lambda: app.screen.query(WorkerLine), what="the first screen")
        line = app.screen.query_one(WorkerLine)
        updates = []
        line.update = updates.append  # what would be drawn
        gpu = {"kind": "cuda", "name": "GPU 0", "total": 80 * 2**30, "free": 79 * 2**30}
        worker = WorkerState("local", status="ready", devices=[gpu])
        line.show({"local": worker})
        line.show({"local": worker})  # a memory report with the same free memory
        assert updates == ["[green]●[/] local: GPU 0 79.0 GiB free"]
        worker.devices = [{**gpu, "free": 60 * 2**30}]
        line.show({"local": worker})
        worker.status, worker.message = "dead", "killed"
        line.show({"local": worker})
        assert updates[1:] == ["[green]●[/] local: GPU 0 60.0 GiB free", "[red]●[/] local: killed"]


@async_test
async def test_history_keeps_its_table_for_the_same_runs_and_reads_runs_made_elsewhere_when_shown_later(monkeypatch):
    older, newer = _add_runs("run-a", "run-b")
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show(pilot, "history", "6")
        table = screen.query_one("#history-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 2, what="the two runs")
        await pilot.press("down", "space")  # mark the older run (the cursor stays on it, the last row)
        assert screen.marked == {older} and screen.cursor_run() == older
        cleared = []
        clear = table.clear
        table.clear = lambda *a, **k: (cleared.append(1), clear(*a, **k))[1]

        loaded = screen._loaded_at
        screen.reload()  # the same runs: the table stays as it is, mark and cursor included
        await app.workers.wait_for_complete()  # the read runs on a thread
        await wait_for(pilot, lambda: screen._loaded_at != loaded, what="the runs read again")
        assert cleared == [] and screen.marked == {older}
        assert str(table.get_cell(older, "mark")) == history_screen.MARK and screen.cursor_run() == older

        # a run recorded elsewhere (a headless run) is not read when the screen shows again soon after ...
        monkeypatch.setattr(history_screen, "RELOAD_AFTER", 3600.0)
        (third,) = _add_runs("run-c")
        await _show(pilot, "run", "4")
        await _show(pilot, "history", "6")
        await pilot.pause()
        assert table.row_count == 2 and cleared == []
        # ... but after a while: newest first, the mark and the cursor kept on their runs
        monkeypatch.setattr(history_screen, "RELOAD_AFTER", 0.0)
        await _show(pilot, "run", "4")
        await _show(pilot, "history", "6")
        await wait_for(pilot, lambda: table.row_count == 3, what="the run made elsewhere")
        assert [table.coordinate_to_cell_key((i, 0)).row_key.value for i in range(3)] == [third, newer, older]
        assert screen.marked == {older} and str(table.get_cell(older, "mark")) == history_screen.MARK
        assert screen.cursor_run() == older

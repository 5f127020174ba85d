"""The frame every workbench screen shares: screen bar, guide banner, body, worker line, footer.

A screen subclasses ``WorkbenchScreen``, sets ``NAME`` (its mode) and
implements ``compose_body``. It repaints from the app's state in
``on_state(changes)`` (``changes``: the job ids that changed, and
``"workers"``), which the app calls at most a few dozen times a second and
only while the screen is shown, and re-reads the session in ``on_session``
when the setup changed elsewhere (another screen, a preset).
"""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import ContentSwitcher, TabbedContent, TabPane

from .session import SCREEN_ORDER
from .widgets import GuideBanner, KeyBar, ScreenBar, WorkerLine


class WorkbenchScreen(Screen):
    NAME = ""
    TITLE = ""
    BINDINGS = [
        Binding("]", "tab(1)", "Next tab", id="screen.next_tab"),
        Binding("[", "tab(-1)", "Previous tab", show=False, id="screen.previous_tab"),
    ]

    def __init__(self):
        super().__init__(id=f"screen-{self.NAME}")
        self._seen_revision = -1
        self._suspended_focus: bool | None = None

    # ------------------------------------------------------------ to override
    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_state(self, changes: set[str]) -> None:
        """Repaint from ``self.app.state`` after these changes."""

    def on_session(self) -> None:
        """Re-read ``self.app.session`` (called when the screen shows and the setup changed since)."""

    # ------------------------------------------------------------ frame
    def compose(self) -> ComposeResult:
        yield ScreenBar(self.NAME, id="screen-bar")
        yield GuideBanner(id="guide")
        yield from self.compose_body()
        yield WorkerLine(id="worker-line")
        yield KeyBar(id="keys")

    def on_mount(self) -> None:
        self.app.changed.subscribe(self, self._changed)
        self._show_guide()
        self.query_one(WorkerLine).show(self.app.state.workers)

    def on_screen_suspend(self) -> None:
        self._suspended_focus = self.app.app_focus

    def on_screen_resume(self, event: events.ScreenResume) -> None:
        # Textual restyles every node of a screen shown again by a mode switch: most of a switch's time, and it
        # drops the tables' rendered lines. Its styles are current: a theme change restyles the screen as it is
        # switched to, classes set while it was hidden restyled their nodes then, and Textual does not restyle a
        # screen uncovered by a pop either. Only the terminal's focus (:focus, :blur) is followed on the shown
        # screen alone, so a change of it while this one was hidden restyles it.
        if self._suspended_focus == self.app.app_focus:
            event.refresh_styles = False
        self._show_guide()
        self.query_one(WorkerLine).show(self.app.state.workers)
        if self._seen_revision != self.app.session.revision:
            self._seen_revision = self.app.session.revision
            self.on_session()
        self.on_state(set(self.app.state.jobs) | {"workers"})

    def _changed(self, changes: set[str]) -> None:
        if not self.is_current:
            return
        if "workers" in changes:
            self.query_one(WorkerLine).show(self.app.state.workers)
        if "session" in changes and self._seen_revision != self.app.session.revision:
            self._seen_revision = self.app.session.revision
            self.on_session()
        self.on_state(changes)

    def _show_guide(self) -> None:
        """The guided walk's banner, on the walk's screens only: where the walk is, its keys, and this screen's note."""
        banner = self.query_one(GuideBanner)
        guide = self.app.session.guide
        banner.display = guide is not None and self.NAME in SCREEN_ORDER
        if not banner.display:
            return
        here = SCREEN_ORDER.index(self.NAME)
        keys = []
        if here > 0:
            keys.append(f"[b]{self.app.key_for('guide.back', 'ctrl+b')}[/] back")
        if here < len(SCREEN_ORDER) - 1:
            keys.append(f"[b]{self.app.key_for('guide.next', 'ctrl+n')}[/] next")
        else:
            keys.append(f"[b]{self.app.key_for('run.start', 'ctrl+r')}[/] runs it")
        keys.append("[b]esc[/] ends the walk")
        banner.update(f"[b]{escape(guide.preset)}[/] {here + 1}/{len(SCREEN_ORDER)} {' · '.join(keys)} · "
                      f"{self.TITLE}: {escape(guide.note(self.NAME))}")

    # ------------------------------------------------------------ tabs
    _has_tabs: bool | None = None  # whether the body has tabs: known once it is composed, and never changes

    def _tabs(self) -> TabbedContent | None:
        """The screen's first shown tabs."""
        found = [t for t in self.query(TabbedContent) if t.display]
        return found[0] if found else None

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "tab":  # asked at every repaint of the key bar: the query once
            if self._has_tabs is None and self.is_mounted:
                self._has_tabs = bool(self.query(TabbedContent))
            return bool(self._has_tabs)
        return True

    def action_tab(self, offset: int) -> None:
        """Show the next (or previous) tab of the screen's tabs, and put the focus in it."""
        tabs = self._tabs()
        if tabs is None:
            return
        switcher = tabs.get_child_by_type(ContentSwitcher)
        panes = [pane.id for pane in switcher.children if isinstance(pane, TabPane) and pane.id]
        if not panes:
            return
        current = panes.index(tabs.active) if tabs.active in panes else 0
        tabs.active = panes[(current + offset) % len(panes)]
        # at once, not after the next refresh: keys typed right after this one go to the new tab's field
        if not self._focus_tab(tabs):
            self.call_after_refresh(self._focus_tab, tabs)

    def _focus_tab(self, tabs: TabbedContent) -> bool:
        pane = tabs.get_pane(tabs.active)
        target = next((w for w in pane.query("*") if w.focusable), None)
        if target is not None:
            self.set_focus(target)  # now: Widget.focus() would queue it behind keys already typed
        return target is not None

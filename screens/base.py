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
from textual.markup import escape
from textual.screen import Screen

from .session import SCREEN_ORDER
from .widgets import GuideBanner, KeyBar, ScreenBar, WorkerLine


class WorkbenchScreen(Screen):
    NAME = ""
    TITLE = ""

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
        banner = self.query_one(GuideBanner)
        guide = self.app.session.guide
        banner.display = guide is not None
        if guide is not None:
            nxt = self.app.key_for("guide.next", "ctrl+n")
            step = f"{SCREEN_ORDER.index(self.NAME) + 1}/{len(SCREEN_ORDER)}" if self.NAME in SCREEN_ORDER else "·"
            banner.update(f"[b]{escape(guide.preset)}[/] {step} [b]{nxt}[/] next · {self.TITLE}: {escape(guide.note(self.NAME))}")

"""Widgets every screen uses: the screen bar, the guide banner, the worker line, and the modals."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

# (mode name, title, key) in the order of the screen bar
SCREENS = (
    ("model", "Model", "1"),
    ("calibration", "Calibration", "2"),
    ("compression", "Compression", "3"),
    ("run", "Run", "4"),
    ("evaluate", "Evaluate", "5"),
    ("history", "History", "6"),
    ("presets", "Presets", "7"),
)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class ScreenBar(Static):
    """One line naming every screen with its key; the current one highlighted."""

    def __init__(self, current: str, **kwargs):
        super().__init__(**kwargs)
        self.current = current

    def on_mount(self) -> None:
        self.update(self.render_bar())

    def render_bar(self) -> str:
        parts = []
        for name, title, key in SCREENS:
            shown = self.app.key_for(f"screen.{name}", key) if hasattr(self.app, "key_for") else key
            text = f"{shown} {title}"
            parts.append(f"[reverse b] {text} [/]" if name == self.current else f" {text} ")
        return "".join(parts)


class GuideBanner(Static):
    """In a guided session: the preset's explanation of this screen's values, and how to go on."""


class WorkerLine(Static):
    """The workers' state in one line: starting, ready (with device and free memory), dead (with why)."""

    def show(self, workers) -> None:
        if not workers:
            self.update("worker: not started (it starts with the first job)")
            return
        parts = []
        for w in workers.values():
            if w.status == "ready":
                gpus = [d for d in w.devices if d.get("kind") == "cuda"]
                where = ", ".join(f"{d['name']} {human_bytes(d.get('free'))} free" for d in gpus) or "CPU"
                parts.append(f"[green]●[/] {w.name}: {where}")
            elif w.status == "dead":
                parts.append(f"[red]●[/] {w.name}: {w.message or 'dead'}")
            else:
                parts.append(f"[yellow]●[/] {w.name}: starting")
        self.update("  ".join(parts))


class MessageModal(ModalScreen[None]):
    """What happened and what to do; any key among enter/escape closes it."""

    BINDINGS = [Binding("escape,enter", "dismiss", "Close", id="modal.close")]

    def __init__(self, title: str, message: str, hint: str | None = None, severity: str = "error"):
        super().__init__(classes=f"modal {severity}")
        self.title_text, self.message, self.hint = title, message, hint

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.title_text, id="modal-title")
            yield Static(self.message, id="modal-message", markup=False)
            if self.hint:
                yield Static(f"What to do: {self.hint}", id="modal-hint", markup=False)
            yield Button("OK", id="ok", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    async def action_dismiss(self, result=None) -> None:
        self.dismiss(None)


class ConfirmModal(ModalScreen[bool]):
    """A yes/no question; y/enter confirms, n/escape declines."""

    BINDINGS = [Binding("y", "answer(True)", "Yes", id="modal.yes"), Binding("n,escape", "answer(False)", "No", id="modal.no")]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No"):
        super().__init__(classes="modal")
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, id="modal-message", markup=False)
            with Horizontal(id="modal-buttons"):
                yield Button(f"{self.yes} (y)", id="yes", variant="error")
                yield Button(f"{self.no} (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class PromptModal(ModalScreen[str | None]):
    """Ask for one line of text (a path, a name); enter accepts, escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="modal.cancel")]

    def __init__(self, question: str, value: str = "", placeholder: str = ""):
        super().__init__(classes="modal")
        self.question, self.value, self.placeholder = question, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, id="modal-message", markup=False)
            yield Input(self.value, placeholder=self.placeholder, id="modal-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)

"""Widgets every screen uses: the screen bar, the guide banner, the worker line, the key bar, tables, check
boxes, and the modals (message, confirm, prompt, help)."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, DataTable, Footer, Input, Label, Static

from workbench.host import human_bytes  # light: the UI imports it at start

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


def human_seconds(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Table(DataTable):
    """A data table whose home and end keys go to the first and last row."""

    BINDINGS = [Binding("home", "first_row", "First row", show=False), Binding("end", "last_row", "Last row", show=False)]

    def action_first_row(self) -> None:
        if self.row_count:
            self.move_cursor(row=0)

    def action_last_row(self) -> None:
        if self.row_count:
            self.move_cursor(row=self.row_count - 1)


class Check(Checkbox):
    """A check box whose box shows a tick when on and stays empty when off, so its state never rests on colour."""

    @property
    def _button(self):
        self.BUTTON_INNER = "✓" if self.value else " "
        return super()._button


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

    _text: str | None = None  # what is shown

    def show(self, workers) -> None:
        """Show the workers' state; the same text as shown is left alone (a worker reports memory every few seconds)."""
        text = self.line(workers)
        if text != self._text:
            self._text = text
            self.update(text)

    @staticmethod
    def line(workers) -> str:
        if not workers:
            return "worker: not started (it starts with the first job)"
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
        return "  ".join(parts)


class KeyBar(Footer):
    """The shown screen's keys on one line, the command palette's key on the right; a click on a key presses it.

    Textual's Footer mounts a widget per key and mounts them all again whenever the bindings change, which is
    at every screen switch (on both screens); this one draws the same line as text, and only when it changes.
    It keeps the Footer type, so ``Footer`` selectors and the theme's footer colours still apply.
    """

    COMPONENT_CLASSES = {"keybar--key", "keybar--description", "keybar--separator"}
    DIM = Style(dim=True)  # a key whose action is disabled now, as the Footer shows it

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.keys: list[tuple[str, str, str, bool]] = []  # (key, key as shown, description, enabled), left to right
        self.palette: tuple[str, str, str, bool] | None = None  # the command palette's, drawn on the right
        self._spans: list[tuple[int, int, str]] = []  # (first column, end column, key) of each key drawn

    def compose(self) -> ComposeResult:
        yield from ()  # no widget per key: render() draws them

    def on_mount(self) -> None:
        super().on_mount()  # subscribes bindings_changed to the screen's bindings
        self.bindings_changed(self.screen)

    def bindings_changed(self, screen) -> None:
        # a hidden screen's keys are read again when it shows (Textual refreshes its bindings then)
        if not (self.is_attached and screen is self.screen and screen.is_current):
            return
        keys, actions, palette = [], set(), None
        for _, binding, enabled, _ in screen.active_bindings.values():
            key = (binding.key, self.app.get_key_display(binding), binding.description, enabled)
            if binding.action in ("command_palette", "app.command_palette"):
                palette = key if self.show_command_palette and self.app.ENABLE_COMMAND_PALETTE else None
            elif binding.show and binding.action not in actions:  # one entry per action, as the Footer does
                actions.add(binding.action)
                keys.append(key)
        if (keys, palette) != (self.keys, self.palette):
            self.keys, self.palette = keys, palette
            self.refresh()

    def render(self) -> Text:
        key_style = self.get_component_rich_style("keybar--key")
        text_style = self.get_component_rich_style("keybar--description")
        width = self.size.width
        right = Text()
        if self.palette is not None:
            right.append("▏", self.get_component_rich_style("keybar--separator"))
            right.append(self.palette[1], key_style)
            right.append(f" {self.palette[2]} ", text_style)
        room = max(0, width - right.cell_len)
        line, self._spans = Text(no_wrap=True, overflow="crop"), []
        for key, shown, description, enabled in self.keys:
            start = line.cell_len
            line.append(f" {shown} ", key_style if enabled else key_style + self.DIM)
            line.append(f"{description} ", text_style if enabled else text_style + self.DIM)
            self._spans.append((start, min(line.cell_len, room), key))
        if self.palette is not None:
            self._spans.append((room, width, self.palette[0]))
        line.truncate(room, pad=True)
        return line + right

    def on_click(self, event: events.Click) -> None:
        key = next((key for start, end, key in self._spans if start <= event.x < end), None)
        if key is None:
            return
        enabled = next(k[3] for k in (*self.keys, self.palette) if k is not None and k[0] == key)
        if enabled:
            self.app.simulate_key(key)
        else:
            self.app.bell()


class MessageModal(ModalScreen[None]):
    """What happened and what to do; enter or escape closes it."""

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
            yield Button("OK (enter)", id="ok", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    async def action_dismiss(self, result=None) -> None:
        self.dismiss(None)


class ConfirmModal(ModalScreen[bool]):
    """A yes/no question; y confirms, n or escape declines, enter presses the focused button (the safe one at first)."""

    BINDINGS = [Binding("y", "answer(True)", "Yes", id="modal.yes"), Binding("n,escape", "answer(False)", "No", id="modal.no")]
    AUTO_FOCUS = "#no"

    def __init__(self, question: str, yes: str = "Yes", no: str = "No"):
        super().__init__(classes="modal")
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, id="modal-message", markup=False)
            with Horizontal(id="modal-buttons"):
                yield Button(f"{self.yes} (y)", id="yes", variant="error")
                yield Button(f"{self.no} (n, escape)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class PromptModal(ModalScreen[str | None]):
    """Ask for one line of text (a path, a name): enter accepts, escape cancels; a blank answer is refused."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="modal.cancel")]

    def __init__(self, question: str, value: str = "", placeholder: str = "", required: str = "type a value first"):
        super().__init__(classes="modal")
        self.question, self.value, self.placeholder, self.required = question, value, placeholder, required

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, id="modal-message", markup=False)
            yield Input(self.value, placeholder=self.placeholder, id="modal-input")
            yield Static("", id="modal-problem", markup=False)
            with Horizontal(id="modal-buttons"):
                yield Button("OK (enter)", id="ok", variant="primary")
                yield Button("Cancel (escape)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#modal-problem").display = False

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._accept(event.value)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#modal-problem").display = False

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._accept(self.query_one("#modal-input", Input).value)
        else:
            self.dismiss(None)

    def _accept(self, value: str) -> None:
        if not value.strip():
            problem = self.query_one("#modal-problem", Static)
            problem.update(f"✗ {self.required} (escape cancels)")
            problem.display = True
            self.query_one("#modal-input", Input).focus()
            return
        self.dismiss(value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)


def binding_rows(screen) -> list[tuple[str, str, str]]:
    """(where, keys as shown, what they do) of every key that works on ``screen`` now: the screen's own first, then
    the app's, then the focused widget's (a table's cursor keys, say)."""
    app = screen.app
    found: dict[tuple, list] = {}  # (node, action) -> [keys, description]
    for _key, active in screen.active_bindings.items():
        binding = active.binding
        if not binding.description or not active.enabled:
            continue
        entry = found.setdefault((id(active.node), binding.action), [[], "", active.node])
        shown = app.get_key_display(binding)
        if shown not in entry[0]:
            entry[0].append(shown)
        if len(binding.description) > len(entry[1]):
            entry[1] = binding.description
    rows = []
    for keys, description, node in found.values():
        where = "everywhere" if node is app else ("this screen" if node is screen else "the focused field")
        rows.append((where, " / ".join(keys), description))
    order = {"this screen": 0, "everywhere": 1, "the focused field": 2}
    return sorted(rows, key=lambda r: order[r[0]])


class HelpModal(ModalScreen[None]):
    """The keys of the screen it was opened over (``?`` or F1), and the guided walk's note; any close key closes it."""

    BINDINGS = [Binding("escape,enter,question_mark,f1", "dismiss", "Close", id="help.close")]

    def __init__(self, title: str, rows: list[tuple[str, str, str]], note: str = ""):
        super().__init__(classes="modal", id="help")
        self.title_text, self.rows, self.note = title, rows, note

    def compose(self) -> ComposeResult:
        from textual.containers import VerticalScroll

        with Vertical(id="dialog"):
            yield Label(f"Keys: {self.title_text}", id="modal-title")
            with VerticalScroll(id="help-keys"):
                text, last = Text(), None
                for where, keys, what in self.rows:
                    if where != last:
                        text.append(("\n" if last is not None else "") + f"{where}\n", style="bold")
                        last = where
                    text.append(f"  {keys:<16}", style="bold")
                    text.append(f"{what}\n")
                if self.note:
                    text.append("\nGuided walk\n", style="bold")
                    text.append(self.note)
                yield Static(text, id="help-text")
            yield Button("Close (escape)", id="ok", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    async def action_dismiss(self, result=None) -> None:
        self.dismiss(None)

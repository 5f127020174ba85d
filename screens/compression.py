"""The Compression screen: the ordered compression steps of the setup and an editor for the selected one.

Every edit goes to ``app.session`` at once and the whole setup is validated
again, so a problem shows as it is typed, with the preset validator's own
message, next to the field it names (under the form otherwise). Run
(ctrl+r) refuses while a problem remains.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Checkbox, Input, OptionList, Select, Static
from textual.widgets.option_list import Option

from workbench.registry import step_types
from workbench.spec.validate import build_step

from .base import WorkbenchScreen
from .stepforms import StepForm, description, problem_location, problem_text
from .widgets import ConfirmModal

# A new step starts from values the validator accepts, where the dataclass defaults alone do not.
STARTERS = {"depth": {"remove": 1}, "width": {"mlp_width": 0.75}, "vocab": {"fraction": 0.5}}


def step_label(step: dict, index: int) -> str:
    """The step's own label (``wanda 50%``), or its raw type while its values do not build."""
    try:
        return build_step(step, index).label()
    except Exception:  # any half-typed value: the label waits for a valid one
        return str(step.get("type", "prune")) if isinstance(step, dict) else "?"


class StepTypeModal(ModalScreen[str | None]):
    """Choose the type of a new step; escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="modal.cancel")]

    def __init__(self):
        super().__init__(classes="modal")

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static("Add a compression step:", id="modal-message")
            yield OptionList(*(Option(Text.assemble((kind, "bold"), f"  {description(kind)}"), id=kind) for kind in step_types()),
                             id="step-types")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class CompressionScreen(WorkbenchScreen):
    NAME = "compression"
    TITLE = "Compression"
    CSS_PATH = "compression.tcss"
    BINDINGS = [
        Binding("a", "add", "Add step", id="compression.add"),
        Binding("delete,x", "remove", "Remove", id="compression.remove"),
        Binding("shift+up", "move(-1)", "Up", id="compression.up"),
        Binding("shift+down", "move(1)", "Down", id="compression.down"),
        Binding("e", "edit", "Edit", id="compression.edit"),
    ]

    def __init__(self):
        super().__init__()
        self.selected = 0

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="compression-body"):
            with Vertical(id="steps-pane"):
                yield Static("Steps, in order", classes="pane-title")
                yield OptionList(id="steps")
            with Vertical(id="form-pane"):
                yield Static("", id="form-title")
                yield VerticalScroll(id="form-box", can_focus=False)  # its fields take the focus and scroll it
                yield Static("", id="field-help", markup=False)

    # ------------------------------------------------------------ rendering
    @property
    def steps(self) -> list:
        steps = self.app.session.data.get("steps")
        return steps if isinstance(steps, list) else []

    def on_session(self) -> None:
        self.selected = max(0, min(self.selected, len(self.steps) - 1))
        self._fill_list()
        self.call_later(self._show_form)

    def _fill_list(self) -> None:
        problem = self.app.session.problem()
        bad, _ = problem_location(problem.message) if problem else (None, None)
        steps = self.query_one("#steps", OptionList)
        steps.set_options([self._prompt(i, step, i == bad) for i, step in enumerate(self.steps)])
        if self.steps:
            steps.highlighted = self.selected

    @staticmethod
    def _prompt(index: int, step, bad: bool) -> Text:
        label = Text(f"{index + 1}. {step_label(step, index)}")
        if bad:
            label.append(" ✗", style="bold red")
        return label

    async def _show_form(self) -> None:
        box = self.query_one("#form-box", VerticalScroll)
        await box.remove_children()
        self.query_one("#field-help", Static).update("")  # the help of a field of the form just removed
        title = self.query_one("#form-title", Static)
        if not self.steps:
            add = self.app.key_for("compression.add", "a")
            title.update("No compression steps")
            await box.mount(Static(f"Without steps a run evaluates the dense model. Press {add} to add one.",
                                   classes="form-note", markup=False))
            self._validate()
            return
        step = self.steps[self.selected]
        kind = step.get("type", "prune") if isinstance(step, dict) else "?"
        title.update(Text.assemble(f"Step {self.selected + 1}: {kind}",
                                   (f"\n{description(kind)}" if kind in step_types() else "", "dim not bold")))
        await box.mount(StepForm(self.selected, step if isinstance(step, dict) else {}, id="step-form"))
        self._validate()

    def _validate(self) -> None:
        """Validate the whole setup and show its first problem where it belongs."""
        problem = self.app.session.problem()
        index, field = problem_location(problem.message) if problem else (None, None)
        text = problem_text(problem.message, problem.hint) if problem else None
        forms = self.query(StepForm)
        if forms:
            # a problem elsewhere (another step, calibration...) still blocks Run, so it shows under the form
            here = index == forms.first().index
            forms.first().show_problem(field if here else None, text)
        else:
            self.query_one("#field-help", Static).update(text or "")
        for i, step in enumerate(self.steps):
            self.query_one("#steps", OptionList).replace_option_prompt_at_index(i, self._prompt(i, step, i == index))

    # ------------------------------------------------------------ events
    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_list.id == "steps" and event.option_index != self.selected:
            self.selected = event.option_index
            self.call_later(self._show_form)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option_list.id == "steps":
            self.action_edit()

    def on_step_form_edited(self, event: StepForm.Edited) -> None:
        self.app.session.set(f"steps.{event.index}.{event.field}", event.value)
        self._session_edited()
        self._validate()

    def _session_edited(self) -> None:
        self.app.session_changed()
        # our own edit: the form already shows it, so on_session must not rebuild it
        self._seen_revision = self.app.session.revision

    def on_descendant_focus(self, event) -> None:
        widget = event.widget
        form = self.query(StepForm)
        if form and isinstance(widget, (Input, Select, Checkbox)):
            self.query_one("#field-help", Static).update(form.first().help_for(widget.id))

    # ------------------------------------------------------------ actions
    def action_add(self) -> None:
        def add(kind: str | None) -> None:
            if kind is None:
                return
            at = self.selected + 1 if self.steps else 0
            self.selected = self.app.session.add_step({"type": kind, **STARTERS.get(kind, {})}, at)
            self._session_edited()
            self.on_session()

        self.app.push_screen(StepTypeModal(), add)

    def action_remove(self) -> None:
        if not self.steps:
            self.notify("there is no step to remove", timeout=3)
            return
        index = self.selected
        label = step_label(self.steps[index], index)

        def answer(yes: bool | None) -> None:
            if yes and index < len(self.steps):
                self.app.session.remove_step(index)
                self._session_edited()
                self.on_session()

        self.app.push_screen(ConfirmModal(f"Remove step {index + 1} ({label})?", "Remove", "Keep"), answer)

    def action_move(self, offset: int) -> None:
        if len(self.steps) < 2:
            return
        self.selected = self.app.session.move_step(self.selected, offset)
        self._session_edited()
        self.on_session()
        self.query_one("#steps", OptionList).focus()

    def action_edit(self) -> None:
        form = self.query(StepForm)
        target = form.first().first_field() if form else None
        if target is not None:
            target.focus()

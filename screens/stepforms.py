"""Editors for compression steps: one form per step type, derived from the step's dataclass.

``step_fields(kind)`` describes every field of the registered step type
(``workbench.registry``) in the dataclass's order, which lists the important
ones first: its input kind from the annotation, and its help, choices and
when it applies from the field's metadata (``workbench.spec.fields.setting``).
A new step type registered by its family gets a form without any code here.
``StepForm`` is the widget; it reports edits as ``StepForm.Edited`` and leaves
the session to the screen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Checkbox, Input, Label, Select, Static

from workbench.registry import step_types
from workbench.spec.fields import setting_info

_PROBLEM = re.compile(r"^steps\.(\d+)(?:\.(\w+))?")


@dataclass(frozen=True)
class FieldInfo:
    """One editable field of a step type."""

    name: str
    kind: str  # bool | int | float | str | list | choice
    optional: bool  # None is allowed (an empty input means "the engine's default")
    default: Any
    choices: tuple = ()
    help: str = ""
    when: tuple[str, tuple] | None = None  # shown only while that field has one of these values

    def applies(self, step: dict) -> bool:
        if self.when is None:
            return True
        field, values = self.when
        return step.get(field, _default(step, field)) in values


def _default(step: dict, name: str) -> Any:
    info = {f.name: f for f in step_fields(step.get("type", "prune"))}.get(name)
    return info.default if info else None


def known(kind: str) -> bool:
    return kind in step_types()


def description(kind: str) -> str:
    """One line saying what a step type does."""
    return step_types()[kind].description or kind


@lru_cache(maxsize=None)
def step_fields(kind: str) -> tuple[FieldInfo, ...]:
    """The editable fields of a step type, in the dataclass's order (``type`` left out)."""
    return tuple(FieldInfo(s.name, "choice" if s.choices else s.kind, s.optional, s.default, s.choices, s.help, s.when)
                 for s in setting_info(step_types()[kind].spec))


def parse_value(info: FieldInfo, text: str) -> Any:
    """An input's text as the field's value: None for an empty field (the key is left out, so its default
    applies); the raw text when it does not parse, so that the validator names the problem."""
    text = text.strip()
    if not text:
        return None
    if info.kind == "int":
        try:
            return int(text)
        except ValueError:
            return text
    if info.kind == "float":
        try:
            return float(text)
        except ValueError:
            return text
    if info.kind == "list":
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def problem_location(message: str) -> tuple[int | None, str | None]:
    """Which step (and field) a validator message names: ``steps.0.sparsity = ...`` -> (0, "sparsity")."""
    match = _PROBLEM.match(message)
    if not match:
        return None, None
    return int(match.group(1)), match.group(2)


def problem_text(message: str, hint: str | None) -> Text:
    return Text.assemble(("✗ " + message, "bold"), *(("\n", (f"what to do: {hint}", "dim")) if hint else ()))


class StepForm(Vertical):
    """The fields of one step (``step``: its dict in the session; read, never written here)."""

    class Edited(Message):
        """A field got a new value (None: remove the key so the default applies)."""

        def __init__(self, index: int, field: str, value: Any):
            super().__init__()
            self.index, self.field, self.value = index, field, value

    def __init__(self, index: int, step: dict, **kwargs):
        super().__init__(**kwargs)
        self.index, self.step = index, step
        self.kind = step.get("type", "prune")
        self.fields = {f.name: f for f in step_fields(self.kind)} if known(self.kind) else {}

    def compose(self) -> ComposeResult:
        if not self.fields:
            yield Static(f"step type {self.kind!r} has no editor", classes="form-note", markup=False)
        for info in self.fields.values():
            with Vertical(id=f"row-{info.name}", classes="field-row"):
                with Horizontal(classes="field-line"):
                    yield Label(info.name, classes="field-label")
                    yield self._widget(info)
                yield Static("", id=f"error-{info.name}", classes="field-error")
        yield Static("", id="form-problem", classes="field-error")

    def _widget(self, info: FieldInfo):
        value = self.step.get(info.name, info.default)
        wid, tip = f"field-{info.name}", info.help or None
        if info.kind == "choice":
            options = list(info.choices) + ([value] if value is not None and value not in info.choices else [])
            widget = Select([(str(o), o) for o in options], value=Select.NULL if value is None else value,
                            allow_blank=info.optional, prompt="default", compact=True, id=wid)
        elif info.kind == "bool":
            from .widgets import Check

            widget = Check("on" if value else "off", bool(value), compact=True, id=wid)
        else:
            # a text field: a letter typed into a number shows, and the validator names it; empty means the default
            placeholder = "empty: the default" if info.default is None else f"default {format_value(info.default)}"
            widget = Input(format_value(value), placeholder=placeholder, compact=True, id=wid)
        widget.tooltip = tip
        return widget

    def on_mount(self) -> None:
        self.show_problem(None, None)

    # ------------------------------------------------------------ edits
    def _edited(self, widget_id: str | None, value: Any) -> None:
        info = self.fields.get((widget_id or "").removeprefix("field-"))
        if info is None:
            return
        if value == self.step.get(info.name, info.default):
            return  # a widget reporting its initial value, or no change
        self.post_message(self.Edited(self.index, info.name, value))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        info = self.fields.get((event.input.id or "").removeprefix("field-"))
        if info is not None:
            self._edited(event.input.id, parse_value(info, event.value))

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._edited(event.select.id, None if event.value is Select.NULL else event.value)

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        event.stop()
        event.checkbox.label = "on" if event.value else "off"
        self._edited(event.checkbox.id, event.value)

    # ------------------------------------------------------------ feedback
    def show_problem(self, field: str | None, problem: Text | None) -> None:
        """Show which fields apply now, and ``problem`` next to ``field`` (under the form when None)."""
        for info in self.fields.values():
            row = self.query_one(f"#row-{info.name}")
            row.display = info.applies(self.step) or info.name == field
            error = self.query_one(f"#error-{info.name}", Static)
            error.update(problem if (problem is not None and info.name == field) else "")
            error.display = problem is not None and info.name == field
        bottom = self.query_one("#form-problem", Static)
        shown = problem is not None and field not in self.fields
        bottom.update(problem if shown else "")
        bottom.display = shown

    def first_field(self):
        """The first shown input of the form, for focusing it."""
        for info in self.fields.values():
            if self.query_one(f"#row-{info.name}").display:
                return self.query_one(f"#field-{info.name}")
        return None

    def help_for(self, widget_id: str | None) -> str:
        """A line about a field: its kind, default and its help."""
        info = self.fields.get((widget_id or "").removeprefix("field-"))
        if info is None:
            return ""
        kind = {"choice": "one of " + ", ".join(info.choices), "float": "a number", "int": "a whole number",
                "bool": "on or off", "list": "comma-separated"}.get(info.kind, "text")
        default = "empty for the default" if info.default is None else f"default {format_value(info.default)}"
        return f"{info.name} ({kind}; {default})" + (f": {info.help}" if info.help else "")

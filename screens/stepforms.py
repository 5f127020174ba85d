"""Editors for compression steps: one form per step type, derived from the step's dataclass.

``step_fields(kind)`` describes every field of ``STEP_TYPES[kind]`` (in the
dataclass's order, which lists the important ones first): its input kind
from the annotation, its choices from the module's constants (``PRUNE_METHODS``
for ``method`` of ``prune``, ``DEPTH_CRITERIA`` for ``criterion``...), its
help from the field's comment, and when it applies (a comment that starts
with ``search:`` or ``method = "random"``, a name such as ``owl_lambda``).
A new step type registered with ``workbench.spec.register_step`` gets a form
without any code here; the tables below only add what the dataclasses do not
say. ``StepForm`` is the widget; it reports edits as ``StepForm.Edited``
and leaves the session to the screen.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Checkbox, Input, Label, Select, Static

from workbench.spec import STEP_TYPES

# What a step does, for step types whose class has no docstring of its own.
DESCRIPTIONS = {"prune": "Remove individual weights (magnitude, Wanda, SparseGPT), unstructured or N:M."}

# Choices no module constant lists: N:M patterns are open-ended; these are the common ones.
EXTRA_CHOICES = {("prune", "pattern"): ("unstructured", "2:4", "4:8")}

# When a field applies, where its comment and name do not say: field -> (controlling field, its values).
_SEARCH = ("allocation", ("search",))
WHEN = {
    "prune": {"sparsity": ("pattern", ("unstructured",)),  # N:M fixes the sparsity at N/M
              "blocksize": ("method", ("sparsegpt",)), "percdamp": ("method", ("sparsegpt",))},
    "lowrank": {name: _SEARCH for name in ("ratio_max", "objective_chunks", "objective_seqlen", "kl_weight",
                                           "finalists", "storage", "study", "heartbeat")},
}

_COMMENT = re.compile(r"^\s+(\w+)\s*:[^=#]*(?:=[^#]*)?#\s*(.*)$")
_EQUALS = re.compile(r'^(\w+)\s*=\s*"([^"]+)"')
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


def description(kind: str) -> str:
    """One line saying what a step type does."""
    cls = STEP_TYPES[kind]
    doc = inspect.getdoc(cls) or ""
    if kind in DESCRIPTIONS or doc.startswith(f"{cls.__name__}("):  # dataclass's generated signature, not prose
        return DESCRIPTIONS.get(kind, kind)
    return doc.splitlines()[0]


def _comments(cls) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_COMMENT.match, source.splitlines()) if m}


def _choices(cls, kind: str, name: str) -> tuple:
    """The module constant that lists ``name``'s values: ``KIND_NAMES``, ``NAMES`` or ``..._NAME`` (``DEPTH_CRITERIA``)."""
    if (kind, name) in EXTRA_CHOICES:
        return EXTRA_CHOICES[kind, name]
    upper = name.upper()
    wanted = {upper + "S", upper, upper[:-2] + "A" if upper.endswith("ON") else upper + "S"}
    found = {const: value for const, value in vars(sys.modules[cls.__module__]).items()
             if const.isupper() and isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)
             and any(const == w or const.endswith("_" + w) for w in wanted)}
    preferred = [v for c, v in found.items() if c.startswith(kind.upper() + "_")]
    if len(preferred) == 1:
        return preferred[0]
    return next(iter(found.values())) if len(found) == 1 else ()


def _kind(annotation: str) -> tuple[str, bool]:
    ann = str(annotation).replace(" ", "")
    optional = "None" in ann
    base = ann.replace("|None", "").replace("None|", "")
    return ("list" if base.startswith("list") else base if base in ("bool", "int", "float") else "str"), optional


@lru_cache(maxsize=None)
def step_fields(kind: str) -> tuple[FieldInfo, ...]:
    """The editable fields of a step type, in the dataclass's order (``type`` left out)."""
    cls = STEP_TYPES[kind]
    comments = _comments(cls)
    raw = []
    for f in dataclasses.fields(cls):
        if f.name == "type":
            continue
        base, optional = _kind(f.type)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        choices = _choices(cls, kind, f.name) if base == "str" else ()
        if choices and default is not None and default not in choices:
            choices = ()  # the constant is about something else
        raw.append((f.name, "choice" if choices else base, optional, default, choices))
    values = {name: set(choices) for name, _, _, _, choices in raw if choices}
    fields = []
    for name, base, optional, default, choices in raw:
        help_text = comments.get(name, "")
        fields.append(FieldInfo(name, base, optional, default, choices, help_text,
                                WHEN.get(kind, {}).get(name) or _when(name, help_text, values)))
    return tuple(fields)


def _when(name: str, help_text: str, values: dict[str, set]) -> tuple[str, tuple] | None:
    """A condition read from the comment (``search: ...``, ``method = "random"``) or the name (``owl_m``)."""
    match = _EQUALS.match(help_text)
    if match and match.group(1) in values and match.group(2) in values[match.group(1)]:
        return match.group(1), (match.group(2),)
    words = [help_text.split(" ")[0].rstrip(":;,"), name.split("_")[0]] if help_text else [name.split("_")[0]]
    for word in words:
        owners = [field for field, options in values.items() if field != name and word in options]
        if len(owners) == 1:
            return owners[0], (word,)
    return None


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
        self.fields = {f.name: f for f in step_fields(self.kind)} if self.kind in STEP_TYPES else {}

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
        """A line about a field: its kind, default and the dataclass's comment."""
        info = self.fields.get((widget_id or "").removeprefix("field-"))
        if info is None:
            return ""
        kind = {"choice": "one of " + ", ".join(info.choices), "float": "a number", "int": "a whole number",
                "bool": "on or off", "list": "comma-separated"}.get(info.kind, "text")
        default = "empty for the default" if info.default is None else f"default {format_value(info.default)}"
        return f"{info.name} ({kind}; {default})" + (f": {info.help}" if info.help else "")

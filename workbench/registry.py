"""The step types a run spec can name: one entry each, registered by its method family. No torch.

A family (``workbench.pruning``, ``workbench.lowrank``, ``workbench.structured``)
declares its step types in its torch-free ``family`` module with
``register(StepType(...))``. An entry says everything the rest of the program
needs about a type, so nothing else keeps a table of step types:

- ``spec``: the ``[[steps]]`` dataclass (its fields carry the editor's help,
  choices and visibility, ``workbench.spec.fields``; ``validate(where)``
  checks it without the model);
- ``runner``: ``"module:function"``, the engine's ``fn(ctx, step) -> report``
  (``workbench.context.StepContext``), imported when a run uses it;
- ``check``: ``"module:function"``, ``fn(facts, step, where)``: what only the
  loaded model can judge, run right after loading, before any step
  (``workbench.preflight``);
- ``plan``: ``fn(step, index, layers) -> [PlannedStage]``: the stages the step
  goes through, their totals and what each one's per-layer value means; the
  engine announces it in a ``StagePlan`` event and the fake worker follows it;
- ``fake``: ``"module:function"``, the fake worker's imitation of the step
  (``workbench.backends.fake``), torch-free;
- ``structures``: the structure entries the step records in an export and, for
  each, ``"module:function"`` that applies it when the checkpoint is loaded
  again (``workbench.rebuild``);
- ``gradients``: the runner trains (needs autograd); every other step runs
  under ``torch.no_grad()``;
- ``refuses_after``: step types this one cannot follow in a spec (a pruning
  step cannot change a model already quantized), refused before loading.

``FAMILIES`` lists the family modules; adding a family is one line there.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from .errors import UserError

FAMILIES = ("workbench.pruning.family", "workbench.lowrank.family", "workbench.structured.family",
            "workbench.quantization.family")


@dataclass(frozen=True)
class PlannedStage:
    """One stage a step goes through: its event name, title, total, and the meaning of its per-layer value."""

    stage: str
    title: str
    total: int | None = None
    quantity: str | None = None  # sparsity | retained | removed | qerror: what LayerDone.value means; None: no per-layer value
    target: float | None = None  # the step's target in the quantity's terms, where one value holds for every layer

    def to_dict(self) -> dict:
        return {"stage": self.stage, "title": self.title, "total": self.total, "quantity": self.quantity,
                "target": self.target}


@dataclass(frozen=True)
class StepType:
    name: str
    family: str
    spec: type
    runner: str
    plan: Callable[..., list[PlannedStage]]
    check: str | None = None
    fake: str | None = None
    structures: dict[str, str] = field(default_factory=dict)
    description: str = ""
    gradients: bool = False  # the runner computes gradients (a training step); others run under torch.no_grad()
    refuses_after: tuple[str, ...] = ()  # step types this one cannot follow

    def run(self, ctx, step) -> dict:
        return load(self.runner)(ctx, step)


_TYPES: dict[str, StepType] = {}
_LOADED = False


def register(entry: StepType) -> StepType:
    """Add a step type (a family module calls this at import)."""
    if entry.name in _TYPES and _TYPES[entry.name] is not entry:
        raise ValueError(f"step type {entry.name!r} is registered twice")
    _TYPES[entry.name] = entry
    return entry


def _load_families() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in FAMILIES:
            importlib.import_module(module)


def step_types() -> dict[str, StepType]:
    """Every registered step type by name, in registration order."""
    _load_families()
    return dict(_TYPES)


def step_type(name: str, where: str = "step") -> StepType:
    types = step_types()
    if name not in types:
        raise UserError(f"{where}.type = {name!r} is not a known step type", f"allowed: {', '.join(types)}")
    return types[name]


def structure_appliers() -> dict[str, str]:
    """Structure entry kind -> the "module:function" that applies it to a freshly built model."""
    return {kind: target for entry in step_types().values() for kind, target in entry.structures.items()}


def load(reference: str) -> Callable:
    """The function a ``"module:function"`` reference names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["PlannedStage", "StepType", "register", "step_types", "step_type", "structure_appliers", "load", "FAMILIES"]

"""Typed, JSON-serializable events: the one stream every consumer reads.

The engine emits them; the headless progress display, the run history, and
later the worker protocol and the TUI consume them. No torch here.

Every event serializes to a dict with a ``type`` key (``event_to_dict``) and is
rebuilt from one with ``event_from_dict``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable


@dataclass
class Event:
    type = "event"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["type"] = self.type
        return data


@dataclass
class RunStarted(Event):
    type = "run_started"
    run_id: str = ""
    spec: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)


@dataclass
class StageStarted(Event):
    """A stage: load, calibrate, evaluate:before, prune:0, evaluate:after, export."""

    type = "stage_started"
    stage: str = ""
    title: str = ""
    total: int | None = None  # units of work (layers, windows), when known


@dataclass
class Progress(Event):
    type = "progress"
    stage: str = ""
    done: int = 0
    total: int | None = None
    detail: str = ""


@dataclass
class StagePlan(Event):
    """The stages a compression step will go through, announced as it begins (``workbench.registry.PlannedStage``).

    Each stage is ``{"stage", "title", "total", "quantity", "target"}``;
    ``quantity`` says what the stage's ``LayerDone.value`` is: ``sparsity``
    (fraction of weights removed), ``retained`` (fraction of parameters
    kept) or ``removed`` (fraction of parameters removed); None when it
    reports no per-layer value. ``target`` is the step's target in the same
    terms when one value holds for every layer.
    """

    type = "stage_plan"
    step: int = 0
    kind: str = ""
    label: str = ""
    stages: list = field(default_factory=list)


@dataclass
class StageFinished(Event):
    type = "stage_finished"
    stage: str = ""
    seconds: float = 0.0


@dataclass
class LayerDone(Event):
    """One decoder layer compressed: per-module statistics and timing.

    ``modules`` maps a linear's name to ``{"shape": [out, in], "sparsity": s,
    "zeros": z, "numel": n, "target": t, "error": e}`` (error where the method
    reports a reconstruction error).
    """

    type = "layer_done"
    stage: str = ""
    layer: int = 0
    total: int = 0
    sparsity: float = 0.0
    target: float = 0.0
    seconds: float = 0.0
    modules: dict = field(default_factory=dict)
    value: float | None = None  # the quantity the stage's plan names (StagePlan); None: read ``sparsity``


@dataclass
class Metric(Event):
    type = "metric"
    name: str = "perplexity"
    dataset: str = ""
    value: float = 0.0
    phase: str = "after"  # before (dense) or after (compressed)
    seqlen: int | None = None
    windows: int | None = None
    limit: int | None = None
    stderr: float | None = None  # standard error, where the evaluation reports one
    extra: dict = field(default_factory=dict)  # e.g. {"bits_per_byte": ...} beside perplexity


@dataclass
class Trial(Event):
    """One finished trial of a search (e.g. a rank-allocation study), and the best so far.

    ``metrics`` holds what the objective is made of (e.g. perplexity, kl,
    retained); ``best`` is ``{"number", "objective", "params"}`` of the best
    trial so far (including this one).
    """

    type = "trial"
    stage: str = ""
    study: str = ""
    number: int = 0
    state: str = "complete"  # complete, pruned, failed
    params: dict = field(default_factory=dict)
    objective: float | None = None
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    best: dict = field(default_factory=dict)


@dataclass
class Log(Event):
    type = "log"
    message: str = ""
    level: str = "info"


@dataclass
class WarningEvent(Event):
    type = "warning"
    message: str = ""


@dataclass
class RunFinished(Event):
    type = "run_finished"
    run_id: str = ""
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RunFailed(Event):
    type = "run_failed"
    run_id: str = ""
    kind: str = "run_failed"  # bad_input, run_failed, cancelled, out_of_memory
    message: str = ""
    hint: str | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (RunStarted, StageStarted, StagePlan, Progress, StageFinished, LayerDone, Metric, Trial, Log, WarningEvent,
                RunFinished, RunFailed)
}

Emit = Callable[[Event], None]


def event_to_dict(event: Event) -> dict:
    return event.to_dict()


def event_from_dict(data: dict) -> Event:
    """Rebuild an event; unknown keys are dropped, an unknown type raises KeyError."""
    cls = EVENT_TYPES[data["type"]]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def fanout(*consumers: Emit | None) -> Emit:
    """One emit function that hands each event to every consumer in turn."""
    active = [c for c in consumers if c is not None]

    def emit(event: Event) -> None:
        for consumer in active:
            consumer(event)

    return emit


def json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become None."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

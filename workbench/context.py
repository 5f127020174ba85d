"""What a step runner is handed: ``StepContext``, a typed view of the run it belongs to.

A runner is ``fn(ctx: StepContext, step) -> report`` (``workbench.registry``).
Through the context it reads the model (``ctx.loaded``: model, tokenizer,
adapter, device, dtype), the run's settings (``ctx.spec``) and the
calibration tokens (``ctx.tokens``); it replaces the tokens when the
vocabulary changes (``ctx.replace_tokens``), records what a plain
``from_pretrained`` could not rebuild (``ctx.record_structure``), wraps its
work in stages (``with ctx.stage(...)``), emits events (``ctx.emit``), stops
at a layer boundary when the run is cancelled (``ctx.check_cancel()``), and
gets a layer sweep over the calibration data (``ctx.sweep(stage)``) with the
run's batch size and activation placement.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import check_cancel
from .events import Emit, StageFinished, StageStarted
from .sweep import LayerSweep

if TYPE_CHECKING:  # pragma: no cover
    from .models import LoadedModel
    from .spec import RunSpec


@contextmanager
def timed_stage(emit: Emit, timings: dict[str, float], cancel: Callable[[], bool] | None, name: str, title: str,
                total: int | None = None):
    """Announce a stage, time it into ``timings[name]``, and say when it ends; cancellable at its start."""
    check_cancel(cancel)
    emit(StageStarted(stage=name, title=title, total=total))
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    timings[name] = round(seconds, 3)
    emit(StageFinished(stage=name, seconds=seconds))


@dataclass
class StepContext:
    """One step's view of its run (see the module docstring)."""

    loaded: "LoadedModel"
    spec: "RunSpec"
    run_id: str
    index: int
    tokens: torch.Tensor | None
    run_dir: Path
    emit: Emit
    cancel: Callable[[], bool] | None = None
    structure: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ what the run shares
    @property
    def model(self):
        return self.loaded.model

    @property
    def adapter(self):
        return self.loaded.adapter

    @property
    def device(self):
        return self.loaded.device

    def check_cancel(self) -> None:
        check_cancel(self.cancel)

    def stage(self, name: str, title: str, total: int | None = None):
        """A stage of the step: announced, timed (``timings[name]``), cancellable at its start."""
        return timed_stage(self.emit, self.timings, self.cancel, name, title, total)

    def record_structure(self, entry: dict[str, Any]) -> None:
        """Record what ``workbench.rebuild`` needs to rebuild the exported model (an entry with a ``kind``)."""
        self.structure.append(entry)

    def replace_tokens(self, tokens: "torch.Tensor") -> None:
        """The calibration windows in new token ids (after the vocabulary changed), for the steps that follow."""
        self.tokens = tokens

    # ------------------------------------------------------------------ the layer sweep
    @property
    def store(self) -> torch.device:
        """Where calibration activations live between layers: the device, or the CPU (``offload_activations``)."""
        return torch.device("cpu") if self.spec.calibration.offload_activations else torch.device(self.loaded.device)

    def sweep(self, stage: str = "", tokens: torch.Tensor | None = None) -> LayerSweep:
        """A layer sweep over the calibration tokens (or ``tokens``) with the run's batch size and placement."""
        return LayerSweep(self.loaded.adapter, self.tokens if tokens is None else tokens, self.loaded.device,
                          batch_size=self.spec.calibration.batch_size, store=self.store, cancel=self.cancel,
                          emit=self.emit, stage=stage)


__all__ = ["StepContext", "check_cancel", "timed_stage"]

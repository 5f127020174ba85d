"""The layer sweep: the one per-layer loop every layer-by-layer method runs in.

A sweep owns what every method used to write again: the calibration inputs
captured once, each decoder layer made resident on the compute device alone,
the statistics gathered from its linears (``workbench.observers``), the
method's function, the propagation of the layer's outputs to the next layer,
cancellation at every layer boundary, timing, and the ``LayerDone`` (or
``Progress``) event. A method supplies only ``fn(layer, index, stats) ->
report``.

Two kinds of sweep:

- **compressing** (``dense=False``): the statistics are gathered in a pass
  that stops as soon as every watched linear has seen its input, ``fn``
  changes the layer, and the changed layer's outputs feed the next layer
  (the method's sequential protocol); the layer's weights are written back;
- **dense** (``dense=True``): the statistics are gathered while the layer's
  outputs are propagated, in the same pass, and ``fn`` reads them; nothing is
  written back. ``fn`` may read ``sweep.hidden``, the layer's outputs.

``apply(layer, index, report)``, when given, runs after ``fn`` with the layer
back in host memory (changes of shape, which cannot happen on a resident
copy), before the propagation. ``within(layer, index)`` is a context manager
entered while the layer is resident (e.g. modules swapped in for a trial).
Linears fed the same tensor share one observer per statistic.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import CANCEL_HINT, check_cancel
from .events import LayerDone, Progress
from .layerwise import Captured, LayerRunner, Resident, StopForward, capture_inputs
from .models import weight_matrix
from .observers import Factory


@dataclass
class Watch:
    """The statistics a sweep gathers in each layer.

    ``inputs`` / ``outputs``: statistic name -> observer factory, on each
    watched linear's input / output; or a function of the linear's name
    giving those, where linears need different statistics.
    ``linears(index, layer)`` gives the watched linears by name (default:
    every linear of the layer).
    """

    inputs: dict[str, Factory] | Callable[[str], dict[str, Factory]] = field(default_factory=dict)
    outputs: dict[str, Factory] | Callable[[str], dict[str, Factory]] = field(default_factory=dict)
    linears: Callable[[int, nn.Module], dict[str, nn.Module]] | None = None

    def inputs_of(self, name: str) -> dict[str, Factory]:
        return self.inputs(name) if callable(self.inputs) else self.inputs

    def outputs_of(self, name: str) -> dict[str, Factory]:
        return self.outputs(name) if callable(self.outputs) else self.outputs


@dataclass
class LayerStats:
    """The statistics of one layer: per linear name, per statistic name, the observer's result."""

    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    groups: list[list[str]]  # linears that read the same input tensor, in module order


def _shape(module: nn.Module) -> tuple[int, int]:
    return tuple(weight_matrix(module).shape)


class LayerSweep:
    """Runs a method over the decoder layers of ``adapter``, one layer resident at a time (see the module docstring).

    ``tokens`` are the calibration windows (captured on first use); or pass
    ``captured`` inputs made earlier. ``store`` is where activations live
    between layers (the device, or the CPU to offload them). ``emit`` hears a
    ``LayerDone`` per layer (``stage``), or a ``Progress`` for sweeps given a
    ``detail``.
    """

    def __init__(self, adapter, tokens: torch.Tensor | None = None, device="cpu", *, batch_size: int = 8, store=None,
                 cancel: Callable[[], bool] | None = None, emit=None, stage: str = "", captured: Captured | None = None,
                 cancel_hint: str = CANCEL_HINT):
        self.adapter = adapter
        self.tokens = tokens
        self.device = torch.device(device)
        self.store = torch.device(store) if store is not None else self.device
        self.batch_size = batch_size
        self.cancel = cancel
        self.emit = emit or (lambda event: None)
        self.stage = stage
        self._captured = captured
        self._runner: LayerRunner | None = None
        self.cancel_hint = cancel_hint

    # ------------------------------------------------------------------ activations
    @property
    def runner(self) -> LayerRunner:
        """The captured inputs and the forward over them (captured on first use)."""
        if self._runner is None:
            if self._captured is None:
                self._captured = capture_inputs(self.adapter, self.tokens, self.device, self.batch_size, self.store)
            self._runner = LayerRunner(self.adapter, self._captured, self.device, self.store)
        return self._runner

    @property
    def hidden(self) -> list[torch.Tensor]:
        """The current activations per batch: the inputs of the next layer to be visited."""
        return self.runner.captured.hidden

    def final_hidden(self) -> list[torch.Tensor]:
        """The last layer's outputs through the modules before the LM head (after a whole sweep)."""
        return self.runner.final_hidden()

    # ------------------------------------------------------------------ the loop
    def run(self, fn: Callable[[nn.Module, int, LayerStats | None], dict | None] | None = None,
            watch: Watch | None = None, *, dense: bool = False, data: bool = True,
            apply: Callable[[nn.Module, int, dict], None] | None = None,
            within: Callable[[int, nn.Module], Any] | None = None,
            detail: str | None = None, layers: range | None = None) -> list[dict]:
        """Visit every layer (or ``layers``) in order; return ``fn``'s reports (with ``seconds``).

        ``data=False``: the method needs no calibration data (magnitude, plain
        SVD): nothing is captured or propagated, ``stats`` is None.
        """
        all_layers = self.adapter.layers
        total = len(all_layers)
        reports = []
        for i in (layers if layers is not None else range(total)):
            layer = all_layers[i]
            check_cancel(self.cancel, self.cancel_hint)
            t0 = time.perf_counter()
            with Resident(layer, self.device, write_back=not dense):
                with (within(i, layer) if within is not None else nullcontext()):
                    stats = self._observe(layer, i, watch, propagate=dense and data) if data else None
                    report = (fn(layer, i, stats) if fn is not None else None) or {}
                    del stats
                    if data and not dense and apply is None:
                        self.runner.propagate(layer, i)
            if apply is not None:
                apply(layer, i, report)
                if data and not dense:
                    with Resident(layer, self.device):
                        self.runner.propagate(layer, i)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            report["seconds"] = report.get("seconds", 0.0) + time.perf_counter() - t0
            reports.append(report)
            self._announce(i, total, report, detail)
        return reports

    def _announce(self, i: int, total: int, report: dict, detail: str | None) -> None:
        if not self.stage:
            return
        if detail is not None:
            self.emit(Progress(stage=self.stage, done=i + 1, total=total, detail=detail))
            return
        self.emit(LayerDone(stage=self.stage, layer=i, total=total, sparsity=report.get("sparsity", 0.0),
                            target=report.get("target", 0.0), seconds=report["seconds"],
                            modules=report.get("modules", {}), value=report.get("value")))

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def _observe(self, layer: nn.Module, index: int, watch: Watch | None, propagate: bool) -> LayerStats | None:
        """Run the batches through ``layer`` with ``watch``'s observers hooked; propagate its outputs when asked.

        Without propagation, each batch stops once every watched linear has
        seen its input (and, with output statistics, produced its output).
        """
        if watch is None:
            if propagate:
                self.runner.propagate(layer, index)
            return None
        linears = watch.linears(index, layer) if watch.linears is not None else self.adapter.linear_modules(layer)
        if not linears:
            if propagate:
                self.runner.propagate(layer, index)
            return LayerStats({}, {}, [])
        inputs: dict[str, dict[str, Any]] = {}
        outputs: dict[str, dict[str, Any]] = {}
        leader_of: dict[str, str] = {}
        seen: dict[int, tuple[str, torch.Tensor]] = {}  # id(input) -> (leader, input kept alive for this batch)
        state = {"first": True}
        called: set[str] = set()
        stop_early = not propagate

        def pre_hook(name: str):
            def hook(module, args):
                x = args[0]
                if state["first"]:
                    key = id(x)
                    if key in seen:
                        leader_of[name] = seen[key][0]
                    else:
                        seen[key] = (name, x)
                        leader_of[name] = name
                        features = _shape(module)[1]
                        inputs[name] = {stat: make(features, self.device) for stat, make in watch.inputs_of(name).items()}
                if leader_of[name] == name:
                    for observer in inputs[name].values():
                        observer.update(x)
                if not watch.outputs_of(name):
                    called.add(name)
                    if stop_early and len(called) == len(linears):
                        raise StopForward

            return hook

        def post_hook(name: str):
            def hook(module, args, out):
                if name not in outputs:
                    outputs[name] = {stat: make(_shape(module)[0], self.device) for stat, make in watch.outputs_of(name).items()}
                for observer in outputs[name].values():
                    observer.update(out.detach())
                called.add(name)
                if stop_early and len(called) == len(linears):
                    raise StopForward

            return hook

        handles = []
        for name, module in linears.items():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            if watch.outputs_of(name):
                handles.append(module.register_forward_hook(post_hook(name)))
        try:
            for b in range(len(self.hidden)):
                called.clear()
                try:
                    if propagate:
                        self.runner.propagate_batch(layer, index, b)
                    else:
                        self.runner.forward_batch(layer, index, b)
                except StopForward:
                    pass
                state["first"] = False
                seen.clear()
        finally:
            for handle in handles:
                handle.remove()
        groups: dict[str, list[str]] = {}
        for name in linears:
            if name in leader_of:
                groups.setdefault(leader_of[name], []).append(name)
        shared = {name: {stat: obs.result() for stat, obs in inputs[leader_of[name]].items()} for name in leader_of}
        results_out = {name: {stat: obs.result() for stat, obs in per.items()} for name, per in outputs.items()}
        return LayerStats(inputs=shared, outputs=results_out,
                          groups=list(groups.values()) if leader_of else [[n] for n in linears])


__all__ = ["LayerSweep", "Watch", "LayerStats"]

"""One pruning step over a whole model, layer by layer.

The methods themselves (``workbench.pruning``) are tensor functions; this
module does the moving, hooking and event emitting: for each decoder layer,
move it to the device, collect the statistics its method needs, compute and
apply masks (SparseGPT also updates the remaining weights), re-run the
compressed layer to produce the next layer's inputs (as in SparseGPT), and move
it back.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .errors import Cancelled, UserError
from .events import LayerDone, Log, Progress
from .layerwise import InputStats, LayerRunner, Resident, capture_inputs
from .models import weight_matrix
from .pruning import masks as M
from .pruning.owl import outlier_ratio, owl_sparsities
from .pruning.sparsegpt import sparsegpt_prune
from .spec import PruneStep


def _shape(module) -> tuple[int, int]:
    w = weight_matrix(module)
    return int(w.shape[0]), int(w.shape[1])


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("the run was cancelled", "partial results are kept in the run history")


class Pruner:
    """Applies one PruneStep to a loaded model with calibration tokens."""

    def __init__(self, loaded, tokens: torch.Tensor, step: PruneStep, *, batch_size: int = 8,
                 offload_activations: bool = False, emit=None, cancel=None, stage: str = "prune"):
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.tokens = tokens
        self.step = step
        self.device = torch.device(loaded.device)
        self.store = torch.device("cpu") if offload_activations else self.device
        self.batch_size = batch_size
        self.emit = emit or (lambda e: None)
        self.cancel = cancel
        self.stage = stage
        nm = step.nm
        self.n, self.m = nm if nm else (0, 0)

    # ----------------------------------------------------------------- helpers
    def _capture(self):
        return capture_inputs(self.adapter, self.tokens, self.device, self.batch_size, self.store)

    def _check_nm(self, linears) -> None:
        if not self.m:
            return
        for name, module in linears.items():
            cols = _shape(module)[1]
            if cols % self.m:
                raise UserError(
                    f"pattern {self.step.pattern}: {name} has {cols} input features, not a multiple of {self.m}",
                    "choose M dividing every layer's input size (2:4 and 4:8 fit all common models)",
                )

    # ----------------------------------------------------------------- OWL
    @torch.no_grad()
    def owl_allocation(self) -> list[float]:
        """OWL: per-layer outlier ratios of Wanda scores on the dense model, turned into sparsities."""
        layers = self.adapter.layers
        captured = self._capture()
        runner = LayerRunner(self.adapter, captured, self.device, self.store)
        ratios = []
        for i, layer in enumerate(layers):
            _check_cancel(self.cancel)
            with Resident(layer, self.device):  # dense pass: nothing to write back
                linears = self.adapter.linear_modules(layer)
                stats = runner.collect(layer, i, linears, hessian=False, sq_norm=True, weight_shape=_shape)
                scores = [M.wanda_scores(weight_matrix(mod), stats.stats[name].sq_norm) for name, mod in linears.items()]
                ratios.append(outlier_ratio(scores, self.step.owl_m))
                del scores, stats
                runner.propagate(layer, i)
            self.emit(Progress(stage=self.stage, done=i + 1, total=len(layers), detail="OWL outlier ratios"))
        try:
            sparsities = owl_sparsities(ratios, self.step.sparsity, self.step.owl_lambda)
        except ValueError as exc:
            raise UserError(str(exc), "lower owl_lambda or the target sparsity") from None
        self.emit(Log(message="OWL outlier ratios (%): " + ", ".join(f"{r:.2f}" for r in ratios)))
        self.emit(Log(message="OWL layer sparsities: " + ", ".join(f"{s:.3f}" for s in sparsities)))
        self.outlier_ratios = ratios
        return sparsities

    # ----------------------------------------------------------------- main pass
    def _targets(self) -> list[float]:
        n_layers = len(self.adapter.layers)
        if self.m:
            return [self.n / self.m] * n_layers
        if self.step.allocation == "owl":
            return self.owl_allocation()
        return [self.step.sparsity] * n_layers

    def _prune_group(self, names: list[str], linears, stats, target: float) -> dict[str, dict]:
        """Prune one group of linears sharing an input; return per-module statistics."""
        method = self.step.method
        out: dict[str, dict] = {}
        if method == "sparsegpt":
            weights = [weight_matrix(linears[n]) for n in names]
            stacked = torch.cat(weights, dim=0) if len(weights) > 1 else weights[0]
            result = sparsegpt_prune(
                stacked, stats[names[0]].hessian, 0.0 if self.m else target, n=self.n, m=self.m,
                blocksize=self.step.blocksize, percdamp=self.step.percdamp,
            )
            row = 0
            for n, w in zip(names, weights):
                rows = w.shape[0]
                w.copy_(result.weight[row:row + rows].to(w.dtype))
                row += rows
            error = float(result.error)
            for n in names:
                out[n] = {"error": error / len(names)}
            return out
        for n in names:
            w = weight_matrix(linears[n])
            if method == "wanda":
                scores = M.wanda_scores(w, stats[n].sq_norm)
                scope = "row"
            else:
                scores = M.magnitude_scores(w)
                scope = self.step.scope or "matrix"
            mask = M.nm_mask(scores, self.n, self.m) if self.m else M.unstructured_mask(scores, target, scope=scope)
            M.apply_mask_(w, mask)
            out[n] = {}
        return out

    @torch.no_grad()
    def run(self) -> dict:
        """Prune every decoder layer (and the head if asked); return the step's report."""
        adapter = self.adapter
        layers = adapter.layers
        if self.step.include_lm_head and adapter.tied_lm_head:  # refuse before any work is done
            raise UserError("the LM head shares its weights with the input embeddings", "leave include_lm_head off for this model")
        targets = self._targets()
        captured = self._capture()
        runner = LayerRunner(adapter, captured, self.device, self.store)
        need_sq = self.step.method == "wanda"
        need_h = self.step.method == "sparsegpt"
        report_layers = []
        for i, layer in enumerate(layers):
            _check_cancel(self.cancel)
            t0 = time.perf_counter()
            with Resident(layer, self.device, write_back=True):
                modules = self._prune_layer(runner, layer, i, targets[i], need_sq, need_h)
                runner.propagate(layer, i)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            zeros = sum(m["zeros"] for m in modules.values())
            numel = sum(m["numel"] for m in modules.values())
            entry = {"layer": i, "target": targets[i], "sparsity": zeros / numel, "seconds": seconds, "modules": modules}
            report_layers.append(entry)
            self.emit(LayerDone(stage=self.stage, layer=i, total=len(layers), sparsity=entry["sparsity"],
                                target=targets[i], seconds=seconds, modules=modules))
        head = None
        if self.step.include_lm_head:
            head = self._prune_head(runner, targets)
        zeros = sum(m["zeros"] for l in report_layers for m in l["modules"].values())
        numel = sum(m["numel"] for l in report_layers for m in l["modules"].values())
        report = {
            "type": "prune",
            "label": self.step.label(),
            "method": self.step.method,
            "pattern": self.step.pattern,
            "allocation": self.step.allocation,
            "target": self.step.sparsity if not self.m else self.n / self.m,
            "sparsity": zeros / numel if numel else 0.0,
            "layers": report_layers,
        }
        if head is not None:
            report["lm_head"] = head
        if self.step.allocation == "owl":
            report["outlier_ratios"] = getattr(self, "outlier_ratios", None)
        return report

    def _prune_layer(self, runner: LayerRunner, layer, i: int, target: float, need_sq: bool, need_h: bool) -> dict:
        """Statistics, masks and updates for one decoder layer already on the device."""
        linears = self.adapter.linear_modules(layer)
        self._check_nm(linears)
        if need_sq or need_h:
            collected = runner.collect(layer, i, linears, hessian=need_h, sq_norm=need_sq, weight_shape=_shape)
            stats, groups = collected.stats, collected.groups
        else:
            stats, groups = {}, [[n] for n in linears]
        modules: dict[str, dict] = {}
        for names in groups:
            modules.update(self._prune_group(names, linears, stats, target))
        for name, module in linears.items():
            w = weight_matrix(module)
            zeros = int((w == 0).sum())
            modules[name] = {"shape": list(w.shape), "zeros": zeros, "numel": w.numel(),
                             "sparsity": zeros / w.numel(), "target": target, **modules.get(name, {})}
        return modules

    def _prune_head(self, runner: LayerRunner, targets: list[float]) -> dict:
        head = self.adapter.lm_head
        target = sum(targets) / len(targets)
        with Resident(head, self.device, write_back=True):
            w = weight_matrix(head)
            stats = InputStats(w.shape[1], self.device, hessian=self.step.method == "sparsegpt", sq_norm=self.step.method == "wanda")
            for x in runner.final_hidden():
                stats.add(x)
            self._prune_group(["lm_head"], {"lm_head": head}, {"lm_head": stats}, target)
            zeros = int((w == 0).sum())
            shape, numel = list(w.shape), w.numel()
        w = None
        return {"shape": shape, "zeros": zeros, "numel": numel, "sparsity": zeros / numel, "target": target}



def run_step(run, index: int, step: PruneStep) -> dict:
    """The engine's runner for ``type = "prune"`` steps (see ``workbench.engine.STEP_RUNNERS``)."""
    from .events import Log

    name = f"prune:{index}"
    layers = len(run.loaded.adapter.layers)
    with run.stage(name, f"Pruning: {step.label()}", total=layers):
        pruner = Pruner(run.loaded, run.tokens, step, batch_size=run.spec.calibration.batch_size,
                        offload_activations=run.spec.calibration.offload_activations,
                        emit=run.emit, cancel=run.cancel, stage=name)
        report = pruner.run()
    report["seconds"] = run.timings[name]
    run.emit(Log(message=f"{step.label()}: achieved sparsity {report['sparsity']:.4f} of the decoder's linear weights"))
    return report

"""The ``prune`` step: one pruning method over the whole model, on the layer sweep.

The method's row in ``workbench.pruning.family.METHODS`` says which statistics
of each linear's input it needs; the sweep gathers them layer by layer, the
method prunes each group of linears that share an input, and the pruned layer
feeds the next (SparseGPT's sequential protocol). OWL first runs a dense
sweep for the per-layer outlier ratios. The LM head, when included, is pruned
last on the final hidden states.
"""

from __future__ import annotations

import torch

from workbench.errors import UserError
from workbench.events import Log
from workbench.layerwise import Resident
from workbench.models import weight_matrix
from workbench.observers import statistic
from workbench.registry import load
from workbench.sweep import LayerSweep, Watch

from . import masks as M
from .family import METHODS, PruneStep
from .methods import Group
from .owl import outlier_ratio, owl_sparsities


def _watch(names: tuple[str, ...]) -> Watch | None:
    return Watch(inputs={name: statistic(name) for name in names}) if names else None


def _check_nm(step: PruneStep, linears: dict) -> None:
    nm = step.nm
    if not nm:
        return
    for name, module in linears.items():
        cols = weight_matrix(module).shape[1]
        if cols % nm[1]:
            raise UserError(f"pattern {step.pattern}: {name} has {cols} input features, not a multiple of {nm[1]}",
                            "choose M dividing every layer's input size (2:4 and 4:8 fit all common models)")


def owl_allocation(sweep: LayerSweep, step: PruneStep, emit) -> tuple[list[float], list[float]]:
    """OWL: per-layer outlier ratios of Wanda scores on the dense model, turned into sparsities."""

    def ratio(layer, i, stats) -> dict:
        linears = sweep.adapter.linear_modules(layer)
        scores = [M.wanda_scores(weight_matrix(mod), stats.inputs[name]["sq_norm"]) for name, mod in linears.items()]
        return {"ratio": outlier_ratio(scores, step.owl_m)}

    ratios = [r["ratio"] for r in sweep.run(ratio, _watch(("sq_norm",)), dense=True, detail="OWL outlier ratios")]
    try:
        sparsities = owl_sparsities(ratios, step.sparsity, step.owl_lambda)
    except ValueError as exc:
        raise UserError(str(exc), "lower owl_lambda or the target sparsity") from None
    emit(Log(message="OWL outlier ratios (%): " + ", ".join(f"{r:.2f}" for r in ratios)))
    emit(Log(message="OWL layer sparsities: " + ", ".join(f"{s:.3f}" for s in sparsities)))
    return ratios, sparsities


def _module_report(linears: dict, extra: dict, target: float) -> dict:
    modules = {}
    for name, module in linears.items():
        w = weight_matrix(module)
        zeros = int((w == 0).sum())
        modules[name] = {"shape": list(w.shape), "zeros": zeros, "numel": w.numel(), "sparsity": zeros / w.numel(),
                         "target": target, **extra.get(name, {})}
    return modules


@torch.no_grad()
def prune(loaded, tokens: torch.Tensor | None, step: PruneStep, *, batch_size: int = 8, offload_activations: bool = False,
          emit=None, cancel=None, stage: str = "prune", seed: int = 0) -> dict:
    """Apply ``step`` to ``loaded`` with calibration ``tokens``; return the step's report (per layer and module)."""
    emit = emit or (lambda event: None)
    adapter = loaded.adapter
    device = torch.device(loaded.device)
    store = torch.device("cpu") if offload_activations else device
    method = METHODS[step.method]
    fn = load(method.prune)
    nm = step.nm
    n, m = nm if nm else (0, 0)
    if step.include_lm_head and adapter.tied_lm_head:  # refuse before any work is done
        raise UserError("the LM head shares its weights with the input embeddings", "leave include_lm_head off for this model")
    options = {"blocksize": step.blocksize, "percdamp": step.percdamp, "generator": torch.Generator().manual_seed(seed)}
    scope = step.scope or method.scopes[0]
    layers = len(adapter.layers)
    ratios = None
    if m:
        targets = [n / m] * layers
    elif step.allocation == "owl":
        ratios, targets = owl_allocation(LayerSweep(adapter, tokens, device, batch_size=batch_size, store=store,
                                                    cancel=cancel, emit=emit, stage=stage), step, emit)
    else:
        targets = [step.sparsity] * layers
    data = bool(method.statistics)  # magnitude and random need no calibration data
    sweep = LayerSweep(adapter, tokens, device, batch_size=batch_size, store=store, cancel=cancel, emit=emit, stage=stage)

    def prune_layer(layer, i, stats) -> dict:
        linears = adapter.linear_modules(layer)
        _check_nm(step, linears)
        groups = stats.groups if stats is not None else [[name] for name in linears]
        extra: dict[str, dict] = {}
        for names in groups:
            shared = stats.inputs[names[0]] if stats is not None else {}
            group = Group(names, [weight_matrix(linears[name]) for name in names], shared, 0.0 if m else targets[i],
                          n, m, scope, options)
            extra.update(fn(group))
        modules = _module_report(linears, extra, targets[i])
        zeros = sum(mod["zeros"] for mod in modules.values())
        numel = sum(mod["numel"] for mod in modules.values())
        return {"layer": i, "target": targets[i], "sparsity": zeros / numel, "modules": modules}

    report_layers = sweep.run(prune_layer, _watch(method.statistics), data=data)
    head = _prune_head(sweep, step, fn, method, targets, scope, options, n, m, data) if step.include_lm_head else None
    zeros = sum(mod["zeros"] for entry in report_layers for mod in entry["modules"].values())
    numel = sum(mod["numel"] for entry in report_layers for mod in entry["modules"].values())
    report = {"type": "prune", "label": step.label(), "method": step.method, "pattern": step.pattern,
              "allocation": step.allocation, "target": step.sparsity if not m else n / m,
              "sparsity": zeros / numel if numel else 0.0, "layers": report_layers}
    if head is not None:
        report["lm_head"] = head
    if step.allocation == "owl":
        report["outlier_ratios"] = ratios
    return report


def _prune_head(sweep: LayerSweep, step, fn, method, targets, scope, options, n, m, data) -> dict:
    head = sweep.adapter.lm_head
    target = sum(targets) / len(targets)
    with Resident(head, sweep.device, write_back=True):
        w = weight_matrix(head)
        observers = {name: statistic(name)(w.shape[1], sweep.device) for name in method.statistics}
        if data:
            for x in sweep.final_hidden():
                for observer in observers.values():
                    observer.update(x)
        stats = {name: observer.result() for name, observer in observers.items()}
        fn(Group(["lm_head"], [w], stats, 0.0 if m else target, n, m, scope, options))
        zeros = int((w == 0).sum())
        shape, numel = list(w.shape), w.numel()
    return {"shape": shape, "zeros": zeros, "numel": numel, "sparsity": zeros / numel, "target": target}


def run_step(ctx, step: PruneStep) -> dict:
    """The engine's runner for ``type = "prune"`` (``workbench.registry``)."""
    name = f"prune:{ctx.index}"
    with ctx.stage(name, f"Pruning: {step.label()}", total=len(ctx.adapter.layers)):
        report = prune(ctx.loaded, ctx.tokens, step, batch_size=ctx.spec.calibration.batch_size,
                       offload_activations=ctx.spec.calibration.offload_activations, emit=ctx.emit, cancel=ctx.cancel,
                       stage=name, seed=ctx.spec.calibration.seed)
    report["seconds"] = ctx.timings[name]
    ctx.emit(Log(message=f"{step.label()}: achieved sparsity {report['sparsity']:.4f} of the decoder's linear weights"))
    return report


def check(facts, step: PruneStep, where: str) -> None:
    """What only the model can judge, right after loading: a tied LM head, N:M against the input sizes."""
    adapter = facts.adapter
    if adapter.quantization is not None:
        raise UserError(f"{where}: the model is quantized (its config.json has a quantization_config); pruning would break its grid",
                        "prune the unquantized checkpoint, then quantize (or prune and quantize in one quantize step)")
    if step.include_lm_head and adapter.tied_lm_head:
        raise UserError(f"{where}: the LM head shares its weights with the input embeddings",
                        "leave include_lm_head off for this model")
    nm = step.nm
    if nm and not ({"width", "lowrank"} & set(facts.steps_before)):  # those change the input sizes first
        try:
            _check_nm(step, adapter.linear_modules(adapter.layers[0]))
        except UserError as exc:
            raise UserError(f"{where}: {exc.message}", exc.hint) from None


__all__ = ["prune", "run_step", "check", "owl_allocation"]

"""Layer-by-layer passes of a low-rank step: the dense statistics pass and the sequential application.

- ``dense_factorizations``: one pass over the calibration data through the
  dense model, every layer fed the dense previous layer's outputs; each
  compressible linear is factorized once up to its largest saving rank. The
  energy allocation reads the spectra, and every search trial truncates these
  factors (no statistics, no eigendecomposition per trial).
- ``apply_sequential``: the final compression, as the method prescribes:
  layers in order, each layer's statistics collected on the outputs of the
  already compressed layers before it, factorized at its allocated rank,
  replaced by ``LowRankLinear`` modules and re-run to feed the next layer.

The factors of the dense pass are saved beside the study (``save_factors``)
so that search workers and a resumed search skip the statistics pass.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from workbench.errors import Cancelled
from workbench.events import LayerDone, Progress
from workbench.layerwise import LayerRunner, Resident, capture_inputs
from workbench.models import weight_matrix

from .allocation import Budget, Target
from .factor import Factorization, asvd_factorization, dense_params, feature_factorization, svd_factorization
from .modules import LowRankLinear, set_submodule
from .stats import collect


def uses_data(method: str) -> tuple[bool, bool]:
    """Which statistics a method needs: ``(outputs, inputs)``."""
    return method == "feature", method == "asvd"


def factorize(method: str, module, stats: tuple | None, rank: int, alpha: float) -> Factorization:
    """Factor one linear up to ``rank`` from its statistics ``(OutputStats, InputAbsMean)``."""
    weight = weight_matrix(module)
    bias = getattr(module, "bias", None)
    if method == "svd":
        return svd_factorization(weight, bias, rank)
    if method == "asvd":
        return asvd_factorization(weight, bias, rank, stats[1].result(), alpha)
    covariance, mean = stats[0].result()
    return feature_factorization(weight, bias, rank, covariance, mean)


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel():
        raise Cancelled("the run was cancelled", "partial results are kept in the run history")


class LayerPass:
    """Shared set-up of a pass: the model's targets per layer, the device, captured inputs when the method needs data."""

    def __init__(self, loaded, tokens, budget: Budget, method: str, *, batch_size: int = 8, offload: bool = False,
                 emit=None, stage: str = "lowrank", cancel=None):
        self.adapter = loaded.adapter
        self.device = torch.device(loaded.device)
        self.store = torch.device("cpu") if offload else self.device
        self.dtype = loaded.dtype
        self.method = method
        self.emit = emit or (lambda e: None)
        self.stage = stage
        self.cancel = cancel
        self.outputs, self.inputs = uses_data(method)
        self.by_layer: dict[int, list[Target]] = {}
        for t in budget.targets:
            self.by_layer.setdefault(t.layer, []).append(t)
        self.runner = None
        if self.outputs or self.inputs:
            captured = capture_inputs(self.adapter, tokens, self.device, batch_size, self.store)
            self.runner = LayerRunner(self.adapter, captured, self.device, self.store)

    def modules(self, layer, targets: list[Target]) -> dict:
        linears = self.adapter.linear_modules(layer)
        return {t.name: linears[t.name] for t in targets}

    def stats(self, layer, index: int, targets: list[Target], propagate: bool) -> dict:
        if self.runner is None:
            return {}
        if not targets:
            if propagate:
                self.runner.propagate(layer, index)
            return {}
        return collect(self.runner, layer, index, self.modules(layer, targets), outputs=self.outputs, inputs=self.inputs,
                       propagate=propagate)


@torch.no_grad()
def dense_factorizations(layer_pass: LayerPass, alpha: float) -> dict[str, Factorization]:
    """Every target's factors up to its largest saving rank, from dense-model statistics, on the CPU."""
    p = layer_pass
    layers = p.adapter.layers
    factors: dict[str, Factorization] = {}
    for i, layer in enumerate(layers):
        _check_cancel(p.cancel)
        targets = [t for t in p.by_layer.get(i, []) if t.max_rank]
        with Resident(layer, p.device):
            stats = p.stats(layer, i, targets, propagate=True)
            modules = p.modules(layer, targets)
            for t in targets:
                fac = factorize(p.method, modules[t.name], stats.get(t.name), t.max_rank, alpha)
                factors[t.key] = fac.to("cpu", p.dtype)
        p.emit(Progress(stage=p.stage, done=i + 1, total=len(layers), detail="statistics and factorizations"))
    return factors


@torch.no_grad()
def apply_sequential(layer_pass: LayerPass, ranks: dict[str, int], alpha: float,
                     target_retention: float) -> tuple[dict[str, torch.nn.Module], list[dict]]:
    """Replace every target with a nonzero rank, layer by layer; return the replaced modules and a per-layer report."""
    p = layer_pass
    layers = p.adapter.layers
    originals: dict[str, torch.nn.Module] = {}
    report = []
    for i, layer in enumerate(layers):
        _check_cancel(p.cancel)
        t0 = time.perf_counter()
        targets = [t for t in p.by_layer.get(i, []) if ranks.get(t.key)]
        linears = p.adapter.linear_modules(layer)
        new_modules = []
        with Resident(layer, p.device):
            stats = p.stats(layer, i, targets, propagate=False)
            modules = p.modules(layer, targets)
            for t in targets:
                rank = ranks[t.key]
                a, b, bias = factorize(p.method, modules[t.name], stats.get(t.name), rank, alpha).truncate(rank)
                new = LowRankLinear.from_factors(a, b, bias, dtype=p.dtype)
                originals[t.key] = set_submodule(layer, t.name, new)
                new_modules.append(new)
            del stats
            if p.runner is not None:
                p.runner.propagate(layer, i)
        for module in new_modules:  # the rest of the layer went back to the CPU with Resident
            module.to("cpu")
        seconds = time.perf_counter() - t0
        entry = _layer_report(i, linears, p.by_layer.get(i, []), ranks, seconds)
        report.append(entry)
        p.emit(LayerDone(stage=p.stage, layer=i, total=len(layers), sparsity=1 - entry["retained"],
                         target=1 - target_retention, seconds=seconds, modules=entry["modules"]))
    return originals, report


def _layer_report(index: int, linears: dict, targets: list[Target], ranks: dict[str, int], seconds: float) -> dict:
    """Per linear of one layer (``linears``: before replacement): shape, rank (None: dense), parameters kept."""
    by_name = {t.name: t for t in targets}
    modules, kept, total = {}, 0, 0
    for name, module in linears.items():
        target = by_name.get(name)
        if target is not None:
            rank = ranks.get(target.key, 0)
            shape, full, now = [target.out_features, target.in_features], target.dense, target.params(rank)
        else:
            rank = 0
            shape = list(weight_matrix(module).shape)
            full = now = dense_params(shape[0], shape[1], getattr(module, "bias", None) is not None)
        modules[name] = {"shape": shape, "rank": rank or None, "params": now, "dense_params": full, "retained": now / full}
        kept, total = kept + now, total + full
    return {"layer": index, "retained": kept / total, "seconds": seconds, "modules": modules}


def restore(adapter, originals: dict[str, torch.nn.Module]) -> None:
    """Put the dense linears replaced by ``apply_sequential`` back."""
    for key, module in originals.items():
        layer, _, name = key.partition(".")
        set_submodule(adapter.layers[int(layer)], name, module)


# ---------------------------------------------------------------- saved factors

_FIELDS = ("left", "right", "bias", "bias_coef", "spectrum")


def save_factors(path: Path, factors: dict[str, Factorization], fingerprint: dict) -> None:
    """Write the factors (safetensors) with the fingerprint of what produced them, atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for key, fac in factors.items():
        for field in _FIELDS:
            value = getattr(fac, field)
            if value is not None:
                tensors[f"{key}::{field}"] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_factors(path: Path, fingerprint: dict) -> dict[str, Factorization] | None:
    """The factors saved at ``path`` when they were produced by the same settings, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("fingerprint") != json.dumps(fingerprint, sort_keys=True):
                return None
            fields: dict[str, dict] = {}
            for name in fh.keys():
                key, _, field = name.partition("::")
                fields.setdefault(key, {})[field] = fh.get_tensor(name)
    except Exception:  # a truncated or foreign file: compute the factors again
        return None
    return {key: Factorization(**{f: parts.get(f) for f in _FIELDS}) for key, parts in fields.items()}

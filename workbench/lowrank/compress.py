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
from pathlib import Path

import torch

from workbench.files import atomic_file
from workbench.models import weight_matrix
from workbench.observers import statistic
from workbench.registry import load
from workbench.sweep import LayerStats, LayerSweep, Watch

from .allocation import Budget, Target
from .factor import Factorization, dense_params
from .family import METHODS, LowRankMethod
from .modules import LowRankLinear, set_submodule


def factorize(method: LowRankMethod, module, stats: LayerStats | None, name: str, rank: int,
              options: dict) -> Factorization:
    """Factor one linear up to ``rank`` with ``method``, from the statistics its table row asks for."""
    named = {}
    if stats is not None:
        named.update(stats.inputs.get(name, {}))
        named.update(stats.outputs.get(name, {}))
    return load(method.factorize)(weight_matrix(module), getattr(module, "bias", None), rank, named, options)


class LayerPass:
    """What the passes of one low-rank step share: the targets per layer, and a sweep with the method's statistics."""

    def __init__(self, loaded, tokens, budget: Budget, method: str, *, batch_size: int = 8, offload: bool = False,
                 emit=None, stage: str = "lowrank", cancel=None, options: dict | None = None):
        self.adapter = loaded.adapter
        self.dtype = loaded.dtype
        self.method = METHODS[method]
        self.options = options or {"asvd_alpha": 0.5}
        self.data = bool(self.method.inputs or self.method.outputs)
        self.by_layer: dict[int, list[Target]] = {}
        for t in budget.targets:
            self.by_layer.setdefault(t.layer, []).append(t)
        device = torch.device(loaded.device)
        self.sweep = LayerSweep(self.adapter, tokens, device, batch_size=batch_size,
                                store=torch.device("cpu") if offload else device, cancel=cancel, emit=emit, stage=stage)

    def watch(self, targets_of) -> Watch:
        """The method's statistics on the linears ``targets_of(index)`` names."""

        def linears(index, layer):
            modules = self.adapter.linear_modules(layer)
            return {t.name: modules[t.name] for t in targets_of(index)}

        return Watch(inputs={name: statistic(name) for name in self.method.inputs},
                     outputs={name: statistic(name, on="output") for name in self.method.outputs}, linears=linears)

    def factorize(self, module, stats, name: str, rank: int) -> Factorization:
        return factorize(self.method, module, stats, name, rank, self.options)


@torch.no_grad()
def dense_factorizations(layer_pass: LayerPass) -> dict[str, Factorization]:
    """Every target's factors up to its largest saving rank, from dense-model statistics, on the CPU."""
    p = layer_pass
    factors: dict[str, Factorization] = {}

    def targets(i: int) -> list[Target]:
        return [t for t in p.by_layer.get(i, []) if t.max_rank]

    def factorize_layer(layer, i, stats) -> None:
        modules = p.adapter.linear_modules(layer)
        for t in targets(i):
            factors[t.key] = p.factorize(modules[t.name], stats, t.name, t.max_rank).to("cpu", p.dtype)

    p.sweep.run(factorize_layer, p.watch(targets), dense=True, data=p.data, detail="statistics and factorizations")
    return factors


@torch.no_grad()
def apply_sequential(layer_pass: LayerPass, ranks: dict[str, int], target_retention: float) -> tuple[dict[str, torch.nn.Module], list[dict]]:
    """Replace every target with a nonzero rank, layer by layer; return the replaced modules and a per-layer report."""
    p = layer_pass
    originals: dict[str, torch.nn.Module] = {}

    def targets(i: int) -> list[Target]:
        return [t for t in p.by_layer.get(i, []) if ranks.get(t.key)]

    def replace(layer, i, stats) -> dict:
        linears = p.adapter.linear_modules(layer)
        for t in targets(i):
            rank = ranks[t.key]
            a, b, bias = p.factorize(linears[t.name], stats, t.name, rank).truncate(rank)
            originals[t.key] = set_submodule(layer, t.name, LowRankLinear.from_factors(a, b, bias, dtype=p.dtype))
        entry = _layer_report(i, linears, p.by_layer.get(i, []), ranks)
        entry.update(sparsity=1 - entry["retained"], target=1 - target_retention, value=entry["retained"])
        return entry

    report = p.sweep.run(replace, p.watch(targets), data=p.data)
    for entry in report:  # what the LayerDone events carried; the report keeps the retained fraction
        for key in ("sparsity", "target", "value"):
            entry.pop(key)
    return originals, report


def _layer_report(index: int, linears: dict, targets: list[Target], ranks: dict[str, int]) -> dict:
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
    return {"layer": index, "retained": kept / total, "modules": modules}


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
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True)})


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

"""Multiply factorized linears back into plain ones: a checkpoint vanilla ``transformers`` loads.

``W' = B A`` has the dense shape, so merging gives up the parameter saving
and keeps the low-rank function (a model that is smaller to fine-tune or
quantize, or a reference for the factorized one). The feature method's mean
correction is a bias; a plain architecture holds it only where its config can
give that linear a bias. Llama-style configs can (``attention_bias`` adds
biases to q/k/v/o, ``mlp_bias`` to gate/up/down): the flag is switched on and
linears that need no bias get zeros. Where the config cannot (e.g. Mistral,
Qwen2's o_proj), the correction is dropped: the merged linear then computes
``Q_r Q_r^T W x``, whose mean output differs from the dense layer's by
``(I - Q_r Q_r^T) mu``. The report lists those linears and the size of what
was dropped.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from workbench.models import linear_types, weight_matrix

from .modules import LowRankLinear, set_submodule

BIAS_FLAGS = ("attention_bias", "mlp_bias")


def _skeleton(model: nn.Module, config) -> nn.Module:
    """The model's class built from ``config`` on the meta device: which linear has a bias, and its type."""
    with torch.device("meta"):
        return type(model)(config)


def _has_bias(skeleton: nn.Module, name: str) -> bool:
    return getattr(skeleton.get_submodule(name), "bias", None) is not None


@torch.no_grad()
def merge_lowrank(model: nn.Module) -> dict:
    """Replace every ``LowRankLinear`` in ``model`` by the plain linear its architecture expects; return a report.

    The report: ``merged`` (count), ``bias_flags`` (config flags switched on),
    ``dropped_bias`` (linear -> largest absolute value of the bias correction
    the config could not hold) and ``lost`` (one sentence about it).
    """
    lowrank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    config = model.config
    skeleton = _skeleton(model, config)
    need = [name for name, m in lowrank.items() if m.b.bias is not None]
    enabled = []
    for flag in BIAS_FLAGS:
        if getattr(config, flag, None) is False and any(not _has_bias(skeleton, n) for n in need):
            candidate = copy.deepcopy(config)
            setattr(candidate, flag, True)
            trial = _skeleton(model, candidate)
            if any(_has_bias(trial, n) and not _has_bias(skeleton, n) for n in need):
                config, skeleton = candidate, trial
                enabled.append(flag)
    dropped = {}
    for name, module in lowrank.items():
        a, b = module.a.weight, module.b.weight
        plain = copy.deepcopy(skeleton.get_submodule(name)).to_empty(device=a.device).to(a.dtype)
        weight_matrix(plain).copy_((b.float() @ a.float()).to(a.dtype))
        bias = module.b.bias
        if getattr(plain, "bias", None) is not None:
            plain.bias.copy_(bias if bias is not None else torch.zeros_like(plain.bias))
        elif bias is not None:
            dropped[name] = float(bias.abs().max())
        set_submodule(model, name, plain)
    # linears the switched-on flags gave a bias (value projections, linears left dense): zero biases
    for name, module in model.named_modules():
        if isinstance(module, linear_types()) and module.bias is None and _has_bias(skeleton, name):
            out_features = weight_matrix(module).shape[0]
            module.bias = nn.Parameter(torch.zeros(out_features, dtype=module.weight.dtype, device=module.weight.device),
                                       requires_grad=False)
    for flag in enabled:
        setattr(model.config, flag, True)
    lost = ""
    if dropped:
        lost = (f"the {getattr(model.config, 'model_type', 'model')} config cannot give {len(dropped)} linears a bias, so their "
                "mean-output correction is dropped (largest entry "
                f"{max(dropped.values()):.3g}); the factorized export keeps it")
    return {"merged": len(lowrank), "bias_flags": enabled, "dropped_bias": dropped, "lost": lost}

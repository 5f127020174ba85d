"""RIA, relative importance and activations (Zhang et al., Plug-and-Play, ICLR 2024).

A weight's relative importance is its magnitude over the total magnitude of
its output row plus its magnitude over the total magnitude of its input
column; the score multiplies it by the input feature's l2 norm to the power
``a = 0.5``, the paper's setting. Weights compete within each output row
(unstructured) or N:M group. The paper's channel permutation for N:M is left
out: the masks are plain N:M over the columns as they are.
"""

from __future__ import annotations

import torch

from .methods import Group, _masked

POWER = 0.5  # the paper's exponent on the activation norm


def ria_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor, power: float = POWER) -> torch.Tensor:
    """``(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j|| ** power``, float32, on ``weight``'s device."""
    w = weight.detach().abs().to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny  # a row or column already all zero stays at score 0
    relative = w / w.sum(1, keepdim=True).clamp_min(tiny) + w / w.sum(0, keepdim=True).clamp_min(tiny)
    norm = input_sq_norm.detach().to(device=weight.device, dtype=torch.float32).sqrt()
    return relative * norm.pow(power)[None, :]


def prune(group: Group) -> dict[str, dict]:
    sq_norm = group.stats["sq_norm"]
    return _masked(group, lambda w: ria_scores(w, sq_norm))


__all__ = ["prune", "ria_scores", "POWER"]

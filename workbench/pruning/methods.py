"""The pruning methods of ``workbench.pruning.family.METHODS``: one function per method, on one group of linears.

A method function is ``fn(group: Group) -> {linear name: extra report}``. The
group is the linears of one decoder layer that read the same input (all of
them share the statistics of that input; a method that is not ``joint`` simply
prunes them one by one). It writes the pruned weights in place, through the
weight views in ``group.weights``, and may report per linear (SparseGPT's
reconstruction ``error``). Statistics arrive by the names the method's table
row asks for (``workbench.observers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.errors import UserError

from . import masks as M
from .sparsegpt import sparsegpt_prune


@dataclass
class Group:
    names: list[str]
    weights: list[torch.Tensor]  # (out, in) views of the linears' weights, written in place
    stats: dict[str, Any]  # the method's statistics of the group's shared input
    sparsity: float  # the target for unstructured pruning (0 with an N:M pattern)
    n: int = 0  # N:M (0, 0: unstructured)
    m: int = 0
    scope: str = "row"  # where weights compete: "row" or "matrix"
    options: dict = field(default_factory=dict)  # the step's method-specific settings (blocksize, percdamp, generator)


def _masked(group: Group, scores_of) -> dict[str, dict]:
    for w in group.weights:
        scores = scores_of(w)
        mask = M.nm_mask(scores, group.n, group.m) if group.m else M.unstructured_mask(scores, group.sparsity, scope=group.scope)
        M.apply_mask_(w, mask)
    return {name: {} for name in group.names}


def magnitude(group: Group) -> dict[str, dict]:
    """|W|: the smallest weights go."""
    return _masked(group, M.magnitude_scores)


def wanda(group: Group) -> dict[str, dict]:
    """|W| times the l2 norm of the input feature, compared within each output row."""
    sq_norm = group.stats["sq_norm"]
    return _masked(group, lambda w: M.wanda_scores(w, sq_norm))


def sparsegpt(group: Group) -> dict[str, dict]:
    """SparseGPT on the group stacked into one matrix (rows are independent given the shared Hessian); with scope
    "matrix" each linear's block still gets its own threshold."""
    stacked = torch.cat(group.weights, dim=0) if len(group.weights) > 1 else group.weights[0]
    try:
        result = sparsegpt_prune(stacked, group.stats["hessian"], group.sparsity, n=group.n, m=group.m,
                                 blocksize=group.options["blocksize"], percdamp=group.options["percdamp"],
                                 scope=group.scope, row_groups=[w.shape[0] for w in group.weights])
    except ValueError as exc:
        if "increase percdamp" in str(exc):  # the user can fix it: a setting, not a bug
            raise UserError(str(exc).split(";")[0], "increase percdamp (for example to 0.05) or use more calibration "
                                                    "samples (calibration.nsamples)") from None
        raise
    row = 0
    for w in group.weights:
        rows = w.shape[0]
        w.copy_(result.weight[row:row + rows].to(w.dtype))
        row += rows
    error = float(result.error)
    return {name: {"error": error / len(group.names)} for name in group.names}


__all__ = ["Group", "magnitude", "wanda", "sparsegpt"]

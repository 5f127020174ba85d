"""Pruning scores and masks for one weight matrix.

Weight matrices are (out_features, in_features). A mask is a bool tensor of the
weight's shape with True = pruned (set to zero). Everything runs on the device
of its inputs; nothing here loops over rows in Python.
"""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "magnitude_scores",
    "wanda_scores",
    "unstructured_mask",
    "lowest_k_mask",
    "nm_mask",
    "apply_mask_",
    "mask_sparsity",
    "check_nm",
]

# Row chunks for the per-row sort, in elements: a sort holds values and int64
# indices, so this bounds its scratch memory to about 0.8 GB.
_SORT_CHUNK_ELEMENTS = 1 << 26


def _check_matrix(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (out_features, in_features) matrix, got shape {tuple(t.shape)}")
    return t


def _check_finite_scores(scores: torch.Tensor) -> None:
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("scores contain NaN; check the weights and calibration statistics")


def _check_sparsity(sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def check_nm(n: object, m: object, in_features: int | None = None) -> tuple[int, int]:
    """Validate an N:M pattern (prune n of every m consecutive inputs); return (n, m) as ints."""
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, numbers.Integral) or not isinstance(m, numbers.Integral):
        raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
    n, m = int(n), int(m)
    if not (0 < n < m):
        raise ValueError(f"an N:M pattern needs 0 < n < m, got {n}:{m}")
    if in_features is not None and in_features % m != 0:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {in_features}")
    return n, m


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| as float32, same shape and device as ``weight``."""
    _check_matrix("weight", weight)
    return weight.detach().abs().to(torch.float32)


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda scores |W_ij| * ||X_j||, float32, on ``weight``'s device.

    ``input_sq_norm`` has shape (in_features,) and holds, per input feature, the
    sum of squares of that feature over all calibration tokens.
    """
    _check_matrix("weight", weight)
    if not isinstance(input_sq_norm, torch.Tensor):
        raise ValueError(f"input_sq_norm must be a torch.Tensor, got {type(input_sq_norm).__name__}")
    if input_sq_norm.dim() != 1 or input_sq_norm.shape[0] != weight.shape[1]:
        raise ValueError(
            f"input_sq_norm must have shape ({weight.shape[1]},) to match weight {tuple(weight.shape)}, "
            f"got {tuple(input_sq_norm.shape)}"
        )
    norm = input_sq_norm.detach().to(device=weight.device, dtype=torch.float32).sqrt()
    return weight.detach().abs().to(torch.float32) * norm[None, :]


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries of each row; ties go to the lower column index."""
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if k == 0 or rows == 0:
        return mask
    chunk = max(1, _SORT_CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, chunk):
        # A stable sort makes the tie-break deterministic across devices and runs.
        idx = torch.argsort(scores[r0 : r0 + chunk], dim=1, stable=True)[:, :k]
        mask[r0 : r0 + chunk].scatter_(1, idx, True)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Prune exactly k = floor(n * sparsity) lowest-scoring entries.

    scope="row": n = in_features and each output row is pruned separately (as
    Wanda does). scope="matrix": n = numel, one ranking over the whole matrix
    (the classic magnitude baseline). The count is the reference
    implementations' ``int(n * sparsity)``, so published settings reproduce
    exactly.
    Ties are broken by position: the lower index (row-major for "matrix") is
    pruned first. ``sparsity`` must be in [0, 1). Returns a bool mask on the
    scores' device, True = pruned.
    """
    _check_matrix("scores", scores)
    s = _check_sparsity(sparsity)
    if scope not in ("row", "matrix"):
        raise ValueError(f"scope must be 'row' or 'matrix', got {scope!r}")
    _check_finite_scores(scores)
    rows, cols = scores.shape
    if scope == "row":
        return lowest_k_mask(scores, int(cols * s))
    flat = scores.reshape(1, -1)
    return lowest_k_mask(flat, int(flat.shape[1] * s)).reshape(rows, cols)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in each row, within every group of m consecutive input columns,
    prune the n lowest scores (ties: lower column first).

    Needs 0 < n < m and in_features % m == 0. "2:4" is n=2, m=4.
    """
    _check_matrix("scores", scores)
    rows, cols = scores.shape
    n, m = check_nm(n, m, cols)
    _check_finite_scores(scores)
    groups = scores.reshape(rows * (cols // m), m)
    return lowest_k_mask(groups, n).reshape(rows, cols)


def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` in place and return it.

    Works on views (e.g. the transpose of a Conv1D weight): the underlying
    storage is written. ``mask`` must be bool with the weight's shape; it is
    moved to the weight's device if needed.
    """
    if not isinstance(weight, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise ValueError("weight and mask must be torch.Tensors")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = pruned), got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    with torch.no_grad():
        weight.masked_fill_(mask.to(weight.device), 0)
    return weight


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of pruned (True) entries; 0.0 for an empty mask."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor")
    numel = mask.numel()
    if numel == 0:
        return 0.0
    return int(mask.count_nonzero()) / numel

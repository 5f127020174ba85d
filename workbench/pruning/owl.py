"""OWL, Outlier Weighed Layerwise sparsity (Yin et al., 2024): give decoder
layers with more outlier weights a lower sparsity, keeping the mean on target."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = ["outlier_ratio", "owl_sparsities"]


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = 5.0) -> float:
    """Percentage (0..100) of one decoder layer's score entries greater than m
    times their mean, over all its linear layers together.

    ``scores``: the Wanda scores (|W| * ||X||) of each linear layer of the
    decoder layer, any shapes, any devices. Nothing is concatenated, so no
    extra copy of the scores is made.
    """
    if isinstance(m, bool) or not isinstance(m, numbers.Real) or not (0.0 < float(m) < math.inf):
        raise ValueError(f"m must be a positive number, got {m!r}")
    tensors = list(scores) if not isinstance(scores, torch.Tensor) else [scores]
    if not tensors or any(not isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError("scores must be a non-empty sequence of tensors")
    count = sum(t.numel() for t in tensors)
    if count == 0:
        raise ValueError("scores are empty")
    # float64 sums: a layer of a 7B model has ~2e8 entries, beyond float32's exact range.
    total = sum(float(t.detach().sum(dtype=torch.float64)) for t in tensors)
    if not math.isfinite(total):
        raise ValueError("scores contain NaN or Inf")
    threshold = float(m) * total / count
    outliers = sum(int((t.detach() > threshold).sum()) for t in tensors)
    return 100.0 * outliers / count


def owl_sparsities(outlier_ratios: Sequence[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-layer sparsities whose mean is ``target``.

    The outlier ratios are min-max scaled to [0, 2*lam] and shifted so the mean
    keep ratio is 1 - target; sparsity = 1 - keep. A layer with a higher
    outlier ratio gets a lower sparsity; the spread (max - min) is 2*lam. Equal
    ratios (or lam = 0) give ``target`` everywhere. Raises ValueError if a
    layer's sparsity would leave [0, 1).
    """
    ratios = [float(r) for r in outlier_ratios]
    if not ratios:
        raise ValueError("outlier_ratios is empty")
    if not all(math.isfinite(r) for r in ratios):
        raise ValueError("outlier ratios must be finite numbers")
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not (0.0 <= float(target) < 1.0):
        raise ValueError(f"target sparsity must be in [0, 1), got {target!r}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (0.0 <= float(lam) < math.inf):
        raise ValueError(f"lambda must be a finite number >= 0, got {lam!r}")
    target, lam = float(target), float(lam)
    lo, hi = min(ratios), max(ratios)
    if hi == lo or lam == 0.0:
        return [target] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2.0 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    sparsities = [target - (s - mean) for s in scaled]
    for i, s in enumerate(sparsities):
        if not (0.0 <= s < 1.0):
            raise ValueError(
                f"OWL would give layer {i} sparsity {s:.4f}, outside [0, 1) "
                f"(target {target}, lambda {lam}); use a smaller lambda or target"
            )
    return sparsities

"""Factorizations of one linear layer ``y = W x + b`` (W: out x in) into ``y = B (A x) + b'``.

Three methods, each computed once up to a largest rank and then truncated as
often as a search needs (a truncation is slicing, plus one matrix-vector
product for the feature method's bias):

- ``svd``: the truncated SVD of W (the baseline). ``B = U_r sqrt(S_r)``,
  ``A = sqrt(S_r) V_r^T``, the bias unchanged.
- ``asvd``: activation-aware SVD (Yuan et al., 2023): the SVD of ``W S`` with
  ``S = diag(mean |x|) ** alpha`` over the calibration inputs, then
  ``A = sqrt(S_r) V_r^T S^-1``, so input channels that carry large
  activations are approximated better.
- ``feature``: the top-r eigenvectors ``Q_r`` of the pooled covariance of the
  layer's outputs (Ji et al., 2024): ``A = Q_r^T W``, ``B = Q_r`` and
  ``b' = Q_r Q_r^T b + (I - Q_r Q_r^T) mu`` with ``mu`` the mean output, so the
  compressed layer keeps the output mean and the directions the outputs vary in.

Ranks follow the paper's rule: ``ceil(ratio * out * in / (out + in))`` rounded
down to a multiple of 8. A layer is replaced only where the pair has fewer
parameters than the dense layer (the "saving point").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MULTIPLE = 8  # ranks are multiples of 8 (tensor-core friendly shapes)


def dense_params(out_features: int, in_features: int, bias: bool) -> int:
    return out_features * in_features + (out_features if bias else 0)


def pair_params(out_features: int, in_features: int, rank: int, bias: bool) -> int:
    """Parameters of ``B (A x) + b'``: A is rank x in, B out x rank, b' out (when present)."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def max_saving_rank(out_features: int, in_features: int, dense_bias: bool, pair_bias: bool) -> int:
    """The largest multiple of 8 whose pair has fewer parameters than the dense layer (0: none does)."""
    budget = dense_params(out_features, in_features, dense_bias) - (out_features if pair_bias else 0) - 1
    rank = max(0, budget) // (in_features + out_features)
    return min(rank, out_features, in_features) // MULTIPLE * MULTIPLE


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """The paper's rank for a parameter ratio: ``ceil(ratio * out*in / (out+in))`` rounded down to a multiple of 8."""
    rank = math.ceil(ratio * out_features * in_features / (out_features + in_features) - 1e-9)
    return rank // MULTIPLE * MULTIPLE


def rank_for_energy(spectrum: torch.Tensor, fraction: float) -> int:
    """The smallest rank whose leading spectrum values sum to ``fraction`` of the total, rounded up to a multiple of 8.

    ``spectrum`` is sorted in descending order: eigenvalues of an output
    covariance, or squared singular values.
    """
    values = spectrum.double().clamp_min(0)
    total = float(values.sum())
    if total <= 0:
        return MULTIPLE
    cumulative = torch.cumsum(values, 0) / total
    rank = int(torch.searchsorted(cumulative, torch.tensor(fraction - 1e-12, dtype=torch.float64))) + 1
    return -(-min(rank, values.numel()) // MULTIPLE) * MULTIPLE


@dataclass
class Factorization:
    """One layer's factors up to ``max_rank``, most important first: truncating to r keeps the first r.

    ``left`` (out x R) and ``right`` (R x in) give ``B = left[:, :r]`` and
    ``A = right[:r]``. The bias is ``bias + left[:, :r] @ bias_coef[:r]``
    (feature: ``bias = mu`` and ``bias_coef = Q^T (b - mu)``; svd/asvd: the
    dense bias, no coefficients). ``spectrum`` holds every eigenvalue or
    squared singular value, descending, for the energy allocation.
    """

    left: torch.Tensor
    right: torch.Tensor
    bias: torch.Tensor | None
    bias_coef: torch.Tensor | None
    spectrum: torch.Tensor

    @property
    def max_rank(self) -> int:
        return int(self.right.shape[0])

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(A, B, bias)`` of the rank-``rank`` pair."""
        if not 0 < rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside 1..{self.max_rank}")
        a = self.right[:rank]
        b = self.left[:, :rank]
        bias = self.bias
        if self.bias_coef is not None:
            bias = torch.addmv(self.bias.float(), b.float(), self.bias_coef[:rank].float()).to(self.bias.dtype)
        return a, b, bias

    def to(self, *args, **kwargs) -> "Factorization":
        def move(t):
            return None if t is None else t.to(*args, **kwargs)

        return Factorization(move(self.left), move(self.right), move(self.bias), move(self.bias_coef), self.spectrum)


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd_factorization(weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> Factorization:
    """Truncated SVD of ``weight`` (out x in), factors up to ``rank``."""
    w = weight.float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    left, right = _balanced(u, s, vh, rank)
    return Factorization(left, right, None if bias is None else bias.float(), None, s.pow(2))


def asvd_factorization(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, input_abs_mean: torch.Tensor,
                       alpha: float = 0.5) -> Factorization:
    """SVD of ``W diag(s)`` with ``s = input_abs_mean ** alpha``, the scaling undone on the right factor."""
    scale = input_abs_mean.float().clamp_min(1e-6).pow(alpha)
    u, s, vh = torch.linalg.svd(weight.float() * scale[None, :], full_matrices=False)
    left, right = _balanced(u, s, vh, rank)
    return Factorization(left, right / scale[None, :], None if bias is None else bias.float(), None, s.pow(2))


def feature_factorization(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, covariance: torch.Tensor,
                          mean: torch.Tensor) -> Factorization:
    """Top eigenvectors of the output covariance; factors up to ``rank``, bias corrected by the mean output."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.float())
    order = torch.argsort(eigenvalues, descending=True)
    q = eigenvectors[:, order[:rank]]
    mu = mean.float()
    shift = mu if bias is None else mu - bias.float()
    # b' = Q_r Q_r^T b + (I - Q_r Q_r^T) mu = mu - Q_r Q_r^T (mu - b)
    return Factorization(q, q.t() @ weight.float(), mu, -(q.t() @ shift), eigenvalues[order])


# ---------------------------------------------------------------- the methods' entries (workbench.lowrank.family.METHODS)
# fn(weight, bias, rank, stats, options) -> Factorization, where ``stats`` holds the statistics the method's
# row asks for, by name, and ``options`` the step's settings.


def svd_method(weight, bias, rank: int, stats: dict, options: dict) -> Factorization:
    return svd_factorization(weight, bias, rank)


def asvd_method(weight, bias, rank: int, stats: dict, options: dict) -> Factorization:
    return asvd_factorization(weight, bias, rank, stats["abs_mean"], options["asvd_alpha"])


def feature_method(weight, bias, rank: int, stats: dict, options: dict) -> Factorization:
    covariance, mean = stats["covariance"]
    return feature_factorization(weight, bias, rank, covariance, mean)


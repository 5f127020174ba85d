"""Statistics a layer sweep gathers from a layer's linears: observers with a small protocol.

An observer is made for one tensor (a linear's input, or its output) with
``factory(features, device)``, sees that tensor batch after batch through
``update(x)`` (``x`` is ``(..., features)``) and gives its statistic with
``result()``. Linears that read the same input tensor (q/k/v, gate/up) share
one observer per statistic, so the statistic is computed once
(``workbench.sweep``).

The named statistics below are what the methods here ask for by name; a
method may pass any other factory that follows the protocol.

- ``sq_norm``: the squared l2 norm of every input feature (Wanda);
- ``hessian``: ``X^T X`` over the calibration tokens, float32 (SparseGPT);
- ``abs_mean``: the mean absolute value of every input feature (ASVD);
- ``moments``: mean, mean square and optionally per-head Gram matrices of an
  input (width pruning's channel and head scores, FLAP's fluctuation);
- ``covariance`` (outputs): the pooled output covariance and mean of the
  feature method (Ji et al., 2024).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Protocol

import torch

GROUP = 32  # samples per pooled group of OutputCovariance


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...

    def result(self) -> Any: ...


Factory = Callable[[int, torch.device], Observer]


@contextmanager
def _exact_tf32(x: torch.Tensor):
    """TF32 matmuls where they are exact: 16-bit inputs fit TF32's 10-bit mantissa, and sums stay float32."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = before


class SquaredNorm:
    """Sum over the tokens of every input feature's square (Wanda's ``||X_j||^2``)."""

    def __init__(self, features: int, device):
        self.value = torch.zeros(features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.value += x.pow(2).sum(0)

    def result(self) -> torch.Tensor:
        return self.value


class Hessian:
    """``X^T X`` over the tokens, in float32 (the exact TF32 path on a GPU with 16-bit activations)."""

    def __init__(self, features: int, device):
        self.value = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x16 = x
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        with _exact_tf32(x16):
            self.value.addmm_(x.t(), x)

    def result(self) -> torch.Tensor:
        return self.value


class InputAbsMean:
    """Mean absolute value of each input feature over the calibration tokens (ASVD's scaling)."""

    def __init__(self, features: int, device):
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.total += x.float().abs().sum(0).double()
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return (self.total / max(1, self.tokens)).float()


class InputMoments:
    """Sums over the calibration tokens of one linear's input: per channel, and per-head Gram matrices.

    ``heads``: the input is ``heads`` equal slices (an attention output before
    ``o_proj``); the Gram matrix of each head's slice is kept as well.
    """

    def __init__(self, features: int, device, heads: int = 0):
        self.tokens = 0
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.squares = torch.zeros(features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(heads, features // heads, features // heads, device=device) if heads else None

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.total += x.sum(0).double()
        self.squares += x.pow(2).sum(0).double()
        if self.gram is not None:
            per_head = x.view(x.shape[0], self.gram.shape[0], -1)
            self.gram += torch.einsum("thd,the->hde", per_head, per_head)

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / self.tokens).float()

    @property
    def variance(self) -> torch.Tensor:
        """Each feature's variance over the tokens (FLAP's fluctuation)."""
        return (self.squares / self.tokens - (self.total / self.tokens) ** 2).clamp_min(0).float()

    @property
    def norm(self) -> torch.Tensor:
        """Each feature's l2 norm over the tokens (Wanda's activation norm)."""
        return self.squares.sqrt().float()

    def result(self) -> "InputMoments":
        return self


class OutputCovariance:
    """Pooled covariance and mean of a linear's outputs over the calibration samples.

    Follows the feature method's reference code (Ji et al., 2024): each
    calibration sample's outputs (its tokens are the observations) are merged
    into a running covariance and mean with the unbiased pairwise formula
    (Chan et al.), and every ``group`` samples (32) that group's covariance and
    mean are folded into an equal-weight average of groups and the running
    statistics restart. 1,024 samples give 32 pooled groups. Pooling bounds the
    weight a group of unusual samples can have and keeps the float32 sums short.
    """

    def __init__(self, features: int, device, group: int = GROUP):
        self.group = group
        self.features = features
        self.device = torch.device(device)
        self.groups = 0
        self.pooled_cov = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.pooled_mean = torch.zeros(features, dtype=torch.float32, device=device)
        self._reset()

    def _reset(self) -> None:
        self.samples = 0  # in the current group
        self.count = 0  # observations (tokens) in the current group
        self.mean = torch.zeros(self.features, dtype=torch.float32, device=self.device)
        self.m2 = torch.zeros(self.features, self.features, dtype=torch.float32, device=self.device)

    def update(self, outputs: torch.Tensor) -> None:
        """Outputs of a batch, ``(batch, tokens, features)``, or of one sample, ``(tokens, features)``."""
        if outputs.dim() == 2:
            outputs = outputs[None]
        for sample in outputs.reshape(outputs.shape[0], -1, outputs.shape[-1]):
            self._add_sample(sample.float())

    def _add_sample(self, y: torch.Tensor) -> None:
        n_b = y.shape[0]
        mean_b = y.mean(0)
        centered = y - mean_b
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        # M2 = M2_a + M2_b + delta delta^T n_a n_b / n: the unbiased merge of two sets' scatter matrices
        self.m2.addmm_(centered.t(), centered)
        self.m2.addr_(delta, delta, alpha=n_a * n_b / n)
        self.mean.add_(delta, alpha=n_b / n)
        self.count = n
        self.samples += 1
        if self.samples == self.group:
            self._fold()

    def _fold(self) -> None:
        if self.count >= 2:
            cov = self.m2 / (self.count - 1)
            k = self.groups
            self.pooled_cov.mul_(k / (k + 1)).add_(cov, alpha=1 / (k + 1))
            self.pooled_mean.mul_(k / (k + 1)).add_(self.mean, alpha=1 / (k + 1))
            self.groups += 1
        self._reset()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(covariance, mean)`` pooled over the groups; a last, incomplete group counts as one group."""
        if self.samples:
            self._fold()
        return self.pooled_cov, self.pooled_mean


INPUT_STATISTICS: dict[str, Factory] = {"sq_norm": SquaredNorm, "hessian": Hessian, "abs_mean": InputAbsMean,
                                        "moments": InputMoments}
OUTPUT_STATISTICS: dict[str, Factory] = {"covariance": OutputCovariance}


def statistic(name: str, on: str = "input") -> Factory:
    table = INPUT_STATISTICS if on == "input" else OUTPUT_STATISTICS
    if name not in table:
        raise KeyError(f"no {on} statistic {name!r}; known: {', '.join(table)}")
    return table[name]


__all__ = ["Observer", "Factory", "SquaredNorm", "Hessian", "InputAbsMean", "InputMoments", "OutputCovariance",
           "INPUT_STATISTICS", "OUTPUT_STATISTICS", "statistic"]

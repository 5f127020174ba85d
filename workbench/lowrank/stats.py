"""Calibration statistics of linear layers: pooled output covariance and mean, mean absolute input.

``OutputStats`` follows the feature method's reference code (Ji et al., 2024):
each calibration sample's outputs (its tokens are the observations) are merged
into a running covariance and mean with the unbiased pairwise formula (Chan et
al.), and every ``group`` samples (32) that group's covariance and mean are
folded into an equal-weight average of groups and the running statistics
restart. 1,024 samples give 32 pooled groups. Pooling bounds the weight a
group of unusual samples can have and keeps the float32 sums short.

``collect`` hooks the linears of one decoder layer and runs the layer over
every calibration batch, so a layer's statistics cost one forward pass.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

GROUP = 32  # samples per pooled group


class OutputStats:
    """Pooled covariance and mean of one linear layer's outputs over the calibration samples."""

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

    def add(self, outputs: torch.Tensor) -> None:
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


class InputAbsMean:
    """Mean absolute value of each input feature over the calibration tokens (ASVD's scaling)."""

    def __init__(self, features: int, device):
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.total += x.float().abs().sum(0).double()
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return (self.total / max(1, self.tokens)).float()


@contextmanager
def hooked(modules: dict[str, nn.Module], outputs: bool, inputs: bool, device):
    """Statistics of ``modules`` (name -> linear) while the block runs: yields ``{name: (OutputStats, InputAbsMean)}``.

    Either statistic is None when not asked for.
    """
    from workbench.models import weight_matrix

    stats: dict[str, tuple] = {}
    handles = []
    for name, module in modules.items():
        out_features, in_features = weight_matrix(module).shape
        entry = (OutputStats(out_features, device) if outputs else None, InputAbsMean(in_features, device) if inputs else None)
        stats[name] = entry

        def hook(mod, args, out, entry=entry):
            if entry[0] is not None:
                entry[0].add(out.detach())
            if entry[1] is not None:
                entry[1].add(args[0].detach())

        handles.append(module.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect(runner, layer: nn.Module, index: int, modules: dict[str, nn.Module], *, outputs: bool, inputs: bool,
            propagate: bool) -> dict[str, tuple]:
    """Run decoder layer ``index`` over every calibration batch with ``modules`` hooked.

    With ``propagate`` the layer's outputs replace the stored inputs (the
    next layer's inputs, from this same dense pass); without, the inputs are
    left for a second pass after the layer is compressed.
    """
    with hooked(modules, outputs, inputs, runner.device) as stats:
        if propagate:
            runner.propagate(layer, index)
        else:
            for b in range(len(runner.captured.hidden)):
                runner._forward_batch(layer, index, b)
    return stats

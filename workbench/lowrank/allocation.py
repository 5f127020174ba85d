"""Which linears are compressed, what a rank allocation costs, and the three ways to allocate ranks.

The parameter budget counts every linear of every decoder layer, weights and
biases (the feature method adds a bias where the dense layer had none; it is
counted). ``retention`` is the fraction of that total an allocation keeps. A
rank of 0 in an allocation means "left dense": the rank rule gave no saving.

- ``uniform``: one ratio for every compressible linear, the largest whose
  allocation stays within the budget.
- ``energy``: per linear, the smallest rank keeping a fraction of its
  spectrum; the fraction is given or solved for the budget.
- ``search`` (``scale_to_budget``): a trial proposes relative ratios (one per
  module type, or one per decoder layer); they are scaled by the largest factor
  that keeps the allocation within the budget, each clipped to the search
  bounds, so every evaluated allocation lies just below the target by
  construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from workbench.errors import UserError

from .factor import MULTIPLE, dense_params, max_saving_rank, pair_params, rank_for_energy, rank_for_ratio

# Module types of the paper's search space. Value projections and fused
# query-key-value matrices (which hold the values) stay dense, as in the paper.
MODULE_TYPES = ("qk", "o", "gate", "up", "down")
_LEAF_TYPES = {
    "q_proj": "qk", "k_proj": "qk",
    "o_proj": "o", "out_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up", "fc1": "up", "c_fc": "up", "dense_h_to_4h": "up", "gate_up_proj": "up",
    "down_proj": "down", "fc2": "down", "dense_4h_to_h": "down",
}


def module_type(name: str) -> str | None:
    """The search-space type of a linear named relative to its decoder layer, or None to keep it dense."""
    parts = name.split(".")
    leaf = parts[-1]
    if leaf in _LEAF_TYPES:
        return _LEAF_TYPES[leaf]
    if leaf in ("c_proj", "dense"):  # GPT-2 / GPT-NeoX / Phi reuse these names for the attention output and the MLP output
        return "down" if any(p in ("mlp", "ffn") for p in parts[:-1]) else "o"
    return None


@dataclass(frozen=True)
class Target:
    """One compressible linear: decoder layer, name within it, type, shape and biases."""

    layer: int
    name: str
    kind: str
    out_features: int
    in_features: int
    dense_bias: bool
    pair_bias: bool

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def dense(self) -> int:
        return dense_params(self.out_features, self.in_features, self.dense_bias)

    @property
    def max_rank(self) -> int:
        return max_saving_rank(self.out_features, self.in_features, self.dense_bias, self.pair_bias)

    def params(self, rank: int) -> int:
        return self.dense if rank == 0 else pair_params(self.out_features, self.in_features, rank, self.pair_bias)

    def rank_for_ratio(self, ratio: float) -> int:
        """The paper's rank for ``ratio`` (at least 8), or 0 when that rank saves no parameters."""
        rank = max(MULTIPLE, rank_for_ratio(self.out_features, self.in_features, ratio))
        return rank if rank <= self.max_rank else 0


class Budget:
    """The decoder's linear parameters: the compressible targets and the total an allocation is measured against."""

    def __init__(self, targets: list[Target], total: int):
        self.targets = targets
        self.total = total  # every decoder linear, dense
        self.fixed = total - sum(t.dense for t in targets)  # linears that are never compressed

    @classmethod
    def of(cls, adapter, pair_bias: bool) -> "Budget":
        """The budget of a model: ``pair_bias`` says whether every pair carries a bias (the feature method's mean correction)."""
        from workbench.models import weight_matrix

        targets, total = [], 0
        for i, layer in enumerate(adapter.layers):
            for name, module in adapter.linear_modules(layer).items():
                out_features, in_features = weight_matrix(module).shape
                has_bias = getattr(module, "bias", None) is not None
                total += dense_params(out_features, in_features, has_bias)
                kind = module_type(name)
                if kind is not None:
                    targets.append(Target(i, name, kind, int(out_features), int(in_features), has_bias, pair_bias or has_bias))
        if not targets:
            raise UserError("the model has no linear layer low-rank compression applies to",
                            "low-rank steps compress attention query/key/output and MLP projections")
        return cls(targets, total)

    def params(self, ranks: dict[str, int]) -> int:
        return self.fixed + sum(t.params(ranks.get(t.key, 0)) for t in self.targets)

    def retained(self, ranks: dict[str, int]) -> float:
        return self.params(ranks) / self.total

    def ranks_for(self, ratio_of: Callable[[Target], float]) -> dict[str, int]:
        return {t.key: t.rank_for_ratio(ratio_of(t)) for t in self.targets}

    def check_reachable(self, retention: float, floor_ranks: dict[str, int], what: str) -> None:
        floor = self.retained(floor_ranks)
        if floor > retention:
            raise UserError(f"retention {retention:.3f} is out of reach: {what} keeps {floor:.3f} of the decoder's linear parameters",
                            f"ask for a retention of at least {floor:.3f} (value projections stay dense)")


def _largest(feasible: Callable[[float], bool], lo: float, hi: float, steps: int = 50) -> float:
    """The largest x in [lo, hi] with ``feasible(x)`` (monotone: true below some point), by bisection."""
    if feasible(hi):
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def uniform_ranks(budget: Budget, retention: float) -> tuple[float, dict[str, int]]:
    """The largest single ratio whose allocation keeps at most ``retention``; returns it and its ranks."""
    budget.check_reachable(retention, {t.key: MULTIPLE if t.max_rank else 0 for t in budget.targets}, "rank 8 everywhere")
    ratio = _largest(lambda r: budget.retained(budget.ranks_for(lambda t: r)) <= retention, 0.0, 1.0)
    return ratio, budget.ranks_for(lambda t: ratio)


def energy_ranks(budget: Budget, spectra: dict, retention: float,
                 fraction: float | None = None) -> tuple[float, dict[str, int]]:
    """Per linear, the smallest rank keeping ``fraction`` of its spectrum (solved for ``retention`` when None)."""

    def ranks(e: float) -> dict[str, int]:
        out = {}
        for t in budget.targets:
            rank = rank_for_energy(spectra[t.key], e) if t.max_rank else 0
            out[t.key] = rank if rank <= t.max_rank else 0
        return out

    if fraction is None:
        budget.check_reachable(retention, ranks(1e-9), "keeping the first 8 directions of every layer")
        fraction = _largest(lambda e: budget.retained(ranks(e)) <= retention, 0.0, 1.0)
    return fraction, ranks(fraction)


@dataclass
class Space:
    """A search space: parameter names, the group each target belongs to, and the ratio bounds."""

    kind: str  # "type" or "layer"
    names: list[str]
    group_of: Callable[[Target], str]
    low: float
    high: float

    def signature(self) -> list:
        return [self.kind, self.names, self.low, self.high]

    def ranks(self, budget: "Budget", ratios: dict[str, float]) -> dict[str, int]:
        """The allocation of one ratio per group."""
        return budget.ranks_for(lambda t: ratios[self.group_of(t)])


def search_space(budget: Budget, kind: str, low: float, high: float) -> Space:
    if kind == "type":
        present = {t.kind for t in budget.targets}
        return Space(kind, [k for k in MODULE_TYPES if k in present], lambda t: t.kind, low, high)
    layers = sorted({t.layer for t in budget.targets})
    width = len(str(layers[-1]))
    return Space(kind, [f"layer_{i:0{width}d}" for i in layers], lambda t, w=width: f"layer_{t.layer:0{w}d}", low, high)


def scale_to_budget(budget: Budget, space: Space, proposal: dict[str, float],
                    retention: float) -> tuple[dict[str, float], dict[str, int], float]:
    """Scale a proposal of relative ratios to the budget: ``(ratios, ranks, retained)``.

    Each ratio becomes ``clip(s * proposal, low, high)`` with the largest
    ``s`` whose allocation retains at most ``retention`` (retained parameters
    grow with ``s``). The caller rejects the rare allocation that falls more
    than the slack below the target (a rank step larger than the slack).
    """

    def ratios(s: float) -> dict[str, float]:
        return {n: min(space.high, max(space.low, s * proposal[n])) for n in space.names}

    def ranks(s: float) -> dict[str, int]:
        return space.ranks(budget, ratios(s))

    top = space.high / min(proposal[n] for n in space.names)
    scale = _largest(lambda s: budget.retained(ranks(s)) <= retention, 0.0, top)
    chosen = ranks(scale)
    return ratios(scale), chosen, budget.retained(chosen)

"""The pruning family: the ``prune`` step, its settings and its table of methods. No torch.

A pruning method is one row of ``METHODS``: the statistics it needs on each
linear's input (``workbench.observers``), the comparison scopes it supports,
whether linears that read the same input are pruned as one stacked matrix,
and the function that prunes (``"module:function"``, imported when a run uses
it; see ``workbench.pruning.methods`` for its contract). Adding a method is a
module with that function and a row here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workbench.errors import UserError
from workbench.registry import PlannedStage, StepType, register
from workbench.spec.checks import choice
from workbench.spec.fields import setting


@dataclass(frozen=True)
class PruneMethod:
    name: str
    prune: str  # "module:function" (see workbench.pruning.methods)
    statistics: tuple[str, ...] = ()  # observers on each linear input: "sq_norm" (Wanda), "hessian" (SparseGPT)
    scopes: tuple[str, ...] = ("row",)  # where weights compete: per output row, or across the matrix; the first is the default
    joint: bool = False  # linears reading one input are pruned as one stacked matrix (SparseGPT's q/k/v, gate/up)
    help: str = ""


METHODS: dict[str, PruneMethod] = {m.name: m for m in (
    PruneMethod("magnitude", "workbench.pruning.methods:magnitude", scopes=("matrix", "row"),
                help="|W|, the smallest weights go (across each matrix, or per row)"),
    PruneMethod("wanda", "workbench.pruning.methods:wanda", statistics=("sq_norm",),
                help="|W| times the input feature's l2 norm, within each output row (Sun et al., 2024)"),
    PruneMethod("sparsegpt", "workbench.pruning.methods:sparsegpt", statistics=("hessian",), joint=True,
                scopes=("matrix", "row"),
                help="OBS with lazy batch updates: prune and update the remaining weights (Frantar & Alistarh, 2023)"),
    PruneMethod("ria", "workbench.pruning.ria:prune", statistics=("sq_norm",),
                help="relative importance (|W| over its row's and its column's totals) times the input norm ** 0.5, "
                     "within each output row (Zhang et al., 2024)"),
    PruneMethod("random", "workbench.pruning.random:prune", scopes=("row", "matrix"),
                help="uniformly random weights, seeded by calibration.seed: the floor a method has to beat"),
)}
PRUNE_METHODS = tuple(METHODS)
ALLOCATIONS = ("uniform", "owl")
SCOPES = ("row", "matrix")
COMMON_PATTERNS = ("unstructured", "2:4", "4:8")

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_OWL = ("allocation", ("owl",))
_SPARSEGPT = ("method", ("sparsegpt",))


@dataclass
class PruneStep:
    """Remove individual weights (magnitude, Wanda, SparseGPT), unstructured or N:M."""

    method: str = setting("wanda", help="how weights are scored: " + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()),
                          choices=PRUNE_METHODS)
    sparsity: float = setting(0.5, help="fraction of each layer's weights removed, in [0, 1)",
                              when=("pattern", ("unstructured",)))
    pattern: str = setting("unstructured", help="unstructured, or N:M such as 2:4 (N of every M consecutive weights pruned)",
                           choices=COMMON_PATTERNS, open=True)
    allocation: str = setting("uniform", help="uniform: every layer at the target; owl: per-layer sparsity from outlier ratios",
                              choices=ALLOCATIONS)
    owl_m: float = setting(5.0, help="OWL: a weight is an outlier above M times its layer's mean score", when=_OWL)
    owl_lambda: float = setting(0.08, help="OWL: layer sparsities spread over target +- lambda", when=_OWL)
    scope: str | None = setting(None, help="where weights compete. magnitude: matrix (default) or row; sparsegpt: matrix "
                                           "(default: one threshold per 128-column block of each matrix, as the paper) or "
                                           "row (every row at the same count); random: row (default) or matrix; "
                                           "wanda and ria compare within rows",
                                choices=SCOPES, when=("method", ("magnitude", "sparsegpt", "random")))
    include_lm_head: bool = setting(False, help="also prune the LM head (not when it shares the embeddings' weights)")
    blocksize: int = setting(128, help="SparseGPT: columns solved per lazy batch update", when=_SPARSEGPT)
    percdamp: float = setting(0.01, help="SparseGPT: dampening added to the Hessian's diagonal, as a fraction of its mean",
                              when=_SPARSEGPT)
    type: str = "prune"

    @property
    def nm(self) -> tuple[int, int] | None:
        match = _NM.match(self.pattern)
        return (int(match.group(1)), int(match.group(2))) if match else None

    def label(self) -> str:
        alloc = f"{self.allocation}-" if self.allocation != "uniform" else ""
        what = self.pattern if self.nm else f"{self.sparsity:.0%}"
        return f"{alloc}{self.method} {what}"

    def validate(self, where: str = "step") -> None:
        validate_prune_step(self, where)


def validate_prune_step(step: PruneStep, where: str = "step") -> None:
    """The checks the preset validator and the TUI's inline validation share."""
    choice(f"{where}.method", step.method, PRUNE_METHODS)
    choice(f"{where}.allocation", step.allocation, ALLOCATIONS)
    method = METHODS[step.method]
    if step.scope is not None:
        choice(f"{where}.scope", step.scope, SCOPES)
        if step.scope not in method.scopes:
            raise UserError(f"{where}.scope = {step.scope!r} does not apply to {step.method}",
                            f"{step.method} compares weights per {' or '.join(method.scopes)}; remove scope")
    if step.pattern != "unstructured":
        nm = step.nm
        if nm is None:
            raise UserError(f"{where}.pattern = {step.pattern!r} is not a pattern",
                            "allowed: unstructured, or N:M such as 2:4 (N of every M weights pruned)")
        n, mm = nm
        if not (0 < n < mm):
            raise UserError(f"{where}.pattern = {step.pattern!r}: N:M needs 0 < N < M", "for example 2:4 or 4:8")
        if step.allocation != "uniform":
            raise UserError(f"{where}: allocation {step.allocation!r} cannot be combined with an N:M pattern",
                            "N:M fixes the sparsity of every layer at N/M; use allocation = \"uniform\"")
    elif not (0.0 <= step.sparsity < 1.0):
        raise UserError(f"{where}.sparsity = {step.sparsity} is outside [0, 1)", "give the fraction of weights to remove, e.g. 0.5 for 50%")
    if step.allocation == "owl":
        if step.owl_m <= 0:
            raise UserError(f"{where}.owl_m = {step.owl_m} must be positive", "the OWL paper uses M = 5")
        if not (0 <= step.owl_lambda < 0.5):
            raise UserError(f"{where}.owl_lambda = {step.owl_lambda} must be in [0, 0.5)", "the OWL paper uses lambda = 0.08")
        hi = step.sparsity + step.owl_lambda
        lo = step.sparsity - step.owl_lambda
        if hi >= 1.0 or lo < 0.0:
            raise UserError(
                f"{where}: OWL with sparsity {step.sparsity} and lambda {step.owl_lambda} gives layer sparsities outside [0, 1)",
                "lower owl_lambda or the target sparsity",
            )
    if step.blocksize < 1:
        raise UserError(f"{where}.blocksize = {step.blocksize} must be positive", "SparseGPT uses 128")
    if not (0 <= step.percdamp < 1):
        raise UserError(f"{where}.percdamp = {step.percdamp} must be in [0, 1)", "SparseGPT uses 0.01")


def plan(step: PruneStep, index: int, layers: int) -> list[PlannedStage]:
    nm = step.nm
    target = None if step.allocation == "owl" else (nm[0] / nm[1] if nm else step.sparsity)  # OWL: per layer
    return [PlannedStage(f"prune:{index}", f"Pruning: {step.label()}", layers, "sparsity", target)]


register(StepType(
    name="prune", family="pruning", spec=PruneStep, plan=plan,
    runner="workbench.pruning.runner:run_step",
    check="workbench.pruning.runner:check",
    fake="workbench.backends.fake.steps:prune",
    description="Remove individual weights (magnitude, Wanda, SparseGPT), unstructured or N:M.",
    refuses_after=("quantize",),
))

__all__ = ["PruneStep", "PruneMethod", "METHODS", "PRUNE_METHODS", "ALLOCATIONS", "SCOPES", "validate_prune_step", "plan"]

"""The low-rank family: the ``lowrank`` step and its settings. No torch.

A low-rank step replaces decoder linears by pairs of thinner linears (see
``workbench.lowrank``). ``method`` says how a layer is factorized,
``allocation`` how many ranks each layer keeps so that the decoder's linear
layers retain ``retention`` of their parameters, and the ``search`` settings
drive the Optuna study that allocates them by Bayesian optimization.
Checks that need the model (whether the target retention is reachable) run
when the step starts, before any work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workbench.errors import UserError
from workbench.registry import PlannedStage, StepType, register
from workbench.spec.checks import choice
from workbench.spec.fields import setting



@dataclass(frozen=True)
class LowRankMethod:
    """One factorization: the statistics it reads and the function that factorizes a linear.

    ``factorize`` is ``"module:function"``: ``fn(weight, bias, rank, stats, options) -> Factorization``
    (``workbench.lowrank.factor``); ``inputs`` / ``outputs`` name the statistics of each linear's input /
    output it needs (``workbench.observers``); ``pair_bias``: the pair carries a bias of its own.
    """

    name: str
    factorize: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    pair_bias: bool = False
    help: str = ""


METHODS: dict[str, LowRankMethod] = {m.name: m for m in (
    LowRankMethod("svd", "workbench.lowrank.factor:svd_method", help="truncated SVD of the weight"),
    LowRankMethod("asvd", "workbench.lowrank.factor:asvd_method", inputs=("abs_mean",),
                  help="SVD of the weight scaled by the inputs' mean |x| ** alpha (Yuan et al., 2023)"),
    LowRankMethod("feature", "workbench.lowrank.factor:feature_method", outputs=("covariance",), pair_bias=True,
                  help="top eigenvectors of the pooled output covariance, the mean output kept (Ji et al., 2024)"),
)}
LOWRANK_METHODS = tuple(METHODS)
LOWRANK_ALLOCATIONS = ("uniform", "energy", "search")
SEARCH_SPACES = ("type", "layer")
SEARCH_SAMPLERS = ("gp", "tpe")
OBJECTIVE_DATA = ("wikitext2", "c4")
# Relational databases Optuna's RDB storage talks to (SQLAlchemy dialects, with an optional driver: postgresql+psycopg2).
RDB_SCHEMES = ("postgresql", "mysql", "sqlite")

_SCHEME = re.compile(r"^([a-z][a-z0-9]*)(\+[a-z0-9_]+)?://")
_SEARCH = ("allocation", ("search",))


@dataclass
class LowRankStep:
    """Factorize decoder linears into low-rank pairs (Ji et al., EMNLP 2024 Findings, and its baselines)."""

    method: str = setting("feature", choices=LOWRANK_METHODS,
                          help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()))
    retention: float = setting(0.8, help="fraction of the decoder's linear parameters kept, in (0, 1]")
    allocation: str = setting("uniform", choices=LOWRANK_ALLOCATIONS, help="uniform | energy | search")
    energy: float | None = setting(None, when=("allocation", ("energy",)),
                                   help="energy: the spectrum fraction each layer keeps; None solves it for retention")
    space: str = setting("type", choices=SEARCH_SPACES, when=_SEARCH,
                         help='search: "type" (q/k, o, gate, up, down ratios shared by all layers) or "layer" (one per layer)')
    trials: int = setting(50, when=_SEARCH, help="search: evaluated trials in the study")
    sampler: str = setting("gp", choices=SEARCH_SAMPLERS, when=_SEARCH, help="search: gp (Gaussian process) | tpe")
    seed: int = setting(0, help="the search's sampler seed")
    ratio_min: float = setting(0.2, when=_SEARCH, help="search: lower bound of each ratio")
    ratio_max: float = setting(1.0, when=_SEARCH, help="search: upper bound of each ratio")
    slack: float = setting(0.1, when=_SEARCH, help="search: an allocation must retain between retention - slack and retention")
    objective_data: str = setting("wikitext2", choices=OBJECTIVE_DATA, when=_SEARCH,
                                  help="search objective text: wikitext2 (validation split) | c4 (validation documents not used by evaluation)")
    objective_chunks: int = setting(8, when=_SEARCH, help="number of text chunks the objective reads")
    objective_seqlen: int = setting(256, when=_SEARCH, help="tokens per chunk")
    kl_weight: float = setting(1e-3, when=_SEARCH, help="objective = perplexity + kl_weight * KL(compressed || dense)")
    finalists: int = setting(1, when=_SEARCH,
                             help="the best N trials are applied sequentially and re-scored; the best of them is kept")
    storage: str | None = setting(None, when=_SEARCH,
                                  help="None: a journal file in the run's folder; a journal file path; or postgresql://...")
    study: str | None = setting(None, when=_SEARCH,
                                help="study name; None: derived from the spec, so the same preset shares one study")
    workers: int = setting(1, when=_SEARCH,
                           help="search: worker processes (one per GPU where there are GPUs); 1 runs trials in the run's process")
    heartbeat: int = setting(60, when=_SEARCH,
                             help="RDB storage: seconds between a running trial's heartbeats; a trial silent for twice that is retried")
    asvd_alpha: float = setting(0.5, when=("method", ("asvd",)), help="asvd: scale inputs by (mean |x|) ** alpha")
    merge: bool = setting(False, help="multiply the factors back into plain linears (a checkpoint vanilla transformers loads)")
    type: str = "lowrank"

    def label(self) -> str:
        how = {"search": f"search ({self.space}, {self.trials} trials)", "energy": "energy"}.get(self.allocation, "uniform")
        return f"lowrank {self.method} {how} {self.retention:.0%}" + (" merged" if self.merge else "")

    def validate(self, where: str = "step") -> None:
        choice(f"{where}.method", self.method, LOWRANK_METHODS)
        choice(f"{where}.allocation", self.allocation, LOWRANK_ALLOCATIONS)
        choice(f"{where}.space", self.space, SEARCH_SPACES)
        choice(f"{where}.sampler", self.sampler, SEARCH_SAMPLERS)
        choice(f"{where}.objective_data", self.objective_data, OBJECTIVE_DATA)
        if not (0.0 < self.retention <= 1.0):
            raise UserError(f"{where}.retention = {self.retention} is outside (0, 1]",
                            "give the fraction of the decoder's linear parameters to keep, e.g. 0.8 for 80%")
        if self.energy is not None and not (0.0 < self.energy <= 1.0):
            raise UserError(f"{where}.energy = {self.energy} is outside (0, 1]",
                            "give the fraction of each layer's spectrum to keep (e.g. 0.9), or leave it out to meet retention")
        if not (0.0 < self.ratio_min < self.ratio_max <= 1.0):
            raise UserError(f"{where}: ratio_min = {self.ratio_min} and ratio_max = {self.ratio_max} need 0 < ratio_min < ratio_max <= 1",
                            "the paper searches each ratio in [0.2, 1.0]")
        if not (0.0 <= self.slack < 1.0):
            raise UserError(f"{where}.slack = {self.slack} is outside [0, 1)", "the paper accepts allocations up to 0.1 below the target")
        for key, minimum in (("trials", 1), ("objective_chunks", 1), ("objective_seqlen", 2), ("finalists", 1),
                             ("workers", 1), ("heartbeat", 1)):
            value = getattr(self, key)
            if value < minimum:
                raise UserError(f"{where}.{key} = {value} must be at least {minimum}", f"set {where}.{key} to {minimum} or more")
        if self.kl_weight < 0:
            raise UserError(f"{where}.kl_weight = {self.kl_weight} is negative", "the paper weighs the KL divergence by 1e-3")
        if self.asvd_alpha < 0:
            raise UserError(f"{where}.asvd_alpha = {self.asvd_alpha} is negative", "ASVD scales by (mean |x|) ** 0.5")
        if self.study is not None and not self.study.strip():
            raise UserError(f"{where}.study is empty", "give the study a name, or leave it out to derive one from the preset")
        if self.storage is not None:
            check_storage(self.storage, f"{where}.storage")


def check_storage(storage: str, key: str = "storage") -> None:
    """A storage is a database URL Optuna's RDB storage accepts, or a journal file path."""
    if not storage.strip():
        raise UserError(f"{key} is empty", "leave it out for a journal file in the run's folder, or give postgresql://USER@HOST/DB")
    match = _SCHEME.match(storage)
    if match and match.group(1) not in RDB_SCHEMES:
        raise UserError(f"{key} = {storage!r}: '{match.group(1)}' is not a database workbench can keep a study in",
                        f"use {', '.join(s + '://' for s in RDB_SCHEMES)}, or a journal file path")
    if not match and "://" in storage:
        raise UserError(f"{key} = {storage!r} is not a database URL", "write it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE")


def plan(step: LowRankStep, index: int, layers: int) -> list[PlannedStage]:
    """Statistics (energy and search allocations), the search (search), then the sequential application."""
    stage = f"lowrank:{index}"
    stages = []
    if step.allocation in ("energy", "search"):
        stages.append(PlannedStage(f"{stage}:statistics", f"Low-rank statistics and factorizations ({step.method})", layers))
    if step.allocation == "search":
        stages.append(PlannedStage(f"{stage}:search", f"Rank search: {step.trials} trials ({step.sampler}, {step.space} space)",
                                   step.trials))
    title = "Applying the best trial sequentially" if step.allocation == "search" else f"Low-rank: {step.label()}"
    stages.append(PlannedStage(f"{stage}:apply", title, layers, "retained", step.retention))
    return stages


register(StepType(
    name="lowrank", family="lowrank", spec=LowRankStep, plan=plan,
    runner="workbench.lowrank.step:run_step",
    fake="workbench.backends.fake.steps:lowrank",
    structures={"lowrank": "workbench.lowrank.modules:apply_structure"},
    description="Factorize decoder linears into low-rank pairs, with a rank-allocation search.",
))

__all__ = ["LowRankStep", "LowRankMethod", "METHODS", "LOWRANK_METHODS", "LOWRANK_ALLOCATIONS", "SEARCH_SPACES", "SEARCH_SAMPLERS", "OBJECTIVE_DATA",
           "check_storage", "plan"]

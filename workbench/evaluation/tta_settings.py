"""The settings of test-time adaptation (:mod:`workbench.evaluation.tta`) and their checks. No torch: the spec validator uses them."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from workbench.errors import UserError

MODES = ("none", "tent", "pcl")
PARAMS = ("norms", "lora")
HOW = ("dropout", "gaussian")
_WHERE = re.compile(r"^(layers|embeddings|layer:-?\d+)$")


@dataclass
class TTAConfig:
    mode: str = "none"
    steps: int = 1
    lr: float = 1e-2  # Adam; one step per batch of four moves the norms enough to change predictions
    batch: int = 4  # queries per test batch
    episodic: bool = True
    params: str = "norms"
    lora_rank: int = 4
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    where: str = "layers"
    how: str = "dropout"
    strength: float = 0.1
    ce: float = 0.0

    def settings(self) -> dict:
        """Everything but the mode, as a result's ``extra`` records it."""
        return {k: v for k, v in asdict(self).items() if k != "mode"}


def configs_from_spec(e) -> list[TTAConfig]:
    """One TTAConfig per mode of an EvalSpec's ``tta`` (none when empty), with its ``tta_*`` and ``pcl_*`` settings."""
    return [TTAConfig(mode=m, steps=e.tta_steps, lr=e.tta_lr, batch=e.tta_batch, episodic=e.tta_episodic, params=e.tta_params,
                      lora_rank=e.tta_lora_rank, lora_targets=list(e.tta_lora_targets), where=e.pcl_where, how=e.pcl_how,
                      strength=e.pcl_strength, ce=e.pcl_ce)
            for m in (e.tta or ["none"])]


def check(config: TTAConfig, where: str = "evaluate") -> None:
    """Names and ranges (the spec validator calls this with the spec's ``tta_*`` settings)."""
    if config.mode not in MODES:
        raise UserError(f"{where}.tta: {config.mode!r} is not a test-time adaptation mode", f"allowed: {', '.join(MODES)}")
    if config.steps < 0:
        raise UserError(f"{where}.tta_steps = {config.steps} must be 0 or more", "1 step per test batch is the usual setting")
    if not (config.lr >= 0 and math.isfinite(config.lr)):
        raise UserError(f"{where}.tta_lr = {config.lr} must be a finite number >= 0", "try 1e-2 (Adam)")
    if config.batch < 1:
        raise UserError(f"{where}.tta_batch = {config.batch} must be at least 1", "4 queries per test batch is the default")
    if config.params not in PARAMS:
        raise UserError(f"{where}.tta_params = {config.params!r} is not a parameter set", f"allowed: {', '.join(PARAMS)}")
    if config.params == "lora" and (config.lora_rank < 1 or not config.lora_targets):
        raise UserError(f"{where}.tta_lora_rank must be at least 1 and tta_lora_targets not empty",
                        'for example tta_lora_rank = 4, tta_lora_targets = ["q_proj", "v_proj"]')
    if not _WHERE.match(config.where):
        raise UserError(f"{where}.pcl_where = {config.where!r} is not a place to perturb",
                        "layers (every decoder layer's input), layer:N (after layer N) or embeddings")
    if config.how not in HOW:
        raise UserError(f"{where}.pcl_how = {config.how!r} is not a perturbation", f"allowed: {', '.join(HOW)}")
    if not (0 <= config.strength < 1 if config.how == "dropout" else 0 <= config.strength):
        raise UserError(f"{where}.pcl_strength = {config.strength} is out of range",
                        "a dropout rate in [0, 1), or a noise scale >= 0 for gaussian")
    if config.ce < 0:
        raise UserError(f"{where}.pcl_ce = {config.ce} must be 0 or more", "0 leaves the pseudo-label term out")

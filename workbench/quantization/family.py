"""The quantization family: the ``quantize`` step and its settings. No torch.

Weights are quantized layer by layer on the layer sweep (``workbench.quantization.step``):

- ``rtn``: round to nearest, no calibration data;
- ``gptq``: the OBS column sweep with error propagation on each layer's Hessian
  (Frantar et al., 2023), the Hessian SparseGPT reads; with ``sparsity`` or an
  N:M ``pattern`` it prunes and quantizes in one sweep, as the SparseGPT paper does;
- ``awq``: activation-aware per-input-channel scales found by a grid search on
  the calibration statistics, folded into the operation before the linear
  (Lin et al., 2024), then RTN or GPTQ.

Schemes: integer weights of 4 or 8 bits (symmetric or asymmetric, per output
channel or in groups of ``group_size`` inputs) with 16-bit activations
(W4A16, W8A16), or FP8 (E4M3) weights with one scale per output channel. The
embeddings and the LM head stay in 16 bits, as does any linear ``ignore``
names. Weights already zero (an earlier pruning step) stay exactly zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workbench.errors import UserError
from workbench.registry import PlannedStage, StepType, register
from workbench.spec.checks import choice
from workbench.spec.fields import setting

QUANT_METHODS = ("rtn", "gptq", "awq")
BITS = (4, 8)
WEIGHT_TYPES = ("int", "fp8")
AWQ_QUANTIZERS = ("rtn", "gptq")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_GPTQ = ("method", ("gptq",))
_HESSIAN = ("method", ("gptq", "awq"))
_AWQ = ("method", ("awq",))
_INT = ("weights", ("int",))


@dataclass
class QuantizeStep:
    """Quantize the decoder's linear weights (RTN, GPTQ, AWQ): W4A16, W8A16 or FP8, kept in memory dequantized."""

    method: str = setting("gptq", choices=QUANT_METHODS,
                          help="rtn: round to nearest (no data); gptq: column sweep with error compensation on the "
                               "layer's Hessian; awq: activation-aware channel scales, then rtn or gptq")
    weights: str = setting("int", choices=WEIGHT_TYPES, help="int: integer weights of `bits` bits; fp8: FP8 E4M3, one scale per output channel")
    bits: int = setting(4, choices=BITS, help="integer weight bits: 4 (W4A16) or 8 (W8A16)", when=_INT)
    group_size: int = setting(128, help="inputs sharing one scale (and zero point); 0: one per output channel", when=_INT)
    symmetric: bool = setting(True, help="symmetric: zero point 0; asymmetric: a zero point per group", when=_INT)
    ignore: list[str] = setting(default_factory=list, help="linears kept in 16 bits, by name suffix or regular expression "
                                                           "(e.g. down_proj, layers\\.0\\.); the embeddings and LM head always are")
    blocksize: int = setting(128, help="GPTQ: columns per lazy batch update", when=_HESSIAN)
    percdamp: float = setting(0.01, help="GPTQ: dampening added to the Hessian's diagonal, as a fraction of its mean", when=_HESSIAN)
    actorder: bool = setting(False, help="GPTQ: quantize columns in order of decreasing Hessian diagonal (groups stay the "
                                         "original contiguous inputs, their scales fixed up front)", when=_HESSIAN)
    static_groups: bool = setting(False, help="GPTQ: every group's scale from the original weights, before the sweep", when=_HESSIAN)
    sparsity: float = setting(0.0, help="GPTQ: also prune this fraction in the same sweep (SparseGPT's joint mode); 0: none",
                              when=_GPTQ)
    pattern: str = setting("unstructured", choices=("unstructured", "2:4", "4:8"), open=True,
                           help="GPTQ joint pruning: unstructured (at `sparsity`) or N:M", when=_GPTQ)
    awq_grid: int = setting(20, help="AWQ: points of the exponent grid searched for each group's scales", when=_AWQ)
    awq_quantizer: str = setting("rtn", choices=AWQ_QUANTIZERS, help="AWQ: how the scaled weights are quantized", when=_AWQ)
    type: str = "quantize"

    @property
    def nm(self) -> tuple[int, int] | None:
        match = _NM.match(self.pattern)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def scheme(self) -> str:
        if self.weights == "fp8":
            return "FP8"
        group = f" g{self.group_size}" if self.group_size else " per-channel"
        return f"W{self.bits}A16{group}{'' if self.symmetric else ' asym'}"

    @property
    def joint(self) -> bool:
        return self.method == "gptq" and (self.nm is not None or self.sparsity > 0)

    def label(self) -> str:
        what = f"{self.method} {self.scheme}"
        if self.method == "awq" and self.awq_quantizer == "gptq":
            what = f"awq+gptq {self.scheme}"
        if self.joint:
            what += f" + {self.pattern if self.nm else f'{self.sparsity:.0%}'} sparse"
        return what

    def validate(self, where: str = "step") -> None:
        validate_quantize_step(self, where)


def validate_quantize_step(step: QuantizeStep, where: str = "step") -> None:
    """The checks the preset validator and the TUI's inline validation share."""
    choice(f"{where}.method", step.method, QUANT_METHODS)
    choice(f"{where}.weights", step.weights, WEIGHT_TYPES)
    if step.weights == "int" and step.bits not in BITS:
        raise UserError(f"{where}.bits = {step.bits} is not supported", "integer weights take 4 or 8 bits (W4A16, W8A16); "
                        "for 8-bit floating point use weights = \"fp8\"")
    if step.group_size < 0:
        raise UserError(f"{where}.group_size = {step.group_size} must be 0 (per channel) or positive", "128 is the usual group size")
    if step.weights == "fp8" and not step.symmetric:
        raise UserError(f"{where}: FP8 weights are symmetric", "remove symmetric = false")
    if not isinstance(step.ignore, list) or not all(isinstance(x, str) and x.strip() for x in step.ignore):
        raise UserError(f"{where}.ignore must be a list of linear names", 'e.g. ignore = ["down_proj"]')
    for pattern in step.ignore:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"{where}.ignore: {pattern!r} is not a valid regular expression ({exc})", "escape special characters") from None
    if step.blocksize < 1:
        raise UserError(f"{where}.blocksize = {step.blocksize} must be positive", "GPTQ uses 128")
    if not (0 <= step.percdamp < 1):
        raise UserError(f"{where}.percdamp = {step.percdamp} must be in [0, 1)", "GPTQ uses 0.01")
    if step.awq_grid < 2:
        raise UserError(f"{where}.awq_grid = {step.awq_grid} must be at least 2", "AWQ searches 20 points")
    choice(f"{where}.awq_quantizer", step.awq_quantizer, AWQ_QUANTIZERS)
    if step.pattern != "unstructured":
        nm = step.nm
        if nm is None or not (0 < nm[0] < nm[1]):
            raise UserError(f"{where}.pattern = {step.pattern!r} is not a pattern", "unstructured, or N:M with 0 < N < M such as 2:4")
        if step.method != "gptq":
            raise UserError(f"{where}: pruning inside the quantize step needs method = \"gptq\"",
                            "or add a prune step before the quantize step")
        if step.sparsity not in (0.0, nm[0] / nm[1]):
            raise UserError(f"{where}.sparsity = {step.sparsity} conflicts with pattern {step.pattern}", "leave sparsity out with N:M")
    if not (0.0 <= step.sparsity < 1.0):
        raise UserError(f"{where}.sparsity = {step.sparsity} is outside [0, 1)", "the fraction of weights pruned in the same sweep, or 0")
    if step.sparsity and step.method != "gptq":
        raise UserError(f"{where}: pruning inside the quantize step needs method = \"gptq\"",
                        "or add a prune step before the quantize step")


def plan(step: QuantizeStep, index: int, layers: int) -> list[PlannedStage]:
    return [PlannedStage(f"quantize:{index}", f"Quantizing: {step.label()}", layers, "qerror")]


register(StepType(
    name="quantize", family="quantization", spec=QuantizeStep, plan=plan,
    runner="workbench.quantization.step:run_step",
    check="workbench.quantization.step:check",
    fake="workbench.backends.fake.steps:quantize",
    description="Quantize the linear weights (RTN, GPTQ, AWQ) to W4A16, W8A16 or FP8; exports in the compressed-tensors format.",
    refuses_after=("quantize",),
))

__all__ = ["QuantizeStep", "QUANT_METHODS", "BITS", "WEIGHT_TYPES", "validate_quantize_step", "plan"]

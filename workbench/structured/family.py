"""The structured family: ``depth``, ``width`` and ``vocab`` steps and their settings. No torch.

Each step makes the model physically smaller: ``depth`` removes whole decoder
layers, ``width`` removes MLP channels and attention heads, ``vocab`` removes
rarely used tokens from the tokenizer, the embeddings and the LM head. The
runners are in ``workbench.structured.step``; what needs the model (how many
layers it has, its grouped-query layout, its tokenizer) is checked right after
loading (``workbench.structured.step.check``), before any step runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.data.sources import check_text_source
from workbench.errors import UserError
from workbench.registry import PlannedStage, StepType, register
from workbench.spec.checks import choice, fraction as _fraction, one_of as _one_of
from workbench.spec.fields import setting

DEPTH_CRITERIA = ("block_influence", "angular", "perplexity", "last", "random")
DEPTH_SELECTIONS = ("lowest", "middle")
WIDTH_METHODS = ("random", "magnitude", "activation", "flap")
WIDTH_ALLOCATIONS = ("uniform", "global")
# A byte-level tokenizer needs its 256 byte tokens to encode any text.
BYTE_ALPHABET = 256


@dataclass
class DepthStep:
    """Remove whole decoder layers (ShortGPT, OpenBA-V2, "The Unreasonable Ineffectiveness of the Deeper Layers")."""

    remove: int | None = setting(None, help="how many decoder layers to remove")
    fraction: float | None = setting(None, help="or this fraction of the layers (rounded to the nearest count)")
    criterion: str = setting("block_influence", choices=DEPTH_CRITERIA,
                             help="block_influence: 1 - cos(input, output); angular: n consecutive layers; "
                                  "perplexity: exact, costly; last; random")
    selection: str = setting("lowest", choices=DEPTH_SELECTIONS,
                             help="lowest: the least important layers; middle: non-adjacent layers, never the first or last")
    seed: int = setting(0, when=("criterion", ("random",)), help='criterion = "random"')
    type: str = "depth"

    def label(self) -> str:
        what = f"{self.remove} layer{'s' * (self.remove != 1)}" if self.remove is not None else f"{self.fraction:.0%} of layers"
        how = self.criterion.replace("_", " ") + (", non-consecutive middle" if self.selection == "middle" else "")
        return f"depth: remove {what} ({how})"

    def validate(self, where: str = "step") -> None:
        _one_of(where, "remove", self.remove, "fraction", self.fraction)
        if self.remove is not None and self.remove < 1:
            raise UserError(f"{where}.remove = {self.remove} must be at least 1", "give the number of decoder layers to remove")
        if self.fraction is not None:
            _fraction(f"{where}.fraction", self.fraction, "a fraction of 1 or more removes every layer; ShortGPT removes about 0.25")
        choice(f"{where}.criterion", self.criterion, DEPTH_CRITERIA)
        choice(f"{where}.selection", self.selection, DEPTH_SELECTIONS)
        if self.criterion == "angular" and self.selection == "middle":
            raise UserError(f"{where}: criterion 'angular' removes one block of consecutive layers, so selection 'middle' does not apply",
                            "use selection = \"lowest\" with angular, or criterion = \"block_influence\" with middle")
        if self.criterion == "last" and self.selection == "middle":
            raise UserError(f"{where}: criterion 'last' removes the last layers, so selection 'middle' does not apply",
                            "use selection = \"lowest\"")


@dataclass
class WidthStep:
    """Remove MLP channels and attention heads (FLAP, Wanda-sp, Sheared-LLaMA's random baseline)."""

    mlp_width: float = setting(1.0, help="fraction of each MLP's intermediate channels kept, in (0, 1]")
    attention_width: float = setting(1.0, help="fraction of attention heads kept, rounded to whole key/value groups")
    attention_heads: int | None = setting(None, help="or the exact number of query heads kept (whole key/value groups)")
    method: str = setting("activation", choices=WIDTH_METHODS,
                          help="random | magnitude | activation (Wanda-style) | flap (fluctuation)")
    bias_compensation: bool = setting(False, help="add the removed units' mean output back as a bias (FLAP)")
    allocation: str = setting("uniform", choices=WIDTH_ALLOCATIONS,
                              help="uniform: one width for every layer; global: per-layer widths (FLAP's adaptive structure)")
    seed: int = setting(0, when=("method", ("random",)), help='method = "random"')
    type: str = "width"

    def label(self) -> str:
        parts = []
        if self.mlp_width < 1.0:
            parts.append(f"MLP {self.mlp_width:.0%}")
        if self.attention_heads is not None:
            parts.append(f"{self.attention_heads} heads")
        elif self.attention_width < 1.0:
            parts.append(f"heads {self.attention_width:.0%}")
        extra = (", bias compensation" if self.bias_compensation else "") + (", per-layer" if self.allocation == "global" else "")
        return f"width: {' and '.join(parts)} ({self.method}{extra})"

    def validate(self, where: str = "step") -> None:
        for key in ("mlp_width", "attention_width"):
            value = getattr(self, key)
            if not (0.0 < value <= 1.0):
                raise UserError(f"{where}.{key} = {value} is outside (0, 1]",
                                "give the fraction kept, e.g. 0.75 keeps three quarters (1 keeps everything)")
        if self.attention_heads is not None:
            if self.attention_heads < 1:
                raise UserError(f"{where}.attention_heads = {self.attention_heads} must be at least 1",
                                "give the number of query heads kept in each layer")
            if self.attention_width < 1.0:
                raise UserError(f"{where}: set attention_width or attention_heads, not both",
                                "attention_heads gives an exact count, attention_width a fraction")
        if self.mlp_width == 1.0 and self.attention_width == 1.0 and self.attention_heads is None:
            raise UserError(f"{where}: this width step removes nothing",
                            "set mlp_width or attention_width below 1, or attention_heads")
        choice(f"{where}.method", self.method, WIDTH_METHODS)
        choice(f"{where}.allocation", self.allocation, WIDTH_ALLOCATIONS)
        if self.allocation == "global" and self.attention_heads is not None:
            raise UserError(f"{where}: attention_heads fixes every layer's head count, so allocation 'global' does not apply",
                            "use attention_width with allocation = \"global\"")


@dataclass
class VocabStep:
    """Keep the most frequent tokens of a target corpus (OpenBA-V2's vocabulary pruning)."""

    size: int | None = setting(None, help="tokens kept, special tokens and the byte alphabet included")
    fraction: float | None = setting(None, help="or this fraction of the tokenizer's vocabulary")
    source: str | None = setting(None, help="text corpus whose tokens are counted (c4, books, file:PATH...); "
                                            "None: the calibration samples")
    type: str = "vocab"

    def label(self) -> str:
        what = f"{self.size} tokens" if self.size is not None else f"{self.fraction:.0%}"
        return f"vocabulary: keep {what}" + (f" ({self.source})" if self.source else "")

    def validate(self, where: str = "step") -> None:
        _one_of(where, "size", self.size, "fraction", self.fraction)
        if self.size is not None and self.size <= BYTE_ALPHABET:
            raise UserError(f"{where}.size = {self.size} is not larger than the byte alphabet ({BYTE_ALPHABET} tokens)",
                            "every byte needs a token so that any text can still be encoded; keep a few thousand tokens")
        if self.fraction is not None:
            _fraction(f"{where}.fraction", self.fraction, "give the fraction of the vocabulary kept, e.g. 0.5")
        if self.source is not None:
            check_text_source(self.source, f"{where}.source")


def _plan(kind: str):
    def plan(step, index: int, layers: int) -> list[PlannedStage]:
        quantity = "removed" if kind == "width" else None
        return [PlannedStage(f"{kind}:{index}", step.label(), layers, quantity)]

    return plan


_RUNNER = "workbench.structured.step:run_step"
_CHECK = "workbench.structured.step:check"
register(StepType(name="depth", family="structured", spec=DepthStep, plan=_plan("depth"), runner=_RUNNER, check=_CHECK,
                  fake="workbench.backends.fake.steps:structured",
                  description="Remove whole decoder layers (ShortGPT, OpenBA-V2)."))
register(StepType(name="width", family="structured", spec=WidthStep, plan=_plan("width"), runner=_RUNNER, check=_CHECK,
                  fake="workbench.backends.fake.steps:structured",
                  structures={"width": "workbench.structured.width:apply_structure"},
                  description="Remove MLP channels and attention heads (FLAP, Wanda-sp)."))
register(StepType(name="vocab", family="structured", spec=VocabStep, plan=_plan("vocab"), runner=_RUNNER, check=_CHECK,
                  fake="workbench.backends.fake.steps:structured",
                  description="Keep the most frequent tokens of a corpus (OpenBA-V2)."))

__all__ = ["DepthStep", "WidthStep", "VocabStep", "DEPTH_CRITERIA", "DEPTH_SELECTIONS", "WIDTH_METHODS", "WIDTH_ALLOCATIONS",
           "BYTE_ALPHABET"]

"""Run-spec steps for structured compression (depth, width, vocabulary). No torch here.

Each step makes the model physically smaller: ``depth`` removes whole decoder
layers, ``width`` removes MLP channels and attention heads, ``vocab`` removes
rarely used tokens from the tokenizer, the embeddings and the LM head. The
runners are in ``workbench.structured.step``. Checks that need the model (how
many layers it has, its grouped-query layout, its tokenizer) run when the step
starts, before any work, and raise the same kind of ``UserError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .spec import _choice, check_calibration_source, register_step

DEPTH_CRITERIA = ("block_influence", "angular", "perplexity", "last", "random")
DEPTH_SELECTIONS = ("lowest", "middle")
WIDTH_METHODS = ("random", "magnitude", "activation", "flap")
WIDTH_ALLOCATIONS = ("uniform", "global")
# A byte-level tokenizer needs its 256 byte tokens to encode any text.
BYTE_ALPHABET = 256


def _fraction(key: str, value: float, hint: str) -> None:
    if not (0.0 < value < 1.0):
        raise UserError(f"{key} = {value} is outside (0, 1)", hint)


def _one_of(where: str, count_key: str, count, fraction_key: str, fraction) -> None:
    if (count is None) == (fraction is None):
        raise UserError(f"{where}: set exactly one of {count_key} and {fraction_key}",
                        f"for example {count_key} = 2, or {fraction_key} = 0.25")


@dataclass
class DepthStep:
    """Remove whole decoder layers (ShortGPT, OpenBA-V2, "The Unreasonable Ineffectiveness of the Deeper Layers")."""

    remove: int | None = None  # how many decoder layers to remove
    fraction: float | None = None  # or this fraction of the layers (rounded to the nearest count)
    criterion: str = "block_influence"  # see DEPTH_CRITERIA
    selection: str = "lowest"  # lowest: the least important layers; middle: non-adjacent layers, never the first or last
    seed: int = 0  # criterion = "random"
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
        _choice(f"{where}.criterion", self.criterion, DEPTH_CRITERIA)
        _choice(f"{where}.selection", self.selection, DEPTH_SELECTIONS)
        if self.criterion == "angular" and self.selection == "middle":
            raise UserError(f"{where}: criterion 'angular' removes one block of consecutive layers, so selection 'middle' does not apply",
                            "use selection = \"lowest\" with angular, or criterion = \"block_influence\" with middle")
        if self.criterion == "last" and self.selection == "middle":
            raise UserError(f"{where}: criterion 'last' removes the last layers, so selection 'middle' does not apply",
                            "use selection = \"lowest\"")


@dataclass
class WidthStep:
    """Remove MLP channels and attention heads (FLAP, Wanda-sp, Sheared-LLaMA's random baseline)."""

    mlp_width: float = 1.0  # fraction of each MLP's intermediate channels kept, in (0, 1]
    attention_width: float = 1.0  # fraction of attention heads kept, rounded to whole key/value groups
    attention_heads: int | None = None  # or the exact number of query heads kept (whole key/value groups)
    method: str = "activation"  # see WIDTH_METHODS
    bias_compensation: bool = False  # add the removed units' mean output back as a bias (FLAP)
    allocation: str = "uniform"  # uniform: one width for every layer; global: per-layer widths (FLAP's adaptive structure)
    seed: int = 0  # method = "random"
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
        _choice(f"{where}.method", self.method, WIDTH_METHODS)
        _choice(f"{where}.allocation", self.allocation, WIDTH_ALLOCATIONS)
        if self.allocation == "global" and self.attention_heads is not None:
            raise UserError(f"{where}: attention_heads fixes every layer's head count, so allocation 'global' does not apply",
                            "use attention_width with allocation = \"global\"")


@dataclass
class VocabStep:
    """Keep the most frequent tokens of a target corpus (OpenBA-V2's vocabulary pruning)."""

    size: int | None = None  # tokens kept, special tokens and the byte alphabet included
    fraction: float | None = None  # or this fraction of the tokenizer's vocabulary
    source: str | None = None  # text corpus whose tokens are counted (c4, books, file:PATH...); None: the calibration samples
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
            check_calibration_source(self.source, f"{where}.source")


register_step("depth", DepthStep)
register_step("width", WidthStep)
register_step("vocab", VocabStep)

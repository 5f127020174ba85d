"""The one rule for window lengths: calibration and evaluation windows default to ``min(2048, context)`` and are
capped at the model's context (nothing is defined past it: the position embeddings end there). No torch."""

from __future__ import annotations

from typing import Callable

MAX_SEQLEN = 2048  # the papers' window, the default where the model's context is longer


def default_seqlen(context: int | None) -> int:
    """The window length when none is asked for: the model's context, capped at ``MAX_SEQLEN``."""
    return min(MAX_SEQLEN, int(context or MAX_SEQLEN))


def window_length(asked: int | None, context: int | None, key: str = "seqlen",
                  warn: Callable[[str], None] | None = None) -> int:
    """``asked`` (or the default), capped at ``context`` with a warning through ``warn`` naming ``key``."""
    if asked is None:
        return default_seqlen(context)
    if context and asked > context:
        if warn is not None:
            warn(f"{key} = {asked} exceeds the model's context ({context}): windows of {context} tokens are used instead")
        return int(context)
    return asked


__all__ = ["MAX_SEQLEN", "default_seqlen", "window_length"]

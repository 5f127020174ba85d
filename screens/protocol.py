"""How a perplexity was measured, in words: its data set, sequence length and number of windows.

Two perplexities compare only when they were measured the same way: the
same text cut into the same windows. Every screen that shows a perplexity
shows its protocol with it (``protocol_text``), and compare lines runs up
by it (``protocol``).
"""

from __future__ import annotations


def protocol(metric: dict) -> tuple | None:
    """``(dataset, seqlen, windows)`` of a perplexity metric; None for other metrics."""
    if metric.get("name") != "perplexity":
        return None
    return metric.get("dataset"), metric.get("seqlen"), metric.get("windows")


def protocol_text(metric: dict, with_dataset: bool = False) -> str:
    """``512 tok × 16 win`` (``wikitext2, 512 tok × 16 win`` ``with_dataset``); empty for a metric without one."""
    key = protocol(metric)
    if key is None:
        return ""
    dataset, seqlen, windows = key
    shape = f"{seqlen if seqlen is not None else '?'} tok × {windows if windows is not None else '?'} win"
    return f"{dataset}, {shape}" if with_dataset else shape

"""The fake worker's calibration preview: the layout of ``workbench.data.preview``, from formulas. No torch."""

from __future__ import annotations

import time

from workbench.data.sources import describe_source
from workbench.events import Emit, StageFinished, StageStarted

from .model import dense_perplexity

FAKE_SEQLEN = 512  # the fake model's context
FAKE_PREVIEW_WINDOWS = 8  # as the engine's preview: the dense perplexity reads at most this many windows
SHOW = 3  # windows whose text the preview returns, as the engine's
FAKE_DOCUMENTS = {"c4": 1000, "wikitext2": 1, "books": 2}  # other text sources: 100
FAKE_DOCUMENT_TOKENS = 250_000
FAKE_TOP = ((278, " the"), (29892, ","), (29889, "."), (310, " of"), (322, " and"))


def fake_preview(spec, emit: Emit, delay: float = 0.0) -> dict:
    """The preview of ``workbench worker --fake``: the layout of ``preview_calibration``, from formulas.

    With ``seqlen = calibration.seqlen or 512`` and ``tokens = nsamples * seqlen``:
    ``documents`` is ``FAKE_DOCUMENTS`` of the source's prefix (100 for other
    text sources, None for ``random``), ``document_tokens`` 250,000 (None for
    ``random``), ``distinct_tokens = min(tokens, 8256) // 2``, the i-th of the
    ``FAKE_TOP`` tokens (i from 0) counts ``tokens // 2 ** (i + 4)``,
    ``perplexity`` is the fake's dense perplexity of the source's prefix (30
    wikitext2, 40 c4, else 50) on ``min(nsamples, 8)`` windows, and window i
    of the first three reads ``"fake window i of SOURCE"``.
    """
    c = spec.calibration
    seqlen = c.seqlen or FAKE_SEQLEN
    tokens = c.nsamples * seqlen
    prefix = c.source.split(":")[0]
    text = prefix != "random"
    stages = (("load", f"Loading {spec.model.name}"),
              ("calibrate", f"Calibration data: {c.nsamples} x {seqlen} tokens of {c.source}"))
    for name, title in stages:
        emit(StageStarted(stage=name, title=title))
        time.sleep(delay)
        emit(StageFinished(stage=name, seconds=delay))
    return {
        "source": c.source, "description": describe_source(c.source), "model": spec.model.name,
        "nsamples": c.nsamples, "seqlen": seqlen, "seed": c.seed,
        "documents": FAKE_DOCUMENTS.get(prefix, 100) if text else None,
        "document_tokens": FAKE_DOCUMENT_TOKENS if text else None,
        "windows": c.nsamples, "tokens": tokens, "distinct_tokens": min(tokens, 8256) // 2,
        "top_tokens": [{"id": i, "text": t, "count": tokens // 2 ** (k + 4)} for k, (i, t) in enumerate(FAKE_TOP)],
        "perplexity": dense_perplexity(prefix), "perplexity_windows": min(c.nsamples, FAKE_PREVIEW_WINDOWS),
        "samples": [{"window": i, "text": f"fake window {i} of {c.source}", "truncated": False}
                    for i in range(min(SHOW, c.nsamples))],
        "fake": True,
    }

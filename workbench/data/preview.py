"""The ``preview`` job: what a calibration setting gives, before anything is pruned.

``preview_calibration(spec, emit)`` loads ``spec.model``, builds the
calibration windows of ``spec.calibration`` exactly as a run does (same disk
cache, so a self-generated set made here is reused by the run) and returns a
JSON dict:

- ``source``, ``description``, ``nsamples``, ``seqlen``, ``seed``, ``model``;
- ``documents`` and ``document_tokens``: the source's documents and their
  tokens (None for token sources such as ``random``);
- ``windows`` and ``tokens``: the windows and the tokens in them
  (``nsamples * seqlen``); ``distinct_tokens``: distinct ids in the windows;
- ``top_tokens``: the ``TOP`` most frequent ids, ``[{"id", "text", "count"}]``;
- ``perplexity``: the dense model's perplexity on the first
  ``perplexity_windows`` windows (at most ``PREVIEW_WINDOWS``, so it stays cheap);
- ``samples``: the decoded text of the first ``SHOW`` windows,
  ``[{"window", "text", "truncated"}]``, each cut at ``CHARS`` characters;
- ``divergence`` (only with ``compare=True`` and ``calibration.compare`` set):
  ``{"from", "js_bits"}``, the token-distribution divergence from that source.

It is the one preview: the worker's ``preview`` job and ``workbench calib
preview`` (which asks for more windows, the comparison and its own number of
shown windows) both call it.

``workbench.backends.fake`` answers the same job without torch, from fixed
formulas.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch

from workbench.errors import Cancelled
from workbench.events import Emit, Progress, StageFinished, StageStarted, WarningEvent
from workbench.history import cache_dir
from workbench.models import load_spec_model

from .sampling import calibration_data
from .sources import SourceContext, describe_source
from .summary import calibration_summary
from .windows import window_length

PREVIEW_WINDOWS = 8  # windows the dense perplexity reads: a bounded cost, whatever nsamples is
SHOW = 3  # windows whose text is returned
CHARS = 400  # characters of each shown window
TOP = 10  # most frequent tokens returned


@contextmanager
def _stage(emit: Emit, cancel: Callable[[], bool] | None, name: str, title: str):
    if cancel is not None and cancel():
        raise Cancelled("the preview was cancelled", "nothing was changed")
    emit(StageStarted(stage=name, title=title))
    t0 = time.perf_counter()
    yield
    emit(StageFinished(stage=name, seconds=time.perf_counter() - t0))


def preview_calibration(spec, emit: Emit, cancel: Callable[[], bool] | None = None, loaded=None, *, compare: bool = False,
                        max_windows: int = PREVIEW_WINDOWS, show: int = SHOW, seqlen_key: str = "calibration.seqlen") -> dict:
    """Build ``spec.calibration``'s windows for ``spec.model`` and describe them (see the module docstring).

    ``loaded`` (a ``workbench.models.LoadedModel``) skips loading. The dense
    perplexity reads the first ``max_windows`` windows, the text of the first
    ``show`` is returned; ``compare`` also measures the divergence from
    ``calibration.compare``. A window longer than the model's context is
    capped with a warning naming ``seqlen_key``. Raises UserError for a
    source that cannot give the windows, Cancelled when ``cancel()`` turns
    true (between stages, and inside generation).
    """
    m, c = spec.model, spec.calibration
    if loaded is None:
        with _stage(emit, cancel, "load", f"Loading {m.name}"):
            loaded = load_spec_model(m)
    tokenizer = loaded.tokenizer
    seqlen = window_length(c.seqlen, loaded.adapter.context_length, seqlen_key, lambda message: emit(WarningEvent(message=message)))

    def progress(done: int, total: int, detail: str) -> None:  # selfgen's generation, sample by sample
        emit(Progress(stage="calibrate", done=done, total=total, detail=detail))

    context = SourceContext(options={"selfgen": c.selfgen}, device=loaded.device, cancel=cancel, progress=progress)
    def build(source: str, with_documents: bool):
        return calibration_data(source, tokenizer, c.nsamples, seqlen, c.seed, cache_dir() / "calibration", loaded.model,
                                context, with_documents=with_documents)

    with _stage(emit, cancel, "calibrate", f"Calibration data: {c.nsamples} x {seqlen} tokens of {c.source}"):
        data = build(c.source, True)
        other = build(c.compare, False) if compare and c.compare else None
        summary = calibration_summary(data, tokenizer, loaded.model, loaded.device, batch_size=c.batch_size, compare=other,
                                      cancel=cancel, max_windows=max_windows)
    ids = data.ids.reshape(-1).long()
    counts = torch.bincount(ids)
    distinct = int((counts > 0).sum())
    top = torch.topk(counts, min(TOP, distinct))
    samples = []
    for i in range(min(show, data.ids.shape[0])):
        text = tokenizer.decode(data.ids[i].tolist())
        samples.append({"window": i, "text": text[:CHARS], "truncated": len(text) > CHARS})
    result = {
        "source": c.source, "description": describe_source(c.source), "model": m.name,
        "nsamples": c.nsamples, "seqlen": seqlen, "seed": c.seed,
        "documents": summary["documents"], "document_tokens": summary["tokens"],
        "windows": int(data.ids.shape[0]), "tokens": int(ids.numel()), "distinct_tokens": distinct,
        "top_tokens": [{"id": int(i), "text": tokenizer.decode([int(i)]), "count": int(n)}
                       for n, i in zip(top.values.tolist(), top.indices.tolist())],
        "perplexity": summary.get("perplexity"), "perplexity_windows": summary.get("perplexity_windows"),
        "samples": samples,
    }
    if other is not None:
        result["divergence"] = summary["divergence"]
    return result


__all__ = ["preview_calibration", "PREVIEW_WINDOWS"]

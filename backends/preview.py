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
  ``[{"window", "text", "truncated"}]``, each cut at ``CHARS`` characters.

``fake_preview`` answers the same job for ``workbench worker --fake``
without torch, from fixed formulas (see its docstring). The worker imports
this module only when a preview job runs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

from workbench.errors import Cancelled
from workbench.events import Emit, Progress, StageFinished, StageStarted

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


def preview_calibration(spec, emit: Emit, cancel: Callable[[], bool] | None = None, loaded=None) -> dict:
    """Build ``spec.calibration``'s windows for ``spec.model`` and describe them (see the module docstring).

    ``loaded`` (a ``workbench.models.LoadedModel``) skips loading. Raises
    UserError for a source that cannot give the windows, Cancelled when
    ``cancel()`` turns true (between stages, and inside generation).
    """
    import torch

    from workbench.calibration import SourceContext, calibration_data, calibration_summary, describe_source
    from workbench.engine import MAX_SEQLEN
    from workbench.history import cache_dir
    from workbench.models import load_model

    m, c = spec.model, spec.calibration
    if loaded is None:
        with _stage(emit, cancel, "load", f"Loading {m.name}"):
            loaded = load_model(m.name, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
    tokenizer = loaded.tokenizer
    seqlen = c.seqlen or min(MAX_SEQLEN, int(loaded.adapter.context_length or MAX_SEQLEN))
    def progress(done: int, total: int, detail: str) -> None:  # selfgen's generation, sample by sample
        emit(Progress(stage="calibrate", done=done, total=total, detail=detail))

    context = SourceContext(options={"selfgen": c.selfgen}, device=loaded.device, cancel=cancel, progress=progress)
    with _stage(emit, cancel, "calibrate", f"Calibration data: {c.nsamples} x {seqlen} tokens of {c.source}"):
        data = calibration_data(c.source, tokenizer, c.nsamples, seqlen, c.seed, cache_dir() / "calibration", loaded.model,
                                context, with_documents=True)
        summary = calibration_summary(data, tokenizer, loaded.model, loaded.device, batch_size=c.batch_size, cancel=cancel,
                                      max_windows=PREVIEW_WINDOWS)
    ids = data.ids.reshape(-1).long()
    counts = torch.bincount(ids)
    distinct = int((counts > 0).sum())
    top = torch.topk(counts, min(TOP, distinct))
    samples = []
    for i in range(min(SHOW, data.ids.shape[0])):
        text = tokenizer.decode(data.ids[i].tolist())
        samples.append({"window": i, "text": text[:CHARS], "truncated": len(text) > CHARS})
    return {
        "source": c.source, "description": describe_source(c.source), "model": m.name,
        "nsamples": c.nsamples, "seqlen": seqlen, "seed": c.seed,
        "documents": summary["documents"], "document_tokens": summary["tokens"],
        "windows": int(data.ids.shape[0]), "tokens": int(ids.numel()), "distinct_tokens": distinct,
        "top_tokens": [{"id": int(i), "text": tokenizer.decode([int(i)]), "count": int(n)}
                       for n, i in zip(top.values.tolist(), top.indices.tolist())],
        "perplexity": summary.get("perplexity"), "perplexity_windows": summary.get("perplexity_windows"),
        "samples": samples,
    }


# The fake worker's answer: fixed data, so UI tests can assert on it.
FAKE_SEQLEN = 512  # the fake model's context
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
    from workbench.calibration import describe_source

    from .fake import dense_perplexity

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
        "perplexity": dense_perplexity(prefix), "perplexity_windows": min(c.nsamples, PREVIEW_WINDOWS),
        "samples": [{"window": i, "text": f"fake window {i} of {c.source}", "truncated": False}
                    for i in range(min(SHOW, c.nsamples))],
        "fake": True,
    }

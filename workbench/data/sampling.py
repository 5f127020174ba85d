"""Calibration windows: ``nsamples`` windows of ``seqlen`` token ids from a source of ``workbench.data.sources``.

Sampling follows the SparseGPT/Wanda reference code: with
``random.Random(seed)``, pick a random document, skip it unless it has more
than ``seqlen`` tokens, cut one random window of ``seqlen`` tokens from it;
repeat. The result is deterministic for a seed, and the first k samples of a
larger request equal a request for k samples. Also here: the token sources
that are not text (``random``) and mixtures, whose functions the registry
names.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from workbench.errors import RunError, UserError

from .cache import CACHE_VERSION, cache_path, content_fingerprint, load_cached, save_cached, tokenizer_fingerprint
from .mixtures import mixture_counts, parse_mixture
from .sources import CalibrationData, Source, SourceContext, resolve, text_source_names


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of one document, without special tokens.

    The references call the tokenizer with its defaults (a BOS first for
    Llama). Windows are cut from anywhere in a document, so that BOS would
    only show up in the rare window starting at 0 (and an EOS-appending
    tokenizer would put one at the end); without special tokens every sample
    is a plain slice of the document's text.
    """
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    ids = encoded["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a tokenizer that always batches
        ids = ids[0]
    return ids


def _too_few(distinct: int, windows: int, long_docs: int, ndocs: int, nsamples: int, seqlen: int) -> UserError:
    if distinct == 0:
        message = f"no document of the calibration data is longer than {seqlen} tokens ({ndocs} documents)"
        hint = "use a shorter seqlen, or more or longer text"
    else:
        message = (
            f"the calibration data allows only {distinct} distinct windows of {seqlen} tokens "
            f"({windows} non-overlapping; {long_docs} of {ndocs} documents are longer than {seqlen} tokens); "
            f"{nsamples} samples were asked for"
        )
        hint = f"use at most {distinct} samples (at most {windows} for windows that do not overlap), a shorter seqlen, or more text"
    return UserError(message, hint=hint)


def sample_windows(documents: Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> list[list[int]]:
    """``nsamples`` random windows of ``seqlen`` token ids from ``documents`` (the reference protocol).

    As in the references, documents are drawn with replacement and windows may
    overlap. Each document is tokenized at most once. Raises ``UserError`` when
    the data holds fewer than ``nsamples`` distinct windows (start positions in
    documents longer than ``seqlen`` tokens); warns (``UserWarning``) when it
    holds fewer than ``nsamples`` non-overlapping ones, so samples overlap.
    """
    ndocs = len(documents)
    if ndocs == 0:
        raise UserError("the calibration data holds no documents", hint="use another source")
    rng = random.Random(seed)
    tokens: dict[int, list[int]] = {}
    capacity = 0  # non-overlapping windows in the tokenized documents longer than seqlen
    distinct = 0  # distinct window starts (the references draw starts in [0, len - seqlen - 1])
    long_docs = 0

    def encoded(i: int) -> list[int]:
        nonlocal capacity, distinct, long_docs
        ids = tokens.get(i)
        if ids is None:
            ids = tokens[i] = encode(tokenizer, documents[i])
            if len(ids) > seqlen:
                capacity += len(ids) // seqlen
                distinct += len(ids) - seqlen
                long_docs += 1
        return ids

    def check_all() -> None:
        for i in range(ndocs):
            encoded(i)
        if distinct < nsamples:
            raise _too_few(distinct, capacity, long_docs, ndocs, nsamples, seqlen)
        if capacity < nsamples:
            warnings.warn(
                f"the calibration data holds only {capacity} non-overlapping windows of {seqlen} tokens "
                f"({long_docs} of {ndocs} documents are long enough); the {nsamples} samples overlap. "
                "Use more text (file:PATH, hf:...) for distinct samples.",
                UserWarning,
                stacklevel=3,
            )

    checked = False
    misses = 0
    samples: list[list[int]] = []
    while len(samples) < nsamples:
        ids = encoded(rng.randint(0, ndocs - 1))
        if len(ids) <= seqlen:
            misses += 1
            # Mostly short documents: look at them all once, so that data
            # which cannot serve the request fails fast instead of looping.
            if not checked and misses > 2 * ndocs + 16:
                check_all()
                checked = True
            continue
        # randint(0, len - seqlen - 1) as in the references (the last start is never drawn).
        start = rng.randint(0, len(ids) - seqlen - 1)
        samples.append(ids[start : start + seqlen])
        if not checked and len(samples) > capacity and len(samples) > distinct:
            check_all()
            checked = True
    if not checked and capacity < nsamples:
        check_all()
    return samples


def _as_data(result, entry: Source, source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> CalibrationData:
    """A source's result as checked windows (sampled from its documents when it returned text)."""
    if isinstance(result, CalibrationData):
        return CalibrationData(_checked_ids(result.ids, entry, nsamples, seqlen), source, result.documents)
    if isinstance(result, torch.Tensor):
        return CalibrationData(_checked_ids(result, entry, nsamples, seqlen), source)
    if isinstance(result, str) or not all(isinstance(d, str) for d in result):
        raise RunError(f"the calibration source {entry.prefix!r} returned {type(result).__name__}, not a list of documents",
                       hint="fix the source's function")
    documents = [d for d in result if d.strip()]
    sampled = ["\n\n".join(documents)] if entry.join_documents and documents else documents
    windows = sample_windows(sampled, tokenizer, nsamples, seqlen, seed)
    return CalibrationData(torch.tensor(windows, dtype=torch.long).reshape(nsamples, seqlen), source, documents)


def _documents_of(result) -> list[str] | None:
    """The documents in a source's result, without sampling windows (None for token sources)."""
    if isinstance(result, CalibrationData):
        return result.documents
    if isinstance(result, (list, tuple)) and all(isinstance(d, str) for d in result):
        return [d for d in result if d.strip()]
    return None


def _checked_ids(result, entry: Source, nsamples: int, seqlen: int) -> "torch.Tensor":
    if isinstance(result, torch.Tensor):
        if result.dim() != 2 or tuple(result.shape) != (nsamples, seqlen) or result.is_floating_point() or result.is_complex():
            raise RunError(
                f"the calibration source {entry.prefix!r} returned a {result.dtype} tensor of shape {tuple(result.shape)}, "
                f"not integer ids of shape ({nsamples}, {seqlen})",
                hint="fix the source's function",
            )
        return result.detach().to(device="cpu", dtype=torch.long).contiguous()
    raise RunError(f"the calibration source {entry.prefix!r} returned {type(result).__name__}, not a token tensor", hint="fix the source's function")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive whole number, not {value!r}", hint=f"set {name} to 1 or more")
    return value


def calibration_samples(
    source: str,
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    model=None,
    context: SourceContext | None = None,
) -> "torch.Tensor":
    """Calibration token ids, a CPU ``torch.long`` tensor of shape ``(nsamples, seqlen)``.

    ``source`` is one of ``source_names()``. Deterministic for a seed. With
    ``cache_dir``, the result is stored there (``calib-*.pt``) under a hash of
    the source, its content (the file's bytes for ``file:``), the tokenizer's
    identity, nsamples, seqlen and seed, and reused when all of them match.
    ``model`` is only passed on to sources that use it (``random`` caps the
    ids at its embedding rows; ``selfgen`` generates with it). ``context``
    carries settings, device, progress and cancel to the sources that take
    one (``selfgen``, ``mix``).

    Raises ``UserError`` for an unknown source, unreadable data, or data too
    short for ``nsamples`` windows of ``seqlen`` tokens.
    """
    return calibration_data(source, tokenizer, nsamples, seqlen, seed, cache_dir, model, context).ids


def calibration_data(
    source: str,
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    model=None,
    context: SourceContext | None = None,
    with_documents: bool = False,
) -> CalibrationData:
    """``calibration_samples`` with the source's documents beside the windows (when ``with_documents``).

    On a disk-cache hit the windows come from the cache and, if asked for, the
    documents are read again from the source (cheap: the built-in corpora are
    cached in-process and ``selfgen`` keeps its generated set on disk).
    """
    nsamples = _positive_int("nsamples", nsamples)
    seqlen = _positive_int("seqlen", seqlen)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number, not {seed!r}", hint="set seed to an integer such as 0")
    entry, arg = resolve(source)
    source = source.strip()
    context = replace(context or SourceContext(), cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None)

    fn = entry.function()

    def call():
        if entry.wants_context:
            return fn(arg, tokenizer, nsamples, seqlen, seed, model, context=context)
        return fn(arg, tokenizer, nsamples, seqlen, seed, model)

    cache_path_ = key = None
    if cache_dir is not None and entry.cacheable:
        payload = {
            "version": CACHE_VERSION,
            "source": entry.prefix if entry.prefix == "file" else f"{entry.prefix}:{arg}",
            "content": content_fingerprint(entry, arg, model),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "nsamples": nsamples,
            "seqlen": seqlen,
            "seed": seed,
        }
        key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()
        cache_path_ = cache_path(cache_dir, entry, key, nsamples, seqlen, seed)
        cached = load_cached(cache_path_, key, nsamples, seqlen)
        if cached is not None:
            return CalibrationData(cached, source, _documents_of(call()) if with_documents else None)

    data = _as_data(call(), entry, source, tokenizer, nsamples, seqlen, seed)
    if cache_path_ is not None:
        save_cached(cache_path_, key, data.ids)
    if not with_documents:
        data.documents = None
    return data


def text_documents(source: str) -> list[str]:
    """The documents of a text source (registered with ``text=True``: ``c4``, ``wikitext2``, ``books``, ``file:PATH``,
    ``hf:...``), without sampling."""
    entry, arg = resolve(source)
    if not entry.text:
        raise UserError(f"{source!r} is not a text corpus", hint=f"use one of: {', '.join(text_source_names())}")
    fn = entry.function()
    documents = fn(arg, None, 0, 0, 0, None, context=SourceContext()) if entry.wants_context else fn(arg, None, 0, 0, 0, None)
    return [d for d in documents if d.strip()]


# ------------------------------------------------------------------ sources that are not plain text


def _special_ids(tokenizer) -> set[int]:
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    for idx, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            special.add(int(idx))
    return special


def random_tokens(arg, tokenizer, nsamples, seqlen, seed, model):
    """Uniform random ids over the tokenizer's vocabulary (capped at the model's embedding rows), no special tokens."""
    vocab = len(tokenizer)
    if model is not None:
        try:
            vocab = min(vocab, int(model.get_input_embeddings().num_embeddings))
        except (AttributeError, TypeError):
            pass
    special = _special_ids(tokenizer)
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    if allowed.numel() == 0:
        raise UserError("the tokenizer has no ordinary tokens to draw random ids from", hint="use a text source such as c4")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(allowed.numel(), (nsamples, seqlen), generator=generator)
    return allowed[picks]


def mixture(arg, tokenizer, nsamples, seqlen, seed, model, context):
    """The samples of each source, in the order given, concatenated; documents too when every source has them."""
    parts = parse_mixture(arg)
    counts = mixture_counts(parts, nsamples)
    pieces = [
        calibration_data(source, tokenizer, n, seqlen, seed, context.cache_dir, model, context, with_documents=True)
        for (source, _), n in zip(parts, counts)
    ]
    documents = None
    if all(p.documents is not None for p in pieces):
        documents = [d for p in pieces for d in p.documents]
    return CalibrationData(torch.cat([p.ids for p in pieces]), f"mix:{arg}", documents)


__all__ = ["calibration_samples", "calibration_data", "sample_windows", "text_documents", "random_tokens",
           "mixture", "encode"]

"""Calibration samples: ``nsamples`` windows of ``seqlen`` token ids.

Sources (``describe_source`` gives a one-line description of each):

- ``c4``: the bundled 1,000 C4 (en) train documents; the default, as in the
  SparseGPT and Wanda papers.
- ``wikitext2``: the WikiText-2 raw validation text as one document (see
  ``_wikitext2_documents`` for why validation).
- ``file:PATH``: a local .txt/.jsonl/.json/.csv/.parquet file
  (``workbench.corpora.file_documents``).
- ``hf:NAME[:CONFIG]:SPLIT[:FIELD]``: a Hugging Face Hub dataset.
- ``random``: uniform random token ids (no text), special tokens excluded.
- anything added with ``register_source`` (e.g. ``selfgen``, text generated
  by the model itself).

Sampling follows the SparseGPT/Wanda reference code: with
``random.Random(seed)``, pick a random document, skip it unless it has more
than ``seqlen`` tokens, cut one random window of ``seqlen`` tokens from it;
repeat. The result is deterministic for a seed, and the first k samples of a
larger request equal a request for k samples.

This module imports torch only when samples are built, so the UI can call
``describe_source`` cheaply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from workbench import corpora
from workbench.errors import RunError, UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "c4"
# Bump when the sampling changes, so samples cached on disk by an older
# version are not reused.
CACHE_VERSION = 1

SourceResult = Union[Sequence[str], "torch.Tensor"]
# fn(arg, tokenizer, nsamples, seqlen, seed, model) -> documents or an (nsamples, seqlen) token tensor
SourceFn = Callable[[str, Any, int, int, int, Any], SourceResult]


@dataclass(frozen=True)
class _Source:
    prefix: str
    fn: SourceFn
    usage: str
    describe: Callable[[str], str]
    takes_arg: bool | None  # True: required, False: refused, None: optional
    cacheable: bool
    builtin: bool


_SOURCES: dict[str, _Source] = {}


def register_source(
    prefix: str,
    fn: SourceFn,
    *,
    description: str | Callable[[str], str] | None = None,
    usage: str | None = None,
    takes_arg: bool | None = None,
    cacheable: bool = False,
) -> None:
    """Add a calibration source named ``prefix`` (used as ``prefix`` or ``prefix:ARG``).

    ``fn(arg, tokenizer, nsamples, seqlen, seed, model)`` returns either a
    list of documents (strings; windows are then sampled from them exactly as
    for the built-in text sources) or an integer tensor of shape
    ``(nsamples, seqlen)`` used as is. ``arg`` is the text after ``prefix:``
    ("" when absent); ``model`` is whatever the caller passed (may be None).

    ``description`` is a string, or a function of ``arg`` giving one, for
    ``describe_source``. ``cacheable=True`` lets ``calibration_samples``
    cache the result on disk; the cache key then also holds the model's
    identity (class, name, parameter count), so a source whose output depends
    on the model's weights in a way that identity does not capture should
    stay uncached. Registering an existing prefix replaces it.
    """
    prefix = prefix.strip().lower()
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", prefix):
        raise ValueError(f"a source prefix is a lowercase word, not {prefix!r}")
    if description is None:
        description = f"{prefix} (registered calibration source)"
    describe = description if callable(description) else (lambda arg, _d=description: _d)
    _SOURCES[prefix] = _Source(
        prefix=prefix,
        fn=fn,
        usage=usage or (f"{prefix}[:ARG]" if takes_arg is None else f"{prefix}:ARG" if takes_arg else prefix),
        describe=describe,
        takes_arg=takes_arg,
        cacheable=cacheable,
        builtin=False,
    )


def source_names() -> list[str]:
    """How each known source is written, e.g. ``["c4", "wikitext2", "file:PATH", ...]``."""
    return [s.usage for s in _SOURCES.values()]


def _resolve(source: str) -> tuple[_Source, str]:
    if not isinstance(source, str) or not source.strip():
        raise UserError("no calibration source given", hint=f"use one of: {', '.join(source_names())}")
    source = source.strip()
    prefix, sep, arg = source.partition(":")
    entry = _SOURCES.get(prefix.strip().lower())
    if entry is None:
        raise UserError(f"unknown calibration source {source!r}", hint=f"use one of: {', '.join(source_names())}")
    arg = arg.strip()
    if entry.takes_arg is True and not arg:
        raise UserError(f"the calibration source {entry.prefix!r} needs an argument", hint=f"write it as {entry.usage}")
    if entry.takes_arg is False and sep:
        raise UserError(f"the calibration source {entry.prefix!r} takes no argument (got {source!r})", hint=f"write it as {entry.usage}")
    return entry, arg


def describe_source(source: str) -> str:
    """A one-line human description of a calibration source (for the UI and CLI)."""
    entry, arg = _resolve(source)
    return entry.describe(arg)


# ------------------------------------------------------------ built-in sources


def _c4_documents(arg, tokenizer, nsamples, seqlen, seed, model):
    return corpora.c4_documents("train")


def _wikitext2_documents(arg, tokenizer, nsamples, seqlen, seed, model):
    """The WikiText-2 raw *validation* text, rows joined by a blank line, as one document.

    The papers calibrate on the train split, but WikiText-2 train (10.9 MB) is
    not bundled; validation is the closest text that is not the test split
    perplexity is measured on. As in the references (which tokenize the whole
    train text at once), it is one document and each sample is a random window
    of it.
    """
    return [corpora.wikitext2_text("valid")]


def _file_documents(arg, tokenizer, nsamples, seqlen, seed, model):
    return corpora.file_documents(arg)


def _hub_documents(arg, tokenizer, nsamples, seqlen, seed, model):
    return corpora.hub_documents(arg)


def _special_ids(tokenizer) -> set[int]:
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    for idx, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            special.add(int(idx))
    return special


def _random_tokens(arg, tokenizer, nsamples, seqlen, seed, model):
    """Uniform random ids over the tokenizer's vocabulary (capped at the model's embedding rows), no special tokens."""
    import torch

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


def _describe_file(arg: str) -> str:
    suffix, _ = corpora._suffix(Path(arg))
    if suffix == ".txt":
        return f"the text of {arg} as one document, random windows of it"
    if suffix in (".csv", ".parquet"):
        return f"the {corpora.TEXT_FIELD!r} column of {arg}, random windows of its documents"
    return f"the {corpora.TEXT_FIELD!r} field of each record in {arg}, random windows of its documents"


def _describe_hub(arg: str) -> str:
    name, config, split, field = corpora.parse_hub_spec(arg)
    config_text = (f", files {config}" if corpora.config_names_files(config) else f", config {config}") if config else ""
    return f"Hugging Face dataset {name}{config_text}, split {split}, field {field!r}, random windows of its documents"


def _builtin(prefix, fn, usage, describe, takes_arg, cacheable=True):
    _SOURCES[prefix] = _Source(prefix, fn, usage, describe, takes_arg, cacheable, builtin=True)


_builtin("c4", _c4_documents, "c4", lambda arg: "C4 (allenai/c4, en): random windows of the 1,000 bundled train documents", False)
_builtin(
    "wikitext2",
    _wikitext2_documents,
    "wikitext2",
    lambda arg: "WikiText-2 raw validation text as one document, random windows of it (train is not bundled)",
    False,
)
_builtin("file", _file_documents, "file:PATH", _describe_file, True)
_builtin("hf", _hub_documents, "hf:NAME[:CONFIG]:SPLIT[:FIELD]", _describe_hub, True)
_builtin("random", _random_tokens, "random", lambda arg: "uniform random token ids (no text), special tokens excluded", False, cacheable=False)


# ------------------------------------------------------------------ sampling


def _encode(tokenizer, text: str) -> list[int]:
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
            ids = tokens[i] = _encode(tokenizer, documents[i])
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


def _as_tensor(result: SourceResult, entry: _Source, tokenizer, nsamples: int, seqlen: int, seed: int) -> "torch.Tensor":
    import torch

    if isinstance(result, torch.Tensor):
        if result.dim() != 2 or tuple(result.shape) != (nsamples, seqlen) or result.is_floating_point() or result.is_complex():
            raise RunError(
                f"the calibration source {entry.prefix!r} returned a {result.dtype} tensor of shape {tuple(result.shape)}, "
                f"not integer ids of shape ({nsamples}, {seqlen})",
                hint="fix the source's function",
            )
        return result.detach().to(device="cpu", dtype=torch.long).contiguous()
    if isinstance(result, str) or not all(isinstance(d, str) for d in result):
        raise RunError(f"the calibration source {entry.prefix!r} returned {type(result).__name__}, not a list of documents", hint="fix the source's function")
    documents = [d for d in result if d.strip()]
    windows = sample_windows(documents, tokenizer, nsamples, seqlen, seed)
    return torch.tensor(windows, dtype=torch.long).reshape(nsamples, seqlen)


# --------------------------------------------------------------- disk cache


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer for caching: name, class, size and a hash of its vocabulary (and, for fast tokenizers, of its whole definition)."""
    digest = hashlib.sha256()
    try:
        vocab = tokenizer.get_vocab()
        digest.update(json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False).encode("utf-8"))
    except (AttributeError, NotImplementedError, TypeError):
        digest.update(repr(tokenizer).encode("utf-8"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode("utf-8"))  # merges, normalizer, pre-tokenizer
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or ""),
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "vocab_sha256": digest.hexdigest(),
    }


def _model_identity(model) -> dict | None:
    if model is None:
        return None
    config = getattr(model, "config", None)
    try:
        params = sum(p.numel() for p in model.parameters())
    except (AttributeError, TypeError):
        params = None
    return {
        "class": type(model).__name__,
        "name": str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or ""),
        "params": params,
    }


def _content_fingerprint(entry: _Source, arg: str, model) -> Any:
    if entry.prefix == "file":
        path = Path(arg).expanduser()
        if not path.is_file():
            corpora.file_documents(path)  # raises the missing-file error
        return {"sha256": _sha256_file(path), "suffixes": "".join(path.suffixes).lower()}
    if entry.prefix == "c4":
        return _sha256_file(corpora.bundled_path(corpora.C4_FILES["train"]))
    if entry.prefix == "wikitext2":
        return _sha256_file(corpora.bundled_path(corpora.WIKITEXT2_FILES["valid"]))
    if not entry.builtin:
        return {"model": _model_identity(model)}
    return None


def _cache_path(cache_dir, entry: _Source, key: str, nsamples: int, seqlen: int, seed: int) -> Path:
    return Path(cache_dir).expanduser() / f"calib-{entry.prefix}-{nsamples}x{seqlen}-seed{seed}-{key[:24]}.pt"


def _load_cached(path: Path, key: str, nsamples: int, seqlen: int):
    import torch

    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: rebuild it
        log.warning("ignoring unreadable calibration cache %s: %s", path, exc)
        return None
    if not isinstance(payload, dict):
        return None
    ids = payload.get("input_ids")
    if payload.get("key") != key or not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or tuple(ids.shape) != (nsamples, seqlen):
        return None
    return ids


def _save_cached(path: Path, key: str, ids) -> None:
    import torch

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"key": key, "input_ids": ids}, fh)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:  # caching is an optimization; a read-only folder must not fail the run
        log.warning("could not cache calibration samples in %s: %s", path.parent, exc)


# ------------------------------------------------------------------ entry point


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
) -> "torch.Tensor":
    """Calibration token ids, a CPU ``torch.long`` tensor of shape ``(nsamples, seqlen)``.

    ``source`` is one of ``source_names()``. Deterministic for a seed. With
    ``cache_dir``, the result is stored there (``calib-*.pt``) under a hash of
    the source, its content (the file's bytes for ``file:``), the tokenizer's
    identity, nsamples, seqlen and seed, and reused when all of them match.
    ``model`` is only passed on to sources that use it (``random`` caps the
    ids at its embedding rows; registered sources such as ``selfgen``).

    Raises ``UserError`` for an unknown source, unreadable data, or data too
    short for ``nsamples`` windows of ``seqlen`` tokens.
    """
    nsamples = _positive_int("nsamples", nsamples)
    seqlen = _positive_int("seqlen", seqlen)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number, not {seed!r}", hint="set seed to an integer such as 0")
    entry, arg = _resolve(source)

    cache_path = key = None
    if cache_dir is not None and entry.cacheable:
        payload = {
            "version": CACHE_VERSION,
            "source": entry.prefix if entry.prefix == "file" else f"{entry.prefix}:{arg}",
            "content": _content_fingerprint(entry, arg, model),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "nsamples": nsamples,
            "seqlen": seqlen,
            "seed": seed,
        }
        key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()
        cache_path = _cache_path(cache_dir, entry, key, nsamples, seqlen, seed)
        cached = _load_cached(cache_path, key, nsamples, seqlen)
        if cached is not None:
            return cached

    result = entry.fn(arg, tokenizer, nsamples, seqlen, seed, model)
    ids = _as_tensor(result, entry, tokenizer, nsamples, seqlen, seed)
    if cache_path is not None:
        _save_cached(cache_path, key, ids)
    return ids

"""Calibration samples: ``nsamples`` windows of ``seqlen`` token ids.

Sources (``describe_source`` gives a one-line description of each):

- ``c4``: the bundled 1,000 C4 (en) train documents; the default, as in the
  SparseGPT and Wanda papers.
- ``wikitext2``: the WikiText-2 raw validation text as one document (see
  ``_wikitext2_documents`` for why validation).
- ``books``: the two held-out Project Gutenberg books of
  ``assets/data/books-calib.txt``, one document each: in-domain text the
  bundled demo model never saw in training.
- ``file:PATH``: a local .txt/.jsonl/.json/.csv/.parquet file
  (``workbench.corpora.file_documents``).
- ``hf:NAME[:CONFIG]:SPLIT[:FIELD]``: a Hugging Face Hub dataset.
- ``random``: uniform random token ids (no text), special tokens excluded.
- ``selfgen[:CORPUS]``: text the model generates itself from the first tokens
  of a seed corpus (``workbench.selfgen``; settings in ``[calibration.selfgen]``).
- ``mix:A=0.5,B=0.5``: the given fractions of the samples drawn from each
  source (``parse_mixture``).
- anything added with ``register_source``.

Sampling follows the SparseGPT/Wanda reference code: with
``random.Random(seed)``, pick a random document, skip it unless it has more
than ``seqlen`` tokens, cut one random window of ``seqlen`` tokens from it;
repeat. The result is deterministic for a seed, and the first k samples of a
larger request equal a request for k samples.

``calibration_summary`` describes a calibration set before pruning: its
documents and tokens, the model's perplexity on the windows, and the
token-distribution divergence from another source.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from workbench import corpora
from workbench.errors import RunError, UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "c4"
# Bump when the sampling changes, so samples cached on disk by an older
# version are not reused.
CACHE_VERSION = 1

# fn(arg, tokenizer, nsamples, seqlen, seed, model[, context=SourceContext]) ->
# documents, an (nsamples, seqlen) token tensor, or a CalibrationData
SourceFn = Callable[..., Any]


@dataclass(frozen=True)
class SourceContext:
    """What a source registered with ``wants_context=True`` receives beside its arguments.

    ``options`` holds per-source settings by prefix (``{"selfgen":
    SelfGenSpec(...)}``, from ``[calibration.selfgen]``, or the same as a
    dict); ``device`` is where a source that runs the
    model should run it; ``cache_dir`` is the calibration cache folder (None:
    no disk cache); ``progress(done, total, detail)`` and ``cancel()`` let a
    long source (generation) report and stop.
    """

    options: dict = field(default_factory=dict)
    device: Any = None
    cache_dir: Path | None = None
    progress: Callable[[int, int, str], None] | None = None
    cancel: Callable[[], bool] | None = None


@dataclass
class CalibrationData:
    """Calibration windows and, when asked for, the documents they were cut from.

    ``documents`` is None for sources without text (``random``) and when the
    caller did not ask for them (``calibration_data(with_documents=False)``).
    """

    ids: "torch.Tensor"  # (nsamples, seqlen) long, on the CPU
    source: str
    documents: list[str] | None = None


@dataclass(frozen=True)
class _Source:
    prefix: str
    fn: SourceFn
    usage: str
    describe: Callable[[str], str]
    takes_arg: bool | None  # True: required, False: refused, None: optional
    cacheable: bool
    builtin: bool
    join_documents: bool = False  # windows are cut from the documents joined by a blank line
    wants_context: bool = False  # fn also takes context=SourceContext


_SOURCES: dict[str, _Source] = {}


def register_source(
    prefix: str,
    fn: SourceFn,
    *,
    description: str | Callable[[str], str] | None = None,
    usage: str | None = None,
    takes_arg: bool | None = None,
    cacheable: bool = False,
    join_documents: bool = False,
    wants_context: bool = False,
) -> None:
    """Add a calibration source named ``prefix`` (used as ``prefix`` or ``prefix:ARG``).

    ``fn(arg, tokenizer, nsamples, seqlen, seed, model)`` returns either a
    list of documents (strings; windows are then sampled from them exactly as
    for the built-in text sources), an integer tensor of shape
    ``(nsamples, seqlen)`` used as is, or a ``CalibrationData`` (such a tensor
    with the documents it came from). ``arg`` is the text after ``prefix:``
    ("" when absent); ``model`` is whatever the caller passed (may be None).
    With ``wants_context=True`` it is also passed ``context=SourceContext``.
    With ``join_documents=True`` the documents are joined by a blank line
    before windows are cut, for sources of many texts shorter than a window
    (generated samples).

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
        join_documents=join_documents,
        wants_context=wants_context,
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


def _books_documents(arg, tokenizer, nsamples, seqlen, seed, model):
    return corpora.books_documents("calib")


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


def _builtin(prefix, fn, usage, describe, takes_arg, cacheable=True, wants_context=False):
    _SOURCES[prefix] = _Source(prefix, fn, usage, describe, takes_arg, cacheable, builtin=True, wants_context=wants_context)


_builtin("c4", _c4_documents, "c4", lambda arg: "C4 (allenai/c4, en): random windows of the 1,000 bundled train documents", False)
_builtin(
    "wikitext2",
    _wikitext2_documents,
    "wikitext2",
    lambda arg: "WikiText-2 raw validation text as one document, random windows of it (train is not bundled)",
    False,
)
_builtin(
    "books",
    _books_documents,
    "books",
    lambda arg: "two held-out Project Gutenberg books (The Trial; Stalky & Co.), random windows of them",
    False,
)
_builtin("file", _file_documents, "file:PATH", _describe_file, True)
_builtin("hf", _hub_documents, "hf:NAME[:CONFIG]:SPLIT[:FIELD]", _describe_hub, True)
_builtin("random", _random_tokens, "random", lambda arg: "uniform random token ids (no text), special tokens excluded", False, cacheable=False)


def _selfgen_documents(arg, tokenizer, nsamples, seqlen, seed, model, context):
    from workbench.selfgen import selfgen_source  # imports torch and transformers' generation

    return selfgen_source(arg, tokenizer, nsamples, seqlen, seed, model, context)


def _describe_selfgen(arg: str) -> str:
    return f"text the model generates from the first tokens of {arg or 'its seed corpus'}, its worst-perplexity samples dropped"


register_source(
    "selfgen",
    _selfgen_documents,
    description=_describe_selfgen,
    usage="selfgen[:CORPUS]",
    join_documents=True,
    wants_context=True,
)


# ------------------------------------------------------------------ mixtures


def parse_mixture(spec: str, key: str = "calibration.source") -> list[tuple[str, float]]:
    """``"c4=0.5,selfgen=0.5"`` -> ``[("c4", 0.5), ("selfgen", 0.5)]``.

    Each part is ``SOURCE=FRACTION`` (the last ``=`` splits, so a source may
    hold one); fractions are positive and sum to 1. Sources are not checked
    here (``workbench.spec.check_calibration_source`` and ``_resolve`` do).
    """
    hint = "write mix:SOURCE=FRACTION,SOURCE=FRACTION with fractions summing to 1, e.g. mix:c4=0.5,selfgen=0.5"
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise UserError(f"{key}: the mixture {spec!r} is empty or has an empty part", hint=hint)
    out: list[tuple[str, float]] = []
    for part in parts:
        source, sep, value = part.rpartition("=")
        source = source.strip()
        try:
            fraction = float(value)
        except ValueError:
            fraction = float("nan")
        if not sep or not source or not (0.0 < fraction <= 1.0):
            raise UserError(f"{key}: {part!r} in the mixture is not SOURCE=FRACTION with a fraction in (0, 1]", hint=hint)
        if source.lower().startswith("mix:") or source.lower() == "mix":
            raise UserError(f"{key}: a mixture cannot hold another mixture ({part!r})", hint="list every source in one mix:")
        if source in (s for s, _ in out):
            raise UserError(f"{key}: {source!r} appears twice in the mixture", hint="give each source once, with its total fraction")
        out.append((source, fraction))
    total = sum(f for _, f in out)
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"{key}: the mixture fractions sum to {total:g}, not 1", hint=hint)
    return out


def mixture_counts(parts: list[tuple[str, float]], nsamples: int, key: str = "calibration.source") -> list[int]:
    """Samples per source: ``fraction * nsamples`` rounded so the counts sum to ``nsamples`` (largest remainders first)."""
    exact = [f * nsamples for _, f in parts]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(parts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: nsamples - sum(counts)]:
        counts[i] += 1
    for (source, fraction), n in zip(parts, counts):
        if n == 0:
            raise UserError(
                f"{key}: {source} gets 0 of the {nsamples} samples at fraction {fraction:g}",
                hint="raise calibration.nsamples or that source's fraction",
            )
    return counts


def _mixture(arg, tokenizer, nsamples, seqlen, seed, model, context):
    """The samples of each source, in the order given, concatenated; documents too when every source has them."""
    import torch

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


def _describe_mixture(arg: str) -> str:
    parts = parse_mixture(arg)
    return "a mixture: " + ", ".join(f"{fraction:.0%} of the samples from {source}" for source, fraction in parts)


register_source("mix", _mixture, description=_describe_mixture, usage="mix:SOURCE=FRACTION,...", takes_arg=True, wants_context=True)


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


def _as_data(result, entry: _Source, source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> CalibrationData:
    """A source's result as checked windows (sampled from its documents when it returned text)."""
    import torch

    if isinstance(result, CalibrationData):
        return CalibrationData(_checked_ids(result.ids, entry, nsamples, seqlen), source, result.documents)
    if isinstance(result, torch.Tensor):
        return CalibrationData(_checked_ids(result, entry, nsamples, seqlen), source)
    if isinstance(result, str) or not all(isinstance(d, str) for d in result):
        raise RunError(f"the calibration source {entry.prefix!r} returned {type(result).__name__}, not a list of documents", hint="fix the source's function")
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


def _checked_ids(result, entry: _Source, nsamples: int, seqlen: int) -> "torch.Tensor":
    import torch

    if isinstance(result, torch.Tensor):
        if result.dim() != 2 or tuple(result.shape) != (nsamples, seqlen) or result.is_floating_point() or result.is_complex():
            raise RunError(
                f"the calibration source {entry.prefix!r} returned a {result.dtype} tensor of shape {tuple(result.shape)}, "
                f"not integer ids of shape ({nsamples}, {seqlen})",
                hint="fix the source's function",
            )
        return result.detach().to(device="cpu", dtype=torch.long).contiguous()
    raise RunError(f"the calibration source {entry.prefix!r} returned {type(result).__name__}, not a token tensor", hint="fix the source's function")


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


# The bundled file each built-in text source reads.
_BUNDLED_FILES = {
    "c4": corpora.C4_FILES["train"],
    "wikitext2": corpora.WIKITEXT2_FILES["valid"],
    "books": corpora.BOOKS_FILES["calib"],
}


def _content_fingerprint(entry: _Source, arg: str, model) -> Any:
    if entry.prefix == "file":
        path = Path(arg).expanduser()
        if not path.is_file():
            corpora.file_documents(path)  # raises the missing-file error
        return {"sha256": _sha256_file(path), "suffixes": "".join(path.suffixes).lower()}
    if entry.prefix in _BUNDLED_FILES:
        return _sha256_file(corpora.bundled_path(_BUNDLED_FILES[entry.prefix]))
    if not entry.builtin:
        return {"model": _model_identity(model)}
    return None


def source_fingerprint(source: str, model=None) -> Any:
    """What identifies a source's content for caching: the bytes of its file for bundled and local data, else its name."""
    entry, arg = _resolve(source)
    return {"source": entry.prefix if entry.prefix == "file" else f"{entry.prefix}:{arg}", "content": _content_fingerprint(entry, arg, model)}


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


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in the same folder renamed into place.

    ``write(fh)`` gets a binary file. Readers never see a partial file, and an
    interruption (an error, a cancel, Ctrl-C) leaves no file at all.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _save_cached(path: Path, key: str, ids) -> None:
    import torch

    try:
        atomic_write(path, lambda fh: torch.save({"key": key, "input_ids": ids}, fh))
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
    entry, arg = _resolve(source)
    source = source.strip()
    context = replace(context or SourceContext(), cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None)

    def call():
        if entry.wants_context:
            return entry.fn(arg, tokenizer, nsamples, seqlen, seed, model, context=context)
        return entry.fn(arg, tokenizer, nsamples, seqlen, seed, model)

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
            return CalibrationData(cached, source, _documents_of(call()) if with_documents else None)

    data = _as_data(call(), entry, source, tokenizer, nsamples, seqlen, seed)
    if cache_path is not None:
        _save_cached(cache_path, key, data.ids)
    if not with_documents:
        data.documents = None
    return data


# Sources whose documents can seed generation (``text_documents``).
TEXT_SOURCES = ("c4", "wikitext2", "books", "file", "hf")


def text_documents(source: str) -> list[str]:
    """The documents of a text source (``c4``, ``wikitext2``, ``books``, ``file:PATH``, ``hf:...``), without sampling."""
    entry, arg = _resolve(source)
    if entry.prefix not in TEXT_SOURCES:
        raise UserError(f"{source!r} is not a text corpus", hint=f"use one of: {', '.join(s for s in source_names() if s.split(':')[0] in TEXT_SOURCES)}")
    return [d for d in entry.fn(arg, None, 0, 0, 0, None) if d.strip()]


# ------------------------------------------------------------------ summary


# Windows the summary's perplexity reads: a proxy, so a bounded fraction of the cost of a pruning pass.
SUMMARY_WINDOWS = 32
_TOKEN_COUNTS: dict[tuple[str, str], int] = {}  # (documents hash, tokenizer) -> tokens; a study counts the same corpus per cell


def count_tokens(documents: Sequence[str], tokenizer, batch: int = 64) -> int:
    """Tokens in ``documents`` (no special tokens), tokenized in batches; remembered in-process per corpus and tokenizer."""
    digest = hashlib.sha256()
    for d in documents:
        digest.update(d.encode("utf-8") + b"\x00")
    key = (digest.hexdigest(), json.dumps(tokenizer_fingerprint(tokenizer), sort_keys=True))
    if key not in _TOKEN_COUNTS:
        total = 0
        for start in range(0, len(documents), batch):
            encoded = tokenizer(list(documents[start : start + batch]), add_special_tokens=False, verbose=False)["input_ids"]
            total += sum(len(ids) for ids in encoded)
        if len(_TOKEN_COUNTS) >= 32:
            _TOKEN_COUNTS.pop(next(iter(_TOKEN_COUNTS)))
        _TOKEN_COUNTS[key] = total
    return _TOKEN_COUNTS[key]


def token_divergence(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """Jensen-Shannon divergence in bits between the token frequencies of two id sets.

    0 when both use the tokens in the same proportions, 1 when they share no
    token. Unlike the KL divergence it is symmetric and finite when one set
    uses tokens the other never does (random ids against text).
    """
    import torch

    a = a.reshape(-1).long()
    b = b.reshape(-1).long()
    size = int(max(a.max(), b.max())) + 1
    p = torch.bincount(a, minlength=size).double()
    q = torch.bincount(b, minlength=size).double()
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x):
        nz = x > 0
        return float((x[nz] * torch.log2(x[nz] / m[nz])).sum())

    return max(0.0, 0.5 * (kl(p) + kl(q)))


def calibration_summary(
    data: CalibrationData,
    tokenizer,
    model=None,
    device=None,
    batch_size: int = 8,
    compare: CalibrationData | None = None,
    cancel: Callable[[], bool] | None = None,
    max_windows: int = SUMMARY_WINDOWS,
) -> dict:
    """What a calibration set is, before pruning on it.

    ``documents`` and ``tokens`` count the source's text (None for token
    sources); ``perplexity`` is the model's perplexity on the first
    ``max_windows`` calibration windows (a cheap proxy of how close the data
    is to what the model was trained on; needs ``model``); ``divergence`` is
    the Jensen-Shannon divergence (bits) between the token frequencies of all
    the windows and ``compare``'s.
    """
    nsamples, seqlen = data.ids.shape
    out: dict = {
        "source": data.source,
        "windows": int(nsamples),
        "seqlen": int(seqlen),
        "documents": len(data.documents) if data.documents is not None else None,
        "tokens": count_tokens(data.documents, tokenizer) if data.documents is not None else None,
    }
    if model is not None:
        from workbench.evaluation.placement import placed
        from workbench.perplexity import perplexity

        windows = data.ids[:max_windows]
        with placed(model, device if device is not None else "cpu") as dev:
            result = perplexity(model, windows.reshape(1, -1), int(seqlen), batch_size=batch_size, device=dev, cancel=cancel)
        out["perplexity"] = float(result["ppl"])
        out["perplexity_windows"] = int(windows.shape[0])
    if compare is not None:
        out["divergence"] = {"from": compare.source, "js_bits": token_divergence(data.ids, compare.ids)}
    return out


def summary_line(summary: dict) -> str:
    """One line for logs: ``books: 2 documents, 212,345 tokens; dense perplexity 61.2 on 32 x 256; JS divergence 0.21 bits from c4``."""
    parts = []
    if summary.get("documents") is not None:
        parts.append(f"{summary['documents']:,} documents, {summary['tokens']:,} tokens")
    else:
        parts.append("token ids without text")
    if summary.get("perplexity") is not None:
        parts.append(f"dense perplexity {summary['perplexity']:.2f} on {summary['perplexity_windows']} x {summary['seqlen']} tokens")
    div = summary.get("divergence")
    if div:
        parts.append(f"token JS divergence {div['js_bits']:.3f} bits from {div['from']}")
    return f"calibration data {summary['source']}: " + "; ".join(parts)

"""The calibration sources: ONE registry that validation, the engine, the UI, the preview and the worker all ask. No torch.

Sources (``describe_source`` gives a one-line description of each):

- ``c4``: the bundled 1,000 C4 (en) train documents; the default, as in the
  SparseGPT and Wanda papers.
- ``wikitext2``: the WikiText-2 raw validation text as one document (the
  train split is not bundled; evaluation reads test).
- ``books``: the two held-out Project Gutenberg books of
  ``assets/data/books-calib.txt``, one document each: in-domain text the
  bundled demo model never saw in training.
- ``file:PATH``: a local .txt/.jsonl/.json/.csv/.parquet file
  (``workbench.data.corpora.file_documents``).
- ``hf:NAME[:CONFIG]:SPLIT[:FIELD]``: a Hugging Face Hub dataset.
- ``random``: uniform random token ids (no text), special tokens excluded.
- ``selfgen[:CORPUS]``: text the model generates itself from the first tokens
  of a seed corpus (``workbench.data.selfgen``; settings in ``[calibration.selfgen]``).
- ``mix:A=0.5,B=0.5``: the given fractions of the samples drawn from each
  source (``parse_mixture``).
- anything added with ``register_source``: it is then valid in a preset, in
  the UI, in a preview and in a run, because they all ask this registry.

A source's function is a callable or a ``"module:function"`` reference,
imported only when samples are built (``workbench.data.sampling``): so this
module, which the spec validator and the UI import, never imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from workbench.errors import UserError
from workbench.registry import load

from . import corpora

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_SOURCE = "c4"
# Seed corpora of self-generated calibration data: text sources, never an evaluation text.
SELFGEN_CORPORA = ("wikitext2", "c4", "books")
# The texts perplexity is measured on (workbench.perplexity reads them), besides file:PATH.
EVALUATION_SETS = ("wikitext2", "c4", "books")

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
class Source:
    prefix: str
    fn: SourceFn | str  # a callable, or "module:function" imported when samples are built
    usage: str
    describe: Callable[[str], str]
    takes_arg: bool | None  # True: required, False: refused, None: optional
    cacheable: bool
    builtin: bool
    join_documents: bool = False  # windows are cut from the documents joined by a blank line
    wants_context: bool = False  # fn also takes context=SourceContext

    def function(self) -> SourceFn:
        return load(self.fn) if isinstance(self.fn, str) else self.fn


_SOURCES: dict[str, Source] = {}


def register_source(
    prefix: str,
    fn: SourceFn | str,
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
    _SOURCES[prefix] = Source(
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


def resolve(source: str) -> tuple[Source, str]:
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
    entry, arg = resolve(source)
    return entry.describe(arg)


def check_source(source: str, key: str = "calibration.source") -> None:
    """Validation of a calibration source (presets, the UI): a known source written as it should be, without the model.

    A mixture's parts are checked one by one, and ``selfgen:CORPUS`` names a seed corpus.
    """
    if isinstance(source, str) and source.strip().lower().startswith("mix:"):
        for part, _ in parse_mixture(source.strip()[len("mix:"):], key):
            check_source(part, f"{key} (in the mixture)")
        return
    if isinstance(source, str) and source.strip().startswith("selfgen:"):
        check_seed_corpus(source.strip()[len("selfgen:"):], key)
        return
    try:
        resolve(source)
    except UserError as exc:
        known = isinstance(source, str) and source.partition(":")[0].strip().lower() in _SOURCES
        detail = f" ({exc.message})" if known else ""
        raise UserError(f"{key} = {source!r} is not a calibration source{detail}",
                        f"allowed: {', '.join(source_names())}") from None


def check_seed_corpus(corpus: str, key: str = "calibration.selfgen.corpus") -> None:
    """Self-generated data starts from a text corpus: a bundled one, a local file or a Hub dataset."""
    if corpus in SELFGEN_CORPORA or any(corpus.startswith(p) and len(corpus) > len(p) for p in ("file:", "hf:")):
        return
    raise UserError(f"{key}: {corpus!r} is not a seed corpus for selfgen",
                    f"allowed: {', '.join(SELFGEN_CORPORA)}, file:PATH, hf:NAME[:CONFIG]:SPLIT[:FIELD]")


def check_evaluation_set(name: str, key: str = "evaluate.perplexity") -> None:
    if name not in EVALUATION_SETS and not (name.startswith("file:") and len(name) > len("file:")):
        raise UserError(f"{key}: unknown dataset {name!r}", f"allowed: {', '.join(EVALUATION_SETS)}, file:PATH")


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


def _describe_file(arg: str) -> str:
    suffix, _ = corpora.file_suffix(Path(arg))
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
    _SOURCES[prefix] = Source(prefix, fn, usage, describe, takes_arg, cacheable, builtin=True, wants_context=wants_context)


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
_builtin("random", "workbench.data.sampling:random_tokens", "random", lambda arg: "uniform random token ids (no text), special tokens excluded", False, cacheable=False)


def _describe_selfgen(arg: str) -> str:
    return f"text the model generates from the first tokens of {arg or 'its seed corpus'}, its worst-perplexity samples dropped"


register_source(
    "selfgen",
    "workbench.data.selfgen:selfgen_source",
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
    here (``check_source`` and ``resolve`` do).
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

def _describe_mixture(arg: str) -> str:
    parts = parse_mixture(arg)
    return "a mixture: " + ", ".join(f"{fraction:.0%} of the samples from {source}" for source, fraction in parts)


register_source("mix", "workbench.data.sampling:mixture", description=_describe_mixture, usage="mix:SOURCE=FRACTION,...", takes_arg=True, wants_context=True)


__all__ = ["Source", "SourceContext", "CalibrationData", "register_source", "resolve", "describe_source", "source_names",
           "check_source", "check_seed_corpus", "check_evaluation_set", "parse_mixture", "mixture_counts",
           "DEFAULT_SOURCE", "SELFGEN_CORPORA", "EVALUATION_SETS"]

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

A source registered with ``text=True`` gives documents without a tokenizer or
a model (the bundled corpora, files, Hub datasets): such a source can also
seed self-generation (``selfgen:CORPUS``) and have its documents counted
(``workbench.data.sampling.text_documents``). A source may check its argument
at validation time (``check``; a mixture checks each part, ``selfgen:CORPUS``
its seed corpus). Mixtures are parsed in ``workbench.data.mixtures``; the
evaluation texts have their own registry, ``workbench.data.evaluation_text``.

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
from .mixtures import describe_mixture, mixture_counts, parse_mixture  # noqa: F401  (mixture_counts: asked here by the UI)

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_SOURCE = "c4"

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
    text: bool = False  # a text corpus: fn gives documents without tokenizer or model (seeds selfgen, counted by vocab steps)
    check: Callable[[str, str], None] | None = None  # check(arg, key): validation of a given argument, without the model

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
    text: bool = False,
    check: Callable[[str, str], None] | None = None,
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
    (generated samples). With ``text=True`` the function returns documents
    whatever its other arguments (it is called with no tokenizer and no
    model), and the source can seed ``selfgen:PREFIX``. ``check(arg, key)``,
    when given, validates an argument (raising ``UserError``) whenever a
    preset or the UI names the source with one.

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
        text=text,
        check=check,
    )


def source_names() -> list[str]:
    """How each known source is written, e.g. ``["c4", "wikitext2", "file:PATH", ...]``."""
    return [s.usage for s in _SOURCES.values()]


def text_source_names() -> list[str]:
    """How each text corpus is written (the sources that can seed ``selfgen``), e.g. ``["c4", ..., "file:PATH", ...]``."""
    return [s.usage for s in _SOURCES.values() if s.text]


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

    A source with a ``check`` checks its argument: a mixture's parts are
    checked one by one, and ``selfgen:CORPUS`` names a seed corpus.
    """
    if isinstance(source, str):
        prefix, sep, arg = source.strip().partition(":")
        entry = _SOURCES.get(prefix.strip().lower())
        if entry is not None and entry.check is not None and sep:
            entry.check(arg.strip(), key)
            return
    try:
        resolve(source)
    except UserError as exc:
        known = isinstance(source, str) and source.partition(":")[0].strip().lower() in _SOURCES
        detail = f" ({exc.message})" if known else ""
        raise UserError(f"{key} = {source!r} is not a calibration source{detail}",
                        f"allowed: {', '.join(source_names())}") from None


def check_text_source(source: str, key: str) -> None:
    """Validation of a source whose documents are read as text (a vocabulary step's corpus): a known source, and a text corpus."""
    check_source(source, key)
    entry, _ = resolve(source)
    if not entry.text:
        raise UserError(f"{key} = {source!r} is not a text corpus", f"allowed: {', '.join(text_source_names())}")


def check_seed_corpus(corpus: str, key: str = "calibration.selfgen.corpus") -> None:
    """Self-generated data starts from a text corpus (a source registered with ``text=True``): a bundled one, a local
    file, a Hub dataset."""
    try:
        entry, _ = resolve(corpus)
    except UserError:
        entry = None
    if entry is None or not entry.text:
        raise UserError(f"{key}: {corpus!r} is not a seed corpus for selfgen", f"allowed: {', '.join(text_source_names())}")


def _check_mixture(arg: str, key: str) -> None:
    for part, _ in parse_mixture(arg, key):
        check_source(part, f"{key} (in the mixture)")


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


def _builtin(prefix, fn, usage, describe, takes_arg, cacheable=True, wants_context=False, text=False, check=None):
    _SOURCES[prefix] = Source(prefix, fn, usage, describe, takes_arg, cacheable, builtin=True, wants_context=wants_context,
                              text=text, check=check)


_builtin("c4", _c4_documents, "c4", lambda arg: "C4 (allenai/c4, en): random windows of the 1,000 bundled train documents", False,
         text=True)
_builtin(
    "wikitext2",
    _wikitext2_documents,
    "wikitext2",
    lambda arg: "WikiText-2 raw validation text as one document, random windows of it (train is not bundled)",
    False,
    text=True,
)
_builtin(
    "books",
    _books_documents,
    "books",
    lambda arg: "two held-out Project Gutenberg books (The Trial; Stalky & Co.), random windows of them",
    False,
    text=True,
)
_builtin("file", _file_documents, "file:PATH", _describe_file, True, text=True)
_builtin("hf", _hub_documents, "hf:NAME[:CONFIG]:SPLIT[:FIELD]", _describe_hub, True, text=True)
_builtin("random", "workbench.data.sampling:random_tokens", "random",
         lambda arg: "uniform random token ids (no text), special tokens excluded", False, cacheable=False)


def _describe_selfgen(arg: str) -> str:
    return f"text the model generates from the first tokens of {arg or 'its seed corpus'}, its worst-perplexity samples dropped"


register_source(
    "selfgen",
    "workbench.data.selfgen:selfgen_source",
    description=_describe_selfgen,
    usage="selfgen[:CORPUS]",
    join_documents=True,
    wants_context=True,
    check=check_seed_corpus,
)


# ------------------------------------------------------------------ mixtures (parsed in workbench.data.mixtures)


register_source("mix", "workbench.data.sampling:mixture", description=describe_mixture, usage="mix:SOURCE=FRACTION,...", takes_arg=True,
                wants_context=True, check=_check_mixture)


__all__ = ["Source", "SourceContext", "CalibrationData", "register_source", "resolve", "describe_source", "source_names",
           "text_source_names", "check_source", "check_text_source", "check_seed_corpus", "parse_mixture", "mixture_counts", "DEFAULT_SOURCE"]

"""The evaluation texts perplexity is measured on: ONE registry that the spec validator, the engine and the UI ask. No torch.

Built in (the papers' protocols, ``workbench.perplexity`` tokenizes and windows them):

- ``wikitext2``: the WikiText-2 raw test rows joined by ``"\\n\\n"``.
- ``c4``: the first ``C4_EVAL_DOCUMENTS`` (1,100) bundled C4 validation
  documents joined by ``" "``, truncated to ``C4_EVAL_WINDOWS`` (256) windows
  (SparseGPT's C4 protocol).
- ``books``: four held-out Project Gutenberg books (``assets/data/books-eval.txt``),
  in-domain text the bundled demo model never saw; calibration on ``books``
  uses two other books.
- ``file:PATH``: the text of a local file (``workbench.data.corpora.file_text``).

``register_evaluation_set`` adds another: it is then valid in
``evaluate.perplexity`` and measured by a run, because the validator and
``workbench.perplexity.eval_tokens`` both ask this registry. A set's text
function is a callable or a ``"module:function"`` reference, imported only
when the text is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from workbench.errors import UserError
from workbench.registry import load

from . import corpora

C4_EVAL_DOCUMENTS = 1100  # the C4 validation documents the c4 evaluation reads (the rest is held out, e.g. for search objectives)
C4_EVAL_WINDOWS = 256

TextFn = Callable[[str], str]  # fn(arg) -> the whole evaluation text ("" arg for sets that take none)


@dataclass(frozen=True)
class EvaluationSet:
    name: str
    text: TextFn | str  # a callable, or "module:function" imported when the text is read
    usage: str
    describe: Callable[[str], str]  # fn(arg) -> a one-line description
    takes_arg: bool  # True: written NAME:ARG (required); False: NAME alone
    max_windows: int | None = None  # only the first N windows of the tokenized text are evaluated
    stamp: Callable[[str], Any] | None = None  # what changes when the text does (in-process token cache key); None: fixed text
    builtin: bool = False

    def read(self, arg: str) -> str:
        fn = load(self.text) if isinstance(self.text, str) else self.text
        return fn(arg)


_SETS: dict[str, EvaluationSet] = {}


def register_evaluation_set(name: str, text: TextFn | str, *, description: str | Callable[[str], str] | None = None,
                            takes_arg: bool = False,
                            usage: str | None = None, max_windows: int | None = None,
                            stamp: Callable[[str], Any] | None = None) -> None:
    """Add an evaluation text named ``name`` (used as ``name``, or ``name:ARG`` with ``takes_arg``).

    ``text(arg)`` returns the whole text; it is tokenized in one call and cut
    into non-overlapping windows. ``max_windows`` keeps only the first windows
    (as the C4 protocol does). The tokens are cached in-process by name, arg
    and tokenizer, so a text that can change between reads should give
    ``stamp(arg)``, a value that changes with it (a file's size and mtime).
    ``description`` is a string, or a function of ``arg`` giving one.
    Registering an existing name replaces it.
    """
    name = name.strip().lower()
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"an evaluation set name is a lowercase word, not {name!r}")
    description = description or f"{name} (registered evaluation text)"
    describe = description if callable(description) else (lambda arg, _d=description: _d)
    _SETS[name] = EvaluationSet(name=name, text=text, usage=usage or (f"{name}:ARG" if takes_arg else name), describe=describe,
                                takes_arg=takes_arg, max_windows=max_windows, stamp=stamp)


def evaluation_set_names() -> list[str]:
    """How each known evaluation text is written, e.g. ``["wikitext2", "c4", "books", "file:PATH"]``."""
    return [s.usage for s in _SETS.values()]


def builtin_evaluation_sets() -> tuple[str, ...]:
    """The names of the bundled evaluation texts that take no argument (``wikitext2``, ``c4``, ``books``)."""
    return tuple(s.name for s in _SETS.values() if s.builtin and not s.takes_arg)


def resolve_evaluation_set(dataset: str) -> tuple[EvaluationSet, str]:
    """The registry entry of ``dataset`` and its argument; UserError naming the known texts when there is none."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise UserError("no evaluation dataset given", hint=f"use one of: {', '.join(evaluation_set_names())}")
    name, sep, arg = dataset.strip().partition(":")
    entry = _SETS.get(name.strip().lower())
    arg = arg.strip()
    if entry is None or (entry.takes_arg and not arg) or (not entry.takes_arg and sep):
        raise UserError(f"unknown evaluation dataset {dataset!r}", hint=f"use one of: {', '.join(evaluation_set_names())}")
    return entry, arg


def check_evaluation_set(name: str, key: str = "evaluate.perplexity") -> None:
    """Validation of an evaluation text (presets, the UI), without reading it."""
    try:
        resolve_evaluation_set(name)
    except UserError:
        raise UserError(f"{key}: unknown dataset {name!r}", f"allowed: {', '.join(evaluation_set_names())}") from None


def evaluation_text(dataset: str) -> str:
    """The whole text perplexity is measured on for ``dataset`` (see the module docstring)."""
    entry, arg = resolve_evaluation_set(dataset)
    return entry.read(arg)


def describe_evaluation_set(dataset: str) -> str:
    """A one-line human description of an evaluation text."""
    entry, arg = resolve_evaluation_set(dataset)
    return entry.describe(arg)


# ------------------------------------------------------------ built-in sets


def _wikitext2(arg: str) -> str:
    return corpora.wikitext2_text("test")


def _c4(arg: str) -> str:
    return " ".join(corpora.c4_documents("validation")[:C4_EVAL_DOCUMENTS])


def _books(arg: str) -> str:
    return corpora.books_text("eval")


def _file_stamp(arg: str):
    path = Path(arg).expanduser()
    try:
        st = path.stat()
    except OSError:
        return None  # reading the text raises the proper error
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _builtin(name: str, text: TextFn, describe: Callable[[str], str], takes_arg: bool = False, usage: str | None = None,
             max_windows: int | None = None, stamp: Callable[[str], Any] | None = None) -> None:
    _SETS[name] = EvaluationSet(name, text, usage or name, describe, takes_arg, max_windows, stamp, builtin=True)


_builtin("wikitext2", _wikitext2, lambda arg: "WikiText-2 raw test rows joined by a blank line (the papers' text)")
_builtin("c4", _c4, lambda arg: f"the first {C4_EVAL_DOCUMENTS:,} bundled C4 validation documents, the first {C4_EVAL_WINDOWS} "
                                "windows (SparseGPT's C4 protocol)", max_windows=C4_EVAL_WINDOWS)
_builtin("books", _books, lambda arg: "four held-out Project Gutenberg books the demo model never saw")
_builtin("file", corpora.file_text, lambda arg: f"the text of {arg}", takes_arg=True, usage="file:PATH", stamp=_file_stamp)


__all__ = ["EvaluationSet", "register_evaluation_set", "evaluation_set_names", "builtin_evaluation_sets",
           "resolve_evaluation_set", "check_evaluation_set", "evaluation_text", "describe_evaluation_set",
           "C4_EVAL_DOCUMENTS", "C4_EVAL_WINDOWS"]

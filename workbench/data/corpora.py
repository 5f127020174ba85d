"""Text corpora: the bundled WikiText-2, C4 and held-out books, local files, Hub datasets.

Everything here returns plain strings (documents); tokenizing and sampling
live in ``workbench.data.sampling`` and ``workbench.perplexity``. This module
never imports torch, and imports ``datasets`` only when a CSV/Parquet file or
a Hub dataset is read.

The bundled files are described in ``assets/data/SOURCES.md``. Parsed bundled
corpora are cached in-process, since a run reads them more than once.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import tempfile
from pathlib import Path

from workbench.errors import UserError

DATA_DIR = Path(__file__).resolve().parents[1] / "assets" / "data"

WIKITEXT2_FILES = {"test": "wikitext2-test.raw", "valid": "wikitext2-valid.raw"}
C4_FILES = {"train": "c4-train-1000.jsonl.gz", "validation": "c4-validation-2000.jsonl.gz"}
BOOKS_FILES = {"calib": "books-calib.txt", "eval": "books-eval.txt"}

# Suffixes ``file_documents`` reads; ``.gz`` of the text formats is read too.
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
TEXT_FIELD = "text"


def bundled_path(name: str) -> Path:
    """Path of one bundled data file (``assets/data/NAME``)."""
    return DATA_DIR / name


# ---------------------------------------------------------------- WikiText-2


def _split_name(split: str, allowed: dict[str, str], corpus: str) -> str:
    if split not in allowed:
        raise UserError(
            f"{corpus} has no bundled split {split!r}",
            hint=f"use one of: {', '.join(allowed)}",
        )
    return allowed[split]


@functools.lru_cache(maxsize=None)
def _wikitext2_rows(split: str) -> tuple[str, ...]:
    path = bundled_path(_split_name(split, WIKITEXT2_FILES, "WikiText-2"))
    # newline="" keeps the file's line ends as they are, so the rows match the
    # Hugging Face `datasets` rows byte for byte.
    with open(path, encoding="utf-8", newline="") as fh:
        text = fh.read()
    # The raw files write an empty row as " \n"; `datasets` gives "" for it and
    # keeps the trailing "\n" on every other row.
    return tuple(line + "\n" if line.strip() else "" for line in text.split("\n")[:-1])


def wikitext2_rows(split: str = "test") -> list[str]:
    """The rows of WikiText-2 raw (``wikitext-2-raw-v1``) exactly as Hugging Face ``datasets`` gives them.

    ``split`` is ``"test"`` (4,358 rows, 1,467 of them empty) or ``"valid"``.
    The train split is not bundled.
    """
    return list(_wikitext2_rows(split))


@functools.lru_cache(maxsize=None)
def wikitext2_text(split: str = "test") -> str:
    """``"\\n\\n".join(rows)``: the text the pruning papers (SparseGPT, Wanda) evaluate perplexity on."""
    return "\n\n".join(_wikitext2_rows(split))


# ------------------------------------------------------------------------ C4


@functools.lru_cache(maxsize=None)
def _c4_documents(split: str) -> tuple[str, ...]:
    path = bundled_path(_split_name(split, C4_FILES, "C4"))
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return tuple(json.loads(line)[TEXT_FIELD] for line in fh if line.strip())


def c4_documents(split: str = "train") -> list[str]:
    """The bundled C4 (``allenai/c4``, en) documents: ``"train"`` (1,000) or ``"validation"`` (2,000)."""
    return list(_c4_documents(split))


# --------------------------------------------------------------------- books


@functools.lru_cache(maxsize=None)
def books_text(split: str = "calib") -> str:
    """The held-out Project Gutenberg books: ``"calib"`` (two books) or ``"eval"`` (four other books).

    The demo model never saw these books in training, so they are in-domain
    text it has not memorized: ``calib`` for calibration, ``eval`` for
    perplexity. Paragraphs are separated by a blank line, books by two.
    """
    path = bundled_path(_split_name(split, BOOKS_FILES, "the books corpus"))
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def books_documents(split: str = "calib") -> list[str]:
    """One document per book (books are separated by two blank lines)."""
    return [book for book in re.split(r"\n{3,}", books_text(split)) if book.strip()]


# --------------------------------------------------------------------- files


def file_suffix(path: Path) -> tuple[str, bool]:
    """The format suffix of ``path`` and whether it is gzip-compressed."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        return (suffixes[-2] if len(suffixes) >= 2 else ""), True
    return (suffixes[-1] if suffixes else ""), False


def _read_text(path: Path, compressed: bool) -> str:
    """Read a UTF-8 text file, refusing empty and binary ones."""
    try:
        data = path.read_bytes()
        if compressed:
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}", hint="check the file and its permissions") from exc
    if not data.strip():
        raise UserError(f"{path} is empty", hint="give a file with text in it")
    if b"\x00" in data:
        raise UserError(f"{path} looks binary (it holds NUL bytes), not text", hint="give a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not valid UTF-8 text (byte {exc.start}: {exc.reason})",
            hint="convert the file to UTF-8",
        ) from exc
    # Universal newlines, as Python's text mode (and the `datasets` text builder) read files.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _field_error(path: Path, fields, where: str = "") -> UserError:
    found = ", ".join(repr(f) for f in fields) if fields else "none"
    return UserError(
        f"{path}{where} has no {TEXT_FIELD!r} field (fields found: {found})",
        hint=f"store each document's text in a field named {TEXT_FIELD!r}",
    )


def _record_text(path: Path, record, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if TEXT_FIELD not in record:
            raise _field_error(path, list(record), where)
        value = record[TEXT_FIELD]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise UserError(
                f"{path}{where}: field {TEXT_FIELD!r} holds {type(value).__name__}, not text",
                hint=f"store each document's text as a string in {TEXT_FIELD!r}",
            )
        return value
    raise UserError(
        f"{path}{where} holds a JSON {type(record).__name__}, not an object with a {TEXT_FIELD!r} field",
        hint=f'write one object per document, e.g. {{"{TEXT_FIELD}": "..."}}',
    )


def _json_documents(path: Path, text: str, lines: bool) -> list[str]:
    if lines:
        docs = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number} is not valid JSON: {exc.msg}", hint="write one JSON object per line") from exc
            docs.append(_record_text(path, record, f" line {number}"))
        return docs
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})",
                        hint="check the file, or use .jsonl for one object per line") from exc
    if isinstance(data, dict):
        # {"text": [...]} (column layout) or {"data": [...]} / {"rows": [...]} wrappers.
        if isinstance(data.get(TEXT_FIELD), list):
            data = data[TEXT_FIELD]
        elif isinstance(data.get(TEXT_FIELD), str):
            data = [data]
        else:
            lists = [k for k, v in data.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise _field_error(path, list(data))
            data = data[lists[0]]
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}", hint=f'give a list of objects with a {TEXT_FIELD!r} field')
    return [_record_text(path, record, f" item {i}") for i, record in enumerate(data)]


def _table_documents(path: Path, builder: str) -> list[str]:
    """CSV and Parquet go through `datasets` (its packaged csv/parquet builders)."""
    if builder == "csv":
        _read_text(path, compressed=False)  # same empty/binary/UTF-8 checks as for text files
    elif path.stat().st_size == 0:
        raise UserError(f"{path} is empty", hint="give a file with rows in it")
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    # A throwaway cache folder and an in-memory table: reading a local file
    # should not leave a copy of it in the user's `datasets` cache.
    with tempfile.TemporaryDirectory(prefix="workbench-datasets-", ignore_cleanup_errors=True) as scratch:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=scratch, keep_in_memory=True)
        except Exception as exc:  # pyarrow/pandas raise many kinds for a malformed file
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot read {path} as {builder}: {first_line}", hint=f"check that the file is valid {builder}") from exc
        finally:
            if bars:
                datasets.enable_progress_bars()
        if TEXT_FIELD not in table.column_names:
            raise _field_error(path, table.column_names)
        docs = [value if isinstance(value, str) else ("" if value is None else str(value)) for value in table[TEXT_FIELD]]
        del table
    return docs


def file_documents(path: str | os.PathLike) -> list[str]:
    """The documents in a local file.

    - ``.txt``: the whole file is ONE document (random calibration windows are
      cut from it; splitting on blank lines would leave mostly paragraphs
      shorter than a calibration window, which the sampler skips). Line ends
      are normalized to ``"\\n"``.
    - ``.jsonl``: one JSON object per line, its ``"text"`` field.
    - ``.json``: a list of objects with a ``"text"`` field (or of strings), or
      an object holding such a list.
    - ``.csv``, ``.parquet``: the ``"text"`` column, read through `datasets`.
    - ``.txt.gz``, ``.jsonl.gz``, ``.json.gz``: the same, gzip-compressed.

    Empty documents are dropped. Raises ``UserError`` for a missing, empty,
    binary or non-UTF-8 file, an unknown extension, or a missing text field.
    """
    path = Path(path).expanduser()
    suffix, compressed = file_suffix(path)
    if not path.exists():
        raise UserError(f"no such file: {path}", hint="check the path (relative paths start at the current directory)")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a file", hint="give one data file")
    if suffix not in FILE_SUFFIXES or (compressed and suffix in (".csv", ".parquet")):
        raise UserError(
            f"cannot read {path.name}: unknown file type {''.join(path.suffixes) or '(no extension)'}",
            hint=f"supported: {', '.join(FILE_SUFFIXES)} (and .txt.gz, .jsonl.gz, .json.gz)",
        )
    if suffix in (".csv", ".parquet"):
        docs = _table_documents(path, suffix[1:])
    else:
        text = _read_text(path, compressed)
        if suffix == ".txt":
            docs = [text]
        else:
            docs = _json_documents(path, text, lines=suffix == ".jsonl")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{path} holds no text", hint=f"every {TEXT_FIELD!r} value in it is empty")
    return docs


def file_text(path: str | os.PathLike) -> str:
    """The text of a local file: the whole file for ``.txt``, else its documents joined by a blank line."""
    return "\n\n".join(file_documents(path))


# ----------------------------------------------------------------------- Hub

_DATA_FILE_ENDINGS = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet", ".csv", ".txt", ".arrow")
_SPLITS = {"train", "validation", "valid", "test", "dev", "eval", "evaluation"}


def _spec_parts(spec: str) -> list[str]:
    """Split on ``:`` except inside brackets, so ``train[:1000]`` stays whole."""
    parts, depth, current = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        if ch == ":" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _looks_like_split(part: str) -> bool:
    return re.split(r"[\[+]", part, maxsplit=1)[0].strip() in _SPLITS


def parse_hub_spec(spec: str) -> tuple[str, str | None, str, str]:
    """``NAME[:CONFIG]:SPLIT[:FIELD]`` -> ``(name, config, split, field)``.

    Three parts are read as ``NAME:CONFIG:SPLIT`` unless the middle one is a
    usual split name (``train``, ``validation``, ``test``, ...), in which
    case they are ``NAME:SPLIT:FIELD``. An empty CONFIG (``NAME::SPLIT:FIELD``)
    means the default configuration. A split may carry a slice
    (``train[:5000]``). FIELD defaults to ``"text"``. A CONFIG naming files
    (with ``/``, ``*`` or a data-file extension) is passed as ``data_files``
    (whose split is then ``train``), e.g.
    ``allenai/c4:en/c4-train.00000-of-01024.json.gz:train``.
    """
    parts = _spec_parts(spec)
    hint = "write hf:NAME[:CONFIG]:SPLIT[:FIELD], e.g. hf:allenai/c4:en:validation[:2000]:text"
    if any(not p for i, p in enumerate(parts) if not (i == 1 and len(parts) == 4)):
        raise UserError(f"cannot read the dataset spec {spec!r}", hint=hint)
    if len(parts) == 2:
        name, config, split, field = parts[0], None, parts[1], TEXT_FIELD
    elif len(parts) == 3:
        if _looks_like_split(parts[1]) and not _looks_like_split(parts[2]):
            name, config, split, field = parts[0], None, parts[1], parts[2]
        else:
            name, config, split, field = parts[0], parts[1], parts[2], TEXT_FIELD
    elif len(parts) == 4:
        name, config, split, field = parts[0], parts[1] or None, parts[2], parts[3]
    else:
        raise UserError(f"cannot read the dataset spec {spec!r}", hint=hint)
    return name, config, split, field


def config_names_files(config: str | None) -> bool:
    """Whether a Hub spec's CONFIG part names data files rather than a configuration."""
    return config is not None and ("/" in config or "*" in config or config.lower().endswith(_DATA_FILE_ENDINGS))


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=4)
def _hub_documents(name: str, config: str | None, split: str, field: str) -> tuple[str, ...]:
    import datasets

    label = name + (f" ({config})" if config else "")
    # A CONFIG that names files (has "/" or "*" or a data-file extension) selects
    # them as data_files, e.g. one C4 shard as the Wanda reference code loads it.
    files = config_names_files(config)
    try:
        if files:
            table = datasets.load_dataset(name, data_files=config, split=split)
        else:
            table = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, TimeoutError) as exc:
        why = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _offline() else "the Hugging Face Hub is unreachable"
        raise UserError(
            f"cannot load the dataset {label}: {why} and it is not in the local datasets cache",
            hint="unset HF_HUB_OFFLINE (and HF_DATASETS_OFFLINE) with a network connection, or use a local file with file:PATH",
        ) from exc
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        offline = " (HF_HUB_OFFLINE is set, so only cached datasets load)" if _offline() else ""
        raise UserError(
            f"cannot load the dataset {label} split {split!r}: {message}{offline}",
            hint="check the dataset name, config and split on the Hub, or use a local file with file:PATH",
        ) from exc
    if isinstance(table, dict) or not hasattr(table, "column_names"):
        raise UserError(f"{label}: {split!r} is not one split", hint="name exactly one split, e.g. train")
    if field not in table.column_names:
        raise UserError(
            f"the dataset {label} has no field {field!r} (fields: {', '.join(table.column_names)})",
            hint="name the text field last: hf:NAME[:CONFIG]:SPLIT:FIELD",
        )
    return tuple(v for v in table[field] if isinstance(v, str) and v.strip())


def hub_documents(spec: str) -> list[str]:
    """Documents of a Hugging Face Hub dataset, ``NAME[:CONFIG]:SPLIT[:FIELD]`` (see ``parse_hub_spec``).

    The split is loaded through ``datasets.load_dataset`` (downloaded whole
    the first time; a slice such as ``train[:5000]`` limits what is kept).
    Offline or unreachable Hub -> ``UserError`` pointing at HF_HUB_OFFLINE
    and at ``file:PATH``.
    """
    docs = _hub_documents(*parse_hub_spec(spec))
    if not docs:
        raise UserError(f"the dataset {spec!r} holds no text", hint="check the split and the field name")
    return list(docs)

"""The classification data sets of the in-context learning runner, as one declarative table.

Each entry names its bundled files (``workbench/assets/classification``, see
``workbench/assets/data/SOURCES.md``), how a line is read, the prompt template
and the label words (``label_words[i]`` is the word the model must put after
the prompt for label ``i``). The templates and words follow the ones common in
the ICL literature (Zhao et al. 2021, "Calibrate Before Use"; Su et al. 2024,
DAIL). A data set of one's own is ``file:PATH.jsonl`` with one
``{"text": ..., "label": ...}`` object per line, its label words and template
given in the spec (``evaluate.icl_labels``, ``evaluate.icl_template``).

No torch here: the spec validator checks names and settings against this table.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import UserError

from .book_task import items as book_items
from .shifts import parse_set_name
from .tta_settings import check as check_tta, configs_from_spec as tta_configs

DATA = Path(__file__).resolve().parents[1] / "assets" / "classification"
MODES = ("zeroshot", "fewshot", "dail")
RETRIEVERS = ("bm25", "hidden")


@dataclass(frozen=True)
class DataSet:
    """One classification data set: where its examples are and how they become prompts."""

    name: str
    title: str
    template: str  # str.format over the example's fields, e.g. "Review: {text}\nSentiment:"
    label_words: tuple[str, ...]
    test: str  # file under DATA (or a path, for file: data sets)
    train: str | None = None  # few-shot demonstrations are drawn from here
    reader: str = "harvardnlp"  # harvardnlp | superglue | agnews | jsonl | books (built by book_task)
    labels: tuple[str, ...] = ()  # the file's label names by index, where the file writes names
    encoding: str = "utf-8"
    fields: tuple[str, ...] = field(default=("text",))
    multiple_choice: bool = False  # each example has its own choices (scored per byte); no label words

    def choices(self, example: Example) -> tuple[str, ...]:
        """What is scored after the prompt for this example: its own choices, or the set's label words."""
        return example.choices if self.multiple_choice else self.label_words


_SENTIMENT = "Review: {text}\nSentiment:"
_NLI = "{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:"

DATASETS: dict[str, DataSet] = {d.name: d for d in (
    DataSet("sst2", "SST-2", _SENTIMENT, ("negative", "positive"), "stsa.binary.test.gz", "stsa.binary.train.gz"),
    DataSet("sst5", "SST-5", _SENTIMENT, ("terrible", "bad", "okay", "good", "great"),
            "stsa.fine.test.gz", "stsa.fine.train.gz"),
    DataSet("mr", "MR", _SENTIMENT, ("negative", "positive"), "rt-polarity.all.gz", encoding="latin-1"),
    DataSet("cr", "CR", _SENTIMENT, ("negative", "positive"), "custrev.all.gz"),
    # harvardnlp's Subj: 0 subjective, 1 objective
    DataSet("subj", "Subj", "Input: {text}\nType:", ("subjective", "objective"), "subj.all.gz", encoding="latin-1"),
    # harvardnlp's TREC coarse classes: 0 DESC, 1 ENTY, 2 ABBR, 3 HUM, 4 LOC, 5 NUM
    DataSet("trec", "TREC", "Question: {text}\nAnswer Type:",
            ("description", "entity", "abbreviation", "person", "location", "number"),
            "TREC.test.all.gz", "TREC.train.all.gz", encoding="latin-1"),
    DataSet("agnews", "AG News", "Article: {text}\nAnswer:", ("world", "sports", "business", "technology"),
            "agnews-test.csv.gz", reader="agnews"),
    DataSet("rte", "RTE", "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", ("true", "false"),
            "rte-val.jsonl.gz", "rte-train.jsonl.gz", reader="superglue", labels=("entailment", "not_entailment"),
            fields=("premise", "hypothesis")),
    DataSet("cb", "CB", _NLI, ("true", "false", "neither"), "cb-val.jsonl.gz", "cb-train.jsonl.gz",
            reader="superglue", labels=("entailment", "contradiction", "neutral"), fields=("premise", "hypothesis")),
    # the true next sentence of a passage of the held-out books among four (workbench.evaluation.book_task)
    DataSet("books-next", "Books next sentence", "{context}", (), "books-eval.txt", reader="books",
            fields=("context",), multiple_choice=True),
)}


@dataclass(frozen=True)
class Example:
    fields: dict
    label: int  # the gold label's index; the DAIL memory never sees it
    choices: tuple[str, ...] = ()  # a multiple-choice example's own candidates (label indexes them)

    def text(self) -> str:
        """The example's text as retrieval sees it (every field, in order)."""
        return " ".join(str(v) for v in self.fields.values())


def get_dataset(name: str, labels: list[str] | tuple[str, ...] = (), template: str = "") -> DataSet:
    """A bundled data set by name, or a ``file:PATH.jsonl`` one with its label words and template."""
    if name.startswith("file:"):
        path = name[len("file:"):]
        return DataSet(name, Path(path).name, template or "{text}\nAnswer:", tuple(labels), path, reader="jsonl")
    if name not in DATASETS:
        raise UserError(f"unknown in-context learning data set {name!r}",
                        f"bundled: {', '.join(DATASETS)}; or file:PATH.jsonl with evaluate.icl_labels and icl_template")
    return DATASETS[name]


def _open(path: Path, encoding: str):
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the data set file '{path}': {exc.strerror or exc}",
                        "check the path (file:PATH.jsonl, one JSON object per line)") from None
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        return io.StringIO(raw.decode(encoding))
    except UnicodeDecodeError:
        raise UserError(f"the data set file '{path}' is not {encoding} text", "save it as UTF-8 JSON lines") from None


def _label_index(ds: DataSet, value, where: str) -> int:
    """The label's index in the table; a label the table does not have is bad input, never a silent guess."""
    words = ds.labels or ds.label_words
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and 0 <= value < len(ds.label_words):
        return value
    if isinstance(value, str):
        if value in words:
            return words.index(value)
        if value.strip().lstrip("-").isdigit() and 0 <= int(value) < len(ds.label_words):
            return int(value)
    raise UserError(f"{where}: label {value!r} is not in the label table of {ds.title} "
                    f"({', '.join(f'{i}={w}' for i, w in enumerate(words))})",
                    "fix the data file, or give one label word per label (evaluate.icl_labels)")


def read_examples(ds: DataSet, split: str = "test") -> list[Example]:
    """Every example of one split, with its gold label index."""
    name = ds.test if split == "test" else ds.train
    if name is None:
        raise UserError(f"{ds.title} has no train split for few-shot demonstrations",
                        f"use icl_modes zeroshot or dail for {ds.name}; few-shot needs one of: "
                        f"{', '.join(n for n, d in DATASETS.items() if d.train)}")
    if ds.reader == "books":
        return [Example({"context": it["context"]}, it["label"], tuple(it["choices"])) for it in book_items()]
    path = Path(name).expanduser() if ds.reader == "jsonl" else DATA / name
    text = _open(path, ds.encoding)
    out: list[Example] = []
    if ds.reader == "harvardnlp":  # "<label> <sentence>" per line
        for i, line in enumerate(text):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            label, _, sentence = line.partition(" ")
            out.append(Example({"text": sentence.strip()}, _label_index(ds, label, f"{path.name} line {i + 1}")))
    elif ds.reader == "agnews":  # CSV with a header: class index (1-4), title, description
        rows = csv.reader(text)
        next(rows, None)
        for i, row in enumerate(rows):
            label = int(row[0]) - 1 if row and row[0].isdigit() else row[0] if row else None
            body = " ".join(part.replace("\\", " ").strip() for part in row[1:3])
            out.append(Example({"text": body}, _label_index(ds, label, f"{path.name} row {i + 2}")))
    else:  # JSON lines: superglue (premise, hypothesis, label name) or file: data sets (text, label)
        for i, line in enumerate(text):
            if not line.strip():
                continue
            where = f"{path.name} line {i + 1}"
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{where} is not JSON", "one JSON object per line: {\"text\": ..., \"label\": ...}") from None
            missing = [f for f in (*ds.fields, "label") if not isinstance(row, dict) or f not in row]
            if missing:
                raise UserError(f"{where} has no {', '.join(repr(m) for m in missing)}",
                                "one JSON object per line: {\"text\": ..., \"label\": ...}")
            out.append(Example({f: row[f] for f in ds.fields}, _label_index(ds, row["label"], where)))
    if not out:
        raise UserError(f"the data set file '{path}' has no examples", "one example per line")
    return out


def query_subset(n: int, limit: int | None) -> list[int]:
    """The test queries evaluated: all of them, or a fixed random subset of ``limit`` (independent of the order seeds).

    A random rather than a leading subset, since several bundled files are sorted by label.
    """
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(0).sample(range(n), limit))


def check_icl_settings(e, where: str = "evaluate") -> None:
    """Validate the ``icl_*`` settings of an EvalSpec (called by the spec validator)."""
    for mode in e.icl_modes:
        if mode not in MODES:
            raise UserError(f"{where}.icl_modes: {mode!r} is not a mode", f"allowed: {', '.join(MODES)}")
    if e.icl and not e.icl_modes:
        raise UserError(f"{where}.icl_modes is empty", f"pick one or more of: {', '.join(MODES)}")
    for shifted in e.icl:
        name, _ = parse_set_name(shifted, f"{where}.icl")
        if name in DATASETS and DATASETS[name].multiple_choice and set(e.icl_modes) - {"zeroshot"}:
            raise UserError(f"{where}.icl: {name} is multiple choice (each query has its own candidates), so it has no "
                            f"label words for {' or '.join(sorted(set(e.icl_modes) - {'zeroshot'}))} demonstrations",
                            f'use {where}.icl_modes = ["zeroshot"] with it')
        if name.startswith("file:"):
            if len(name) == len("file:"):
                raise UserError(f"{where}.icl: 'file:' needs a path", "write file:PATH.jsonl")
            if len(e.icl_labels) < 2:
                raise UserError(f"{where}.icl: {name} needs its label words",
                                f'set {where}.icl_labels = ["negative", "positive"] (one per label index)')
            if e.icl_template and "{text}" not in e.icl_template:
                raise UserError(f"{where}.icl_template = {e.icl_template!r} has no {{text}}", 'for example "Review: {text}\\nSentiment:"')
            if "fewshot" in e.icl_modes:
                raise UserError(f"{where}.icl: {name} has no train split for few-shot demonstrations", "use icl_modes zeroshot or dail")
        elif name not in DATASETS:
            raise UserError(f"{where}.icl: unknown data set {name!r}",
                            f"bundled: {', '.join(DATASETS)}; or file:PATH.jsonl")
        elif "fewshot" in e.icl_modes and DATASETS[name].train is None:
            raise UserError(f"{where}.icl: {name} has no train split for few-shot demonstrations",
                            f"drop fewshot from icl_modes, or use one of: {', '.join(n for n, d in DATASETS.items() if d.train)}")
    if e.icl_k < 1:
        raise UserError(f"{where}.icl_k = {e.icl_k} must be at least 1", "DAIL and few-shot use K = 4 demonstrations")
    if e.icl_memory < 0:
        raise UserError(f"{where}.icl_memory = {e.icl_memory} must be 0 or more", "M = 0 keeps no memory (zero-shot)")
    check_k_memory(e.icl_k, e.icl_memory, f"{where}.icl_k", f"{where}.icl_memory")
    if e.icl_retriever not in RETRIEVERS:
        raise UserError(f"{where}.icl_retriever = {e.icl_retriever!r} is not a retriever", f"allowed: {', '.join(RETRIEVERS)}")
    if e.icl_max_entropy is not None and not (0 < e.icl_max_entropy <= 1):
        raise UserError(f"{where}.icl_max_entropy = {e.icl_max_entropy} is outside (0, 1]",
                        "the entropy of the label distribution over its maximum, log(labels); leave it out for no filter")
    if e.icl_seeds < 1:
        raise UserError(f"{where}.icl_seeds = {e.icl_seeds} must be at least 1", "3 to 5 orders give a standard deviation")
    if e.icl_limit is not None and e.icl_limit < 1:
        raise UserError(f"{where}.icl_limit = {e.icl_limit} must be at least 1", "leave it out to use every test query")
    check_tta_settings(e, where)


def check_tta_settings(e, where: str = "evaluate") -> None:
    """The ``tta`` and ``pcl_*`` settings: modes and ranges, and something to adapt on."""
    modes = list(e.tta) or ["none"]
    for config in tta_configs(e):
        check_tta(config, where)
    if set(modes) - {"none"} and not (e.icl or e.zeroshot):
        what = "perplexity only" if e.perplexity else "nothing else"
        raise UserError(f"{where}.tta = {modes} adapts on classification sets or multiple-choice tasks, but this evaluation "
                        f"has none ({what})",
                        f'add {where}.icl = ["books-next"] (with icl_modes = ["zeroshot"]) or {where}.zeroshot = ["piqa"], '
                        f'or set {where}.tta = ["none"]')


def check_k_memory(k: int, memory: int, k_key: str = "k", memory_key: str = "memory") -> None:
    """DAIL picks K demonstrations from a memory of at most M: K > M can never be met (M = 0 means no memory)."""
    if memory and k > memory:
        raise UserError(f"{k_key} = {k} is larger than {memory_key} = {memory}",
                        f"DAIL picks K demonstrations from at most M remembered predictions; raise {memory_key} or lower {k_key}")

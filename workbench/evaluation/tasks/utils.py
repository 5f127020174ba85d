"""Loaders for the zero-shot task files bundled with workbench, for lm-evaluation-harness.

The bundled data are llm-foundry's JSONL versions of the standard sets
(``workbench/assets/zeroshot``, see its SOURCES.md). Each loader below reads one
of them and rebuilds the fields of the Hugging Face data set that lm-eval's own
task reads, so the YAML files beside this module can use lm-eval's prompts
(``doc_to_text``, ``doc_to_choice``, ``doc_to_target``) and metrics unchanged
and the numbers stay comparable with the papers. Nothing is downloaded.

lm-eval imports this file by its path (``!function utils.NAME`` in the YAML
files) and calls a loader as ``custom_dataset(**metadata, **dataset_kwargs)``.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import workbench

DATA = Path(workbench.__file__).resolve().parent / "assets" / "zeroshot"


def _rows(name: str) -> list[dict]:
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _split(split: str, rows: list[dict]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({split: Dataset.from_list(rows)})


def _after(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"expected a query starting with {prefix!r}, got {text[:60]!r}")
    return text[len(prefix):]


def arc_easy(**_):
    return _split("test", [_arc(r) for r in _rows("arc_easy")])


def arc_challenge(**_):
    return _split("test", [_arc(r) for r in _rows("arc_challenge")])


def _arc(r: dict) -> dict:
    # llm-foundry: "Question: {question}"; lm-eval appends "\nAnswer:" itself
    return {"question": _after("Question: ", r["query"]), "choices": r["choices"], "gold": r["gold"]}


def boolq(**_):
    rows = []
    for r in _rows("boolq"):
        # llm-foundry: "Passage: {passage}\nQuestion: {question}?"; lm-eval adds the "?" itself
        body = _after("Passage: ", r["query"])
        cut = body.rindex("\nQuestion: ")
        question = body[cut + len("\nQuestion: "):]
        rows.append({"passage": body[:cut], "question": question[:-1] if question.endswith("?") else question,
                     "label": r["gold"]})
    return _split("validation", rows)


def piqa(**_):
    # llm-foundry: "Question: {goal}\n"
    rows = [{"goal": _after("Question: ", r["query"])[:-1], "sol1": r["choices"][0], "sol2": r["choices"][1],
             "label": r["gold"]} for r in _rows("piqa")]
    return _split("validation", rows)


def openbookqa(**_):
    rows = [{"question_stem": r["query"], "choices": r["choices"], "gold": r["gold"]} for r in _rows("openbook_qa")]
    return _split("test", rows)


def copa(**_):
    # llm-foundry's query is lm-eval's doc_to_text (premise without its period, then
    # "because"/"therefore") and its choices are already lower-cased at the first
    # letter; lm-eval puts a space before each choice (besides the target delimiter).
    rows = [{"text": r["query"], "choices": [" " + c for c in r["choices"]], "gold": r["gold"]} for r in _rows("copa")]
    return _split("validation", rows)


_SIQA = re.compile(r"^Context: (.*)\nQuestion: (.*)\nChoices:\nA\. (.*)\nB\. (.*)\nAnswer:$", re.S)


def siqa(**_):
    rows = []
    for r in _rows("siqa"):
        match = _SIQA.match(r["query"])
        if match is None:
            raise ValueError(f"unexpected Social IQa query: {r['query'][:80]!r}")
        context, question, a, b = match.groups()
        rows.append({"context": context, "question": question, "answerA": a, "answerB": b, "gold": r["gold"]})
    return _split("validation", rows)


def winogrande(**_):
    # llm-foundry already split each sentence at the blank: the two filled-in
    # beginnings are lm-eval's choices (several contexts, one continuation)
    rows = [{"context_options": r["context_options"], "continuation": r["continuation"], "gold": r["gold"]}
            for r in _rows("winogrande")]
    return _split("validation", rows)


def lambada_openai(**_):
    # lm-eval splits the passage at its last space; llm-foundry split it at the
    # last word, so a continuation that starts with whitespace is glued back as is
    rows = []
    for r in _rows("lambada_openai"):
        cont = r["continuation"]
        rows.append({"text": r["context"] + (cont if cont[:1].isspace() else " " + cont)})
    return _split("test", rows)

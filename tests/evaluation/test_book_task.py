"""books-next: every item is a real passage of a held-out book, its true next sentence and distractors from the same book."""

import re
from collections import Counter

import pytest

from workbench.evaluation import book_task
from workbench.evaluation.icl_data import DATASETS, read_examples


@pytest.fixture(scope="module")
def books():
    """Each bundled book's paragraphs with their whitespace collapsed, read independently of the task's own splitter."""
    text = book_task.BOOKS.read_text(encoding="utf-8")
    return [[" ".join(p.split()) for p in book.split("\n\n") if p.strip()] for book in text.split("\n\n\n") if book.strip()]


def test_each_item_is_a_passage_followed_by_its_true_sentence_among_distractors_of_the_same_book(books):
    items = book_task.items()
    assert len(items) >= 900
    # one line per paragraph: a match without a line break stays inside one paragraph
    titles = {title: "\n".join(paragraphs) for title, paragraphs in zip(book_task.TITLES, books)}
    for item in items:
        book = titles[item["book"]]
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= item["label"] < 4
        true = choices[item["label"]]
        assert f"{item['context']} {true}" in book, item  # the passage, then the true sentence
        n = len(true.split())
        for k, other in enumerate(choices):
            if k != item["label"]:
                assert other in book, other  # from the same book
                assert f"{item['context']} {other}" not in book  # never the passage's continuation
                assert n / 2 <= len(other.split()) <= 2 * n
    labels = Counter(item["label"] for item in items)
    assert all(0.2 < labels[k] / len(items) < 0.3 for k in range(4)), labels  # no position gives the answer away
    assert len({item["book"] for item in items}) == 4


def test_the_task_is_deterministic_and_the_examples_carry_the_choices():
    text = book_task.BOOKS.read_text(encoding="utf-8")
    assert book_task.build(text) == list(book_task.items())  # items() is cached: this is a second, independent build
    assert book_task.build(text, seed=1) != book_task.build(text)
    examples = read_examples(DATASETS["books-next"])
    assert [(e.fields["context"], list(e.choices), e.label) for e in examples] == \
        [(i["context"], i["choices"], i["label"]) for i in book_task.items()]


@pytest.mark.parametrize("paragraph, expected", [
    ("He came. She went! Did they? Yes.", ["He came.", "She went!", "Did they?", "Yes."]),
    ('"Stop!" he cried. Then he ran.', ['"Stop!" he cried.', "Then he ran."]),
    ('He said, "Go home." She did.', ['He said, "Go home."', "She did."]),
    ("Mr. smith is here. He waits.", ["Mr. smith is here.", "He waits."]),  # a lower-case word after a period: one sentence
])
def test_sentences_split_after_end_marks_before_a_capital(paragraph, expected):
    assert book_task.sentences(paragraph) == expected
    assert " ".join(book_task.sentences(paragraph)) == re.sub(r"\s+", " ", paragraph)


@pytest.mark.slow
def test_the_demo_model_is_clearly_above_chance(one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.evaluation.icl import ICLConfig, evaluate_dataset
    from workbench.models import DEMO_MODEL_DIR

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    [result] = evaluate_dataset(model, tokenizer, "books-next", [ICLConfig(mode="zeroshot")], seeds=1, limit=300)
    # chance is 0.25; with 300 queries its standard error is 0.025, so 0.31 is more than two of them above
    assert result["value"] > 0.31, result["value"]

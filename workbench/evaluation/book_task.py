"""``books-next``: choose the true next sentence of a passage, built from the bundled held-out books.

The demo model is at chance on SST-2 and on most zero-shot tasks, so robustness
and test-time adaptation could not be measured on the embedded default. This
task is in its own domain: passages from the four Project Gutenberg books of
``workbench/assets/data/books-eval.txt`` (held out from the demo model's
training; see ``workbench/assets/data/SOURCES.md``), each followed by four
candidate sentences: the sentence that really comes next, and three drawn at
random from elsewhere in the same book, of similar length (half to twice the
true sentence's words), so that neither the book's vocabulary nor the length
gives the answer away.

Construction (deterministic, seed 0; nothing is stored but the books):

- books are split on two blank lines, paragraphs on one, sentences after
  ``.``, ``!`` or ``?`` (and a closing quote) followed by a capital or a quote;
- a candidate item is a paragraph sentence of 4 to 40 words whose paragraph
  has at least ``CONTEXT`` such sentences before it; the passage is those
  ``CONTEXT`` sentences;
- ``ITEMS`` items are drawn, the same number from each book, and the position
  of the true sentence among the choices is drawn uniformly.

Scoring compares the log-likelihood of each candidate after the passage,
divided by the candidate's length in bytes (lm-eval's ``acc_norm``), since the
candidates differ in length.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path

BOOKS = Path(__file__).resolve().parents[1] / "assets" / "data" / "books-eval.txt"
TITLES = ("Raleigh", "The Man from the Bitter Roots", "Stories of Ships and the Sea", "What Men Live By, and Other Tales")
ITEMS = 1000
CONTEXT = 3
CHOICES = 4
MIN_WORDS, MAX_WORDS = 4, 40
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019]?\s+(?=[\"'\u201c\u2018]?[A-Z])")


def sentences(paragraph: str) -> list[str]:
    """The paragraph's sentences (a closing quote stays with its sentence)."""
    paragraph = " ".join(paragraph.split())
    out, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        end = m.start() + len(m.group().rstrip())  # keep a closing quote
        out.append(paragraph[start:end].strip())
        start = m.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


def _usable(sentence: str) -> bool:
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def build(text: str, items: int = ITEMS, seed: int = 0, context: int = CONTEXT, choices: int = CHOICES) -> list[dict]:
    """The task's items: ``{"context", "choices", "label", "book"}``, ``choices[label]`` the true next sentence."""
    books = [b for b in re.split(r"\n\s*\n\s*\n+", text) if b.strip()]
    rng = random.Random(seed)
    out: list[dict] = []
    per_book = -(-items // len(books))
    for b, book in enumerate(books):
        paragraphs = [sentences(p) for p in re.split(r"\n\s*\n", book)]
        pool = [(s, len(s.split())) for p in paragraphs for s in p if _usable(s)]
        candidates = [(p, i) for p, sents in enumerate(paragraphs) for i in range(context, len(sents))
                      if all(_usable(s) for s in sents[i - context:i + 1])]
        for p, i in rng.sample(candidates, min(per_book, len(candidates))):
            true = paragraphs[p][i]
            n = len(true.split())
            similar = [s for s, words in pool if n / 2 <= words <= 2 * n and s != true and s not in paragraphs[p]]
            distractors = rng.sample(similar, choices - 1)
            label = rng.randrange(choices)
            options = distractors[:label] + [true] + distractors[label:]
            out.append({"context": " ".join(paragraphs[p][i - context:i]), "choices": options, "label": label,
                        "book": TITLES[b] if b < len(TITLES) else f"book {b + 1}"})
    if len(out) > items:  # more than asked: a seeded subset, in order
        out = [out[k] for k in sorted(random.Random(seed).sample(range(len(out)), items))]
    return out


@lru_cache(maxsize=1)
def items() -> tuple[dict, ...]:
    """The bundled task's items, built once per process from the bundled books."""
    return tuple(build(BOOKS.read_text(encoding="utf-8")))

"""Deterministic distribution shifts of classification test sets, for robustness evaluation.

A shifted set is named after its data set: ``sst2@typo:0.15`` or ``books-next@words:0.1+case:0.05``
(several shifts joined by ``+``, applied in the order written). Each shift is a kind and a rate in
[0, 1]: every eligible unit of the text (a word or a gap, depending on the kind) is hit with
probability ``rate`` and a hit unit gets exactly one edit, so ``edits / eligible`` measures the rate.

- ``typo``: a letter run (``[A-Za-z]+``, two letters or more) gets one insert, delete, swap of two
  adjacent differing letters, or replace; the word count and every non-letter character stay.
- ``words``: a whitespace-separated word is dropped, repeated or swapped with its right neighbour.
  The original gaps stay where they were: a dropped word takes the gap before it with it (its own
  gap takes that place), a repeat is joined by one space, a swap exchanges the words, not the gaps.
- ``case``: a letter run becomes upper, lower or title case (among those that change it).
- ``space``: a whitespace run between two words is removed (words glued) or doubled.

The edits are a function of (seed, key, shift) only: ``shift_text`` draws from
``random.Random(f"{seed}|{key}|{shift.name}")`` (a string seed is hashed with sha512, the same in
every process), and ``shift_examples`` keys every text field by its example's index and field name.
No torch here: the spec validator parses set names with ``parse_set_name``.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from dataclasses import dataclass

from workbench.errors import UserError

KINDS: dict[str, str] = {
    "typo": "character typos: a hit word gets one letter inserted, deleted, swapped or replaced",
    "words": "word edits: a hit word is dropped, repeated or swapped with its right neighbour",
    "case": "case changes: a hit word becomes upper, lower or title case",
    "space": "whitespace noise: a hit gap between words is removed or doubled",
}
_LETTERS = re.compile(r"[A-Za-z]+")
_GAP = re.compile(r"(?<=\S)\s+(?=\S)")
_SHIFTY = re.compile(r"([A-Za-z_][\w-]*)(:|\+|$)")  # what a shift list starts with
_HINT = f"write NAME@KIND:RATE[+KIND:RATE...], e.g. sst2@typo:0.1, a rate in [0, 1]; the kinds are {', '.join(KINDS)}"


@dataclass(frozen=True)
class Shift:
    kind: str
    rate: float

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.rate:g}"


def parse_set_name(name: str, key: str = "evaluate.icl") -> tuple[str, tuple[Shift, ...]]:
    """``"sst2@typo:0.15+case:0.1"`` -> ``("sst2", (Shift("typo", 0.15), Shift("case", 0.1)))``; no ``@`` shifts -> ``(name, ())``.

    The split is on the last ``@``, and only when what follows looks like shifts (``word:`` or a
    known kind), so a ``file:`` path with an ``@`` in it stays a path.
    """
    base, at, tail = name.rpartition("@")
    m = _SHIFTY.match(tail)
    if not at or (tail and not (m and (m.group(2) == ":" or m.group(1) in KINDS))):
        return name, ()
    where = f"{key}: {name!r}"
    if not base:
        raise UserError(f"{where}: no data set before '@'", _HINT)
    shifts = []
    for part in tail.split("+"):
        kind, colon, rate = (s.strip() for s in part.partition(":"))
        if not kind:
            raise UserError(f"{where}: an empty shift {part!r} (nothing before ':' or between '+' signs)", _HINT)
        if kind not in KINDS:
            raise UserError(f"{where}: unknown shift {kind!r}", _HINT)
        if not rate:
            raise UserError(f"{where}: shift {part!r} has no rate", _HINT)
        try:
            value = float(rate)
        except ValueError:
            raise UserError(f"{where}: the rate {rate!r} of {kind!r} is not a number", _HINT) from None
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{where}: the rate {rate!r} of {kind!r} is outside [0, 1]", _HINT)
        shifts.append(Shift(kind, value))
    return base, tuple(shifts)


def _typo(word: str, rng: random.Random) -> str:
    op = rng.choice(("insert", "delete", "swap", "replace"))
    if op == "insert":
        j = rng.randrange(len(word) + 1)
        return word[:j] + rng.choice(string.ascii_lowercase) + word[j:]
    if op == "delete":
        j = rng.randrange(len(word))
        return word[:j] + word[j + 1:]
    pairs = [j for j in range(len(word) - 1) if word[j] != word[j + 1]]
    if op == "swap" and pairs:
        j = rng.choice(pairs)
        return word[:j] + word[j + 1] + word[j] + word[j + 2:]
    j = rng.randrange(len(word))
    new = rng.choice(string.ascii_lowercase.replace(word[j].lower(), ""))
    return word[:j] + (new.upper() if word[j].isupper() else new) + word[j + 1:]


def _words(text: str, rate: float, rng: random.Random) -> tuple[str, int, int]:
    lead = text[:len(text) - len(text.lstrip())]
    items = [[w, g] for w, g in re.findall(r"(\S+)(\s*)", text)]  # each word with the gap after it
    out: list[list[str]] = []
    n, edits = len(items), 0
    for i in range(n):
        word, gap = items[i]
        if rng.random() >= rate:
            out.append(items[i])
            continue
        edits += 1
        op = rng.choice(("drop", "repeat", "swap"))
        if (op == "swap" and i == n - 1) or (op == "drop" and not out and i == n - 1):
            op = "repeat"  # nothing to swap with / never drop the only word left
        if op == "drop":
            if out:
                out[-1][1] = gap
        elif op == "repeat":
            out += [[word, " "], [word, gap]]
        else:  # the neighbour moves here; this word moves on and gets its own draw there
            items[i][0], items[i + 1][0] = items[i + 1][0], word
            out.append(items[i])
    return lead + "".join(w + g for w, g in out), edits, n


def apply(text: str, shift: Shift, rng: random.Random) -> tuple[str, int, int]:
    """One shift on one text: ``(shifted text, edits made, eligible units)``."""
    if shift.kind == "words":
        return _words(text, shift.rate, rng)
    counts = [0, 0]

    def hit(m: re.Match) -> str:
        unit = m.group()
        if shift.kind == "case":
            new = [c for c in dict.fromkeys((unit.upper(), unit.lower(), unit.title())) if c != unit]
        else:
            new = ["", unit * 2] if shift.kind == "space" else [unit] * (len(unit) >= 2)
        if not new:
            return unit
        counts[1] += 1
        if rng.random() >= shift.rate:
            return unit
        counts[0] += 1
        return _typo(unit, rng) if shift.kind == "typo" else rng.choice(new)

    if shift.kind not in KINDS:
        raise ValueError(f"unknown shift kind {shift.kind!r}")
    shifted = (_GAP if shift.kind == "space" else _LETTERS).sub(hit, text)
    return shifted, counts[0], counts[1]


def shift_text(text: str, shifts: tuple[Shift, ...], seed: int, key: str) -> str:
    """Apply ``shifts`` in order, each from its own ``random.Random(f"{seed}|{key}|{shift.name}")``."""
    for shift in shifts:
        text = apply(text, shift, random.Random(f"{seed}|{key}|{shift.name}"))[0]
    return text


def shift_examples(examples: list, shifts: tuple[Shift, ...], seed: int) -> list:
    """New examples whose ``str`` fields are shifted (key ``f"{index}:{field}"``); labels and everything else are kept."""
    return [dataclasses.replace(ex, fields={k: shift_text(v, shifts, seed, f"{i}:{k}") if isinstance(v, str) else v
                                            for k, v in ex.fields.items()})
            for i, ex in enumerate(examples)]

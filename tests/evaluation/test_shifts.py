"""Shifted test sets: parsing, determinism, and the rate of each kind measured independently of the module's own counts."""

import bisect
import copy
import dataclasses
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.errors import UserError
from workbench.evaluation.icl_data import Example
from workbench.evaluation.shifts import KINDS, Shift, apply, parse_set_name, shift_examples, shift_text

SENTENCES = [
    "The film, released in 2019, runs 128 minutes and never once feels long.",
    "I expected little from the sequel; what I got was a sharp and funny script!",
    "Its plot is thin: two brothers, one farm, and a debt of $40,000 to repay.",
    "Critics gave it 3.5 stars out of 5, which seems generous to me.",
    "The soundtrack is lovely (mostly strings) but the editing is clumsy.",
    "Why would anyone cast him as the villain? He is far too gentle for it.",
    "After 20 minutes the story finally settles down and the actors relax.",
    "Bring tissues: the final scene at the station will break your heart.",
    "A tedious, overlong mess with 3 good jokes and 97 bad ones.",
    "She plays the detective with quiet wit, and the camera loves her.",
]


def english(n_words: int = 3300, seed: int = 0) -> str:
    """Real-looking English, single-spaced, at least ``n_words`` words, every word holding at most one letter run."""
    rng, out = random.Random(seed), []
    while sum(len(s.split()) for s in out) < n_words:
        batch = SENTENCES[:]
        rng.shuffle(batch)
        out += batch
    return " ".join(out)


TEXT = english()
ROOT = str(Path(__file__).resolve().parents[2])


def test_text_fixture_is_what_the_measurements_assume():
    words = TEXT.split()
    assert len(words) >= 3300 and "  " not in TEXT
    assert all(len(re.findall("[A-Za-z]+", w)) <= 1 for w in words)


def non_letters(text: str) -> str:
    return re.sub("[A-Za-z]", "", text)


@pytest.mark.parametrize("kind", list(KINDS))
def test_deterministic_per_seed_and_key(kind):
    s = (Shift(kind, 0.3),)
    a = shift_text(TEXT, s, seed=7, key="3:text")
    random.seed(12345)  # the global random state plays no part
    random.random()
    assert shift_text(TEXT, s, seed=7, key="3:text") == a != TEXT
    assert shift_text(TEXT, s, seed=8, key="3:text") != a
    assert shift_text(TEXT, s, seed=7, key="4:text") != a


def test_same_text_in_a_fresh_process():
    """String seeds are hashed with sha512, not ``hash()``: another process with another hash seed draws the same edits."""
    s = (Shift("typo", 0.2), Shift("words", 0.1), Shift("case", 0.1), Shift("space", 0.1))
    here = shift_text(TEXT[:2000], s, seed=3, key="0:text")
    code = ("import sys; from workbench.evaluation.shifts import Shift, shift_text; "
            "s = (Shift('typo', 0.2), Shift('words', 0.1), Shift('case', 0.1), Shift('space', 0.1)); "
            "sys.stdout.write(shift_text(sys.stdin.read(), s, seed=3, key='0:text'))")
    there = subprocess.run([sys.executable, "-c", code], input=TEXT[:2000], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "99"}, cwd=ROOT)
    assert there.stdout == here != TEXT[:2000]


def measure_typo(before: str, after: str) -> tuple[int, int]:
    a, b = before.split(), after.split()
    assert len(a) == len(b)
    return sum(x != y for x, y in zip(a, b)), sum(bool(re.search("[A-Za-z]{2}", w)) for w in a)


def measure_case(before: str, after: str) -> tuple[int, int]:
    a, b = before.split(), after.split()
    assert len(a) == len(b) and [x.lower() for x in a] == [y.lower() for y in b]
    return sum(x != y for x, y in zip(a, b)), sum(bool(re.search("[A-Za-z]", w)) for w in a)


def measure_space(before: str, after: str) -> tuple[int, int]:
    """Glued gaps lose a word each, doubled ones leave a double space (the text before is single-spaced)."""
    n = len(before.split())
    assert after.replace(" ", "") == before.replace(" ", "")
    return (n - len(after.split())) + after.count("  "), n - 1


def measure_words(before: str, after: str) -> tuple[int, int]:
    """Drops are the missing words, repeats the extra copies, swaps the inversions among survivors (words are unique).

    A word that was swapped and later dropped hides its swaps, so this undercounts by at most the drops.
    """
    ids = [int(w.rsplit("_", 1)[1]) for w in before.split()]
    out = [int(w.rsplit("_", 1)[1]) for w in after.split()]
    drops = len(set(ids) - set(out))
    repeats = len(out) - (len(ids) - drops)
    first = list(dict.fromkeys(out))
    seen: list[int] = []
    swaps = 0
    for x in first:
        swaps += len(seen) - bisect.bisect_right(seen, x)
        bisect.insort(seen, x)
    return drops + repeats + swaps, len(ids)


@pytest.mark.parametrize("rate", [0.1, 0.3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_rate_within_tolerance(kind, rate):
    text = TEXT if kind != "words" else " ".join(f"{w}_{i}" for i, w in enumerate(TEXT.split()))
    after, edits, eligible = apply(text, Shift(kind, rate), random.Random(f"rate|{kind}|{rate}"))
    measured, units = globals()[f"measure_{kind}"](text, after)
    assert units == eligible and units >= 3000
    assert abs(measured / units - rate) <= 0.03 and abs(edits / eligible - rate) <= 0.03, (kind, rate, measured / units)
    if kind == "words":  # hidden swaps of dropped words: measured <= edits <= measured + drops
        assert measured <= edits <= measured + len(text.split()) - len(set(after.split()))
    else:
        assert measured == edits


@pytest.mark.parametrize("kind", list(KINDS))
def test_rate_over_many_seeds_is_tight(kind):
    """Ten texts' worth (about 33,000 units, standard error 0.0025 at 0.3): a 10% bias in the hit rate shows here."""
    text = TEXT if kind != "words" else " ".join(f"{w}_{i}" for i, w in enumerate(TEXT.split()))
    measure = globals()[f"measure_{kind}"]
    for rate in (0.1, 0.3):
        runs = [apply(text, Shift(kind, rate), random.Random(f"tight|{seed}")) for seed in range(10)]
        edits, units = sum(r[1] for r in runs), sum(r[2] for r in runs)
        measured = sum(measure(text, r[0])[0] for r in runs)
        assert abs(edits / units - rate) <= 0.01, (rate, edits / units)
        assert abs(measured / units - rate) <= (0.02 if kind == "words" else 0.01), (rate, measured / units)


@pytest.mark.parametrize("kind", list(KINDS))
def test_rate_zero_is_identity_and_rate_one_hits_every_unit(kind):
    text = "  Hi there,\tit's 5 o'clock!\n\nSee  you  soon. " + TEXT[:500] + "  "
    assert apply(text, Shift(kind, 0.0), random.Random(0))[0] == text
    after, edits, eligible = apply(text, Shift(kind, 1.0), random.Random(0))
    assert edits == eligible > 0
    if kind in ("typo", "case"):
        expected = len([m for m in re.findall("[A-Za-z]+", text) if len(m) >= (2 if kind == "typo" else 1)])
        assert eligible == expected
        runs = re.findall("[A-Za-z]+", after)  # both keep the letter runs apart, so they stay aligned
        assert len(runs) == len(re.findall("[A-Za-z]+", text))
        assert sum(x != y for x, y in zip(re.findall("[A-Za-z]+", text), runs)) == eligible
    if kind == "space":
        assert eligible == len(re.findall(r"(?<=\S)\s+(?=\S)", text))
        assert after.startswith("  ") and after.endswith("  ")  # edge whitespace is not a gap between words
    if kind == "words":
        assert eligible == len(text.split())


@pytest.mark.parametrize("kind", ["typo", "case"])
def test_typo_and_case_keep_every_non_letter_in_order(kind):
    text = TEXT + " Room 101, floor #3; e-mail: a.b@c.de (x2) -- 50% off!\n"
    for seed in range(5):
        after = shift_text(text, (Shift(kind, 0.5),), seed=seed, key="k")
        assert after != text
        assert non_letters(after) == non_letters(text)
        assert len(after.split()) == len(text.split())


def one_edit(x: str, y: str) -> bool:
    """``y`` is ``x`` with one letter inserted, deleted, replaced (same case) or two adjacent letters swapped."""
    if len(y) == len(x) + 1:
        return any(y[:j] + y[j + 1:] == x and y[j].islower() for j in range(len(y)))
    if len(y) == len(x) - 1:
        return any(x[:j] + x[j + 1:] == y for j in range(len(x)))
    diff = [j for j in range(len(x)) if x[j] != y[j]]
    if len(diff) == 1:
        j = diff[0]
        return y[j].isalpha() and y[j].isupper() == x[j].isupper()
    return len(diff) == 2 and diff[1] == diff[0] + 1 and (x[diff[0]], x[diff[1]]) == (y[diff[1]], y[diff[0]])


def test_typo_edits_one_letter_per_hit_word():
    after, edits, eligible = apply(TEXT, Shift("typo", 1.0), random.Random(1))
    pairs = [(x, y) for x, y in zip(TEXT.split(), after.split()) if re.search("[A-Za-z]{2}", x)]
    assert len(pairs) == edits == eligible
    assert all(one_edit(x, y) for x, y in pairs)
    assert not one_edit("word", "word") and not one_edit("word", "wrdx")


def test_words_keeps_line_breaks_and_never_empties_a_text():
    text = "first line here\nsecond line here\nthird line here"
    for seed in range(20):
        after = shift_text(text, (Shift("words", 0.2),), seed=seed, key="k")
        assert after.count("\n") <= 2 and "  " not in after
    assert all(shift_text("alone", (Shift("words", 1.0),), seed=s, key="k").split()[0] == "alone" for s in range(20))


def test_shift_examples_changes_only_text():
    @dataclasses.dataclass(frozen=True)
    class WithChoices:
        fields: dict
        label: int
        choices: tuple = ()

    examples = [Example({"premise": f"The film number {i} was long, slow and dull.", "hypothesis": "It was dull.", "n": i,
                         "tags": ["a", "b"]}, label=i % 2) for i in range(30)]
    examples.append(WithChoices({"text": "Which one is the right answer here?"}, 2, choices=("yes", "no")))
    before = copy.deepcopy(examples)
    out = shift_examples(examples, (Shift("typo", 0.5), Shift("case", 0.2)), seed=0)
    assert examples == before  # the input is not mutated
    assert len(out) == len(examples) and all(type(a) is type(b) for a, b in zip(out, examples))
    assert [e.label for e in out] == [e.label for e in examples]
    assert out[-1].choices == ("yes", "no")
    changed = 0
    for a, b in zip(out, examples):
        assert a.fields.keys() == b.fields.keys()
        for k, v in b.fields.items():
            if isinstance(v, str):
                changed += a.fields[k] != v
                assert a.fields[k] == shift_text(v, (Shift("typo", 0.5), Shift("case", 0.2)), 0, f"{examples.index(b)}:{k}")
            else:
                assert a.fields[k] == v
    assert changed >= 30
    assert shift_examples(examples, (), seed=0) == examples


@pytest.mark.parametrize("name, expected", [
    ("sst2", ("sst2", ())),
    ("sst2@typo:0.15", ("sst2", (Shift("typo", 0.15),))),
    ("sst2@typo:0.15+case:0.1", ("sst2", (Shift("typo", 0.15), Shift("case", 0.1)))),
    ("books-next@words:0.1+case:0.05", ("books-next", (Shift("words", 0.1), Shift("case", 0.05)))),
    ("sst2@space:1+typo:0", ("sst2", (Shift("space", 1.0), Shift("typo", 0.0)))),
    ("file:data/x.jsonl@typo:0.1", ("file:data/x.jsonl", (Shift("typo", 0.1),))),
    ("file:/home/me@host/x.jsonl", ("file:/home/me@host/x.jsonl", ())),
    ("file:/a@b/x.jsonl@case:0.2", ("file:/a@b/x.jsonl", (Shift("case", 0.2),))),
])
def test_parse_set_name(name, expected):
    assert parse_set_name(name) == expected


def test_shift_name():
    assert Shift("typo", 0.15).name == "typo:0.15" and Shift("space", 1.0).name == "space:1"
    base, parsed = parse_set_name("sst2@typo:0.15+case:0.1")
    assert base + "@" + "+".join(s.name for s in parsed) == "sst2@typo:0.15+case:0.1"


@pytest.mark.parametrize("name, parts", [
    ("sst2@blur:0.1", ["unknown shift", "'blur'"]),
    ("sst2@typo:abc", ["not a number", "'abc'"]),
    ("sst2@typo:1.5", ["outside [0, 1]", "'1.5'"]),
    ("sst2@case:-0.1", ["outside [0, 1]", "'-0.1'"]),
    ("sst2@case:nan", ["outside [0, 1]", "'nan'"]),
    ("sst2@typo:0.1+", ["empty shift"]),
    ("sst2@typo:0.1++case:0.1", ["empty shift"]),
    ("sst2@typo", ["no rate", "'typo'"]),
    ("sst2@typo:0.1+case", ["no rate", "'case'"]),
    ("sst2@typo:", ["no rate", "'typo:'"]),
    ("sst2@", ["empty shift"]),
    ("@typo:0.1", ["no data set"]),
])
def test_parse_errors(name, parts):
    with pytest.raises(UserError) as e:
        parse_set_name(name, key="evaluate.icl_shift")
    assert e.value.message.startswith(f"evaluate.icl_shift: {name!r}: ")
    for p in parts:
        assert p in e.value.message
    assert e.value.hint and all(k in e.value.hint for k in KINDS)


def test_unknown_kind_error_lists_kinds_and_apply_rejects_it():
    with pytest.raises(UserError, match="unknown shift 'blur'") as e:
        parse_set_name("sst2@blur:0.1")
    assert e.value.message.startswith("evaluate.icl: ") and "typo, words, case, space" in e.value.hint
    with pytest.raises(ValueError):
        apply("some text", Shift("blur", 0.1), random.Random(0))


def test_no_torch_import():
    code = "import sys, workbench.evaluation.shifts; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

"""Calibration sources beyond the defaults: the held-out books, mixtures, and the calibration summary."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from shared_data import shared_path
from workbench.data import sources as calibration
from workbench.data.sampling import calibration_data, calibration_samples
from workbench.data.mixtures import mixture_counts, parse_mixture
from workbench.data.summary import calibration_summary, token_divergence
from workbench.cli import main
from workbench.engine import Run
from workbench.errors import UserError
from workbench.events import Log, Progress
from workbench.models import load_model
from workbench.perplexity import eval_text
from workbench.spec import load_preset

DATA = Path(calibration.__file__).resolve().parents[1] / "assets" / "data"


@pytest.fixture(scope="module")
def demo(one_thread):
    return load_model("demo", dtype="float32", device="cpu")


def encode(tok, text):
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def is_window_of(row: list[int], documents_ids: list[list[int]]) -> bool:
    """Whether ``row`` occurs contiguously in one of the documents (a byte search over fixed-width ids)."""
    needle = np.asarray(row, dtype=np.int32).tobytes()
    for ids in documents_ids:
        hay = np.asarray(ids, dtype=np.int32).tobytes()
        at = hay.find(needle)
        while at != -1:
            if at % 4 == 0:
                return True
            at = hay.find(needle, at + 1)
    return False


# ----------------------------------------------------------------- books


def test_bundled_books_are_the_held_out_books_byte_for_byte():
    for name in ("books-calib.txt", "books-eval.txt"):
        assert (DATA / name).read_bytes() == shared_path("data", "pretrain", "heldout", name).read_bytes()


def test_books_calibration_windows_come_from_the_calib_books_and_evaluation_reads_the_other_books(demo):
    calib_text = (DATA / "books-calib.txt").read_text(encoding="utf-8")
    eval_file = (DATA / "books-eval.txt").read_text(encoding="utf-8")
    books = [encode(demo.tokenizer, book) for book in calib_text.split("\n\n\n")]
    assert len(books) == 2
    ids = calibration_samples("books", demo.tokenizer, nsamples=6, seqlen=24, seed=0)
    assert all(is_window_of(row, books) for row in ids.tolist())
    assert eval_text("books") == eval_file
    # no evaluation paragraph of any length appears in the calibration books
    long_paragraphs = [p for p in eval_file.split("\n\n") if len(p) > 200]
    assert long_paragraphs and not any(p in calib_text for p in long_paragraphs)


@pytest.mark.slow
def test_quickstart_runs_with_books_for_calibration_and_evaluation(demo):
    spec = load_preset("quickstart", ['calibration.source="books"', 'evaluate.perplexity=["books"]', "calibration.nsamples=4",
                                      "calibration.seqlen=32", "evaluate.limit=2", "evaluate.seqlen=64"])
    summary = Run(spec).execute()
    assert {(m["dataset"], m["phase"]) for m in summary["metrics"]} == {("books", "before"), ("books", "after")}
    assert summary["calibration"]["summary"]["documents"] == 2


# ----------------------------------------------------------------- mixtures


def words_text(tag: str, n: int) -> str:
    return " ".join(f"{tag} sentence {i} says {i * 7919 % 1009} apples." for i in range(n))


def test_mixture_draws_the_requested_counts_from_each_source(demo, tmp_path):
    tok = demo.tokenizer
    notes = tmp_path / "notes.txt"
    notes.write_text(words_text("notes", 200), encoding="utf-8")
    source = f"mix:c4=0.25,file:{notes}=0.75"
    ids = calibration_samples(source, tok, nsamples=8, seqlen=32, seed=3)
    assert ids.shape == (8, 32)
    with gzip.open(DATA / "c4-train-1000.jsonl.gz", "rt", encoding="utf-8") as fh:
        c4_docs = tok([json.loads(line)["text"] for line in fh], add_special_tokens=False)["input_ids"]
    file_ids = [encode(tok, notes.read_text(encoding="utf-8"))]
    rows = ids.tolist()
    assert all(is_window_of(r, c4_docs) and not is_window_of(r, file_ids) for r in rows[:2])
    assert all(is_window_of(r, file_ids) and not is_window_of(r, c4_docs) for r in rows[2:])
    # each part is that source's own draw for its count and the same seed
    assert torch.equal(ids[:2], calibration_samples("c4", tok, nsamples=2, seqlen=32, seed=3))
    assert torch.equal(ids[2:], calibration_samples(f"file:{notes}", tok, nsamples=6, seqlen=32, seed=3))


def test_mixture_counts_sum_to_nsamples_and_follow_the_fractions():
    for fractions, n in (([1 / 3, 1 / 3, 1 / 3], 10), ([0.5, 0.5], 7), ([0.1, 0.2, 0.7], 128)):
        parts = [(f"s{i}", f) for i, f in enumerate(fractions)]
        counts = mixture_counts(parts, n)
        assert sum(counts) == n
        assert all(abs(c - f * n) < 1 for c, f in zip(counts, fractions))
    assert mixture_counts([("a", 0.5), ("b", 0.5)], 8) == [4, 4]


def test_mixture_documents_and_summary(demo, tmp_path):
    one, many = tmp_path / "one.txt", tmp_path / "many.jsonl"
    one.write_text(words_text("one", 40), encoding="utf-8")
    many.write_text("".join(json.dumps({"text": words_text(f"doc{i}", 20)}) + "\n" for i in range(3)), encoding="utf-8")
    data = calibration_data(f"mix:file:{one}=0.5,file:{many}=0.5", demo.tokenizer, nsamples=4, seqlen=16, with_documents=True)
    assert len(data.documents) == 1 + 3
    summary = calibration_summary(data, demo.tokenizer)
    assert summary["documents"] == 4
    assert summary["tokens"] == sum(len(encode(demo.tokenizer, d)) for d in data.documents)


@pytest.mark.parametrize("source, words", [
    ("mix:c4=0.5,wikitext2=0.4", ["sum to 0.9"]),
    ("mix:c4=0.5,nowhere=0.5", ["nowhere"]),
    ("mix:c4=0.5,mix:c4=0.5", ["another mixture"]),
    ("mix:c4", ["SOURCE=FRACTION"]),
    ("mix:c4=1.5,random=-0.5", ["(0, 1]"]),
    ("mix:c4=0.5,c4=0.5", ["twice"]),
])
def test_bad_mixtures_are_refused_before_any_work(source, words):
    with pytest.raises(UserError) as err:
        load_preset("quickstart", [f"calibration.source={json.dumps(source)}"])
    for word in words:
        assert word in str(err.value)


def test_a_mixture_part_rounding_to_zero_samples(demo):
    with pytest.raises(UserError, match="gets 0 of the 4 samples"):
        calibration_samples("mix:c4=0.9,books=0.1", demo.tokenizer, nsamples=4, seqlen=16)


def test_mixture_description():
    assert parse_mixture("c4=0.5, selfgen:c4=0.5") == [("c4", 0.5), ("selfgen:c4", 0.5)]
    assert "50% of the samples from selfgen:c4" in calibration.describe_source("mix:c4=0.5,selfgen:c4=0.5")


# ----------------------------------------------------------------- summary


def test_summary_counts_documents_and_tokens_and_measures_perplexity_on_the_windows(demo):
    tok, model = demo.tokenizer, demo.model
    data = calibration_data("books", tok, nsamples=3, seqlen=40, seed=1, with_documents=True)
    summary = calibration_summary(data, tok, model, "cpu", batch_size=2)
    books = (DATA / "books-calib.txt").read_text(encoding="utf-8").split("\n\n\n")
    assert summary["documents"] == 2
    assert summary["tokens"] == sum(len(encode(tok, b)) for b in books)

    def direct(ids):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[:, :-1].double(), dim=-1)
        return math.exp(float(-logp.gather(-1, ids[:, 1:, None]).mean()))

    assert summary["perplexity"] == pytest.approx(direct(data.ids), rel=1e-5) and summary["perplexity_windows"] == 3
    first_two = calibration_summary(data, tok, model, "cpu", max_windows=2)
    assert first_two["perplexity"] == pytest.approx(direct(data.ids[:2]), rel=1e-5) and first_two["perplexity_windows"] == 2


def test_token_divergence_is_jensen_shannon_in_bits():
    a = torch.tensor([[1, 1, 2, 3, 3, 3], [5, 1, 2, 2, 2, 7]])
    b = torch.tensor([[1, 2, 2, 4, 4, 9]])
    p = torch.bincount(a.flatten(), minlength=10).double().numpy()
    q = torch.bincount(b.flatten(), minlength=10).double().numpy()
    assert token_divergence(a, b) == pytest.approx(jensenshannon(p, q, base=2) ** 2)
    assert token_divergence(a, a) == pytest.approx(0.0, abs=1e-12)
    assert token_divergence(torch.tensor([1, 2]), torch.tensor([3, 4])) == pytest.approx(1.0)


def test_the_engine_logs_the_summary_with_the_divergence_from_the_compared_source(demo):
    spec = load_preset("quickstart", ['calibration.source="wikitext2"', 'calibration.compare="random"', "calibration.nsamples=4",
                                      "calibration.seqlen=32"])
    events = []
    run = Run(spec, emit=events.append)
    run.loaded = demo
    run.calibrate()
    info = run.calibration_info["summary"]
    assert info["documents"] == 1 and info["divergence"]["from"] == "random" and info["divergence"]["js_bits"] > 0.5
    (log,) = [e for e in events if isinstance(e, Log) and e.message.startswith("calibration data wikitext2")]
    assert "1 documents" in log.message and "JS divergence" in log.message


def test_the_engine_reports_selfgen_progress(demo):
    spec = load_preset("quickstart", ['calibration.source="selfgen"', "calibration.nsamples=4", "calibration.seqlen=16",
                                      "calibration.selfgen.samples=6", "calibration.selfgen.batch_size=3", "calibration.summary=false"])
    events = []
    run = Run(spec, emit=events.append)
    run.loaded = demo
    assert run.calibrate().shape == (4, 16)
    progress = [e for e in events if isinstance(e, Progress) and e.stage == "calibrate" and "tokens/s" in e.detail]
    assert [(e.done, e.total) for e in progress] == [(3, 6), (6, 6)]
    assert run.calibration_info["summary"] is None


def test_calib_preview_prints_the_summary(capsys):
    assert main(["calib", "preview", "books", "--nsamples", "4", "--seqlen", "32", "--compare", "c4", "--show", "1"]) == 0
    out = capsys.readouterr().out
    for words in ("documents", "dense perplexity on the windows", "token JS divergence from c4", "window 0"):
        assert words in out


# ----------------------------------------------------------------- spec


def test_selfgen_settings_parse_and_validate():
    spec = load_preset("quickstart", ["calibration.selfgen.prefix_tokens=8", 'calibration.selfgen.corpus="c4"'])
    assert (spec.calibration.selfgen.prefix_tokens, spec.calibration.selfgen.corpus, spec.calibration.selfgen.top_k) == (8, "c4", 50)
    for override, word in (("calibration.selfgen.prefix_tokens=0", "prefix_tokens"), ("calibration.selfgen.keep=1.5", "keep"),
                           ('calibration.selfgen.corpus="random"', "seed corpus"), ("calibration.selfgen.nope=1", "calibration.selfgen.nope"),
                           ('calibration.source="selfgen:random"', "seed corpus"), ('calibration.compare="bogus"', "calibration.compare")):
        with pytest.raises(UserError, match=word):
            load_preset("quickstart", [override])

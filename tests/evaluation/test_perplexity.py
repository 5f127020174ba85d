"""Perplexity: the evaluation corpora and the windowed perplexity of the papers."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pytest
import torch

from shared_data import shared_path
from workbench import perplexity as ppl_mod
from workbench.data import corpora
from workbench.errors import Cancelled, UserError
from workbench.perplexity import eval_text, eval_tokens, perplexity

DATA = Path(corpora.__file__).resolve().parents[1] / "assets" / "data"
DEMO = Path(corpora.__file__).resolve().parents[1] / "assets" / "demo-llama"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO))


# ------------------------------------------------------------- WikiText-2


def test_wikitext2_test_rows():
    rows = corpora.wikitext2_rows("test")
    assert len(rows) == 4358
    assert sum(1 for r in rows if r == "") == 1467
    assert rows[:2] == ["", " = Robert Boulter = \n"]
    # Every non-empty row is one line ending in "\n".
    assert all(r.endswith("\n") and r.count("\n") == 1 for r in rows if r)


def test_wikitext2_rows_rebuild_the_raw_file():
    raw = (DATA / "wikitext2-test.raw").read_bytes().decode("utf-8")
    assert "\r" not in raw and raw.endswith("\n")
    # Independent of the row rule: drop the whitespace-only lines from the raw text.
    assert "".join(corpora.wikitext2_rows("test")) == re.sub(r"(?m)^[^\S\n]*\n", "", raw)
    # Lines the raw file writes empty rows as are " " exactly.
    assert {line for line in raw.split("\n")[:-1] if not line.strip()} == {" "}


def test_wikitext2_text_is_rows_joined():
    rows = corpora.wikitext2_rows("test")
    text = corpora.wikitext2_text("test")
    assert text == "\n\n".join(rows)
    assert eval_text("wikitext2") == text
    assert corpora.wikitext2_text("valid") == "\n\n".join(corpora.wikitext2_rows("valid"))


def test_rows_are_a_fresh_list():
    rows = corpora.wikitext2_rows("test")
    rows.clear()
    assert len(corpora.wikitext2_rows("test")) == 4358


def test_bundled_wikitext_matches_shared_copy():
    for split in ("test", "valid"):
        shared = shared_path("data", "wikitext", "wikitext-2-raw-v1", f"wiki.{split}.raw")
        assert (DATA / f"wikitext2-{split}.raw").read_bytes() == shared.read_bytes()


def test_bundled_c4_matches_shared_copy():
    for bundled, name in (("c4-train-1000.jsonl.gz", "c4-en-train.00000-first1000.jsonl.gz"),
                          ("c4-validation-2000.jsonl.gz", "c4-en-validation-2k.jsonl.gz")):
        shared = shared_path("data", "c4", name)
        assert (DATA / bundled).read_bytes() == shared.read_bytes()


def test_unknown_split():
    with pytest.raises(UserError, match="train"):
        corpora.wikitext2_rows("train")


# --------------------------------------------------------------------- C4


def test_c4_documents_and_eval_text():
    assert len(corpora.c4_documents("train")) == 1000
    validation = corpora.c4_documents("validation")
    assert len(validation) == 2000
    with gzip.open(DATA / "c4-validation-2000.jsonl.gz", "rt", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for line in fh][:1100]
    assert eval_text("c4") == " ".join(docs)


@pytest.mark.slow
def test_c4_eval_tokens_are_256_windows(tok):
    ids = eval_tokens("c4", tok, 64)
    assert ids.shape == (1, 256 * 64) and ids.dtype == torch.long
    full = tok(eval_text("c4"), return_tensors="pt", verbose=False).input_ids
    assert torch.equal(ids, full[:, : 256 * 64])


# ----------------------------------------------------------- eval tokens


def test_wikitext2_eval_tokens_and_cache(tok, monkeypatch):
    ids = eval_tokens("wikitext2", tok, 512)
    assert ids.shape == (1, 393910) and ids.dtype == torch.long
    assert ids[0, :8].tolist() == tok(corpora.wikitext2_text("test")[:200], verbose=False).input_ids[:8]

    def fail(dataset):
        raise AssertionError("eval_tokens should have used its cache")

    monkeypatch.setattr(ppl_mod, "eval_text", fail)
    again = eval_tokens("wikitext2", tok, 512)
    assert torch.equal(again, ids)
    again[0, 0] = -1  # a copy: the cache is not changed through it
    assert torch.equal(eval_tokens("wikitext2", tok, 512), ids)


def test_file_eval_text_and_tokens(tok, tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 20, encoding="utf-8")
    assert eval_text(f"file:{path}") == path.read_text(encoding="utf-8")
    ids = eval_tokens(f"file:{path}", tok, 16)
    assert ids[0].tolist() == tok(path.read_text(encoding="utf-8")).input_ids
    # Editing the file is seen (the in-process cache keys on size and mtime).
    path.write_text("Another text entirely, longer than the first one was. " * 30, encoding="utf-8")
    assert eval_tokens(f"file:{path}", tok, 16)[0].tolist() == tok(path.read_text(encoding="utf-8")).input_ids


def test_jsonl_eval_text_joins_documents(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    assert eval_text(f"file:{path}") == "one\n\ntwo"


def test_a_registered_evaluation_text_is_validated_read_and_measured(tok, monkeypatch):
    """One registry: a text added with register_evaluation_set passes spec validation, eval_tokens reads it (its
    max_windows kept), and a run measures it; unknown names are refused with the registered ones listed."""
    import torch.nn.functional as F

    from workbench.data import evaluation_text as ev
    from workbench.engine import Run
    from workbench.spec import spec_from_dict

    monkeypatch.setattr(ev, "_SETS", dict(ev._SETS))
    text = "".join(f"Line {i} of my own evaluation text, about {i * 31 % 97} pears.\n" for i in range(300))
    ev.register_evaluation_set("mine", lambda arg: text, description="my text", max_windows=3)
    assert "mine" in ev.evaluation_set_names() and ev.describe_evaluation_set("mine") == "my text"

    full = tok(text, return_tensors="pt", verbose=False).input_ids
    assert full.shape[1] > 3 * 16
    assert torch.equal(eval_tokens("mine", tok, 16), full[:, : 3 * 16])
    assert eval_text("mine") == text

    spec = spec_from_dict({"model": {"name": "demo", "dtype": "float32"},
                           "evaluate": {"perplexity": ["mine"], "seqlen": 16, "limit": 2}})
    run = Run(spec)
    summary = run.execute()
    (metric,) = [m for m in summary["metrics"] if m["name"] == "perplexity"]
    assert (metric["dataset"], metric["windows"], metric["seqlen"]) == ("mine", 2, 16)
    with torch.no_grad():  # independently: the mean of each window's mean next-token loss
        windows = full[0, :32].reshape(2, 16)
        logits = run.loaded.model(input_ids=windows).logits.float()
        losses = [F.cross_entropy(logits[w, :-1], windows[w, 1:]) for w in range(2)]
    assert metric["value"] == pytest.approx(math.exp(float(sum(losses)) / 2), rel=1e-5)

    for bad in ("nope", "mine:x"):
        with pytest.raises(UserError) as err:
            spec_from_dict({"evaluate": {"perplexity": [bad]}})
        assert err.value.message == f"evaluate.perplexity: unknown dataset {bad!r}"
        assert "mine" in err.value.hint and "file:PATH" in err.value.hint


@pytest.mark.parametrize("dataset", ["ptb", "", "wikitext2:x", "file:"])
def test_unknown_eval_dataset(dataset):
    with pytest.raises(UserError) as err:
        eval_text(dataset)
    assert "wikitext2" in err.value.hint and "c4" in err.value.hint and "file:PATH" in err.value.hint


# ------------------------------------------------- perplexity, brute force


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def brute_force(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = ids[0, w * seqlen : (w + 1) * seqlen]
            logits = model(window[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= logp.gather(1, window[1:, None]).sum().item()
            count += seqlen - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def tiny_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (1, 203), generator=g)


@pytest.mark.parametrize("batch_size", [1, 3, 5, 12, 50])
def test_perplexity_matches_brute_force(tiny_llama, tiny_ids, batch_size):
    seqlen = 16
    result = perplexity(tiny_llama, tiny_ids, seqlen, batch_size=batch_size)
    assert result["windows"] == 203 // seqlen == 12
    assert result["tokens"] == 12 * seqlen and result["total_tokens"] == 203
    assert result["seqlen"] == seqlen and result["limit"] is None
    expected = brute_force(tiny_llama, tiny_ids, seqlen, 12)
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(expected), rel=1e-5)
    # A random model on random ids: close to uniform over the vocabulary.
    assert 50 < result["ppl"] < 200


@pytest.mark.parametrize("limit,windows", [(1, 1), (5, 5), (12, 12), (100, 12)])
def test_perplexity_limit_uses_first_windows(tiny_llama, tiny_ids, limit, windows):
    result = perplexity(tiny_llama, tiny_ids, 16, limit=limit, batch_size=2)
    assert result["windows"] == windows and result["limit"] == limit
    assert result["ppl"] == pytest.approx(brute_force(tiny_llama, tiny_ids, 16, windows), rel=1e-5)


def test_perplexity_accepts_1d_and_chunks_losses(tiny_llama, tiny_ids, monkeypatch):
    whole = perplexity(tiny_llama, tiny_ids, 20)
    monkeypatch.setattr(ppl_mod, "_CHUNK_ELEMENTS", 96 * 3)  # three positions per chunk
    chunked = perplexity(tiny_llama, tiny_ids[0], 20, batch_size=4)
    assert chunked["windows"] == whole["windows"] == 10
    assert chunked["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)


def test_progress_cancel_and_training_mode(tiny_llama, tiny_ids):
    calls = []
    perplexity(tiny_llama, tiny_ids, 16, batch_size=5, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(5, 12), (10, 12), (12, 12)]

    checks = []

    def cancel():
        checks.append(1)
        return len(checks) > 2

    tiny_llama.train()
    with pytest.raises(Cancelled):
        perplexity(tiny_llama, tiny_ids, 16, batch_size=2, cancel=cancel)
    assert len(checks) == 3
    assert tiny_llama.training, "the model's training mode is restored"
    tiny_llama.eval()


def test_perplexity_bad_arguments(tiny_llama, tiny_ids):
    with pytest.raises(UserError, match="seqlen"):
        perplexity(tiny_llama, tiny_ids, 1)
    with pytest.raises(UserError, match="fewer than one window"):
        perplexity(tiny_llama, tiny_ids, 204)
    with pytest.raises(UserError, match="limit"):
        perplexity(tiny_llama, tiny_ids, 16, limit=0)
    with pytest.raises(UserError, match="batch_size"):
        perplexity(tiny_llama, tiny_ids, 16, batch_size=0)
    # Exactly one window fits.
    assert perplexity(tiny_llama, tiny_ids, 203)["windows"] == 1


# ------------------------------------------------------------- demo model


@pytest.fixture(scope="module")
def demo_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32)


@pytest.mark.slow
def test_demo_model_few_windows_match_brute_force(demo_model, tok):
    ids = eval_tokens("wikitext2", tok, 128)
    result = perplexity(demo_model, ids, 128, limit=3, batch_size=2)
    assert result["windows"] == 3
    assert result["ppl"] == pytest.approx(brute_force(demo_model, ids, 128, 3), rel=1e-5)


@pytest.mark.slow
def test_demo_model_wikitext2_perplexity(demo_model, tok):
    """Dense WikiText-2 perplexity at 512 over all windows; the model card says 250.1 (769 windows, 393,910 tokens)."""
    ids = eval_tokens("wikitext2", tok, 512)
    result = perplexity(demo_model, ids, 512, batch_size=8)
    assert result["total_tokens"] == 393910
    assert result["windows"] == 769
    assert 240 <= result["ppl"] <= 260, result


class _UniformLM(torch.nn.Module):
    """Every next token equally likely: the loss is exactly ln(vocab) per token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_bits_per_byte_of_a_uniform_model(tok, tmp_path):
    # a uniform model spends log2(V) bits per token, so bits per byte = log2(V) * tokens / bytes,
    # with tokens and bytes counted directly on the evaluated windows
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé — ok.\n" * 40
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    seqlen = 32
    ids = eval_tokens(f"file:{path}", tok, seqlen)
    vocab = len(tok)
    result = perplexity(_UniformLM(vocab), ids, seqlen)
    assert result["nll"] == pytest.approx(math.log(vocab), rel=1e-6)
    evaluated = ids[0, : result["windows"] * seqlen].tolist()
    n_bytes = len(tok.decode(evaluated, skip_special_tokens=True).encode("utf-8"))
    expected = math.log2(vocab) * len(evaluated) / n_bytes
    assert ppl_mod.bits_per_byte(result, ids, tok) == pytest.approx(expected, rel=1e-6)
    # and the evaluate() helper reports the same number beside perplexity
    assert ppl_mod.evaluate(_UniformLM(vocab), tok, f"file:{path}", seqlen)["bits_per_byte"] == pytest.approx(expected, rel=1e-6)

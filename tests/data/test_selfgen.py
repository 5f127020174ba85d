"""Self-generated calibration data on the demo model: determinism, left padding, the perplexity filter, the disk cache, cancel, export."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.data import corpora, selfgen
from workbench.data.sampling import calibration_samples
from workbench.data.sources import SourceContext
from workbench.cli import main
from workbench.errors import Cancelled, UserError
from workbench.models import load_model
from workbench.spec import SelfGenSpec

# Small enough to generate in well under a second on one CPU thread.
TINY = SelfGenSpec(samples=10, max_new_tokens=24, batch_size=4)
WIKITEXT_VALID = Path(corpora.__file__).resolve().parents[1] / "assets" / "data" / "wikitext2-valid.raw"


@pytest.fixture(scope="module")
def demo(one_thread):
    return load_model("demo", dtype="float32", device="cpu")


def make(demo, params=TINY, seed=0, cache_dir=None, **kwargs):
    return selfgen.generated_set(demo.model, demo.tokenizer, params, nsamples=8, seqlen=16, seed=seed, cache_dir=cache_dir, **kwargs)


def sequences_of(demo, params=TINY, seed=0):
    """The token ids generated_set produces, obtained through the public steps (same prompts, same seed)."""
    prompts = selfgen.pick_prompts(selfgen.seed_texts(params.corpus), demo.tokenizer, params.samples, params.prefix_tokens, seed)
    seqs, _ = selfgen.generate(demo.model, prompts, params, params.max_new_tokens, demo.tokenizer.eos_token_id, seed, torch.device("cpu"))
    return prompts, seqs


def direct_perplexity(model, ids: list[int]) -> float:
    """exp(mean next-token negative log-likelihood), one unpadded sequence at a time."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()
    return math.exp(float(nll))


def spy_generate(monkeypatch, model) -> list:
    calls = []
    real = model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    return calls


# ----------------------------------------------------------------- generation


@pytest.mark.slow
def test_generation_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(demo):
    state = torch.get_rng_state()
    a, b, c = make(demo, seed=0), make(demo, seed=0), make(demo, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert [s["text"] for s in a.samples] == [s["text"] for s in b.samples]
    assert [s["perplexity"] for s in a.samples] == [s["perplexity"] for s in b.samples]
    assert [s["text"] for s in a.samples] != [s["text"] for s in c.samples]
    assert len(a.samples) == TINY.samples
    assert all(0 < s["tokens"] - TINY.prefix_tokens <= TINY.max_new_tokens for s in a.samples)


def test_prompts_are_the_first_k_tokens_of_wikitext2_paragraphs(demo):
    # Paragraphs of the validation file read here, independently: rows that are neither empty nor " = Title = ".
    rows = [line.strip() for line in WIKITEXT_VALID.read_text(encoding="utf-8").split("\n")]
    paragraphs = [r for r in rows if r and not re.fullmatch(r"=+ .* =+", r)]
    starts = {tuple(demo.tokenizer(p, add_special_tokens=False)["input_ids"][:2]) for p in paragraphs}
    gset = make(demo)
    for sample in gset.samples:
        prefix_ids = tuple(demo.tokenizer(sample["prefix"], add_special_tokens=False)["input_ids"])
        assert prefix_ids in starts
        assert sample["text"].startswith(sample["prefix"])


def test_sampling_settings_and_left_padding_reach_generate(demo, monkeypatch):
    calls = spy_generate(monkeypatch, demo.model)
    eos = demo.tokenizer.eos_token_id
    selfgen.generate(demo.model, [[10, 11], [12, 13, 14, 15]], TINY, 4, eos, 0, torch.device("cpu"))
    (call,) = calls
    config = call["generation_config"]
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (True, 0.6, 0.95, 50, 1.2)
    assert config.pad_token_id == eos and config.eos_token_id == eos and config.use_cache and config.max_new_tokens == 4
    assert call["input_ids"].tolist() == [[eos, eos, 10, 11], [12, 13, 14, 15]]
    assert call["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(demo):
    # top_k = 1 makes sampling pick the most likely token, so outputs can be compared across batch shapes.
    greedy = replace(TINY, top_k=1, repetition_penalty=1.0, batch_size=3)
    prompts = [[259, 288], [80, 914, 300, 12], [50, 60, 70]]
    eos = demo.tokenizer.eos_token_id
    batched, _ = selfgen.generate(demo.model, prompts, greedy, 12, eos, 0, torch.device("cpu"))
    single = [selfgen.generate(demo.model, [p], replace(greedy, batch_size=1), 12, eos, 0, torch.device("cpu"))[0][0] for p in prompts]
    assert batched == single


def test_progress_reports_samples_tokens_per_second_and_eta(demo):
    seen = []
    make(demo, progress=lambda done, total, detail: seen.append((done, total, detail)))
    generating = [s for s in seen if "tokens/s" in s[2]]
    assert [d for d, _, _ in generating] == [4, 8, 10] and all(t == 10 for _, t, _ in generating)
    assert all("ETA" in detail for _, _, detail in generating)


# ----------------------------------------------------------------- the filter


def test_filter_keeps_exactly_the_samples_below_the_80th_percentile(demo):
    gset = make(demo)
    ppl = [s["perplexity"] for s in gset.samples]
    threshold = np.percentile(ppl, 80)
    assert gset.threshold == pytest.approx(threshold, rel=1e-12)
    assert gset.kept == [i for i, p in enumerate(ppl) if p < threshold]
    assert len(gset.kept) == 8  # 10 samples, 80th percentile between the 8th and 9th: the worst 2 dropped
    # The stored perplexities are each generated sequence's own, computed here one unpadded sequence at a time.
    _, seqs = sequences_of(demo)
    assert [len(s) for s in seqs] == [s["tokens"] for s in gset.samples]
    for seq, p in zip(seqs, ppl):
        assert p == pytest.approx(direct_perplexity(demo.model, seq), rel=1e-4)


def test_keep_below_quantile_against_numpy():
    rng = np.random.default_rng(0)
    for n, keep in ((7, 0.8), (50, 0.5), (13, 0.9)):
        values = list(rng.lognormal(3, 1, n))
        threshold, kept = selfgen.keep_below_quantile(values + [math.inf, None], keep)
        assert threshold == pytest.approx(np.percentile(values, 100 * keep))
        assert kept == [i for i, v in enumerate(values) if v < np.percentile(values, 100 * keep)]
    assert selfgen.keep_below_quantile([3.0, 1.0, 2.0], 1.0)[1] == [0, 1, 2]


# ----------------------------------------------------------------- cache


def test_cache_hit_on_a_second_call_and_miss_when_anything_changes(demo, tmp_path, monkeypatch):
    calls = spy_generate(monkeypatch, demo.model)
    first = make(demo, cache_dir=tmp_path)
    n = len(calls)
    assert n == 3 and not first.from_cache and len(list(tmp_path.glob("selfgen-*.json"))) == 1
    again = make(demo, cache_dir=tmp_path)
    assert len(calls) == n and again.from_cache
    assert again.samples == first.samples and again.kept == first.kept
    # keep only filters the cached set: no generation, a different selection
    half = make(demo, params=replace(TINY, keep=0.5), cache_dir=tmp_path)
    assert len(calls) == n and half.from_cache and len(half.kept) == 5
    # another seed misses and generates again
    make(demo, seed=3, cache_dir=tmp_path)
    assert len(calls) > n and len(list(tmp_path.glob("selfgen-*.json"))) == 2
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("change", [
    {"prefix_tokens": 3}, {"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 40}, {"repetition_penalty": 1.1},
    {"samples": 11}, {"max_new_tokens": 25}, {"batch_size": 5}, {"corpus": "c4"}, {"seed": 1}, {"weights": "halved"},
])
def test_the_cache_key_covers_every_setting_and_the_weights(demo, change):
    key = lambda params=TINY, seed=0: selfgen.cache_key(demo.model, demo.tokenizer, params, params.samples,  # noqa: E731
                                                          params.max_new_tokens, seed, torch.device("cpu"))
    base = key()
    assert key() == base
    if "seed" in change:
        assert key(seed=change["seed"]) != base
    elif "weights" in change:
        weight = demo.adapter.layers[3].mlp.down_proj.weight
        saved = weight.detach().clone()
        try:
            weight.data.mul_(0.5)
            assert key() != base
        finally:
            weight.data.copy_(saved)
        assert key() == base
    else:
        assert key(replace(TINY, **change)) != base


def test_cancel_mid_generation_leaves_no_cache_entry(demo, tmp_path):
    checks = {"n": 0}

    def cancel_after_some_tokens():  # true from the 6th check on: inside the first batch
        checks["n"] += 1
        return checks["n"] > 5

    with pytest.raises(Cancelled):
        make(demo, cache_dir=tmp_path, cancel=cancel_after_some_tokens)
    assert list(tmp_path.iterdir()) == []
    # between batches too
    flag = {"stop": False}
    with pytest.raises(Cancelled):
        make(demo, cache_dir=tmp_path, cancel=lambda: flag["stop"], progress=lambda d, t, s: flag.update(stop=True))
    assert list(tmp_path.iterdir()) == []
    # a later run completes and caches
    assert not make(demo, cache_dir=tmp_path).from_cache
    assert len(list(tmp_path.glob("selfgen-*.json"))) == 1


# ----------------------------------------------------------------- as a calibration source


@pytest.mark.slow
def test_selfgen_source_windows_are_cut_from_the_joined_kept_texts(demo):
    context = SourceContext(options={"selfgen": TINY})
    ids = calibration_samples("selfgen", demo.tokenizer, nsamples=8, seqlen=16, seed=0, model=demo.model, context=context)
    joined = demo.tokenizer("\n\n".join(make(demo).kept_texts), add_special_tokens=False)["input_ids"]
    assert ids.shape == (8, 16)
    for row in ids.tolist():
        assert any(joined[s : s + 16] == row for s in range(len(joined) - 15))
    # selfgen:CORPUS picks the seed corpus
    c4 = calibration_samples("selfgen:c4", demo.tokenizer, nsamples=8, seqlen=16, seed=0, model=demo.model, context=context)
    assert not torch.equal(c4, ids)


def test_selfgen_without_a_model_is_a_user_error(demo):
    with pytest.raises(UserError, match="needs the model"):
        calibration_samples("selfgen", demo.tokenizer, nsamples=2, seqlen=8)


def test_export_jsonl_loads_back_as_a_file_source(demo, tmp_path):
    gset = make(demo)
    path = selfgen.export_jsonl(gset, tmp_path / "gen.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == gset.kept_texts and all(r["kept"] for r in rows)
    assert corpora.file_documents(path) == [t for t in gset.kept_texts if t.strip()]
    assert calibration_samples(f"file:{path}", demo.tokenizer, nsamples=4, seqlen=8).shape == (4, 8)
    everything = selfgen.export_jsonl(gset, tmp_path / "all.jsonl", include_dropped=True)
    assert sum(1 for _ in everything.open()) == len(gset.samples)


def test_calib_export_command(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    args = ["calib", "export", "selfgen", "--nsamples", "4", "--seqlen", "16", "--out", str(out),
            "--set", "calibration.selfgen.samples=6", "--set", "calibration.selfgen.batch_size=6"]
    assert main(args) == 0
    assert len(out.read_text().splitlines()) == 4  # 6 generated, 80th percentile keeps 4
    assert f"file:{out}" in capsys.readouterr().out
    assert main(["calib", "export", "c4", "--out", str(tmp_path / "c4.jsonl")]) == 2
    assert "only a self-generated set" in capsys.readouterr().err


# ----------------------------------------------------------------- bad input


def test_a_seed_corpus_too_small_for_the_samples(demo, tmp_path):
    small = tmp_path / "three.txt"
    small.write_text("First paragraph here.\n\nSecond one.\n\nThird and last.", encoding="utf-8")
    with pytest.raises(UserError, match="holds 3 texts; selfgen needs 10") as err:
        make(demo, params=replace(TINY, corpus=f"file:{small}"))
    assert "calibration.selfgen.samples" in err.value.hint


def test_k_larger_than_the_texts(demo, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"Short paragraph number {i}." for i in range(20)), encoding="utf-8")
    with pytest.raises(UserError, match="only 0 of the 20 texts .* have at least 50 tokens; selfgen needs 10") as err:
        make(demo, params=replace(TINY, corpus=f"file:{short}", prefix_tokens=50))
    assert "prefix_tokens" in err.value.hint


def test_too_few_kept_tokens_for_the_windows(demo):
    context = SourceContext(options={"selfgen": replace(TINY, samples=4, max_new_tokens=4)})
    with pytest.raises(UserError, match="too little for 8 windows") as err:
        calibration_samples("selfgen", demo.tokenizer, nsamples=8, seqlen=16, model=demo.model, context=context)
    assert "calibration.selfgen.samples" in err.value.hint


def test_generation_stays_within_the_model_context(demo):
    # the demo model's context is 512 tokens: a 2-token prompt leaves room for 510 new ones
    assert selfgen.max_new_tokens(demo.model, demo.tokenizer, SelfGenSpec(), 512) == 510
    assert selfgen.max_new_tokens(demo.model, demo.tokenizer, SelfGenSpec(max_new_tokens=64), 512) == 64
    with pytest.raises(UserError, match="no room to generate"):
        selfgen.max_new_tokens(demo.model, demo.tokenizer, SelfGenSpec(prefix_tokens=512), 512)

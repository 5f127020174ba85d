"""Dense baselines reused: a hit on an identical setting, a miss when any part of the key changes, and the
reused figure equal to a fresh measurement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import workbench.engine as engine_mod
from workbench.evaluation import baselines
from workbench.models import load_model
from workbench.perplexity import eval_tokens, perplexity
from workbench.spec import spec_from_dict

DEMO = Path(engine_mod.__file__).resolve().parent / "assets" / "demo-llama"


@pytest.fixture
def model_dir(tmp_path):
    """A tiny random Llama with the demo tokenizer, saved as a local folder."""
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=len(tokenizer),
                                  max_position_embeddings=128)
    folder = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _run(folder, **evaluate):
    spec = spec_from_dict({"name": "baseline", "model": {"name": str(folder), "dtype": "float32", "device": "cpu"},
                           "steps": [], "evaluate": {"perplexity": ["wikitext2"], "seqlen": 32, "limit": 3, **evaluate}})
    events = []
    summary = engine_mod.execute(spec, emit=events.append)
    [metric] = [m for m in summary["metrics"] if m["name"] == "perplexity"]
    logs = [e.message for e in events if e.type == "log"]
    return summary["run_id"], metric, logs


@pytest.mark.slow
def test_an_identical_run_reuses_the_dense_figure_and_fresh_measures_it_again(model_dir):
    first_id, first, _ = _run(model_dir)
    assert "reused_from" not in first["extra"]
    second_id, second, logs = _run(model_dir)
    assert second["extra"]["reused_from"] == first_id and second_id != first_id
    assert second["value"] == first["value"] and second["windows"] == first["windows"] == 3
    assert second["extra"]["bits_per_byte"] == first["extra"]["bits_per_byte"]
    assert any(f"reused from run {first_id}" in line for line in logs)
    # --fresh: measured again, and the reused figure is what a fresh measurement gives
    _, fresh, _ = _run(model_dir, fresh=True)
    assert "reused_from" not in fresh["extra"] and fresh["value"] == first["value"]
    # and the figure is the perplexity computed directly, outside the engine
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    ids = eval_tokens("wikitext2", loaded.tokenizer, 32)
    assert first["value"] == pytest.approx(perplexity(loaded.model, ids, 32, limit=3, batch_size=4)["ppl"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("change", [{"limit": 2}, {"seqlen": 16}, {"batch_size": 1}])
def test_another_protocol_is_measured(model_dir, change):
    _run(model_dir)
    _, metric, _ = _run(model_dir, **change)
    assert "reused_from" not in metric["extra"]


@pytest.mark.slow
def test_changed_weights_are_measured(model_dir):
    _, before, _ = _run(model_dir)
    weights = model_dir / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    _, after, _ = _run(model_dir)
    assert "reused_from" not in after["extra"] and after["value"] != before["value"]


def test_every_part_of_the_key_counts(model_dir, tmp_path):
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    ids = eval_tokens("wikitext2", loaded.tokenizer, 32)
    base = dict(dataset="wikitext2", seqlen=32, limit=3, batch_size=4, device_type="cpu", trust_remote_code=False,
                versions={"workbench": "1", "torch": "2", "transformers": "3"})
    key = baselines.perplexity_key(loaded, ids, **base)
    assert key == baselines.perplexity_key(loaded, ids.clone(), **base)  # the same inputs, the same key
    variants = [{"dataset": "books"}, {"seqlen": 64}, {"limit": None}, {"batch_size": 8}, {"device_type": "cuda"},
                {"trust_remote_code": True}, {"versions": {**base["versions"], "torch": "2.1"}},
                {"versions": {**base["versions"], "transformers": "3.1"}}]
    keys = {baselines.perplexity_key(loaded, ids, **{**base, **v}) for v in variants}
    assert key not in keys and len(keys) == len(variants)
    # other tokens (another tokenizer or another version of the data give other ids)
    other = ids.clone()
    other[0, 5] = (other[0, 5] + 1) % len(loaded.tokenizer)
    assert baselines.perplexity_key(loaded, other, **base) != key
    # another dtype
    half = load_model(str(model_dir), dtype="bfloat16", device="cpu")
    assert baselines.perplexity_key(half, ids, **base) != key
    # a file of the model folder touched (a new tokenizer file, a rewritten config)
    config = model_dir / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert baselines.perplexity_key(loaded, ids, **base) != key


def test_a_hub_model_without_a_known_commit_is_never_reused(model_dir):
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    loaded.source_kind, loaded.source = "hub", "someone/some-model"
    loaded.model.config._commit_hash = None
    ids = eval_tokens("wikitext2", loaded.tokenizer, 32)
    kw = dict(dataset="wikitext2", seqlen=32, limit=3, batch_size=4, device_type="cpu", trust_remote_code=False, versions={})
    assert baselines.perplexity_key(loaded, ids, **kw) is None
    loaded.model.config._commit_hash = "a" * 40
    assert baselines.perplexity_key(loaded, ids, **kw) is not None


@pytest.mark.slow
def test_a_damaged_record_is_a_miss(model_dir):
    first_id, first, _ = _run(model_dir)
    [record] = list(baselines.baseline_folder().glob("*.json"))
    stored = json.loads(record.read_text())
    assert stored["run_id"] == first_id and stored["value"] == first["value"]
    record.write_text("{not json")
    _, again, _ = _run(model_dir)
    assert "reused_from" not in again["extra"] and again["value"] == first["value"]

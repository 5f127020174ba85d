"""Structured steps in whole runs on the demo model: the OpenBA-style preset end to end, composition, bad input at run start."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import workbench
from workbench import cli
from workbench.engine import Run
from workbench.history import History
from workbench.spec import load_preset, spec_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["calibration.nsamples=8", "calibration.seqlen=128", "evaluate.seqlen=128", "evaluate.limit=4",
         "evaluate.efficiency=false"]


def _size(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.mark.slow
def test_openba_style_run_gives_an_ordinary_smaller_checkpoint(tmp_path):
    spec = load_preset("openba-style", SMALL + ["export.save=true", f'export.out="{tmp_path / "out"}"', "export.dtype=float32"])
    run = Run(spec)
    summary = run.execute()
    vocab, depth, width = summary["steps"]
    assert (vocab["vocab_before"], vocab["vocab_after"]) == (8192, 4096)
    assert depth["layers_after"] == 6 and all(0 < i < 7 for i in depth["removed"]) and abs(depth["removed"][0] - depth["removed"][1]) > 1
    assert width["headline"]["MLP channels"] == "768 -> 576"
    for before, after in zip(summary["steps"], summary["steps"][1:]):
        assert after["parameters_before"] == before["parameters_after"] > after["parameters_after"]
    assert all("parameters" in s["headline"] for s in summary["steps"])
    after = [m for m in summary["metrics"] if m["phase"] == "after" and m["name"] == "perplexity"]
    assert {m["dataset"] for m in after} == {"wikitext2", "books"} and all(m["extra"]["bits_per_byte"] > 0 for m in after)

    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.intermediate_size, model.config.vocab_size) == (6, 576, 4096)
    assert len(tokenizer) == 4096
    sample = "K. was arrested one fine morning, though he had done nothing wrong. Ça va? 🙂"
    ids = tokenizer(sample, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == sample
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, run.loaded.model(input_ids=ids).logits)
    dense_float32_bytes = 4 * summary["steps"][0]["parameters_before"]
    assert _size(out) < 0.6 * dense_float32_bytes  # 5.9M of 10.5M parameters are left


def test_structured_steps_compose_with_pruning(tmp_path):
    spec = spec_from_dict({
        "calibration": {"source": "books", "nsamples": 8, "seqlen": 128},
        "steps": [{"type": "depth", "fraction": 0.25},
                  {"type": "width", "mlp_width": 0.5, "method": "flap", "allocation": "global"},
                  {"type": "prune", "method": "wanda", "sparsity": 0.5}],
        "evaluate": {"perplexity": ["books"], "seqlen": 128, "limit": 2},
        "export": {"save": True, "out": str(tmp_path / "out"), "dtype": "float32"}})
    run = Run(spec)
    summary = run.execute()
    assert [s["type"] for s in summary["steps"]] == ["depth", "width", "prune"]
    assert [e["kind"] for e in summary["structure"]] == ["width"]
    model, tokenizer = workbench.load(tmp_path / "out", dtype="float32", device="cpu")
    ids = tokenizer("a few words of text", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, run.loaded.model(input_ids=ids).logits)
    assert abs(summary["steps"][2]["sparsity"] - 0.5) < 0.01


@pytest.mark.parametrize("step,message,hint", [
    ('type = "depth"\nremove = 8', "removing 8 of the model's 8 decoder layers would leave none", "remove at most 7 layers"),
    ('type = "width"\nattention_heads = 3', "attention_heads = 3 breaks the grouped-query layout", "multiple of 2 from 2 to 4"),
])
def test_what_needs_the_model_is_refused_right_after_loading(step, message, hint, tmp_path, capsys):
    preset = tmp_path / "bad.toml"
    preset.write_text(f'[model]\nname = "demo"\n[calibration]\nnsamples = 8\nseqlen = 128\n[[steps]]\n{step}\n'
                      f'[evaluate]\nseqlen = 128\nlimit = 2\n', encoding="utf-8")
    assert cli.main(["run", str(preset), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and hint in err
    with History() as history:
        failed = history.runs(limit=1)[0]
        assert failed.status == "failed"
        assert history.metrics(failed.id) == []  # refused before any work, the dense evaluation included
        assert [e["stage"] for e in history.events(failed.id) if e["type"] == "stage_started"] == ["load"]

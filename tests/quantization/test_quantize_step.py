"""The quantize step through the engine on tiny models: compressed-tensors exports that transformers loads with the
evaluated weights, AWQ's folding that leaves the function unchanged, sparsity kept, and bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_support import expect_bad_input
from tiny_models import tiny_llama
from workbench.engine import Run
from workbench.spec.validate import spec_from_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    model, tokenizer = tiny_llama()
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _spec(model: Path, steps: list, out: Path | None = None, dtype: str = "bfloat16", dtype_export: str | None = None,
          **export) -> dict:
    spec = {"name": "q", "model": {"name": str(model), "dtype": dtype},
            "calibration": {"source": "random", "nsamples": 8, "seqlen": 64, "summary": False},
            "steps": steps, "evaluate": {"perplexity": [], "before": False}}
    if out is not None:
        spec["export"] = {"save": True, "out": str(out), **export}
        spec["export"]["dtype"] = dtype_export or dtype  # the tiny checkpoint is float32; export in the run's dtype
    return spec


def _run(spec: dict) -> Run:
    run = Run(spec_from_dict(spec))
    run.execute()
    return run


def _tensor_bytes(folder: Path) -> int:
    """The bytes of tensor data in the folder's safetensors files (the header with the tensor names left out)."""
    from safetensors import safe_open

    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "I8": 1, "F8_E4M3": 1}
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                total += sizes[part.get_dtype()] * int(torch.Size(part.get_shape()).numel())
    return total


@pytest.mark.parametrize("step", [
    {"type": "quantize", "method": "gptq", "group_size": 16},
    {"type": "quantize", "method": "awq", "group_size": 16, "awq_quantizer": "gptq"},
    {"type": "quantize", "method": "rtn", "bits": 8, "group_size": 0},
    {"type": "quantize", "method": "rtn", "weights": "fp8"},
], ids=["gptq-w4g16", "awq-gptq-w4g16", "rtn-w8", "fp8"])
def test_the_export_loads_with_transformers_and_gives_the_same_logits(tiny_folder, tmp_path, step, one_thread):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "quantized"
    run = _run(_spec(tiny_folder, [step], out))
    model = run.loaded.model
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        stored = {key: f.get_slice(key).get_dtype() for key in f.keys() if ".mlp.down_proj." in key and ".0." in key}
    if step.get("weights") == "fp8":  # the format compressed-tensors chooses for FP8 weights with 16-bit activations
        assert qc["format"] == "naive-quantized" and stored["model.layers.0.mlp.down_proj.weight"] == "F8_E4M3"
    else:
        assert qc["format"] == "pack-quantized" and stored["model.layers.0.mlp.down_proj.weight_packed"] == "I32"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    for name, mod in model.named_modules():  # every quantized linear decodes to exactly the evaluated weights
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            assert torch.equal(loaded.get_submodule(name).weight, mod.weight), name
    assert torch.equal(ours, theirs)
    summary = run.summary["steps"][0]
    assert summary["type"] == "quantize" and summary["bits_per_weight"] > (8 if step.get("bits") == 8 or "weights" in step else 4)


def test_the_packed_export_is_smaller_by_the_expected_ratio(tiny_folder, tmp_path, one_thread):
    step = {"type": "quantize", "method": "rtn", "group_size": 16}
    _run(_spec(tiny_folder, [step], tmp_path / "packed"))
    _run(_spec(tiny_folder, [step], tmp_path / "dense", format="dense"))
    model, _ = tiny_llama()
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    # each linear weight: 16 bits dense; 4 bits packed plus a 16-bit scale per 16 weights (and an 8-byte shape per linear)
    saved = linear * 2 - linear // 2 - (linear // 16) * 2
    linears = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    saved -= linears * 16
    from workbench.evaluation.efficiency import disk_bytes

    run = _run(_spec(tiny_folder, [step], tmp_path / "again"))
    assert disk_bytes(run.loaded.model) == _tensor_bytes(tmp_path / "again")  # the efficiency figure is the export's
    dense, packed = _tensor_bytes(tmp_path / "dense"), _tensor_bytes(tmp_path / "packed")
    assert dense - packed == saved, (dense, packed, saved)
    assert (linear * 2 - saved) / (linear * 2) == pytest.approx((4 + 16 / 16) / 16, abs=0.01)  # the linears at ~5/16 of their size


def test_quantizing_a_pruned_model_keeps_it_exactly_as_sparse(tiny_folder, tmp_path, one_thread):
    steps = [{"type": "prune", "method": "magnitude", "sparsity": 0.5},
             {"type": "quantize", "method": "gptq", "group_size": 16}]
    run = _run(_spec(tiny_folder, steps, dtype="float32"))
    prune, quantize = run.summary["steps"]
    assert quantize["sparsity"] == prune["sparsity"] == 0.5
    for layer in run.loaded.adapter.layers:
        for name, mod in run.loaded.adapter.linear_modules(layer).items():
            zeros = int((mod.weight == 0).sum())
            assert zeros >= mod.weight.numel() // 2, name  # every pruned weight still zero (rounding may add zeros)


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["gqa", "mha"])
def test_awq_folding_leaves_the_function_unchanged(kv_heads, one_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.models import get_adapter
    from workbench.quantization.awq import apply_scale, fold_groups

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=kv_heads)
    model = LlamaForCausalLM(config).eval()
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        folded = set()
        for layer in adapter.layers:
            for prev_name, prev, names in fold_groups(adapter, layer):
                cols = layer.get_submodule(names[0]).weight.shape[1]
                apply_scale(prev, [layer.get_submodule(n) for n in names], torch.rand(cols) * 3 + 0.2)
                folded.add(prev_name)
        after = model(ids).logits
    expected = {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"} | ({"self_attn.v_proj"} if kv_heads == 2 else set())
    assert folded == expected  # v -> o only when v's channels feed o's inputs one to one
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_awq_search_never_does_worse_than_plain_rounding():
    from workbench.quantization.awq import search_scale
    from workbench.quantization.quantizer import QuantArgs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, [3, 17, 40]] *= 20  # a few salient input channels, as in LLM activations
    W = torch.randn(48, 64, generator=g) * 0.05
    s, alpha, ratio = search_scale([W], x.t() @ x, x.abs().mean(0), QuantArgs(4, "int", True, 16), torch.float32, 20)
    assert 0 <= alpha < 1 and ratio <= 1.0
    assert ratio < 0.8  # with salient channels, scaling them up before rounding helps


def test_bad_quantization_input_is_refused(tiny_folder, tmp_path, capsys, monkeypatch):
    def preset(name, steps):
        lines = ['name = "q"', "[model]", f'name = "{tiny_folder}"', "[calibration]", 'source = "random"',
                 "nsamples = 2", "seqlen = 16", "[evaluate]", "perplexity = []"]
        for step in steps:
            lines.append("[[steps]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in step.items()]
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    expect_bad_input(capsys, "run", preset("bits", [{"type": "quantize", "bits": 3}]), words=("bits = 3", "4 or 8"))
    expect_bad_input(capsys, "run", preset("group", [{"type": "quantize", "method": "rtn", "group_size": 24}]),
                     words=("group_size = 24", "32 input features"))
    expect_bad_input(capsys, "run", preset("order", [{"type": "quantize", "method": "rtn", "group_size": 16},
                                                     {"type": "prune", "method": "magnitude"}]),
                     words=("steps.1 (prune)", "already quantized"))
    monkeypatch.setattr("workbench.quantization.step.fp8_available", lambda: False)
    expect_bad_input(capsys, "run", preset("fp8", [{"type": "quantize", "method": "rtn", "weights": "fp8"}]),
                     words=("float8_e4m3fn",))
    monkeypatch.undo()
    # a quantized checkpoint given to a pruning step
    out = tmp_path / "quantized"
    _run(_spec(tiny_folder, [{"type": "quantize", "method": "rtn", "group_size": 16}], out))
    expect_bad_input(capsys, "run", preset("prune", [{"type": "prune", "method": "magnitude"}]), "--model", str(out),
                     words=("quantization_config",))


def test_compare_shows_bits_per_weight_and_the_export_size_beside_perplexity(tiny_folder, tmp_path, capsys, one_thread):
    from cli_support import run_cli

    preset = tmp_path / "q.toml"
    preset.write_text(f"""name = "q"
[model]
name = "{tiny_folder}"
[calibration]
source = "random"
nsamples = 4
seqlen = 32
[[steps]]
type = "quantize"
method = "gptq"
group_size = 16
[evaluate]
perplexity = ["wikitext2"]
seqlen = 32
limit = 2
""")
    code, out, err = run_cli(capsys, "run", str(preset), "--out", str(tmp_path / "export"), "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    size = sum(p.stat().st_size for p in (tmp_path / "export").glob("*.safetensors"))
    metrics = {m["name"]: m for m in summary["metrics"]}
    assert metrics["export_bytes"]["value"] == size
    assert metrics["bits_per_weight"]["value"] == pytest.approx(4 + 16 / 16)
    code, out, err = run_cli(capsys, "compare", summary["run_id"])
    assert code == 0, err
    bits_row = next(line for line in out.splitlines() if "bits per linear weight" in line)
    assert "5.0000" in bits_row
    size_row = next(line for line in out.splitlines() if "export on disk (MB)" in line)
    assert f"{size / 1e6:.4f}"[:4] in size_row
    assert "perplexity wikitext2" in out


def test_a_low_rank_model_quantized_is_exported_dense_and_loads_back(tiny_folder, tmp_path, one_thread):
    """Low-rank factors have input sizes a group may not divide (they stay in 16 bits, said), and a model with recorded
    structure is written dense: only workbench.load rebuilds it, and compressed-tensors would not survive that."""
    from workbench.models import load

    events = []
    steps = [{"type": "lowrank", "method": "svd", "retention": 0.8}, {"type": "quantize", "method": "rtn", "group_size": 16}]
    run = Run(spec_from_dict(_spec(tiny_folder, steps, tmp_path / "export", dtype="float32", dtype_export="float32")), emit=events.append)
    run.execute()
    warnings = [e.message for e in events if e.type == "warning"]
    assert any("stay in 16 bits" in w for w in warnings) and any("exported with dense" in w for w in warnings)
    assert "quantization_config" not in json.loads((tmp_path / "export" / "config.json").read_text())
    again, _ = load(tmp_path / "export", dtype="float32")
    ids = torch.randint(0, 8000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, run.loaded.model(ids).logits, atol=1e-5)

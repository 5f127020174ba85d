"""Model loading, source/device/dtype resolution and the architecture adapters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from workbench import models
from workbench.errors import UserError
from workbench.models import (
    DEMO_MODEL_DIR,
    FAMILIES,
    LoadedModel,
    get_adapter,
    load_model,
    model_summary,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
    weight_matrix,
)

H, FF, HEADS, KV, HEAD_DIM, VOCAB, CTX = 64, 128, 4, 2, 16, 256, 128
SPECIAL = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]


def tiny_config(model_type: str):
    common = dict(
        hidden_size=H, intermediate_size=FF, num_attention_heads=HEADS, num_key_value_heads=KV,
        num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=CTX, **SPECIAL,
    )
    if model_type in LLAMA_LIKE:
        return AutoConfig.for_model(model_type, head_dim=HEAD_DIM, **common)
    if model_type in ("phi", "phi3"):
        return AutoConfig.for_model(model_type, **common)
    if model_type == "gpt_neox":
        common.pop("num_key_value_heads")
        return AutoConfig.for_model(model_type, **common)
    if model_type == "opt":
        return AutoConfig.for_model(
            "opt", hidden_size=H, ffn_dim=FF, num_attention_heads=HEADS, num_hidden_layers=2,
            vocab_size=VOCAB, max_position_embeddings=CTX, word_embed_proj_dim=H // 2, **SPECIAL,
        )
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=H, n_head=HEADS, n_layer=2, vocab_size=VOCAB,
                                    n_positions=CTX, bos_token_id=0, eos_token_id=1)
    raise AssertionError(model_type)


def tiny_model(model_type: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def expected_linears(model_type: str) -> dict[str, list[int]]:
    q, kv = HEADS * HEAD_DIM, KV * HEAD_DIM
    if model_type in LLAMA_LIKE:
        return {
            "self_attn.q_proj": [q, H], "self_attn.k_proj": [kv, H], "self_attn.v_proj": [kv, H],
            "self_attn.o_proj": [H, q], "mlp.gate_proj": [FF, H], "mlp.up_proj": [FF, H], "mlp.down_proj": [H, FF],
        }
    if model_type == "phi":
        return {
            "self_attn.q_proj": [q, H], "self_attn.k_proj": [kv, H], "self_attn.v_proj": [kv, H],
            "self_attn.dense": [H, q], "mlp.fc1": [FF, H], "mlp.fc2": [H, FF],
        }
    if model_type == "phi3":
        return {"self_attn.o_proj": [H, q], "self_attn.qkv_proj": [q + 2 * kv, H],
                "mlp.gate_up_proj": [2 * FF, H], "mlp.down_proj": [H, FF]}
    if model_type == "opt":
        return {"self_attn.k_proj": [H, H], "self_attn.v_proj": [H, H], "self_attn.q_proj": [H, H],
                "self_attn.out_proj": [H, H], "fc1": [FF, H], "fc2": [H, FF]}
    if model_type == "gpt2":  # Conv1D, weights stored (in, out); seen (out, in) through weight_matrix
        return {"attn.c_attn": [3 * H, H], "attn.c_proj": [H, H], "mlp.c_fc": [4 * H, H], "mlp.c_proj": [H, 4 * H]}
    if model_type == "gpt_neox":
        return {"attention.query_key_value": [3 * H, H], "attention.dense": [H, H],
                "mlp.dense_h_to_4h": [FF, H], "mlp.dense_4h_to_h": [H, FF]}
    raise AssertionError(model_type)


pytestmark = pytest.mark.usefixtures("one_thread")


ALL_TYPES = LLAMA_LIKE + ["opt", "gpt2", "gpt_neox", "phi", "phi3"]
FAMILY_OF = {**{t: "llama" for t in LLAMA_LIKE}, "opt": "opt", "gpt2": "gpt2", "gpt_neox": "gpt_neox",
             "phi": "phi", "phi3": "phi"}
TIED = {"gemma", "gemma2", "gemma3_text", "opt", "gpt2"}


@pytest.fixture(scope="module")
def tiny_models():
    cache: dict[str, nn.Module] = {}

    def get(model_type: str):
        if model_type not in cache:
            cache[model_type] = tiny_model(model_type)
        return cache[model_type]

    return get


def test_registry_covers_the_documented_types():
    assert set(ALL_TYPES) <= set(FAMILIES)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_adapter_layout(model_type, tiny_models):
    model = tiny_models(model_type)
    adapter = get_adapter(model)
    assert adapter.family == FAMILY_OF[model_type]
    assert isinstance(adapter.layers, nn.ModuleList) and len(adapter.layers) == 2 == adapter.num_layers
    assert adapter.lm_head is model.get_output_embeddings()
    assert adapter.context_length == CTX
    assert adapter.tied_lm_head == (model_type in TIED)
    for layer in adapter.layers:
        found = adapter.linear_modules(layer)
        assert list(found) == list(expected_linears(model_type))  # names, in module order
        assert {n: list(weight_matrix(m).shape) for n, m in found.items()} == expected_linears(model_type)
    assert list(adapter.linear_modules(0)) == list(adapter.linear_modules(adapter.layers[0]))


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_weight_matrix_writes_through(model_type, tiny_models):
    model = copy.deepcopy(tiny_models(model_type))
    dense = copy.deepcopy(model)
    adapter = get_adapter(model)
    name, module = next(iter(adapter.linear_modules(adapter.layers[0]).items()))
    w = weight_matrix(module)
    assert w.data_ptr() == module.weight.data_ptr()
    torch.manual_seed(1)
    x = torch.randn(3, w.shape[1])
    bias = module.bias if getattr(module, "bias", None) is not None else 0
    with torch.no_grad():
        torch.testing.assert_close(module(x), x @ w.T + bias)  # the view is (out, in)
        w[1, 2] = 0.0
        w[0].copy_(torch.full_like(w[0], 0.5))
        y = module(x)
        torch.testing.assert_close(y, x @ w.T + bias)
    stored = module.weight.data
    if model_type == "gpt2":
        assert stored[2, 1] == 0 and torch.all(stored[:, 0] == 0.5)
    else:
        assert stored[1, 2] == 0 and torch.all(stored[0] == 0.5)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, dense(ids).logits)


def test_weight_matrix_rejects_other_modules():
    with pytest.raises(TypeError):
        weight_matrix(nn.LayerNorm(4))


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_modules_cover_all_parameters(model_type, tiny_models):
    model = tiny_models(model_type)
    adapter = get_adapter(model)
    pre = adapter.pre_layer_modules()
    assert all(m is not adapter.layers and m is not adapter.lm_head for m in pre)
    assert all(not any(m is l for l in adapter.layers) for m in pre)
    if adapter.final_norm is not None:
        assert any(m is adapter.final_norm for m in pre)
    groups = {"pre": pre, "layers": [adapter.layers], "lm_head": [adapter.lm_head]}
    owner: dict[int, set[str]] = {}
    for group, mods in groups.items():
        for mod in mods:
            for p in mod.parameters():
                owner.setdefault(id(p), set()).add(group)
    for name, p in model.named_parameters(remove_duplicate=False):
        assert id(p) in owner, f"{name} is in no group"
        if len(owner[id(p)]) > 1:  # only the tied lm_head / input embedding may be shared
            assert owner[id(p)] == {"pre", "lm_head"} and adapter.tied_lm_head, name
    # buffers too (rotary inv_freq, gemma's embed scale): moving these modules moves them
    buffer_ids = {id(b) for mods in groups.values() for mod in mods for b in mod.buffers()}
    for name, b in model.named_buffers():
        assert id(b) in buffer_ids, f"buffer {name} is in no group"


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_final_norm_runs_after_last_layer(model_type, tiny_models):
    model = tiny_models(model_type)
    adapter = get_adapter(model)
    assert adapter.final_norm is not None
    calls: list[str] = []
    last_hidden = {}
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(f"layer{i}")) for i, layer in enumerate(adapter.layers)]
    hooks.append(adapter.final_norm.register_forward_hook(lambda *a: calls.append("norm")))
    hooks.append(adapter.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    hooks.append(adapter.layers[-1].register_forward_hook(
        lambda mod, args, out: last_hidden.__setitem__("h", out[0] if isinstance(out, tuple) else out)))
    ids = torch.randint(0, VOCAB, (2, 7))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["layer0", "layer1", "norm", "lm_head"]
    with torch.no_grad():
        torch.testing.assert_close(adapter.compute_logits(last_hidden["h"]), logits)


def test_opt_without_final_norm_and_projections():
    config = tiny_config("opt")
    config.do_layer_norm_before = False  # like facebook/opt-350m: no final layer norm, project_out after the layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter = get_adapter(model)
    assert adapter.final_norm is None
    assert adapter.post_layer_modules() == [model.model.decoder.project_out]
    assert any(m is model.model.decoder.project_in for m in adapter.pre_layer_modules())


class _Stop(Exception):
    pass


def _run_to_layer_zero(model, adapter, ids):
    """The hidden states and keyword arguments the base model passes to decoder layer 0."""
    seen = {}

    def grab(mod, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = kwargs
        raise _Stop

    handle = adapter.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(_Stop):
            model(ids)
    finally:
        handle.remove()
    return seen["hidden"], seen["kwargs"]


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_pre_layer_modules_suffice_to_reach_layer_zero(model_type, tiny_models):
    """With the decoder layers (and an untied lm_head) on the meta device, the forward still reaches layer 0."""
    model = copy.deepcopy(tiny_models(model_type))
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (2, 5))
    reference, _ = _run_to_layer_zero(model, adapter, ids)
    adapter.layers.to("meta")
    if not adapter.tied_lm_head:
        adapter.lm_head.to("meta")
    on_cpu = {id(p) for m in adapter.pre_layer_modules() for p in m.parameters()}
    assert all((p.device.type == "cpu") == (id(p) in on_cpu) for p in model.parameters())
    hidden, _ = _run_to_layer_zero(model, adapter, ids)
    assert hidden.device.type == "cpu"
    torch.testing.assert_close(hidden, reference)


def test_decoder_layer_runs_alone_with_captured_kwargs(tiny_models):
    """transformers 5: a decoder layer returns a tensor; rotary embeddings come from the base model as kwargs."""
    model = tiny_models("llama")
    adapter = get_adapter(model)
    hidden, kwargs = _run_to_layer_zero(model, adapter, torch.randint(0, VOCAB, (2, 5)))
    assert hidden.shape == (2, 5, H) and "position_embeddings" in kwargs
    with torch.no_grad():
        out = adapter.layers[0](hidden, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, 5, H)


def test_unsupported_architecture_adapter():
    config = AutoConfig.for_model("bloom", hidden_size=32, n_head=4, n_layer=1, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError) as err:
        get_adapter(model)
    assert "bloom" in err.value.message and "llama" in err.value.message and "gpt2" in err.value.message


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_model_summary(model_type, tiny_models):
    model = tiny_models(model_type)
    summary = model_summary(model)
    json.dumps(summary)
    assert summary["num_layers"] == 2
    assert summary["family"] == FAMILY_OF[model_type]
    assert summary["hidden_size"] == H and summary["vocab_size"] == VOCAB and summary["context_length"] == CTX
    assert summary["layer0_linears"] == expected_linears(model_type)
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())
    assert summary["decoder_linear_params"] == 2 * sum(a * b for a, b in expected_linears(model_type).values())
    assert summary["dtype"] == "float32"
    assert summary["architecture"] == type(model).__name__


# --------------------------------------------------------------------------- sources, devices, dtypes


def test_resolve_model_source(tmp_path, monkeypatch):
    assert resolve_model_source("demo") == ("demo", str(DEMO_MODEL_DIR))
    assert resolve_model_source("org/name") == ("hub", "org/name")
    assert resolve_model_source("gpt2") == ("hub", "gpt2")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model_source(str(folder)) == ("local", str(folder))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for bad in ["models/missing", "./missing", "/definitely/not/here", "~/no-such-model-folder-xyz", "a/b/c"]:
        with pytest.raises(UserError) as err:
            resolve_model_source(bad)
        assert f"'{bad}'" in err.value.message and "does not exist" in err.value.message
        assert "demo" in err.value.hint and "org/name" in err.value.hint
    (tmp_path / "weights.safetensors").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_source("weights.safetensors")


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError) as err:
        resolve_device("tpu")
    assert "cuda:N" in err.value.hint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for asked in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(UserError) as err:
            resolve_device(asked)
        assert "CUDA is not available" in err.value.message and "cpu" in err.value.hint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("CUDA:0") == torch.device("cuda", 0)
    with pytest.raises(UserError) as err:
        resolve_device("cuda:3")
    assert "1 CUDA device" in err.value.message


def test_resolve_dtype(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype("bfloat16", gpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    bf16_cfg, fp16_cfg, fp32_cfg = (AutoConfig.for_model("llama", dtype=d) for d in ("bfloat16", "float16", "float32"))
    assert resolve_dtype("auto", gpu, bf16_cfg) is torch.bfloat16
    assert resolve_dtype("auto", gpu, fp16_cfg) is torch.float16
    assert resolve_dtype("auto", gpu, fp32_cfg) is torch.bfloat16
    assert resolve_dtype("auto", gpu, None) is torch.bfloat16
    assert resolve_dtype("auto", cpu, bf16_cfg) is torch.float32
    for bad in ("fp8", "int8", "float64"):
        with pytest.raises(UserError) as err:
            resolve_dtype(bad, cpu)
        assert bad in err.value.message
        assert all(name in err.value.hint for name in ("auto", "float32", "bfloat16", "float16"))


# --------------------------------------------------------------------------- loading


def _save_tiny(model_type: str, folder, tokenizer=None):
    model = tiny_model(model_type)
    model.save_pretrained(folder)
    (tokenizer or AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)).save_pretrained(folder)
    return model


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_load_saved_tiny_model(model_type, tmp_path):
    original = _save_tiny(model_type, tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"), dtype="float32", device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.source_kind == "local" and loaded.source == str(tmp_path / "tiny")
    assert loaded.device == torch.device("cpu") and loaded.dtype is torch.float32
    assert type(loaded.model) is type(original) and not loaded.model.training
    assert loaded.adapter.family == FAMILY_OF[model_type] and loaded.adapter.model is loaded.model
    assert all(p.device.type == "cpu" and p.dtype is torch.float32 for p in loaded.model.parameters())
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    assert loaded.adapter.tied_lm_head == (model_type in TIED)


def test_load_in_bfloat16_and_pad_token_fallback(tmp_path):
    folder = tmp_path / "tiny"
    _save_tiny("llama", folder)
    # a tokenizer without a pad token gets pad = eos
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(tok_cfg))
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    loaded = load_model(str(folder), dtype="bfloat16", device="cpu")
    assert loaded.dtype is torch.bfloat16
    assert all(p.dtype is torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token
    batch = loaded.tokenizer(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2


@pytest.fixture(scope="module")
def demo():
    return load_model("demo", dtype="auto", device="cpu")


def test_load_demo(demo):
    assert type(demo.model).__name__ == "LlamaForCausalLM"
    assert demo.source_kind == "demo" and demo.dtype is torch.float32 and demo.device == torch.device("cpu")
    assert demo.adapter.family == "llama" and demo.adapter.num_layers == 8
    n = sum(p.numel() for p in demo.model.parameters())
    assert 10.4e6 < n < 10.6e6
    assert not demo.adapter.tied_lm_head and demo.adapter.context_length == 512
    text = "Hello world, ünïcode & numbers 12345!"
    ids = demo.tokenizer(text)["input_ids"]
    assert demo.tokenizer.decode(ids) == text
    assert demo.tokenizer.pad_token is not None
    summary = model_summary(demo)
    json.dumps(summary)
    assert summary["num_layers"] == 8 and summary["hidden_size"] == 256 and summary["vocab_size"] == 8256
    assert summary["layer0_linears"]["self_attn.k_proj"] == [128, 256]
    assert summary["source"] == str(DEMO_MODEL_DIR)


def test_load_demo_default_stays_on_cpu():
    loaded = load_model()  # "demo", auto dtype, auto device
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    assert loaded.device == resolve_device("auto")
    assert loaded.dtype is (torch.float32 if loaded.device.type == "cpu" else torch.bfloat16)


def test_load_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError) as err:
        load_model(str(missing))
    assert str(missing) in err.value.message and "does not exist" in err.value.message


def test_load_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path / "empty"))
    assert "config.json" in err.value.message


def test_load_folder_without_weights(tmp_path):
    folder = tmp_path / "noweights"
    tiny_config("llama").save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(folder)
    with pytest.raises(UserError) as err:
        load_model(str(folder), device="cpu")
    assert "weights" in err.value.message


def test_load_unsupported_architecture_before_weights(tmp_path, monkeypatch):
    folder = tmp_path / "bloom"
    AutoConfig.for_model("bloom", hidden_size=32, n_head=4, n_layer=1, vocab_size=64).save_pretrained(folder)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights must not be loaded for an unsupported architecture")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_weights)
    with pytest.raises(UserError) as err:
        load_model(str(folder), device="cpu")
    msg = err.value.message
    assert "'bloom' is not supported" in msg
    for family in ("llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox", "phi"):
        assert family in msg


def test_load_hub_id_offline():
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by tests/conftest.py unless overridden)")
    name = "workbench-tests/no-such-model-7f3a"
    with pytest.raises(UserError) as err:
        load_model(name, device="cpu")
    assert name in err.value.message and "could not be reached" in err.value.message
    assert "HF_HUB_OFFLINE" in err.value.hint and "local folder" in err.value.hint


def test_load_bad_dtype_and_device(monkeypatch):
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        load_model("demo", dtype="int8", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        load_model("demo", device="cuda")


def test_trust_remote_code_is_off_by_default(monkeypatch):
    seen = {}
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model("demo", device="cpu")
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    assert seen["dtype"] is torch.float32


def test_models_module_imports_transformers_lazily():
    import subprocess
    import sys

    code = "import sys, workbench.models; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert models.__name__ == "workbench.models"

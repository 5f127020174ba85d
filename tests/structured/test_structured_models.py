"""Tiny models of every family for the structured tests, and the shared resizing functions they rely on."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from workbench.engine import Run
from workbench.models import LoadedModel, get_adapter
from workbench.spec import CalibrationSpec, RunSpec
from workbench.structured.layout import add_zero_bias, change, parameter_count, resize_linear, slice_linear

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# Sliding windows shorter than the test sequences, so a layer given the wrong attention type changes the logits.
FAMILY_CONFIGS = {
    "llama": LLAMA_SHAPE,
    "mistral": dict(LLAMA_SHAPE, sliding_window=4),
    "qwen2": dict(LLAMA_SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "qwen3": dict(LLAMA_SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "gemma": LLAMA_SHAPE,
    "gemma2": dict(LLAMA_SHAPE, sliding_window=4),
    "gemma3_text": dict(LLAMA_SHAPE, sliding_window=4),
    "opt": dict(hidden_size=32, ffn_dim=48, num_attention_heads=4, word_embed_proj_dim=32),
    "gpt2": dict(n_embd=32, n_head=4, n_positions=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4),
    "phi": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4),
    "phi3": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2),
}
LLAMA_LIKE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def tiny_model(model_type: str, layers: int = 4, vocab: int = 64, seed: int = 0, **overrides):
    """A randomly initialized model of ``model_type`` (weights large enough that every layer matters), in eval mode."""
    kwargs = dict(FAMILY_CONFIGS[model_type], vocab_size=vocab, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1, initializer_range=0.2, **overrides)
    kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    if model_type == "gemma3_text":  # alternate, so that removing a layer shifts the pattern
        kwargs.setdefault("layer_types", [("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # gemma-style norms start at zero weight (scale 1 + w): give them variety too
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def token_ids(batch: int = 2, length: int = 16, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_tiny_models_of_every_family_are_recognized_and_nontrivial():
    ids = token_ids()
    for model_type in FAMILY_CONFIGS:
        model = tiny_model(model_type)
        assert get_adapter(model).num_layers == 4
        out = logits(model, ids)
        assert out.std() > 0.1, model_type  # not a near-constant output that would hide differences


def test_slice_linear_keeps_the_chosen_rows_and_columns():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    w, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    rows, cols = torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5])
    slice_linear(linear, rows=rows, cols=cols)
    assert (linear.in_features, linear.out_features) == (3, 3)
    assert torch.equal(linear.weight, w[rows][:, cols])
    assert torch.equal(linear.bias, b[rows])
    x = torch.randn(4, 6)
    x_kept = x[:, cols]
    assert torch.allclose(linear(x_kept), (x_kept @ w[:, cols].t() + b)[:, rows])


def test_resize_and_zero_bias():
    linear = nn.Linear(4, 3, bias=False)
    add_zero_bias(linear)
    x = torch.randn(2, 4)
    assert torch.equal(linear(x), x @ linear.weight.t())
    resize_linear(linear, out_features=7, in_features=2)
    assert linear.weight.shape == (7, 2) and linear.bias.shape == (7,)
    assert (linear.in_features, linear.out_features) == (2, 7)


def test_parameter_count_counts_tied_weights_once():
    model = tiny_model("gemma")  # ties the LM head to the embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert parameter_count(model) == sum(unique.values())
    assert change(2_000_000, 1_500_000) == "2.00M -> 1.50M (-25.0%)"


def tiny_run(model, tokens: torch.Tensor, tokenizer=None, **calibration):
    """An engine Run holding ``model`` (on the CPU) and calibration ``tokens``, ready for a step runner."""
    run = Run(RunSpec(calibration=CalibrationSpec(**calibration)))
    run.loaded = LoadedModel(model=model, tokenizer=tokenizer, adapter=get_adapter(model), source="tiny",
                             device=torch.device("cpu"), dtype=torch.float32)
    run.tokens = tokens
    return run

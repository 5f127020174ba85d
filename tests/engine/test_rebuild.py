"""Checkpoints whose structure a plain config cannot express are rebuilt by ``workbench.load``."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import workbench
from workbench import rebuild, registry
from workbench.errors import UserError
from workbench.export import export_model
from workbench.models import DEMO_MODEL_DIR
from workbench.registry import StepType


def split_linear(model, entry):
    """A toy structure kind: one linear becomes two (rank r), as factorized layers do."""
    parent_name, _, child = entry["module"].rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    r = entry["rank"]
    setattr(parent, child, torch.nn.Sequential(torch.nn.Linear(old.in_features, r, bias=False),
                                               torch.nn.Linear(r, old.out_features, bias=False)))


@pytest.fixture
def toy_kind(monkeypatch):
    """A step type of this test that records the toy kind, registered for the test only."""
    toy = StepType(name="toy", family="test", spec=object, runner="", plan=lambda *args: [],
                   structures={"toy_split": f"{__name__}:split_linear"})
    monkeypatch.setitem(registry._TYPES, "toy", toy)
    return "toy_split"


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


@pytest.fixture
def split_model(tokenizer, toy_kind, one_thread):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=128,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    entry = {"kind": toy_kind, "module": "model.layers.1.mlp.down_proj", "rank": 8}
    split_linear(model, entry)
    torch.nn.init.normal_(model.model.layers[1].mlp.down_proj[0].weight, std=0.5)
    return model, entry


def test_load_rebuilds_recorded_structure_with_identical_logits(tmp_path, split_model, tokenizer):
    model, entry = split_model
    out = export_model(model, tokenizer, tmp_path / "m", {"structure": [entry]})
    # a plain from_pretrained cannot place the factor weights: the structure is really needed
    assert rebuild.needs_rebuild(out)
    loaded, tok = workbench.load(out)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, torch.nn.Sequential)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert len(tok) == len(tokenizer)
    # the rotary buffers (not saved) were rebuilt on the CPU, not left on the meta device
    assert not any(b.is_meta for b in loaded.buffers())


def test_tampered_weights_are_refused(tmp_path, split_model, tokenizer):
    from safetensors.torch import load_file, save_file

    model, entry = split_model
    out = export_model(model, tokenizer, tmp_path / "m", {"structure": [entry]})
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    state.pop("model.layers.1.mlp.down_proj.1.weight")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError, match="do not match its recorded structure"):
        workbench.load(out)


def test_unknown_structure_kind_is_a_clear_error(tmp_path, split_model, tokenizer):
    model, entry = split_model
    out = export_model(model, tokenizer, tmp_path / "m", {"structure": [dict(entry, kind="from-the-future")]})
    with pytest.raises(UserError, match="cannot rebuild") as info:
        workbench.load(out)
    assert "upgrade workbench" in info.value.hint


def test_malformed_structure_list_is_refused(tmp_path):
    (tmp_path / "compression.json").write_text(json.dumps({"structure": [{"module": "x"}]}))
    with pytest.raises(UserError, match="'structure' must be a list"):
        rebuild.structure_entries(tmp_path)

"""Width pruning: exact removal of MLP channels and grouped-query heads, scores against their definitions, bias compensation, export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import workbench
from test_structured_models import LLAMA_LIKE_TYPES, logits, tiny_model, tiny_run, token_ids
from workbench.errors import UserError
from workbench.export import export_model
from workbench.observers import InputMoments
from workbench.sweep import LayerSweep, Watch
from workbench.lowrank.modules import LowRankLinear, set_submodule
from workbench.models import DEMO_MODEL_DIR, get_adapter
from workbench.structured.family import DepthStep, WidthStep
from workbench.structured import width as W

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def _zero_channels(model, fraction: float, seed: int = 0) -> list[torch.Tensor]:
    """Zero a random ``fraction`` of every layer's down_proj columns; return the channels left, per layer."""
    gen = torch.Generator().manual_seed(seed)
    alive = []
    with torch.no_grad():
        for layer in get_adapter(model).layers:
            down = layer.mlp.down_proj.weight
            order = torch.randperm(down.shape[1], generator=gen)
            dead = order[: round(fraction * down.shape[1])]
            down[:, dead] = 0
            alive.append(order[round(fraction * down.shape[1]):].sort().values)
    return alive


@pytest.mark.parametrize("model_type", LLAMA_LIKE_TYPES)
def test_removing_mlp_channels_whose_down_columns_are_zero_leaves_the_logits_unchanged(model_type):
    model = tiny_model(model_type)
    ids = token_ids()
    alive = _zero_channels(model, 0.25)
    expected = logits(model, ids)
    report = tiny_run(model, ids).compress(0, WidthStep(mlp_width=0.75, method="magnitude"))
    for layer, kept in zip(get_adapter(model).layers, alive):
        assert layer.mlp.gate_proj.out_features == layer.mlp.down_proj.in_features == len(kept) == 36
    assert model.config.intermediate_size == 36
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    assert report["parameters_after"] < report["parameters_before"]


@pytest.mark.parametrize("method", ["activation", "flap"])
def test_calibrated_scores_also_rank_dead_channels_last(method):
    model = tiny_model("llama")
    ids = token_ids(batch=4)
    _zero_channels(model, 0.5)
    expected = logits(model, ids)
    tiny_run(model, ids, batch_size=3).compress(0, WidthStep(mlp_width=0.5, method=method))
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def _zero_group(model, group: int) -> None:
    """Zero o_proj's columns for every query head that reads key/value head ``group``."""
    with torch.no_grad():
        for layer in get_adapter(model).layers:
            attn = layer.self_attn
            dim, per_group = attn.head_dim, attn.num_key_value_groups
            cols = slice(group * per_group * dim, (group + 1) * per_group * dim)
            attn.o_proj.weight[:, cols] = 0


@pytest.mark.parametrize("model_type,kv_heads", [("llama", 2), ("qwen2", 2), ("gemma3_text", 2), ("mistral", 4), ("qwen3", 1)])
def test_heads_go_by_key_value_group(model_type, kv_heads):
    """Removing a group whose output is zero changes nothing, which holds only if the kept query heads keep their own key/value head."""
    model = tiny_model(model_type, num_key_value_heads=kv_heads, num_attention_heads=4)
    ids = token_ids()
    per_group = 4 // kv_heads
    _zero_group(model, 0)  # the kept heads are renumbered: a wrong mapping would show
    expected = logits(model, ids)
    keep = 4 - per_group if kv_heads > 1 else None
    if keep is None:  # one key/value head: no group can go
        with pytest.raises(UserError, match="grouped-query"):
            tiny_run(model, ids).compress(0, WidthStep(attention_heads=2, method="magnitude"))
        return
    tiny_run(model, ids).compress(0, WidthStep(attention_heads=keep, method="magnitude"))
    for layer in get_adapter(model).layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features == keep * 8 and attn.k_proj.out_features == (kv_heads - 1) * 8
        assert attn.num_key_value_groups == per_group
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (keep, kv_heads - 1)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_a_head_count_that_breaks_the_groups_is_refused_before_any_change():
    model = tiny_model("llama")  # 4 query heads, 2 per key/value head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for heads in (3, 6):
        with pytest.raises(UserError, match="grouped-query layout") as info:
            tiny_run(model, token_ids()).compress(0, WidthStep(attention_heads=heads))
        assert "multiple of 2" in info.value.hint
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ scores against their definitions


def _layer0_inputs(model, ids):
    """down_proj's and o_proj's inputs in layer 0, from an ordinary forward."""
    seen = {}
    layer = get_adapter(model).layers[0]
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("down", a[0].reshape(-1, a[0].shape[-1]))),
             layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0].reshape(-1, a[0].shape[-1])))]
    logits(model, ids)
    for h in hooks:
        h.remove()
    return seen["down"], seen["o"]


def test_scores_match_their_definitions():
    model = tiny_model("llama")
    ids = token_ids(batch=3)
    h, a = _layer0_inputs(model, ids)
    adapter = get_adapter(model)
    layer = adapter.layers[0]
    moments = {}
    watch = Watch(inputs=lambda name: {"moments": (lambda f, d: InputMoments(f, d, 4)) if name == "o" else InputMoments},
                  linears=lambda i, lay: {"down": lay.mlp.down_proj, "o": lay.self_attn.o_proj})
    LayerSweep(adapter, ids, "cpu", batch_size=2).run(lambda lay, i, stats: moments.update(stats.inputs), watch,
                                                       layers=range(1))
    mlp, attn = moments["down"]["moments"], moments["o"]["moments"]
    down, o_proj = layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight
    gen = torch.Generator()

    expected = (down.abs() * h.norm(dim=0)).sum(0)  # Wanda: |W_ij| * ||x_j|| summed over the channel's column
    torch.testing.assert_close(W.channel_scores("activation", down, mlp, gen), expected, rtol=1e-4, atol=1e-6)
    expected = h.var(dim=0, unbiased=False) * down.pow(2).sum(0)  # FLAP: fluctuation times squared column norm
    torch.testing.assert_close(W.channel_scores("flap", down, mlp, gen), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(W.channel_scores("magnitude", down, mlp, gen), down.norm(dim=0))

    outputs = [a[:, hd * 8:(hd + 1) * 8] @ o_proj[:, hd * 8:(hd + 1) * 8].t() for hd in range(4)]
    expected = torch.stack([out.pow(2).sum().sqrt() for out in outputs])  # each head's output norm through o_proj
    torch.testing.assert_close(W.head_scores("activation", o_proj, 4, attn, gen), expected, rtol=1e-4, atol=1e-5)
    expected = (a.var(dim=0, unbiased=False) * o_proj.pow(2).sum(0)).reshape(4, 8).sum(-1)
    torch.testing.assert_close(W.head_scores("flap", o_proj, 4, attn, gen), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(W.group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2), torch.tensor([3.0, 7.0]))


def test_global_allocation_keeps_the_best_standardized_units():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(n, generator=gen) * scale for n, scale in ((10, 1.0), (6, 100.0), (8, 0.01))]
    kept = W.global_keep(scores, 12)
    assert sum(len(k) for k in kept) == 12 and all(len(k) >= 1 for k in kept)
    z = torch.cat([(s - s.mean()) / s.std() for s in scores])
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    local = torch.cat([torch.arange(len(s)) for s in scores])
    best = set(zip(owner[z.topk(12).indices].tolist(), local[z.topk(12).indices].tolist()))
    assert {(i, int(j)) for i, k in enumerate(kept) for j in k} == best  # each layer's best is among the top 12 here


# ------------------------------------------------------------------ bias compensation


def _mean_outputs(model, ids):
    """Mean over the tokens of layer 0's attention and MLP outputs."""
    layer = get_adapter(model).layers[0]
    seen = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out[0].reshape(-1, out[0].shape[-1]).mean(0))),
             layer.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp", out.reshape(-1, out.shape[-1]).mean(0)))]
    logits(model, ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_bias_compensation_keeps_the_output_mean(part, compensate):
    """Pruning one part of layer 0 leaves that part's inputs unchanged, so with compensation its output keeps its mean exactly."""
    model = tiny_model("llama")
    ids = token_ids(batch=4)
    before = _mean_outputs(model, ids)[part]
    widths = {"mlp_width": 0.5} if part == "mlp" else {"attention_heads": 2}
    tiny_run(model, ids).compress(0, WidthStep(method="flap", bias_compensation=compensate, **widths))
    assert torch.allclose(_mean_outputs(model, ids)[part], before, atol=1e-5) == compensate
    flag = "mlp_bias" if part == "mlp" else "attention_bias"
    assert getattr(model.config, flag) == compensate


def test_bias_compensation_is_refused_where_the_family_has_no_bias():
    model = tiny_model("mistral")
    with pytest.raises(UserError, match="bias compensation needs a bias on down_proj"):
        tiny_run(model, token_ids()).compress(0, WidthStep(mlp_width=0.5, bias_compensation=True))
    assert get_adapter(model).layers[0].mlp.down_proj.in_features == 48


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_uniform_widths_export_as_an_ordinary_checkpoint(model_type, tokenizer, tmp_path):
    model = tiny_model(model_type)
    ids = token_ids()
    run = tiny_run(model, ids)
    run.compress(0, WidthStep(mlp_width=0.75, attention_heads=2, method="flap", bias_compensation=model_type == "llama"))
    assert run.structure == []
    expected = logits(model, ids)
    export_model(model, tokenizer, tmp_path / "out", {"structure": run.structure})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.intermediate_size == 36 and reloaded.config.num_attention_heads == 2
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_per_layer_widths_rebuild_after_a_later_depth_step(tokenizer, tmp_path):
    model = tiny_model("llama", layers=5)
    ids = token_ids(batch=3)
    run = tiny_run(model, ids)
    run.compress(0, WidthStep(mlp_width=0.6, attention_width=0.5, method="activation", allocation="global"))
    sizes = [layer.mlp.down_proj.in_features for layer in get_adapter(model).layers]
    assert len(set(sizes)) > 1 and sum(sizes) == round(0.6 * 5 * 48)
    run.compress(1, DepthStep(remove=1, criterion="last"))
    assert [e["kind"] for e in run.structure] == ["width"] and len(run.structure[0]["layers"]) == 4
    assert [w["intermediate_size"] for w in run.structure[0]["layers"]] == sizes[:4]
    expected = logits(model, ids)
    export_model(model, tokenizer, tmp_path / "out", {"structure": run.structure})
    reloaded, _ = workbench.load(tmp_path / "out", dtype="float32", device="cpu")
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_projections_replaced_by_an_earlier_step_are_refused():
    model = tiny_model("llama")
    set_submodule(model, "model.layers.1.mlp.down_proj", LowRankLinear(48, 32, 4, False))
    with pytest.raises(UserError, match="layer 1 has a LowRankLinear"):
        tiny_run(model, token_ids()).compress(0, WidthStep(mlp_width=0.5, method="magnitude"))

"""Depth pruning: layer removal with consistent per-layer config, the importance criteria against their definitions, selection."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import workbench
from test_structured_models import FAMILY_CONFIGS, logits, tiny_model, tiny_run, token_ids
from workbench.errors import UserError
from workbench.events import Log
from workbench.export import export_model
from workbench.lowrank.modules import LowRankLinear, set_submodule, structure_entry
from workbench.models import DEMO_MODEL_DIR, get_adapter
from workbench.perplexity import perplexity
from workbench.structured.family import DepthStep
from workbench.structured import depth as D

pytestmark = pytest.mark.usefixtures("one_thread")


def _silence(layer) -> None:
    """Zero every linear of a decoder layer: its residual contributions vanish and it passes its input through."""
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_removing_a_layer_that_adds_nothing_leaves_the_logits_unchanged(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    ids = token_ids()
    _silence(adapter.layers[1])
    expected = logits(model, ids)
    other = copy.deepcopy(model)
    D.remove_layers(get_adapter(other), [2])  # a layer that does contribute: the test can see a difference
    assert not torch.allclose(logits(other, ids), expected, atol=1e-3)

    keep = D.remove_layers(adapter, [1])
    assert keep == [0, 2, 3]
    assert model.config.num_hidden_layers == 3 and len(adapter.layers) == 3
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen2", "gemma2"])
def test_per_layer_config_follows_the_removal(model_type):
    model = tiny_model(model_type, layers=6)
    types = list(model.config.layer_types)
    D.remove_layers(get_adapter(model), [1, 4])
    assert model.config.layer_types == [types[i] for i in (0, 2, 3, 5)]
    for position, layer in enumerate(get_adapter(model).layers):
        assert all(m.layer_idx == position for m in layer.modules() if hasattr(m, "layer_idx"))
    if model_type == "qwen2":  # layers from index max_window_layers (2) on slide; of the kept 0, 2, 3, 5 only 0 is below
        assert model.config.max_window_layers == 1


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2"])
def test_generation_with_the_kv_cache_matches_full_forwards_after_removal(model_type):
    """Cache slots are indexed by layer_idx: stale indices would break or change incremental decoding."""
    model = tiny_model(model_type, layers=5)
    D.remove_layers(get_adapter(model), [0, 3])
    model.generation_config.eos_token_id = None
    prompt = token_ids(batch=1, length=10)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        ids = prompt
        for _ in range(4):  # greedy decoding without any cache
            ids = torch.cat([ids, logits(model, ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_exported_model_reloads_with_the_same_logits(model_type, tmp_path):
    model = tiny_model(model_type, layers=5)
    D.remove_layers(get_adapter(model), [1, 2])
    ids = token_ids()
    expected = logits(model, ids)
    export_model(model, AutoTokenizer.from_pretrained(DEMO_MODEL_DIR), tmp_path / "out", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == 3
    if model_type == "gemma3_text":
        assert reloaded.config.layer_types == model.config.layer_types
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ criteria against their definitions


def _boundary_states(model, ids) -> list[torch.Tensor]:
    """Every decoder layer's input, and the last layer's output, from one ordinary forward with hooks."""
    adapter = get_adapter(model)
    states: list[torch.Tensor] = []

    def record(module, args, kwargs, output):
        if not states:
            states.append(args[0] if args else kwargs["hidden_states"])
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in adapter.layers]
    try:
        logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return states


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_block_influence_and_angular_distance_match_their_definitions(model_type):
    model = tiny_model(model_type, layers=5)
    ids = token_ids(batch=4, length=12)
    states = _boundary_states(model, ids)
    adapter = get_adapter(model)

    bi = D.block_influence(adapter, ids, "cpu", batch_size=3)
    expected = [1 - float(F.cosine_similarity(states[i], states[i + 1], dim=-1).mean()) for i in range(5)]
    assert bi == pytest.approx(expected, abs=1e-5)

    cosines, angles = D.residual_similarity(adapter, ids, "cpu", span=2, batch_size=4)
    cos = [F.cosine_similarity(states[i], states[i + 2], dim=-1).clamp(-1, 1) for i in range(4)]
    assert cosines == pytest.approx([float(c.mean()) for c in cos], abs=1e-5)
    assert angles == pytest.approx([float((torch.arccos(c) / math.pi).mean()) for c in cos], abs=1e-5)


def test_perplexity_increase_matches_removing_each_layer():
    model = tiny_model("llama", layers=4)
    tokens = token_ids(batch=3, length=16)

    class Loaded:  # what perplexity_increase reads of a LoadedModel
        pass

    loaded = Loaded()
    loaded.model, loaded.adapter, loaded.device = model, get_adapter(model), torch.device("cpu")
    increases, base = D.perplexity_increase(loaded, tokens, batch_size=2)
    assert base == pytest.approx(perplexity(model, tokens.reshape(-1), 16)["ppl"], rel=1e-6)
    for i in range(4):
        without = copy.deepcopy(model)
        D.remove_layers(get_adapter(without), [i])
        assert increases[i] == pytest.approx(perplexity(without, tokens.reshape(-1), 16)["ppl"] - base, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("criterion,selection", [("block_influence", "lowest"), ("block_influence", "middle"), ("angular", "lowest"),
                                                ("perplexity", "lowest"), ("last", "lowest"), ("random", "middle")])
def test_depth_step_removes_what_its_criterion_and_selection_choose(criterion, selection):
    model = tiny_model("llama", layers=6)
    run = tiny_run(model, token_ids(batch=3), batch_size=2)
    events = []
    run.emit = events.append
    report = run.compress(0, DepthStep(remove=2, criterion=criterion, selection=selection, seed=5))
    removed, scores = report["removed"], report["scores"]
    assert report["layers_after"] == model.config.num_hidden_layers == len(get_adapter(model).layers) == 4
    assert report["parameters_after"] < report["parameters_before"] and report["headline"]["layers removed"].endswith("of 6")
    if criterion == "last":
        assert removed == [4, 5] and scores is None
    elif criterion == "angular":  # one block of two, starting where the distance across it is smallest
        assert removed == [removed[0], removed[0] + 1] and removed[0] == min(range(5), key=scores.__getitem__)
    elif selection == "middle":
        assert 0 not in removed and 5 not in removed and removed[1] - removed[0] > 1
    else:
        assert removed == sorted(sorted(range(6), key=scores.__getitem__)[:2])
    if scores is not None:
        assert any(isinstance(e, Log) and e.message.startswith(report["score"]) for e in events)


# ------------------------------------------------------------------ selection


def test_middle_selection_is_the_best_non_adjacent_choice():
    rng = random.Random(0)
    for _ in range(200):
        total = rng.randint(3, 10)
        count = rng.randint(1, D.middle_capacity(total))
        scores = [rng.random() for _ in range(total)]
        best = min((sum(scores[i] for i in c), c) for c in itertools.combinations(range(1, total - 1), count)
                   if all(b - a > 1 for a, b in zip(c, c[1:])))
        chosen = D.middle(scores, count)
        assert sum(scores[i] for i in chosen) == pytest.approx(best[0])
        assert 0 not in chosen and total - 1 not in chosen
        assert all(b - a > 1 for a, b in zip(chosen, chosen[1:]))


def test_lowest_and_block_selection():
    assert D.lowest([0.5, 0.1, 0.3, 0.1], 2) == [1, 3]
    assert D.consecutive_block([0.4, 0.2, 0.3], 2) == [1, 2]
    assert D.random_scores(6, seed=3) == D.random_scores(6, seed=3) != D.random_scores(6, seed=4)


def test_impossible_removals_are_refused():
    with pytest.raises(UserError, match="would leave none"):
        D.layer_count(8, 8, None)
    with pytest.raises(UserError, match="rounds to no layer"):
        D.layer_count(8, None, 0.05)
    assert D.layer_count(8, None, 0.25) == 2
    with pytest.raises(UserError, match="non-adjacent middle layers"):
        D.check_middle(8, 4)
    model = tiny_model("llama", layers=2)
    with pytest.raises(UserError):
        D.remove_layers(get_adapter(model), [0, 1])
    assert len(get_adapter(model).layers) == 2  # nothing was removed


def test_low_rank_modules_recorded_earlier_follow_the_renumbering(tmp_path):
    """A factorized linear in layer 2 is named model.layers.1... once layer 1 is gone; the export rebuilds it."""
    model = tiny_model("llama", layers=4)
    name = "model.layers.2.mlp.down_proj"
    weight = model.get_submodule(name).weight.detach()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    set_submodule(model, name, LowRankLinear.from_factors(vh[:8], u[:, :8] * s[:8], None))
    structure = [structure_entry({name: {"out": 32, "in": 48, "rank": 8, "bias": False},
                                  "model.layers.1.mlp.up_proj": {"out": 48, "in": 32, "rank": 4, "bias": False}})]
    keep = D.remove_layers(get_adapter(model), [1])
    D.renumber_structure(structure, "model.layers", keep)
    assert structure[0]["modules"] == {"model.layers.1.mlp.down_proj": {"out": 32, "in": 48, "rank": 8, "bias": False}}
    ids = token_ids()
    expected = logits(model, ids)
    export_model(model, AutoTokenizer.from_pretrained(DEMO_MODEL_DIR), tmp_path / "out", {"structure": structure})
    reloaded, _ = workbench.load(tmp_path / "out", dtype="float32", device="cpu")
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert D.renumberable({"kind": "width", "layers": []}) and not D.renumberable({"kind": "other"})

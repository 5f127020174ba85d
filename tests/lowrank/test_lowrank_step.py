"""The low-rank step on small models: budget, sequential statistics, export, rebuild, merge."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import workbench
from workbench.data.sampling import calibration_samples
from workbench.engine import Run
from workbench.errors import UserError
from workbench.events import LayerDone
from workbench.export import export_model
from workbench.lowrank.allocation import Budget, search_space
from workbench.lowrank.compress import load_factors
from workbench.lowrank.factor import rank_for_energy
from workbench.lowrank.modules import LowRankLinear, set_submodule
from workbench.lowrank.objective import objective_tokens
from workbench.lowrank.step import LowRankRun
from workbench.models import DEMO_MODEL_DIR, LoadedModel, get_adapter
from workbench.perplexity import perplexity
from workbench.spec import RunSpec
from workbench.lowrank.family import LowRankStep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))


def tiny(tokenizer, family: str = "llama", **extra) -> LoadedModel:
    """A 2-layer model of the demo's vocabulary, random weights (seeded)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=8256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                  tie_word_embeddings=False, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model, tokenizer, get_adapter(model), "tiny", torch.device("cpu"), torch.float32)


def make_run(loaded, step, tmp_path, nsamples=8, seqlen=32):
    events = []
    spec = RunSpec(steps=[step])
    spec.calibration.nsamples, spec.calibration.seqlen, spec.calibration.batch_size = nsamples, seqlen, 4
    run = Run(spec, emit=events.append, run_dir=tmp_path / "run")
    run.loaded = loaded
    run.tokens = calibration_samples("c4", loaded.tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
    return run, events


def decoder_linear_params(model) -> int:
    """Parameters of every linear inside the decoder layers, counted from the modules themselves."""
    adapter = get_adapter(model)
    return sum(p.numel() for layer in adapter.layers for m in layer.modules() if isinstance(m, nn.Linear) for p in m.parameters())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["feature", "svd", "asvd"])
def test_uniform_step_meets_the_budget_and_counts_real_parameters(tokenizer, tmp_path, method):
    loaded = tiny(tokenizer)
    dense_params = decoder_linear_params(loaded.model)
    run, events = make_run(loaded, LowRankStep(method=method, retention=0.8), tmp_path)
    report = run.compress(0, run.spec.steps[0])
    kept = decoder_linear_params(loaded.model)
    assert report["params"] == {"dense": dense_params, "after": kept}
    assert report["retained"] == pytest.approx(kept / dense_params)
    assert 0.7 < report["retained"] <= 0.8
    replaced = [n for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)]
    assert replaced and not any("v_proj" in n for n in replaced)
    assert all(m.rank % 8 == 0 for m in loaded.model.modules() if isinstance(m, LowRankLinear))
    assert [e.layer for e in events if isinstance(e, LayerDone)] == [0, 1]
    # the uniform ratio is the largest that fits: the next rank step of any linear would exceed the budget
    budget = Budget.of(get_adapter(tiny(tokenizer).model), pair_bias=method == "feature")
    bigger = budget.ranks_for(lambda t: report["ratio"] + 8 * (t.in_features + t.out_features) / (t.in_features * t.out_features))
    assert budget.retained(bigger) > 0.8


def test_sequential_statistics_come_from_the_compressed_earlier_layers(tokenizer, tmp_path):
    """Layer 1's first linear keeps the mean of the dense linear's outputs on the inputs it sees in the compressed model."""
    loaded = tiny(tokenizer)
    dense_q = nn.Linear(64, 64, bias=False)
    dense_q.weight.data.copy_(loaded.model.model.layers[1].self_attn.q_proj.weight.data)
    run, _ = make_run(loaded, LowRankStep(method="feature", retention=0.6), tmp_path, nsamples=8)  # one pooled group
    run.compress(0, run.spec.steps[0])
    q = loaded.model.model.layers[1].self_attn.q_proj
    assert isinstance(q, LowRankLinear)
    seen = []
    handle = q.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    for batch in torch.split(run.tokens, 4):
        logits(loaded.model, batch)
    handle.remove()
    x = torch.cat([s[0].reshape(-1, 64) for s in seen])
    y = torch.cat([s[1].reshape(-1, 64) for s in seen])
    torch.testing.assert_close(y.double().mean(0), dense_q(x).double().mean(0), rtol=1e-4, atol=1e-4)
    # statistics from the dense model would not match: layer 0 changed layer 1's inputs
    dense_inputs = []
    fresh = tiny(tokenizer)
    h = fresh.model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: dense_inputs.append(a[0].reshape(-1, 64)))
    for batch in torch.split(run.tokens, 4):
        logits(fresh.model, batch)
    h.remove()
    assert not torch.allclose(torch.cat(dense_inputs), x, atol=1e-3)


def test_factorized_export_is_rebuilt_by_workbench_load(tokenizer, tmp_path):
    loaded = tiny(tokenizer)
    run, _ = make_run(loaded, LowRankStep(method="feature", retention=0.7), tmp_path)
    report = run.compress(0, run.spec.steps[0])
    run.steps.append(report)
    folder = export_model(loaded.model, tokenizer, tmp_path / "out", run.build_summary())
    model, _ = workbench.load(folder, dtype="float32", device="cpu")
    rebuilt = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert rebuilt == {n: m.rank for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)}
    ids = run.tokens[:2]
    torch.testing.assert_close(logits(model, ids), logits(loaded.model, ids))
    info = json.loads((folder / "compression.json").read_text())
    entry = info["structure"][0]
    assert entry["kind"] == "lowrank"
    assert {n: e["rank"] for n, e in entry["modules"].items()} == rebuilt
    assert info["steps"][0]["ranks"] == report["ranks"]


def test_merged_export_loads_in_vanilla_transformers_with_the_bias_correction(tokenizer, tmp_path):
    loaded = tiny(tokenizer)
    run, _ = make_run(loaded, LowRankStep(method="feature", retention=0.7), tmp_path)
    run.spec.steps[0].merge = True
    factorized = tiny(tokenizer)
    run_f, _ = make_run(factorized, LowRankStep(method="feature", retention=0.7), tmp_path / "f")
    run_f.compress(0, run_f.spec.steps[0])
    report = run.compress(0, run.spec.steps[0])
    assert report["merge"]["bias_flags"] == ["attention_bias", "mlp_bias"] and not report["merge"]["dropped_bias"]
    assert not run.structure  # a plain checkpoint: nothing to rebuild
    folder = export_model(loaded.model, tokenizer, tmp_path / "merged", run.build_summary())
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.attention_bias and model.config.mlp_bias
    ids = run.tokens[:2]
    torch.testing.assert_close(logits(model, ids), logits(factorized.model, ids), rtol=1e-4, atol=1e-4)


def test_merge_reports_the_bias_a_config_cannot_hold(tokenizer, tmp_path):
    loaded = tiny(tokenizer, "mistral")  # Mistral's config has no attention_bias / mlp_bias
    run, events = make_run(loaded, LowRankStep(method="feature", retention=0.7, merge=True), tmp_path)
    reference = tiny(tokenizer, "mistral")
    run_ref, _ = make_run(reference, LowRankStep(method="feature", retention=0.7), tmp_path / "ref")
    run_ref.compress(0, run_ref.spec.steps[0])
    report = run.compress(0, run.spec.steps[0])
    merged = report["merge"]
    assert merged["bias_flags"] == [] and len(merged["dropped_bias"]) == merged["merged"] > 0
    assert "mistral" in merged["lost"]
    assert any(e.type == "warning" and "bias" in e.message for e in events)
    for m in reference.model.modules():  # what the merged model computes: the factors without their bias
        if isinstance(m, LowRankLinear):
            m.b.bias = None
    ids = run.tokens[:2]
    torch.testing.assert_close(logits(loaded.model, ids), logits(reference.model, ids), rtol=1e-4, atol=1e-4)


def test_energy_allocation(tokenizer, tmp_path):
    loaded = tiny(tokenizer)
    run, _ = make_run(loaded, LowRankStep(method="svd", allocation="energy", retention=0.75), tmp_path)
    solved = run.compress(0, run.spec.steps[0])
    assert solved["retained"] <= 0.75 and 0 < solved["energy"] < 1
    loaded = tiny(tokenizer)
    run, _ = make_run(loaded, LowRankStep(method="svd", allocation="energy", energy=0.6), tmp_path / "given")
    report = run.compress(0, run.spec.steps[0])
    assert report["energy"] == 0.6
    dense = tiny(tokenizer)
    budget = Budget.of(dense.adapter, pair_bias=False)
    for t in budget.targets:
        w = dense.adapter.linear_modules(t.layer)[t.name].weight.detach().double()
        rank = rank_for_energy(torch.linalg.svdvals(w) ** 2, 0.6)
        assert report["ranks"].get(t.key, 0) == (rank if rank <= t.max_rank else 0), t.key


def test_unreachable_retention_is_refused_before_any_work(tokenizer, tmp_path):
    loaded = tiny(tokenizer)
    run, events = make_run(loaded, LowRankStep(method="feature", retention=0.05), tmp_path)
    with pytest.raises(UserError, match="out of reach"):
        run.compress(0, run.spec.steps[0])
    assert not any(isinstance(m, LowRankLinear) for m in loaded.model.modules())
    assert [e.type for e in events] == ["stage_plan"]  # announced, then refused before any work


# ------------------------------------------------------------------ search, in the run's process


def search_step(**changes) -> LowRankStep:
    settings = dict(method="feature", allocation="search", retention=0.7, trials=6, sampler="tpe", objective_chunks=2,
                    objective_seqlen=32)
    settings.update(changes)
    return LowRankStep(**settings)


def load_study(run):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    marker = json.loads((run.run_dir / "search" / "study.json").read_text())
    storage = optuna.storages.JournalStorage(JournalFileBackend(marker["storage"]))
    return optuna.load_study(study_name=marker["study"], storage=storage)


@pytest.mark.parametrize("space, sampler, trials", [("type", "tpe", 6), ("layer", "gp", 12)])
def test_every_evaluated_trial_holds_the_budget(tokenizer, tmp_path, space, sampler, trials):
    loaded = tiny(tokenizer)
    step = search_step(space=space, sampler=sampler, trials=trials)  # 12: the GP fits a model after 10 random trials
    run, events = make_run(loaded, step, tmp_path)
    with torch.no_grad():  # as in the engine
        report = run.compress(0, step)
    study = load_study(run)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == report["search"]["trials"] == trials
    budget = Budget.of(tiny(tokenizer).adapter, pair_bias=True)
    grid = search_space(budget, space, step.ratio_min, step.ratio_max)
    assert sorted(complete[0].params) == sorted(grid.names) == sorted(complete[0].user_attrs["ratios"])
    for t in complete:
        ranks = grid.ranks(budget, t.user_attrs["ratios"])
        assert 0.7 - step.slack <= budget.retained(ranks) <= 0.7
        assert budget.retained(ranks) == pytest.approx(t.user_attrs["retained"])
        assert all(step.ratio_min <= r <= step.ratio_max for r in t.user_attrs["ratios"].values())
    trials = [e for e in events if e.type == "trial"]
    assert sorted(e.number for e in trials) == sorted(t.number for t in study.trials)
    best = min(complete, key=lambda t: t.value)
    assert trials[-1].best["number"] == best.number and trials[-1].best["objective"] == best.value
    event = next(e for e in trials if e.number == best.number)
    assert event.params == best.user_attrs["ratios"] and event.objective == best.value
    assert set(event.metrics) == {"perplexity", "kl", "retained"} and event.seconds > 0 and event.state == "complete"
    # the applied allocation is the best trial's
    assert report["search"]["best"]["number"] == best.number
    assert report["ranks"] == {k: r for k, r in grid.ranks(budget, best.user_attrs["ratios"]).items() if r}


def test_trial_objective_matches_a_full_model_forward(tokenizer, tmp_path):
    """The layer-by-layer objective equals perplexity + 1e-3 KL computed from whole-model forward passes."""
    loaded = tiny(tokenizer)
    step = search_step(trials=3)
    run, _ = make_run(loaded, step, tmp_path)
    fingerprint = LowRankRun(run.step_context(0), step).factors_fingerprint()
    run.compress(0, step)
    trial = min((t for t in load_study(run).trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    factors = load_factors(next((run.run_dir / "search").glob("factors-*.safetensors")), fingerprint)
    model, dense = tiny(tokenizer).model, tiny(tokenizer).model
    budget = Budget.of(get_adapter(model), pair_bias=True)
    ranks = search_space(budget, "type", 0.2, 1.0).ranks(budget, trial.user_attrs["ratios"])
    for t in budget.targets:
        if ranks[t.key]:
            set_submodule(model.model.layers[t.layer], t.name, LowRankLinear.from_factors(*factors[t.key].truncate(ranks[t.key])))
    tokens = objective_tokens("wikitext2", tokenizer, 2, 32)
    ppl = perplexity(model, tokens.reshape(1, -1), 32)["ppl"]
    kl = sum(float(F.kl_div(F.log_softmax(logits(dense, chunk[None]), -1), F.softmax(logits(model, chunk[None]), -1),
                            reduction="batchmean")) for chunk in tokens) / len(tokens)
    assert trial.user_attrs["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert trial.user_attrs["kl"] == pytest.approx(kl, rel=1e-3)
    assert trial.value == pytest.approx(ppl + 1e-3 * kl, rel=1e-4)


def test_finalists_are_reranked_after_sequential_application(tokenizer, tmp_path):
    loaded = tiny(tokenizer)
    step = search_step(trials=5, finalists=3)
    run, _ = make_run(loaded, step, tmp_path)
    report = run.compress(0, step)["search"]
    finalists = report["finalists"]
    assert len(finalists) == 3
    assert [f["search_objective"] for f in finalists] == sorted(f["search_objective"] for f in finalists)
    chosen = min(finalists, key=lambda f: f["sequential_objective"])
    assert report["best"]["number"] == chosen["number"]
    assert report["kendall_tau"] in (-1.0, -1 / 3, 1 / 3, 1.0)
    trials = {t.number: t for t in load_study(run).trials}
    budget = Budget.of(tiny(tokenizer).adapter, pair_bias=True)
    grid = search_space(budget, "type", 0.2, 1.0)
    allocations = [tuple(sorted(grid.ranks(budget, trials[f["number"]].user_attrs["ratios"]).items())) for f in finalists]
    assert len(set(allocations)) == 3  # distinct allocations, not proposals that scale to the same ranks
    # the model holds the chosen allocation
    ranks = grid.ranks(budget, trials[chosen["number"]].user_attrs["ratios"])
    applied = {f"{i}.{n}": m.rank for i, layer in enumerate(loaded.model.model.layers)
               for n, m in layer.named_modules() if isinstance(m, LowRankLinear)}
    assert applied == {k: r for k, r in ranks.items() if r}


@pytest.mark.slow
def test_feature_beats_svd_at_equal_parameters_on_the_demo_model(tmp_path):
    """The paper's claim in small: output-covariance factors lose less than weight SVD at the same budget."""
    from workbench.models import load_model
    from workbench.perplexity import evaluate

    results = {}
    for method in ("svd", "feature"):
        loaded = load_model("demo", dtype="float32", device="cpu")
        run, _ = make_run(loaded, LowRankStep(method=method, retention=0.8), tmp_path / method, nsamples=8, seqlen=128)
        report = run.compress(0, run.spec.steps[0])
        results[method] = (report["retained"], evaluate(loaded.model, loaded.tokenizer, "wikitext2", 512, limit=2)["ppl"])
    assert abs(results["svd"][0] - results["feature"][0]) < 0.01  # the same parameter budget
    assert results["feature"][1] < 0.95 * results["svd"][1], results


def test_proposals_that_scale_to_the_same_allocation_are_measured_once(tokenizer, tmp_path):
    from workbench.lowrank.search import open_storage, open_study

    loaded = tiny(tokenizer)
    journal = tmp_path / "dup.journal"
    step = search_step(trials=3, storage=str(journal), study="dup")
    run, _ = make_run(loaded, step, tmp_path)
    job = LowRankRun(run.step_context(0), step)
    space = search_space(job.budget, "type", step.ratio_min, step.ratio_max)
    study = open_study(open_storage(str(journal)), "dup", space.signature(), job.study_setup(space), "tpe", 0)
    study.enqueue_trial({n: 0.4 for n in space.names})
    study.enqueue_trial({n: 0.5 for n in space.names})  # proportional: the budget scaling gives the same ranks
    run.compress(0, step)
    first, second = study.trials[0], study.trials[1]
    assert second.user_attrs["same_as"] == 0 and "same_as" not in first.user_attrs
    assert second.user_attrs["allocation"] == first.user_attrs["allocation"]
    assert second.value == first.value and second.user_attrs["perplexity"] == first.user_attrs["perplexity"]

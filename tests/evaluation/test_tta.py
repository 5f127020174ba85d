"""Test-time adaptation (Tent, PCL): exact plain results at learning rate 0, the model put back bitwise, the losses by hand."""

import math

import pytest
import torch

from workbench.errors import UserError
from workbench.evaluation import icl, tta
from workbench.evaluation.icl_data import DATASETS, query_subset, read_examples
from workbench.evaluation.tta import Adapter, TTAConfig

from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tiny(one_thread):
    """A small random Llama with the demo tokenizer, its norms moved off 1 so that adapting them is visible."""
    model, tokenizer = tiny_llama(max_position_embeddings=512)
    with torch.no_grad():
        for p in tta.norm_parameters(model):
            p.mul_(1 + 0.1 * torch.randn_like(p))
    return model, tokenizer


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def books():
    examples = read_examples(DATASETS["books-next"])
    return [examples[i] for i in query_subset(len(examples), 6)]


@pytest.fixture(scope="module")
def sst2():
    examples = read_examples(DATASETS["sst2"])
    return [examples[i] for i in query_subset(len(examples), 6)]


CONFIGS = [
    TTAConfig("tent"), TTAConfig("pcl"), TTAConfig("pcl", how="gaussian", where="layer:1", ce=0.5),
    TTAConfig("pcl", where="embeddings", episodic=False), TTAConfig("tent", params="lora"),
    TTAConfig("pcl", params="lora", episodic=False, batch=4),
]


@pytest.mark.parametrize("mode", ["zeroshot", "dail"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-{c.params}-{c.where}-{'ep' if c.episodic else 'cont'}")
def test_learning_rate_zero_gives_the_plain_log_likelihoods_exactly(tiny, sst2, books, config, mode):
    model, tokenizer = tiny
    name, queries = ("sst2", sst2) if mode == "dail" else ("books-next", books)
    runner = icl.ICLRunner(model, tokenizer, DATASETS[name])
    order = list(range(len(queries)))
    cfg = icl.ICLConfig(mode=mode, k=2, memory=4)
    plain = runner.run(queries, order, cfg, seed=1)
    for zero in (dict(lr=0.0), dict(steps=0)):
        adapting = TTAConfig(**{**config.__dict__, "batch": 3, **zero})
        with Adapter(model, adapting, seed=1) as adapter:
            adapted = runner.run(queries, order, cfg, seed=1, adapter=adapter)
        assert adapter.steps_taken == (0 if "steps" in zero else 2)  # two batches of three
        assert [p.logprobs for p in adapted] == [p.logprobs for p in plain]
        assert [p.demos for p in adapted] == [p.demos for p in plain]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-{c.params}-{c.where}-{'ep' if c.episodic else 'cont'}")
def test_episodic_puts_the_parameters_back_after_each_batch_and_the_model_is_unchanged(tiny, books, config):
    model, tokenizer = tiny
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    runner = icl.ICLRunner(model, tokenizer, DATASETS["books-next"])
    adapting = TTAConfig(**{**config.__dict__, "lr": 0.05, "batch": 2})
    after_batches, changed = [], []
    with Adapter(model, adapting, seed=0) as adapter:
        saved = [p.detach().clone() for p in adapter.params]
        end_batch = adapter.end_batch

        def spying_end_batch():
            changed.append(any(not torch.equal(p, s) for p, s in zip(adapter.params, saved)))
            end_batch()
            after_batches.append(all(torch.equal(p, s) for p, s in zip(adapter.params, saved)))

        adapter.end_batch = spying_end_batch
        runner.run(books, list(range(len(books))), icl.ICLConfig(mode="zeroshot"), adapter=adapter)
    assert len(after_batches) == 3 and all(changed)  # the adaptation did move the parameters
    assert all(after_batches) == config.episodic
    assert _same(before, _state(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_adaptation_works_inside_the_engines_no_grad(tiny, books):
    model, tokenizer = tiny
    runner = icl.ICLRunner(model, tokenizer, DATASETS["books-next"])
    with torch.no_grad(), Adapter(model, TTAConfig("pcl", lr=0.05, episodic=False), seed=0) as adapter:
        saved = [p.detach().clone() for p in adapter.params]
        runner.run(books, list(range(len(books))), icl.ICLConfig(mode="zeroshot"), adapter=adapter)
        assert adapter.steps_taken == 2
        assert any(not torch.equal(p, s) for p, s in zip(adapter.params, saved))


@pytest.mark.slow
def test_eval_command_adapts_the_demo_model_end_to_end(capsys):
    import json

    from workbench.cli import main

    argv = ["eval", "--model", "demo", "--icl", "books-next@typo:0.2", "--icl-mode", "zeroshot", "--tta", "none", "pcl",
            "--icl-limit", "4", "--seeds", "1", "--json", "--quiet"]
    assert main(argv) == 0
    metrics = {m["dataset"]: m for m in json.loads(capsys.readouterr().out)["metrics"]}
    adapted = metrics["books-next@typo:0.2/zeroshot+pcl"]
    assert adapted["extra"]["tta_steps_taken"] == 1 and adapted["extra"]["shift"] == "typo:0.2"
    assert adapted["extra"]["time_ratio"] > 0 and "books-next@typo:0.2/zeroshot" in metrics


def test_the_model_is_put_back_when_the_evaluation_fails(tiny, books):
    model, tokenizer = tiny
    before = _state(model)
    runner = icl.ICLRunner(model, tokenizer, DATASETS["books-next"])
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1

    from workbench.errors import Cancelled

    with pytest.raises(Cancelled):
        with Adapter(model, TTAConfig("tent", lr=0.1, batch=16, episodic=False), seed=0) as adapter:
            runner.run(books * 4, list(range(24)), icl.ICLConfig(mode="zeroshot"), cancel=cancel, adapter=adapter)
    assert adapter.steps_taken == 1
    assert _same(before, _state(model))


def test_the_losses_equal_direct_computations():
    clean, perturbed = [1.0, -0.5, 0.25, 2.0], [0.5, 0.0, -1.0, 1.5]

    def softmax(xs):
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    p, q = softmax(clean), softmax(perturbed)
    entropy = -sum(pi * math.log(pi) for pi in p)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(q[3])  # argmax of clean is 3
    assert float(tta.tent_loss(torch.tensor(clean))) == pytest.approx(entropy, rel=1e-5)
    assert float(tta.pcl_loss(torch.tensor(clean), torch.tensor(perturbed))) == pytest.approx(kl, rel=1e-5)
    assert float(tta.pcl_loss(torch.tensor(clean), torch.tensor(perturbed), ce=0.3)) == pytest.approx(kl + 0.3 * ce, rel=1e-5)
    # the clean side is a fixed target: no gradient reaches it through the KL term
    c, q_ = torch.tensor(clean, requires_grad=True), torch.tensor(perturbed, requires_grad=True)
    tta.pcl_loss(c, q_).backward()
    assert c.grad is None and q_.grad is not None
    assert q_.grad.tolist() == pytest.approx([qi - pi for pi, qi in zip(p, q)], abs=1e-6)  # d KL / d logits = q - p


def test_one_tent_step_lowers_the_batch_entropy(tiny, books):
    model, tokenizer = tiny
    runner = icl.ICLRunner(model, tokenizer, DATASETS["books-next"])
    inputs = [runner.inputs([], q)[:3] for q in books[:4]]

    def batch_entropy():
        with torch.no_grad():
            return sum(float(tta.entropy(runner.scores(*i))) for i in inputs) / len(inputs)

    before = batch_entropy()
    with Adapter(model, TTAConfig("tent", lr=0.01, episodic=False), seed=0) as adapter:
        losses = adapter.adapt([lambda i=i: runner.scores(*i) for i in inputs])
        after = batch_entropy()
    assert losses == [pytest.approx(before, rel=1e-5)]  # the loss is the batch's mean entropy
    assert after < before
    assert batch_entropy() == pytest.approx(before, rel=0, abs=0)  # and the model is back


@pytest.mark.parametrize("where", ["layers", "layer:0", "embeddings"])
@pytest.mark.parametrize("how", ["dropout", "gaussian"])
def test_pcl_perturbs_only_its_own_forward_and_by_the_strength(tiny, books, where, how):
    model, tokenizer = tiny
    runner = icl.ICLRunner(model, tokenizer, DATASETS["books-next"])
    ctx, conts, norms, _ = runner.inputs([], books[0])
    with torch.no_grad():
        plain = runner.scores(ctx, conts, norms)
        for strength, differs in ((0.0, False), (0.3, True)):
            with Adapter(model, TTAConfig("pcl", where=where, how=how, strength=strength), seed=0) as adapter:
                assert torch.equal(runner.scores(ctx, conts, norms), plain)
                adapter.perturbing = True
                assert (not torch.equal(runner.scores(ctx, conts, norms), plain)) == differs
                adapter.perturbing = False


def test_dropout_perturbation_keeps_the_expectation():
    adapter = Adapter(torch.nn.Linear(2, 2), TTAConfig("pcl", strength=0.25), seed=0)
    x = torch.ones(200_000)
    y = adapter._perturb(x)
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.01
    assert abs(float(y.mean()) - 1.0) < 0.01


def test_an_evaluation_with_adaptation_reports_time_and_leaves_the_model(tiny):
    model, tokenizer = tiny
    before = _state(model)
    results = icl.evaluate_dataset(model, tokenizer, "books-next@typo:0.2", [icl.ICLConfig(mode="zeroshot")], seeds=2, limit=4,
                                   adaptations=[TTAConfig("pcl"), TTAConfig("none"), TTAConfig("tent")])
    assert [r["dataset"] for r in results] == ["books-next@typo:0.2/zeroshot", "books-next@typo:0.2/zeroshot+pcl",
                                               "books-next@typo:0.2/zeroshot+tent"]
    plain = results[0]["extra"]
    assert plain["shift"] == "typo:0.2" and plain["seeds"] == 2 and plain["time_ratio"] == 1.0
    for r in results[1:]:
        assert r["extra"]["time_ratio"] == pytest.approx(r["extra"]["seconds_per_query"] / plain["seconds_per_query"])
        assert r["extra"]["tta_steps_taken"] == 2 * 1  # two seeds, one batch of four, one step
    assert _same(before, _state(model))


@pytest.mark.parametrize("settings, words", [
    (dict(mode="fast"), ("'fast'", "none, tent, pcl")),
    (dict(steps=-1), ("tta_steps = -1",)),
    (dict(lr=-0.1), ("tta_lr",)),
    (dict(batch=0), ("tta_batch",)),
    (dict(params="everything"), ("tta_params", "norms, lora")),
    (dict(where="layer:x"), ("pcl_where",)),
    (dict(how="blur"), ("pcl_how",)),
    (dict(how="dropout", strength=1.0), ("pcl_strength",)),
])
def test_bad_settings_are_refused_with_their_name(settings, words):
    with pytest.raises(UserError) as err:
        tta.check(TTAConfig(**settings))
    assert all(w in str(err.value) for w in words), str(err.value)


# ----------------------------------------------------------------------------- zero-shot tasks through lm-eval


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """A multiple-choice lm-eval task of our own (three or two choices per document), offline."""
    import json

    folder = tmp_path_factory.mktemp("task")
    docs = [{"q": f"The sky number {i} is", "options": ["blue", "green", "loud"], "gold": i % 3} for i in range(6)]
    docs += [{"q": "Two plus two is", "options": ["four", "five"], "gold": 0}]
    (folder / "mine.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "mine.yaml").write_text(f"task: mine_tta\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mine.jsonl'}\n"
                                      "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"Q: {{q}}\\nA:\"\n"
                                      "doc_to_choice: options\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    return f"file:{folder / 'mine.yaml'}"


def test_zero_shot_tasks_adapt_and_at_learning_rate_zero_score_as_plain_lm_eval(tiny, mine):
    from workbench.evaluation import zeroshot

    model, tokenizer = tiny
    before = _state(model)
    plain, *adapted = zeroshot.evaluate_tasks(model, tokenizer, [mine], batch_size=2,
                                              adaptations=[TTAConfig("tent", lr=0.0, batch=3), TTAConfig("none"),
                                                           TTAConfig("pcl", lr=0.0, batch=3)])
    assert plain["dataset"] == mine and [a["dataset"] for a in adapted] == [f"{mine}+tent", f"{mine}+pcl"]
    for a in adapted:
        assert a["value"] == plain["value"] and a["stderr"] == plain["stderr"]
        assert a["extra"]["tta_steps_taken"] == 3  # seven documents in batches of three
        assert a["extra"]["time_ratio"] > 0
    [moved] = zeroshot.evaluate_tasks(model, tokenizer, [mine], adaptations=[TTAConfig("tent", lr=0.5, batch=1, episodic=False)])
    assert moved["extra"]["tta_steps_taken"] == 7
    assert _same(before, _state(model))


def test_choice_scores_equal_lm_evals_log_likelihoods(tiny):
    from lm_eval.api.instance import Instance

    from workbench.evaluation import zeroshot

    model, tokenizer = tiny
    lm = zeroshot._in_memory_lm(model, tokenizer, 2, None, None)
    pairs = [("Q: The sky is\nA:", " blue"), ("Q: The sky is\nA:", " a long green colour"), ("Two words", " and more")]
    requests = [Instance("loglikelihood", {}, p, i, ("t", 0, 1)) for i, p in enumerate(pairs)]
    expected = [ll for ll, _ in lm.loglikelihood(requests)]
    with torch.no_grad():
        got = lm.choice_scores(pairs).tolist()
    assert got == pytest.approx(expected, abs=1e-4)

"""In-context learning: one runner for zero-shot, few-shot and DAIL, checked against direct computations."""

import dataclasses
import json
import math
import random
import statistics
from collections import Counter

import pytest
import torch

from workbench.errors import UserError
from workbench.evaluation import icl
from workbench.evaluation.icl_data import DATASETS, DataSet, Example, get_dataset, query_subset, read_examples
from workbench.spec import spec_from_dict

from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tiny(one_thread):
    """A small random Llama with the demo tokenizer: fast, deterministic, and its predictions are not the gold labels."""
    return tiny_llama()


@pytest.fixture(scope="module")
def sst2():
    examples = read_examples(DATASETS["sst2"])
    return [examples[i] for i in query_subset(len(examples), 14)]


def _runner(tiny, name="sst2"):
    model, tokenizer = tiny
    return icl.ICLRunner(model, tokenizer, DATASETS[name])


def test_label_log_likelihood_equals_a_direct_forward_pass(tiny):
    """The one-pass scoring (right-padded rows, shared first position) equals scoring each full sequence on its own."""
    model, tokenizer = tiny
    runner = _runner(tiny, "trec")  # six label words, several of them more than one token
    prompt = runner.prompt([({"text": "Who wrote Hamlet ?"}, 3)], {"text": "How far is the moon ?"})
    ctx, conts = runner.encode(prompt)
    assert any(len(c) > 1 for c in conts) and any(len(c) == 1 for c in conts)
    got = runner.label_logprobs(ctx, conts)
    for i, word in enumerate(DATASETS["trec"].label_words):
        ids = tokenizer(f"{prompt} {word}")["input_ids"]
        n = len(ids) - len(ctx)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        direct = sum(float(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]]) for j in range(n))
        assert got[i].item() == pytest.approx(direct, abs=1e-4)


def test_dail_with_no_memory_is_exactly_zero_shot(tiny, sst2):
    runner = _runner(tiny)
    order = list(range(len(sst2)))
    random.Random(3).shuffle(order)
    zero = runner.run(sst2, order, icl.ICLConfig(mode="zeroshot"))
    dail = runner.run(sst2, order, icl.ICLConfig(mode="dail", k=4, memory=0))
    assert [p.logprobs for p in dail] == [p.logprobs for p in zero]
    assert [p.label for p in dail] == [p.label for p in zero]
    assert all(p.demos == [] and p.memory_size == 0 for p in dail)


def test_memory_holds_at_most_m_predictions_and_never_a_gold_label(tiny, sst2):
    runner = _runner(tiny)
    order = list(range(len(sst2)))
    config = icl.ICLConfig(mode="dail", k=2, memory=3)
    memory = icl.Memory(3)
    snapshots = []
    preds = runner.run(sst2, order, config, progress=lambda n: snapshots.append([(m.position, m.label) for m in memory.items]),
                       memory=memory)
    predicted = {p.position: p.label for p in preds}
    assert max(len(s) for s in snapshots) == 3 and all(len(s) <= 3 for s in snapshots)
    assert all(label == predicted[pos] for s in snapshots for pos, label in s)
    assert "gold" not in {f.name for f in dataclasses.fields(icl.MemoryItem)}
    # the gold labels never reach the model: flipping every one of them changes no prediction
    flipped = [Example(e.fields, 1 - e.label) for e in sst2]
    again = runner.run(flipped, order, config)
    assert [p.label for p in again] == [p.label for p in preds]
    assert [p.demos for p in again] == [p.demos for p in preds]
    assert icl.accuracy(again) == pytest.approx(1 - icl.accuracy(preds))
    assert any(p.label != p.gold for p in preds) and any(p.label == p.gold for p in preds)


def _bm25_brute_force(query: str, docs: list[str], k1=1.5, b=0.75) -> list[float]:
    toks = [icl.words(d) for d in docs]
    avgdl = sum(len(t) for t in toks) / len(toks)
    out = []
    for t in toks:
        score = 0.0
        for term in sorted(set(icl.words(query))):
            n = sum(term in other for other in toks)
            idf = math.log(1 + (len(toks) - n + 0.5) / (n + 0.5))
            f = t.count(term)
            score += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(t) / avgdl))
        out.append(score)
    return out


def _ranking(scores: list[float], k: int) -> list[int]:
    best = []
    remaining = list(range(len(scores)))
    for _ in range(min(k, len(scores))):  # selection by repeated maximum, ties to the older item
        i = max(remaining, key=lambda j: (scores[j], -j))
        best.append(i)
        remaining.remove(i)
    return best


def _memory(texts, labels=None, entropies=None, embeddings=None) -> icl.Memory:
    memory = icl.Memory(len(texts))
    for i, text in enumerate(texts):
        memory.add(icl.MemoryItem(i, {"text": text}, text, (labels or [0] * len(texts))[i], (entropies or [0.0] * len(texts))[i],
                                  None if embeddings is None else embeddings[i]))
    return memory


def test_bm25_retrieval_returns_the_k_best_by_brute_force(tiny):
    texts = [" ".join(random.Random(i).choices("good bad movie plot actor boring great film music long".split(), k=random.Random(-i).randint(3, 12)))
             for i in range(20)]
    memory = _memory(texts)
    runner = _runner(tiny)
    query = Example({"text": "a great film with good music but a boring plot"}, 0)
    chosen = runner.retrieve(memory, query, None, icl.ICLConfig(mode="dail", k=5, memory=20))
    expected = _ranking(_bm25_brute_force(query.text(), texts), 5)
    assert [m.position for m in chosen] == list(reversed(expected))  # the most relevant ends next to the query
    assert icl.bm25_scores(query.text(), texts) == pytest.approx(_bm25_brute_force(query.text(), texts))


def test_hidden_state_retrieval_returns_the_k_most_similar(tiny):
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(16, generator=gen) for _ in range(12)]
    query = torch.randn(16, generator=gen)
    memory = _memory([f"t{i}" for i in range(12)], embeddings=keys)

    def cosine(a, b):
        a, b = a.tolist(), b.tolist()
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    chosen = _runner(tiny).retrieve(memory, Example({"text": "q"}, 0), query, icl.ICLConfig(mode="dail", k=4, memory=12, retriever="hidden"))
    assert [m.position for m in chosen] == list(reversed(_ranking([cosine(query, k) for k in keys], 4)))


def test_confidence_filter_keeps_only_confident_predictions(tiny):
    memory = _memory(["same words"] * 6, entropies=[0.9, 0.1, 0.5, 0.3, 0.95, 0.2])
    config = icl.ICLConfig(mode="dail", k=6, memory=6, max_entropy=0.3)
    chosen = _runner(tiny).retrieve(memory, Example({"text": "same words"}, 0), None, config)
    assert sorted(m.position for m in chosen) == [1, 3, 5]


def test_hidden_retriever_embeds_each_query_with_the_model(tiny, sst2):
    model, tokenizer = tiny
    runner = _runner(tiny)
    memory = icl.Memory(4)
    runner.run(sst2[:5], list(range(5)), icl.ICLConfig(mode="dail", k=2, memory=4, retriever="hidden"), memory=memory)
    item = memory.items[-1]
    ids = tokenizer(runner.render(item.fields))["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(item.embedding, hidden.mean(0), atol=1e-5)


def test_results_are_deterministic_for_a_seed(tiny):
    model, tokenizer = tiny
    configs = [icl.ICLConfig(mode="dail", k=2, memory=4), icl.ICLConfig(mode="fewshot", k=2)]
    def untimed(results):  # the wall time per query is measured, not computed
        return [{**r, "extra": {k: v for k, v in r["extra"].items() if k != "seconds_per_query"}} for r in results]

    first = icl.evaluate_dataset(model, tokenizer, "sst2", configs, seeds=2, limit=10)
    second = icl.evaluate_dataset(model, tokenizer, "sst2", configs, seeds=2, limit=10)
    assert untimed(first) == untimed(second)
    runner = _runner(tiny)
    queries = read_examples(DATASETS["sst2"])
    train = read_examples(DATASETS["sst2"], "train")
    order = query_subset(len(queries), 6)
    a = runner.run(queries, order, configs[1], seed=0, train=train)
    b = runner.run(queries, order, configs[1], seed=1, train=train)
    assert [p.demos for p in a] != [p.demos for p in b]  # another seed draws other demonstrations
    assert all(len(p.demos) == 2 and all(0 <= i < len(train) for i in p.demos) for p in a)


def test_mean_and_std_over_orders(tiny):
    model, tokenizer = tiny
    results = icl.evaluate_dataset(model, tokenizer, "cr", [icl.ICLConfig(mode="zeroshot"), icl.ICLConfig(mode="dail", k=2, memory=3)],
                                   seeds=3, limit=9)
    zero, dail = results
    assert zero["dataset"] == "cr/zeroshot" and zero["extra"]["seeds"] == 1 and zero["extra"]["std"] is None
    accs = dail["extra"]["accuracies"]
    assert len(accs) == 3 and dail["value"] == pytest.approx(sum(accs) / 3)
    assert dail["extra"]["std"] == pytest.approx(statistics.pstdev(accs))
    assert all(abs(a * 9 - round(a * 9)) < 1e-9 for a in accs)  # accuracies over 9 queries


@pytest.mark.parametrize("name, test, train, labels", [
    ("sst2", 1821, 6920, 2), ("sst5", 2210, 8544, 5), ("mr", 10662, None, 2), ("cr", 3775, None, 2), ("subj", 10000, None, 2),
    ("trec", 500, 5452, 6), ("agnews", 7600, None, 4), ("rte", 277, 2490, 2), ("cb", 56, 250, 3)])
def test_bundled_data_sets_have_the_published_sizes(name, test, train, labels):
    ds = DATASETS[name]
    examples = read_examples(ds)
    assert len(examples) == test and len(ds.label_words) == labels
    assert set(Counter(e.label for e in examples)) == set(range(labels))
    if train:
        assert len(read_examples(ds, "train")) == train
    else:
        with pytest.raises(UserError, match="no train split"):
            read_examples(ds, "train")


def test_a_label_outside_the_label_table_is_bad_input(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "fine", "label": 1}, {"text": "odd", "label": 2}]) + "\n")
    with pytest.raises(UserError) as err:
        read_examples(get_dataset(f"file:{path}", ["negative", "positive"], "Review: {text}\nSentiment:"))
    assert "line 2" in err.value.message and "label 2" in err.value.message and "negative" in err.value.message
    words = tmp_path / "words.jsonl"
    words.write_text(json.dumps({"text": "great", "label": "positive"}) + "\n" + json.dumps({"text": "meh", "label": "neutral"}) + "\n")
    with pytest.raises(UserError, match="'neutral' is not in the label table"):
        read_examples(get_dataset(f"file:{words}", ["negative", "positive"]))
    lines = tmp_path / "sst.txt"
    lines.write_text("0 a dull film\n7 a film out of range\n")
    with pytest.raises(UserError, match="line 2: label '7'"):
        read_examples(DataSet("mine", "mine", "{text}", ("negative", "positive"), str(lines)))


def test_a_data_set_of_ones_own(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": f"item {i}", "label": ["no", "yes"][i % 2]}) + "\n" for i in range(6)))
    (result,) = icl.evaluate_dataset(model, tokenizer, f"file:{path}", [icl.ICLConfig(mode="dail", k=1, memory=2)],
                                     seeds=1, labels=["no", "yes"], template="Q: {text}\nA:")
    assert result["samples"] == 6 and result["extra"]["labels"] == ["no", "yes"]


@pytest.mark.parametrize("settings, words", [
    ({"icl": ["sst2"], "icl_k": 8, "icl_memory": 4}, ["icl_k = 8 is larger than evaluate.icl_memory = 4"]),
    ({"icl": ["sst3"]}, ["unknown data set 'sst3'", "sst2"]),
    ({"icl": ["mr"], "icl_modes": ["fewshot"]}, ["no train split"]),
    ({"icl": ["sst2"], "icl_retriever": "dense"}, ["bm25, hidden"]),
    ({"icl": ["sst2"], "icl_max_entropy": 1.5}, ["(0, 1]"]),
    ({"icl": ["file:x.jsonl"]}, ["label words"]),
])
def test_bad_icl_settings_name_the_problem(settings, words):
    with pytest.raises(UserError) as err:
        spec_from_dict({"evaluate": settings})
    for word in words:
        assert word in err.value.message + err.value.hint
    assert err.value.hint


def test_k_larger_than_the_memory_is_refused_by_the_runner(tiny, sst2):
    with pytest.raises(UserError, match="K = 5 is larger than M = 2"):
        _runner(tiny).run(sst2, [0, 1], icl.ICLConfig(mode="dail", k=5, memory=2))

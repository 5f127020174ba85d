"""The pruning pass on the demo model: achieved sparsity, patterns, OWL, cancellation, export."""

import math

import pytest
import torch

from workbench.engine import Run
from workbench.errors import Cancelled
from workbench.events import LayerDone
from workbench.models import load_model, weight_matrix
from workbench.pruning.runner import prune
from workbench.pruning.family import PruneStep
from workbench.spec import load_preset


@pytest.fixture(scope="module")
def demo():
    return load_model("demo", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tokens(demo):
    from workbench.data.sampling import calibration_samples

    return calibration_samples("c4", demo.tokenizer, nsamples=8, seqlen=128, seed=0)


@pytest.fixture()
def fresh(demo):
    """The demo model restored to its dense weights after each test."""
    state = {k: v.clone() for k, v in demo.model.state_dict().items()}
    yield demo
    demo.model.load_state_dict(state)


def _weights(loaded):
    for i, layer in enumerate(loaded.adapter.layers):
        for name, module in loaded.adapter.linear_modules(layer).items():
            yield i, name, weight_matrix(module)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_sparsity_matches_the_request_in_every_linear(fresh, tokens, method):
    events = []
    report = prune(fresh, tokens, PruneStep(method=method, sparsity=0.6), batch_size=4, emit=events.append)
    per_row = set()
    assert [e.layer for e in events if isinstance(e, LayerDone)] == list(range(8))
    for i, name, w in _weights(fresh):
        out, cols = w.shape
        zeros = int((w == 0).sum())
        if method == "magnitude":  # whole-matrix comparison, the reference count floor(n * s)
            assert zeros == math.floor(w.numel() * 0.6), (i, name)
        elif method == "wanda":  # per output row
            assert ((w == 0).sum(1) == math.floor(cols * 0.6)).all(), (i, name)
        else:  # SparseGPT: floor(s * rows * 128) of each 128-column block of each matrix, rows free to differ
            assert zeros == sum(math.floor(out * min(128, cols - c) * 0.6) for c in range(0, cols, 128)), (i, name)
            per_row.update(int(z) for z in (w == 0).sum(1))
        assert report["layers"][i]["modules"][name]["zeros"] == zeros
    # floor(n * s) per row, matrix or block: short of the target by less than one weight in the narrowest row
    narrowest = min(w.shape[1] for _, _, w in _weights(fresh))
    assert 0.6 - 1 / narrowest < report["sparsity"] <= 0.6 + 1e-9
    if method == "sparsegpt":
        assert len(per_row) > 1  # one threshold per block: rows end at different counts


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_is_exact(fresh, tokens, method):
    prune(fresh, tokens, PruneStep(method=method, pattern="2:4"), batch_size=4)
    for i, name, w in _weights(fresh):
        groups = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
        assert (groups == 2).all(), (i, name)


@pytest.mark.slow
def test_sparsegpt_changes_the_kept_weights_and_wanda_does_not(fresh, tokens):
    dense_state = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    before = {(i, n): w.clone() for i, n, w in _weights(fresh)}
    prune(fresh, tokens, PruneStep(method="wanda", sparsity=0.5), batch_size=4)
    for i, n, w in _weights(fresh):
        kept = w != 0
        assert torch.equal(w[kept], before[(i, n)][kept])
    fresh.model.load_state_dict(dense_state)
    prune(fresh, tokens, PruneStep(method="sparsegpt", sparsity=0.5), batch_size=4)
    for i, n, w in _weights(fresh):
        kept = w != 0
        # the OBS update moves the kept weights to compensate for the pruned ones
        assert not torch.allclose(w[kept], before[(i, n)][kept]), (i, n)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_layer_targets_average_to_the_request(fresh, tokens, method):
    step = PruneStep(method=method, sparsity=0.7, allocation="owl")
    report = prune(fresh, tokens, step, batch_size=4)
    targets = [l["target"] for l in report["layers"]]
    assert abs(sum(targets) / len(targets) - 0.7) < 1e-6
    assert max(targets) - min(targets) == pytest.approx(2 * 0.08, abs=1e-6)
    ratios = report["outlier_ratios"]
    # more outliers, fewer weights removed
    order_targets = sorted(range(8), key=lambda i: targets[i])
    order_ratios = sorted(range(8), key=lambda i: -ratios[i])
    assert order_targets == order_ratios
    narrowest = min(w.shape[1] for _, _, w in _weights(fresh))
    for layer in report["layers"]:  # floor(n * s) weights: short of the target by less than one per narrowest row
        assert layer["target"] - 1 / narrowest < layer["sparsity"] <= layer["target"] + 1e-9


def test_cancel_stops_at_a_layer_boundary(fresh, tokens):
    seen = []

    def cancel():
        return len(seen) >= 3

    with pytest.raises(Cancelled):
        prune(fresh, tokens, PruneStep(method="wanda", sparsity=0.5), batch_size=4,
               emit=lambda e: seen.append(e) if isinstance(e, LayerDone) else None, cancel=cancel)
    assert [e.layer for e in seen] == [0, 1, 2]


@pytest.mark.slow
def test_lm_head_is_left_dense_unless_asked(fresh, tokens):
    head = weight_matrix(fresh.adapter.lm_head)
    prune(fresh, tokens, PruneStep(method="wanda", sparsity=0.5), batch_size=4)
    assert int((head == 0).sum()) == 0
    report = prune(fresh, tokens, PruneStep(method="wanda", sparsity=0.5, include_lm_head=True), batch_size=4)
    assert report["lm_head"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert ((head == 0).sum(1) == head.shape[1] // 2).all()


@pytest.mark.slow
def test_run_exports_a_checkpoint_that_transformers_reloads(tmp_path):
    from transformers import AutoModelForCausalLM
    import json

    out = tmp_path / "pruned"
    spec = load_preset("quickstart", ["calibration.nsamples=8", "calibration.seqlen=64", "evaluate.limit=2",
                                      "export.save=true", f"export.out=\"{out}\"", "export.dtype=\"float32\"",
                                      "model.dtype=\"float32\""])
    events = []
    run = Run(spec, emit=events.append)
    summary = run.execute()
    assert summary["export"] == str(out)
    types = [e.type for e in events]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    assert types.count("metric") == 3 and types.count("layer_done") == 8  # perplexity before and after, the export's size
    size = [m for m in summary["metrics"] if m["name"] == "export_bytes"]
    assert [m["value"] for m in size] == [sum(p.stat().st_size for p in out.glob("*.safetensors"))]
    info = json.loads((out / "compression.json").read_text())
    assert info["spec"]["steps"][0]["method"] == "wanda"
    assert len(info["steps"][0]["layers"]) == 8
    assert {m["phase"] for m in info["metrics"]} == {"before", "after"}
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, run.loaded.model(ids).logits, rtol=0, atol=0)
    for (name, a), (_, b) in zip(reloaded.named_parameters(), run.loaded.model.named_parameters()):
        assert torch.equal(a == 0, b == 0), name


def test_pruning_a_head_tied_to_the_embeddings_is_refused():
    import transformers as tf

    from workbench.errors import UserError
    from workbench.models import LoadedModel, get_adapter

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64)).eval()
    loaded = LoadedModel(model=model, tokenizer=None, adapter=get_adapter(model), source="tiny", device=torch.device("cpu"),
                         dtype=torch.float32)
    tokens = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="shares its weights"):
        prune(loaded, tokens, PruneStep(method="wanda", sparsity=0.5, include_lm_head=True), batch_size=2)
    # without the head, GPT-2's Conv1D layers are pruned through their transposed views
    prune(loaded, tokens, PruneStep(method="wanda", sparsity=0.5), batch_size=2)
    for layer in loaded.adapter.layers:
        for name, module in loaded.adapter.linear_modules(layer).items():
            w = weight_matrix(module)
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name

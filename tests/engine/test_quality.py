"""Pruning quality on the demo model, against the dense model's own perplexity.

The setting of the issue: 128 C4 samples of 512 tokens, seed 0; perplexity at
512 on WikiText-2 and on the held-out Gutenberg books (never seen in training).
The first 48 windows of each set keep the test under a minute on two cores.
"""

import pytest

from shared_data import shared_path
from workbench.data.sampling import calibration_samples
from workbench.models import load_model
from workbench.perplexity import eval_tokens, perplexity
from workbench.pruning.runner import prune
from workbench.pruning.family import PruneStep

WINDOWS = 48


@pytest.mark.slow
def test_sparsegpt_keeps_perplexity_closer_to_dense_than_magnitude():
    books = shared_path("data", "pretrain", "heldout", "books-eval.txt")
    loaded = load_model("demo", dtype="float32", device="cpu")
    tok = loaded.tokenizer
    sets = {"wikitext2": eval_tokens("wikitext2", tok, 512), "books": eval_tokens(f"file:{books}", tok, 512)}
    tokens = calibration_samples("c4", tok, nsamples=128, seqlen=512, seed=0)
    dense_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}

    def ppl():
        return {name: perplexity(loaded.model, ids, 512, limit=WINDOWS, batch_size=8)["ppl"] for name, ids in sets.items()}

    dense = ppl()
    results = {}
    for method in ("magnitude", "sparsegpt"):
        loaded.model.load_state_dict(dense_state)
        prune(loaded, tokens, PruneStep(method=method, sparsity=0.5), batch_size=16)
        results[method] = ppl()
    for name in sets:
        assert dense[name] < results["sparsegpt"][name] < results["magnitude"][name], (name, dense, results)
    # the in-domain books are far easier for a model trained on books
    assert dense["books"] < dense["wikitext2"] / 2

"""The fake model: the demo model's shapes and the formulas the fake worker's numbers follow. No torch."""

from __future__ import annotations

FAILURES = ("error", "oom", "crash", "hang")
HIDDEN, INTERMEDIATE, KV = 256, 768, 128  # the bundled demo model's shapes
HEADS, KV_HEADS, VOCAB = 4, 2, 8256
LINEARS = {
    "self_attn.q_proj": [HIDDEN, HIDDEN], "self_attn.k_proj": [KV, HIDDEN], "self_attn.v_proj": [KV, HIDDEN],
    "self_attn.o_proj": [HIDDEN, HIDDEN], "mlp.gate_proj": [INTERMEDIATE, HIDDEN], "mlp.up_proj": [INTERMEDIATE, HIDDEN],
    "mlp.down_proj": [HIDDEN, INTERMEDIATE],
}
DENSE_PPL = {"wikitext2": 30.0, "c4": 40.0}
GIB = 2**30
FAKE_GPU_MEMORY = 80 * GIB
MODULE_TYPES = {"q_proj": "qk", "k_proj": "qk", "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def dense_perplexity(dataset: str) -> float:
    return DENSE_PPL.get(dataset, 50.0)


def compressed_perplexity(dataset: str, sparsities: list[float]) -> float:
    """The fake model's perplexity after steps of these effective sparsities: ``dense * prod(1 + 4 s^2)``.

    A step's effective sparsity is its pruning target, ``1 - retention`` for
    low-rank, and the removed fraction for structured steps (see the module
    docstring).
    """
    value = dense_perplexity(dataset)
    for s in sparsities:
        value *= 1.0 + 4.0 * s * s
    return value


def trial_objective(n: int) -> float:
    """The objective of a fake search's trial ``n`` (0, 1, ...): ``40 + 20 / (n + 1) + (7 n mod 5)``.

    It falls with n but not monotonically, so the best so far differs from the latest.
    """
    return 40.0 + 20.0 / (n + 1) + (n * 7 % 5)


def trial_ratios(n: int, names: list[str], low: float, high: float) -> dict[str, float]:
    """The ratios of trial ``n``: group j gets ``low + (high - low) * ((n + 2 j) * 7 mod 11) / 10``, rounded to 4 places."""
    return {name: round(low + (high - low) * ((n + 2 * j) * 7 % 11) / 10, 4) for j, name in enumerate(names)}

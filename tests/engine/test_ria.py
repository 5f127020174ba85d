"""RIA pruning: the scores and masks against the paper's definition written out element by element."""

from __future__ import annotations

import pytest
import torch

from workbench.pruning.family import METHODS, PruneStep
from workbench.pruning.methods import Group
from workbench.pruning.ria import prune, ria_scores
from workbench.spec import load_preset


def _definition(w: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """The score of every weight by the formula, one element at a time (float64)."""
    rows, cols = w.shape
    w = w.double().abs()
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            out[i, j] = (w[i, j] / w[i, :].sum() + w[i, j] / w[:, j].sum()) * sq_norm[j].double().sqrt() ** 0.5
    return out


def test_scores_follow_the_definition():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=gen)
    sq_norm = torch.rand(10, generator=gen) * 5
    torch.testing.assert_close(ria_scores(w, sq_norm).double(), _definition(w, sq_norm), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruning_removes_the_lowest_scores_of_each_row(pattern):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=gen)
    sq_norm = torch.rand(16, generator=gen) * 3
    reference = _definition(w, sq_norm)
    pruned = w.clone()
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    prune(Group(["w"], [pruned], {"sq_norm": sq_norm}, 0.0 if m else 0.5, n, m))
    removed = pruned == 0
    if m:
        groups = reference.reshape(8, 4, 4)
        expected = torch.zeros_like(groups, dtype=torch.bool)
        expected.scatter_(2, groups.argsort(dim=2)[:, :, :2], True)
        assert torch.equal(removed, expected.reshape(8, 16))
    else:
        for row in range(8):  # the 8 lowest of 16 in each row, by the definition
            assert set(torch.nonzero(removed[row]).flatten().tolist()) == set(reference[row].argsort()[:8].tolist())
    assert torch.equal(pruned[~removed], w[~removed])  # the kept weights are untouched


def test_ria_is_a_method_of_the_prune_step_and_its_preset_loads():
    assert METHODS["ria"].statistics == ("sq_norm",)
    spec = load_preset("ria-50")
    assert isinstance(spec.steps[0], PruneStep) and spec.steps[0].method == "ria" and spec.steps[0].sparsity == 0.5

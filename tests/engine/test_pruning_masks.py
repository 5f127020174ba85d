"""Scores and masks, checked against brute-force computations of their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.pruning.masks import (
    apply_mask_,
    magnitude_scores,
    mask_sparsity,
    nm_mask,
    unstructured_mask,
    wanda_scores,
)

SHAPES = [(7, 13), (16, 64), (33, 40)]
SPARSITIES = [0.1, 0.3, 0.5, 0.77]


def lowest(values, k):
    """Indices of the k smallest values; ties go to the lower index."""
    return set(sorted(range(len(values)), key=lambda j: (values[j], j))[:k])


def brute_row_mask(score_rows, sparsity):
    rows, cols = len(score_rows), len(score_rows[0])
    k = math.floor(cols * sparsity)  # the reference implementations' count
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i, row in enumerate(score_rows):
        for j in lowest(row, k):
            mask[i, j] = True
    return mask


def layer(shape, seed):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(50, in_f, generator=g) * torch.rand(in_f, generator=g) * 4  # uneven feature norms
    return W, X


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_wanda_mask_matches_brute_force(shape, sparsity):
    W, X = layer(shape, seed=shape[0] * 100 + int(sparsity * 100))
    rows, cols = shape
    # Definition: per row, prune the k smallest |W_ij| * ||X_j||, X the raw calibration inputs.
    feature_norm = [math.sqrt(sum(float(X[t, j]) ** 2 for t in range(X.shape[0]))) for j in range(cols)]
    brute_scores = [[abs(float(W[i, j])) * feature_norm[j] for j in range(cols)] for i in range(rows)]
    expected = brute_row_mask(brute_scores, sparsity)

    scores = wanda_scores(W, (X**2).sum(0))
    assert scores.dtype == torch.float32
    assert torch.allclose(scores.double(), torch.tensor(brute_scores, dtype=torch.float64), rtol=1e-5)
    assert torch.equal(unstructured_mask(scores, sparsity), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_magnitude_masks_match_brute_force(shape, sparsity):
    W, _ = layer(shape, seed=7 + shape[1])
    rows, cols = shape
    values = [[abs(float(W[i, j])) for j in range(cols)] for i in range(rows)]
    assert torch.equal(magnitude_scores(W), W.abs())
    assert magnitude_scores(W.to(torch.bfloat16)).dtype == torch.float32
    assert torch.equal(unstructured_mask(magnitude_scores(W), sparsity, scope="row"), brute_row_mask(values, sparsity))
    # Matrix scope: one ranking over all entries (row-major position breaks ties).
    flat = [v for row in values for v in row]
    expected = torch.zeros(rows * cols, dtype=torch.bool)
    for idx in lowest(flat, math.floor(rows * cols * sparsity)):
        expected[idx] = True
    got = unstructured_mask(magnitude_scores(W), sparsity, scope="matrix")
    assert torch.equal(got, expected.reshape(rows, cols))


@pytest.mark.parametrize("shape", SHAPES + [(5, 7), (3, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.05, 0.25, 0.3, 0.5, 0.9])
def test_achieved_zero_count(shape, sparsity):
    W, _ = layer(shape, seed=1)
    rows, cols = shape
    row_mask = unstructured_mask(magnitude_scores(W), sparsity)
    assert torch.all(row_mask.sum(1) == math.floor(cols * sparsity))
    matrix_mask = unstructured_mask(magnitude_scores(W), sparsity, scope="matrix")
    assert int(matrix_mask.sum()) == math.floor(rows * cols * sparsity)
    assert mask_sparsity(matrix_mask) == pytest.approx(math.floor(rows * cols * sparsity) / (rows * cols))
    W2 = W.clone()
    apply_mask_(W2, row_mask)
    assert int((W2 == 0).sum()) == int(row_mask.sum())


def test_ties_are_broken_by_position():
    scores = torch.ones(3, 8)
    assert unstructured_mask(scores, 0.5)[:, :4].all() and not unstructured_mask(scores, 0.5)[:, 4:].any()
    flat = unstructured_mask(scores, 0.25, scope="matrix")
    assert flat[0, :6].all() and int(flat.sum()) == 6
    nm = nm_mask(torch.zeros(2, 8), 2, 4)
    assert nm.tolist() == [[True, True, False, False] * 2] * 2


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
@pytest.mark.parametrize("shape", [(6, 16), (16, 64), (9, 24)])
def test_nm_mask_matches_brute_force(n, m, shape):
    if shape[1] % m:
        pytest.skip("in_features not divisible by m")
    rows, cols = shape
    W, X = layer(shape, seed=n * 10 + m + rows)
    scores = wanda_scores(W, (X**2).sum(0))
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(rows, cols // m, m)
    assert torch.all(groups.sum(-1) == n)
    expected = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for g0 in range(0, cols, m):
            group = [float(scores[i, g0 + t]) for t in range(m)]
            for t in lowest(group, n):
                expected[i, g0 + t] = True
    assert torch.equal(mask, expected)


def test_apply_mask_on_a_transposed_view():
    # A Conv1D layer stores (in, out); the engine passes weight.t().
    storage = torch.randn(12, 5)
    original = storage.clone()
    view = storage.t()
    mask = unstructured_mask(magnitude_scores(view), 0.5)
    out = apply_mask_(view, mask)
    assert out is view
    assert torch.all(storage.t()[mask] == 0)
    assert torch.equal(storage.t()[~mask], original.t()[~mask])


def test_bad_arguments_raise_value_error():
    s = torch.rand(4, 8)
    for sparsity in (1.0, -0.1, float("nan"), 1.5, True, "0.5"):
        with pytest.raises(ValueError):
            unstructured_mask(s, sparsity)
    with pytest.raises(ValueError):
        unstructured_mask(s, 0.5, scope="column")
    with pytest.raises(ValueError):
        unstructured_mask(torch.rand(8), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        unstructured_mask(torch.tensor([[1.0, float("nan")]]), 0.5)
    for n, m in ((0, 4), (4, 4), (5, 4), (-1, 4), (2, 3), (2.0, 4)):
        with pytest.raises(ValueError):
            nm_mask(s, n, m)  # 8 % 3 != 0 covers the divisibility check
    with pytest.raises(ValueError):
        wanda_scores(torch.rand(4, 8), torch.rand(7))
    with pytest.raises(ValueError):
        wanda_scores(torch.rand(4, 8), torch.rand(8, 1))
    with pytest.raises(ValueError):
        magnitude_scores(torch.rand(2, 3, 4))
    W = torch.rand(4, 8)
    with pytest.raises(ValueError):
        apply_mask_(W, torch.zeros(4, 8))  # not bool
    with pytest.raises(ValueError):
        apply_mask_(W, torch.zeros(8, 4, dtype=torch.bool))


def test_sparsity_zero_prunes_nothing():
    s = torch.rand(5, 9)
    assert not unstructured_mask(s, 0.0).any()
    assert not unstructured_mask(s, 0.0, scope="matrix").any()
    assert mask_sparsity(torch.zeros(0, 4, dtype=torch.bool)) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masks_match_cpu():
    W, X = layer((64, 128), seed=3)
    sq = (X**2).sum(0)
    cpu = wanda_scores(W, sq)
    gpu = wanda_scores(W.cuda().half(), sq.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    g32 = wanda_scores(W.cuda(), sq.cuda())
    assert torch.equal(unstructured_mask(g32, 0.5).cpu(), unstructured_mask(cpu, 0.5))
    assert torch.equal(unstructured_mask(g32, 0.5, "matrix").cpu(), unstructured_mask(cpu, 0.5, "matrix"))
    assert torch.equal(nm_mask(g32, 2, 4).cpu(), nm_mask(cpu, 2, 4))
    Wg = W.cuda()
    apply_mask_(Wg, nm_mask(g32, 2, 4))
    assert torch.equal(Wg.cpu(), W.masked_fill(nm_mask(cpu, 2, 4), 0))

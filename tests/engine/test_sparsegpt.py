"""SparseGPT: the fused solver against a plain column-by-column reference, and
its reconstruction quality against Wanda and magnitude pruning."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.pruning import sparsegpt as sg
from workbench.pruning.masks import magnitude_scores, nm_mask, unstructured_mask, wanda_scores
from workbench.pruning.sparsegpt import SparseGPTResult, sparsegpt_prune


def lowest_k_by_rank(scores, k):
    """Per row, flag the k lowest scores (ties: lower column) by counting, for each entry,
    the entries that beat it: a brute-force definition, independent of any sort."""
    s = scores[:, :, None]
    t = scores[:, None, :]
    cols = scores.shape[1]
    earlier = torch.arange(cols)[None, :] < torch.arange(cols)[:, None]  # [j, i]: i < j
    rank = ((t < s) | ((t == s) & earlier)).sum(-1)
    return rank < k


def lowest_k_of_block(scores, k):
    """The k lowest scores of a whole block (ties: the lower row-major position), by rank counting."""
    rows, cols = scores.shape
    return lowest_k_by_rank(scores.reshape(1, -1), k).reshape(rows, cols)


def naive_sparsegpt(weight, hessian, sparsity, n=0, m=0, blocksize=128, percdamp=0.01, dtype=torch.float64,
                    scope="matrix", row_groups=None):
    """Independent reference: Algorithm 1 of the paper, one column at a time (float64 by default).

    Unstructured masks are chosen at each block's start from w^2 / [Hinv]_jj^2:
    scope "matrix" (the paper's reference code) prunes the floor(s * numel)
    lowest scores of the block of each weight matrix (``row_groups`` splits a
    stack of matrices), scope "row" floor(s*end) - floor(s*start) per row. N:M
    selects each group of m when the sweep reaches it. Ties go to the lower
    position.
    """
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(dtype).clone()
    rows, cols = W.shape
    groups = row_groups or [rows]
    starts = [sum(groups[:i]) for i in range(len(groups))]
    for j in torch.nonzero(torch.diag(H) == 0).flatten().tolist():
        H[j, j] = 1.0
        W[:, j] = 0.0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    error = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        W1 = W[:, i1:i2].clone()
        U = Hinv[i1:i2, i1:i2]
        d = torch.diag(U)
        E = torch.zeros_like(W1)
        M1 = torch.zeros_like(W1, dtype=torch.bool)
        if n == 0:
            scores = W1**2 / d**2
            if scope == "row":
                M1 = lowest_k_by_rank(scores, math.floor(sparsity * i2) - math.floor(sparsity * i1))
            else:
                for r0, size in zip(starts, groups):
                    M1[r0:r0 + size] = lowest_k_of_block(scores[r0:r0 + size], math.floor(size * (i2 - i1) * sparsity))
        for j in range(i2 - i1):
            if n and j % m == 0:
                M1[:, j : j + m] = lowest_k_by_rank(W1[:, j : j + m] ** 2 / d[j : j + m] ** 2, n)
            w = W1[:, j]
            q = torch.where(M1[:, j], torch.zeros_like(w), w)
            e = (w - q) / U[j, j]
            error += float((e**2).sum())
            W1[:, j:] -= e[:, None] * U[j, j:][None, :]
            E[:, j] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= E @ Hinv[i1:i2, i2:]
        mask[:, i1:i2] = M1
    return W, mask, error


def test_rank_selection_helper_is_right():
    scores = torch.tensor([[3.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert lowest_k_by_rank(scores, 2).tolist() == [[False, True, False, True], [True, True, False, False]]


def random_layer(rows, cols, tokens, seed, dead=()):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    for j in dead:
        X[:, j] = 0.0
    return W, X, X.T @ X


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "rows,cols,blocksize,sparsity,n,m",
    [
        (24, 100, 32, 0.5, 0, 0),  # several blocks, ragged last block, leaves < block
        (20, 96, 96, 0.37, 0, 0),  # one block split recursively (96 > leaf 32)
        (16, 72, 24, 0.7, 0, 0),
        (24, 96, 32, 0.0, 2, 4),
        (16, 96, 48, 0.0, 4, 8),
        (16, 64, 64, 0.25, 1, 4),  # sparsity restated as n/m is accepted
    ],
)
@pytest.mark.parametrize("solver", ["device_default", "trsm", "scan"])
@pytest.mark.parametrize("scope", ["matrix", "row"])
def test_fused_matches_naive_column_loop(rows, cols, blocksize, sparsity, n, m, solver, scope, monkeypatch):
    # Both leaf solvers are exercised here, whichever the device would pick.
    if solver != "device_default":
        leaf_solve = sg._leaf_trsm if solver == "trsm" else sg._leaf_scan
        monkeypatch.setattr(sg, "_leaf_plan", lambda device, n, m: ((m if n else 16), leaf_solve))
    W, _, H = random_layer(rows, cols, tokens=4 * cols, seed=rows * cols + n, dead=(5, cols - 3))
    res = sparsegpt_prune(W, H, sparsity, n=n, m=m, blocksize=blocksize, scope=scope)
    W_ref, mask_ref, err_ref = naive_sparsegpt(W, H, sparsity, n=n, m=m, blocksize=blocksize, scope=scope)
    assert torch.equal(res.mask, mask_ref)
    assert rel(res.weight, W_ref) < 1e-4
    assert res.error == pytest.approx(err_ref, rel=1e-4)
    # Dead inputs end up zero.
    assert torch.all(res.weight[:, 5] == 0) and torch.all(res.weight[:, cols - 3] == 0)


def test_row_chunking_of_the_triangular_solves(monkeypatch):
    W, _, H = random_layer(37, 64, 256, seed=3)
    whole = sparsegpt_prune(W, H, 0.5, blocksize=64)
    monkeypatch.setattr(sg, "_SOLVE_CHUNK_BYTES", 5 * 16 * 16 * 4)  # 5 rows per chunk
    monkeypatch.setattr(sg, "_leaf_plan", lambda device, n, m: (16, sg._leaf_trsm))
    chunked = sparsegpt_prune(W, H, 0.5, blocksize=64)
    assert torch.equal(whole.mask, chunked.mask)
    assert rel(chunked.weight, whole.weight) < 1e-5


def test_error_is_the_exact_added_loss_for_the_dampened_hessian():
    W, _, H = random_layer(16, 64, 256, seed=11)
    percdamp = 0.01
    res = sparsegpt_prune(W, H, 0.5, blocksize=16, percdamp=percdamp)
    Hd = H.double() + percdamp * H.diagonal().double().mean() * torch.eye(64, dtype=torch.float64)
    delta = res.weight.double() - W.double()
    loss = float(torch.einsum("ri,ij,rj->", delta, Hd, delta))
    assert res.error == pytest.approx(loss, rel=1e-3)


def correlated_layer(seed=0, rows=64, cols=128, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, cols, generator=g)
    A = torch.randn(cols, cols, generator=g) / cols**0.5
    X = Z @ A + 0.05 * torch.randn(tokens, cols, generator=g)
    X[:, :4] *= 20.0  # a few high-variance channels, as in LLM activations
    W = torch.randn(rows, cols, generator=g)
    return W, X


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    W, X = correlated_layer()
    H = X.T @ X
    sq = (X**2).sum(0)

    def recon_error(W_pruned):
        return float(((X @ W.T - X @ W_pruned.T) ** 2).sum())

    def masked(scores):
        mask = unstructured_mask(scores, 0.5) if pattern == "unstructured" else nm_mask(scores, 2, 4)
        return W.masked_fill(mask, 0.0)

    nm = (2, 4) if pattern == "2:4" else (0, 0)
    res = sparsegpt_prune(W, H, 0.5 if pattern == "unstructured" else 0.0, n=nm[0], m=nm[1], blocksize=32)
    e_sgpt = recon_error(res.weight)
    e_wanda = recon_error(masked(wanda_scores(W, sq)))
    e_mag = recon_error(masked(magnitude_scores(W)))
    assert e_sgpt < 0.8 * e_wanda
    assert e_sgpt < 0.8 * e_mag


def test_sparsity_zero_returns_weights_unchanged():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        W, _, H = random_layer(8, 32, 64, seed=5, dead=(1,))
        W = W.to(dtype)
        res = sparsegpt_prune(W, H, 0.0)
        assert isinstance(res, SparseGPTResult)
        assert res.weight.dtype == dtype and torch.equal(res.weight, W)
        assert res.weight.data_ptr() != W.data_ptr()
        assert res.mask.dtype == torch.bool and not res.mask.any()
        assert res.error == 0.0


def test_mask_patterns_are_exact():
    W, _, H = random_layer(32, 128, 512, seed=9)
    for sparsity in (0.1, 0.5, 0.63):
        res = sparsegpt_prune(W, H, sparsity, blocksize=48, scope="row")
        assert torch.all(res.mask.sum(1) == math.floor(sparsity * 128))
        assert torch.all(res.weight[res.mask] == 0)
        # the paper's rule: floor(s * numel) of each block of the matrix, the rows free to differ
        res = sparsegpt_prune(W, H, sparsity, blocksize=48)
        for c in range(0, 128, 48):
            width = min(48, 128 - c)
            assert int(res.mask[:, c:c + width].sum()) == math.floor(32 * width * sparsity)
        assert len(set(res.mask.sum(1).tolist())) > 1
        assert torch.all(res.weight[res.mask] == 0)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        res = sparsegpt_prune(W, H, 0.0, n=n, m=m)
        groups = res.mask.reshape(32, 128 // m, m).sum(-1)
        assert torch.all(groups == n)
        assert torch.all(res.weight[res.mask] == 0)
        # Kept weights were updated, not just copied.
        assert not torch.allclose(res.weight[~res.mask], W[~res.mask])


def test_input_dtype_is_preserved_and_input_untouched():
    W, _, H = random_layer(16, 64, 256, seed=2)
    W16 = W.to(torch.bfloat16)
    W16_before, H_before = W16.clone(), H.clone()
    res = sparsegpt_prune(W16, H, 0.5, blocksize=32)
    ref = sparsegpt_prune(W16.float(), H, 0.5, blocksize=32)
    assert res.weight.dtype == torch.bfloat16
    assert torch.equal(W16, W16_before) and torch.equal(H, H_before)
    assert torch.equal(res.mask, ref.mask)
    assert torch.equal(res.weight, ref.weight.to(torch.bfloat16))


def test_stacked_layers_prune_like_separate_ones():
    # q/k/v share an input: stacking their rows (with row_groups saying where each matrix ends) must not change
    # any row's result, whether the mask is chosen per matrix block, per row or N:M.
    W, _, H = random_layer(48, 64, 256, seed=4)
    parts = (W[:8] * 10.0, W[8:24], W[24:] * 0.1)
    for kw in ({"sparsity": 0.5}, {"sparsity": 0.7}, {"sparsity": 0.5, "scope": "row"}, {"sparsity": 0.0, "n": 2, "m": 4}):
        stacked = sparsegpt_prune(torch.cat(parts), H, blocksize=32, row_groups=[8, 16, 24], **kw)
        separate = [sparsegpt_prune(p, H, blocksize=32, **kw) for p in parts]
        assert torch.equal(stacked.mask, torch.cat([s.mask for s in separate]))
        for got, s in zip(stacked.weight.split([8, 16, 24]), separate):
            assert rel(got, s.weight) < 1e-5
        assert stacked.error == pytest.approx(sum(s.error for s in separate), rel=1e-4)


@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"sparsity": 0.0, "n": 2, "m": 4}])
def test_a_stack_of_matrices_matches_the_column_loop_with_a_threshold_per_matrix(kw):
    # q/k/v-like: three matrices of different scales sharing one Hessian, pruned as one stack.
    W, _, H = random_layer(40, 96, 384, seed=12)
    stack = torch.cat([W[:8] * 4.0, W[8:16], W[16:] * 0.25])
    res = sparsegpt_prune(stack, H, blocksize=32, row_groups=[8, 8, 24], **kw)
    W_ref, mask_ref, err_ref = naive_sparsegpt(stack, H, blocksize=32, row_groups=[8, 8, 24], **kw)
    assert torch.equal(res.mask, mask_ref)
    assert rel(res.weight, W_ref) < 1e-4
    assert res.error == pytest.approx(err_ref, rel=1e-4)
    if not kw.get("n"):
        # one threshold over the whole stack would take most weights from the small matrix; per matrix, each
        # loses its own share
        for lo, hi in ((0, 8), (8, 16), (16, 40)):
            assert int(res.mask[lo:hi].sum()) == sum(math.floor((hi - lo) * 32 * kw["sparsity"]) for _ in range(3))


def test_bad_arguments_raise_value_error():
    W, _, H = random_layer(8, 32, 64, seed=1)
    bad = [
        dict(weight=W[0], hessian=H, sparsity=0.5),
        dict(weight=W.int(), hessian=H, sparsity=0.5),
        dict(weight=W, hessian=H[:16, :16], sparsity=0.5),
        dict(weight=W, hessian=H, sparsity=1.0),
        dict(weight=W, hessian=H, sparsity=-0.1),
        dict(weight=W, hessian=H, sparsity=float("nan")),
        dict(weight=W, hessian=H, sparsity=0.0, n=4, m=4),
        dict(weight=W, hessian=H, sparsity=0.0, n=2, m=0),
        dict(weight=W, hessian=H, sparsity=0.0, n=0, m=4),
        dict(weight=W, hessian=H, sparsity=0.0, n=2, m=5),  # 32 % 5 != 0
        dict(weight=W, hessian=H, sparsity=0.3, n=2, m=4),  # conflicts with 2:4
        dict(weight=W, hessian=H, sparsity=0.5, blocksize=0),
        dict(weight=W, hessian=H, sparsity=0.5, percdamp=-1.0),
        dict(weight=W, hessian=-torch.eye(32), sparsity=0.5, percdamp=0.0),  # not positive definite
        dict(weight=W, hessian=H * float("nan"), sparsity=0.5),
        dict(weight=W, hessian=H, sparsity=0.5, scope="column"),
        dict(weight=W, hessian=H, sparsity=0.5, row_groups=[4, 3]),  # 7 rows of 8
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            sparsegpt_prune(**kwargs)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"sparsity": 0.0, "n": 2, "m": 4}])
def test_cuda_matches_naive_reference(kw):
    # Ragged: 4 full blocks (the N:M ones replayed as a CUDA graph) and a 32-column tail.
    W, _, H = random_layer(96, 288, 1024, seed=8, dead=(7,))
    res = sparsegpt_prune(W.cuda(), H.cuda(), blocksize=64, **kw)
    W_ref, mask_ref, err_ref = naive_sparsegpt(W, H, blocksize=64, **kw)
    assert res.weight.device.type == "cuda" and res.mask.device.type == "cuda"
    assert torch.equal(res.mask.cpu(), mask_ref)
    assert rel(res.weight.cpu(), W_ref) < 1e-4
    assert res.error == pytest.approx(err_ref, rel=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_matches_eager(monkeypatch):
    W, _, H = random_layer(200, 512, 2048, seed=12)
    W, H = W.cuda(), H.cuda()
    for n, m in ((2, 4), (4, 8)):
        graphed = sparsegpt_prune(W, H, 0.0, n=n, m=m, blocksize=64)
        monkeypatch.setattr(sg, "_USE_CUDA_GRAPHS", False)
        eager = sparsegpt_prune(W, H, 0.0, n=n, m=m, blocksize=64)
        monkeypatch.setattr(sg, "_USE_CUDA_GRAPHS", True)
        assert torch.equal(graphed.mask, eager.mask)
        assert rel(graphed.weight, eager.weight) < 1e-6


@pytest.mark.gpu
@needs_cuda
def test_cuda_half_weights_keep_their_dtype():
    W, _, H = random_layer(64, 256, 1024, seed=13)
    for kw in ({"sparsity": 0.5}, {"sparsity": 0.0, "n": 2, "m": 4}):
        res = sparsegpt_prune(W.cuda().half(), H.cuda(), **kw)
        ref = sparsegpt_prune(W.half().float(), H, **kw)
        assert res.weight.dtype == torch.float16 and res.weight.device.type == "cuda"
        assert (res.mask.cpu() != ref.mask).float().mean() < 1e-3
        assert torch.all(res.weight[res.mask] == 0)

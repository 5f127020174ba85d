"""SparseGPT (Frantar & Alistarh, 2023): prune one weight matrix and update the
weights it keeps so the layer's output on the calibration inputs changes little.

The column sweep of the paper is done without a Python loop over columns: with
the mask of a run of columns fixed, the sequential error propagation inside it
is, per row, a unit lower-triangular system. Each block of ``blocksize``
columns is split recursively; the leaves are solved per row (batched triangular
solves on GPUs, a short forward substitution on CPUs) and the coupling between
halves is one shared matrix product, the same lazy batching the paper applies
between blocks. N:M blocks on CUDA are replayed as a captured CUDA graph.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .masks import check_nm, lowest_k_mask

__all__ = ["SparseGPTResult", "sparsegpt_prune"]

# Widest run of columns solved directly for unstructured sparsity; wider runs are
# split, trading per-row (rows x L x L) scratch (GPU) or per-column steps (CPU)
# for shared matrix products.
_LEAF = 64
_LEAF_CPU = 16
# Replay N:M block sweeps as CUDA graphs (see _GraphedNMBlock).
_USE_CUDA_GRAPHS = True
# Bound on the per-row system scratch (rows * L * L float32) solved at once.
_SOLVE_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class SparseGPTResult:
    """``weight``: the pruned and updated matrix (input dtype and device).
    ``mask``: bool, True = pruned. ``error``: the algorithm's own estimate of the
    added squared output error, sum over pruned weights of w^2 / [H^-1]_jj
    (conditional on the columns still free), in the Hessian's units and for the
    dampened Hessian."""

    weight: torch.Tensor
    mask: torch.Tensor
    error: float


def _check_args(weight, hessian, sparsity, n, m, blocksize, percdamp):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D (out_features, in_features) tensor")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    cols = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (cols, cols):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be a ({cols}, {cols}) tensor to match weight {tuple(weight.shape)}, got {shape}")
    if not hessian.is_floating_point():
        raise ValueError(f"hessian must be a floating-point tensor, got {hessian.dtype}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    sparsity = float(sparsity)
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, numbers.Integral) or not isinstance(m, numbers.Integral):
        raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
    n, m = int(n), int(m)
    if (n, m) != (0, 0):
        n, m = check_nm(n, m, cols)
        # The pattern fixes the sparsity; accept it restated, refuse a conflicting one.
        if sparsity != 0.0 and not math.isclose(sparsity, n / m, abs_tol=1e-9):
            raise ValueError(f"sparsity={sparsity} conflicts with the {n}:{m} pattern; pass sparsity=0 or {n / m}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real) or not (0.0 <= float(percdamp) < math.inf):
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    return sparsity, n, m, int(blocksize), float(percdamp)


def _inverse_hessian_factor(H: torch.Tensor, W: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of the dampened H^-1 (U^T U = H^-1), and the dead-input flags.

    Modifies H and zeroes W's dead columns.
    """
    diag = H.diagonal()
    dead = diag == 0
    # An input that is always zero cannot affect the output: make H invertible there and
    # zero the column (the OBS updates never touch it, as its H row and column are zero).
    diag.masked_fill_(dead, 1.0)
    W.masked_fill_(dead[None, :], 0.0)
    diag.add_(percdamp * diag.mean())
    # With J the index reversal, J chol(J H J) J = R is upper triangular with H = R R^T, so
    # R^-1 is the upper Cholesky factor of H^-1: one factorisation and one triangular
    # inverse instead of cholesky, cholesky_inverse and a second cholesky.
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if bool(info != 0):
        raise ValueError(
            f"the Hessian is not positive definite after dampening (percdamp={percdamp}); "
            "increase percdamp or use more calibration tokens"
        )
    R = L.flip(0, 1)
    del L
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve_triangular(R, eye, upper=True), dead


def _leaf_trsm(cur: torch.Tensor, err: torch.Tensor, pruned: torch.Tensor, U: torch.Tensor, invd: torch.Tensor) -> None:
    """Prune ``pruned`` in the run of columns ``cur`` (updated in place), writing the OBS errors to ``err``.

    Row r's errors satisfy e_j = p_j / d_j * (w_j - sum_{i<j} e_i U_ij): a unit
    lower-triangular system (I + diag(p/d) U_s^T) e = diag(p/d) w, solved for all
    rows as one batched triangular solve (few kernels; suits GPUs).
    """
    rows, width = cur.shape
    scale = torch.where(pruned, invd, 0.0)
    rhs = cur * scale
    lower = U.t()  # its diagonal is ignored (unitriangular) and its upper part is zero
    chunk = max(1, _SOLVE_CHUNK_BYTES // (width * width * 4))
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        system = lower * scale[r0:r1, :, None]
        sol = torch.linalg.solve_triangular(system, rhs[r0:r1, :, None], upper=False, unitriangular=True)
        err[r0:r1] = sol.squeeze(2)
    # Kept columns take the updates of earlier pruned ones; the diagonal term makes the
    # pruned ones ~0, and the fill makes them exact.
    cur.addmm_(err, U, alpha=-1.0)
    cur.masked_fill_(pruned, 0.0)


def _leaf_scan(cur: torch.Tensor, err: torch.Tensor, pruned: torch.Tensor, U: torch.Tensor, invd: torch.Tensor) -> None:
    """Same contract as ``_leaf_trsm``, by forward substitution over the (few) columns,
    vectorised over rows: cheaper on CPUs, where batched small solves are slow."""
    width = cur.shape[1]
    scale = torch.where(pruned, invd, 0.0)
    for j in range(width):
        e = err[:, j]
        torch.mul(cur[:, j], scale[:, j], out=e)
        if j + 1 < width:
            cur[:, j + 1 :].addr_(e, U[j, j + 1 :], alpha=-1.0)
    cur.masked_fill_(pruned, 0.0)


def _leaf_plan(device: torch.device, n: int, m: int) -> tuple[int, Callable]:
    """Leaf width and solver for a device: GPUs pay per kernel, CPUs per small solve."""
    if device.type == "cpu":
        return (m if n else _LEAF_CPU), _leaf_scan
    return (m if n else _LEAF), _leaf_trsm


def _sweep(W1, E1, M1, U, invd, lo, hi, leaf, solve, n):
    """Process columns [lo, hi) of a block; n > 0 chooses each leaf's n:leaf mask on arrival."""
    if hi - lo <= leaf:
        cur, pruned = W1[:, lo:hi], M1[:, lo:hi]
        if n:
            # N:M: the group's mask comes from its current (already updated) weights.
            idx = torch.argsort((cur * invd[lo:hi]).abs(), dim=1, stable=True)[:, :n]
            pruned.scatter_(1, idx, True)
        solve(cur, E1[:, lo:hi], pruned, U[lo:hi, lo:hi], invd[lo:hi])
        return
    mid = lo + leaf * math.ceil((hi - lo) / (2 * leaf))
    _sweep(W1, E1, M1, U, invd, lo, mid, leaf, solve, n)
    # The left half's errors reach the right half in one shared product.
    W1[:, mid:hi].addmm_(E1[:, lo:mid], U[lo:mid, mid:hi], alpha=-1.0)
    _sweep(W1, E1, M1, U, invd, mid, hi, leaf, solve, n)


class _GraphedNMBlock:
    """One full-width N:M block sweep, captured once as a CUDA graph and replayed.

    N:M must choose each group's mask before the next group moves, so a block is
    hundreds of tiny kernels; replaying them as one graph removes the launch cost
    that otherwise dominates on GPUs (about 7x per block on an H100).
    """

    def __init__(self, rows: int, width: int, n: int, leaf: int, solve: Callable, device: torch.device):
        self.W1 = torch.zeros(rows, width, dtype=torch.float32, device=device)
        self.E1 = torch.zeros_like(self.W1)
        self.M1 = torch.zeros(rows, width, dtype=torch.bool, device=device)
        self.U = torch.eye(width, dtype=torch.float32, device=device)
        self.invd = torch.ones(width, dtype=torch.float32, device=device)
        self.args = (width, leaf, solve, n)
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False

    def _step(self) -> None:
        width, leaf, solve, n = self.args
        torch.reciprocal(self.U.diagonal(), out=self.invd)
        self.M1.zero_()
        _sweep(self.W1, self.E1, self.M1, self.U, self.invd, 0, width, leaf, solve, n)

    def run(self, W_block: torch.Tensor, U_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sweep one block; returns (weights, errors, mask) in buffers reused by the next call."""
        # Streams, capture and replay act on the current device, which may not be the weight's.
        with torch.cuda.device(self.device):
            self._run(W_block, U_block)
        return self.W1, self.E1, self.M1

    def _run(self, W_block: torch.Tensor, U_block: torch.Tensor) -> None:
        self.W1.copy_(W_block)
        self.U.copy_(U_block)
        if self.graph is not None:
            self.graph.replay()
        elif self.failed:
            self._step()
        else:
            # Capture needs a warm-up on a side stream; it is this block's real work.
            # Capturing records kernels without running them, so the results stay.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            try:
                # Not torch.cuda.graph(): it runs gc.collect() and empty_cache() on entry,
                # costly in a process that holds a model.
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.stream(side):
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        self._step()
                    finally:
                        graph.capture_end()
                self.graph = graph
            except RuntimeError:
                self.failed = True  # keep going eagerly; the warm-up results are intact


def _row_segments(rows: int, scope: str, row_groups: Sequence[int] | None) -> list[tuple[int, int]] | None:
    """The row ranges whose blocks compete as one (scope "matrix"), or None (scope "row")."""
    if scope not in ("matrix", "row"):
        raise ValueError(f"scope must be 'matrix' or 'row', got {scope!r}")
    if scope == "row":
        return None
    groups = [rows] if row_groups is None else [int(g) for g in row_groups]
    if any(g < 1 for g in groups) or sum(groups) != rows:
        raise ValueError(f"row_groups {list(groups)} must be positive and sum to the weight's {rows} rows")
    ends = list(itertools.accumulate(groups))
    return list(zip([0] + ends[:-1], ends))


def _choose_block_mask(W1, M1, invd, sparsity, i1, i2, segments) -> bool:
    """Mark the pruned weights of block [i1, i2) in ``M1``; False when the block loses none."""
    scores = (W1 * invd).abs()  # orders like w^2 / d^2
    if segments is None:
        # Cumulative counts make every row's total exactly floor(sparsity * cols).
        k = int(sparsity * i2) - int(sparsity * i1)
        M1 |= lowest_k_mask(scores, k)
        return k > 0
    width, chosen = i2 - i1, False
    for r0, r1 in segments:  # each matrix's block: its floor(numel * sparsity) lowest scores, row-major ties
        k = int((r1 - r0) * width * sparsity)
        M1[r0:r1] |= lowest_k_mask(scores[r0:r1].reshape(1, -1), k).view(r1 - r0, width)
        chosen = chosen or k > 0
    return chosen


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    scope: str = "matrix",
    row_groups: Sequence[int] | None = None,
) -> SparseGPTResult:
    """Prune ``weight`` (out_features, in_features) with SparseGPT.

    ``hessian``: X^T X over the calibration tokens, (in_features, in_features),
    any positive scale; it is copied to the weight's device, never modified.
    Unstructured (n=m=0): the mask is chosen block by block from the scores
    w^2 / [Hinv]_jj^2 at the block's start. scope="matrix" (the paper's rule,
    the default): the floor(sparsity * rows * width) lowest scores of the whole
    block of each weight matrix, so rows may differ; ``row_groups`` (row counts
    summing to out_features) says where one matrix ends and the next begins
    when several that share an input are stacked, and each gets its own count.
    scope="row": per row, floor(s*end) - floor(s*start) of the block's columns,
    so every row ends at exactly floor(sparsity * in_features). Ties: the lower
    position (row-major within a block) is pruned first.
    N:M (0 < n < m, in_features % m == 0): n of every m consecutive inputs per
    row; ``sparsity`` must then be 0 or n/m. A blocksize that is not a multiple
    of m is rounded down to one (at least m).
    Rows are independent given the Hessian, so rows of several layers sharing
    an input can be stacked and pruned at once.
    Computes in float32 on the weight's device (TF32 matmuls too, if the caller
    enabled them globally); returns the weight in its own dtype and a new mask
    on that device; the inputs are not modified. Scratch memory: a float32 copy
    of the weight (rows*cols*4 bytes), about 4 float32 (cols x cols) matrices
    while factorising the Hessian, and at most ~256 MB of per-row systems.
    With H = X^T X summed over tokens, ``error`` is the added squared output
    error sum ||X W^T - X W'^T||^2 for the dampened Hessian.
    sparsity=0 without N:M returns an unchanged copy and an all-False mask.
    Raises ValueError on bad arguments, non-finite inputs, or a Hessian that
    stays singular after dampening.
    """
    sparsity, n, m, blocksize, percdamp = _check_args(weight, hessian, sparsity, n, m, blocksize, percdamp)
    rows, cols = weight.shape
    segments = _row_segments(rows, scope, row_groups)
    device = weight.device
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    if n == 0 and sparsity == 0.0:
        return SparseGPTResult(weight.detach().clone(), mask, 0.0)
    if not bool(torch.isfinite(weight).all()) or not bool(torch.isfinite(hessian).all()):
        raise ValueError("weight and hessian must be finite (found NaN or Inf)")

    W = weight.detach().to(dtype=torch.float32, copy=True)
    H = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    Hinv, dead = _inverse_hessian_factor(H, W, percdamp)
    del H

    if n:
        blocksize = max(m, blocksize - blocksize % m)
    leaf, solve = _leaf_plan(device, n, m)
    graphed = None
    if n and _USE_CUDA_GRAPHS and device.type == "cuda" and cols // blocksize >= 3:
        if not torch.cuda.is_current_stream_capturing():
            graphed = _GraphedNMBlock(rows, blocksize, n, leaf, solve, device)
    error = torch.zeros((), dtype=torch.float32, device=device)
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        W1, M1 = W[:, i1:i2], mask[:, i1:i2]
        U = Hinv[i1:i2, i1:i2]
        if graphed is not None and i2 - i1 == blocksize:
            W1_new, E1, M1_new = graphed.run(W1, U)
            W1.copy_(W1_new)
            M1.copy_(M1_new)
        else:
            invd = U.diagonal().reciprocal()
            if not n and not _choose_block_mask(W1, M1, invd, sparsity, i1, i2, segments):
                continue  # nothing pruned in this block: it stays as it is
            E1 = torch.zeros(rows, i2 - i1, dtype=torch.float32, device=device)
            _sweep(W1, E1, M1, U, invd, 0, i2 - i1, leaf, solve, n)
        error += E1.square().sum()
        if i2 < cols:
            # Lazy batch update: this block's errors reach all later columns at once.
            W[:, i2:].addmm_(E1, Hinv[i1:i2, i2:], alpha=-1.0)
    W.masked_fill_(dead[None, :], 0.0)  # guard against rounding leaking into dead columns
    return SparseGPTResult(W.to(weight.dtype), mask, float(error))

"""Weight quantizers: the scheme's arithmetic, round to nearest, and GPTQ's column sweep.

The arithmetic is compressed-tensors' (``workbench.quantization.export`` writes
its formats with its own compressors): signed integer codes in
[-2^(b-1), 2^(b-1) - 1]; a symmetric scale is max|w| / ((2^b - 1) / 2) with
zero point 0, an asymmetric one (max - min) / (2^b - 1) with an integer zero
point, both over a range that includes 0; FP8 (E4M3) codes are the scaled
weights cast to ``float8_e4m3fn`` with scale max|w| / 448. Codes round half to
even. A weight's dequantized value is ``(code - zero) * scale``, computed in
float32 from a scale already rounded to ``scale_dtype`` (the dtype the export
stores it in), so the weights evaluated in memory are the ones the export
decodes to (exactly, when the model runs in that dtype).

Weights that are zero before quantization (pruned) keep a code that
dequantizes to exactly zero, so sparsity and N:M patterns survive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workbench.pruning.sparsegpt import _choose_block_mask, _inverse_hessian_factor, _row_segments

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


@dataclass(frozen=True)
class QuantArgs:
    """How one weight matrix is quantized: ``kind`` int (``bits``) or fp8; per output channel (``group_size`` 0) or in groups."""

    bits: int = 4
    kind: str = "int"
    symmetric: bool = True
    group_size: int = 0

    @property
    def qmin(self) -> float:
        return -FP8_MAX if self.kind == "fp8" else -(2.0 ** (self.bits - 1))

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.kind == "fp8" else 2.0 ** (self.bits - 1) - 1

    @property
    def code_bits(self) -> int:
        return 8 if self.kind == "fp8" else self.bits

    def group(self, cols: int) -> int:
        return self.group_size if (self.group_size and self.kind == "int") else cols

    def check(self, cols: int, name: str = "weight") -> None:
        if self.kind not in ("int", "fp8"):
            raise ValueError(f"kind must be 'int' or 'fp8', got {self.kind!r}")
        if self.kind == "int" and self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.kind == "fp8" and not fp8_available():
            raise ValueError("this torch has no float8_e4m3fn dtype")
        if self.kind == "int" and self.group_size and cols % self.group_size:
            raise ValueError(f"{name} has {cols} input features, not a multiple of the group size {self.group_size}")


def fp8_available() -> bool:
    return hasattr(torch, "float8_e4m3fn")


@dataclass
class Quantized:
    """One quantized matrix: ``weight`` the dequantized values (float32), ``codes`` (int8, or float8_e4m3fn for FP8),
    ``scale`` and ``zero`` per (row, group) (``zero`` None when symmetric), ``mask`` the weights forced to zero."""

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    mask: torch.Tensor


def qparams(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32, the zero integer-valued) of each row of ``w`` (rows, inputs in the group).

    The scale is rounded to ``scale_dtype``; a zero scale (an all-zero row) becomes that dtype's eps.
    """
    w = w.float()
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
    span = args.qmax - args.qmin
    if args.symmetric or args.kind == "fp8":
        scale = torch.maximum(-lo, hi) / (span / 2)
    else:
        scale = (hi - lo) / span
    scale = scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale_dtype).eps, dtype=scale_dtype, device=scale.device), scale)
    scale = scale.float()
    if args.symmetric or args.kind == "fp8":
        zero = torch.zeros_like(scale)
    else:
        zero = torch.round(args.qmin - lo / scale).clamp(args.qmin, args.qmax)
    return scale, zero


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The codes (float32 values) of ``w`` for broadcastable ``scale`` and ``zero``."""
    x = w / scale
    if args.kind == "fp8":
        return x.clamp(args.qmin, args.qmax).to(torch.float8_e4m3fn).float()
    return torch.round(x + zero).clamp(args.qmin, args.qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero) * scale


def _expand(per_group: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, groups) -> (rows, groups * group): each group's value repeated over its inputs."""
    return per_group.repeat_interleave(group, dim=1)


def _finish(W: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, mask: torch.Tensor,
            args: QuantArgs, scale_dtype: torch.dtype) -> Quantized:
    stored = codes.to(torch.float8_e4m3fn) if args.kind == "fp8" else codes.to(torch.int8)
    keep_zero = None if (args.symmetric or args.kind == "fp8") else zero.to(torch.int8)
    return Quantized(weight=W, codes=stored, scale=scale.to(scale_dtype), zero=keep_zero, mask=mask)


@torch.no_grad()
def rtn(weight: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype = torch.bfloat16, keep_zero: bool = True) -> Quantized:
    """Round to nearest: every group's scale from its own weights, no calibration data.

    ``keep_zero``: weights that are exactly zero stay zero (their code is the zero point).
    """
    rows, cols = weight.shape
    args.check(cols)
    W = weight.detach().float()
    g = args.group(cols)
    scale, zero = qparams(W.reshape(rows * (cols // g), g), args, scale_dtype)
    scale, zero = scale.view(rows, cols // g), zero.view(rows, cols // g)
    s, z = _expand(scale, g), _expand(zero, g)
    codes = codes_of(W, s, z, args)
    mask = (W == 0) if keep_zero else torch.zeros_like(W, dtype=torch.bool)
    codes = torch.where(mask, z, codes)
    return _finish(dequantize(codes, s, z), codes, scale, zero, mask, args, scale_dtype)


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype = torch.bfloat16, *,
         blocksize: int = 128, percdamp: float = 0.01, actorder: bool = False, static_groups: bool = False,
         keep_zero: bool = True, sparsity: float = 0.0, n: int = 0, m: int = 0,
         row_groups: Sequence[int] | None = None) -> Quantized:
    """GPTQ (Frantar et al., 2023): quantize column by column, spreading each column's error over the columns not yet
    quantized through the upper Cholesky factor of the dampened inverse Hessian, with lazy batch updates every
    ``blocksize`` columns.

    ``hessian``: X^T X of the matrix's inputs (any positive scale). Group scales are found when the sweep reaches
    the group's first input, from the weights as updated so far (the reference's rule); ``static_groups`` (and
    ``actorder`` with groups) finds them all from the original weights first. ``actorder``: columns in order of
    decreasing Hessian diagonal. ``keep_zero``: weights already zero stay zero. ``sparsity`` / ``n:m``: also prune in
    the same sweep, the mask chosen block by block as SparseGPT chooses it (the floor(s x rows x width) lowest
    w^2 / [H^-1]_jj^2 of each block of each matrix, ``row_groups`` separating stacked matrices), or n of every m
    inputs per row from the current weights. Computes in float32 on the weight's device.
    """
    rows, cols = weight.shape
    args.check(cols)
    if n:
        blocksize = max(m, blocksize - blocksize % m)
    g = args.group(cols)
    W = weight.detach().to(torch.float32, copy=True)
    H = hessian.detach().to(device=W.device, dtype=torch.float32, copy=True)
    fixed = (W == 0) if keep_zero else torch.zeros_like(W, dtype=torch.bool)
    scale = torch.zeros(rows, cols // g, device=W.device)
    zero = torch.zeros_like(scale)
    upfront = static_groups or actorder or g == cols
    if upfront:  # per channel: one scale per row from the whole matrix; static groups: each group's from the original
        s, z = qparams(W.reshape(rows * (cols // g), g), args, scale_dtype)
        scale.copy_(s.view(rows, -1))
        zero.copy_(z.view(rows, -1))
    perm = None
    if actorder:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H, fixed = W[:, perm], H[perm][:, perm], fixed[:, perm]
    # each position's group, as plain ints: a column's scale is then a view, not an indexing kernel
    group_of = [c // g for c in (perm.tolist() if perm is not None else range(cols))]
    U, _dead = _inverse_hessian_factor(H, W, percdamp)
    del H
    segments = _row_segments(rows, "matrix", row_groups) if sparsity and not n else None
    codes = torch.zeros_like(W)
    mask = fixed.clone()
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        M1 = mask[:, i1:i2]
        if segments is not None:
            _choose_block_mask(W1, M1, U1.diagonal().reciprocal(), sparsity, i1, i2, segments)
        for i in range(i2 - i1):
            col = i1 + i
            if not upfront and col % g == 0:
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                s, z = qparams(ahead, args, scale_dtype)
                scale[:, col // g], zero[:, col // g] = s, z
            if n and i % m == 0:
                d = U1.diagonal()[i:i + m]
                idx = torch.argsort((W1[:, i:i + m] / d).abs(), dim=1, stable=True)[:, :n]
                M1[:, i:i + m].scatter_(1, idx, True)
            w = W1[:, i]
            s, z = scale[:, group_of[col]], zero[:, group_of[col]]
            c = torch.where(M1[:, i], z, codes_of(w, s, z, args))
            q = dequantize(c, s, z)
            codes[:, col] = c
            err = (w - q) / U1[i, i]
            if i + 1 < i2 - i1:
                W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1.0)
            W1[:, i] = q
            E1[:, i] = err
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    if perm is not None:
        inverse = torch.argsort(perm)
        W, codes, mask = W[:, inverse], codes[:, inverse], mask[:, inverse]
    s, z = _expand(scale, g), _expand(zero, g)
    return _finish(dequantize(codes, s, z), codes, scale, zero, mask, args, scale_dtype)


def output_error(original: torch.Tensor, changed: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """The relative change of the matrix's outputs on the calibration inputs, tr(dW H dW^T) / tr(W H W^T);
    without a Hessian, the relative change of the weights, ||dW||^2 / ||W||^2."""
    W = original.float()
    D = changed.float() - W
    if hessian is None:
        den = float(W.square().sum())
        return float(D.square().sum()) / den if den else 0.0
    H = hessian.float()
    den = float(((W @ H) * W).sum())
    return float(((D @ H) * D).sum()) / den if den else 0.0


def bits_per_weight(args: QuantArgs, cols: int, scale_bits: int = 16) -> float:
    """Stored bits per weight: the code, plus each group's scale (and packed zero point when asymmetric)."""
    g = args.group(cols)
    extra = scale_bits + (args.bits if not args.symmetric and args.kind == "int" else 0)
    return args.code_bits + extra / g


__all__ = ["QuantArgs", "Quantized", "qparams", "codes_of", "dequantize", "rtn", "gptq", "output_error", "bits_per_weight",
           "fp8_available", "FP8_MAX"]

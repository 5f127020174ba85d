"""The quantizers against their definitions: RTN's half step, GPTQ against a plain column-by-column implementation
of the algorithm, sparsity kept, and codes that compressed-tensors' own decompressors decode exactly."""

from __future__ import annotations

import pytest
import torch

from workbench.quantization.quantizer import QuantArgs, gptq, output_error, rtn

SCHEMES = [QuantArgs(4, "int", True, 0), QuantArgs(4, "int", True, 16), QuantArgs(4, "int", False, 16),
           QuantArgs(8, "int", True, 32), QuantArgs(8, "int", False, 0)]


def _weights(rows=24, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05


def _hessian(cols=64, tokens=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)  # correlated inputs
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, 3] *= 8.0  # an outlier channel
    return x.t() @ x


@pytest.mark.parametrize("args", SCHEMES, ids=lambda a: f"{a.bits}b-{'sym' if a.symmetric else 'asym'}-g{a.group_size}")
def test_rtn_is_within_half_a_step(args):
    w = _weights()
    q = rtn(w, args, torch.float32)
    g = args.group(w.shape[1])
    step = q.scale.float().repeat_interleave(g, dim=1)
    assert torch.all((q.weight - w).abs() <= step * (0.5 + 1e-4))  # float32 rounding of w / scale near the range end
    # the codes are integers in the signed range and decode to the weights
    assert int(q.codes.min()) >= -(2 ** (args.bits - 1)) and int(q.codes.max()) <= 2 ** (args.bits - 1) - 1
    zero = q.zero.float().repeat_interleave(g, dim=1) if q.zero is not None else 0.0
    assert torch.equal((q.codes.float() - zero) * step, q.weight)
    # the range holds every weight: the extremes are codes of the range (no clipping beyond half a step)
    assert len(torch.unique(q.codes)) > 2 ** args.bits // 2


def test_rtn_fp8_matches_the_e4m3_cast():
    w = _weights()
    q = rtn(w, QuantArgs(8, "fp8"), torch.float32)
    scale = w.abs().amax(dim=1) / 448.0
    expected = (w / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None]
    assert torch.allclose(q.weight, expected, rtol=0, atol=1e-7)
    assert q.codes.dtype == torch.float8_e4m3fn


def _reference_gptq(W, H, args, percdamp=0.01, actorder=False):
    """GPTQ as the paper states it, one column at a time, no lazy blocks: quantize column j, divide its error by
    [H^-1]_jj of the Cholesky factor, subtract it times the factor's row from every later column."""
    W = W.clone()  # float32, as the weights are quantized (a tie at x.5 must round the same way)
    H = H.clone().double()
    cols = W.shape[1]
    g = args.group(cols)
    lo_q, hi_q = -(2 ** (args.bits - 1)), 2 ** (args.bits - 1) - 1

    def params(block):
        lo = block.min(dim=1).values.clamp(max=0)
        hi = block.max(dim=1).values.clamp(min=0)
        if args.symmetric:
            s = torch.maximum(-lo, hi) / ((hi_q - lo_q) / 2)
            return s, torch.zeros_like(s)
        s = (hi - lo) / (hi_q - lo_q)
        return s, torch.round(lo_q - lo / s).clamp(lo_q, hi_q)

    perm = torch.argsort(torch.diag(H).float(), descending=True, stable=True) if actorder else torch.arange(cols)
    static = {}
    if actorder or g == cols:
        for k in range(cols // g):
            static[k] = params(W[:, k * g:(k + 1) * g])
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    current = {}
    for j in range(cols):
        orig = int(perm[j])
        k = orig // g
        if static:
            s, z = static[k]
        else:
            if orig % g == 0:
                current[k] = params(W[:, j:j + g])
            s, z = current[k]
        q = (torch.clamp(torch.round(W[:, j] / s + z), lo_q, hi_q) - z) * s
        Q[:, j] = q
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("args,actorder", [(QuantArgs(4, "int", True, 0), False), (QuantArgs(4, "int", True, 16), False),
                                           (QuantArgs(4, "int", False, 16), False), (QuantArgs(4, "int", True, 16), True),
                                           (QuantArgs(8, "int", True, 0), True)],
                         ids=["channel", "g16", "g16-asym", "g16-actorder", "8bit-channel-actorder"])
def test_gptq_equals_the_column_by_column_algorithm(args, actorder):
    W, H = _weights(), _hessian()
    ours = gptq(W, H, args, torch.float32, blocksize=16, actorder=actorder)
    ref = _reference_gptq(W, H, args, actorder=actorder)
    g = args.group(W.shape[1])
    step = ours.scale.float().repeat_interleave(g, dim=1)
    assert int(((ours.weight - ref).abs() > 1e-3 * step).sum()) == 0  # the same code for every weight
    assert torch.allclose(ours.weight, ref, rtol=0, atol=1e-6)


def test_gptq_beats_rtn_on_the_outputs():
    W, H = _weights(64, 128), _hessian(128)
    for args in (QuantArgs(4, "int", True, 0), QuantArgs(4, "int", True, 32)):
        e_gptq = output_error(W, gptq(W, H, args, torch.float32).weight, H)
        e_rtn = output_error(W, rtn(W, args, torch.float32).weight, H)
        assert e_gptq < 0.8 * e_rtn, (args, e_gptq, e_rtn)


def test_gptq_keeps_a_pruned_matrix_exactly_as_sparse():
    W, H = _weights(32, 64), _hessian()
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask.view(-1, 4)[:, :2] = True  # 2:4, pruned earlier
    W = W.masked_fill(mask, 0.0)
    for args in (QuantArgs(4, "int", True, 16), QuantArgs(4, "int", False, 16), QuantArgs(8, "fp8")):
        q = gptq(W, H, args, torch.float32)
        assert torch.all(q.weight[mask] == 0)
        assert torch.equal(q.mask, mask)
        kept = q.weight.view(-1, 4)
        assert torch.all((kept != 0).sum(dim=1) <= 2)  # the 2:4 pattern is still valid


def test_joint_sweep_prunes_at_the_pattern_and_the_count():
    W, H = _weights(32, 64), _hessian()
    args = QuantArgs(4, "int", True, 16)
    nm = gptq(W, H, args, torch.float32, n=2, m=4)
    groups = nm.mask.view(-1, 4)
    assert torch.all(groups.sum(dim=1) == 2) and torch.all(nm.weight[nm.mask] == 0)
    un = gptq(W, H, args, torch.float32, sparsity=0.5, blocksize=16)
    # SparseGPT's block rule: floor(0.5 x rows x 16) of every 16-column block of the matrix
    for b in range(4):
        assert int(un.mask[:, b * 16:(b + 1) * 16].sum()) == 32 * 16 // 2
    assert torch.all(un.weight[un.mask] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("args", SCHEMES + [QuantArgs(8, "fp8")],
                         ids=lambda a: f"{a.kind}{a.bits}-{'sym' if a.symmetric else 'asym'}-g{a.group_size}")
def test_compressed_tensors_decodes_to_the_evaluated_weights(args, dtype):
    """The export's packed codes, scales and zero points, decoded by compressed-tensors' own decompressor."""
    from compressed_tensors.compressors.base import BaseCompressor

    from workbench.quantization.export import _scheme
    from workbench.quantization.step import QuantState

    W, H = _weights(32, 64), _hessian()
    q = gptq(W.to(dtype), H, args, dtype)
    evaluated = q.weight.to(dtype)  # what the model holds in memory, in its dtype
    state = QuantState(args, q.codes, q.scale, q.zero, tuple(W.shape))
    assert torch.equal(state.dequantized(dtype), evaluated)
    scheme = _scheme(state, ["Linear"])
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    local = {"weight": state.dequantized(torch.float32), "weight_scale": q.scale.float()}
    if q.zero is not None:
        local["weight_zero_point"] = q.zero
    packed = compressor.compress(local, scheme)
    if args.kind == "int":
        assert packed["weight_packed"].dtype == torch.int32
        assert packed["weight_packed"].numel() == W.numel() * args.bits // 32
    packed["weight_scale"] = packed["weight_scale"].to(dtype)
    decoded = compressor.decompress(packed, scheme)["weight"]
    assert decoded.dtype == dtype
    assert torch.equal(decoded, evaluated)

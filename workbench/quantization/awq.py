"""AWQ-style scaling (Lin et al., 2024): per-input-channel scales that protect the salient channels, folded away.

For linears that read one input, a scale s per input channel multiplies
their weights' columns while the operation that produces the input (a norm,
or a linear whose rows feed the input one to one) is divided by s, so the
model computes the same function before quantization. s = mean|x|^alpha
(normalized), alpha chosen on a grid in [0, 1) to minimize the quantized
linears' output error on the calibration inputs, measured with the layer's
Hessian: sum over the group's linears of tr(dW H dW^T), dW the change of the
effective weights Q(W diag(s)) diag(s)^-1. alpha = 0 (no scaling, plain RTN)
is on the grid, so the search never does worse than RTN on that measure.
Only the scales are searched (the reference's weight clipping search is not done).

Where a scale can be folded is the architecture's business: ``FOLDS`` lists,
per family, the operation before each group (Llama-like: the two norms, up
-> down, and v -> o when the attention has as many key/value heads as
heads; OPT: the two LayerNorms, fc1 -> fc2 through ReLU, v -> out). A group
with nowhere to fold, or a norm that computes with (1 + weight) (Gemma), is
quantized unscaled and reported so.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.models import weight_matrix

from .quantizer import QuantArgs, codes_of, dequantize, qparams

# family -> [(the operation before the group, the group's linears)], names relative to the decoder layer
FOLDS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "llama": [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ],
    "opt": [
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("final_layer_norm", ("fc1",)),
        ("fc1", ("fc2",)),
    ],
}


def _module(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def fold_groups(adapter, layer: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(name of the operation before, the operation, the group's linear names) for every group whose scale can be folded."""
    folds = FOLDS.get(adapter.spec.family, [])
    config = adapter.config
    out = []
    for prev_name, names in folds:
        prev = _module(layer, prev_name)
        linears = [n for n in names if isinstance(_module(layer, n), nn.Linear)]
        if prev is None or len(linears) != len(names):
            continue
        if "gemma" in type(prev).__name__.lower():
            continue  # (1 + weight) norms: a division of the weight is not a division of the output
        if isinstance(prev, nn.Linear):
            cols = weight_matrix(_module(layer, names[0])).shape[1]
            if weight_matrix(prev).shape[0] != cols:
                continue  # v -> o with grouped-query attention: channels are not one to one
            if prev_name == "fc1" and getattr(config, "activation_function", "relu") != "relu":
                continue  # only a positively homogeneous activation lets fc1's rows carry the scale
        elif not hasattr(prev, "weight") or getattr(prev, "weight", None) is None:
            continue
        out.append((prev_name, prev, linears))
    return out


def _rtn_dequant(W: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype) -> torch.Tensor:
    rows, cols = W.shape
    g = args.group(cols)
    flat = W.reshape(rows * (cols // g), g)
    s, z = qparams(flat, args, scale_dtype)
    return dequantize(codes_of(flat, s[:, None], z[:, None], args), s[:, None], z[:, None]).view(rows, cols)


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], hessian: torch.Tensor, abs_mean: torch.Tensor, args: QuantArgs,
                 scale_dtype: torch.dtype, grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """The best scales for the stacked ``weights`` (one input): (s, alpha, error ratio to alpha = 0)."""
    W = torch.cat([w.float() for w in weights], dim=0)
    H = hessian.float().to(W.device)
    x = abs_mean.float().to(W.device).clamp(min=1e-8)

    def loss(s: torch.Tensor) -> float:
        D = _rtn_dequant(W * s, args, scale_dtype) / s - W
        return float(((D @ H) * D).sum())

    best = (float("inf"), 0.0, torch.ones_like(x))
    base = None
    for k in range(grid):
        alpha = k / grid
        s = x.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = loss(s)
        if k == 0:
            base = err
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], (best[0] / base) if base else 1.0


@torch.no_grad()
def apply_scale(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """Fold ``s``: the linears' columns times s, the operation before divided by s (rows of a linear, a norm's affine)."""
    for mod in linears:
        w = weight_matrix(mod)
        w.mul_(s.to(w.dtype)[None, :])
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))


__all__ = ["FOLDS", "fold_groups", "search_scale", "apply_scale"]

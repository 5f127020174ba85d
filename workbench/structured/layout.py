"""What the structured operations share: family checks, parameter counts, resizing linear layers.

Structured compression changes tensor shapes, so modules get new (smaller)
parameters instead of masked ones; these functions do that in one place and keep
``in_features`` / ``out_features`` consistent with the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.errors import UserError

# The decoder layout every width operation relies on: mlp.{gate,up,down}_proj and
# self_attn.{q,k,v,o}_proj with heads of config.head_dim channels.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# Families whose layers and embeddings depth and vocabulary pruning handle (every adapter family).
DECODER_FAMILIES = LLAMA_LIKE + ("opt", "gpt2", "gpt_neox", "phi", "phi3")


def require_model_type(adapter, operation: str, supported: tuple[str, ...]) -> None:
    """Refuse, before any work, a model whose family ``operation`` does not support."""
    if adapter.model_type not in supported:
        raise UserError(f"{operation} supports {', '.join(supported)} models, not {adapter.model_type!r}",
                        "pick a model of a supported family, or drop this step from the spec")


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def change(before: int, after: int) -> str:
    """"10.52M -> 8.40M (-20.1%)" for a headline."""
    return f"{millions(before)} -> {millions(after)} ({(after - before) / before:+.1%})"


def _parameter(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    """A new parameter that replaces ``like`` (same trainability)."""
    return nn.Parameter(value, requires_grad=like.requires_grad)


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only output ``rows`` and input ``cols`` (index tensors, in order) of ``linear``, in place."""
    weight = linear.weight.data
    if rows is not None:
        rows = rows.to(weight.device)
        weight = weight.index_select(0, rows)
        if linear.bias is not None:
            linear.bias = _parameter(linear.bias.data.index_select(0, rows), linear.bias)
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    linear.weight = _parameter(weight.contiguous(), linear.weight)
    linear.out_features, linear.in_features = weight.shape


def resize_linear(linear: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> None:
    """Give ``linear`` uninitialized parameters of a new shape, on its device (before weights are loaded into it)."""
    w = linear.weight
    out_features = w.shape[0] if out_features is None else out_features
    in_features = w.shape[1] if in_features is None else in_features
    if linear.bias is not None:
        linear.bias = _parameter(torch.empty(out_features, dtype=linear.bias.dtype, device=linear.bias.device), linear.bias)
    linear.weight = _parameter(torch.empty(out_features, in_features, dtype=w.dtype, device=w.device), w)
    linear.out_features, linear.in_features = out_features, in_features


def add_zero_bias(linear: nn.Linear) -> None:
    """Give a bias-free linear a zero bias (its outputs do not change)."""
    if linear.bias is None:
        w = linear.weight
        linear.bias = _parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), w)

"""Width pruning: remove MLP channels and attention heads from llama-like decoder layers.

An MLP channel ``j`` is row ``j`` of ``gate_proj`` and ``up_proj`` and column
``j`` of ``down_proj``; removing the three together removes the channel
exactly. Attention heads go by key/value group: a key/value head is removed
only with every query head that shares it (its rows of ``q_proj``, its own
rows of ``k_proj`` and ``v_proj``, the query heads' columns of ``o_proj``),
so the grouped-query layout stays valid and ``num_key_value_groups`` does
not change.

Importance of a unit (higher is kept):

- ``random``: seeded uniform scores (the baseline of OpenBA-V2 and Sheared-LLaMA).
- ``magnitude``: the L2 norms of the unit's columns of the output
  projection (``down_proj``, ``o_proj``), as FLAP's magnitude baseline.
- ``activation``: for a channel, Wanda's ``|W| * ||x||`` summed over its
  ``down_proj`` column (``||x_j||`` over the calibration tokens); for a
  head, the norm of its output through ``o_proj`` over the calibration
  tokens, ``sqrt(sum_t ||W_h x_h(t)||^2)``, computed exactly from the head's
  input Gram matrix.
- ``flap``: FLAP's fluctuation, ``Var_t(x_j) * ||W[:, j]||^2``, summed over
  the unit's columns.

Bias compensation (FLAP): the removed units' mean contribution
``W[:, removed] @ mean(x[removed])`` is added to the output projection's
bias, so the layer's output keeps its mean. Where the projection has no bias
the family's config flag that adds one is set (``mlp_bias`` for Llama,
``attention_bias`` for Llama, Qwen3 and Gemma); other families cannot take
it and the step refuses before any work.

Allocation ``uniform`` keeps the same number of units in every layer, so the
config stays ordinary (one ``intermediate_size``, one head count).
``global`` ranks units across layers after standardizing scores within each
layer (FLAP's adaptive structure, with separate MLP and attention budgets);
the resulting per-layer widths are recorded as a ``width`` structure entry
that ``apply_structure`` (through ``workbench.rebuild``) uses to rebuild the
exported model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from workbench.errors import UserError
from workbench.observers import InputMoments

from .layout import add_zero_bias, resize_linear, slice_linear

MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The config flag that gives a family's projections biases, per part ("mlp": all
# three MLP linears, "attention": all four attention linears).
BIAS_FLAGS = {
    "mlp": {"llama": "mlp_bias"},
    "attention": dict.fromkeys(("llama", "qwen3", "gemma", "gemma2", "gemma3_text"), "attention_bias"),
}


@dataclass(frozen=True)
class Geometry:
    """One decoder layer's widths."""

    intermediate_size: int
    num_heads: int
    num_kv_heads: int


def head_dim(config) -> int:
    """Channels per attention head (explicit in most configs, else hidden size over heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def geometry(layer, dim: int) -> Geometry:
    """A layer's widths, read from its weights (they may differ from the config after per-layer pruning)."""
    attn = layer.self_attn
    return Geometry(layer.mlp.gate_proj.out_features, attn.q_proj.out_features // dim, attn.k_proj.out_features // dim)


def set_layer_widths(layer, geom: Geometry) -> None:
    """Update the attributes the modules derive from their widths (the grouped-query ratio used by attention)."""
    if hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = geom.intermediate_size
    layer.self_attn.num_key_value_groups = geom.num_heads // geom.num_kv_heads


# ------------------------------------------------------------------ statistics


# ------------------------------------------------------------------ scores


def channel_scores(method: str, down: torch.Tensor, moments: InputMoments | None, generator: torch.Generator) -> torch.Tensor:
    """Importance of every MLP channel from ``down_proj``'s (out, channels) weight."""
    if method == "random":
        return torch.rand(down.shape[1], generator=generator)
    w = down.float()
    if method == "magnitude":
        return w.norm(dim=0)
    if method == "activation":
        return w.abs().sum(0) * moments.norm.to(w.device)
    return moments.variance.to(w.device) * w.pow(2).sum(0)  # flap


def head_scores(method: str, o_proj: torch.Tensor, heads: int, moments: InputMoments | None,
                generator: torch.Generator) -> torch.Tensor:
    """Importance of every query head from ``o_proj``'s (out, heads * head_dim) weight."""
    if method == "random":
        return torch.rand(heads, generator=generator)
    w = o_proj.float().reshape(o_proj.shape[0], heads, -1)
    if method == "magnitude":
        return w.norm(dim=0).sum(-1)
    if method == "activation":
        gram = moments.gram.to(w.device)
        energy = torch.stack([((w[:, h] @ gram[h]) * w[:, h]).sum() for h in range(heads)])
        return energy.clamp_min(0).sqrt()
    fluctuation = moments.variance.to(w.device).reshape(heads, -1) * w.pow(2).sum(0)  # flap
    return fluctuation.sum(-1)


def group_scores(per_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A key/value group's score: the sum over the query heads that share its key/value head."""
    return per_head.reshape(kv_heads, -1).sum(-1)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Scores made comparable across layers (zero mean, unit deviation within the layer), as FLAP does."""
    std = scores.std() if scores.numel() > 1 else scores.new_zeros(())
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in increasing order."""
    return torch.topk(scores.float(), count).indices.sort().values


def global_keep(scores: list[torch.Tensor], total: int) -> list[torch.Tensor]:
    """Keep the ``total`` best standardized scores across layers, at least one per layer."""
    z = [standardize(s.float()) for s in scores]
    keep = [top(s, 1) for s in z]  # every layer keeps its best unit
    rest = torch.cat([s.scatter(0, k, float("-inf")) for s, k in zip(z, keep)])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(z)])
    offset = torch.tensor([0] + [s.numel() for s in z]).cumsum(0)
    extra = torch.topk(rest, max(0, total - len(z))).indices
    per_layer = []
    for i in range(len(z)):
        mine = extra[owner[extra] == i] - offset[i]
        per_layer.append(torch.cat([keep[i], mine]).sort().values)
    return per_layer


# ------------------------------------------------------------------ biases


def bias_parts_ok(adapter, parts: list[str]) -> None:
    """Refuse bias compensation, before any work, where a part's output projection cannot have a bias."""
    for part in parts:
        target = "down_proj" if part == "mlp" else "o_proj"
        has_bias = all(_part_linears(layer, part)[-1].bias is not None for layer in adapter.layers)
        if not has_bias and adapter.model_type not in BIAS_FLAGS[part]:
            raise UserError(f"bias compensation needs a bias on {target}, which {adapter.model_type} models cannot have",
                            "set bias_compensation = false for this model")


def enable_biases(adapter, parts: list[str]) -> None:
    """Give every layer's projections of ``parts`` zero biases where they have none, and set the config flag."""
    for part in parts:
        if all(_part_linears(layer, part)[-1].bias is not None for layer in adapter.layers):
            continue
        for layer in adapter.layers:
            for linear in _part_linears(layer, part):
                add_zero_bias(linear)
        setattr(adapter.config, BIAS_FLAGS[part][adapter.model_type], True)


def require_plain_linears(adapter) -> None:
    """Refuse layers whose projections an earlier step replaced (e.g. by low-rank pairs): their channels are not rows and columns."""
    for i, layer in enumerate(adapter.layers):
        for part in ("mlp", "attention"):
            for linear in _part_linears(layer, part):
                if not isinstance(linear, nn.Linear):
                    raise UserError(f"width pruning needs plain linear projections; layer {i} has a {type(linear).__name__}",
                                    "put the width step before the step that replaced it")


def _part_linears(layer, part: str) -> list[nn.Linear]:
    module, names = (layer.mlp, MLP_LINEARS) if part == "mlp" else (layer.self_attn, ATTENTION_LINEARS)
    return [getattr(module, n) for n in names]


def _compensate(linear: nn.Linear, removed: torch.Tensor, mean: torch.Tensor) -> None:
    """Add the removed input columns' mean contribution to ``linear``'s bias."""
    w = linear.weight.data
    removed = removed.to(w.device)
    contribution = w.index_select(1, removed).float() @ mean.to(w.device).index_select(0, removed)
    linear.bias.data += contribution.to(linear.bias.dtype)


# ------------------------------------------------------------------ applying


def _complement(keep: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[keep.cpu()] = False
    return mask.nonzero().flatten()


def head_channels(heads: torch.Tensor, dim: int) -> torch.Tensor:
    """The channel indices of ``heads`` (each ``dim`` wide)."""
    return (heads.reshape(-1, 1) * dim + torch.arange(dim)).reshape(-1)


def prune_mlp(layer, keep: torch.Tensor, mean: torch.Tensor | None = None) -> None:
    """Keep MLP channels ``keep``; with ``mean`` (the channels' mean activations), compensate in down_proj's bias."""
    mlp = layer.mlp
    if mean is not None:
        _compensate(mlp.down_proj, _complement(keep, mlp.down_proj.in_features), mean)
    slice_linear(mlp.gate_proj, rows=keep)
    slice_linear(mlp.up_proj, rows=keep)
    slice_linear(mlp.down_proj, cols=keep)


def prune_heads(layer, keep_groups: torch.Tensor, dim: int, mean: torch.Tensor | None = None) -> None:
    """Keep the key/value groups ``keep_groups`` with all their query heads; ``mean`` compensates in o_proj's bias."""
    attn = layer.self_attn
    group = attn.num_key_value_groups
    query_heads = (keep_groups.reshape(-1, 1) * group + torch.arange(group)).reshape(-1)
    q_cols = head_channels(query_heads, dim)
    if mean is not None:
        _compensate(attn.o_proj, _complement(q_cols, attn.o_proj.in_features), mean)
    kv_rows = head_channels(keep_groups, dim)
    slice_linear(attn.q_proj, rows=q_cols)
    slice_linear(attn.k_proj, rows=kv_rows)
    slice_linear(attn.v_proj, rows=kv_rows)
    slice_linear(attn.o_proj, cols=q_cols)


def set_config_widths(config, geom: Geometry, dim: int) -> None:
    """Make an ordinary config describe uniform widths."""
    config.intermediate_size = geom.intermediate_size
    config.num_attention_heads = geom.num_heads
    config.num_key_value_heads = geom.num_kv_heads
    config.head_dim = dim


def structure_entry(adapter) -> dict:
    """The ``width`` entry that rebuilds per-layer widths (see ``apply_structure``)."""
    dim = head_dim(adapter.config)
    return {"kind": "width", "head_dim": dim, "layers": [asdict(geometry(layer, dim)) for layer in adapter.layers]}


def apply_structure(model, entry: dict) -> None:
    """Resize every decoder layer to the widths of a ``width`` entry (``workbench.rebuild``; weights are loaded next)."""
    from workbench.models import get_adapter

    adapter = get_adapter(model)
    widths = entry.get("layers") or []
    if len(widths) != len(adapter.layers):
        raise UserError(f"the checkpoint records widths for {len(widths)} layers but its config has {len(adapter.layers)}",
                        "the folder was changed after export; export the model again")
    dim = int(entry["head_dim"])
    for layer, values in zip(adapter.layers, widths):
        geom = Geometry(**values)
        mlp, attn = layer.mlp, layer.self_attn
        resize_linear(mlp.gate_proj, out_features=geom.intermediate_size)
        resize_linear(mlp.up_proj, out_features=geom.intermediate_size)
        resize_linear(mlp.down_proj, in_features=geom.intermediate_size)
        resize_linear(attn.q_proj, out_features=geom.num_heads * dim)
        resize_linear(attn.k_proj, out_features=geom.num_kv_heads * dim)
        resize_linear(attn.v_proj, out_features=geom.num_kv_heads * dim)
        resize_linear(attn.o_proj, in_features=geom.num_heads * dim)
        set_layer_widths(layer, geom)

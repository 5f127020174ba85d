"""Depth pruning: score the decoder layers, choose which to remove, remove them consistently.

Criteria (a lower score means "remove first"):

- ``block_influence``: ShortGPT's Block Influence, ``1 - cos(x_in, x_out)``
  averaged over every calibration token, where ``x_in`` and ``x_out`` are
  the residual stream before and after the layer. A layer that barely turns
  its input is redundant.
- ``angular``: Gromov et al.'s angular distance ``arccos(cos(x_l, x_{l+n})) / pi``
  between the inputs of layers ``l`` and ``l + n``, averaged over every
  token; the block of ``n`` consecutive layers with the smallest distance is
  removed as a whole.
- ``perplexity``: the calibration perplexity with the layer alone skipped,
  minus the full model's. Exact, and one full forward pass per layer, so
  meant for small models.
- ``last`` (the last layers) and ``random`` (seeded): the usual baselines.

Selection ``lowest`` takes the lowest scores; ``middle`` follows OpenBA-V2:
never the first or the last layer and never two adjacent layers, with the
lowest total score among such choices.

``remove_layers`` deletes the layers and renumbers what depends on a layer's
position: the modules' ``layer_idx`` (KV-cache slots), ``num_hidden_layers``,
per-layer config lists (``layer_types``, i.e. sliding-window patterns) and
Qwen's ``max_window_layers``, so the config stays an ordinary config.
"""

from __future__ import annotations

import math
import random
from collections import deque
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from workbench.errors import UserError
from workbench.sweep import LayerSweep

# Config entries with one value per decoder layer, in layer order.
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")

Progress = Callable[[int, int], None]


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ------------------------------------------------------------------ criteria


def _mean_cos_and_angle(inputs: list[torch.Tensor], outputs: list[torch.Tensor], device) -> tuple[float, float]:
    """Mean over every token of cos(x, y) and of arccos(cos(x, y)) / pi."""
    cos_sum = angle_sum = 0.0
    tokens = 0
    for x, y in zip(inputs, outputs):
        cos = F.cosine_similarity(x.to(device).float(), y.to(device).float(), dim=-1).clamp(-1.0, 1.0)
        cos_sum += float(cos.double().sum())
        angle_sum += float((torch.arccos(cos) / math.pi).double().sum())
        tokens += cos.numel()
    return cos_sum / tokens, angle_sum / tokens


@torch.no_grad()
def residual_similarity(adapter, tokens: torch.Tensor, device, span: int = 1, batch_size: int = 8, store=None,
                        cancel=None, progress: Progress | None = None) -> tuple[list[float], list[float]]:
    """For each start ``l`` in ``0..L-span``: mean cos and mean angular distance between the inputs of layers ``l`` and ``l + span``.

    The input of layer ``L`` is the last layer's output (before the final
    norm). One layer-by-layer pass over the calibration tokens; ``span + 1``
    sets of activations are kept at a time.
    """
    sweep = LayerSweep(adapter, tokens, device, batch_size=batch_size, store=store, cancel=cancel)
    window: deque[list[torch.Tensor]] = deque([list(sweep.hidden)], maxlen=span + 1)
    cosines, angles = [], []
    total = len(adapter.layers)

    def compare(layer, i, stats) -> None:
        window.append(list(sweep.hidden))  # layer i's outputs
        if len(window) == span + 1:
            cos, angle = _mean_cos_and_angle(window[0], window[-1], sweep.device)
            cosines.append(cos)
            angles.append(angle)
        if progress is not None:
            progress(i + 1, total)

    sweep.run(compare, dense=True)  # scoring only: nothing is written back
    return cosines, angles


def block_influence(adapter, tokens, device, **kwargs) -> list[float]:
    """ShortGPT's Block Influence of every layer: 1 - mean cos(input, output)."""
    cosines, _ = residual_similarity(adapter, tokens, device, span=1, **kwargs)
    return [1.0 - c for c in cosines]


def _identity_forward(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def skipped(layer):
    """Run the model with ``layer`` passing its input through unchanged (decoder layers return their hidden states)."""
    layer.forward = _identity_forward
    try:
        yield
    finally:
        del layer.forward


@torch.no_grad()
def perplexity_increase(loaded, tokens: torch.Tensor, batch_size: int = 8, cancel=None,
                        progress: Progress | None = None) -> tuple[list[float], float]:
    """Calibration perplexity with each layer alone skipped, minus the full model's; and the full model's.

    The whole model is moved to the compute device for these full forward passes.
    """
    from workbench.perplexity import perplexity

    model, device = loaded.model, torch.device(loaded.device)
    seqlen = tokens.shape[1]
    ids = tokens.reshape(-1)
    layers = loaded.adapter.layers

    def ppl() -> float:
        return perplexity(model, ids, seqlen, batch_size=batch_size, device=device, cancel=cancel)["ppl"]

    model.to(device)
    try:
        base = ppl()
        increases = []
        for i, layer in enumerate(layers):
            with skipped(layer):
                increases.append(ppl() - base)
            if progress is not None:
                progress(i + 1, len(layers))
    finally:
        if device.type != "cpu":
            model.to("cpu")
            torch.cuda.empty_cache()
    return increases, base


# ------------------------------------------------------------------ selection


def lowest(scores: list[float], count: int) -> list[int]:
    """The ``count`` layers with the lowest scores (ties: the earlier layer), in layer order."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count])


def middle_capacity(total: int) -> int:
    """How many non-adjacent layers there are between the first and the last of ``total``."""
    return max(0, total - 1) // 2


def check_middle(total: int, count: int) -> None:
    if count > middle_capacity(total):
        most = middle_capacity(total)
        raise UserError(f"cannot choose {count} non-adjacent middle layers of {total} (at most {most})",
                        f"remove at most {most} layers, or use selection = \"lowest\"")


def middle(scores: list[float], count: int) -> list[int]:
    """OpenBA-V2's rule: ``count`` non-adjacent layers, never the first or last, with the lowest total score."""
    check_middle(len(scores), count)
    candidates = list(range(1, len(scores) - 1))
    # best[i][k]: (total score, picks) choosing k layers among the first i candidates, none adjacent
    best: list[list[tuple | None]] = [[(0.0, ())] + [None] * count for _ in range(len(candidates) + 1)]
    for i, layer in enumerate(candidates, start=1):
        for k in range(1, count + 1):
            options = [best[i - 1][k]]
            before = best[max(i - 2, 0)][k - 1]  # taking this layer rules out the previous (adjacent) candidate
            if before is not None:
                options.append((before[0] + scores[layer], before[1] + (layer,)))
            options = [o for o in options if o is not None]
            best[i][k] = min(options) if options else None
    return list(best[len(candidates)][count][1])


def consecutive_block(distances: list[float], count: int) -> list[int]:
    """The block of ``count`` layers starting where the angular distance across it is smallest."""
    start = min(range(len(distances)), key=lambda l: (distances[l], l))
    return list(range(start, start + count))


def random_scores(layers: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.random() for _ in range(layers)]


# ------------------------------------------------------------------ removal


def layer_count(total: int, remove: int | None, fraction: float | None, where: str = "step") -> int:
    """How many layers to remove; refuses removing none or all of them."""
    count = remove if remove is not None else round(fraction * total)
    if count < 1:
        raise UserError(f"{where}: {fraction} of {total} layers rounds to no layer", "raise the fraction, or set remove = 1")
    if count >= total:
        raise UserError(f"{where}: removing {count} of the model's {total} decoder layers would leave none",
                        f"remove at most {total - 1} layers")
    return count


def remove_layers(adapter, indices: list[int]) -> list[int]:
    """Delete decoder layers ``indices`` and renumber everything indexed by layer; return the kept original indices."""
    layers = adapter.layers
    total = len(layers)
    removed = sorted(set(indices))
    if not removed or removed[0] < 0 or removed[-1] >= total or len(removed) >= total:
        raise UserError(f"cannot remove layers {removed} of {total}", f"give between 1 and {total - 1} indices in 0..{total - 1}")
    keep = [i for i in range(total) if i not in removed]
    for i in reversed(removed):
        del layers[i]  # ModuleList renumbers its keys, so state-dict names follow
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = _text_config(adapter.config)
    for key in PER_LAYER_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, key, [value[i] for i in keep])
    window_layers = getattr(config, "max_window_layers", None)
    if isinstance(window_layers, int):  # Qwen: layers from this index on use sliding windows
        config.max_window_layers = sum(1 for i in keep if i < window_layers)
    config.num_hidden_layers = len(keep)
    return keep


def renumberable(entry: dict) -> bool:
    """Whether ``renumber_structure`` can follow a structure entry through a layer removal."""
    return entry.get("kind") == "width" or isinstance(entry.get("modules"), dict)


def renumber_structure(entries: list[dict], layers_path: str, keep: list[int]) -> None:
    """Make recorded structure entries follow a removal: per-layer lists lose the removed layers, module names are renumbered.

    ``width`` entries hold one item per layer; others (``lowrank``) map
    qualified module names (``model.layers.5.mlp.down_proj``) to settings.
    """
    new_index = {old: new for new, old in enumerate(keep)}
    prefix = layers_path + "."
    for entry in entries:
        if entry.get("kind") == "width":
            entry["layers"] = [entry["layers"][i] for i in keep]
            continue
        modules = {}
        for name, value in entry["modules"].items():
            index, _, rest = name[len(prefix):].partition(".") if name.startswith(prefix) else ("", "", "")
            if not index.isdigit():
                modules[name] = value  # outside the decoder layers (e.g. lm_head)
            elif int(index) in new_index:
                modules[f"{prefix}{new_index[int(index)]}.{rest}"] = value
        entry["modules"] = modules

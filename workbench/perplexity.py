"""Perplexity as the pruning papers measure it (SparseGPT, Wanda).

The evaluation text (``workbench.data.evaluation_text``: ``wikitext2``, ``c4``,
``books``, ``file:PATH`` and any registered text) is tokenized in one call, cut
into non-overlapping windows of ``seqlen`` tokens (the last partial window is
dropped), and ``ppl = exp(mean over windows of the window's mean next-token
loss)``, which equals the references' ``exp(sum(loss * seqlen) / (windows *
seqlen))``.

torch is imported only when tokens are built or a model is evaluated.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from workbench.data.cache import tokenizer_fingerprint
from workbench.data.evaluation_text import evaluation_text, resolve_evaluation_set
from workbench.errors import Cancelled, UserError

if TYPE_CHECKING:
    import torch

# float32 logits handled at once when computing losses (128 MiB): bounds the
# memory a large vocabulary adds on top of the model's own logits.
_CHUNK_ELEMENTS = 1 << 25

_TOKENS_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_TOKENS_CACHE_SIZE = 6
_TOKENS_LOCK = threading.Lock()


def eval_text(dataset: str) -> str:
    """The text perplexity is measured on (``workbench.data.evaluation_text``)."""
    return evaluation_text(dataset)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be a whole number of at least {minimum}, not {value!r}", hint=f"set {name} to {minimum} or more")
    return value


def eval_tokens(dataset: str, tokenizer, seqlen: int) -> "torch.Tensor":
    """The evaluation text's token ids, a ``(1, N)`` long tensor.

    One tokenizer call on the whole text, with the tokenizer's defaults (as
    the papers do, so a Llama BOS comes first). For a set with
    ``max_windows`` (``c4``: 256) only the first ``max_windows * seqlen``
    tokens are kept. Cached in-process by (dataset, its stamp: file size and
    mtime for ``file:``, tokenizer identity, seqlen), since a run
    evaluates before and after compression; a fresh copy is returned.
    """
    import torch

    seqlen = _positive_int("seqlen", seqlen, 2)
    entry, arg = resolve_evaluation_set(dataset)
    stamp = entry.stamp(arg) if entry.stamp is not None else None
    key = (entry.name, arg, stamp, json.dumps(tokenizer_fingerprint(tokenizer), sort_keys=True), seqlen)
    with _TOKENS_LOCK:
        cached = _TOKENS_CACHE.get(key)
        if cached is not None:
            _TOKENS_CACHE.move_to_end(key)
            return cached.clone()

    text = eval_text(dataset)
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    if entry.max_windows is not None:
        ids = ids[:, : entry.max_windows * seqlen]
    ids = ids.contiguous()
    with _TOKENS_LOCK:
        _TOKENS_CACHE[key] = ids
        while len(_TOKENS_CACHE) > _TOKENS_CACHE_SIZE:
            _TOKENS_CACHE.popitem(last=False)
    return ids.clone()


def _model_device(model) -> "torch.device":
    import torch

    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
    # Weights offloaded to "meta" are moved in by hooks; inputs start on the CPU.
    return torch.device("cpu") if device.type == "meta" else device


def _window_losses(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """Mean next-token cross-entropy of each window, in float32, without one big float32 copy of the logits.

    ``logits``: ``(windows, seqlen, vocab)``; ``targets``: ``(windows, seqlen - 1)``.
    Returns a float64 CPU tensor of shape ``(windows,)``.
    """
    import torch
    import torch.nn.functional as F

    windows, length, vocab = logits.shape
    positions = length - 1
    rows = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    sums = []
    for w in range(windows):
        parts = [
            F.cross_entropy(logits[w, s : min(positions, s + rows)].float(), targets[w, s : min(positions, s + rows)], reduction="sum")
            for s in range(0, positions, rows)
        ]
        sums.append(torch.stack(parts).sum() if len(parts) > 1 else parts[0])
    return (torch.stack(sums).cpu().double() / positions) if sums else torch.zeros(0, dtype=torch.float64)


def perplexity(
    model,
    input_ids: "torch.Tensor",
    seqlen: int,
    limit: int | None = None,
    batch_size: int = 1,
    device=None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Perplexity of ``model`` on ``input_ids`` (``(1, N)`` or ``(N,)``) in non-overlapping windows of ``seqlen``.

    Uses the first ``limit`` windows when given, ``batch_size`` windows per
    forward pass (the model's logits for a batch are ``batch_size * seqlen *
    vocab`` values). Inputs go to ``device`` (default: the device of the
    model's first parameter). ``progress(done, total)`` is called after each
    batch; ``cancel()`` returning True raises ``workbench.errors.Cancelled``.

    Returns ``{"ppl", "nll", "seqlen", "windows", "tokens", "limit",
    "total_tokens"}``: ``nll`` is the mean of the window losses, ``tokens`` =
    ``windows * seqlen`` (the tokens fed to the model), ``total_tokens`` the
    length of ``input_ids``.
    """
    import torch

    seqlen = _positive_int("seqlen", seqlen, 2)
    batch_size = _positive_int("batch_size", batch_size)
    if limit is not None:
        limit = _positive_int("limit", limit)
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must have shape (1, N) or (N,), not {tuple(ids.shape)}")
    total_tokens = int(ids.numel())
    available = total_tokens // seqlen
    if available == 0:
        raise UserError(
            f"the evaluation text has {total_tokens} tokens, fewer than one window of {seqlen}",
            hint="use a shorter seqlen or a longer text",
        )
    windows = available if limit is None else min(available, limit)
    ids = ids[: windows * seqlen].reshape(windows, seqlen).to(dtype=torch.long)
    device = torch.device(device) if device is not None else _model_device(model)

    losses = []
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, windows, batch_size):
                if cancel is not None and cancel():
                    raise Cancelled(f"perplexity evaluation cancelled after {start} of {windows} windows")
                batch = ids[start : start + batch_size].to(device)
                output = model(input_ids=batch, use_cache=False)
                logits = output.logits if hasattr(output, "logits") else output[0]
                losses.append(_window_losses(logits, batch[:, 1:].to(logits.device)))
                del output, logits
                if progress is not None:
                    progress(min(start + batch_size, windows), windows)
    finally:
        if was_training:
            model.train()

    nll = float(torch.cat(losses).mean())
    if math.isnan(nll):
        ppl = math.nan
    else:
        ppl = math.exp(nll) if nll < 709.0 else math.inf
    return {
        "ppl": ppl,
        "nll": nll,
        "seqlen": seqlen,
        "windows": windows,
        "tokens": windows * seqlen,
        "limit": limit,
        "total_tokens": total_tokens,
    }


def bits_per_byte(result: dict, input_ids, tokenizer) -> float:
    """Bits per UTF-8 byte of the evaluated windows, for comparing models with different vocabularies.

    ``log2(e) * nll * tokens / bytes``: the mean next-token loss in bits, times
    the evaluated text's tokens per byte (the windows actually fed to the model,
    decoded back to text). Independent of the tokenizer, unlike perplexity.
    """
    import torch

    ids = torch.as_tensor(input_ids).reshape(-1)[: result["tokens"]]
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0:
        return math.nan
    return result["nll"] / math.log(2) * result["tokens"] / n_bytes


def evaluate(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, **kwargs) -> dict:
    """Perplexity (and bits per byte) of ``model`` on ``dataset``, with ``"dataset"`` added to the result."""
    ids = eval_tokens(dataset, tokenizer, seqlen)
    result = perplexity(model, ids, seqlen, **kwargs)
    result["dataset"] = dataset
    result["bits_per_byte"] = bits_per_byte(result, ids, tokenizer)
    return result

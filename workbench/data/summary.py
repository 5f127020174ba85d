"""A calibration set described before pruning: its documents and tokens, the dense model's perplexity on the
windows, and the token-distribution divergence from another source."""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import torch

from workbench.evaluation.placement import placed
from workbench.perplexity import perplexity

from .cache import tokenizer_fingerprint
from .sources import CalibrationData

# Windows the summary's perplexity reads: a proxy, so a bounded fraction of the cost of a pruning pass.
SUMMARY_WINDOWS = 32
_TOKEN_COUNTS: dict[tuple[str, str], int] = {}  # (documents hash, tokenizer) -> tokens; a study counts the same corpus per cell


def count_tokens(documents: Sequence[str], tokenizer, batch: int = 64) -> int:
    """Tokens in ``documents`` (no special tokens), tokenized in batches; remembered in-process per corpus and tokenizer."""
    digest = hashlib.sha256()
    for d in documents:
        digest.update(d.encode("utf-8") + b"\x00")
    key = (digest.hexdigest(), json.dumps(tokenizer_fingerprint(tokenizer), sort_keys=True))
    if key not in _TOKEN_COUNTS:
        total = 0
        for start in range(0, len(documents), batch):
            encoded = tokenizer(list(documents[start : start + batch]), add_special_tokens=False, verbose=False)["input_ids"]
            total += sum(len(ids) for ids in encoded)
        if len(_TOKEN_COUNTS) >= 32:
            _TOKEN_COUNTS.pop(next(iter(_TOKEN_COUNTS)))
        _TOKEN_COUNTS[key] = total
    return _TOKEN_COUNTS[key]


def token_divergence(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """Jensen-Shannon divergence in bits between the token frequencies of two id sets.

    0 when both use the tokens in the same proportions, 1 when they share no
    token. Unlike the KL divergence it is symmetric and finite when one set
    uses tokens the other never does (random ids against text).
    """
    a = a.reshape(-1).long()
    b = b.reshape(-1).long()
    size = int(max(a.max(), b.max())) + 1
    p = torch.bincount(a, minlength=size).double()
    q = torch.bincount(b, minlength=size).double()
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x):
        nz = x > 0
        return float((x[nz] * torch.log2(x[nz] / m[nz])).sum())

    return max(0.0, 0.5 * (kl(p) + kl(q)))


def calibration_summary(
    data: CalibrationData,
    tokenizer,
    model=None,
    device=None,
    batch_size: int = 8,
    compare: CalibrationData | None = None,
    cancel: Callable[[], bool] | None = None,
    max_windows: int = SUMMARY_WINDOWS,
) -> dict:
    """What a calibration set is, before pruning on it.

    ``documents`` and ``tokens`` count the source's text (None for token
    sources); ``perplexity`` is the model's perplexity on the first
    ``max_windows`` calibration windows (a cheap proxy of how close the data
    is to what the model was trained on; needs ``model``); ``divergence`` is
    the Jensen-Shannon divergence (bits) between the token frequencies of all
    the windows and ``compare``'s.
    """
    nsamples, seqlen = data.ids.shape
    out: dict = {
        "source": data.source,
        "windows": int(nsamples),
        "seqlen": int(seqlen),
        "documents": len(data.documents) if data.documents is not None else None,
        "tokens": count_tokens(data.documents, tokenizer) if data.documents is not None else None,
    }
    if model is not None:
        windows = data.ids[:max_windows]
        with placed(model, device if device is not None else "cpu") as dev:
            result = perplexity(model, windows.reshape(1, -1), int(seqlen), batch_size=batch_size, device=dev, cancel=cancel)
        out["perplexity"] = float(result["ppl"])
        out["perplexity_windows"] = int(windows.shape[0])
    if compare is not None:
        out["divergence"] = {"from": compare.source, "js_bits": token_divergence(data.ids, compare.ids)}
    return out


def summary_line(summary: dict) -> str:
    """One line for logs: ``books: 2 documents, 212,345 tokens; dense perplexity 61.2 on 32 x 256; JS divergence 0.21 bits from c4``."""
    parts = []
    if summary.get("documents") is not None:
        parts.append(f"{summary['documents']:,} documents, {summary['tokens']:,} tokens")
    else:
        parts.append("token ids without text")
    if summary.get("perplexity") is not None:
        parts.append(f"dense perplexity {summary['perplexity']:.2f} on {summary['perplexity_windows']} x {summary['seqlen']} tokens")
    div = summary.get("divergence")
    if div:
        parts.append(f"token JS divergence {div['js_bits']:.3f} bits from {div['from']}")
    return f"calibration data {summary['source']}: " + "; ".join(parts)

"""What a compression buys in size and speed: parameters, size on disk, prefill and decode speed, peak memory.

:func:`measure` takes the model as it is (dense, pruned, low-rank, structured)
on the device it already sits on. Pruned weights are still stored densely, so
an unstructured sparse model is as fast as the dense one; on a CUDA GPU, a
model whose linears follow the 2:4 pattern is also measured with those weights
converted to PyTorch's semi-structured sparse format (cuSPARSELt / CUTLASS),
the format that turns 2:4 sparsity into speed.

Timings use random token ids (speed does not depend on the text), a warm-up
pass first, and ``torch.cuda.synchronize`` around each timed region on CUDA.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager

import torch
from torch import nn

from workbench.quantization.export import stored_bytes

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _unique_tensors(model) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in model.state_dict().values():
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def parameter_counts(model) -> tuple[int, int]:
    """(total, non-zero) over the model's parameters, a tied embedding counted once."""
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def disk_bytes(model) -> int:
    """Bytes of tensor data an export writes (safetensors stores each shared tensor once, densely); a quantized
    linear counts as its compressed-tensors export stores it (packed codes, scales, zero points)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model)) + stored_bytes(model)


def _input_device(model) -> torch.device:
    for p in model.parameters():
        return torch.device("cpu") if p.device.type == "meta" else p.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vocab(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


@torch.no_grad()
def prefill_tokens_per_s(model, seqlen: int, batch_size: int = 1, repeats: int = 3, seed: int = 0) -> float:
    """Tokens per second of full forward passes over ``batch_size`` x ``seqlen`` tokens (no KV cache)."""
    device = _input_device(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab(model), (batch_size, seqlen), generator=gen).to(device)
    model(input_ids=ids, use_cache=False)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=ids, use_cache=False)
    _sync(device)
    return batch_size * seqlen * repeats / (time.perf_counter() - t0)


@torch.no_grad()
def decode_ms_per_token(model, prompt_len: int, new_tokens: int, seed: int = 0) -> float:
    """Milliseconds per generated token with the KV cache (greedy), prefill excluded.

    ``generate`` runs twice, for 1 and for ``new_tokens`` tokens (EOS
    suppressed); the difference over ``new_tokens - 1`` is the decode cost.
    """
    from transformers import GenerationConfig

    device = _input_device(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab(model), (1, prompt_len), generator=gen).to(device)
    pad = getattr(model.config, "pad_token_id", None)
    eos = getattr(model.config, "eos_token_id", None)

    def timed(n: int) -> float:
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad if pad is not None else eos,
                                  eos_token_id=eos)
        _sync(device)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        _sync(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    return 1000 * max(0.0, timed(new_tokens) - timed(1)) / (new_tokens - 1)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA memory allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "process peak resident memory"


def timings(model, seqlen: int, batch_size: int, new_tokens: int, repeats: int) -> dict:
    """Prefill tokens/s, decode ms/token and peak memory of the model in its current form."""
    device = _input_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill = prefill_tokens_per_s(model, seqlen, batch_size, repeats)
    decode = decode_ms_per_token(model, min(seqlen, 128), new_tokens)
    peak, kind = _peak_memory(device)
    return {"prefill_tokens_per_s": prefill, "decode_ms_per_token": decode, "peak_memory_bytes": peak, "peak_memory_kind": kind}


# ----------------------------------------------------------------------------- 2:4 semi-structured sparsity


def is_2_4(weight: torch.Tensor) -> bool:
    """At most two non-zeros in every group of four consecutive weights of each row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(1) <= 2).all())


def _decoder_linears(model) -> dict[str, nn.Linear]:
    from workbench.models import get_adapter

    adapter = get_adapter(model)
    out = {}
    for i, layer in enumerate(adapter.layers):
        for name, module in adapter.linear_modules(layer).items():
            if isinstance(module, nn.Linear):
                out[f"{adapter.layer_name(i)}.{name}"] = module
    return out


@contextmanager
def semi_structured(model):
    """Within the block, every decoder linear that is 2:4 sparse holds its weight in semi-structured sparse form.

    Only on CUDA, for float16/bfloat16 weights whose shapes the kernels
    accept; the others stay dense. Yields ``{"converted": n, "skipped": {name:
    reason}}``; the dense weights are back afterwards.
    """
    from torch.sparse import to_sparse_semi_structured

    originals: dict[str, nn.Parameter] = {}
    skipped: dict[str, str] = {}
    linears = _decoder_linears(model)
    try:
        for name, module in linears.items():
            w = module.weight
            if w.device.type != "cuda" or w.dtype not in SEMI_STRUCTURED_DTYPES:
                skipped[name] = f"{w.dtype} on {w.device.type}"
                continue
            if not is_2_4(w.data):
                skipped[name] = "not 2:4"
                continue
            try:
                sparse = to_sparse_semi_structured(w.data)
            except (RuntimeError, ValueError) as exc:
                skipped[name] = str(exc).splitlines()[0]
                continue
            originals[name] = w
            module.weight = nn.Parameter(sparse, requires_grad=False)
        yield {"converted": len(originals), "skipped": skipped}
    finally:
        for name, w in originals.items():
            linears[name].weight = w


# ----------------------------------------------------------------------------- all of it


def measure(model, tokenizer=None, device=None, *, seqlen: int = 512, batch_size: int = 1, new_tokens: int = 32,
            repeats: int = 3, sparse_24: bool = True) -> dict:
    """Size and speed of ``model`` as it is, on the device its weights are on (``device`` is recorded).

    Returns ``{"device", "dtype", "parameters", "nonzero_parameters",
    "disk_bytes", "seqlen", "batch_size", "new_tokens", "runs"}`` where
    ``runs["dense"]`` (the weights as stored) and, on CUDA for a model with 2:4
    linears, ``runs["2:4"]`` (semi-structured sparse weights) hold
    ``prefill_tokens_per_s``, ``decode_ms_per_token`` and ``peak_memory_bytes``.
    ``seqlen`` is capped at the model's context. ``tokenizer`` is accepted for
    symmetry with the other evaluations; speed is measured on random ids.
    """
    actual = _input_device(model)
    context = getattr(model.config, "max_position_embeddings", None) or seqlen
    seqlen = max(2, min(seqlen, int(context) - new_tokens))
    total, nonzero = parameter_counts(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    result = {
        "device": str(device if device is not None else actual), "dtype": str(dtype).replace("torch.", ""),
        "parameters": total, "nonzero_parameters": nonzero, "disk_bytes": disk_bytes(model),
        "seqlen": seqlen, "batch_size": batch_size, "new_tokens": new_tokens, "runs": {},
    }
    was_training = model.training
    model.eval()
    try:
        result["runs"]["dense"] = timings(model, seqlen, batch_size, new_tokens, repeats)
        if sparse_24 and actual.type == "cuda":
            with semi_structured(model) as converted:
                if converted["converted"]:
                    result["runs"]["2:4"] = {**timings(model, seqlen, batch_size, new_tokens, repeats),
                                             "converted_linears": converted["converted"],
                                             "dense_linears": len(converted["skipped"])}
    finally:
        model.train(was_training)
    return result


def metrics(result: dict) -> list[dict]:
    """The measurement as metric dicts (name, dataset, value, extra) for the run history."""
    common = {"device": result["device"], "dtype": result["dtype"], "kind": "efficiency"}
    out = [{"name": name, "dataset": "model", "value": float(result[name]), "extra": dict(common)}
           for name in ("parameters", "nonzero_parameters", "disk_bytes")]
    for form, run in result["runs"].items():
        extra = {**common, "format": form, "seqlen": result["seqlen"], "batch_size": result["batch_size"],
                 "new_tokens": result["new_tokens"], "peak_memory_kind": run["peak_memory_kind"]}
        for name in ("prefill_tokens_per_s", "decode_ms_per_token", "peak_memory_bytes"):
            out.append({"name": name, "dataset": form, "value": float(run[name]), "extra": dict(extra)})
    return out

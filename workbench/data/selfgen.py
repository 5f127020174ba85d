"""Self-generated calibration data: text the model writes itself from short prefixes of a seed corpus.

Ji et al. ("Beware of Calibration Data for Pruning Large Language Models",
ICLR 2025) find that calibration data resembling the model's pre-training
data prunes best, and that where that data is not available the model's own
generations are a good substitute: they follow the distribution the model
learned. The procedure (every number is a setting of ``[calibration.selfgen]``,
``workbench.spec.SelfGenSpec``):

1. Seeds: texts of a seed corpus (paragraphs of WikiText-2 validation by
   default), drawn at random; only the first k tokens of each are kept (k = 2).
2. Generation with the model: sampling at temperature 0.6, top_p 0.95,
   top_k 50, repetition penalty 1.2, up to seqlen new tokens (fewer when
   prompt and continuation would not fit the model's context), batched with
   left padding (pad = eos) and the KV cache, special tokens skipped.
3. Filter: each sample's perplexity under the same model; the samples below
   the 80th percentile are kept (the worst 20% dropped).
4. Use: ``workbench.data.sampling`` joins the kept texts and cuts random windows
   as for every other source (the ``selfgen`` source is registered there).

The generated set is cached on disk, before filtering, under a hash of
everything that determines it (the model's weights, the tokenizer, the seed
corpus, k, the sampling settings, the count, the length, the seed, the batch
size, device and dtype), written atomically so a cancelled run leaves no
entry. Generation is deterministic for a seed on a given device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from workbench.errors import Cancelled, UserError
from workbench.evaluation.placement import placed
from workbench.files import atomic_write
from workbench.spec import SelfGenSpec, validate_selfgen

from .cache import source_fingerprint, tokenizer_fingerprint
from .sampling import encode, text_documents

log = logging.getLogger(__name__)

# Bump when generation or scoring changes, so sets cached by an older version are not reused.
CACHE_VERSION = 1
# float logits handled at once when scoring samples (512 MiB in float32)
_SCORE_ELEMENTS = 1 << 27
_HEADING = re.compile(r"^=+ .* =+$")  # WikiText section titles, " = Title = "

ProgressFn = Callable[[int, int, str], None]


@dataclass
class GeneratedSet:
    """The generated samples (before filtering) and which of them the filter keeps.

    Each sample is ``{"prefix": seed text, "text": generated text (with the
    prefix), "tokens": token count, "perplexity": under the generating model
    (None when undefined)}``. ``kept`` lists the indices below ``threshold``,
    the ``keep`` quantile of the perplexities.
    """

    samples: list[dict]
    kept: list[int]
    threshold: float
    key: str
    from_cache: bool
    seconds: float  # generation and scoring, when the set was made
    new_tokens: int

    @property
    def kept_texts(self) -> list[str]:
        return [self.samples[i]["text"] for i in self.kept]


# ---------------------------------------------------------------- seeds


def seed_texts(corpus: str) -> list[str]:
    """The seed corpus cut into texts: each document's paragraphs (split at blank lines), WikiText titles dropped."""
    texts = []
    for document in text_documents(corpus):
        for paragraph in re.split(r"\n\s*\n", document):
            paragraph = paragraph.strip()
            if paragraph and not _HEADING.match(paragraph):
                texts.append(paragraph)
    return texts


def _bos(tokenizer) -> list[int]:
    """The BOS id when the tokenizer adds one by default (Llama), so prompts start as the model's inputs do."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", verbose=False)["input_ids"]
    return [bos] if with_special and with_special[0] == bos and encode(tokenizer, "a")[:1] != [bos] else []


def pick_prompts(texts: list[str], tokenizer, count: int, k: int, seed: int, corpus: str = "the seed corpus") -> list[list[int]]:
    """``count`` prompts: the first ``k`` tokens of texts drawn at random (``random.Random(seed)``), skipping shorter texts."""
    if len(texts) < count:
        raise UserError(
            f"the seed corpus {corpus} holds {len(texts)} texts; selfgen needs {count} (one per generated sample)",
            hint="use a larger corpus (calibration.selfgen.corpus), or generate fewer samples "
                 "(calibration.selfgen.samples, calibration.nsamples)",
        )
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    bos = _bos(tokenizer)
    prompts: list[list[int]] = []
    for i in order:
        ids = encode(tokenizer, texts[i])
        if len(ids) >= k:
            prompts.append(bos + ids[:k])
            if len(prompts) == count:
                return prompts
    raise UserError(
        f"only {len(prompts)} of the {len(texts)} texts of {corpus} have at least {k} tokens; selfgen needs {count}",
        hint="lower calibration.selfgen.prefix_tokens (the paper uses 2), or use a corpus of longer texts",
    )


# ----------------------------------------------------------- generation


def _stop_on_cancel(cancel: Callable[[], bool]):
    """A stopping criterion that ends generation at the next token once ``cancel()`` is true."""
    from transformers import StoppingCriteria

    class StopOnCancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(cancel()), dtype=torch.bool, device=input_ids.device)

    return StopOnCancel()


def _cancelled(cancel) -> bool:
    return cancel is not None and bool(cancel())


def generate(model, prompts: list[list[int]], params: SelfGenSpec, max_new_tokens: int, eos: int, seed: int,
             device: torch.device, progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None) -> tuple[list[list[int]], int]:
    """Sample a continuation of every prompt; returns (prompt + new tokens up to the first eos, new tokens in all).

    Batches of ``params.batch_size`` prompts, left-padded with ``eos``, sampled
    with the KV cache under ``torch.manual_seed(seed)`` (the global RNG state
    is restored afterwards). Cancelling stops within a batch; ``Cancelled`` is
    raised and nothing is returned.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    config = GenerationConfig(
        do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        repetition_penalty=params.repetition_penalty, max_new_tokens=max_new_tokens,
        pad_token_id=eos, eos_token_id=eos, use_cache=True,
    )
    stopping = StoppingCriteriaList([_stop_on_cancel(cancel)]) if cancel is not None else None
    sequences: list[list[int]] = []
    new_tokens = 0
    t0 = time.perf_counter()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), params.batch_size):
            if _cancelled(cancel):
                raise Cancelled(f"self-generation cancelled after {start} of {len(prompts)} samples", "nothing was cached")
            batch = prompts[start : start + params.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), eos, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, prompt in enumerate(batch):
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 stopping_criteria=stopping)
            if _cancelled(cancel):
                raise Cancelled(f"self-generation cancelled after {start} of {len(prompts)} samples", "nothing was cached")
            for row, prompt in enumerate(batch):
                new = out[row, width:].tolist()
                if eos in new:
                    new = new[: new.index(eos)]
                sequences.append(list(prompt) + new)
                new_tokens += len(new)
            if progress is not None:
                done, elapsed = len(sequences), time.perf_counter() - t0
                eta = elapsed / done * (len(prompts) - done)
                progress(done, len(prompts), f"generating: {new_tokens / elapsed:,.0f} tokens/s, ETA {eta:,.0f} s")
    return sequences, new_tokens


@torch.no_grad()
def sample_perplexities(model, sequences: list[list[int]], device: torch.device, cancel: Callable[[], bool] | None = None) -> list[float]:
    """Each sequence's perplexity under ``model``: exp of its mean next-token loss (inf when it has one token).

    Sequences are scored in right-padded batches (padding masked out), as many
    at once as fit ``_SCORE_ELEMENTS`` logits.
    """
    import torch.nn.functional as F

    vocab = int(model.get_output_embeddings().weight.shape[0])
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # similar lengths share a batch
    result = [math.inf] * len(sequences)
    start = 0
    while start < len(order):
        if _cancelled(cancel):
            raise Cancelled("self-generation cancelled while scoring the samples", "nothing was cached")
        width = max(2, len(sequences[order[start]]))
        rows = max(1, _SCORE_ELEMENTS // (width * vocab))
        chunk = order[start : start + rows]
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, i in enumerate(chunk):
            n = len(sequences[i])
            if n >= 2:
                loss = F.cross_entropy(logits[row, : n - 1].float(), ids[row, 1:n].to(logits.device))
                result[i] = math.exp(float(loss)) if float(loss) < 709.0 else math.inf
        del logits
        start += len(chunk)
    return result


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    h = (len(ordered) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def keep_below_quantile(perplexities: list[float | None], keep: float) -> tuple[float, list[int]]:
    """(threshold, indices kept): the samples with a finite perplexity below the ``keep`` quantile (all of them at keep = 1)."""
    finite = [(i, p) for i, p in enumerate(perplexities) if p is not None and math.isfinite(p)]
    if not finite:
        return math.nan, []
    threshold = quantile([p for _, p in finite], keep)
    if keep >= 1.0:
        return threshold, [i for i, _ in finite]
    return threshold, [i for i, p in finite if p < threshold]


# ---------------------------------------------------------------- cache


def weights_fingerprint(model, per_tensor: int = 65536) -> str:
    """A hash of the model's tensors: names, shapes, dtypes and up to ``per_tensor`` evenly spaced values of each.

    Hashing every byte of a 7B model would take longer than a cached
    generation saves; pruning, fine-tuning or another checkpoint change the
    sampled values. (A change confined to a few weights between the samples
    goes unnoticed.)
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.device.type == "meta" or flat.numel() == 0:
            continue
        step = max(1, flat.numel() // per_tensor)
        digest.update(flat[::step][:per_tensor].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def cache_key(model, tokenizer, params: SelfGenSpec, count: int, max_new_tokens: int, seed: int, device: torch.device) -> str:
    """The hash of everything that determines a generated set (``keep`` is not in it: the cache holds the set before filtering)."""
    import transformers

    dtype = next(model.parameters()).dtype
    payload = {
        "version": CACHE_VERSION,
        "model": {"class": type(model).__name__, "weights": weights_fingerprint(model)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "corpus": source_fingerprint(params.corpus),
        "settings": {k: v for k, v in asdict(params).items() if k not in ("keep", "samples", "max_new_tokens", "corpus")},
        "count": count,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "device": device.type,
        "dtype": str(dtype),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"selfgen-{key[:32]}.json"


def _load(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable self-generated set %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) and data.get("key") == key and isinstance(data.get("samples"), list) else None


def _save(path: Path, data: dict) -> None:
    try:
        atomic_write(path, lambda fh: fh.write(json.dumps(data, ensure_ascii=False).encode("utf-8")))
    except OSError as exc:  # caching is an optimization; a read-only folder must not fail the run
        log.warning("could not cache the self-generated set in %s: %s", path.parent, exc)


# ---------------------------------------------------------------- entry points


def generated_set(model, tokenizer, params: SelfGenSpec, nsamples: int, seqlen: int, seed: int = 0, device=None,
                  cache_dir=None, progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None) -> GeneratedSet:
    """Generate (or load from ``cache_dir``) ``params.samples`` texts (default ``ceil(nsamples / keep)``) and filter them."""
    validate_selfgen(params)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError("the tokenizer has no end-of-sequence token, which selfgen pads with and stops at",
                        hint="use another calibration source, or a model whose tokenizer defines eos_token")
    device = torch.device(device) if device is not None else torch.device("cpu")
    count = params.samples or math.ceil(nsamples / params.keep)
    max_new = max_new_tokens(model, tokenizer, params, seqlen)
    key = cache_key(model, tokenizer, params, count, max_new, seed, device)
    path = cache_path(cache_dir, key) if cache_dir is not None else None
    data = _load(path, key) if path is not None else None
    from_cache = data is not None
    if data is None:
        prompts = pick_prompts(seed_texts(params.corpus), tokenizer, count, params.prefix_tokens, seed, params.corpus)
        t0 = time.perf_counter()
        with placed(model, device) as dev:
            sequences, new_tokens = generate(model, prompts, params, max_new, eos, seed, dev, progress, cancel)
            if progress is not None:
                progress(count, count, "scoring the samples")
            perplexities = sample_perplexities(model, sequences, dev, cancel)
        samples = [
            {"prefix": tokenizer.decode(prompt, skip_special_tokens=True), "text": tokenizer.decode(seq, skip_special_tokens=True),
             "tokens": len(seq), "perplexity": p if math.isfinite(p) else None}
            for prompt, seq, p in zip(prompts, sequences, perplexities)
        ]
        data = {"key": key, "samples": samples, "seconds": time.perf_counter() - t0, "new_tokens": new_tokens}
        if path is not None:
            _save(path, data)
    samples = data["samples"]
    perplexities = [s["perplexity"] if s["text"].strip() else None for s in samples]
    threshold, kept = keep_below_quantile(perplexities, params.keep)
    return GeneratedSet(samples, kept, threshold, key, from_cache, float(data.get("seconds", 0.0)), int(data.get("new_tokens", 0)))


def max_new_tokens(model, tokenizer, params: SelfGenSpec, seqlen: int) -> int:
    """``max_new_tokens`` (default: seqlen), capped so prompt and continuation stay within the model's context."""
    wanted = params.max_new_tokens or seqlen
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return wanted
    room = context - params.prefix_tokens - len(_bos(tokenizer))
    if room < 1:
        raise UserError(f"calibration.selfgen.prefix_tokens = {params.prefix_tokens} leaves no room to generate in the model's "
                        f"{context}-token context", hint="use a shorter prefix (the paper uses 2)")
    return min(wanted, room)


def params_from(options, corpus: str = "") -> SelfGenSpec:
    """The settings a source context carries (a SelfGenSpec or its dict), with the corpus of ``selfgen:CORPUS``."""
    params = options if isinstance(options, SelfGenSpec) else SelfGenSpec(**(options or {}))
    return replace(params, corpus=corpus) if corpus else params


def selfgen_source(arg, tokenizer, nsamples, seqlen, seed, model, context) -> list[str]:
    """The ``selfgen[:CORPUS]`` calibration source: the kept texts (``workbench.data.sampling`` joins them and cuts windows)."""
    if model is None:
        raise UserError("the selfgen calibration source needs the model that generates the text", hint="pass model= to calibration_samples")
    params = params_from(context.options.get("selfgen"), arg)
    gset = generated_set(model, tokenizer, params, nsamples, seqlen, seed, device=context.device, cache_dir=context.cache_dir,
                         progress=context.progress, cancel=context.cancel)
    tokens = sum(gset.samples[i]["tokens"] for i in gset.kept)
    if tokens - seqlen < nsamples:
        raise UserError(
            f"selfgen kept {len(gset.kept)} of {len(gset.samples)} generated texts ({tokens:,} tokens): "
            f"too little for {nsamples} windows of {seqlen} tokens",
            hint=f"generate more texts: set calibration.selfgen.samples above {len(gset.samples)}",
        )
    return gset.kept_texts


def export_jsonl(gset: GeneratedSet, path, include_dropped: bool = False) -> Path:
    """Write the kept samples (all of them with ``include_dropped``) as JSON lines, atomically.

    Each line is ``{"text", "prefix", "perplexity", "kept"}``; the file loads
    back as the calibration source ``file:PATH`` (its ``text`` fields).
    """
    path = Path(path).expanduser()
    kept = set(gset.kept)
    rows = [dict(s, kept=i in kept) for i, s in enumerate(gset.samples) if include_dropped or i in kept]
    lines = "".join(json.dumps({k: r[k] for k in ("text", "prefix", "perplexity", "kept")}, ensure_ascii=False) + "\n" for r in rows)
    try:
        atomic_write(path, lambda fh: fh.write(lines.encode("utf-8")))
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc}", hint="choose a writable path") from exc
    return path

"""In-context learning on classification sets: zero-shot, few-shot and DAIL, as modes of one runner.

Every mode uses the same prompt (``DataSet.template``) and label words, and
predicts by comparing the log-likelihood of each label word (with its leading
space) after the prompt, so the modes differ only in the demonstrations put
before the query:

- ``zeroshot``: none.
- ``fewshot``: K labelled examples drawn at random from the train split, for
  each query (seeded).
- ``dail`` (Demonstration Augmentation for In-context Learning, Su et al.
  2024): the test queries are processed in a seeded order; after each
  prediction the pair (query, predicted label) enters a memory of at most M
  items (the oldest leaves first). Each query takes the K most relevant
  memory items as demonstrations: BM25 over words, or the cosine of the
  model's own mean-pooled last hidden states, optionally only among
  confident predictions (normalized entropy of the label distribution at
  most ``max_entropy``). Demonstrations are ordered by relevance, the most
  relevant next to the query. No gold label is ever used: the memory holds
  predictions only.

Accuracy is the mean over several orders (seeds), with its standard deviation.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from workbench.errors import Cancelled, UserError

from . import shifts as shifting
from .icl_data import MODES, RETRIEVERS, DataSet, Example, check_k_memory, get_dataset, query_subset, read_examples
from .tta import Adapter, TTAConfig

DEMO_SEPARATOR = "\n\n"
BM25_K1, BM25_B = 1.5, 0.75


@dataclass
class ICLConfig:
    mode: str = "dail"
    k: int = 4
    memory: int = 32
    retriever: str = "bm25"
    max_entropy: float | None = None

    def check(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"ICL mode {self.mode!r} is not a mode", f"allowed: {', '.join(MODES)}")
        if self.retriever not in RETRIEVERS:
            raise UserError(f"ICL retriever {self.retriever!r} is not a retriever", f"allowed: {', '.join(RETRIEVERS)}")
        if self.k < 1 or self.memory < 0:
            raise UserError(f"ICL needs K >= 1 and M >= 0, not K = {self.k}, M = {self.memory}", "the usual setting is K = 4")
        check_k_memory(self.k, self.memory, "K", "M")


@dataclass
class MemoryItem:
    """One earlier query with the label the model predicted for it (never its gold label)."""

    position: int  # the query's index in the test set
    fields: dict
    text: str
    label: int
    entropy: float  # of the predicted label distribution, over log(labels)
    embedding: torch.Tensor | None = None


class Memory:
    """At most ``capacity`` items; adding to a full memory drops the oldest."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: deque[MemoryItem] = deque(maxlen=capacity)

    def add(self, item: MemoryItem) -> None:
        if self.capacity > 0:
            self._items.append(item)

    @property
    def items(self) -> list[MemoryItem]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Prediction:
    position: int
    label: int
    gold: int
    logprobs: list[float]  # per label word
    demos: list[int] = field(default_factory=list)  # test positions (DAIL) or train positions (few-shot), prompt order
    memory_size: int = 0  # after this query was added


# ----------------------------------------------------------------------------- retrieval


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25_scores(query: str, documents: list[str], k1: float = BM25_K1, b: float = BM25_B) -> list[float]:
    """Okapi BM25 of each document for the query, the documents being the whole corpus.

    ``idf = ln(1 + (N - n + 0.5) / (n + 0.5))`` (never negative), summed over
    the query's distinct words.
    """
    docs = [Counter(words(d)) for d in documents]
    if not docs:
        return []
    lengths = [sum(c.values()) for c in docs]
    avgdl = (sum(lengths) / len(docs)) or 1.0
    df = Counter(w for c in docs for w in c)
    n = len(docs)
    terms = set(words(query))
    idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in terms}
    scores = []
    for c, dl in zip(docs, lengths):
        s = 0.0
        for t in terms:
            f = c.get(t, 0)
            if f:
                s += idf[t] * f * (k1 + 1) / (f + k1 * (1 - b + b * dl / avgdl))
        scores.append(s)
    return scores


def cosine_scores(query: torch.Tensor, keys: list[torch.Tensor]) -> list[float]:
    if not keys:
        return []
    return F.cosine_similarity(query.float().unsqueeze(0), torch.stack(keys).float(), dim=-1).tolist()


def top_k(scores: list[float], k: int) -> list[int]:
    """Indices of the k highest scores, best first; ties go to the earlier (older) item."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


# ----------------------------------------------------------------------------- the runner


def continuation_logprobs(model, rows: list[list[int]], spans: list[tuple[int, int, list[int]]], device,
                          pad: int = 0) -> torch.Tensor:
    """Summed log-probability of each span's tokens, in one forward pass over the right-padded ``rows`` (differentiable).

    A span ``(row, start, tokens)`` reads its tokens' log-probabilities at
    positions ``start``, ``start + 1``... of that row (the position before
    each token). With causal attention, padding after a position never
    changes that position's logits, so no attention mask is needed.
    """
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    return torch.stack([logp[row, torch.arange(start, start + len(tokens), device=logp.device),
                             torch.tensor(tokens, device=logp.device)].sum() for row, start, tokens in spans])


class ICLRunner:
    """Scores label words after prompts for one model and one data set."""

    def __init__(self, model, tokenizer, dataset: DataSet, context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.context = int(context_length or getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.truncated = 0  # prompts that lost demonstrations (or the query's start) to fit the context

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return torch.device("cpu") if p.device.type == "meta" else p.device
        return torch.device("cpu")

    # -- prompts

    def render(self, fields: dict) -> str:
        try:
            return self.dataset.template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(f"the template {self.dataset.template!r} of {self.dataset.title} does not fit its examples ({exc})",
                            "use the example's fields in braces, e.g. {text}") from None

    def prompt(self, demos: list[tuple[dict, int]], query: dict) -> str:
        """Demonstrations (fields, label) in the given order, then the query; blank lines between."""
        parts = [f"{self.render(f)} {self.dataset.label_words[label]}" for f, label in demos]
        return DEMO_SEPARATOR.join([*parts, self.render(query)])

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, verbose=False)["input_ids"])

    def encode(self, prompt: str, choices: tuple[str, ...] | None = None) -> tuple[list[int], list[list[int]]]:
        """The prompt's tokens and each choice's continuation tokens (the label words by default), split as lm-eval does.

        The prompt followed by " word" is encoded whole and cut where the
        prompt's own encoding ends, so the continuation is what the model
        would have to produce after exactly this context.
        """
        ctx = self._encode(prompt)
        words = self.dataset.label_words if choices is None else choices
        return ctx, [self._encode(f"{prompt} {word}")[len(ctx):] for word in words]

    def fitted(self, demos: list[tuple[dict, int]], query: dict,
               choices: tuple[str, ...] | None = None) -> tuple[list[int], list[list[int]], int]:
        """Context and continuations that fit the model's context, dropping the least relevant (first) demonstrations.

        Returns the tokens and how many demonstrations were kept. A query too
        long on its own keeps its end (where the template asks the question).
        """
        demos = list(demos)
        while True:
            ctx, conts = self.encode(self.prompt(demos, query), choices)
            room = self.context - max(len(c) for c in conts)
            if len(ctx) <= room or not demos:
                break
            demos = demos[1:]
        return ctx[max(0, len(ctx) - room):], conts, len(demos)

    def scores(self, ctx: list[int], conts: list[list[int]], norms: list[int] | None = None) -> torch.Tensor:
        """Summed log-probability of each continuation's tokens after the context, in one forward pass (differentiable).

        The rows are the context followed by each continuation of several
        tokens (all but its last token), right-padded: with causal attention
        padding after a position never changes that position's logits, so no
        attention mask is needed, and the context's last position in row 0
        scores every continuation's first token. With ``norms`` (multiple
        choice: each choice's length in bytes) each sum is divided by its norm.
        """
        longer = [c for c in conts if len(c) > 1] or [[]]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        spans = [(longer.index(cont) if len(cont) > 1 else 0, len(ctx) - 1, cont) for cont in conts]
        out = continuation_logprobs(self.model, [ctx + c[:-1] for c in longer], spans, self.device, pad)
        if norms is not None:
            out = out / torch.tensor(norms, dtype=out.dtype, device=out.device)
        return out.cpu()

    @torch.no_grad()
    def label_logprobs(self, ctx: list[int], conts: list[list[int]], norms: list[int] | None = None) -> torch.Tensor:
        """:meth:`scores` without gradients: what a plain evaluation compares."""
        return self.scores(ctx, conts, norms)

    def norms(self, choices: tuple[str, ...] | None) -> list[int] | None:
        """Bytes of each choice with its leading space, for multiple-choice sets (lm-eval's acc_norm); None otherwise."""
        return [len(f" {c}".encode("utf-8")) for c in choices] if self.dataset.multiple_choice else None

    def inputs(self, demos: list[tuple[dict, int]], example: Example) -> tuple[list[int], list[list[int]], list[int] | None, int]:
        """What one query's scoring reads: context, continuations, norms, demonstrations kept."""
        choices = self.dataset.choices(example)
        ctx, conts, kept = self.fitted(demos, example.fields, choices)
        return ctx, conts, self.norms(choices), kept

    @torch.no_grad()
    def embed(self, fields: dict) -> torch.Tensor:
        """The model's last hidden states over the rendered query, mean-pooled (the ``hidden`` retriever's key)."""
        ids = self._encode(self.render(fields))[-self.context:]
        out = self.model(input_ids=torch.tensor([ids], device=self.device), output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1][0].float().mean(0).cpu()

    def predict(self, demos: list[tuple[dict, int]], query: Example) -> tuple[int, torch.Tensor, float]:
        ctx, conts, norms, kept = self.inputs(demos, query)
        if kept < len(demos):
            self.truncated += 1
        logprobs = self.label_logprobs(ctx, conts, norms)
        p = torch.softmax(logprobs.double(), 0)
        entropy = float(-(p * p.clamp_min(1e-300).log()).sum() / math.log(len(p))) if len(p) > 1 else 0.0
        return int(torch.argmax(logprobs)), logprobs, entropy

    # -- one pass over the queries

    def run(self, queries: list[Example], order: list[int], config: ICLConfig, seed: int = 0,
            train: list[Example] | None = None, progress: Callable[[int], None] | None = None,
            cancel: Callable[[], bool] | None = None, memory: Memory | None = None, adapter=None) -> list[Prediction]:
        """Predict every query in ``order`` (positions into ``queries``); DAIL fills ``memory`` as it goes.

        With an ``adapter`` (:class:`workbench.evaluation.tta.Adapter`), each
        batch of queries is first adapted on (the prompts as they stand at the
        batch's start), then predicted exactly as without one.
        """
        config.check()
        if config.mode == "fewshot" and not train:
            raise UserError(f"few-shot needs the train split of {self.dataset.title}", "use icl_modes zeroshot or dail")
        memory = memory if memory is not None else Memory(config.memory)
        batch = adapter.config.batch if adapter is not None else 0
        out: list[Prediction] = []
        for step, pos in enumerate(order):
            if cancel is not None and step % 16 == 0 and cancel():
                raise Cancelled("in-context learning evaluation cancelled", "the metrics so far are kept in the run history")
            if batch and step % batch == 0:
                adapter.adapt([self._scorer(p, queries[p], config, memory, seed, train) for p in order[step:step + batch]])
            query = queries[pos]
            embedding = self.embed(query.fields) if config.mode == "dail" and config.retriever == "hidden" else None
            demo_ids, demos = self.demonstrations(pos, query, embedding, config, memory, seed, train)
            label, logprobs, entropy = self.predict(demos, query)
            if config.mode == "dail":
                memory.add(MemoryItem(pos, query.fields, query.text(), label, entropy, embedding))
            out.append(Prediction(pos, label, query.label, logprobs.tolist(), demo_ids, len(memory)))
            if batch and (step % batch == batch - 1 or step == len(order) - 1):
                adapter.end_batch()
            if progress is not None:
                progress(step + 1)
        return out

    def demonstrations(self, pos: int, query: Example, embedding: torch.Tensor | None, config: ICLConfig, memory: Memory,
                       seed: int, train: list[Example] | None) -> tuple[list[int], list[tuple[dict, int]]]:
        """The query's demonstrations (their positions, and (fields, label) pairs in prompt order) for the mode."""
        if config.mode == "dail":
            chosen = self.retrieve(memory, query, embedding, config)
            return [m.position for m in chosen], [(m.fields, m.label) for m in chosen]
        if config.mode == "fewshot":
            picks = random.Random(seed * 1_000_003 + pos).sample(range(len(train)), min(config.k, len(train)))
            return picks, [(train[i].fields, train[i].label) for i in picks]
        return [], []

    def _scorer(self, pos: int, query: Example, config: ICLConfig, memory: Memory, seed: int,
                train: list[Example] | None) -> Callable[[], torch.Tensor]:
        """A function computing the query's scores with gradients, on the prompt the plain evaluation would build now."""
        embedding = self.embed(query.fields) if config.mode == "dail" and config.retriever == "hidden" else None
        _, demos = self.demonstrations(pos, query, embedding, config, memory, seed, train)
        ctx, conts, norms, _ = self.inputs(demos, query)
        return lambda: self.scores(ctx, conts, norms)

    def retrieve(self, memory: Memory, query: Example, embedding: torch.Tensor | None, config: ICLConfig) -> list[MemoryItem]:
        """The K most relevant eligible memory items, least relevant first (the most relevant ends next to the query)."""
        items = memory.items
        if config.max_entropy is not None:
            items = [m for m in items if m.entropy <= config.max_entropy]
        if config.retriever == "bm25":
            scores = bm25_scores(query.text(), [m.text for m in items])
        else:
            scores = cosine_scores(embedding, [m.embedding for m in items])
        return [items[i] for i in reversed(top_k(scores, config.k))]


# ----------------------------------------------------------------------------- whole evaluations


def accuracy(predictions: list[Prediction]) -> float:
    return sum(p.label == p.gold for p in predictions) / len(predictions) if predictions else math.nan


def evaluate_dataset(model, tokenizer, name: str, configs: list[ICLConfig], seeds: int = 3, limit: int | None = None,
                     labels: tuple[str, ...] | list[str] = (), template: str = "", context_length: int | None = None,
                     progress: Callable[[str, int, int], None] | None = None,
                     cancel: Callable[[], bool] | None = None, adaptations: list | None = None,
                     on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """One data set in each mode of ``configs`` (and each test-time adaptation): accuracy mean and std over ``seeds``.

    ``name`` may carry shifts (``sst2@typo:0.15``, :mod:`workbench.evaluation.shifts`):
    the test queries are perturbed anew for each seed (the seed also orders
    the queries and draws PCL's perturbations). ``adaptations`` are
    :class:`workbench.evaluation.tta.TTAConfig` (default: none). Zero-shot
    without shift or adaptation does not depend on the seed, so it runs once.
    Each result records the seconds per query, and its ratio to the plain
    evaluation of the same mode when that ran too. ``on_result`` is called
    with each result as soon as it is measured (the TUI's table fills live).
    """
    base, shifts = shifting.parse_set_name(name)
    dataset = get_dataset(base, labels, template)
    adaptations = sorted(adaptations or [TTAConfig()], key=lambda t: t.mode != "none")  # the plain timing first
    for config in configs:
        config.check()
        if dataset.multiple_choice and config.mode != "zeroshot":
            raise UserError(f"{dataset.title} is multiple choice: each query has its own candidates, so there are no "
                            f"label words to put in {config.mode} demonstrations", "use icl_modes = [\"zeroshot\"] for it")
    clean = read_examples(dataset, "test")
    positions = query_subset(len(clean), limit)
    train = read_examples(dataset, "train") if any(c.mode == "fewshot" for c in configs) else None
    runner = ICLRunner(model, tokenizer, dataset, context_length)

    def runs(config, tta) -> int:
        fixed = config.mode == "zeroshot" and not shifts and (tta.mode == "none" or (tta.mode == "tent" and tta.episodic))
        return 1 if fixed else seeds

    total = sum(len(positions) * runs(c, t) for c in configs for t in adaptations)
    done = 0
    results = []
    for config in configs:
        plain_time = None
        for tta in adaptations:
            runner.truncated = 0
            accs, seconds, steps = [], 0.0, 0
            label = f"{name}/{config.mode}" + ("" if tta.mode == "none" else f"+{tta.mode}")
            for seed in range(runs(config, tta)):
                examples = shifting.shift_examples(clean, shifts, seed) if shifts else clean
                order = list(positions)
                random.Random(seed).shuffle(order)

                def step(n, base=done):
                    if progress is not None:
                        progress(label, base + n, total)

                started = time.perf_counter()
                if tta.mode == "none":
                    preds = runner.run(examples, order, config, seed, train, step, cancel)
                else:
                    with Adapter(model, tta, seed) as adapter:
                        preds = runner.run(examples, order, config, seed, train, step, cancel, adapter=adapter)
                        steps += adapter.steps_taken
                seconds += time.perf_counter() - started
                done += len(order)
                accs.append(accuracy(preds))
            per_query = seconds / (len(positions) * len(accs))
            if tta.mode == "none":
                plain_time = per_query
            extra = {"kind": "icl", "mode": config.mode, "std": statistics.pstdev(accs) if len(accs) > 1 else None,
                     "accuracies": accs, "seeds": len(accs), "k": config.k if config.mode != "zeroshot" else 0,
                     "memory": config.memory if config.mode == "dail" else None,
                     "retriever": config.retriever if config.mode == "dail" else None,
                     "max_entropy": config.max_entropy if config.mode == "dail" else None,
                     "labels": list(dataset.label_words), "template": dataset.template,
                     "truncated_prompts": runner.truncated, "set": base, "shift": "+".join(s.name for s in shifts) or None,
                     "tta": tta.mode, "seconds_per_query": per_query,
                     "time_ratio": per_query / plain_time if plain_time else None}
            if tta.mode != "none":
                extra["tta_settings"] = tta.settings()
                extra["tta_steps_taken"] = steps
            results.append({"name": "icl_acc", "dataset": label, "value": statistics.fmean(accs), "stderr": None,
                            "samples": len(positions), "limit": limit, "extra": extra})
            if on_result is not None:
                on_result(results[-1])
    return results


def configs_from_spec(e) -> list[ICLConfig]:
    """One ICLConfig per mode of an EvalSpec's ``icl_*`` settings."""
    return [ICLConfig(mode=m, k=e.icl_k, memory=e.icl_memory, retriever=e.icl_retriever, max_entropy=e.icl_max_entropy)
            for m in e.icl_modes]


"""Vocabulary pruning: keep the tokens a target corpus uses, and every token needed to encode any text.

Works on BPE tokenizers with a byte alphabet (``tokenizer.json`` with a BPE
model and either a ByteLevel pre-tokenizer, as GPT-2, Llama 3 and Qwen, or
``byte_fallback``, as Llama 2, Mistral and Gemma). Kept:

- every added and special token, and the ids the config and the
  post-processor name (BOS, EOS, padding);
- the byte alphabet (the 256 byte-level characters, or the ``<0xXX>``
  fallback tokens), so that any text still encodes;
- the most frequent tokens of the counted corpus, each with its *merge
  closure*: the parts of every merge that produces it, recursively. A merge
  is kept when its two parts and its result are kept.

Why this is exact for text made of kept tokens: BPE applies, among the
merges that apply, the one of lowest rank. Every merge the original
tokenizer applies to build a kept token is kept (the closure), so at each
step the pruned tokenizer finds the same lowest-rank merge and produces the
same tokens. Other text falls back to shorter kept tokens, down to bytes,
and still decodes to itself.

New ids follow the old order (``new = rank of old id among the kept``). The
embedding rows and LM head rows are sliced with the same index, so a kept
token's vectors do not change.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workbench.errors import UserError

from .layout import slice_linear

CONFIG_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "spiece.model")


@dataclass
class Vocabulary:
    """A BPE tokenizer's definition (its ``tokenizer.json``) and what pruning needs to know about it."""

    data: dict
    byte_level: bool

    @property
    def vocab(self) -> dict[str, int]:
        return self.data["model"]["vocab"]

    @property
    def merges(self) -> list[tuple[str, str]]:
        return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in self.data["model"]["merges"]]

    def tokens(self) -> dict[int, str]:
        """Every id (model vocabulary and added tokens) to its token string."""
        tokens = {i: t for t, i in self.vocab.items()}
        tokens.update({t["id"]: t["content"] for t in self.data.get("added_tokens") or []})
        return tokens

    def alphabet(self) -> set[int]:
        """The ids that let any text be encoded: the byte-level characters, or the byte-fallback tokens."""
        if self.byte_level:
            from tokenizers.pre_tokenizers import ByteLevel

            symbols = ByteLevel.alphabet()
        else:
            symbols = [f"<0x{b:02X}>" for b in range(256)]
        return {self.vocab[s] for s in symbols if s in self.vocab}

    def required(self) -> set[int]:
        """Ids kept whatever the counts: added and special tokens, the unknown token, the post-processor's ids."""
        ids = {t["id"] for t in self.data.get("added_tokens") or []}
        unk = self.data["model"].get("unk_token")
        if unk in self.vocab:
            ids.add(self.vocab[unk])
        ids |= _processor_ids(self.data.get("post_processor"))
        return ids | self.alphabet()


def _has_byte_level(pre_tokenizer) -> bool:
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or [])


def read_vocabulary(tokenizer) -> Vocabulary:
    """The tokenizer's BPE definition; a UserError for tokenizers vocabulary pruning cannot handle."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"vocabulary pruning needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} is not one",
                        "use a model whose folder has a tokenizer.json")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"vocabulary pruning supports BPE tokenizers; this one is {model.get('type')}",
                        "drop the vocab step for this model")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError("vocabulary pruning does not support BPE with subword prefixes or suffixes",
                        "drop the vocab step for this model")
    byte_level = _has_byte_level(data.get("pre_tokenizer"))
    if not byte_level and not model.get("byte_fallback"):
        raise UserError("the tokenizer has no byte alphabet (neither byte-level nor byte fallback), "
                        "so a pruned vocabulary could not encode every text",
                        "drop the vocab step for this model")
    return Vocabulary(data, byte_level)


def _processor_ids(processor) -> set[int]:
    if not isinstance(processor, dict):
        return set()
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        return {i for v in (processor.get("special_tokens") or {}).values() for i in v.get("ids", [])}
    if kind in ("BertProcessing", "RobertaProcessing"):
        return {processor[k][1] for k in ("sep", "cls") if k in processor}
    if kind == "Sequence":
        return set().union(*(_processor_ids(p) for p in processor.get("processors") or []))
    return set()


def _remap_processor(processor, new_id: dict[int, int]) -> None:
    if not isinstance(processor, dict):
        return
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        for value in (processor.get("special_tokens") or {}).values():
            value["ids"] = [new_id[i] for i in value.get("ids", [])]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            if key in processor:
                processor[key] = [processor[key][0], new_id[processor[key][1]]]
    elif kind == "Sequence":
        for p in processor.get("processors") or []:
            _remap_processor(p, new_id)


# ------------------------------------------------------------------ choosing


def choose_tokens(vocabulary: Vocabulary, counts: torch.Tensor, size: int, required: set[int]) -> tuple[list[int], int]:
    """The kept ids (sorted) and how many of them were chosen by frequency (the rest: required and merge closures).

    Tokens are taken by decreasing count (then by id: earlier merges were
    more frequent when the tokenizer was trained), each with the parts it is
    merged from, skipping a token whose closure no longer fits in ``size``.
    """
    tokens = vocabulary.tokens()
    ids = {t: i for i, t in tokens.items()}
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in vocabulary.merges:
        producers.setdefault(a + b, []).append((a, b))
    if len(required) > size:
        raise UserError(f"a vocabulary of {size} tokens cannot hold the {len(required)} special and byte tokens every text needs",
                        f"keep at least {len(required)} tokens")
    kept = set(required)

    def closure(token_id: int) -> set[int]:
        need, stack = set(), [tokens[token_id]]
        while stack:
            token = stack.pop()
            i = ids.get(token)
            if i is None or i in kept or i in need:
                continue
            need.add(i)
            for a, b in producers.get(token, ()):
                stack += [a, b]
        return need

    counts = counts.tolist() + [0] * max(0, len(tokens) - len(counts))
    candidates = [i for i, t in tokens.items() if i not in kept and (t in producers or len(t) == 1)]
    candidates.sort(key=lambda i: (-counts[i], i))
    by_frequency = 0
    for i in candidates:
        if len(kept) >= size:
            break
        need = closure(i)
        if need and len(kept) + len(need) <= size:
            kept |= need
            by_frequency += 1
    return sorted(kept), by_frequency


# ------------------------------------------------------------------ rebuilding


def pruned_definition(vocabulary: Vocabulary, kept: list[int]) -> tuple[dict, dict[int, int]]:
    """The pruned ``tokenizer.json`` data and the old-to-new id map."""
    new_id = {old: new for new, old in enumerate(kept)}
    tokens = vocabulary.tokens()
    kept_tokens = {tokens[i] for i in kept}
    data = json.loads(json.dumps(vocabulary.data))
    model = data["model"]
    model["vocab"] = {t: new_id[i] for t, i in vocabulary.vocab.items() if i in new_id}
    model["merges"] = [m for m, (a, b) in zip(model["merges"], vocabulary.merges)
                       if a in kept_tokens and b in kept_tokens and a + b in kept_tokens]
    data["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in data.get("added_tokens") or [] if t["id"] in new_id]
    _remap_processor(data.get("post_processor"), new_id)
    return data, new_id


def rebuild_tokenizer(tokenizer, data: dict, new_id: dict[int, int]):
    """A tokenizer of the same class and settings whose definition is ``data`` (saved and reloaded through a temporary folder)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="workbench-vocab-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        for name in SLOW_TOKENIZER_FILES:  # they describe the old vocabulary
            (folder / name).unlink(missing_ok=True)
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in config["added_tokens_decoder"].items()
                                              if int(k) in new_id}
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        new = AutoTokenizer.from_pretrained(folder)
    new.name_or_path = tokenizer.name_or_path
    return new


def config_token_ids(config) -> set[int]:
    """The token ids a config names (BOS, EOS, padding)."""
    ids: set[int] = set()
    for key in CONFIG_TOKEN_IDS:
        value = getattr(config, key, None)
        values = value if isinstance(value, list) else [value]
        ids.update(v for v in values if isinstance(v, int))
    return ids


def _remap_config(config, new_id: dict[int, int]) -> None:
    if config is None:
        return
    for key in CONFIG_TOKEN_IDS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            setattr(config, key, new_id.get(value))
        elif isinstance(value, list):
            setattr(config, key, [new_id[v] for v in value if v in new_id])


def slice_vocabulary(model, kept: list[int], new_id: dict[int, int]) -> None:
    """Keep embedding and LM head rows ``kept`` (in that order) and renumber the config's token ids."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if kept[-1] >= emb.num_embeddings:
        raise UserError(f"the tokenizer has token id {kept[-1]} but the model only {emb.num_embeddings} embedding rows",
                        "the tokenizer does not belong to this model")
    if head is not None and not isinstance(head, nn.Linear):
        raise UserError(f"vocabulary pruning needs a plain linear LM head, not a {type(head).__name__}",
                        "put the vocab step before the step that replaced the LM head")
    tied = head is not None and head.weight is emb.weight
    index = torch.tensor(kept, dtype=torch.long)
    emb.weight = nn.Parameter(emb.weight.data.index_select(0, index), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = len(kept)
    if emb.padding_idx is not None:
        emb.padding_idx = new_id.get(emb.padding_idx)
    if head is not None:
        if tied:
            head.weight = emb.weight
            head.out_features = len(kept)
        else:
            slice_linear(head, rows=index)
    for module in model.modules():
        if isinstance(getattr(module, "vocab_size", None), int):
            module.vocab_size = len(kept)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    config.vocab_size = len(kept)
    _remap_config(config, new_id)
    _remap_config(getattr(model, "generation_config", None), new_id)


# ------------------------------------------------------------------ calibration ids


def expansion_table(old: Vocabulary, tokenizer, new_id: dict[int, int]) -> list[list[int]]:
    """For every old id, its new ids: itself when kept, else the pruned BPE's tokens for its string."""
    model = tokenizer.backend_tokenizer.model
    table = []
    tokens = old.tokens()
    for i in range(max(tokens) + 1):
        if i in new_id:
            table.append([new_id[i]])
        elif i in tokens:
            table.append([t.id for t in model.tokenize(tokens[i])])
        else:
            table.append([])
    return table


def remap_tokens(tokens: torch.Tensor, table: list[list[int]]) -> torch.Tensor:
    """Calibration windows in the new ids: every token replaced by its expansion, each row cut back to its length.

    The rows keep their text (up to the cut): dropped tokens become the
    shorter kept tokens that spell them.
    """
    seqlen = tokens.shape[1]
    rows = []
    for row in tokens.tolist():
        ids: list[int] = []
        for i in row:
            ids += table[i]
            if len(ids) >= seqlen:
                break
        rows.append(ids[:seqlen])
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class VocabResult:
    tokenizer: object
    kept: list[int]
    by_frequency: int
    before: int
    coverage: float  # share of the counted tokens that are kept as they are
    table: list[list[int]]


def prune_vocabulary(model, tokenizer, counts: torch.Tensor, size: int) -> VocabResult:
    """Prune ``model``'s embeddings and LM head and return the new tokenizer (the model is changed in place)."""
    vocabulary = read_vocabulary(tokenizer)
    before = len(tokenizer)
    if size >= before:
        raise UserError(f"the tokenizer has {before} tokens, so keeping {size} removes nothing",
                        f"keep fewer than {before} tokens")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    required = vocabulary.required() | {i for i in config_token_ids(config) if i < before}
    kept, by_frequency = choose_tokens(vocabulary, counts, size, required)
    data, new_id = pruned_definition(vocabulary, kept)
    new_tokenizer = rebuild_tokenizer(tokenizer, data, new_id)
    slice_vocabulary(model, kept, new_id)
    total = float(counts.sum())
    coverage = float(counts[torch.tensor([i for i in kept if i < len(counts)])].sum()) / total if total else 0.0
    return VocabResult(new_tokenizer, kept, by_frequency, before, coverage, expansion_table(vocabulary, new_tokenizer, new_id))

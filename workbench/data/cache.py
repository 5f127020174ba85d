"""The on-disk cache of calibration windows, and what identifies a source, a tokenizer and a model for it.

A cached set is keyed by a hash of the source, its content (the bytes of its
file for bundled and local data), the tokenizer's identity, nsamples, seqlen
and seed (``workbench.data.sampling.calibration_data``); bump ``CACHE_VERSION``
when the sampling changes, so sets cached by an older version are not reused.
Files are written atomically (``workbench.files``) and read with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from workbench.files import atomic_write

from . import corpora
from .sources import Source, resolve

log = logging.getLogger("workbench.calibration")
CACHE_VERSION = 1


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer for caching: name, class, size and a hash of its vocabulary (and, for fast tokenizers, of its whole definition)."""
    digest = hashlib.sha256()
    try:
        vocab = tokenizer.get_vocab()
        digest.update(json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False).encode("utf-8"))
    except (AttributeError, NotImplementedError, TypeError):
        digest.update(repr(tokenizer).encode("utf-8"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode("utf-8"))  # merges, normalizer, pre-tokenizer
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or ""),
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "vocab_sha256": digest.hexdigest(),
    }


def _model_identity(model) -> dict | None:
    if model is None:
        return None
    config = getattr(model, "config", None)
    try:
        params = sum(p.numel() for p in model.parameters())
    except (AttributeError, TypeError):
        params = None
    return {
        "class": type(model).__name__,
        "name": str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or ""),
        "params": params,
    }


# The bundled file each built-in text source reads.
_BUNDLED_FILES = {
    "c4": corpora.C4_FILES["train"],
    "wikitext2": corpora.WIKITEXT2_FILES["valid"],
    "books": corpora.BOOKS_FILES["calib"],
}


def content_fingerprint(entry: Source, arg: str, model) -> Any:
    if entry.prefix == "file":
        path = Path(arg).expanduser()
        if not path.is_file():
            corpora.file_documents(path)  # raises the missing-file error
        return {"sha256": _sha256_file(path), "suffixes": "".join(path.suffixes).lower()}
    if entry.prefix in _BUNDLED_FILES:
        return _sha256_file(corpora.bundled_path(_BUNDLED_FILES[entry.prefix]))
    if not entry.builtin:
        return {"model": _model_identity(model)}
    return None


def source_fingerprint(source: str, model=None) -> Any:
    """What identifies a source's content for caching: the bytes of its file for bundled and local data, else its name."""
    entry, arg = resolve(source)
    return {"source": entry.prefix if entry.prefix == "file" else f"{entry.prefix}:{arg}", "content": content_fingerprint(entry, arg, model)}


def cache_path(cache_dir, entry: Source, key: str, nsamples: int, seqlen: int, seed: int) -> Path:
    return Path(cache_dir).expanduser() / f"calib-{entry.prefix}-{nsamples}x{seqlen}-seed{seed}-{key[:24]}.pt"


def load_cached(path: Path, key: str, nsamples: int, seqlen: int):
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: rebuild it
        log.warning("ignoring unreadable calibration cache %s: %s", path, exc)
        return None
    if not isinstance(payload, dict):
        return None
    ids = payload.get("input_ids")
    if payload.get("key") != key or not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or tuple(ids.shape) != (nsamples, seqlen):
        return None
    return ids


def save_cached(path: Path, key: str, ids) -> None:
    try:
        atomic_write(path, lambda fh: torch.save({"key": key, "input_ids": ids}, fh))
    except OSError as exc:  # caching is an optimization; a read-only folder must not fail the run
        log.warning("could not cache calibration samples in %s: %s", path.parent, exc)


__all__ = ["CACHE_VERSION", "tokenizer_fingerprint", "source_fingerprint", "content_fingerprint", "cache_path",
           "load_cached", "save_cached"]

"""Dense baselines measured once: a perplexity of the unchanged model, stored under everything that determines it.

Every run measures the dense model before compressing it (``evaluate.before``),
and most runs of a study or a sweep measure the same one again. A measurement
is stored in ``$WORKBENCH_HOME/baselines/KEY.json`` and reused when all of its
key is equal:

- the model: for a folder (the demo model, a local folder, a workbench
  export), the name, size and modification time of each of its files and the
  bytes of ``config.json``; for a hub model, its id and the commit it was
  loaded at (a hub model without a known commit is never reused);
- the evaluated tokens themselves (a hash of the ids, so the tokenizer, the
  data set and its version are all in it), the window length, the window
  limit and the batch size;
- the dtype, the device type, ``trust_remote_code``, and the versions of
  workbench, torch and transformers.

``evaluate.fresh = true`` (``--fresh``) measures again and stores the new
figure. A damaged or unreadable record is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from workbench.errors import UserError
from workbench.files import write_text_atomic
from workbench.history import workbench_home

# Raise when the perplexity protocol itself changes, so that no older figure is reused.
PROTOCOL = 1


def baseline_folder() -> Path:
    return workbench_home() / "baselines"


def model_fingerprint(loaded) -> dict | None:
    """What identifies the weights a model was loaded from, or None when nothing reliable does."""
    if loaded.source_kind == "hub":
        commit = getattr(loaded.model.config, "_commit_hash", None)
        return {"hub": loaded.source, "commit": commit} if commit else None
    folder = Path(loaded.source)
    if not folder.is_dir():
        return None
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            files.append([path.name, stat.st_size, stat.st_mtime_ns])
    config = folder / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"folder": str(folder.resolve()), "files": files, "config": digest}


def tokens_fingerprint(ids) -> str:
    """A hash of the evaluated token ids (a CPU tensor): tokenizer, data and its version in one."""
    data = ids.detach().to("cpu").contiguous()
    h = hashlib.sha256(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def perplexity_key(loaded, ids, *, dataset: str, seqlen: int, limit: int | None, batch_size: int, device_type: str,
                   trust_remote_code: bool, versions: dict) -> str | None:
    """The key of a dense perplexity measurement, or None when the model cannot be identified."""
    model = model_fingerprint(loaded)
    if model is None:
        return None
    parts = {"protocol": PROTOCOL, "metric": "perplexity", "model": model, "tokens": tokens_fingerprint(ids),
             "dataset": dataset, "seqlen": seqlen, "limit": limit, "batch_size": batch_size,
             "dtype": str(loaded.dtype), "device": device_type, "trust_remote_code": bool(trust_remote_code),
             "versions": {k: versions.get(k) for k in ("workbench", "torch", "transformers")}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load_baseline(key: str) -> dict[str, Any] | None:
    """The stored measurement of ``key``, or None (absent, unreadable or damaged)."""
    try:
        record = json.loads((baseline_folder() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("value"), (int, float)):
        return None
    return record


def store_baseline(key: str, record: dict[str, Any]) -> None:
    """Keep a measurement for later runs; a store that cannot be written costs nothing but the reuse."""
    try:
        write_text_atomic(baseline_folder() / f"{key}.json",
                          json.dumps({**record, "key": key, "stored": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    except (OSError, UserError):
        pass


__all__ = ["PROTOCOL", "model_fingerprint", "tokens_fingerprint", "perplexity_key", "load_baseline", "store_baseline"]

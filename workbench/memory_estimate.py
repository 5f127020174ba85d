"""The memory a compression run needs, and whether a machine can hold it. No torch.

One estimate serves the TUI's Inspect tab, its inline warnings on the
calibration sizes, and ``workbench validate``, so they always agree:

- ``weights``: every parameter at the load dtype, held in host memory;
- ``largest layer``: one decoder layer's parameters, on the device while it
  is compressed;
- ``activations``: one calibration sample's layer input and output
  (``2 x seqlen x hidden`` values) times ``nsamples``, on the device, or in
  host memory with ``calibration.offload_activations`` (or on a CPU run).

The model's sizes come from the worker's Inspect result, else from the
model's ``config.json`` (the bundled demo, a local folder, or the Hugging Face
cache of a hub id). ``check`` compares the estimate with a machine: beyond
what the memory holds in all, the run cannot start (a problem); beyond what
is free now, or a sequence longer than the model's context, it is a warning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .data.windows import window_length
from .errors import UserError
from .host import host_memory, human_bytes
from .model_source import resolve_model_source

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs to know of a model, at the dtype it loads in."""

    total_params: int
    largest_layer_params: int
    hidden_size: int
    context_length: int | None
    dtype: str  # float32, bfloat16 or float16

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @classmethod
    def from_inspect(cls, result: dict) -> "ModelSize | None":
        """From a worker's Inspect result (``workbench.backends.worker.inspect_model``); None when it lacks sizes."""
        memory = result.get("memory") or {}
        dtype = memory.get("dtype") or result.get("dtype") or "float32"
        size = DTYPE_BYTES.get(dtype, 4)
        hidden = result.get("hidden_size")
        if not (memory.get("weights") and hidden):
            return None
        return cls(int(memory["weights"]) // size, int(memory.get("largest_layer") or 0) // size, int(hidden),
                   result.get("context_length"), dtype)

    @classmethod
    def from_config(cls, config: dict, dtype: str = "auto", on_gpu: bool = False) -> "ModelSize | None":
        """From a decoder's ``config.json`` (Llama-style shapes); None when it does not say enough."""
        config = config.get("text_config") or config
        try:
            h, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
            inter = int(config.get("intermediate_size") or 4 * h)
            vocab = int(config.get("vocab_size") or 0)
        except (KeyError, TypeError, ValueError):
            return None
        heads = int(config.get("num_attention_heads") or 1)
        head_dim = int(config.get("head_dim") or h // heads)
        kv = int(config.get("num_key_value_heads") or heads)
        attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
        layer = attention + 3 * h * inter + 2 * h
        embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
        if dtype == "auto":
            saved = str(config.get("dtype") or config.get("torch_dtype") or "float32")
            dtype = saved if on_gpu and saved in ("bfloat16", "float16") else "float32"
        context = config.get("max_position_embeddings") or config.get("n_positions")
        return cls(layers * layer + embeddings + h, layer, h, int(context) if context else None, dtype)


@dataclass(frozen=True)
class Machine:
    """Memory a run can use, in bytes: the host's and each GPU's (``gpus`` None: not known)."""

    host_total: int
    host_free: int
    gpus: list[tuple[str, int, int]] | None = None  # (name, total, free)

    @classmethod
    def from_devices(cls, devices: list[dict]) -> "Machine | None":
        """From a worker's ``devices`` (its hello or pong)."""
        host = next((d for d in devices if d.get("kind") == "cpu"), None)
        if host is None or host.get("total") is None:
            return None
        gpus = [(str(d.get("name") or "GPU"), int(d["total"]), int(d.get("free") or d["total"]))
                for d in devices if d.get("kind") == "cuda" and d.get("total")]
        return cls(int(host["total"]), int(host.get("free") or host["total"]), gpus)

    @classmethod
    def here(cls) -> "Machine":
        """This machine: its memory, and its NVIDIA GPUs only as present or not (their sizes need torch)."""
        total, free = host_memory()
        gpus = None if _has_nvidia_gpu() else []
        return cls(total, free, gpus)


def _has_nvidia_gpu() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


@dataclass(frozen=True)
class Estimate:
    weights: int
    largest_layer: int
    per_sample: int
    nsamples: int
    seqlen: int
    dtype: str
    offload: bool

    @property
    def activations(self) -> int:
        return self.per_sample * self.nsamples

    def rows(self) -> list[tuple[str, int, str]]:
        """(what, bytes, note) as Inspect lists them."""
        place = "host memory (offloaded)" if self.offload else "the device"
        return [
            ("weights", self.weights, f"{self.dtype}, held in host memory"),
            ("largest layer", self.largest_layer, "on the device during layer-by-layer work"),
            ("activations", self.activations,
             f"{human_bytes(self.per_sample)} per sample × {self.nsamples} samples of {self.seqlen} tokens, on {place}"),
        ]


@dataclass(frozen=True)
class Finding:
    level: str  # "problem": the run cannot start; "warning": it may fail or mislead
    key: str  # the setting it is about, e.g. calibration.nsamples
    message: str
    hint: str = ""


def estimate(size: ModelSize, nsamples: int, seqlen: int | None, offload: bool = False) -> Estimate:
    """The memory of a run with ``nsamples`` calibration samples of ``seqlen`` tokens, as the run cuts them
    (``workbench.data.windows``: None is min(2048, context), and a longer window is capped at the context)."""
    seqlen = window_length(seqlen, size.context_length)
    per_sample = 2 * seqlen * size.hidden_size * size.dtype_bytes
    return Estimate(size.total_params * size.dtype_bytes, size.largest_layer_params * size.dtype_bytes, per_sample,
                    nsamples, seqlen, size.dtype, offload)


def check(size: ModelSize, machine: Machine | None, *, nsamples: int, seqlen: int | None, offload: bool = False,
          device: str = "auto", eval_seqlen: int | None = None) -> list[Finding]:
    """What the machine cannot hold (problems) or may not (warnings), and sequences beyond the model's context."""
    found: list[Finding] = []
    context = size.context_length
    for key, value in (("calibration.seqlen", seqlen), ("evaluate.seqlen", eval_seqlen)):
        if value and context and value > context:
            found.append(Finding("warning", key, f"{key} = {value} exceeds the model's context of {context} tokens",
                                 f"positions past {context} were never trained; use at most {context}"))
    e = estimate(size, nsamples, seqlen, offload)
    if machine is None:
        return found
    gpus = machine.gpus
    on_host = offload or device == "cpu" or (device == "auto" and gpus == [])
    if on_host:
        where, total, free = "host memory", machine.host_total - e.weights, machine.host_free - e.weights
        place = "host"
    elif gpus:
        index = int(device.split(":")[1]) if device.startswith("cuda:") and device.split(":")[1].isdigit() else 0
        name, gpu_total, gpu_free = gpus[min(index, len(gpus) - 1)]
        where, total, free = name, gpu_total - e.largest_layer, gpu_free - e.largest_layer
        place = "GPU"
    else:
        return found  # a GPU of unknown size: nothing to compare with
    what = (f"the calibration activations need {human_bytes(e.activations)} "
            f"({human_bytes(e.per_sample)} per sample × {e.nsamples} samples of {e.seqlen} tokens)")
    fits = max(0, total // e.per_sample) if e.per_sample else 0
    if e.activations > total:
        room = f"{human_bytes(max(total, 0))} left in all"
        hint = f"use at most {fits} samples" if fits else "use a shorter seqlen or a smaller model"
        if place == "GPU":
            hint += ", or keep them in host memory (calibration.offload_activations = true)"
        found.append(Finding("problem", "calibration.nsamples",
                             f"{what}, more than {where} holds ({room} beside the model)", hint))
    elif e.activations > free:
        found.append(Finding("warning", "calibration.nsamples",
                             f"{what}; {where} has {human_bytes(max(free, 0))} free now beside the model",
                             f"free memory first, or use at most {max(0, free // e.per_sample)} samples"))
    return found


# ---------------------------------------------------------------- a model's size without loading it


def model_size(model: dict, on_gpu: bool = False) -> ModelSize | None:
    """The size of a spec's ``[model]`` from its ``config.json``, when it is on this machine (demo, a folder, the
    Hugging Face cache of a hub id); None otherwise."""
    name = str(model.get("name") or "demo")
    try:
        kind, where = resolve_model_source(name)
    except UserError:
        return None
    path = Path(where) / "config.json" if kind in ("demo", "local") else _cached_config(where)
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return ModelSize.from_config(config, str(model.get("dtype") or "auto"), on_gpu)


def _cached_config(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        found = try_to_load_from_cache(repo, "config.json")
    except Exception:  # a malformed id, an unreadable cache: no estimate
        return None
    return Path(found) if isinstance(found, str) else None


def check_spec(spec, machine: Machine | None = None, size: ModelSize | None = None) -> list[Finding]:
    """``check`` for a run spec (a ``RunSpec``) on ``machine`` (default: this one); nothing for a run without steps."""
    if not spec.steps:
        return []
    machine = machine or Machine.here()
    on_gpu = spec.model.device.startswith("cuda") or (spec.model.device == "auto" and machine.gpus != [])
    size = size or model_size({"name": spec.model.name, "dtype": spec.model.dtype}, on_gpu)
    if size is None:
        return []
    c = spec.calibration
    return check(size, machine, nsamples=c.nsamples, seqlen=c.seqlen, offload=c.offload_activations,
                 device=spec.model.device, eval_seqlen=spec.evaluate.seqlen)


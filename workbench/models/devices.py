"""Devices and dtypes: user strings turned into a ``torch.device`` and a ``torch.dtype``; the GPUs asked for checked.

Bad input raises :class:`~workbench.errors.UserError` with a hint.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from workbench.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")



def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda" | "cuda:N" into a ``torch.device``.

    "auto" picks the first CUDA device when one is available, else the CPU. "cuda" is
    normalised to the current CUDA device with an explicit index ("cuda:0"), so device
    comparisons with tensors' ``.device`` work.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise UserError(f"device must be a string, got {type(device).__name__}",
                        hint=f"use one of: {', '.join(DEVICE_CHOICES)}")
    text = device.strip().lower()
    if text in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise UserError(f"unknown device '{device}'",
                        hint=f"use one of: {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        raise UserError(f"device '{device}' was requested but CUDA is not available on this machine",
                        hint="use --device cpu (or auto); a GPU needs an NVIDIA driver and a CUDA build of torch")
    count = torch.cuda.device_count()
    if match.group(1) is None:
        return torch.device("cuda", torch.cuda.current_device())
    index = int(match.group(1))
    if index >= count:
        raise UserError(f"device '{device}' does not exist: this machine has {count} CUDA device(s)",
                        hint=f"use an index from 0 to {count - 1}, or 'cuda' / 'auto'")
    return torch.device("cuda", index)


def _gpus_here() -> str:
    """The machine's GPUs in words, whatever ``CUDA_VISIBLE_DEVICES`` hides (nvidia-smi lists them all)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        rows = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        rows = []
    if rows:
        return "the GPUs here are " + "; ".join(rows)
    return "this machine has no GPU that torch can use" + ("" if torch.cuda.is_available() else
                                                           f" (torch {torch.__version__}, CUDA unavailable)")


def check_requested_gpus() -> None:
    """Refuse ``--gpus`` naming GPUs that do not exist (CUDA would silently drop them and run on the CPU).

    The GPUs asked for arrive in ``WORKBENCH_GPUS`` (set with ``CUDA_VISIBLE_DEVICES``
    by the CLI and the worker transports).
    """
    asked = [g for g in os.environ.get("WORKBENCH_GPUS", "").split(",") if g]
    if not asked:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count >= len(asked):
        return
    missing = asked[count]  # CUDA drops the first invalid id and everything after it
    raise UserError(f"--gpus {'+'.join(asked)}: GPU {missing} does not exist; {_gpus_here()}",
                    "pass GPUs that exist (--gpus 0, 0+1, ...), or leave --gpus out to run on the CPU")


def _config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a checkpoint's config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    if config is None:
        return None
    value = None
    for attr in ("dtype", "torch_dtype"):
        try:
            value = getattr(config, attr, None)
        except Exception:  # some configs raise deprecation errors on the old name
            value = None
        if value is not None:
            break
    if value is None and hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not config:
            return _config_dtype(text)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        return DTYPES.get(value.replace("torch.", ""))
    return None


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device, config: Any = None) -> torch.dtype:
    """Turn "auto" | "float32" | "bfloat16" | "float16" into a ``torch.dtype``.

    "auto" is float32 on the CPU. On CUDA it is the checkpoint's own dtype when that
    is 16-bit (read from ``config``), else bfloat16 (float16 on GPUs without bf16).
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise UserError(f"unsupported dtype {dtype}", hint=f"use one of: {', '.join(DTYPE_CHOICES)}")
    text = str(dtype).strip().lower().replace("torch.", "")
    if text in DTYPES:
        return DTYPES[text]
    if text != "auto":
        raise UserError(f"unknown dtype '{dtype}'", hint=f"use one of: {', '.join(DTYPE_CHOICES)}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type != "cuda":
        return torch.float32
    own = _config_dtype(config)
    if own in (torch.bfloat16, torch.float16):
        return own
    try:
        bf16_ok = torch.cuda.is_bf16_supported()
    except Exception:
        bf16_ok = True
    return torch.bfloat16 if bf16_ok else torch.float16


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for ``torch.bfloat16``."""
    return str(dtype).replace("torch.", "")



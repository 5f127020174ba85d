"""Write a compressed model as a plain Hugging Face folder, atomically.

The folder holds what ``model.save_pretrained`` (safetensors) and
``tokenizer.save_pretrained`` write, plus ``compression.json`` describing the run.
It loads back with ``AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)`` and nothing from workbench.

Everything is written into a hidden temporary folder beside the target
(``.NAME.tmp-XXXXXXXX``) and renamed into place only when complete. The target
may be new, an empty folder, or an earlier workbench export that the caller
asked to overwrite; anything else is refused before any work
(``workbench.files.check_export_target``). An earlier export is replaced only
after the new folder is complete; on any failure the temporary folder is
removed and a previous target is left untouched. Temporary folders that a
killed export left beside the target are cleaned up by the next export there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from workbench.errors import RunError, UserError
from workbench.files import (EXPORTED_BY, INFO_FILE, PARTIAL_MARK, check_export_target, move_into_place,
                             new_temp_folder, prepare_export_target, read_export_info)
from workbench.quantization.export import compressed_state_dict, has_quantized, write_config
from workbench.spec.schema import EXPORT_FORMATS


def _versions() -> dict[str, str]:
    import platform

    import transformers

    import workbench

    versions = {
        "workbench": getattr(workbench, "__version__", "unknown"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import safetensors

        versions["safetensors"] = safetensors.__version__
    except Exception:  # pragma: no cover - safetensors is a dependency of transformers
        pass
    return versions


def _jsonable(value: Any) -> Any:
    """``default=`` for json.dumps: paths, dtypes, devices, tensors and numpy scalars become plain values."""
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else str(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return value.item()
        except Exception:
            pass
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays
        return value.tolist()
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    return str(value)


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    text = str(dtype).strip().lower().replace("torch.", "")
    if text in ("", "none", "auto", "same"):
        return None
    if text not in names:
        raise UserError(f"unknown export dtype '{dtype}'", hint=f"use one of: {', '.join(names)} (or leave it out)")
    return names[text]


def _cast_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors cast to ``dtype``.

    This costs one extra copy of every floating tensor whose dtype changes (the model
    itself is not modified); tensors that share storage (tied embeddings) stay shared.
    """
    cast: dict[tuple, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[name] = tensor
            continue
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if key not in cast:
            cast[key] = tensor.detach().to(dtype)
        out[name] = cast[key]
    return out


def _fix_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """save_pretrained records the model's in-memory dtype; record the dtype the weights were saved in."""
    path = folder / "config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).replace("torch.", "")
    data["dtype"] = name
    if "torch_dtype" in data:
        data["torch_dtype"] = name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _info_text(payload: dict) -> str:
    try:
        return json.dumps(payload, indent=2, default=_jsonable)
    except (TypeError, ValueError) as exc:
        raise UserError(f"export info cannot be written as JSON: {exc}", hint="pass plain values in info") from exc


def export_format(model, asked: str) -> str:
    """The format an export is written in: ``auto`` is compressed-tensors for a quantized model, else dense."""
    if asked == "auto":
        return "compressed-tensors" if has_quantized(model) else "dense"
    if asked == "compressed-tensors" and not has_quantized(model):
        raise UserError("export.format = \"compressed-tensors\" needs a quantized model",
                        "add a quantize step, or export with format = \"dense\"")
    return asked


def export_model(model, tokenizer, out_dir, info: dict, dtype=None, overwrite: bool = False, log=None,
                 format: str = "auto") -> Path:
    """Save ``model`` and ``tokenizer`` to ``out_dir`` with ``compression.json``; return the folder.

    ``info`` (run spec, per-layer sparsity, metrics, timings...) is written as
    ``compression.json``; the versions of workbench, torch and transformers are added
    under ``"versions"`` when missing, with ``exported_by`` and the ``files`` the
    export wrote (what lets a later export with ``overwrite`` replace this folder,
    and nothing else). ``dtype`` ("float32" | "bfloat16" | "float16" or a torch
    dtype) saves the weights in that dtype without modifying the model, at the
    cost of one cast copy of the weights in memory; by default the model is saved
    as it is. ``out_dir`` may be new, empty, or an earlier export when
    ``overwrite``; anything else is a UserError before any work. ``log(message)``
    hears about stale temporary folders cleaned up beside the target.
    ``format``: ``dense`` (every weight as a plain tensor: a quantized model's
    dequantized weights), ``compressed-tensors`` (a quantized model's packed
    codes, scales and ``quantization_config``: ``workbench.quantization.export``)
    or ``auto`` (compressed-tensors exactly when the model is quantized).

    Atomic: a failure leaves no partial folder and any previous ``out_dir`` untouched.
    """
    out_dir = Path(os.fspath(out_dir)).expanduser().absolute()
    prepare_export_target(out_dir, overwrite, log)
    target_dtype = _resolve_dtype(dtype)
    fmt = export_format(model, format)
    if info is None:
        info = {}
    if not isinstance(info, dict):
        raise UserError("export info must be a dict", hint="pass the run description as a dict")

    payload = dict(info)
    versions = dict(payload.get("versions") or {})
    for key, value in _versions().items():
        versions.setdefault(key, value)
    payload["versions"] = versions
    payload["exported_by"] = f"{EXPORTED_BY} {versions.get('workbench', '')}".strip()
    _info_text(payload)  # unserializable info is bad input: refuse it before writing anything

    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder '{parent}': {exc.strerror or exc}",
                        hint="check the path and its permissions") from exc
    tmp = new_temp_folder(parent, out_dir.name, "tmp")
    try:
        model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if fmt == "compressed-tensors":
            state_dict, qconfig = compressed_state_dict(model, target_dtype, log)
            model.save_pretrained(tmp, state_dict=state_dict)
            if target_dtype is not None:
                _fix_config_dtype(tmp, target_dtype)
            write_config(tmp, qconfig)
        elif target_dtype is not None and target_dtype != model_dtype:
            model.save_pretrained(tmp, state_dict=_cast_state_dict(model, target_dtype))
            _fix_config_dtype(tmp, target_dtype)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise RunError("the export wrote no safetensors weights", hint="this is a bug; please report it")
        payload["files"] = sorted([p.name for p in tmp.iterdir() if p.name != PARTIAL_MARK] + [INFO_FILE])
        (tmp / INFO_FILE).write_text(_info_text(payload) + "\n", encoding="utf-8")
        try:
            move_into_place(tmp, out_dir, overwrite)
        except UserError as exc:  # the target changed while the run computed: keep the finished export beside it
            kept = parent / f"{out_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(tmp, kept)
            raise RunError(f"{exc.message}; the finished export was kept in '{kept}'", exc.hint) from None
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise RunError(f"could not write the export to '{out_dir}': {exc.strerror or exc}",
                           hint="check the free disk space and the folder's permissions") from exc
        raise
    return out_dir


__all__ = ["export_model", "export_format", "EXPORT_FORMATS", "check_export_target", "read_export_info", "INFO_FILE"]

"""Loading a causal LM and its tokenizer (a local folder, the bundled demo, or a hub id), and describing it.

:func:`load_model` loads a model (on the CPU, in the requested dtype) and its
tokenizer, checks the architecture from the config before any weight is read,
rebuilds checkpoints with a recorded structure (``workbench.rebuild``), and
wraps it with a :class:`~workbench.models.adapters.ModelAdapter`; every
failure is one ``UserError`` naming the problem (the hub unreachable, remote
code, a damaged weights file). :func:`load_spec_model` loads the model a
run spec's ``[model]`` names. :func:`model_summary` is a JSON-serialisable
description for ``inspect``. ``transformers`` is imported inside the
functions that need it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.errors import UserError
from workbench.model_source import SOURCE_HINT, resolve_model_source
from workbench.rebuild import needs_rebuild, rebuild_model

from .adapters import FAMILIES, ModelAdapter, get_adapter, unsupported_model, weight_matrix
from .devices import _config_dtype, dtype_name, resolve_device, resolve_dtype

@dataclass
class LoadedModel:
    """A model ready for compression.

    ``model`` lives on the CPU in ``dtype``; ``device`` is the compute device the
    engine moves layers to. ``source`` is the folder or hub id it came from and
    ``source_kind`` one of "demo", "local", "hub".
    """

    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    source: str
    device: torch.device
    dtype: torch.dtype
    source_kind: str = "local"
    checkpoint_dtype: torch.dtype | None = None  # the dtype the checkpoint's config.json declares (what export "auto" writes)

    def export_dtype(self, asked: str) -> torch.dtype | None:
        """The dtype an export writes: ``auto`` is the checkpoint's own (None when unknown: as the model is), else ``asked``."""
        return self.checkpoint_dtype if asked == "auto" else getattr(torch, asked)


_OFFLINE_NAMES = {
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "TimeoutException",
    "NetworkError",
    "ProxyError",
    "SSLError",
    "ConnectionError",
}


def exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain and len(chain) < 20:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_error(name: str, exc: BaseException) -> UserError:
    chain = exception_chain(exc)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    local_hint = "or pass a local folder with config.json and weights, or 'demo'"
    if "GatedRepoError" in names:
        return UserError(f"model '{name}' is gated on the Hugging Face Hub",
                         hint=f"accept its licence on the hub and log in (hf auth login, or set HF_TOKEN), {local_hint}")
    if "RepositoryNotFoundError" in names or any("is not a valid model identifier" in str(e) for e in chain):
        return UserError(f"model '{name}' was not found on the Hugging Face Hub",
                         hint=f"check the id (org/name); private models need a login (HF_TOKEN), {local_hint}")
    if "RevisionNotFoundError" in names:
        return UserError(f"model '{name}': revision not found on the Hugging Face Hub", hint=SOURCE_HINT)
    offline = bool(names & _OFFLINE_NAMES) or any(
        "couldn't connect" in str(e).lower() or "offline" in str(e).lower() for e in chain
    )
    if offline or isinstance(exc, OSError):
        hub_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        state = "HF_HUB_OFFLINE is set, so only cached models load" if hub_offline else \
            "check the network connection, or set HF_HUB_OFFLINE=1 to use only cached models"
        return UserError(
            f"could not load model '{name}': the Hugging Face Hub could not be reached "
            f"and the model is not in the local cache",
            hint=f"{state}; download it once while online (or unset HF_HUB_OFFLINE), {local_hint}",
        )
    return UserError(f"could not load model '{name}' from the Hugging Face Hub: {_first_line(exc)}", hint=SOURCE_HINT)


def _remote_code_error(name: str, exc: BaseException) -> UserError | None:
    if "trust_remote_code" in str(exc):
        return UserError(f"model '{name}' needs custom code from its repository to load",
                         hint="pass --trust-remote-code only if you trust that code, or pick a supported architecture")
    return None


def _load_error(kind: str, label: str, exc: BaseException, what: str, hint: str) -> UserError:
    """One message for a failed tokenizer or weights load: hub unreachable, remote code, or a broken folder."""
    if kind == "hub" and isinstance(exc, OSError):
        return _hub_error(label, exc)
    return _remote_code_error(label, exc) or UserError(
        f"could not load {what} of model '{label}': {_first_line(exc)}", hint=hint)


def _damaged_weight_files(folder: Path) -> list[tuple[str, str]]:
    """The safetensors files of ``folder`` whose header or size is wrong: (name, what is wrong)."""
    from safetensors import safe_open

    damaged = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - the library's error type varies by version
            damaged.append((path.name, _first_line(exc)))
    return damaged


def _read_local_model_type(folder: Path, name: str) -> Any:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"model folder '{name}' has an unreadable config.json: {_first_line(exc)}",
                        hint="config.json must be the JSON written by save_pretrained") from exc
    if not isinstance(data, dict):
        raise UserError(f"model folder '{name}' has an invalid config.json (not a JSON object)", hint=SOURCE_HINT)
    return data.get("model_type")


def load_model(
    name: str = "demo",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, on the CPU, in eval mode.

    ``name`` is "demo", a local folder or a hub id. The architecture is checked against
    the supported families from the config alone, before any weight is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, source = resolve_model_source(name)
    label = "demo" if kind == "demo" else str(name)
    compute_device = resolve_device(device)
    trust_remote_code = bool(trust_remote_code)

    # 1. config only, and the architecture check
    if kind != "hub":
        model_type = _read_local_model_type(Path(source), label)
        if model_type not in FAMILIES:
            raise unsupported_model(model_type)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        err = _remote_code_error(label, exc)
        unknown = re.search(r"model type `([^`]+)`", str(exc))
        if err is None and unknown:
            err = unsupported_model(unknown.group(1))
        if err is None:
            err = UserError(f"could not read the config of model '{label}': {_first_line(exc)}", hint=SOURCE_HINT)
        raise err from exc
    except (OSError, KeyError) as exc:
        if kind == "hub":
            raise _hub_error(label, exc) from exc
        raise UserError(f"could not read the config of model folder '{label}': {_first_line(exc)}",
                        hint=SOURCE_HINT) from exc
    if config.model_type not in FAMILIES:
        raise unsupported_model(config.model_type)
    torch_dtype = resolve_dtype(dtype, compute_device, config)

    # 2. tokenizer (cheap, and fails fast when a folder lacks one)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error(kind, label, exc, "a tokenizer",
                          "the model folder needs its tokenizer files (tokenizer.json / tokenizer_config.json, "
                          "as written by tokenizer.save_pretrained)") from exc
    if getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif getattr(tokenizer, "unk_token", None) is not None:
            tokenizer.pad_token = tokenizer.unk_token

    # 3. weights, on the CPU
    kwargs: dict[str, Any] = {"config": config, "dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if kind != "hub" and any(Path(source).glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    checkpoint_dtype = _config_dtype(config)  # read before loading: transformers records the loaded dtype in the config
    qconfig = getattr(config, "quantization_config", None)
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors":
        # a quantized export: its weights dequantized on load, so every evaluation and step reads plain tensors
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        if kind != "hub" and needs_rebuild(source):
            model = rebuild_model(source, config, dtype=torch_dtype)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*quantization_config.*")  # the dequantize request above, said
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        damaged = _damaged_weight_files(Path(source)) if kind != "hub" else []
        if damaged:
            names = ", ".join(f"{name} ({why})" for name, why in damaged)
            raise UserError(f"model '{label}': damaged weights file{'s' * (len(damaged) > 1)}: {names}",
                            "the file is truncated or overwritten: download or copy it again "
                            "(for a hub model, delete it from the Hugging Face cache and load it again)") from None
        if not isinstance(exc, (OSError, ValueError)):
            raise
        raise _load_error(kind, label, exc, "the weights",
                          "the folder needs model.safetensors (or sharded safetensors with their index) "
                          "matching config.json") from exc
    model.eval()
    if "quantization_config" in kwargs:
        model.workbench_quantized = qconfig  # what the checkpoint was (its config no longer says, once dequantized)
    adapter = get_adapter(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        source=source,
        device=compute_device,
        dtype=torch_dtype,
        source_kind=kind,
        checkpoint_dtype=checkpoint_dtype,
    )


def _count_unique(params) -> int:
    seen: set[int] = set()
    total = 0
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def model_summary(loaded_or_model: Any) -> dict:
    """A JSON-serialisable description of a model (a LoadedModel, a ModelAdapter or the model)."""
    source = None
    if isinstance(loaded_or_model, LoadedModel):
        adapter = loaded_or_model.adapter
        source = loaded_or_model.source
    elif isinstance(loaded_or_model, ModelAdapter):
        adapter = loaded_or_model
    else:
        adapter = get_adapter(loaded_or_model)
    model = adapter.model
    config = adapter.config
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

    linear_params = 0
    for layer in adapter.layers:
        for mod in adapter.linear_modules(layer).values():
            linear_params += mod.weight.numel()
    layer0 = {}
    if adapter.num_layers:
        layer0 = {name: list(weight_matrix(mod).shape) for name, mod in adapter.linear_modules(adapter.layers[0]).items()}
    try:
        first = next(model.parameters())
        dtype = dtype_name(first.dtype)
    except StopIteration:
        dtype = None
    emb = getattr(adapter.embed_tokens, "weight", None)
    architectures = getattr(config, "architectures", None) or []
    summary = {
        "architecture": type(model).__name__,
        "architectures": list(architectures),
        "model_type": adapter.model_type,
        "family": adapter.family,
        "num_layers": adapter.num_layers,
        "total_params": _count_unique(model.parameters()),
        "decoder_linear_params": linear_params,
        "hidden_size": getattr(text_cfg, "hidden_size", None),
        "vocab_size": getattr(text_cfg, "vocab_size", None) or (int(emb.shape[0]) if emb is not None else None),
        "context_length": adapter.context_length,
        "num_attention_heads": getattr(text_cfg, "num_attention_heads", None),
        "num_key_value_heads": getattr(text_cfg, "num_key_value_heads", None),
        "tied_lm_head": adapter.tied_lm_head,
        "layer0_linears": layer0,
        "dtype": dtype,
    }
    if source is not None:
        summary["source"] = source
    return summary


def load_spec_model(model) -> LoadedModel:
    """The model a spec's ``[model]`` section names (``workbench.spec.ModelSpec``), with its dtype, device and trust settings."""
    return load_model(model.name, dtype=model.dtype, device=model.device, trust_remote_code=model.trust_remote_code)


def load(path, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Load an exported (or any local or hub) model with its tokenizer: ``(model, tokenizer)``.

    Checkpoints with a recorded structure (factorized linears, per-layer widths)
    are rebuilt; others load as ``transformers`` loads them.
    """
    loaded = load_model(str(path), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return loaded.model, loaded.tokenizer

"""Load causal language models and describe their layout through architecture adapters.

This is an engine module: it imports torch. ``transformers`` is imported lazily,
inside the functions that need it.

The pieces:

- :func:`resolve_device`, :func:`resolve_dtype`, :func:`resolve_model_source` turn
  user strings into a ``torch.device``, a ``torch.dtype`` and a model source, raising
  :class:`~workbench.errors.UserError` with a hint on bad input.
- :func:`load_model` loads a model (on the CPU, in the requested dtype) and its
  tokenizer, and wraps it with a :class:`ModelAdapter`.
- :func:`get_adapter` maps ``config.model_type`` to the family layout: where the
  decoder layers, the final norm and the lm_head are, and which modules run before
  the first layer.
- :func:`weight_matrix` gives the ``(out, in)`` weight of a ``nn.Linear`` or a
  transformers ``Conv1D`` as a view that writes through to the module.
- :func:`model_summary` is a JSON-serialisable description for ``inspect``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.errors import RunError, UserError
from workbench.model_source import DEMO_MODEL_DIR, SOURCE_HINT  # noqa: F401  (re-exported)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")



# --------------------------------------------------------------------------- devices and dtypes


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


# --------------------------------------------------------------------------- model sources
# The rules live in a torch-free module so the UI can judge a model name as the engine will.
from workbench.model_source import resolve_model_source  # noqa: E402,F401  (re-exported)


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class FamilySpec:
    """Where one architecture family keeps its parts, as dotted paths from the CausalLM root."""

    family: str
    layers: str
    final_norm: str | None


_LLAMA = FamilySpec("llama", "model.layers", "model.norm")

FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "opt": FamilySpec("opt", "model.decoder.layers", "model.decoder.final_layer_norm"),
    "gpt2": FamilySpec("gpt2", "transformer.h", "transformer.ln_f"),
    "gpt_neox": FamilySpec("gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "phi": FamilySpec("phi", "model.layers", "model.final_layernorm"),
    "phi3": FamilySpec("phi", "model.layers", "model.norm"),
}


def supported_model_types() -> list[str]:
    return list(FAMILIES)


def _unsupported(model_type: Any) -> UserError:
    return UserError(
        f"model type '{model_type}' is not supported; supported: {', '.join(FAMILIES)}",
        hint="pick a causal LM of a supported family (Llama, Mistral, Qwen, Gemma, OPT, GPT-2, Pythia, Phi), or 'demo'",
    )


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, _linear_types()[1])


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear module as a view sharing its storage.

    ``nn.Linear`` stores ``(out, in)`` already; transformers' ``Conv1D`` (GPT-2) stores
    ``(in, out)`` and is returned transposed. In-place edits of the view (``w[mask] = 0``,
    ``w.copy_(new)``) change the module.
    """
    if isinstance(module, nn.Linear):
        return module.weight.data
    if _is_conv1d(module):
        return module.weight.data.t()
    raise TypeError(f"not a linear module: {type(module).__name__}")


def _get_path(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class ModelAdapter:
    """A family-independent view of a causal LM's layout.

    Attributes: ``family`` (e.g. "llama"), ``model_type`` (``config.model_type``),
    ``model``, ``spec`` (the :class:`FamilySpec`), ``layers_path`` (dotted name of
    the decoder layer list, e.g. "model.layers").
    """

    def __init__(self, model: nn.Module, spec: FamilySpec):
        self.model = model
        self.spec = spec
        self.family = spec.family
        self.model_type = getattr(model.config, "model_type", None)
        self.layers_path = spec.layers
        layers = _get_path(model, spec.layers)
        if not isinstance(layers, nn.ModuleList):
            raise RunError(
                f"{type(model).__name__} does not have the expected layout ({spec.layers} is missing)",
                hint="load the model with AutoModelForCausalLM (a causal LM with its lm_head)",
            )
        self._layers = layers
        self._lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if self._lm_head is None:
            self._lm_head = getattr(model, "lm_head", None)
        if self._lm_head is None:
            raise RunError(f"{type(model).__name__} has no lm_head",
                           hint="load the model with AutoModelForCausalLM")

    # -- layout

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self._layers

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def final_norm(self) -> nn.Module | None:
        if self.spec.final_norm is None:
            return None
        norm = _get_path(self.model, self.spec.final_norm)
        return norm if isinstance(norm, nn.Module) else None

    @property
    def lm_head(self) -> nn.Module:
        return self._lm_head

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def tied_lm_head(self) -> bool:
        head = getattr(self._lm_head, "weight", None)
        emb = getattr(self.embed_tokens, "weight", None)
        if head is None or emb is None:
            return False
        return head is emb or (
            head.device == emb.device and head.shape == emb.shape and head.data_ptr() == emb.data_ptr()
        )

    @property
    def context_length(self) -> int | None:
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def pre_layer_modules(self) -> list[nn.Module]:
        """Every module besides the decoder layers and the lm_head that the model owns.

        Walking from the root down to the layer list, all siblings of the path are
        collected (embeddings, positional and rotary embeddings, OPT's project_in /
        project_out, dropouts) plus the final norm. Moving these and one layer at a
        time to a device is enough to run the base model's forward up to layer 0, and
        with :meth:`compute_logits` to turn the last hidden states into logits.
        """
        out: list[nn.Module] = []
        seen: set[int] = set()
        node: nn.Module = self.model
        parts = self.spec.layers.split(".")
        for i, part in enumerate(parts):
            for name, child in node.named_children():
                if name == part or child is self._lm_head or child is self._layers:
                    continue
                if id(child) not in seen:
                    seen.add(id(child))
                    out.append(child)
            node = getattr(node, part)
        norm = self.final_norm
        if norm is not None and id(norm) not in seen:
            out.append(norm)
        return out

    def post_layer_modules(self) -> list[nn.Module]:
        """The modules applied, in order, between the last decoder layer and the lm_head."""
        mods: list[nn.Module] = []
        norm = self.final_norm
        if norm is not None:
            mods.append(norm)
        if self.family == "opt":
            project_out = _get_path(self.model, "model.decoder.project_out")
            if project_out is not None:
                mods.append(project_out)
        return mods

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits from the output of the last decoder layer (final norm, projections, lm_head, soft-capping)."""
        for module in self.post_layer_modules():
            hidden_states = module(hidden_states)
        logits = self._lm_head(hidden_states)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def linear_modules(self, layer: nn.Module | int) -> dict[str, nn.Module]:
        """Every ``nn.Linear`` / ``Conv1D`` inside one decoder layer, by name relative to it, in module order."""
        if isinstance(layer, int):
            layer = self._layers[layer]
        types = _linear_types()
        return {name: mod for name, mod in layer.named_modules() if name and isinstance(mod, types)}

    def layer_name(self, index: int) -> str:
        """The qualified name of decoder layer ``index`` ("model.layers.3")."""
        return f"{self.layers_path}.{index}"

    def __repr__(self) -> str:
        return f"ModelAdapter(family={self.family!r}, model_type={self.model_type!r}, layers={self.num_layers})"


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a loaded causal LM, chosen by ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise _unsupported(model_type)
    return ModelAdapter(model, spec)


# --------------------------------------------------------------------------- loading


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


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain and len(chain) < 20:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_error(name: str, exc: BaseException) -> UserError:
    chain = _exception_chain(exc)
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
            raise _unsupported(model_type)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        err = _remote_code_error(label, exc)
        unknown = re.search(r"model type `([^`]+)`", str(exc))
        if err is None and unknown:
            err = _unsupported(unknown.group(1))
        if err is None:
            err = UserError(f"could not read the config of model '{label}': {_first_line(exc)}", hint=SOURCE_HINT)
        raise err from exc
    except (OSError, KeyError) as exc:
        if kind == "hub":
            raise _hub_error(label, exc) from exc
        raise UserError(f"could not read the config of model folder '{label}': {_first_line(exc)}",
                        hint=SOURCE_HINT) from exc
    if config.model_type not in FAMILIES:
        raise _unsupported(config.model_type)
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
    try:
        from .rebuild import needs_rebuild, rebuild_model

        if kind != "hub" and needs_rebuild(source):
            model = rebuild_model(source, config, dtype=torch_dtype)
        else:
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
    adapter = get_adapter(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        source=source,
        device=compute_device,
        dtype=torch_dtype,
        source_kind=kind,
    )


# --------------------------------------------------------------------------- summary


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

"""Architecture adapters: where each decoder family keeps its layers, norms and LM head.

:func:`get_adapter` maps ``config.model_type`` to the family layout: where the
decoder layers, the final norm and the lm_head are, and which modules run
before the first layer. :func:`weight_matrix` gives the ``(out, in)`` weight
of a ``nn.Linear`` or a transformers ``Conv1D`` as a view that writes through
to the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.errors import RunError, UserError

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


def unsupported_model(model_type: Any) -> UserError:
    return UserError(
        f"model type '{model_type}' is not supported; supported: {', '.join(FAMILIES)}",
        hint="pick a causal LM of a supported family (Llama, Mistral, Qwen, Gemma, OPT, GPT-2, Pythia, Phi), or 'demo'",
    )


def linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, linear_types()[1])


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
    def quantization(self) -> dict | None:
        """The quantization_config of a quantized checkpoint (loaded dequantized), or None."""
        loaded = getattr(self.model, "workbench_quantized", None)
        if loaded is not None:
            return loaded
        config = getattr(self.config, "quantization_config", None)
        return config.to_dict() if hasattr(config, "to_dict") else config

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
        for part in parts:
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
        types = linear_types()
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
        raise unsupported_model(model_type)
    return ModelAdapter(model, spec)



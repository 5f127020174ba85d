"""The compressed-tensors export of a quantized model: what vLLM and transformers (with compressed-tensors) load.

The format is the ``compressed-tensors`` package's, used as a library: each
quantized linear's scheme is a ``QuantizationScheme``, its weight is written
by the compressor the package chooses for that scheme (``pack-quantized`` for
integer weights: codes packed into int32 words with their scales and, when
asymmetric, packed zero points; ``float-quantized`` for FP8), and
``config.json`` gets the ``quantization_config`` the package writes. The
compressor is handed weights that are exactly ``(code - zero) * scale`` and
the scales the quantizer chose, so it finds the same codes again and the
folder decodes to the weights the run evaluated.

A linear whose weights a later step changed (a low-rank pair, a width step)
no longer matches its codes and is saved in 16 bits, listed in ``ignore``
with the embeddings-side linears (the LM head) that were never quantized.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .step import STATE_ATTR, QuantState


def quantized_linears(model: nn.Module) -> tuple[dict[str, tuple[nn.Module, QuantState]], list[str]]:
    """(quantized linears still holding their codes, by name; linears quantized but changed since, by name)."""
    kept, changed = {}, []
    for name, mod in model.named_modules():
        state = getattr(mod, STATE_ATTR, None)
        if state is None:
            continue
        if state.matches(mod):
            kept[name] = (mod, state)
        else:
            changed.append(name)
    return kept, changed


def _scheme(state: QuantState, targets: list[str]):
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    a = state.args
    if a.kind == "fp8":
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    elif a.group_size:
        weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.symmetric, strategy="group", group_size=a.group_size)
    else:
        weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.symmetric, strategy="channel")
    scheme = QuantizationScheme(targets=targets, weights=weights)
    scheme.format = infer_module_format(nn.Linear, scheme).value
    return scheme


def compressed_state_dict(model: nn.Module, dtype: torch.dtype | None, log=None):
    """The state dict in compressed-tensors' layout and the ``QuantizationConfig`` describing it.

    Tensors that are not quantized are cast to ``dtype`` (None: as they are); scales keep the dtype the quantizer
    rounded them to.
    """
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    quantized, changed = quantized_linears(model)
    if changed and log is not None:
        log(f"{len(changed)} quantized linears were changed by a later step and are saved in 16 bits: "
            f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}")
    if log is not None and any(not state.args.symmetric and state.args.kind == "int" for _, state in quantized.values()):
        log("asymmetric weights: the zero points are packed as compressed-tensors writes them, but transformers 5 with "
            "compressed-tensors 0.20 refuses to load such a folder (it expects them unpacked); symmetric weights load "
            "everywhere, and export.format = \"dense\" writes the dequantized weights")
    groups: dict[tuple, list[str]] = {}
    for name, (_, state) in quantized.items():
        groups.setdefault((state.args, str(state.scale.dtype)), []).append(name)
    all_linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    ignore = [name for name in all_linears if name not in quantized]
    config_groups, scheme_of = {}, {}
    single = len(groups) == 1
    for k, names in enumerate(groups.values()):
        scheme = _scheme(quantized[names[0]][1], ["Linear"] if single else names)
        config_groups[f"group_{k}"] = scheme
        for name in names:
            scheme_of[name] = scheme

    state_dict = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    cast: dict[tuple, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in quantized and leaf == "weight":
            continue
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            if ident not in cast:
                cast[ident] = tensor.detach().to(dtype)
            tensor = cast[ident]
        out[key] = tensor
    for name, (_, state) in quantized.items():
        scheme = scheme_of[name]
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        local = {"weight": state.dequantized(torch.float32), "weight_scale": state.scale.float()}
        if state.zero is not None:
            local["weight_zero_point"] = state.zero
        packed = compressor.compress(local, scheme)
        for leaf, tensor in packed.items():
            if leaf == "weight_scale":
                tensor = tensor.to(state.scale.dtype)
            out[f"{name}.{leaf}"] = tensor.contiguous()
    config = QuantizationConfig(config_groups=config_groups, ignore=ignore, quantization_status=QuantizationStatus.COMPRESSED,
                                format=next(iter(scheme_of.values())).format if single and scheme_of else "mixed-precision")
    return out, config


def write_config(folder: Path, config) -> None:
    """Add the ``quantization_config`` to ``folder/config.json`` the way compressed-tensors writes it."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=config).update_config(str(folder))


def stored_bytes(model: nn.Module) -> int:
    """What quantization changes in the bytes of a compressed-tensors export: for each quantized linear, its packed
    codes, scales, zero points and shape minus its dense weight (0 for a model without quantized linears)."""
    change = 0
    for mod in model.modules():
        state = getattr(mod, STATE_ATTR, None)
        if state is None or not isinstance(mod, nn.Linear):
            continue
        rows, cols = state.shape
        a = state.args
        codes = rows * cols * a.code_bits // 8 if a.kind == "fp8" else rows * -(-cols * a.bits // 32) * 4
        zero = 0 if state.zero is None else -(-state.zero.shape[0] * a.bits // 32) * state.zero.shape[1] * 4
        change += codes + state.scale.numel() * state.scale.element_size() + zero + (16 if a.kind == "int" else 0)
        change -= mod.weight.numel() * mod.weight.element_size()
    return change


def has_quantized(model: nn.Module) -> bool:
    return any(getattr(mod, STATE_ATTR, None) is not None for mod in model.modules())


__all__ = ["compressed_state_dict", "write_config", "quantized_linears", "has_quantized", "stored_bytes"]

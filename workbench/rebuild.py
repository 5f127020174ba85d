"""Rebuild exported checkpoints whose structure a plain ``config.json`` cannot express.

Most compressed models are ordinary checkpoints (pruned weights, fewer layers,
a uniform smaller width, a smaller vocabulary) and ``transformers`` loads them
as they are. Some are not: factorized linears (two low-rank layers in place of
one), per-layer MLP widths. For those, the run records entries in
``compression.json`` under ``"structure"``; each entry is a dict with a
``"kind"`` key. ``load(path)`` builds the model from its config, applies every
entry in order through the function registered for its kind (which replaces or
resizes modules, with any weights: they are overwritten next), then loads the
saved weights strictly, so a missing or unexpected tensor is an error, never a
silently random weight.

A step type declares the kinds it records, and the function that applies
each, in its registry entry (``workbench.registry.StepType.structures``); the
function is ``fn(model, entry) -> None``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .errors import UserError
from .registry import load as resolve, structure_appliers

def _resolve(kind: str) -> Callable:
    appliers = structure_appliers()
    if kind not in appliers:
        raise UserError(f"the checkpoint needs structure {kind!r}, which this version of workbench cannot rebuild",
                        "upgrade workbench, or export the model merged into a plain checkpoint")
    return resolve(appliers[kind])


def structure_entries(path) -> list[dict]:
    """The ``structure`` entries of an exported folder's compression.json (empty when none)."""
    info = Path(path) / "compression.json"
    if not info.is_file():
        return []
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{info} is not valid JSON: {exc}", "re-export the model, or delete the broken file") from exc
    entries = data.get("structure") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "kind" in e for e in entries):
        raise UserError(f"{info}: 'structure' must be a list of tables with a 'kind'", "re-export the model")
    return entries


def needs_rebuild(path) -> bool:
    return bool(structure_entries(path))


def apply_structure(model, entries: list[dict]) -> None:
    """Apply ``entries`` (in order) to ``model`` in memory."""
    for entry in entries:
        _resolve(entry["kind"])(model, entry)


def rebuild_model(path, config, dtype=None):
    """Build the model of an exported folder with its recorded structure and load its weights strictly."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    entries = structure_entries(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    apply_structure(model, entries)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"'{folder}' holds no safetensors weights", "point at a folder written by workbench's export")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    expected = set(model.state_dict())
    tied = getattr(config, "tie_word_embeddings", False)
    missing = expected - set(state)
    if tied:
        missing = {k for k in missing if not k.endswith("lm_head.weight")}
    unexpected = set(state) - expected
    if missing or unexpected:
        raise UserError(
            f"the weights in '{folder}' do not match its recorded structure "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {sorted(missing or unexpected)[0]})",
            "the folder was changed after export; export the model again",
        )
    model.load_state_dict(state, strict=False, assign=True)
    # buffers that are not saved (rotary inverse frequencies) are still on meta: rebuild them on the CPU
    _materialize_buffers(model, config)
    if tied:
        model.tie_weights()
    model.eval()
    return model


def _materialize_buffers(model, config) -> None:
    from transformers import AutoModelForCausalLM

    meta = [name for name, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    # a fresh CPU model of the same config has correct non-persistent buffers (e.g. rotary inv_freq)
    reference = dict(AutoModelForCausalLM.from_config(config).named_buffers())
    for name in meta:
        module_name, _, buffer_name = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        value = reference.get(name)
        if value is None:
            raise UserError(f"cannot rebuild buffer {name}", "this is a bug; please report it")
        module.register_buffer(buffer_name, value, persistent=name in model.state_dict())

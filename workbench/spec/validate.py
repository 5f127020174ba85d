"""Building a spec from parsed TOML or JSON, and checking every value and combination. No torch.

Validation errors are ``UserError``s whose message names the key, the bad value
and the allowed values.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from workbench.data.evaluation_text import check_evaluation_set
from workbench.data.sources import check_seed_corpus, check_source
from workbench.errors import UserError
from workbench.registry import step_type

from .checks import choice as _choice
from .schema import DTYPES, EXPORT_FORMATS, NESTED_TABLES, SECTIONS, EvalSpec, RunSpec, SelfGenSpec

_TOP_KEYS = ("name", "description", "reference")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Check one value against its field's annotation (annotations are strings here)."""
    ann = annotation.replace(" ", "")
    optional = "None" in ann
    if value is None:
        if optional:
            return None
        raise UserError(f"{key}: a value is required", f"set {key} to a {ann}")
    base = ann.replace("|None", "")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} = {value!r} is not a boolean", "use true or false")
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} = {value!r} is not an integer", f"give {key} a whole number")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} = {value!r} is not a number", f"give {key} a number such as 0.5")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise UserError(f"{key} = {value!r} is not a string", f"quote the value of {key}")
        return value
    if base.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{key} = {value!r} is not a list of strings", f'write {key} = ["..."]')
        return list(value)
    return value


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise UserError(f"[{where}] must be a table, not {type(data).__name__}", f"write [{where}] followed by key = value lines")
    known = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            allowed = ", ".join(k for k in known if k != "type")
            raise UserError(f"unknown key '{where}.{key}'", f"allowed keys in [{where}]: {allowed}")
        nested = NESTED_TABLES.get(str(known[key].type))
        if nested is not None:
            kwargs[key] = _build(nested, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(f"{where}.{key}", value, str(known[key].type))
    return cls(**kwargs)


def build_step(data: Any, index: int):
    """One ``[[steps]]`` table as its step type's dataclass (coerced, not yet validated)."""
    where = f"steps.{index}"
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a table", "write each step as a [[steps]] table with type = \"prune\"")
    return _build(step_type(data.get("type", "prune"), where).spec, data, where)


def spec_from_dict(data: dict) -> RunSpec:
    """Build and validate a RunSpec from parsed TOML/JSON data."""
    if not isinstance(data, dict):
        raise UserError("a run spec must be a table of settings", "see the shipped presets: workbench presets")
    spec = RunSpec()
    allowed = list(_TOP_KEYS) + list(SECTIONS) + ["steps", "guide", "study"]
    for key, value in data.items():
        if key in _TOP_KEYS:
            setattr(spec, key, _coerce(key, value, "str"))
        elif key in SECTIONS:
            setattr(spec, key, _build(SECTIONS[key], value, key))
        elif key == "steps":
            if not isinstance(value, list):
                raise UserError("steps must be a list of [[steps]] tables", 'write [[steps]] then type = "prune", method = "wanda", ...')
            spec.steps = [build_step(s, i) for i, s in enumerate(value)]
        elif key == "guide":
            check_guide(value)  # read by the TUI's guided sessions; not part of the run
        elif key == "study":
            raise UserError("this preset defines a study (a [study] table), not a single run", "run it with: workbench study PRESET")
        else:
            raise UserError(f"unknown key '{key}'", f"allowed top-level keys: {', '.join(allowed)}")
    validate(spec)
    return spec


def check_guide(guide: Any) -> None:
    """``[guide]``: a preset's per-screen explanations for a guided session (screen name = text)."""
    if not isinstance(guide, dict):
        raise UserError(f"guide must be a table, not {type(guide).__name__}",
                        'write [guide] followed by lines such as model = "why this model"')
    for screen, text in guide.items():
        if not isinstance(text, str):
            raise UserError(f"guide.{screen} = {text!r} is not a string",
                            f'quote the explanation: {screen} = "..."')


def validate(spec: RunSpec) -> RunSpec:
    """Check every value's range and every combination; raise UserError on the first problem."""
    m = spec.model
    if not m.name.strip():
        raise UserError("model.name is empty", "use 'demo', a local folder or a hub id such as org/name")
    _choice("model.dtype", m.dtype, DTYPES)
    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", m.device):
        raise UserError(f"model.device = {m.device!r} is not a device", "allowed: auto, cpu, cuda, cuda:N")

    c = spec.calibration
    check_calibration_source(c.source, "calibration.source")
    if c.nsamples < 1:
        raise UserError(f"calibration.nsamples = {c.nsamples} must be at least 1", "the papers use 128")
    if c.seqlen is not None and c.seqlen < 2:
        raise UserError(f"calibration.seqlen = {c.seqlen} must be at least 2", "leave it out to use min(2048, the model's context)")
    if c.batch_size < 1:
        raise UserError(f"calibration.batch_size = {c.batch_size} must be at least 1", "8 is a good default")
    if c.compare is not None:
        check_calibration_source(c.compare, "calibration.compare")
    validate_selfgen(c.selfgen)

    for i, step in enumerate(spec.steps):
        step.validate(f"steps.{i}")
    check_order(spec.steps)

    e = spec.evaluate
    for ds in e.perplexity:
        check_evaluation_set(ds, "evaluate.perplexity")
    if e.seqlen is not None and e.seqlen < 2:
        raise UserError(f"evaluate.seqlen = {e.seqlen} must be at least 2", "leave it out to use the model's context (capped at 2048)")
    if e.limit is not None and e.limit < 1:
        raise UserError(f"evaluate.limit = {e.limit} must be at least 1", "leave it out to evaluate every window")
    if e.batch_size < 1:
        raise UserError(f"evaluate.batch_size = {e.batch_size} must be at least 1", "try 4")
    validate_evaluate(e)
    _choice("export.dtype", spec.export.dtype, DTYPES)
    _choice("export.format", spec.export.format, EXPORT_FORMATS)
    if spec.export.format == "compressed-tensors" and not any(step.type == "quantize" for step in spec.steps):
        raise UserError("export.format = \"compressed-tensors\" needs a quantize step", "add a quantize step, or use format = \"auto\"")
    return spec


def check_order(steps: list) -> None:
    """A step may not follow a step type its registry entry refuses (a pruning step after quantization)."""
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        entry = step_type(step.type, f"steps.{i}")
        for earlier in entry.refuses_after:
            if earlier in seen:
                raise UserError(f"steps.{i} ({step.type}) cannot follow steps.{seen[earlier]} ({earlier}): the model is already quantized"
                                if earlier == "quantize" else f"steps.{i} ({step.type}) cannot follow steps.{seen[earlier]} ({earlier})",
                                "put the quantize step last (prune first, then quantize), or prune and quantize in one sweep "
                                "with the quantize step's sparsity or pattern (method = \"gptq\")")
        seen.setdefault(step.type, i)


def validate_evaluate(e: EvalSpec, where: str = "evaluate") -> None:
    """The zero-shot, in-context learning and efficiency settings (names and ranges; files are read when the run starts)."""
    from workbench.evaluation.icl_data import check_icl_settings
    from workbench.evaluation.zeroshot import check_task_name

    for name in e.zeroshot:
        check_task_name(name, f"{where}.zeroshot")
    if e.zeroshot_limit is not None and e.zeroshot_limit < 1:
        raise UserError(f"{where}.zeroshot_limit = {e.zeroshot_limit} must be at least 1", "leave it out to evaluate the full task sets")
    check_icl_settings(e, where)


def check_calibration_source(source: str, key: str = "calibration.source") -> None:
    """A calibration source the registry knows (``workbench.data.sources``), written as it should be."""
    check_source(source, key)


def validate_selfgen(g: SelfGenSpec, where: str = "calibration.selfgen") -> None:
    check_seed_corpus(g.corpus, f"{where}.corpus")
    if g.prefix_tokens < 1:
        raise UserError(f"{where}.prefix_tokens = {g.prefix_tokens} must be at least 1", "the paper uses 2 (also 8 and 64)")
    if g.samples is not None and g.samples < 1:
        raise UserError(f"{where}.samples = {g.samples} must be at least 1", "leave it out to generate ceil(nsamples / keep) texts")
    if not g.temperature > 0:
        raise UserError(f"{where}.temperature = {g.temperature} must be positive", "the paper samples at 0.6")
    if not (0 < g.top_p <= 1):
        raise UserError(f"{where}.top_p = {g.top_p} must be in (0, 1]", "the paper uses 0.95")
    if g.top_k < 0:
        raise UserError(f"{where}.top_k = {g.top_k} must be 0 (off) or more", "the paper uses 50")
    if not g.repetition_penalty > 0:
        raise UserError(f"{where}.repetition_penalty = {g.repetition_penalty} must be positive", "1.0 is off; the paper uses 1.2")
    if g.max_new_tokens is not None and g.max_new_tokens < 1:
        raise UserError(f"{where}.max_new_tokens = {g.max_new_tokens} must be at least 1", "leave it out to generate seqlen tokens")
    if not (0 < g.keep <= 1):
        raise UserError(f"{where}.keep = {g.keep} must be in (0, 1]", "0.8 keeps the samples below the 80th percentile of perplexity")
    if g.batch_size < 1:
        raise UserError(f"{where}.batch_size = {g.batch_size} must be at least 1", "try 32")



"""The run spec: what to load, how to calibrate, which compression steps, what to evaluate.

A spec is plain data (dataclasses of str/int/float/bool/lists). It is read from
TOML presets, edited with ``--set key=value``, sent to workers as JSON and
stored in the run history. This module never imports torch.

Validation errors are ``UserError``s whose message names the key, the bad value
and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")
SCOPES = ("row", "matrix")
EVAL_DATASETS_BUILTIN = ("wikitext2", "c4", "books")
CALIBRATION_BUILTIN = ("c4", "wikitext2", "random", "books", "selfgen")
CALIBRATION_PREFIXES = ("file:", "hf:", "selfgen:", "mix:")
# Seed corpora of self-generated calibration data: text sources, never an evaluation text.
SELFGEN_CORPORA = ("wikitext2", "c4", "books")

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass
class ModelSpec:
    name: str = "demo"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass
class SelfGenSpec:
    """``[calibration.selfgen]``: how ``selfgen`` makes its text (``workbench.selfgen``; defaults from Ji et al., ICLR 2025)."""

    corpus: str = "wikitext2"  # seed texts: wikitext2 (validation), c4 (train), books, file:PATH, hf:...
    prefix_tokens: int = 2  # k: generation starts from the first k tokens of each seed text
    samples: int | None = None  # texts to generate; None: ceil(nsamples / keep)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.2
    max_new_tokens: int | None = None  # None: the calibration seqlen
    keep: float = 0.8  # keep the samples whose perplexity is below this quantile
    batch_size: int = 32  # sequences generated at once


@dataclass
class CalibrationSpec:
    source: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None  # None: min(2048, the model's context)
    seed: int = 0
    batch_size: int = 8
    offload_activations: bool = False  # keep calibration activations in CPU memory
    summary: bool = True  # documents, tokens and the dense model's perplexity on the windows, before pruning
    compare: str | None = None  # a source to measure the token-distribution divergence from
    selfgen: SelfGenSpec = field(default_factory=SelfGenSpec)


@dataclass
class PruneStep:
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4"
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    scope: str | None = None  # magnitude: "matrix" (default) or "row"; wanda/sparsegpt: per row
    include_lm_head: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    type: str = "prune"

    @property
    def nm(self) -> tuple[int, int] | None:
        match = _NM.match(self.pattern)
        return (int(match.group(1)), int(match.group(2))) if match else None

    def label(self) -> str:
        alloc = f"{self.allocation}-" if self.allocation != "uniform" else ""
        what = self.pattern if self.nm else f"{self.sparsity:.0%}"
        return f"{alloc}{self.method} {what}"


    def validate(self, where: str = "step") -> None:
        validate_prune_step(self, where)


# Step types by their ``type`` key. Each step class is a dataclass with a
# ``type`` field, ``label()`` and ``validate(where)`` (raising UserError).
# Other modules add theirs with ``register_step`` (see the imports at the end).
STEP_TYPES: dict[str, type] = {"prune": PruneStep}


def register_step(kind: str, cls: type) -> type:
    """Make ``[[steps]] type = kind`` build a ``cls``; returns ``cls`` (usable as a decorator)."""
    STEP_TYPES[kind] = cls
    return cls


@dataclass
class EvalSpec:
    perplexity: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int | None = None  # None: the model's context, capped at 2048
    limit: int | None = None  # the first N windows only
    before: bool = True  # also evaluate the dense model
    batch_size: int = 4
    # zero-shot accuracy through lm-evaluation-harness (workbench.evaluation.zeroshot)
    zeroshot: list[str] = field(default_factory=list)  # bundled task names, lm_eval:NAME or file:TASK.yaml
    zeroshot_limit: int | None = None  # the first N samples of each task (None: the full sets)
    # in-context learning (workbench.evaluation.icl): zero-shot, few-shot and DAIL on classification sets
    icl: list[str] = field(default_factory=list)  # bundled data set names or file:PATH.jsonl
    icl_modes: list[str] = field(default_factory=lambda: ["dail"])  # zeroshot, fewshot, dail
    icl_k: int = 4  # demonstrations per query
    icl_memory: int = 32  # DAIL: at most M earlier (query, predicted label) pairs kept
    icl_retriever: str = "bm25"  # bm25 | hidden (cosine of the model's mean-pooled hidden states)
    icl_max_entropy: float | None = None  # DAIL: only predictions at most this uncertain (0..1) serve as demonstrations
    icl_seeds: int = 3  # query orders (and few-shot draws); accuracy is reported as mean and std over them
    icl_limit: int | None = None  # a fixed random subset of N test queries per data set
    icl_labels: list[str] = field(default_factory=list)  # label words of a file: data set, by label index
    icl_template: str = ""  # prompt of a file: data set, e.g. "Review: {text}\nSentiment:"
    efficiency: bool = False  # parameters, size, prefill tokens/s, decode latency, peak memory


@dataclass
class ExportSpec:
    save: bool = False
    out: str | None = None  # None: a folder in the run's directory
    dtype: str = "auto"  # auto: the checkpoint's dtype
    overwrite: bool = False  # replace an existing folder at out, only if it is itself a workbench export


@dataclass
class RunSpec:
    name: str = "run"
    description: str = ""
    reference: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    steps: list = field(default_factory=list)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    export: ExportSpec = field(default_factory=ExportSpec)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def summary(self) -> str:
        steps = ", ".join(s.label() for s in self.steps) or "no compression"
        return f"{self.model.name}: {steps}"


_SECTIONS = {
    "model": ModelSpec,
    "calibration": CalibrationSpec,
    "evaluate": EvalSpec,
    "export": ExportSpec,
}
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
        nested = _NESTED_TABLES.get(str(known[key].type))
        if nested is not None:
            kwargs[key] = _build(nested, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(f"{where}.{key}", value, str(known[key].type))
    return cls(**kwargs)


# Fields that are tables of their own, e.g. [calibration.selfgen].
_NESTED_TABLES = {"SelfGenSpec": SelfGenSpec}


def _build_step(data: Any, index: int):
    where = f"steps.{index}"
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a table", "write each step as a [[steps]] table with type = \"prune\"")
    kind = data.get("type", "prune")
    if kind not in STEP_TYPES:
        raise UserError(f"{where}.type = {kind!r} is not a known step type", f"allowed: {', '.join(STEP_TYPES)}")
    return _build(STEP_TYPES[kind], data, where)


def spec_from_dict(data: dict) -> RunSpec:
    """Build and validate a RunSpec from parsed TOML/JSON data."""
    if not isinstance(data, dict):
        raise UserError("a run spec must be a table of settings", "see the shipped presets: workbench presets")
    spec = RunSpec()
    allowed = list(_TOP_KEYS) + list(_SECTIONS) + ["steps", "guide", "study"]
    for key, value in data.items():
        if key in _TOP_KEYS:
            setattr(spec, key, _coerce(key, value, "str"))
        elif key in _SECTIONS:
            setattr(spec, key, _build(_SECTIONS[key], value, key))
        elif key == "steps":
            if not isinstance(value, list):
                raise UserError("steps must be a list of [[steps]] tables", 'write [[steps]] then type = "prune", method = "wanda", ...')
            spec.steps = [_build_step(s, i) for i, s in enumerate(value)]
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

    e = spec.evaluate
    for ds in e.perplexity:
        if ds not in EVAL_DATASETS_BUILTIN and not ds.startswith("file:"):
            raise UserError(f"evaluate.perplexity: unknown dataset {ds!r}", f"allowed: {', '.join(EVAL_DATASETS_BUILTIN)}, file:PATH")
    if e.seqlen is not None and e.seqlen < 2:
        raise UserError(f"evaluate.seqlen = {e.seqlen} must be at least 2", "leave it out to use the model's context (capped at 2048)")
    if e.limit is not None and e.limit < 1:
        raise UserError(f"evaluate.limit = {e.limit} must be at least 1", "leave it out to evaluate every window")
    if e.batch_size < 1:
        raise UserError(f"evaluate.batch_size = {e.batch_size} must be at least 1", "try 4")
    validate_evaluate(e)
    _choice("export.dtype", spec.export.dtype, DTYPES)
    return spec


def validate_evaluate(e: EvalSpec, where: str = "evaluate") -> None:
    """The zero-shot, in-context learning and efficiency settings (names and ranges; files are read when the run starts)."""
    from .evaluation.icl_data import check_icl_settings
    from .evaluation.zeroshot import check_task_name

    for name in e.zeroshot:
        check_task_name(name, f"{where}.zeroshot")
    if e.zeroshot_limit is not None and e.zeroshot_limit < 1:
        raise UserError(f"{where}.zeroshot_limit = {e.zeroshot_limit} must be at least 1", "leave it out to evaluate the full task sets")
    check_icl_settings(e, where)


def validate_prune_step(step: PruneStep, where: str = "step") -> None:
    """The checks the preset validator and the TUI's inline validation share."""
    _choice(f"{where}.method", step.method, PRUNE_METHODS)
    _choice(f"{where}.allocation", step.allocation, ALLOCATIONS)
    if step.scope is not None:
        _choice(f"{where}.scope", step.scope, SCOPES)
        if step.scope == "matrix" and step.method != "magnitude":
            raise UserError(f"{where}.scope = 'matrix' applies to magnitude only", f"{step.method} compares weights within each output row; remove scope")
    if step.pattern != "unstructured":
        nm = step.nm
        if nm is None:
            raise UserError(f"{where}.pattern = {step.pattern!r} is not a pattern", "allowed: unstructured, or N:M such as 2:4 (N of every M weights pruned)")
        n, mm = nm
        if not (0 < n < mm):
            raise UserError(f"{where}.pattern = {step.pattern!r}: N:M needs 0 < N < M", "for example 2:4 or 4:8")
        if step.allocation != "uniform":
            raise UserError(f"{where}: allocation {step.allocation!r} cannot be combined with an N:M pattern", "N:M fixes the sparsity of every layer at N/M; use allocation = \"uniform\"")
    elif not (0.0 <= step.sparsity < 1.0):
        raise UserError(f"{where}.sparsity = {step.sparsity} is outside [0, 1)", "give the fraction of weights to remove, e.g. 0.5 for 50%")
    if step.allocation == "owl":
        if step.owl_m <= 0:
            raise UserError(f"{where}.owl_m = {step.owl_m} must be positive", "the OWL paper uses M = 5")
        if not (0 <= step.owl_lambda < 0.5):
            raise UserError(f"{where}.owl_lambda = {step.owl_lambda} must be in [0, 0.5)", "the OWL paper uses lambda = 0.08")
        hi = step.sparsity + step.owl_lambda
        lo = step.sparsity - step.owl_lambda
        if hi >= 1.0 or lo < 0.0:
            raise UserError(
                f"{where}: OWL with sparsity {step.sparsity} and lambda {step.owl_lambda} gives layer sparsities outside [0, 1)",
                "lower owl_lambda or the target sparsity",
            )
    if step.blocksize < 1:
        raise UserError(f"{where}.blocksize = {step.blocksize} must be positive", "SparseGPT uses 128")
    if not (0 <= step.percdamp < 1):
        raise UserError(f"{where}.percdamp = {step.percdamp} must be in [0, 1)", "SparseGPT uses 0.01")


def check_calibration_source(source: str, key: str = "calibration.source") -> None:
    if isinstance(source, str) and source.startswith("mix:"):
        from .calibration import parse_mixture  # no torch

        for part, _ in parse_mixture(source[len("mix:"):], key):
            check_calibration_source(part, f"{key} (in the mixture)")
        return
    if isinstance(source, str) and source.startswith("selfgen:"):
        check_seed_corpus(source[len("selfgen:"):], key)
        return
    if source in CALIBRATION_BUILTIN or any(source.startswith(p) and len(source) > len(p) for p in CALIBRATION_PREFIXES):
        return
    raise UserError(
        f"{key} = {source!r} is not a calibration source",
        f"allowed: {', '.join(CALIBRATION_BUILTIN)}, file:PATH, hf:NAME[:CONFIG]:SPLIT[:FIELD], selfgen:CORPUS, mix:SOURCE=FRACTION,...",
    )


def check_seed_corpus(corpus: str, key: str = "calibration.selfgen.corpus") -> None:
    """Self-generated data starts from a text corpus: a bundled one, a local file or a Hub dataset."""
    if corpus in SELFGEN_CORPORA or any(corpus.startswith(p) and len(corpus) > len(p) for p in ("file:", "hf:")):
        return
    raise UserError(f"{key}: {corpus!r} is not a seed corpus for selfgen",
                    f"allowed: {', '.join(SELFGEN_CORPORA)}, file:PATH, hf:NAME[:CONFIG]:SPLIT[:FIELD]")


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


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{key} = {value!r} is not allowed", f"allowed: {', '.join(map(str, allowed))}")


# ---------------------------------------------------------------- presets and --set


def parse_toml(text: str, origin: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{origin} is not valid TOML: {exc}", "check the quoting and brackets on that line") from None


def resolve_preset(name_or_path: str) -> Path:
    """A shipped preset's name, or a path to a TOML file."""
    from workbench.presets import preset_file, preset_names

    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise UserError(f"preset file '{name_or_path}' does not exist", f"shipped presets: {', '.join(preset_names())}")
        return path
    found = preset_file(name_or_path)
    if found is None:
        raise UserError(f"no preset named '{name_or_path}'", f"shipped presets: {', '.join(preset_names())}; or pass a .toml file")
    return found


def load_preset_data(name_or_path: str) -> dict:
    path = resolve_preset(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read preset '{path}': {exc}", "pass a UTF-8 TOML file") from None
    return parse_toml(text, str(path))


def load_preset(name_or_path: str, overrides: list[str] | None = None) -> RunSpec:
    data = load_preset_data(name_or_path)
    for item in overrides or []:
        apply_override(data, item)
    return spec_from_dict(data)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string: --set model.name=demo


def apply_override(data: dict, item: str) -> None:
    """Apply one ``key=value`` (dotted key; ``steps.0.sparsity`` indexes the step list)."""
    if "=" not in item:
        raise UserError(f"--set {item!r} is not key=value", "for example --set steps.0.sparsity=0.6 or --set calibration.nsamples=64")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {item!r} has an empty key", "for example --set model.name=demo")
    value = _parse_value(raw.strip())
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {key}: '{where}' has no item {part}", f"there are {len(node)} item(s), numbered from 0")
            node = node[int(part)]
        else:
            if part == "steps" and part not in node:
                node[part] = []
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"--set {key}: no item {last}", f"there are {len(node)} item(s), numbered from 0")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {key}: '{'.'.join(parts[:-1])}' is a value, not a table", "check the key")


def spec_to_toml(spec: RunSpec) -> str:
    """Write a spec as a preset file (used by 'save as preset')."""
    import tomli_w

    data = _strip_none(spec.to_dict())
    return tomli_w.dumps(data)


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


# step types defined outside this module register themselves on import
from . import spec_lowrank, spec_structured  # noqa: E402,F401

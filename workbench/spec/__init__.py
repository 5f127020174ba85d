"""The run spec: what to load, how to calibrate, which compression steps, what to evaluate and export. No torch.

- ``schema``: the sections as dataclasses (``RunSpec``, ``ModelSpec``, ...);
- ``validate``: ``spec_from_dict`` (coercion, unknown keys) and ``validate``
  (ranges and combinations); the steps' own checks are their ``validate``;
- ``presets``: presets by name or file, ``--set key=value``, TOML output;
- ``fields`` and ``checks``: what the step dataclasses of the method families
  (``workbench.registry``) use to describe and check their settings.
"""

from .presets import apply_override, load_preset, load_preset_data, parse_toml, resolve_preset, spec_to_toml
from .schema import DTYPES, EVAL_DATASETS_BUILTIN, CalibrationSpec, EvalSpec, ExportSpec, ModelSpec, RunSpec, SelfGenSpec
from .validate import (check_calibration_source, check_guide, check_seed_corpus, spec_from_dict, validate,
                       validate_evaluate, validate_selfgen)

__all__ = ["RunSpec", "ModelSpec", "CalibrationSpec", "SelfGenSpec", "EvalSpec", "ExportSpec", "DTYPES",
           "EVAL_DATASETS_BUILTIN", "spec_from_dict", "validate",
           "validate_evaluate", "validate_selfgen", "check_calibration_source", "check_seed_corpus", "check_guide",
           "load_preset", "load_preset_data", "resolve_preset", "parse_toml", "apply_override", "spec_to_toml"]

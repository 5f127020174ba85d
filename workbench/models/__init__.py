"""Models: devices and dtypes, architecture adapters, loading. Engine side: importing this imports torch.

- ``devices``: ``resolve_device``, ``resolve_dtype``, ``dtype_name``, ``check_requested_gpus``;
- ``adapters``: ``get_adapter`` (where each decoder family keeps its layers, norms and head) and ``weight_matrix``;
- ``loading``: ``load_model``, ``load_spec_model``, ``LoadedModel``, ``model_summary`` and ``load`` (``workbench.load``).
"""

from workbench.model_source import DEMO_MODEL_DIR, SOURCE_HINT, resolve_model_source

from .adapters import (FAMILIES, FamilySpec, ModelAdapter, get_adapter, linear_types, supported_model_types,
                       unsupported_model, weight_matrix)
from .devices import (DEVICE_CHOICES, DTYPE_CHOICES, DTYPES, check_requested_gpus, dtype_name, resolve_device,
                      resolve_dtype)
from .loading import LoadedModel, exception_chain, load, load_model, load_spec_model, model_summary

__all__ = ["DEMO_MODEL_DIR", "SOURCE_HINT", "resolve_model_source", "FAMILIES", "FamilySpec", "ModelAdapter",
           "get_adapter", "supported_model_types", "unsupported_model", "weight_matrix", "DEVICE_CHOICES",
           "DTYPE_CHOICES", "DTYPES", "check_requested_gpus", "dtype_name", "resolve_device", "resolve_dtype",
           "LoadedModel", "load", "load_model", "load_spec_model", "model_summary", "linear_types", "exception_chain"]

"""The engine's side of the worker: the jobs a worker runs (run, evaluate, inspect, preview). Imports torch.

``EngineJobs`` is what ``workbench worker`` serves with (``workbench.backends.worker``
runs the protocol loop and hands it each job): a run or an evaluation is an
engine ``Run``; an inspection loads the model and describes its layout and
the memory a compression needs; a preview builds calibration windows and
summarizes them. Every job reports through ``emit`` and stops when ``cancel()``
says so.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .data.preview import preview_calibration
from .data.windows import default_seqlen
from .engine import Run, versions
from .events import Emit, StageFinished, StageStarted
from .host import base_hello, host_device
from .models import check_requested_gpus, dtype_name, load_spec_model, model_summary, weight_matrix


class EngineJobs:
    """The real engine: ``workbench.engine.Run`` for run and evaluate jobs, a model summary for inspect."""

    def __init__(self):
        check_requested_gpus()  # a GPU that does not exist is refused before hello, not run on the CPU

    def hello(self) -> dict:
        info = base_hello()
        info.update({k: versions()[k] for k in ("torch", "transformers")})
        info["devices"] = self.devices()
        return info

    def devices(self) -> list[dict]:
        """The host and each visible GPU with its memory now (``torch.cuda.mem_get_info``: no synchronization)."""
        devices = [host_device()]
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                devices.append({"kind": "cuda", "index": index, "name": torch.cuda.get_device_name(index),
                                "total": int(total), "free": int(free), "process": int(torch.cuda.memory_reserved(index))})
        return devices

    def execute(self, job, emit: Emit, cancel: Callable[[], bool]) -> dict:
        """Run one job (``workbench.backends.worker.Job``: its kind, its parsed request, its run id)."""
        if job.kind == "inspect":
            return inspect_model(job.request, emit)
        if job.kind == "preview":
            return preview_calibration(job.request, emit, cancel)
        return Run(job.request, emit, cancel, run_id=job.run_id).execute()


def inspect_model(model, emit: Emit) -> dict:
    """``model_summary`` plus every linear's shape and the memory a compression run needs.

    Memory, in bytes at the load dtype: ``weights`` (held on the host), the
    ``largest_layer`` (resident on the device during layer-by-layer work) and
    ``activations_per_sample`` (one calibration sample's layer input and output
    at ``seqlen``; times ``calibration.nsamples`` on the device, or on the host
    with ``calibration.offload_activations``).
    """
    emit(StageStarted(stage="load", title=f"Loading {model.name}"))
    t0 = time.perf_counter()
    loaded = load_spec_model(model)
    emit(StageFinished(stage="load", seconds=time.perf_counter() - t0))
    adapter = loaded.adapter
    summary = model_summary(loaded)
    size = torch.empty((), dtype=loaded.dtype).element_size()
    seqlen = default_seqlen(adapter.context_length)
    summary["linear_shapes"] = {
        f"{adapter.layer_name(i)}.{name}": list(weight_matrix(module).shape)
        for i, layer in enumerate(adapter.layers) for name, module in adapter.linear_modules(layer).items()
    }
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in adapter.layers), default=0)
    summary["memory"] = {
        "dtype": dtype_name(loaded.dtype),
        "weights": summary["total_params"] * size,
        "largest_layer": largest * size,
        "activations_per_sample": 2 * seqlen * (summary["hidden_size"] or 0) * size,
        "seqlen": seqlen,
    }
    summary["device"] = str(loaded.device)
    return summary


__all__ = ["EngineJobs", "inspect_model"]

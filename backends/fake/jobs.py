"""The fake worker's jobs: run, evaluate, inspect, preview and the event stream benchmark, without torch.

``FakeRun`` follows ``workbench.engine.Run.execute`` stage by stage; each
step is announced with its registry plan and imitated by the function its
registry entry names (``workbench.backends.fake.steps``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workbench import __version__
from workbench.errors import Cancelled, RunError, UserError
from workbench.events import (Emit, Log, Metric, Progress, RunFinished, RunStarted, StageFinished, StagePlan, StageStarted)
from workbench.files import EXPORTED_BY, INFO_FILE, prepare_export_target
from workbench.history import workbench_home
from workbench.host import base_hello, host_device
from workbench.registry import load, step_type

from ..worker import Job
from .model import FAILURES, FAKE_GPU_MEMORY, GIB, HEADS, HIDDEN, KV_HEADS, LINEARS, VOCAB, compressed_perplexity
from .preview import fake_preview


@dataclass
class FakeOptions:

    delay: float = 0.02
    layers: int = 8
    fail: str | None = None
    noise: bool = False
    stream: int = 0
    rate: float = 0.0

    def failure(self) -> tuple[str, int] | None:
        """``("crash", 3)`` for ``--fake-fail crash@3``; raises UserError for anything else."""
        if not self.fail:
            return None
        kind, _, at = self.fail.partition("@")
        if kind not in FAILURES or not at.isdigit():
            raise UserError(f"--fake-fail {self.fail!r} is not KIND@N", f"KIND is one of {', '.join(FAILURES)}; N a unit index, e.g. crash@3")
        return kind, int(at)


def _noise(unit: int) -> None:
    """Write to stdout the ways libraries do: print, sys.stdout, the raw descriptor, C stdio."""
    import ctypes

    print(f"fake noise {unit} from print")
    sys.stdout.write(f'{{"v": 1, "type": "result", "noise": {unit}}}\n')
    sys.stdout.flush()
    os.write(1, f"fake noise {unit} from os.write without a newline".encode())
    libc = ctypes.CDLL(None)
    libc.printf(b"fake noise from C printf\n")
    libc.fflush(None)


class FakeJobs:
    """Jobs answered without torch (see the module docstring)."""

    def __init__(self, options: FakeOptions):
        self.options = options
        self.failure = options.failure()
        self.used = 0  # bytes the running job holds on each fake GPU

    def hello(self) -> dict:
        info = base_hello()
        info["devices"] = self.devices()
        info["fake"] = True
        return info

    def devices(self) -> list[dict]:
        """The host and the fake GPUs (one per ``CUDA_VISIBLE_DEVICES`` entry), with their free memory now."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = ["0"] if visible is None else [d for d in visible.split(",") if d.strip()]
        free = max(GIB, FAKE_GPU_MEMORY - GIB - self.used)
        return [host_device()] + [{"kind": "cuda", "index": index, "name": f"Fake GPU {gpu}", "total": FAKE_GPU_MEMORY,
                                   "free": free, "process": GIB + self.used} for index, gpu in enumerate(ids)]

    def execute(self, job: Job, emit: Emit, cancel: Callable[[], bool]) -> dict:
        if job.kind == "inspect":
            return self.inspect(job.request, emit)
        if job.kind == "preview":
            return fake_preview(job.request, emit, self.options.delay)
        if self.options.stream:
            return self.stream(emit)
        try:
            return FakeRun(self, job, emit, cancel).execute()
        finally:
            self.used = 0

    # ---------------------------------------------------------------- jobs
    def stream(self, emit: Emit) -> dict:
        n, rate = self.options.stream, self.options.rate
        t0 = time.perf_counter()
        for i in range(n):
            if rate:
                wait = t0 + i / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            emit(Progress(stage="stream", done=i + 1, total=n))
        return {"events": n, "seconds": time.perf_counter() - t0}

    def inspect(self, model, emit: Emit) -> dict:
        emit(StageStarted(stage="load", title=f"Loading {model.name}"))
        time.sleep(self.options.delay)
        emit(StageFinished(stage="load", seconds=self.options.delay))
        layers = self.options.layers
        per_layer = sum(o * i for o, i in LINEARS.values()) + 2 * HIDDEN
        total = layers * per_layer + 2 * 8256 * HIDDEN + HIDDEN
        return {
            "architecture": "LlamaForCausalLM", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "family": "llama", "num_layers": layers, "total_params": total,
            "decoder_linear_params": layers * sum(o * i for o, i in LINEARS.values()), "hidden_size": HIDDEN,
            "vocab_size": 8256, "context_length": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tied_lm_head": False, "layer0_linears": dict(LINEARS), "dtype": "float32", "source": model.name,
            "linear_shapes": {f"model.layers.{i}.{n}": s for i in range(layers) for n, s in LINEARS.items()},
            "memory": {"dtype": "float32", "weights": total * 4, "largest_layer": per_layer * 4,
                       "activations_per_sample": 2 * 512 * HIDDEN * 4, "seqlen": 512},
            "device": "cpu", "fake": True,
        }

class FakeRun:
    """One run job's event stream, stage by stage like ``workbench.engine.Run.execute``."""

    def __init__(self, jobs: FakeJobs, job: Job, emit: Emit, cancel: Callable[[], bool]):
        self.jobs, self.options, self.failure = jobs, jobs.options, jobs.failure
        self.spec, self.run_id = job.request, job.run_id or job.id
        self.emit, self.cancel = emit, cancel
        self.timings: dict[str, float] = {}
        self.metrics: list[dict] = []
        self.steps: list[dict] = []
        self.effective: list[float] = []  # each step's effective sparsity, for the perplexity formula
        self.failed_once = False
        # the model as the steps leave it: a depth step removes layers, width narrows them, vocab shrinks the embeddings
        self.layers, self.shapes, self.vocab = self.options.layers, dict(LINEARS), VOCAB
        self.heads, self.kv_heads = HEADS, KV_HEADS

    def stage(self, name: str, title: str, total: int | None, work: Callable[[int], None], failing: bool = False,
              start: int = 0, before: Callable[[], None] | None = None) -> None:
        """One stage of ``total`` units; ``work(i)`` runs after each unit's delay.

        In a ``failing`` stage the injected failure strikes at the start of its
        unit, before the cancellation check: the unit right after the last
        event always fails, however fast a cancel arrives.
        """
        self.emit(StageStarted(stage=name, title=title, total=total))
        if before is not None:
            before()
        t0 = time.perf_counter()
        for i in range(start, total or 1):
            if failing:
                self.maybe_fail(i)
            self.unit(i)
            work(i)
            if total:
                self.jobs.used += GIB
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.emit(StageFinished(stage=name, seconds=self.timings[name]))

    def unit(self, i: int) -> None:
        if self.cancel():
            raise Cancelled("the run was cancelled", "partial results are kept in the run history")
        if self.options.noise:
            _noise(i)
        time.sleep(self.options.delay)

    def maybe_fail(self, i: int) -> None:
        if self.failure is None or self.failed_once or i != self.failure[1]:
            return
        self.failed_once = True
        kind = self.failure[0]
        if kind == "error":
            raise RunError(f"fake failure at unit {i}", "this worker was started with --fake-fail")
        if kind == "oom":
            raise MemoryError(f"fake allocation failure at unit {i}")
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang: no more events, no cancellation checks
            time.sleep(3600)

    def parameters(self) -> int:
        """The fake model's parameter count as the steps so far left it (linears, norms, embeddings, LM head)."""
        per_layer = sum(o * i for o, i in self.shapes.values()) + 2 * HIDDEN
        return self.layers * per_layer + 2 * self.vocab * HIDDEN + HIDDEN

    # ---------------------------------------------------------------- stages
    def evaluate(self, phase: str) -> None:
        e = self.spec.evaluate
        windows = e.limit or 10
        for ds in e.perplexity:
            def window(i, ds=ds):
                self.emit(Progress(stage=f"evaluate:{phase}", done=i + 1, total=windows, detail=ds))

            title = f"Perplexity ({'dense' if phase == 'before' else 'compressed'})"
            self.stage(f"evaluate:{phase}", title, windows, window, failing=not self.spec.steps)
            sparsities = self.effective if phase == "after" else []
            metric = {"name": "perplexity", "dataset": ds, "phase": phase, "value": compressed_perplexity(ds, sparsities),
                      "seqlen": e.seqlen or 512, "windows": windows, "limit": e.limit, "extra": {"bits_per_byte": None}}
            self.metrics.append(metric)
            self.emit(Metric(**metric))

    def compress(self, index: int, step) -> None:
        """One step: its registry plan announced, then its fake (``workbench.backends.fake.steps``), as the engine does."""
        entry = step_type(step.type)
        plan = entry.plan(step, index, self.layers)
        self.emit(StagePlan(step=index, kind=step.type, label=step.label(), stages=[s.to_dict() for s in plan]))
        t0 = time.perf_counter()
        report, effective = load(entry.fake)(self, index, step)
        report.setdefault("seconds", round(time.perf_counter() - t0, 3))
        for metric in report.pop("metrics", []):  # as the engine records a step's measurements
            metric = {"phase": "after", **metric}
            self.metrics.append(metric)
            self.emit(Metric(**metric))
        self.steps.append(report)
        self.effective.append(effective)

    def export_folder(self) -> Path:
        """Where the export goes (``export.out``, else ``WORKBENCH_HOME/runs/RUN/model``), checked by the engine's rules
        (``workbench.files``) before the run starts."""
        x = self.spec.export
        out = Path(x.out).expanduser() if x.out else workbench_home() / "runs" / self.run_id / "model"
        prepare_export_target(out, x.overwrite)
        return out

    def export(self) -> str:
        """A folder as the engine's export leaves it, holding only ``compression.json`` (no weights)."""
        out = self.export_folder()
        self.stage("export", f"Saving to {out}", None, lambda i: None)
        out.mkdir(parents=True, exist_ok=True)
        info = {"run_id": self.run_id, "fake": True, "steps": [s.get("label") for s in self.steps],
                "exported_by": f"{EXPORTED_BY} {__version__}", "files": [INFO_FILE], "versions": {"workbench": __version__}}
        (out / INFO_FILE).write_text(json.dumps(info) + "\n")
        metric = {"name": "export_bytes", "dataset": "model", "phase": "after", "value": 0.0,
                  "extra": {"kind": "efficiency", "format": self.spec.export.format, "folder": str(out)}}
        self.metrics.append(metric)
        self.emit(Metric(**metric))
        return str(out)

    def execute(self) -> dict:
        t0 = time.perf_counter()
        spec = self.spec
        self.emit(RunStarted(run_id=self.run_id, spec=spec.to_dict()))
        if spec.export.save:
            self.export_folder()  # a folder it may not write to fails now, not after the work
        self.stage("load", f"Loading {spec.model.name}", None, lambda i: None)
        self.emit(Log(message=f"LlamaForCausalLM with {self.options.layers} layers (fake worker: nothing is computed)"))
        if spec.steps:
            c = spec.calibration
            self.stage("calibrate", f"Calibration data: {c.nsamples} x {c.seqlen or 512} tokens of {c.source}", None, lambda i: None)
        if spec.evaluate.before or not spec.steps:
            self.evaluate("before")
        for i, step in enumerate(spec.steps):
            self.compress(i, step)
        if spec.steps:
            self.evaluate("after")
        exported = self.export() if spec.export.save else None
        summary = {
            "run_id": self.run_id, "name": spec.name, "spec": spec.to_dict(),
            "model": {"architecture": "LlamaForCausalLM", "num_layers": self.options.layers, "fake": True},
            "calibration": None, "steps": self.steps, "structure": [], "metrics": self.metrics, "timings": self.timings,
            "export": exported, "versions": {"workbench": __version__, "fake": True},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        self.emit(RunFinished(run_id=self.run_id, summary=summary, seconds=summary["seconds"]))
        return summary


# The fake worker's answer: fixed data, so UI tests can assert on it.


__all__ = ["FakeOptions", "FakeJobs", "FakeRun"]

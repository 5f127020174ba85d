"""A worker that needs no torch: deterministic, realistic event streams for UI tests and benchmarks.

``workbench worker --fake`` answers every job the way the engine would, with
the same stages, events and summary layout, for a Llama-shaped model of
``--fake-layers`` layers: sparsities are exactly the targets and perplexities
follow a fixed formula, so a UI test can assert on them. Timing and failures
are configurable:

- ``--fake-delay S``: seconds per unit of work (a layer, an evaluation window);
- ``--fake-fail KIND@N``: at unit N of the first compression step (or of the
  evaluation, for a job without steps): ``error`` (a failed run), ``oom``
  (an out-of-memory error), ``crash`` (the process kills itself, like the
  kernel's OOM killer), ``hang`` (stops working and ignores cancellation);
- ``--fake-noise``: every unit also writes to stdout from Python and from C,
  as careless libraries do (the protocol must survive it);
- ``--fake-stream N`` with ``--fake-rate R``: a run job emits just N progress
  events, R per second (0: as fast as possible), for throughput benchmarks.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

from workbench import __version__
from workbench.errors import Cancelled, RunError, UserError
from workbench.events import Emit, LayerDone, Log, Metric, Progress, RunFinished, RunStarted, StageFinished, StageStarted

from .worker import Job, base_hello

FAILURES = ("error", "oom", "crash", "hang")
HIDDEN, INTERMEDIATE, KV = 256, 768, 128  # the bundled demo model's shapes
LINEARS = {
    "self_attn.q_proj": [HIDDEN, HIDDEN], "self_attn.k_proj": [KV, HIDDEN], "self_attn.v_proj": [KV, HIDDEN],
    "self_attn.o_proj": [HIDDEN, HIDDEN], "mlp.gate_proj": [INTERMEDIATE, HIDDEN], "mlp.up_proj": [INTERMEDIATE, HIDDEN],
    "mlp.down_proj": [HIDDEN, INTERMEDIATE],
}
DENSE_PPL = {"wikitext2": 30.0, "c4": 40.0}
FAKE_GPU_MEMORY = 80 * 2**30


def dense_perplexity(dataset: str) -> float:
    return DENSE_PPL.get(dataset, 50.0)


def compressed_perplexity(dataset: str, sparsities: list[float]) -> float:
    """The fake model's perplexity after steps of these sparsities: grows with the square of each."""
    value = dense_perplexity(dataset)
    for s in sparsities:
        value *= 1.0 + 4.0 * s * s
    return value


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

    def hello(self) -> dict:
        info = base_hello()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = ["0"] if visible is None else [d for d in visible.split(",") if d.strip()]
        for index, gpu in enumerate(ids):
            info["devices"].append({"kind": "cuda", "index": index, "name": f"Fake GPU {gpu}",
                                    "total": FAKE_GPU_MEMORY, "free": FAKE_GPU_MEMORY - 2**30})
        info["fake"] = True
        return info

    def execute(self, job: Job, emit: Emit, cancel: Callable[[], bool]) -> dict:
        if job.kind == "inspect":
            return self.inspect(job.request, emit)
        if self.options.stream:
            return self.stream(emit)
        return FakeRun(self, job, emit, cancel).execute()

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
        self.options, self.failure = jobs.options, jobs.failure
        self.spec, self.run_id = job.request, job.run_id or job.id
        self.emit, self.cancel = emit, cancel
        self.timings: dict[str, float] = {}
        self.metrics: list[dict] = []
        self.steps: list[dict] = []
        self.failed_once = False

    def stage(self, name: str, title: str, total: int | None, work: Callable[[int], None], failing: bool = False) -> None:
        """One stage of ``total`` units; ``work(i)`` runs after each unit's delay.

        In a ``failing`` stage the injected failure strikes at the start of its
        unit, before the cancellation check: the unit right after the last
        event always fails, however fast a cancel arrives.
        """
        self.emit(StageStarted(stage=name, title=title, total=total))
        t0 = time.perf_counter()
        for i in range(total or 1):
            if failing:
                self.maybe_fail(i)
            self.unit(i)
            work(i)
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

    # ---------------------------------------------------------------- stages
    def evaluate(self, phase: str) -> None:
        e = self.spec.evaluate
        windows = e.limit or 10
        for ds in e.perplexity:
            def window(i, ds=ds):
                self.emit(Progress(stage=f"evaluate:{phase}", done=i + 1, total=windows, detail=ds))

            title = f"Perplexity ({'dense' if phase == 'before' else 'compressed'})"
            self.stage(f"evaluate:{phase}", title, windows, window, failing=not self.spec.steps)
            sparsities = [s.sparsity for s in self.spec.steps if hasattr(s, "sparsity")] if phase == "after" else []
            metric = {"name": "perplexity", "dataset": ds, "phase": phase, "value": compressed_perplexity(ds, sparsities),
                      "seqlen": e.seqlen or 512, "windows": windows, "limit": e.limit, "extra": {"bits_per_byte": None}}
            self.metrics.append(metric)
            self.emit(Metric(**metric))

    def compress(self, index: int, step) -> None:
        name = f"{step.type}:{index}"
        layers = self.options.layers
        target = getattr(step, "sparsity", None)
        report = {"type": step.type, "label": step.label(), "layers": []}

        def layer(i: int) -> None:
            if target is None:
                self.emit(Progress(stage=name, done=i + 1, total=layers, detail=f"layer {i}"))
                return
            modules = {n: {"shape": s, "sparsity": target, "zeros": round(target * s[0] * s[1]), "numel": s[0] * s[1],
                           "target": target} for n, s in LINEARS.items()}
            done = LayerDone(stage=name, layer=i, total=layers, sparsity=target, target=target,
                             seconds=self.options.delay, modules=modules)
            report["layers"].append({k: v for k, v in done.to_dict().items() if k not in ("type", "stage", "total")})
            self.emit(done)

        self.stage(name, step.label(), layers, layer, failing=True)
        report["seconds"] = self.timings[name]
        if target is not None:
            report["sparsity"] = target
        else:
            report["headline"] = {"fake": "no change"}
        self.steps.append(report)

    def execute(self) -> dict:
        t0 = time.perf_counter()
        spec = self.spec
        self.emit(RunStarted(run_id=self.run_id, spec=spec.to_dict()))
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
        if spec.export.save:
            self.emit(Log(message="fake worker: nothing was exported", level="warning"))
        summary = {
            "run_id": self.run_id, "name": spec.name, "spec": spec.to_dict(),
            "model": {"architecture": "LlamaForCausalLM", "num_layers": self.options.layers, "fake": True},
            "calibration": None, "steps": self.steps, "structure": [], "metrics": self.metrics, "timings": self.timings,
            "export": None, "versions": {"workbench": __version__, "fake": True},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        self.emit(RunFinished(run_id=self.run_id, summary=summary, seconds=summary["seconds"]))
        return summary

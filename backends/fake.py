"""A worker that needs no torch: deterministic, realistic event streams for UI tests and benchmarks.

``workbench worker --fake`` answers every job the way the engine would, with
the same stages, events and summary layout, for a Llama-shaped model of
``--fake-layers`` layers: sparsities are exactly the targets and perplexities
follow a fixed formula, so a UI test can assert on them. Timing and failures
are configurable:

- ``--fake-delay S``: seconds per unit of work (a layer, a search trial, an evaluation window);
- ``--fake-fail KIND@N``: at unit N of the first compression step (or of the
  evaluation, for a job without steps): ``error`` (a failed run), ``oom``
  (an out-of-memory error), ``crash`` (the process kills itself, like the
  kernel's OOM killer), ``hang`` (stops working and ignores cancellation);
- ``--fake-noise``: every unit also writes to stdout from Python and from C,
  as careless libraries do (the protocol must survive it);
- ``--fake-stream N`` with ``--fake-rate R``: a run job emits just N progress
  events, R per second (0: as fast as possible), for throughput benchmarks.

Steps follow the engine's stages and events:

- ``prune``: stage ``prune:I``, one ``LayerDone`` per layer at the target;
- ``lowrank``: stage ``lowrank:I:apply`` with one ``LayerDone`` per layer,
  ``sparsity = target = 1 - retention`` and per linear a ``rank`` and the
  fraction ``retained`` (value projections stay dense); ``energy`` and
  ``search`` allocations first run ``lowrank:I:statistics`` (one progress
  event per layer), and ``search`` then ``lowrank:I:search``: ``trials``
  complete ``Trial`` events of ``--fake-delay`` seconds each, trial n with
  the objective ``trial_objective(n)`` and the ratios ``trial_ratios``; its
  step report holds ``search.best`` like the engine's. Finished trials are
  kept in a journal named by ``WORKBENCH_HOME/runs/RUN/search/study.json``
  (as the engine's study is), and a run whose step's ``storage`` is that
  journal reports them at once and runs only the rest (a resumed search);
- ``depth``: stage ``depth:I`` (a progress event per layer, as the scoring
  criteria do) that removes the layers just before the last one (the last
  ones for criterion ``last``); later steps see fewer layers;
- ``width``: stage ``width:I`` with one ``LayerDone`` per layer whose
  ``sparsity`` is the fraction of the layer's linear weights removed;
- ``vocab``: stage ``vocab:I`` (a progress event per layer) that keeps
  ``size`` tokens of the fake's 8256.

A run with ``export.save`` writes a folder holding only ``compression.json``
(see ``FakeRun.export``), so the UI can evaluate the kept model.

Perplexity after the steps is ``compressed_perplexity`` of each step's
*effective sparsity*: the pruning target; ``1 - retention`` for low-rank;
the fraction of decoder layers removed for depth; the fraction of linear
weights removed for width; the fraction of all parameters removed for vocab.

While a run job computes, the fake GPU's free memory (hello's ``devices``,
and each ``pong``'s) drops by 1 GiB per finished unit of work (layer, trial,
evaluation window), down to 1 GiB, and comes back when the job ends.
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
from workbench.events import (Emit, LayerDone, Log, Metric, Progress, RunFinished, RunStarted, StageFinished, StageStarted,
                              Trial)

from workbench.data.sources import describe_source
from workbench.host import base_hello, host_device

from .worker import Job

FAILURES = ("error", "oom", "crash", "hang")
HIDDEN, INTERMEDIATE, KV = 256, 768, 128  # the bundled demo model's shapes
HEADS, KV_HEADS, VOCAB = 4, 2, 8256
LINEARS = {
    "self_attn.q_proj": [HIDDEN, HIDDEN], "self_attn.k_proj": [KV, HIDDEN], "self_attn.v_proj": [KV, HIDDEN],
    "self_attn.o_proj": [HIDDEN, HIDDEN], "mlp.gate_proj": [INTERMEDIATE, HIDDEN], "mlp.up_proj": [INTERMEDIATE, HIDDEN],
    "mlp.down_proj": [HIDDEN, INTERMEDIATE],
}
DENSE_PPL = {"wikitext2": 30.0, "c4": 40.0}
GIB = 2**30
FAKE_GPU_MEMORY = 80 * GIB
MODULE_TYPES = {"q_proj": "qk", "k_proj": "qk", "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def dense_perplexity(dataset: str) -> float:
    return DENSE_PPL.get(dataset, 50.0)


def compressed_perplexity(dataset: str, sparsities: list[float]) -> float:
    """The fake model's perplexity after steps of these effective sparsities: ``dense * prod(1 + 4 s^2)``.

    A step's effective sparsity is its pruning target, ``1 - retention`` for
    low-rank, and the removed fraction for structured steps (see the module
    docstring).
    """
    value = dense_perplexity(dataset)
    for s in sparsities:
        value *= 1.0 + 4.0 * s * s
    return value


def trial_objective(n: int) -> float:
    """The objective of a fake search's trial ``n`` (0, 1, ...): ``40 + 20 / (n + 1) + (7 n mod 5)``.

    It falls with n but not monotonically, so the best so far differs from the latest.
    """
    return 40.0 + 20.0 / (n + 1) + (n * 7 % 5)


def trial_ratios(n: int, names: list[str], low: float, high: float) -> dict[str, float]:
    """The ratios of trial ``n``: group j gets ``low + (high - low) * ((n + 2 j) * 7 mod 11) / 10``, rounded to 4 places."""
    return {name: round(low + (high - low) * ((n + 2 * j) * 7 % 11) / 10, 4) for j, name in enumerate(names)}


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
        runner = {"lowrank": self.lowrank, "depth": self.depth, "width": self.width, "vocab": self.vocab_step}.get(step.type)
        before = self.parameters()
        t0 = time.perf_counter()
        report, effective = runner(index, step) if runner else self.prune(index, step)
        if step.type in ("depth", "width", "vocab"):
            after = self.parameters()
            report.update(parameters_before=before, parameters_after=after)
            report.setdefault("headline", {})["parameters"] = f"{before:,} -> {after:,} ({(after - before) / before:+.1%})"
        report.setdefault("seconds", round(time.perf_counter() - t0, 3))
        self.steps.append(report)
        self.effective.append(effective)

    def prune(self, index: int, step) -> tuple[dict, float]:
        """A pruning step (or any step type without its own fake): LayerDone at the target, or progress only."""
        name = f"{step.type}:{index}"
        target = getattr(step, "sparsity", None)
        report = {"type": step.type, "label": step.label(), "layers": []}

        def layer(i: int) -> None:
            if target is None:
                self.emit(Progress(stage=name, done=i + 1, total=self.layers, detail=f"layer {i}"))
                return
            modules = {n: {"shape": s, "sparsity": target, "zeros": round(target * s[0] * s[1]), "numel": s[0] * s[1],
                           "target": target} for n, s in self.shapes.items()}
            done = LayerDone(stage=name, layer=i, total=self.layers, sparsity=target, target=target,
                             seconds=self.options.delay, modules=modules)
            report["layers"].append({k: v for k, v in done.to_dict().items() if k not in ("type", "stage", "total")})
            self.emit(done)

        self.stage(name, step.label(), self.layers, layer, failing=True)
        report["seconds"] = self.timings[name]
        if target is not None:
            report["sparsity"] = target
        else:
            report["headline"] = {"fake": "no change"}
        return report, target or 0.0

    # ---------------------------------------------------------------- low-rank
    def lowrank_modules(self, retention: float) -> dict:
        """Per linear of a layer that keeps ``retention`` of its linear parameters: rank, parameters, fraction retained.

        Value projections stay dense, as in the engine; the others share one
        ratio, so the per-linear numbers are close to (not exactly) the layer's.
        """
        dense = {n: o * i for n, (o, i) in self.shapes.items()}
        fixed = sum(v for n, v in dense.items() if n.split(".")[-1] not in MODULE_TYPES)
        ratio = min(1.0, max(0.0, (retention * sum(dense.values()) - fixed) / (sum(dense.values()) - fixed)))
        modules = {}
        for name, (o, i) in self.shapes.items():
            rank = max(1, round(ratio * o * i / (o + i))) if name.split(".")[-1] in MODULE_TYPES else None
            params = rank * (o + i) if rank else o * i
            modules[name] = {"shape": [o, i], "rank": rank, "params": params, "dense_params": o * i,
                             "retained": params / (o * i)}
        return modules

    def lowrank(self, index: int, step) -> tuple[dict, float]:
        stage, layers, retention = f"lowrank:{index}", self.layers, step.retention
        report: dict = {"type": "lowrank", "label": step.label(), "method": step.method, "allocation": step.allocation,
                        "retention": retention}
        t0 = time.perf_counter()
        if step.allocation != "uniform":
            def statistics(i: int) -> None:
                self.emit(Progress(stage=f"{stage}:statistics", done=i + 1, total=layers, detail="statistics and factorizations"))

            self.stage(f"{stage}:statistics", f"Low-rank statistics and factorizations ({step.method})", layers, statistics,
                       failing=True)
        title = f"Low-rank: {step.label()}"
        if step.allocation == "search":
            report["search"] = self.search(stage, index, step)
            title = f"Applying trial {report['search']['best']['number']} sequentially"
        elif step.allocation == "energy":
            report["energy"] = step.energy or retention
        modules = self.lowrank_modules(retention)
        entries: list[dict] = []

        def layer(i: int) -> None:
            entries.append({"layer": i, "retained": retention, "seconds": self.options.delay, "modules": modules})
            self.emit(LayerDone(stage=f"{stage}:apply", layer=i, total=layers, sparsity=1 - retention, target=1 - retention,
                                seconds=self.options.delay, modules=modules))

        self.stage(f"{stage}:apply", title, layers, layer, failing=True)
        dense = layers * sum(o * i for o, i in self.shapes.values())
        kept = round(retention * dense)
        retained = f"{retention:.2%} of the decoder's linear parameters ({kept:,} of {dense:,})"
        headline = {"retained": retained}
        if "search" in report:
            best, trials = report["search"]["best"], report["search"]["trials"]
            headline["best trial"] = (f"#{best['number']} of {trials}: objective {best['objective']:.3f} "
                                      f"(sequential {best['sequential_objective']:.3f})")
        report.update({"retained": retention, "params": {"dense": dense, "after": kept}, "layers": entries,
                       "ranks": {f"{i}.{n}": m["rank"] for i in range(layers) for n, m in modules.items() if m["rank"]},
                       "headline": headline, "seconds": round(time.perf_counter() - t0, 3)})
        self.emit(Log(message=f"{step.label()}: {retained}"))
        return report, 1 - retention

    def search(self, stage: str, index: int, step) -> dict:
        """The fake rank search: ``trials`` complete trials (see ``trial_objective``); returns the step's search report."""
        name, trials = f"{stage}:search", step.trials
        if step.space == "type":
            groups = list(dict.fromkeys(MODULE_TYPES.values()))
        else:
            groups = [f"layer_{i:0{len(str(self.layers - 1))}d}" for i in range(self.layers)]
        study = step.study or f"{self.spec.name}-{index}-fake"
        # the study's finished trials go to a journal (one JSON line each) beside a marker in the run's folder, as the
        # engine's do, so a cancelled search resumes from them: a run whose step names the journal as its storage
        import json
        from pathlib import Path

        from workbench.history import workbench_home

        folder = workbench_home() / "runs" / self.run_id / "search"
        journal = Path(step.storage) if step.storage else folder / "study.journal"
        folder.mkdir(parents=True, exist_ok=True)
        journal.parent.mkdir(parents=True, exist_ok=True)
        (folder / "study.json").write_text(json.dumps({"storage": str(journal), "study": study}) + "\n")
        finished = [int(line) for line in journal.read_text().split()] if journal.is_file() else []
        self.emit(Log(message=f"study {study!r} in {journal} (fake worker: {len(finished)} trial(s) finished before)"))
        best: dict = {}
        metrics: dict[int, dict] = {}

        def trial(n: int, again: bool = False) -> None:
            objective, kl = trial_objective(n), 50.0 / (n + 1)
            params = trial_ratios(n, groups, step.ratio_min, step.ratio_max)
            if not best or objective < best["objective"]:
                best.update(number=n, objective=objective, params=params)
            metrics[n] = {"perplexity": objective - step.kl_weight * kl, "kl": kl, "retained": step.retention}
            self.emit(Trial(stage=name, study=study, number=n, state="complete", params=params, objective=objective,
                            metrics=metrics[n], seconds=self.options.delay, best=dict(best)))
            self.emit(Progress(stage=name, done=n + 1, total=trials,
                               detail=f"best {best['objective']:.3f} (trial {best['number']})"))
            if not again:
                with journal.open("a") as f:
                    f.write(f"{n}\n")

        done = min(len(finished), trials)

        def replay() -> None:  # the finished trials of a resumed study, reported at once as the engine's poll does
            for n in range(done):
                trial(n, again=True)

        self.stage(name, f"Rank search: {trials} trials ({step.sampler}, {step.space} space)", trials, trial, failing=True,
                   start=done, before=replay)
        chosen = metrics[best["number"]]
        return {"best": {"number": best["number"], "objective": best["objective"], "sequential_objective": best["objective"],
                         "ratios": best["params"]},
                "finalists": [{"number": best["number"], "search_objective": best["objective"],
                               "sequential_objective": best["objective"], "perplexity": chosen["perplexity"],
                               "kl": chosen["kl"]}],
                "kendall_tau": None, "study": study, "storage": str(journal), "space": step.space,
                "sampler": step.sampler, "trials": trials}

    # ---------------------------------------------------------------- structured
    def depth(self, index: int, step) -> tuple[dict, float]:
        name, total, where = f"depth:{index}", self.layers, f"steps.{index}"
        count = step.remove if step.remove is not None else round(step.fraction * total)
        if count < 1:
            raise UserError(f"{where}: {step.fraction} of {total} layers rounds to no layer",
                            "raise the fraction, or set remove = 1")
        if count >= total:
            raise UserError(f"{where}: removing {count} of the model's {total} decoder layers would leave none",
                            f"remove at most {total - 1} layers")
        removed = list(range(total - count, total)) if step.criterion == "last" else list(range(total - 1 - count, total - 1))
        scored = step.criterion not in ("last", "random")  # as in the engine: only scoring criteria report progress

        def layer(i: int) -> None:
            if scored:
                self.emit(Progress(stage=name, done=i + 1, total=total, detail=step.criterion.replace("_", " ")))

        self.stage(name, step.label(), total, layer, failing=True)
        scores = [round((0.1 if i in removed else 0.5) + 0.001 * i, 4) for i in range(total)] if scored else None
        self.layers -= count
        report = {"type": "depth", "label": step.label(), "seconds": self.timings[name], "criterion": step.criterion,
                  "selection": step.selection, "score": "fake", "scores": scores, "removed": removed,
                  "layers_before": total, "layers_after": self.layers,
                  "headline": {"layers removed": f"{', '.join(map(str, removed))} of {total}"}}
        return report, count / total

    def width(self, index: int, step) -> tuple[dict, float]:
        name, total = f"width:{index}", self.layers
        head_dim, group = HIDDEN // HEADS, self.heads // self.kv_heads
        before_i, before_heads = self.shapes["mlp.gate_proj"][0], self.heads
        channels = max(1, round(before_i * step.mlp_width))
        if step.attention_heads is not None:
            groups = step.attention_heads // group
        else:
            groups = max(1, round(self.kv_heads * step.attention_width))
        if channels == before_i and groups == self.kv_heads:
            raise UserError(f"steps.{index}: this width step removes nothing from this model",
                            "lower mlp_width or attention_width")
        before = sum(o * i for o, i in self.shapes.values())
        heads, kv = groups * group * head_dim, groups * head_dim
        self.shapes.update({"self_attn.q_proj": [heads, HIDDEN], "self_attn.k_proj": [kv, HIDDEN],
                            "self_attn.v_proj": [kv, HIDDEN], "self_attn.o_proj": [HIDDEN, heads],
                            "mlp.gate_proj": [channels, HIDDEN], "mlp.up_proj": [channels, HIDDEN],
                            "mlp.down_proj": [HIDDEN, channels]})
        self.heads, self.kv_heads = groups * group, groups
        removed = 1.0 - sum(o * i for o, i in self.shapes.values()) / before
        modules = {n: {"shape": list(s)} for n, s in self.shapes.items()}
        layers: list[dict] = []

        def layer(i: int) -> None:
            layers.append({"layer": i, "intermediate_size": channels, "num_heads": self.heads, "num_kv_heads": groups,
                           "removed": removed, "seconds": self.options.delay})
            self.emit(LayerDone(stage=name, layer=i, total=total, sparsity=removed, target=removed,
                                seconds=self.options.delay, modules=modules))

        self.stage(name, step.label(), total, layer, failing=True)
        headline = {}
        if channels != before_i:
            headline["MLP channels"] = f"{before_i} -> {channels}"
        if self.heads != before_heads:
            headline["attention heads"] = f"{before_heads} -> {self.heads}"
        report = {"type": "width", "label": step.label(), "seconds": self.timings[name], "method": step.method,
                  "allocation": step.allocation, "bias_compensation": step.bias_compensation, "layers": layers,
                  "headline": headline}
        return report, removed

    def vocab_step(self, index: int, step) -> tuple[dict, float]:
        name, before, total = f"vocab:{index}", self.vocab, self.layers
        size = step.size if step.size is not None else round(step.fraction * before)
        if size >= before:
            raise UserError(f"steps.{index}: keeping {size} tokens removes nothing from a vocabulary of {before}",
                            f"keep fewer than {before} tokens")
        params = self.parameters()

        def layer(i: int) -> None:
            self.emit(Progress(stage=name, done=i + 1, total=total, detail="counting tokens"))

        self.stage(name, step.label(), total, layer, failing=True)
        self.vocab = size
        c = self.spec.calibration
        report = {"type": "vocab", "label": step.label(), "seconds": self.timings[name],
                  "source": step.source or c.source, "counted_tokens": c.nsamples * (c.seqlen or 512),
                  "vocab_before": before, "vocab_after": size,
                  "headline": {"vocabulary": f"{before} -> {size} tokens"}}
        return report, 2 * (before - size) * HIDDEN / params

    def export_folder(self):
        """Where the export goes: ``export.out``, else ``WORKBENCH_HOME/runs/RUN/model``. A folder with other files
        is refused, and an earlier export is replaced only with ``export.overwrite``, before the run starts."""
        from pathlib import Path

        from workbench.history import workbench_home

        x = self.spec.export
        out = Path(x.out).expanduser() if x.out else workbench_home() / "runs" / self.run_id / "model"
        if out.is_dir() and any(out.iterdir()):
            if not (out / "compression.json").is_file():
                raise UserError(f"export.out = '{out}' holds files that are not a workbench export",
                                "pick an empty or new folder")
            if not x.overwrite:
                raise UserError(f"export.out = '{out}' holds an earlier export",
                                "set export.overwrite = true to replace it, or pick another folder")
        return out

    def export(self) -> str:
        """A folder as the engine's export leaves it, holding only ``compression.json`` (no weights)."""
        import json

        out = self.export_folder()
        self.stage("export", f"Saving to {out}", None, lambda i: None)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compression.json").write_text(json.dumps({"run_id": self.run_id, "fake": True,
                                                          "steps": [s.get("label") for s in self.steps]}) + "\n")
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
FAKE_SEQLEN = 512  # the fake model's context
FAKE_PREVIEW_WINDOWS = 8  # as the engine's preview: the dense perplexity reads at most this many windows
SHOW = 3  # windows whose text the preview returns, as the engine's
FAKE_DOCUMENTS = {"c4": 1000, "wikitext2": 1, "books": 2}  # other text sources: 100
FAKE_DOCUMENT_TOKENS = 250_000
FAKE_TOP = ((278, " the"), (29892, ","), (29889, "."), (310, " of"), (322, " and"))


def fake_preview(spec, emit: Emit, delay: float = 0.0) -> dict:
    """The preview of ``workbench worker --fake``: the layout of ``preview_calibration``, from formulas.

    With ``seqlen = calibration.seqlen or 512`` and ``tokens = nsamples * seqlen``:
    ``documents`` is ``FAKE_DOCUMENTS`` of the source's prefix (100 for other
    text sources, None for ``random``), ``document_tokens`` 250,000 (None for
    ``random``), ``distinct_tokens = min(tokens, 8256) // 2``, the i-th of the
    ``FAKE_TOP`` tokens (i from 0) counts ``tokens // 2 ** (i + 4)``,
    ``perplexity`` is the fake's dense perplexity of the source's prefix (30
    wikitext2, 40 c4, else 50) on ``min(nsamples, 8)`` windows, and window i
    of the first three reads ``"fake window i of SOURCE"``.
    """
    c = spec.calibration
    seqlen = c.seqlen or FAKE_SEQLEN
    tokens = c.nsamples * seqlen
    prefix = c.source.split(":")[0]
    text = prefix != "random"
    stages = (("load", f"Loading {spec.model.name}"),
              ("calibrate", f"Calibration data: {c.nsamples} x {seqlen} tokens of {c.source}"))
    for name, title in stages:
        emit(StageStarted(stage=name, title=title))
        time.sleep(delay)
        emit(StageFinished(stage=name, seconds=delay))
    return {
        "source": c.source, "description": describe_source(c.source), "model": spec.model.name,
        "nsamples": c.nsamples, "seqlen": seqlen, "seed": c.seed,
        "documents": FAKE_DOCUMENTS.get(prefix, 100) if text else None,
        "document_tokens": FAKE_DOCUMENT_TOKENS if text else None,
        "windows": c.nsamples, "tokens": tokens, "distinct_tokens": min(tokens, 8256) // 2,
        "top_tokens": [{"id": i, "text": t, "count": tokens // 2 ** (k + 4)} for k, (i, t) in enumerate(FAKE_TOP)],
        "perplexity": dense_perplexity(prefix), "perplexity_windows": min(c.nsamples, FAKE_PREVIEW_WINDOWS),
        "samples": [{"window": i, "text": f"fake window {i} of {c.source}", "truncated": False}
                    for i in range(min(SHOW, c.nsamples))],
        "fake": True,
    }

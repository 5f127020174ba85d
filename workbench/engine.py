"""A whole run: load, calibrate, evaluate the dense model, compress step by step, evaluate, export.

``execute(spec, emit, cancel)`` is the one entry point the headless CLI, the
worker and the TUI (through the worker) use. Everything it does is reported as
events (``workbench.events``); it returns the run's summary.
"""

from __future__ import annotations

import platform
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .context import StepContext, timed_stage
from .errors import RunError, UserError, WorkbenchError
from .evaluation.baselines import load_baseline, perplexity_key, store_baseline
from .events import Emit, Log, Metric, Progress, RunFinished, RunStarted, StagePlan, WarningEvent
from .history import cache_dir, new_run_id, workbench_home
from .data.sampling import calibration_data
from .data.sources import SourceContext
from .data.summary import calibration_summary, summary_line
from .data.windows import default_seqlen, window_length
from .models import load_spec_model, model_summary
from .preflight import check_steps
from .registry import step_type
from .spec import RunSpec, validate

def versions() -> dict:
    import transformers

    return {
        "workbench": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _oom_types() -> tuple:
    types = [torch.OutOfMemoryError] if hasattr(torch, "OutOfMemoryError") else []
    types.append(MemoryError)
    return tuple(types)


class Run:
    """State of one run while it executes."""

    def __init__(self, spec: RunSpec, emit: Emit | None = None, cancel: Callable[[], bool] | None = None,
                 run_id: str | None = None, run_dir: Path | None = None):
        self.spec = validate(spec)
        self.emit = emit or (lambda e: None)
        self.cancel = cancel
        self.run_id = run_id or new_run_id()
        self.run_dir = Path(run_dir) if run_dir else workbench_home() / "runs" / self.run_id
        self.timings: dict[str, float] = {}
        self.metrics: list[dict] = []
        self.steps: list[dict] = []
        self.loaded = None
        self.tokens = None  # calibration token ids, (nsamples, seqlen)
        self.structure: list[dict] = []  # entries workbench.rebuild needs to rebuild the exported model
        self.summary: dict = {}
        self._capped: set[str] = set()  # the seqlen keys already warned about

    # ------------------------------------------------------------------ stages
    def stage(self, name: str, title: str, total: int | None = None):
        """A stage of the run: announced, timed (``timings[name]``), cancellable at its start."""
        return timed_stage(self.emit, self.timings, self.cancel, name, title, total)

    def step_context(self, index: int) -> StepContext:
        return StepContext(loaded=self.loaded, spec=self.spec, run_id=self.run_id, index=index, tokens=self.tokens, run_dir=self.run_dir,
                           emit=self.emit, cancel=self.cancel, structure=self.structure, timings=self.timings)

    # ------------------------------------------------------------------ pieces
    def load(self):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress display reports loading
        m = self.spec.model
        with self.stage("load", f"Loading {m.name}"):
            self.loaded = load_spec_model(m)
            info = model_summary(self.loaded)
            self.model_info = info
            self.emit(Log(message=f"{info.get('architecture')} with {info.get('num_layers')} layers, "
                                  f"{info.get('total_params', 0) / 1e6:.1f}M parameters, {self.loaded.dtype} on {self.loaded.device}"))
        return self.loaded

    def context_seqlen(self) -> int:
        return default_seqlen(self.loaded.adapter.context_length)

    def seqlen_for(self, asked: int | None, key: str) -> int:
        """The window length for ``key`` (calibration.seqlen, evaluate.seqlen): ``workbench.data.windows``'s rule,
        warned about once per key."""
        def warn(message: str) -> None:
            if key not in self._capped:
                self._capped.add(key)
                self.emit(WarningEvent(message=message))

        return window_length(asked, self.loaded.adapter.context_length, key, warn)

    def calibrate(self) -> torch.Tensor:
        """Build the calibration windows; with ``calibration.summary``, describe them (Log event and the run summary)."""

        c = self.spec.calibration
        seqlen = self.seqlen_for(c.seqlen, "calibration.seqlen")
        context = SourceContext(
            options={"selfgen": c.selfgen}, device=self.loaded.device, cancel=self.cancel,
            progress=lambda done, total, detail: self.emit(Progress(stage="calibrate", done=done, total=total, detail=detail)),
        )

        def build(source: str, with_documents: bool):
            return calibration_data(source, self.loaded.tokenizer, nsamples=c.nsamples, seqlen=seqlen, seed=c.seed,
                                    cache_dir=cache_dir() / "calibration", model=self.loaded.model, context=context,
                                    with_documents=with_documents)

        summary = None
        with self.stage("calibrate", f"Calibration data: {c.nsamples} x {seqlen} tokens of {c.source}"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                data = build(c.source, c.summary)
                if c.summary:
                    compare = build(c.compare, False) if c.compare else None
                    summary = calibration_summary(data, self.loaded.tokenizer, self.loaded.model, self.loaded.device,
                                                  batch_size=self.spec.evaluate.batch_size, compare=compare, cancel=self.cancel)
                    self.emit(Log(message=summary_line(summary)))
            for w in caught:
                if issubclass(w.category, UserWarning):
                    self.emit(WarningEvent(message=str(w.message)))
        self.calibration_info = {"source": c.source, "nsamples": c.nsamples, "seqlen": seqlen, "seed": c.seed, "summary": summary}
        return data.ids

    def evaluate(self, phase: str) -> None:
        """Measure the model as it is now: perplexity, then the zero-shot, ICL and efficiency evaluations asked for.

        ``phase`` is recorded with every metric: before (the dense model),
        after (compressed) or eval (an evaluation attached to a finished run).
        What the evaluations read (task files, data sets) is loaded first, so
        bad input fails before any model work. The model is placed where it
        fits for the whole evaluation (``workbench.evaluation.placement``) and
        is back in CPU memory afterwards.
        """
        from .evaluation import suite
        from .evaluation.placement import placed

        e = self.spec.evaluate
        if not e.perplexity and not suite.requested(e):
            return
        prepared = self.prepared_evaluations()

        def warn(message: str) -> None:
            self.emit(WarningEvent(message=message))

        with placed(self.loaded.model, self.loaded.device, warn=warn) as device:
            if e.perplexity:
                self._perplexity(phase, device)
            suite.run_all(self, phase, prepared, device)

    def prepared_evaluations(self):
        """The evaluations' inputs (task files, data sets), read once, before any model work."""
        from .evaluation import suite

        if getattr(self, "_prepared", None) is None:
            self._prepared = suite.prepare(self.spec.evaluate)
        return self._prepared

    def _perplexity(self, phase: str, device: torch.device) -> None:
        from .evaluation.suite import phase_label
        from .perplexity import bits_per_byte, eval_tokens, perplexity

        e = self.spec.evaluate
        loaded = self.loaded
        seqlen = self.seqlen_for(e.seqlen, "evaluate.seqlen")
        name = f"evaluate:{phase}"
        with self.stage(name, f"Perplexity ({phase_label(phase)})"):
            for ds in e.perplexity:
                ids = eval_tokens(ds, loaded.tokenizer, seqlen)
                # the dense model's figure is stored under everything that determines it, and reused
                key = self._baseline_key(ds, ids, seqlen, device) if phase == "before" else None
                stored = load_baseline(key) if key and not e.fresh else None
                if stored is not None:
                    self.emit(Log(message=f"dense perplexity on {ds} reused from run {stored.get('run_id')} "
                                          f"({stored.get('stored')}); --fresh measures it again"))
                    self.add_metric({"name": "perplexity", "dataset": ds, "phase": phase, "value": float(stored["value"]),
                                     "seqlen": seqlen, "windows": int(stored["windows"]), "limit": e.limit,
                                     "extra": {"bits_per_byte": stored.get("bits_per_byte"),
                                               "reused_from": stored.get("run_id")}})
                    continue

                def progress(done, total, ds=ds):
                    self.emit(Progress(stage=name, done=done, total=total, detail=ds))

                result = perplexity(loaded.model, ids, seqlen, limit=e.limit, batch_size=e.batch_size,
                                    device=device, progress=progress, cancel=self.cancel)
                bpb = bits_per_byte(result, ids, loaded.tokenizer)
                self.add_metric({"name": "perplexity", "dataset": ds, "phase": phase, "value": float(result["ppl"]),
                                 "seqlen": seqlen, "windows": int(result["windows"]), "limit": e.limit,
                                 "extra": {"bits_per_byte": bpb}})
                if key:
                    store_baseline(key, {"value": float(result["ppl"]), "windows": int(result["windows"]),
                                         "bits_per_byte": bpb, "run_id": self.run_id, "dataset": ds})

    def _baseline_key(self, ds: str, ids, seqlen: int, device: torch.device) -> str | None:
        e = self.spec.evaluate
        return perplexity_key(self.loaded, ids, dataset=ds, seqlen=seqlen, limit=e.limit, batch_size=e.batch_size,
                              device_type=torch.device(device).type, trust_remote_code=self.spec.model.trust_remote_code,
                              versions=versions())

    def add_metric(self, metric: dict) -> None:
        """Keep a measured number in the run's summary and emit it (the history stores it as it arrives)."""
        self.metrics.append(metric)
        self.emit(Metric(**metric))

    def compress(self, index: int, step) -> dict:
        """Apply one compression step through the runner its type registered (``workbench.registry``); its report."""
        entry = step_type(step.type)
        plan = entry.plan(step, index, len(self.loaded.adapter.layers))
        self.emit(StagePlan(step=index, kind=step.type, label=step.label(), stages=[s.to_dict() for s in plan]))
        ctx = self.step_context(index)
        with torch.set_grad_enabled(entry.gradients):
            report = entry.run(ctx, step)
        self.tokens = ctx.tokens  # a vocabulary step re-expresses the calibration windows
        for metric in report.pop("metrics", []):  # numbers a step measures about the model (bits per weight, size)
            self.add_metric({"phase": "after", **metric})
        self.steps.append(report)
        return report

    def export_target(self) -> Path | None:
        """Where the export goes (None when the run does not save its model)."""
        x = self.spec.export
        if not x.save:
            return None
        return Path(x.out).expanduser() if x.out else self.run_dir / "model"

    def check_export_target(self) -> None:
        """Before any work: the export folder may be written, and there is roughly room for the model.

        A folder that is not empty and is not an earlier export, an earlier
        export without ``export.overwrite``, a parent that is a file, a folder
        that cannot be written: each is a UserError now, not after the run.
        """
        out = self.export_target()
        if out is None:
            return
        from .files import checkpoint_bytes, export_space_warning, prepare_export_target
        from .model_source import resolve_model_source

        info = prepare_export_target(out, self.spec.export.overwrite, log=lambda message: self.emit(Log(message=message)))
        self._export_free = info["free_bytes"]
        try:
            kind, where = resolve_model_source(self.spec.model.name)
        except UserError:
            return  # loading reports it
        if kind != "hub":
            warning = export_space_warning(info["free_bytes"], checkpoint_bytes(where), out)
            if warning:
                self.emit(WarningEvent(message=warning))

    def export(self) -> str | None:
        out = self.export_target()
        if out is None:
            return None
        from .export import export_format, export_model

        x = self.spec.export
        dtype = self.loaded.export_dtype(x.dtype)  # auto: the checkpoint's own (the model may compute in another)
        fmt = x.format
        if self.structure and fmt != "dense":
            if export_format(self.loaded.model, fmt) == "compressed-tensors":  # only workbench.load rebuilds this model
                self.emit(WarningEvent(message="the model has recorded structure (a low-rank or per-layer width step) that only "
                                               "workbench.load rebuilds, so it is exported with dense (dequantized) weights, "
                                               "not in the compressed-tensors format"))
                fmt = "dense"
        with self.stage("export", f"Saving to {out}"):
            path = export_model(self.loaded.model, self.loaded.tokenizer, out, self.build_summary(exported=str(out)),
                                dtype=dtype, overwrite=x.overwrite, log=lambda message: self.emit(Log(message=message)),
                                format=fmt)
        size = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
        self.add_metric({"name": "export_bytes", "dataset": "model", "phase": "after", "value": float(size),
                         "extra": {"kind": "efficiency", "format": fmt, "folder": str(path)}})
        return str(path)

    def build_summary(self, exported: str | None = None) -> dict:
        return {
            "run_id": self.run_id,
            "name": self.spec.name,
            "spec": self.spec.to_dict(),
            "model": getattr(self, "model_info", None),
            "calibration": getattr(self, "calibration_info", None),
            "steps": self.steps,
            "structure": self.structure,
            "metrics": self.metrics,
            "timings": self.timings,
            "export": exported,
            "versions": versions(),
        }

    # ------------------------------------------------------------------ all
    def execute(self) -> dict:
        t0 = time.perf_counter()
        self.emit(RunStarted(run_id=self.run_id, spec=self.spec.to_dict()))
        try:
            with torch.no_grad():
                self.check_export_target()
                self.load()
                check_steps(self.loaded, self.spec.steps)  # what only the model can judge, before any step runs
                self.prepared_evaluations()  # a bad task or data file fails now, not after compression
                self.tokens = self.calibrate() if self.spec.steps else None
                if self.spec.evaluate.before or not self.spec.steps:
                    self.evaluate("before")
                for i, step in enumerate(self.spec.steps):
                    self.compress(i, step)
                if self.spec.steps:
                    self.evaluate("after")
                exported = self.export()
        except _oom_types() as exc:
            hint = ("use fewer calibration samples (calibration.nsamples), keep activations on the CPU "
                    "(calibration.offload_activations = true), smaller batches (calibration.batch_size, "
                    "evaluate.batch_size) or a 16-bit dtype (model.dtype)")
            raise RunError(f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", hint) from exc
        self.summary = self.build_summary(exported)
        seconds = time.perf_counter() - t0
        self.summary["seconds"] = round(seconds, 3)
        self.emit(RunFinished(run_id=self.run_id, summary=self.summary, seconds=seconds))
        return self.summary


def execute(spec: RunSpec, emit: Emit | None = None, cancel: Callable[[], bool] | None = None,
            run_id: str | None = None, run_dir: Path | None = None) -> dict:
    """Run a spec to the end; raise UserError (bad input), RunError or Cancelled."""
    return Run(spec, emit, cancel, run_id, run_dir).execute()


__all__ = ["execute", "Run", "versions", "WorkbenchError", "UserError"]

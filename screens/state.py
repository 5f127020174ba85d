"""What the UI knows about its workers and their jobs: plain data, folded from worker updates.

The bridge applies every ``Update`` here as it arrives (cheap: no widgets are
touched), and the screens render from this state at most a few dozen times a
second, so a worker streaming thousands of events per second cannot drown the
UI. No Textual and no torch in this module; it is tested on its own.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from workbench.registry import step_type
from workbench.spec.validate import build_step

ACTIVE = ("queued", "running")


class LogLines(deque):
    """A bounded deque of log lines that counts every line ever appended.

    ``appended`` lets a reader that remembers its last count take only the
    new lines, even after the oldest ones fell off the front.
    """

    def __init__(self, maxlen: int = 2000):
        super().__init__(maxlen=maxlen)
        self.appended = 0

    def append(self, line) -> None:
        super().append(line)
        self.appended += 1

    def since(self, seen: int) -> list:
        """The lines appended after the first ``seen`` (those still kept)."""
        fresh = min(self.appended - seen, len(self))
        return list(islice(reversed(self), fresh))[::-1] if fresh > 0 else []  # from the end: cheap on a full deque


@dataclass
class StageState:
    name: str
    title: str = ""
    total: int | None = None
    done: int = 0
    detail: str = ""
    started: float = 0.0
    seconds: float | None = None  # set when the stage finished

    @property
    def finished(self) -> bool:
        return self.seconds is not None

    def rate(self, now: float) -> float | None:
        """Units per second so far, once a unit is done."""
        elapsed = now - self.started
        return self.done / elapsed if self.done and elapsed > 0 else None

    def eta(self, now: float) -> float | None:
        """Seconds left in this stage at its rate so far; None when unknown."""
        rate = self.rate(now)
        if self.finished:
            return 0.0
        if rate is None or self.total is None:
            return None
        return max(0.0, (self.total - self.done) / rate)


@dataclass
class JobState:
    """One job (run, evaluate, inspect or preview) on a worker, as the UI sees it."""

    id: str
    kind: str
    title: str = ""
    spec: dict = field(default_factory=dict)
    run_id: str | None = None
    worker: str = ""
    status: str = "queued"  # queued, running, finished, failed, cancelled
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    stages: dict[str, StageState] = field(default_factory=dict)
    current: str | None = None
    layers: dict[str, list[dict]] = field(default_factory=dict)  # stage -> LayerDone dicts, by layer index
    plans: dict[str, dict] = field(default_factory=dict)  # stage -> its planned stage (StagePlan): title, total, quantity
    trials: dict[str, list[dict]] = field(default_factory=dict)  # stage -> Trial dicts
    metrics: list[dict] = field(default_factory=list)
    logs: LogLines = field(default_factory=LogLines)  # (level, message); stage starts and ends included
    result: dict | None = None
    error: dict | None = None
    events: int = 0
    cancel_requested: bool = False
    _eta_mark: tuple[float, float] | None = field(default=None, repr=False)  # (progress, time) of its last change

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def expected_stages(self) -> list[str]:
        """The stages a run of this spec goes through, in order (for overall progress)."""
        if self.kind == "inspect":
            return ["load"]
        if self.kind == "preview":
            return ["load", "calibrate"]
        steps = self.spec.get("steps") or []
        evaluate = self.spec.get("evaluate") or {}
        names = ["load"]
        if steps:
            names.append("calibrate")
        if evaluate.get("before", True) or not steps:
            names.append("evaluate:before")
        for i, step in enumerate(steps):
            names += _step_stages(step, i)
        if steps:
            names.append("evaluate:after")
        return names

    def progress(self) -> float:
        """Overall fraction done: finished stages count 1, the current one its share."""
        if self.status == "finished":
            return 1.0
        names = self.expected_stages
        for name in self.stages:
            if name not in names:
                names.append(name)
        total = 0.0
        for name in names:
            stage = self.stages.get(name)
            if stage is None:
                continue
            if stage.finished:
                total += 1
            elif stage.total:
                total += min(1.0, stage.done / stage.total)
        return min(1.0, total / max(1, len(names)))

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left: the time up to the last progress scaled by the fraction left, counted down since then
        (None before any progress). A stage that reports nothing for a while (calibration data being built) so
        holds the estimate steady instead of pushing it up every second."""
        if not self.active or self.started is None:
            return None if self.active else 0.0
        now = now or time.time()
        done = self.progress()
        if done <= 0.0:
            return None
        if self._eta_mark is None or self._eta_mark[0] != done:
            self._eta_mark = (done, now)
        at = self._eta_mark[1]
        return max(0.0, (at - self.started) * (1 - done) / done - (now - at))

    def quantity(self, stage: str | None) -> str:
        """What a stage's per-layer value is (its plan's quantity): sparsity, retained, removed or qerror."""
        return (self.plans.get(stage or "") or {}).get("quantity") or "sparsity"

    def layer_values(self, stage: str | None = None) -> tuple[str | None, list[float | None], int | None, float | None]:
        """(stage, per-layer values in the stage's planned quantity, layer count, target in the same terms)."""
        stage = stage or next(reversed(self.layers), None)
        if stage is None:
            return None, [], None, None
        rows = self.layers[stage]
        total = max((r.get("total") or 0 for r in rows), default=0) or None
        values: list[float | None] = [None] * (total or (max(r["layer"] for r in rows) + 1 if rows else 0))
        for r in rows:
            if r["layer"] < len(values):
                values[r["layer"]] = layer_value(r)
        plan = self.plans.get(stage) or {}
        target = plan.get("target") if plan.get("target") is not None else (rows[-1].get("target") if rows else None)
        return stage, values, total, target

    def metric_value(self, dataset: str, phase: str, name: str = "perplexity") -> float | None:
        for m in reversed(self.metrics):
            if m.get("name") == name and m.get("dataset") == dataset and m.get("phase") == phase:
                return m.get("value")
        return None


def layer_value(row: dict) -> float | None:
    """A LayerDone's value in its stage's planned quantity (older workers sent only ``sparsity``)."""
    return row.get("value") if row.get("value") is not None else row.get("sparsity")


def _step_stages(step: dict, index: int) -> list[str]:
    """The stages one compression step goes through: its type's plan (``workbench.registry``), as the engine announces it."""
    kind = step.get("type", "prune") if isinstance(step, dict) else "?"
    try:
        return [s.stage for s in step_type(kind).plan(build_step(step, index), index, 0)]
    except Exception:  # noqa: BLE001 - a half-edited step: one stage named after its type, as a fallback
        return [f"{kind}:{index}"]


@dataclass
class WorkerState:
    name: str
    status: str = "starting"  # starting, ready, dead
    hello: dict | None = None
    devices: list[dict] = field(default_factory=list)
    message: str = ""  # why it is dead, or the last notable thing
    stderr: deque = field(default_factory=lambda: deque(maxlen=200))


class UIState:
    """Every worker and job the UI has seen, updated by ``apply``; ``changed`` says what to repaint."""

    def __init__(self):
        self.workers: dict[str, WorkerState] = {}
        self.jobs: dict[str, JobState] = {}
        self.changed: set[str] = set()  # job ids and "workers" since the last flush
        self.notices: list[tuple[str, str, str | None]] = []  # (severity, message, hint) to show once

    def add_job(self, job: JobState) -> JobState:
        self.jobs[job.id] = job
        self.changed.add(job.id)
        return job

    def latest(self, kind: str | None = None) -> JobState | None:
        jobs = [j for j in self.jobs.values() if kind is None or j.kind == kind]
        return max(jobs, key=lambda j: j.submitted) if jobs else None

    def worker(self, name: str) -> WorkerState:
        if name not in self.workers:
            self.workers[name] = WorkerState(name)
        return self.workers[name]

    def take_changes(self) -> set[str]:
        changed, self.changed = self.changed, set()
        return changed

    def apply(self, update: Any) -> None:
        """Fold one ``workbench.backends.client.Update`` into the state."""
        kind = update.kind
        if kind in ("hello", "died", "hung", "memory", "stderr", "protocol"):
            self._apply_worker(update)
            return
        job = self.jobs.get(update.job) if update.job else None
        if job is None:
            return
        self.changed.add(job.id)
        now = time.time()
        if kind == "accepted":
            job.worker = update.worker
        elif kind == "started":
            job.status, job.started, job.worker = "running", now, update.worker
        elif kind == "event" and update.event is not None:
            job.events += 1
            self._apply_event(job, update.event.to_dict(), now)
        elif kind == "result":
            job.status, job.ended = "finished", now
            job.result = update.data.get("result") or {}
            seen = {(m.get("name"), m.get("dataset"), m.get("phase")) for m in job.metrics}
            for m in job.result.get("metrics") or []:  # an evaluation whose events were missed
                if (m.get("name"), m.get("dataset"), m.get("phase")) not in seen:
                    job.metrics.append(m)
        elif kind == "error":
            data = update.data
            hint = data.get("hint")
            if hint and job.run_id:  # the engine's hints name the run as RUN: this one has an id
                hint = hint.replace("--resume RUN", f"--resume {job.run_id}")
            job.error = {"kind": data.get("kind"), "message": data.get("message"), "hint": hint,
                         "details": data.get("traceback") or "\n".join(data.get("stderr") or [])}
            cancelled = data.get("kind") == "cancelled"
            job.status = "cancelled" if cancelled else "failed"
            job.ended = now
            # a cancel the user asked for is what happened, not an error
            job.logs.append(("warning" if cancelled else "error", f"{data.get('message')}" + (f" ({hint})" if hint else "")))

    def _apply_event(self, job: JobState, e: dict, now: float) -> None:
        kind = e["type"]
        if kind == "stage_started":
            job.stages[e["stage"]] = StageState(e["stage"], e.get("title", ""), e.get("total"), started=now)
            job.current = e["stage"]
            job.logs.append(("stage", f"{e.get('title') or e['stage']}: started"))
        elif kind == "progress":
            stage = job.stages.setdefault(e["stage"], StageState(e["stage"], started=now))
            stage.done, stage.detail = e.get("done", 0), e.get("detail", "")
            if e.get("total") is not None:
                stage.total = e["total"]
        elif kind == "stage_finished":
            stage = job.stages.setdefault(e["stage"], StageState(e["stage"], started=now))
            stage.seconds = e.get("seconds", 0.0)
            if stage.total:
                stage.done = stage.total
            job.logs.append(("stage", f"{stage.title or stage.name}: done in {stage.seconds:.1f} s"))
        elif kind == "stage_plan":
            for planned in e.get("stages") or []:
                job.plans[planned["stage"]] = planned
        elif kind == "layer_done":
            rows = job.layers.setdefault(e["stage"], [])
            rows[:] = [r for r in rows if r["layer"] != e["layer"]] + [e]
            stage = job.stages.get(e["stage"])
            if stage is not None:
                stage.done = max(stage.done, e["layer"] + 1)
                stage.total = stage.total or e.get("total")
        elif kind == "trial":
            job.trials.setdefault(e.get("stage") or "search", []).append(e)
        elif kind == "metric":
            job.metrics.append({k: e.get(k) for k in ("name", "dataset", "value", "phase", "seqlen", "windows", "stderr", "extra")})
        elif kind == "log":
            job.logs.append((e.get("level", "info"), e.get("message", "")))
        elif kind == "warning":
            job.logs.append(("warning", e.get("message", "")))
        elif kind == "run_started":
            job.run_id = e.get("run_id") or job.run_id
        elif kind == "run_failed":
            job.logs.append(("error", e.get("message", "")))

    def _apply_worker(self, update: Any) -> None:
        w = self.worker(update.worker)
        self.changed.add("workers")
        data = update.data or {}
        if update.kind == "hello":
            w.status, w.hello, w.devices, w.message = "ready", data, list(data.get("devices") or []), ""
        elif update.kind == "memory":
            w.devices = list(data.get("devices") or w.devices)
        elif update.kind in ("died", "hung"):
            w.status = "dead"
            reason = data.get("reason") or ("stopped answering" if update.kind == "hung" else "ended")
            w.message = f"the worker {reason}"
            self.notices.append(("error", f"worker {update.worker}: {w.message}",
                                 "a fresh worker starts for the next job; the run's events so far are in History"))
        elif update.kind == "stderr":
            w.stderr.append(data.get("line", ""))
        elif update.kind == "protocol":
            w.stderr.append(f"protocol: {data.get('message', '')}")

"""The Run screen: the latest run's progress, per-layer results, search trials, log, memory, and outcome.

With no run yet it shows the setup that ctrl+r would run (or what is wrong
with it). A repaint does only the new work: table rows and log lines added
since the last one, charts redrawn when their input changed, so a flood of
events stays cheap. Everything shown derives from ``app.state``.
"""

from __future__ import annotations

import time

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import ContentSwitcher, DataTable, ProgressBar, RichLog, Static

from .base import WorkbenchScreen
from .charts import LayerChart, TrialChart
from .protocol import protocol_text
from .state import JobState, WorkerState, layer_value
from .widgets import ConfirmModal, human_bytes, human_seconds

STATUS_STYLE = {"queued": "yellow", "running": "green", "finished": "green", "failed": "red", "cancelled": "yellow"}
LOG_STYLE = {"stage": "bold", "warning": "yellow", "error": "bold red", "debug": "dim"}
# what went wrong, in a few words, by the error kind the worker or client reported
FAILURE = {"worker_died": "the worker died", "worker_hung": "the worker stopped answering",
           "out_of_memory": "out of memory", "bad_input": "the setup was rejected"}


def planned_trials(job: JobState, stage: str) -> int | None:
    """The ``trials`` of the spec step a search stage (``lowrank:I...``) belongs to."""
    steps = job.spec.get("steps") or []
    parts = stage.split(":")
    index = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    if index is not None and index < len(steps):
        return steps[index].get("trials")
    return next((s.get("trials") for s in steps if s.get("allocation") == "search"), None)


def metric_lines(metrics: list[dict]) -> list[str]:
    """One line per (metric, dataset): ``wikitext2 perplexity 30.00 → 60.00 (512 tok × 40 win)``, a perplexity with
    its protocol (each phase's when they differ); accuracies with their stderr."""
    groups: dict[tuple, dict[str, dict]] = {}
    for m in metrics:
        groups.setdefault((m.get("name"), m.get("dataset")), {})[m.get("phase") or "after"] = m
    lines = []
    for (name, dataset), phases in groups.items():
        shown = [phases[p] for p in ("before", "after") if p in phases]
        protocols = {protocol_text(m) for m in shown}
        if len(protocols) > 1:
            lines.append(f"{dataset} {name} " + " → ".join(f"{fmt_metric(m)} ({protocol_text(m)})" for m in shown))
        else:
            line = f"{dataset} {name} " + " → ".join(fmt_metric(m) for m in shown)
            lines.append(line + (f" ({protocols.pop()})" if protocols and next(iter(protocols)) else ""))
    return lines


def fmt_metric(m: dict) -> str:
    value = m.get("value")
    if value is None:
        return "?"
    text = f"{value:.2f}" if m.get("name") == "perplexity" else f"{value:.4f}"
    return text + (f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else "")


def memory_text(worker: WorkerState | None) -> str:
    """What the worker holds (its resident memory, its memory on each GPU) and what the machine has in all."""
    if worker is None or not worker.devices:
        return "memory: no report from the worker yet"
    held, machine = [], []
    for d in worker.devices:
        name = "RAM" if d.get("kind") == "cpu" else str(d.get("name", "GPU"))
        process = d.get("process")
        if process is not None:
            held.append(f"{human_bytes(process)} {'RSS' if name == 'RAM' else 'on ' + name}")
        machine.append(f"{name} {human_bytes(d.get('total'))} ({human_bytes(d.get('free'))} free)")
    worker_part = f"worker {', '.join(held)} · " if held else ""
    return f"memory: {worker_part}machine {', '.join(machine)}"


def search_step(spec: dict) -> int | None:
    """The index of the spec's low-rank step with a rank search, if any."""
    for i, step in enumerate(spec.get("steps") or []):
        if isinstance(step, dict) and step.get("type") == "lowrank" and step.get("allocation") == "search":
            return i
    return None


def search_marker(run_id: str | None):
    """Where a run's rank search says its study is (its folder on this machine), or None when it has none here."""
    from workbench.history import workbench_home

    if not run_id:
        return None
    marker = workbench_home() / "runs" / run_id / "search" / "study.json"
    return marker if marker.is_file() else None


class RunScreen(WorkbenchScreen):
    NAME = "run"
    TITLE = "Run"
    CSS_PATH = "run.tcss"
    BINDINGS = [
        Binding("c", "cancel_run", "Cancel", id="run.cancel"),
        Binding("v", "toggle_view", "Trials/layers", id="run.view"),
        Binding("r", "resume", "Resume search", id="run.resume"),
    ]

    def __init__(self):
        super().__init__()
        self._job_id: str | None = None
        self._forget()

    def _forget(self) -> None:
        """What was drawn of the shown run, so a repaint adds only what is new."""
        self._status: str | None = None
        self._log_seen, self._table_stage, self._table_rows = 0, None, 0
        self._chart_key, self._trial_count, self._best_number = None, -1, None
        self._view: str | None = None  # None: follow the run (trials while it searches), else the user's choice

    def compose_body(self) -> ComposeResult:
        yield Static(id="run-ready")
        with Vertical(id="run-live"):
            yield Static(id="run-title")
            with Horizontal(id="overall-row", classes="bar-row"):
                yield Static("overall", classes="bar-label")
                yield ProgressBar(total=100, show_eta=False, id="overall-bar")
                yield Static(id="overall-eta", classes="bar-eta")
            with Horizontal(id="stage-row", classes="bar-row"):
                yield Static(id="stage-label", classes="bar-label")
                yield ProgressBar(total=1, show_eta=False, id="stage-bar")
                yield Static(id="stage-eta", classes="bar-eta")
            yield Static(id="run-memory")
            yield Static(id="run-final")
            with Horizontal(id="run-panes"):
                with ContentSwitcher(initial="layer-chart", id="run-charts"):
                    yield LayerChart(id="layer-chart")
                    with Vertical(id="trial-pane"):
                        yield Static(id="trial-summary")
                        yield TrialChart(id="trial-chart")
                with Vertical(id="run-right"):
                    with ContentSwitcher(initial="layer-table", id="run-tables"):
                        yield DataTable(id="layer-table", cursor_type="row", zebra_stripes=True)
                        yield DataTable(id="best-table", cursor_type="row")
                    yield RichLog(id="run-log", wrap=True, markup=False, max_lines=2000, min_width=20)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#best-table", DataTable).add_columns("parameter", "best")
        self.set_interval(1.0, self._tick)  # ETAs move while a long unit of work sends nothing
        self._show_ready()

    # ------------------------------------------------------------ repaint
    def on_session(self) -> None:
        if self.shown_job() is None:
            self._job_id = None
            self._show_ready()

    def shown_job(self) -> JobState | None:
        """The run being worked on, else the latest run (a run queued behind another waits its turn to show); an
        ended run from before the setup was last replaced (a preset, a guided walk) gives way to the new setup."""
        state = self.app.state
        running = [j for j in state.jobs.values() if j.kind == "run" and j.status == "running"]
        if running:
            return max(running, key=lambda j: j.submitted)
        latest = state.latest("run")
        if latest is not None and not latest.active and latest.submitted < self.app.session.loaded_at:
            return None
        return latest

    def on_state(self, changes: set[str]) -> None:
        job = self.shown_job()
        if job is None:
            self._show_ready()
            return
        if job.id != self._job_id:
            self._start(job)
        elif job.id not in changes and "workers" not in changes:
            return
        self._paint_header(job)
        self._paint_layers(job)
        self._paint_trials(job)
        self._paint_log(job)
        if job.status != self._status:
            self._status = job.status
            self._paint_final(job)
            self.refresh_bindings()

    def _tick(self) -> None:
        job = self.app.state.jobs.get(self._job_id or "")
        if self.is_current and job is not None and job.active:
            self._paint_header(job)

    def _show_ready(self) -> None:
        self.query_one("#run-live").display = False
        ready = self.query_one("#run-ready", Static)
        ready.display = True
        key = self.app.key_for("run.start", "ctrl+r")
        problem = self.app.session.problem()
        if problem is not None:
            text = (f"[b]No run yet.[/] The setup is not valid yet: {escape(problem.message)}\n"
                    + (f"What to do: {escape(problem.hint)}\n" if problem.hint else "")
                    + "Fix it on the Model, Calibration or Compression screen.")
        else:
            spec = self.app.session.spec()
            e, x = spec.evaluate, spec.export
            measures = ", ".join(e.perplexity) + (f" ({e.limit} windows)" if e.limit else " (every window)") \
                if e.perplexity else "no perplexity"
            keeps = f"exported to {x.out or 'the run folder'}" if x.save else "not exported"
            text = (f"[b]Ready to run[/] {escape(spec.name)}\n{escape(spec.summary())}\n"
                    f"measures {escape(measures)} · model {escape(keeps)} "
                    f"[dim](Evaluate › Run settings)[/]\n\nPress [b]{escape(key)}[/] to run it.")
        last = self.app.state.latest("run")
        if last is not None and not last.active:
            history = self.app.key_for("screen.history", "6")
            text += f"\n\n[dim]The last run ({escape(last.title)}, {last.status}) is in History ({escape(history)}).[/]"
        ready.update(text)

    def _start(self, job: JobState) -> None:
        """A new run: empty every pane and forget what was drawn for the previous one."""
        self._job_id = job.id
        self._forget()
        self.query_one("#run-ready").display = False
        self.query_one("#run-live").display = True
        self.query_one("#layer-table", DataTable).clear(columns=True)
        self.query_one("#best-table", DataTable).clear()
        self.query_one("#run-log", RichLog).clear()
        self.query_one("#trial-summary", Static).update("")
        index = search_step(job.spec)
        first = next((st for st in job.spec.get("steps") or [] if isinstance(st, dict)), {})
        if first.get("type") == "lowrank":
            self.query_one(LayerChart).update_layers([], title="rank ratio per layer", ylabel="retained")
        else:
            self.query_one(LayerChart).update_layers([])
        self.query_one(TrialChart).update_trials([], waiting="waiting for the first trial" if index is not None else None)
        self._switch_view(job)

    def _paint_header(self, job: JobState) -> None:
        now = time.time()
        status = job.status
        if job.active and job.cancel_requested:
            status = "cancelling"
        elif status == "queued":
            status = "queued: waiting for the worker"
        color = STATUS_STYLE.get(job.status, "white")
        run = f" · run {job.run_id}" if job.run_id else ""
        self.query_one("#run-title", Static).update(f"[b]{escape(job.title)}[/] · [{color} b]{status}[/]{escape(run)}")
        done = job.progress()
        self.query_one("#overall-bar", ProgressBar).update(progress=100 * done)
        if job.active:
            eta = f"ETA {human_seconds(job.eta(now))}"
        else:
            eta = f"took {human_seconds(job.ended - job.started)}" if job.started and job.ended else ""
        self.query_one("#overall-eta", Static).update(eta)
        stage = job.stages.get(job.current or "")
        row = self.query_one("#stage-row")
        row.display = job.active and stage is not None
        if row.display:
            self.query_one("#stage-label", Static).update(escape(stage.title or stage.name))
            bar = self.query_one("#stage-bar", ProgressBar)
            detail = f"{stage.detail} " if stage.detail else ""
            if stage.total:
                bar.update(total=stage.total, progress=min(stage.done, stage.total))
                self.query_one("#stage-eta", Static).update(
                    escape(f"{stage.done}/{stage.total} {detail}ETA {human_seconds(stage.eta(now))}"))
            else:  # a stage that counts nothing (building calibration data): a moving bar and the time it has taken
                if bar.total is not None:
                    bar.update(total=None)
                self.query_one("#stage-eta", Static).update(escape(f"{detail}{human_seconds(now - stage.started)} so far"))
        workers = self.app.state.workers
        worker = workers.get(job.worker) or next(iter(workers.values()), None)
        self.query_one("#run-memory", Static).update(escape(memory_text(worker)))

    def _paint_layers(self, job: JobState) -> None:
        stage = next(reversed(job.layers), None)
        if stage is None:
            return
        table = self.query_one("#layer-table", DataTable)
        if stage != self._table_stage:  # a new step: its own rows and, for low-rank, the retained column
            self._table_stage, self._table_rows = stage, 0
            table.clear(columns=True)
            table.add_column("layer", key="layer")
            table.add_column({"qerror": "output error"}.get(job.quantity(stage), job.quantity(stage)), key="value")
            table.add_column("time", key="time")
            table.add_column("error", key="error")
            self._switch_view(job)
        rows = job.layers[stage]
        quantity = job.quantity(stage)
        for r in rows[self._table_rows:]:
            key = str(r["layer"])
            if key in table.rows:  # a layer reported again replaces its row's place in the list: skip it
                continue
            value = layer_value(r)
            errors = [m["error"] for m in (r.get("modules") or {}).values() if m.get("error") is not None]
            shown = "–" if value is None else (f"{value:.3g}" if quantity == "qerror" else f"{value:.4f}")
            table.add_row(r["layer"], shown, f"{r.get('seconds', 0.0):.2f} s",
                          f"{sum(errors) / len(errors):.4g}" if errors else "–", key=key)
        self._table_rows = len(rows)
        key = (stage, len(rows))
        if key != self._chart_key:
            self._chart_key = key
            _, values, total, target = job.layer_values(stage)
            if quantity == "retained":
                self.query_one(LayerChart).update_layers(values, total=total, target=target, title="rank ratio per layer",
                                                         ylabel="retained")
            elif quantity == "qerror":
                self.query_one(LayerChart).update_layers(values, total=total, target=None,
                                                         title="quantization output error per layer", ylabel="relative error",
                                                         unit_range=False)
            elif quantity == "removed":
                self.query_one(LayerChart).update_layers(values, total=total, target=target,
                                                         title="parameters removed per layer", ylabel="removed")
            else:
                self.query_one(LayerChart).update_layers(values, total=total, target=target)

    def _paint_trials(self, job: JobState) -> None:
        stage = next(reversed(job.trials), None)
        if stage is None or len(job.trials[stage]) == self._trial_count:
            return
        trials = job.trials[stage]
        if self._trial_count <= 0:
            self._switch_view(job)
            self.refresh_bindings()
        self._trial_count = len(trials)
        self.query_one(TrialChart).update_trials(
            [(t.get("number", i), t.get("objective") if t.get("state", "complete") == "complete" else None)
             for i, t in enumerate(trials)])
        best = trials[-1].get("best") or {}
        planned = planned_trials(job, stage)
        summary = f"trials {len(trials)}/{planned if planned is not None else '?'}"
        if best.get("objective") is not None:
            summary += f" · best #{best.get('number')}: {best['objective']:.4g}"
        self.query_one("#trial-summary", Static).update(summary)
        if best.get("number") != self._best_number:
            self._best_number = best.get("number")
            table = self.query_one("#best-table", DataTable)
            table.clear()
            for name, value in (best.get("params") or {}).items():
                table.add_row(name, f"{value:.3f}" if isinstance(value, float) else str(value))

    def on_resize(self, event) -> None:
        # the log's lines are wrapped at the width they were written at: write them again at the new width
        job = self.app.state.jobs.get(self._job_id or "")
        if job is not None:
            self.call_after_refresh(self._rewrite_log, job)

    def _rewrite_log(self, job: JobState) -> None:
        self.query_one("#run-log", RichLog).clear()
        self._log_seen = job.logs.appended - len(job.logs)
        self._paint_log(job)

    def _paint_log(self, job: JobState) -> None:
        fresh = job.logs.since(self._log_seen)
        self._log_seen = job.logs.appended
        log = self.query_one("#run-log", RichLog)
        for level, message in fresh:
            prefix = "▸ " if level == "stage" else f"{level}: " if level in ("warning", "error") else ""
            log.write(Text(prefix + str(message), style=LOG_STYLE.get(level, "")))

    def _paint_final(self, job: JobState) -> None:
        final = self.query_one("#run-final", Static)
        final.set_classes(job.status)
        final.display = not job.active
        if job.active:
            return
        history = self.app.key_for("screen.history", "6")
        took = f" in {human_seconds(job.ended - job.started)}" if job.started and job.ended else ""
        run = escape(f" · run {job.run_id}") if job.run_id else ""
        if job.status == "finished":
            lines = [f"[b green]finished[/]{took}{run}"]
            lines += [escape(line) for line in metric_lines(job.metrics)] or ["no metrics were measured"]
            evaluate = self.app.key_for("screen.evaluate", "5")
            lines.append(f"[b]{escape(evaluate)}[/] Evaluate it · [b]{escape(history)}[/] History")
        elif job.status == "cancelled":
            lines = [f"[b yellow]cancelled[/]{run}",
                     f"The events up to the cancel are in History ([b]{escape(history)}[/])."]
            if search_step(job.spec) is not None:
                lines.append(f"[b]{escape(self.app.key_for('run.resume', 'r'))}[/] resumes its search: the finished "
                             "trials are kept" if search_marker(job.run_id) else
                             f"resume it where it ran: workbench search --resume {escape(job.run_id or '')}")
        else:
            error = job.error or {}
            what = FAILURE.get(error.get("kind") or "", "the run failed")
            lines = [f"[b red]failed: {what}[/]{run}", escape(error.get("message") or "no message from the worker")]
            if error.get("hint"):
                lines.append(f"What to do: {escape(error['hint'])}")
            lines.append(f"The events so far are in History ([b]{escape(history)}[/]).")
        final.update("\n".join(lines))

    # ------------------------------------------------------------ views and actions
    def _switch_view(self, job: JobState) -> None:
        """Trials while a search runs and no layer is done yet, else layers (unless the user chose)."""
        searching = bool(job.trials) or search_step(job.spec) is not None
        view = self._view or ("trials" if searching and not job.layers else "layers")
        self.query_one("#run-charts", ContentSwitcher).current = "trial-pane" if view == "trials" else "layer-chart"
        self.query_one("#run-tables", ContentSwitcher).current = "best-table" if view == "trials" else "layer-table"

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        job = self.app.state.jobs.get(self._job_id or "")
        if action == "cancel_run":  # hidden, not greyed out, when nothing runs
            return job is not None and job.active
        if action == "toggle_view":  # a run with a search step has both views from its start
            return job is not None and (bool(job.trials) or search_step(job.spec) is not None)
        if action == "resume":
            return job is not None and self.resumable(job)
        return super().check_action(action, parameters)

    def resumable(self, job: JobState) -> bool:
        return job.status in ("cancelled", "failed") and search_step(job.spec) is not None and \
            search_marker(job.run_id) is not None

    async def action_resume(self) -> None:
        """Run a cancelled search again in its study, as ``workbench search --resume RUN`` does: its finished
        trials are kept and only the rest run."""
        import copy
        import json

        job = self.app.state.jobs.get(self._job_id or "")
        if job is None or not self.resumable(job):
            return
        study = json.loads(search_marker(job.run_id).read_text())
        spec = copy.deepcopy(job.spec)
        step = spec["steps"][search_step(spec)]
        step["storage"], step["study"] = study["storage"], study["study"]
        trials = len(job.trials.get(next(reversed(job.trials), ""), [])) if job.trials else 0
        total = step.get("trials")

        async def answer(yes: bool | None) -> None:
            if yes:
                if await self.app.submit("run", spec, title=f"{job.title} (resumed)") is not None:
                    self.app.switch_mode("run")

        self.app.push_screen(ConfirmModal(f"Resume the search of {job.title} ({job.run_id})? One run: {trials} trial(s) "
                                          f"are kept, {max(0, (total or 0) - trials) if total else 'the rest'} run, "
                                          "then the best allocation is applied and evaluated.", "Resume", "Not now"),
                             answer)

    async def action_cancel_run(self) -> None:
        await self.app.action_cancel()

    def action_toggle_view(self) -> None:
        job = self.app.state.jobs.get(self._job_id or "")
        if job is None or not (job.trials or search_step(job.spec) is not None):
            return
        current = self.query_one("#run-charts", ContentSwitcher).current
        self._view = "layers" if current == "trial-pane" else "trials"
        self._switch_view(job)

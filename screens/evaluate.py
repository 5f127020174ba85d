"""The Evaluate screen: measure the setup's dense model, or the model a finished run kept, beyond the run itself.

Left, what to evaluate: the target (the setup's model, or a run from the
history that kept its model: its export, or the model of a run without
steps), perplexity data sets, zero-shot tasks, in-context learning and
efficiency. Every change is validated by the spec validator, so the messages
are the command line's. Right, this session's evaluation jobs and the
selected one's progress and results, filled in as its metrics arrive.

An evaluation is an ``evaluate`` job (a spec without steps) that the worker
client records as a run of its own. For a history run, its metrics are also
stored with that run as phase ``eval`` when the job finishes, as
``workbench eval RUN`` does, so History and compare show them.
"""

from __future__ import annotations

import copy
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, DataTable, Input, Label, OptionList, ProgressBar, Select, SelectionList, Static
from textual.widgets.option_list import Option

from workbench.errors import UserError, WorkbenchError
from workbench.evaluation import report
from workbench.evaluation.icl_data import DATASETS, MODES, RETRIEVERS
from workbench.evaluation.zeroshot import BUNDLED_TASKS
from workbench.spec import EVAL_DATASETS_BUILTIN, EvalSpec, spec_from_dict

from .base import WorkbenchScreen
from .widgets import human_seconds

# input id -> [evaluate] key; an empty field leaves the key out, so the engine's default applies
INPUTS = {
    "eval-limit": ("limit", "max windows"), "eval-seqlen": ("seqlen", "seq length"), "eval-batch": ("batch_size", "batch size"),
    "eval-zs-limit": ("zeroshot_limit", "max samples"), "eval-icl-k": ("icl_k", "demos K"),
    "eval-icl-memory": ("icl_memory", "memory M"), "eval-icl-seeds": ("icl_seeds", "orders"),
    "eval-icl-limit": ("icl_limit", "max queries"), "eval-icl-entropy": ("icl_max_entropy", "max entropy"),
}
HIDDEN = ("icl_labels", "icl_template")  # kept from the setup's [evaluate]: a file: ICL data set needs them
MODEL_SETTINGS = ("dtype", "device", "trust_remote_code")  # what an evaluation of a run keeps of the run's [model]
NO_MODEL_HINT = "re-run it with export on"
RUNS_LISTED = 200


@dataclass
class Target:
    """Something to evaluate: the setup's model or a history run's; ``problem`` (message, hint) when it cannot be."""

    key: str
    label: str  # in the target list
    title: str  # of the evaluation job
    model: str | None
    settings: dict
    run_id: str | None = None
    problem: tuple[str, str, str] | None = None  # (in a few words, message, hint)


def _number(text: str):
    """An input's value for the validator: int, float, else the text itself (so it names the bad value)."""
    text = text.strip()
    if not text:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def history_targets(app) -> list[Target]:
    """The finished runs of the history as targets, newest first (UserError when the history cannot be read)."""
    from .history import open_history, steps_text

    local = app.session.backend.where == "local"
    targets = []
    with open_history(app) as history:
        for record in history.runs(limit=RUNS_LISTED):
            if record.status != "finished":
                continue
            model = history.model_of(record)
            # the path the worker wrote, not the one the client located (host:path for an ssh worker)
            model = (record.summary or {}).get("export") or model
            problem = None
            if model is None:
                problem = ("no model kept", f"run {record.id} did not keep its compressed model", NO_MODEL_HINT)
            elif record.spec.get("steps") and local and not Path(model).is_dir():
                problem = ("its export is gone", f"the exported model of run {record.id} is gone ('{model}')", NO_MODEL_HINT)
            settings = {k: v for k, v in (record.spec.get("model") or {}).items() if k in MODEL_SETTINGS}
            label = f"{record.name} ({record.id[-6:]}): {steps_text(record)}"
            targets.append(Target(f"run:{record.id}", label, f"{record.name} ({record.id[-6:]})", model, settings,
                                  record.id, problem))
    return targets


class EvaluateScreen(WorkbenchScreen):
    NAME = "evaluate"
    TITLE = "Evaluate"
    CSS_PATH = "evaluate.tcss"
    AUTO_FOCUS = "#eval-target"
    BINDINGS = [Binding("ctrl+e", "start", "Evaluate", priority=True, id="evaluate.start")]

    def __init__(self):
        super().__init__()
        self.targets: dict[str, Target] = {}
        self.target_key = "dense"
        self.selected: str | None = None  # the job whose results are shown
        self.attach_to: dict[str, str] = {}  # evaluate job id -> history run id its metrics go to
        self._jobs_shown: list = []
        self._table_key: tuple | None = None
        self._ended: set[str] = set()
        self._stale = True  # read the history's runs again at the next repaint
        self.hidden: dict = {}

    # ------------------------------------------------------------------ layout
    def compose_body(self) -> ComposeResult:
        e = {**asdict(EvalSpec()), **{k: v for k, v in (self.app.session.data.get("evaluate") or {}).items() if v is not None}}
        e = {k: [v] if isinstance(v, str) and isinstance(getattr(EvalSpec(), k, None), list) else v for k, v in e.items()}
        # the setup's own data sets and tasks (file:..., lm_eval:...) are offered beside the bundled ones
        ppl = list(dict.fromkeys([*EVAL_DATASETS_BUILTIN, *e["perplexity"]]))
        tasks = list(dict.fromkeys([*BUNDLED_TASKS, *e["zeroshot"]]))
        icl = {d.name: f"{d.name} ({d.title})" for d in DATASETS.values()} | {n: n for n in e["icl"] if n not in DATASETS}
        self.hidden = {k: e[k] for k in HIDDEN if e.get(k)}
        with Horizontal(id="eval-main"):
            with Vertical(id="eval-left"):
                with VerticalScroll(id="eval-form"):
                    yield Label("Model", classes="eval-heading")
                    yield OptionList(id="eval-target", markup=False)
                    yield Label("Perplexity", classes="eval-heading")
                    yield SelectionList(*((ds, ds, ds in e["perplexity"]) for ds in ppl), id="eval-ppl")
                    yield from self._inputs(e, "eval-limit", "eval-seqlen", "eval-batch")
                    yield Label("Zero-shot tasks", classes="eval-heading")
                    yield SelectionList(*((t, t, t in e["zeroshot"]) for t in tasks), id="eval-zeroshot")
                    yield from self._inputs(e, "eval-zs-limit")
                    yield Label("In-context learning", classes="eval-heading")
                    yield SelectionList(*((label, name, name in e["icl"]) for name, label in icl.items()), id="eval-icl")
                    yield Label("modes", classes="eval-sub")
                    yield SelectionList(*((m, m, m in e["icl_modes"]) for m in MODES), id="eval-icl-modes")
                    with Horizontal(classes="eval-field"):
                        yield Label("retriever")
                        yield Select([(r, r) for r in RETRIEVERS], value=e["icl_retriever"], allow_blank=False,
                                     compact=True, id="eval-icl-retriever")
                    yield from self._inputs(e, "eval-icl-k", "eval-icl-memory", "eval-icl-seeds", "eval-icl-limit",
                                            "eval-icl-entropy")
                    yield Label("Efficiency", classes="eval-heading")
                    yield Checkbox("speed and memory", bool(e["efficiency"]), id="eval-efficiency")
                yield Static("", id="eval-problem", markup=False)
                yield Button("Evaluate", id="eval-start", variant="primary")
            with Vertical(id="eval-right"):
                yield Label("Evaluations", classes="eval-heading")
                yield OptionList(id="eval-jobs", markup=False)
                yield Static("nothing evaluated yet", id="eval-progress", markup=False)
                yield ProgressBar(total=100, show_eta=False, id="eval-bar")
                table = DataTable(id="eval-table", cursor_type="row", zebra_stripes=True)
                table.add_columns("metric", "dataset", "value", "bits/byte")
                yield table

    def _inputs(self, values: dict, *ids: str) -> ComposeResult:
        for input_id in ids:
            key, label = INPUTS[input_id]
            with Horizontal(classes="eval-field"):
                yield Label(label)
                value = values.get(key)
                yield Input("" if value is None else str(value), placeholder="default", compact=True, id=input_id)

    def on_mount(self) -> None:
        # attach results to their run even while another screen is shown (on_state runs only while this one is)
        self.app.changed.subscribe(self, self._attach_finished)

    # ------------------------------------------------------------------ targets
    def on_session(self) -> None:
        self._stale = True

    def on_screen_resume(self) -> None:
        self._stale = True  # runs before the frame's resume handler, which calls on_state

    def refresh_targets(self) -> None:
        model = self.app.session.data.get("model") or {}
        name = model.get("name") or "demo"
        dense = Target("dense", f"the setup's model: {name}", name, name,
                       {k: v for k, v in model.items() if k in MODEL_SETTINGS})
        targets = [dense]
        try:
            targets += history_targets(self.app)
        except (WorkbenchError, sqlite3.Error) as exc:
            self.notify(f"the run history could not be read: {getattr(exc, 'message', exc)}", severity="warning", timeout=6)
        self.targets = {t.key: t for t in targets}
        if self.target_key not in self.targets:
            self.target_key = "dense"
        options = self.query_one("#eval-target", OptionList)
        options.set_options(Option(t.label if t.problem is None else f"{t.label} ({t.problem[0]}: {t.problem[2]})", id=t.key,
                                   disabled=t.problem is not None) for t in targets)
        options.highlighted = options.get_option_index(self.target_key)
        if self.focused is options:  # keep the form's first heading in view
            self.call_after_refresh(self.query_one("#eval-form").scroll_home, animate=False)
        self.validate()

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_list.id == "eval-target" and event.option.id:
            self.target_key = event.option.id
            self.validate()
        elif event.option_list.id == "eval-jobs" and event.option.id and event.option.id != self.selected:
            self.selected = event.option.id
            self.show_job()

    def target(self) -> Target | None:
        return self.targets.get(self.target_key)

    # ------------------------------------------------------------------ the spec
    def settings(self) -> dict:
        """The [evaluate] table the form describes."""
        settings: dict = {
            **copy.deepcopy(self.hidden),
            "perplexity": list(self.query_one("#eval-ppl", SelectionList).selected),
            "zeroshot": list(self.query_one("#eval-zeroshot", SelectionList).selected),
            "icl": list(self.query_one("#eval-icl", SelectionList).selected),
            "icl_modes": list(self.query_one("#eval-icl-modes", SelectionList).selected),
            "icl_retriever": self.query_one("#eval-icl-retriever", Select).value,
            "efficiency": self.query_one("#eval-efficiency", Checkbox).value,
        }
        for input_id, (key, _) in INPUTS.items():
            value = _number(self.query_one(f"#{input_id}", Input).value)
            if value is not None:
                settings[key] = value
        return settings

    def build_spec(self) -> dict:
        """The evaluate job's spec; UserError (the validator's, or "nothing to evaluate") when it is not valid."""
        target = self.target()
        if target is None:
            raise UserError("no model picked", "pick the setup's model or a finished run in the list")
        if target.problem is not None:
            raise UserError(*target.problem[1:])
        spec = spec_from_dict({"name": "eval", "model": {**copy.deepcopy(target.settings), "name": target.model},
                               "evaluate": self.settings()})
        e = spec.evaluate
        if not (e.perplexity or e.zeroshot or e.icl or e.efficiency):
            raise UserError("nothing to evaluate", "pick a perplexity data set, a zero-shot task, an ICL data set or efficiency")
        return spec.to_dict()

    def validate(self) -> UserError | None:
        """Show the first problem under the form (and disable the button); returns it."""
        try:
            self.build_spec()
            problem = None
        except UserError as exc:
            problem = exc
        line = self.query_one("#eval-problem", Static)
        line.update("" if problem is None else f"{problem.message}\n{problem.hint}" if problem.hint else problem.message)
        line.set_class(problem is not None, "problem")
        return problem

    def on_input_changed(self, event: Input.Changed) -> None:
        self.validate()

    def on_selection_list_selected_changed(self, event: SelectionList.SelectedChanged) -> None:
        self.validate()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self.validate()

    def on_select_changed(self, event: Select.Changed) -> None:
        self.validate()

    # ------------------------------------------------------------------ launching
    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "eval-start":
            self.action_start()

    def action_start(self) -> None:
        """Queue an evaluation of the picked model with the form's settings."""
        try:
            spec = self.build_spec()
        except UserError as exc:
            self.app.show_error(exc.message, exc.hint, "The evaluation is not valid yet")
            return
        target = self.target()
        self.run_worker(self._submit(spec, target), group="evaluate-submit", exit_on_error=False)

    async def _submit(self, spec: dict, target: Target) -> None:
        # a worker that is still starting (a real one imports torch) must not hold up the screen
        job = await self.app.submit("evaluate", spec, title=f"evaluate {target.title}")
        if job is None:
            return
        if target.run_id is not None:
            self.attach_to[job.id] = target.run_id
        self.selected = job.id
        self._jobs_shown = []
        self.on_state({job.id})

    # ------------------------------------------------------------------ repaint
    def eval_jobs(self) -> list:
        return sorted((j for j in self.app.state.jobs.values() if j.kind == "evaluate"), key=lambda j: j.submitted)

    def on_state(self, changes: set[str]) -> None:
        jobs = self.eval_jobs()
        if self.selected is None and jobs:
            self.selected = jobs[-1].id
        shown = [(j.id, j.status, j.title) for j in jobs]
        if shown != self._jobs_shown:
            self._jobs_shown = shown
            options = self.query_one("#eval-jobs", OptionList)
            options.set_options(Option(f"{_ICONS.get(j.status, '?')} {j.title}", id=j.id) for j in jobs)
            if self.selected is not None:
                options.highlighted = options.get_option_index(self.selected)
        if self.selected in changes:
            self.show_job()
        ended = {j for j in changes if j in self.app.state.jobs and not self.app.state.jobs[j].active}
        if self._stale or ended - self._ended:  # a finished run or evaluation is a new target
            self._ended |= ended
            self._stale = False
            self.refresh_targets()

    def show_job(self) -> None:
        job = self.app.state.jobs.get(self.selected) if self.selected else None
        if job is None:
            return
        self.query_one("#eval-progress", Static).update(progress_text(job))
        self.query_one("#eval-bar", ProgressBar).update(progress=round(job.progress() * 100, 1))
        key = (job.id, len(job.metrics))
        if key == self._table_key:
            return
        self._table_key = key
        table = self.query_one("#eval-table", DataTable)
        table.clear()
        for m in job.metrics:
            table.add_row(*map(Text, metric_cells(m)))

    def _attach_finished(self, changes: set[str]) -> None:
        for job_id in [j for j in self.attach_to if j in changes]:
            job = self.app.state.jobs.get(job_id)
            if job is None or job.active:
                continue
            run_id = self.attach_to.pop(job_id)
            if job.status != "finished":
                continue  # nothing to attach; the job's error shows in its row
            metrics = (job.result or {}).get("metrics") or job.metrics
            self.attach(run_id, job, metrics)

    def attach(self, run_id: str, job, metrics: list[dict]) -> None:
        from .history import open_history

        note = f"evaluation attached to run {run_id}: {job.spec.get('model', {}).get('name')} (evaluation run {job.run_id})"
        try:
            with open_history(self.app) as history:
                history.attach_metrics(run_id, metrics, note)
        except (WorkbenchError, sqlite3.Error) as exc:
            self.app.show_error(f"the results could not be stored with run {run_id}: {getattr(exc, 'message', exc)}",
                                f"they are kept as run {job.run_id} in the history", "The results were not attached")
            return
        self.notify(f"{len(metrics)} result(s) stored with run {run_id}", timeout=5)


_ICONS = {"queued": "…", "running": "▶", "finished": "✓", "failed": "✗", "cancelled": "■"}


def progress_text(job) -> str:
    """One line on where the job is: its current stage and count, or how it ended."""
    if job.status == "queued":
        return "queued: it starts when the worker is free"
    if job.status == "running":
        stage = job.stages.get(job.current) if job.current else None
        if stage is None:
            return "starting"
        count = f" {stage.done}/{stage.total}" if stage.total else ""
        detail = f" ({stage.detail})" if stage.detail else ""
        return f"{stage.title or stage.name}{detail}{count}"
    if job.status == "finished":
        took = human_seconds(job.ended - job.started) if job.ended and job.started else "--:--"
        return f"finished: {len(job.metrics)} result(s) in {took}"
    error = job.error or {}
    text = f"{job.status}: {error.get('message') or 'no reason given'}"
    return f"{text}\n{error['hint']}" if error.get("hint") else text


def metric_cells(m: dict) -> tuple[str, str, str, str]:
    """metric, dataset, value (± its standard error), bits per byte."""
    value = report.cell_text(m, None, True)
    if m.get("name") == "perplexity" and m.get("stderr") is not None:
        value += f" ±{m['stderr']:.2f}"  # cell_text leaves perplexity's spread out of the comparison table
    bpb = (m.get("extra") or {}).get("bits_per_byte")
    return str(m.get("name")), str(m.get("dataset")), value, "" if bpb is None else f"{bpb:.4f}"

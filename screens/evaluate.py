"""The Evaluate screen: measure a model now, and set what every run of the setup measures and keeps.

Two tabs (``]`` and ``[`` move between them):

- Evaluate a model: left, what to evaluate: the target (the setup's model,
  or a run from the history that kept its model: its export, or the model of
  a run without steps), perplexity data sets, zero-shot tasks, in-context
  learning (each set also under the shifts typed, ``sst2@typo:0.15``), the
  test-time adaptations those sets and the zero-shot tasks are evaluated with,
  and efficiency. Every change is validated by the spec validator, so the
  messages are the command line's. Right, this session's evaluation jobs
  and the selected one's progress and results, each perplexity with its
  protocol (tokens per window × windows).
- Run settings: the setup's name, description and reference, its
  ``[evaluate]`` table (what a run measures before and after compressing)
  and its ``[export]`` table (whether the compressed model is kept, where,
  in which dtype, and whether an earlier export there may be replaced).
  Every edit goes to the setup at once.

An evaluation is an ``evaluate`` job (a spec without steps) that the worker
client records as a run of its own, named after what it evaluated
(``eval of quickstart (a1b2c3)``, its ``reference`` ``run:ID``). For a
history run, its metrics are also stored with that run as phase ``eval``
when the job finishes, as ``workbench eval RUN`` does, so History and
compare show them.
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
from textual.widgets import (Button, Checkbox, Input, Label, OptionList, ProgressBar, Select, SelectionList, Static,
                             TabbedContent, TabPane)
from textual.widgets.option_list import Option

from workbench.errors import UserError, WorkbenchError
from workbench.evaluation import report
from workbench.evaluation.icl_data import DATASETS, MODES, RETRIEVERS
from workbench.evaluation.shifts import KINDS as SHIFT_KINDS, parse_set_name
from workbench.evaluation.tta_settings import HOW as PCL_HOW, MODES as TTA_MODES, PARAMS as TTA_PARAMS
from workbench.evaluation.zeroshot import BUNDLED_TASKS
from workbench.files import is_export
from workbench.spec import DTYPES, EVAL_DATASETS_BUILTIN, EvalSpec, ExportSpec, spec_from_dict
from workbench.spec.schema import EXPORT_FORMATS

from .base import WorkbenchScreen
from .protocol import protocol_text
from .stepforms import problem_text
from .widgets import Check, ConfirmModal, Table, human_seconds
from .records import is_evaluation, open_history, steps_text

# input id suffix -> ([evaluate] key, label); an empty field leaves the key out, so the engine's default applies
INPUTS = {
    "limit": ("limit", "max windows"), "seqlen": ("seqlen", "seq length"), "batch": ("batch_size", "batch size"),
    "zs-limit": ("zeroshot_limit", "max samples"), "icl-k": ("icl_k", "demos K"),
    "icl-memory": ("icl_memory", "memory M"), "icl-seeds": ("icl_seeds", "orders"),
    "icl-limit": ("icl_limit", "max queries"), "icl-entropy": ("icl_max_entropy", "max entropy"),
    "tta-steps": ("tta_steps", "TTA steps"), "tta-lr": ("tta_lr", "TTA lr"), "tta-batch": ("tta_batch", "TTA batch"),
    "pcl-strength": ("pcl_strength", "PCL amount"),
}
# select id suffix -> ([evaluate] key, label, the values offered)
SELECTS = {"tta-params": ("tta_params", "TTA adapts", TTA_PARAMS), "pcl-how": ("pcl_how", "PCL noise", PCL_HOW)}
# kept from the setup's [evaluate], not shown: a file: ICL data set's labels and prompt, the finer adaptation settings
HIDDEN = ("icl_labels", "icl_template", "tta_lora_rank", "tta_lora_targets", "pcl_where", "pcl_ce")
MODEL_SETTINGS = ("dtype", "device", "trust_remote_code")  # what an evaluation of a run keeps of the run's [model]
NO_MODEL_HINT = "turn on export in the Run settings tab (]) and run it again"
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
    steps: str = "dense"  # what the model is: the run's steps

    @property
    def what(self) -> str:
        """What is evaluated, in words: ``quickstart (a1b2c3): wanda 50%``."""
        return f"{self.title}: {self.steps}"


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
    """The finished runs of the history as targets, newest first; evaluations, which measured one of these (or a
    setup's model), are left out (UserError when the history cannot be read)."""
    local = app.session.backend.where == "local"
    targets = []
    with open_history(app) as history:
        for record in history.runs(limit=RUNS_LISTED):
            if record.status != "finished" or is_evaluation(record):
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
            steps = steps_text(record)
            label = f"{record.name} ({record.id[-6:]}): {steps}"
            targets.append(Target(f"run:{record.id}", label, f"{record.name} ({record.id[-6:]})", model, settings,
                                  record.id, problem, steps))
    return targets


def eval_values(data: dict | None) -> dict:
    """An ``[evaluate]`` table with every key, the defaults filled in (a lone string made a list, as the validator does)."""
    e = {**asdict(EvalSpec()), **{k: v for k, v in (data or {}).items() if v is not None}}
    return {k: [v] if isinstance(v, str) and isinstance(getattr(EvalSpec(), k, None), list) else v for k, v in e.items()}


def split_sets(names: list[str]) -> tuple[list[str], list[str]]:
    """ICL set names as the form shows them: the data sets (``sst2``) and the shifts (``typo:0.15``), each once, in
    order; ``sst2@typo:0.15`` gives both. A name the validator refuses is split at its last ``@`` all the same (the
    validator's message says what is wrong with it); a ``file:`` path with an ``@`` in it stays whole."""
    sets, shifts = [], []
    for name in names:
        try:
            base = parse_set_name(name)[0]
        except UserError:
            base = name.rpartition("@")[0] or name
        sets.append(base)
        if base != name:
            shifts.append(name[len(base) + 1:])
    return list(dict.fromkeys(sets)), list(dict.fromkeys(shifts))


def shift_specs(text: str) -> list[str]:
    """The shifts typed in the shifts field: comma-separated, each once (a leading ``@`` is allowed)."""
    return list(dict.fromkeys(s.strip().lstrip("@").strip() for s in text.split(",") if s.strip().lstrip("@").strip()))


def shifts_problem(screen, prefix: str) -> UserError | None:
    """What the spec validator cannot say about the shifts field of ``eval_fields(prefix)``: shifts with no ICL set
    to apply them to, or one that is no shift at all (``sst2@foo`` would read as an unknown data set)."""
    shifts = shift_specs(screen.query_one(f"#{prefix}-icl-shifts", Input).value)
    hint = f"write KIND:RATE (a rate in [0, 1], several joined by +), e.g. typo:0.15; the kinds: {', '.join(SHIFT_KINDS)}"
    for shift in shifts:
        try:
            if not parse_set_name(f"set@{shift}")[1]:
                return UserError(f"evaluate.icl: {shift!r} is not a shift", hint)
        except UserError:
            pass  # a shift, written wrong: the validator says how, naming the set
    if shifts and not screen.query_one(f"#{prefix}-icl", SelectionList).selected:
        return UserError(f"evaluate.icl: the shifts ({', '.join(shifts)}) apply to in-context learning sets, and none "
                         "is picked", "pick an ICL data set, or clear the shifts")
    return None


def eval_fields(prefix: str, e: dict) -> ComposeResult:
    """The widgets of an ``[evaluate]`` table (ids ``PREFIX-ppl``, ``PREFIX-limit``...), filled from ``e`` (``eval_values``)."""
    # the setup's own data sets and tasks (file:..., lm_eval:...) are offered beside the bundled ones
    ppl = list(dict.fromkeys([*EVAL_DATASETS_BUILTIN, *e["perplexity"]]))
    tasks = list(dict.fromkeys([*BUNDLED_TASKS, *e["zeroshot"]]))
    sets, shifts = split_sets(e["icl"])
    icl = {d.name: f"{d.name} ({d.title})" for d in DATASETS.values()} | {n: n for n in sets if n not in DATASETS}
    yield Label("Perplexity", classes="eval-heading")
    yield SelectionList(*((ds, ds, ds in e["perplexity"]) for ds in ppl), id=f"{prefix}-ppl")
    yield from _inputs(prefix, e, "limit", "seqlen", "batch")
    yield Label("Zero-shot tasks", classes="eval-heading")
    yield SelectionList(*((t, t, t in e["zeroshot"]) for t in tasks), id=f"{prefix}-zeroshot")
    yield from _inputs(prefix, e, "zs-limit")
    yield Label("In-context learning", classes="eval-heading")
    yield SelectionList(*((label, name, name in sets) for name, label in icl.items()), id=f"{prefix}-icl")
    with Horizontal(classes="eval-field"):
        yield Label("shifts")  # each set is evaluated clean and once per shift (NAME@SHIFT)
        yield Input(", ".join(shifts), placeholder="typo:0.15, words:0.1", compact=True, id=f"{prefix}-icl-shifts",
                    tooltip="each set is also evaluated once per shift, comma-separated KIND:RATE[+KIND:RATE]; "
                            f"kinds: {', '.join(SHIFT_KINDS)}")
    yield Label("modes", classes="eval-sub")
    yield SelectionList(*((m, m, m in e["icl_modes"]) for m in MODES), id=f"{prefix}-icl-modes")
    with Horizontal(classes="eval-field"):
        yield Label("retriever")
        yield Select([(r, r) for r in RETRIEVERS], value=e["icl_retriever"], allow_blank=False, compact=True,
                     id=f"{prefix}-icl-retriever")
    yield from _inputs(prefix, e, "icl-k", "icl-memory", "icl-seeds", "icl-limit", "icl-entropy")
    yield Label("Test-time adaptation", classes="eval-heading")  # of the ICL sets and the zero-shot tasks
    modes = list(dict.fromkeys([*TTA_MODES, *e["tta"]]))
    yield SelectionList(*((m, m, m in e["tta"]) for m in modes), id=f"{prefix}-tta")
    yield from _inputs(prefix, e, "tta-steps", "tta-lr", "tta-batch")
    yield from _selects(prefix, e, "tta-params")
    yield Check("episodic (reset per batch)", bool(e["tta_episodic"]), compact=True, id=f"{prefix}-tta-episodic")
    yield from _selects(prefix, e, "pcl-how")
    yield from _inputs(prefix, e, "pcl-strength")
    yield Label("Efficiency", classes="eval-heading")
    yield Check("speed and memory", bool(e["efficiency"]), compact=True, id=f"{prefix}-efficiency")


def _choices(suffix: str, value) -> tuple[list[tuple[str, str]], str]:
    """A select's options and the value it shows: the values offered, and the setup's own when it is none of them
    (the validator names it); a value that is not even a string shows as the first one."""
    offered = list(SELECTS[suffix][2])
    if not isinstance(value, str):
        return [(v, v) for v in offered], offered[0]
    return [(v, v) for v in dict.fromkeys([*offered, value])], value


def _selects(prefix: str, values: dict, *suffixes: str) -> ComposeResult:
    for suffix in suffixes:
        key, label, _ = SELECTS[suffix]
        options, value = _choices(suffix, values[key])
        with Horizontal(classes="eval-field"):
            yield Label(label)
            yield Select(options, value=value, allow_blank=False, compact=True, id=f"{prefix}-{suffix}")


def _inputs(prefix: str, values: dict, *suffixes: str) -> ComposeResult:
    for suffix in suffixes:
        key, label = INPUTS[suffix]
        with Horizontal(classes="eval-field"):
            yield Label(label)
            value = values.get(key)
            default = getattr(EvalSpec(), key)
            yield Input("" if value is None else str(value), placeholder=f"default {default}" if default is not None else "default",
                        compact=True, id=f"{prefix}-{suffix}")


def read_eval_fields(screen, prefix: str) -> dict:
    """The ``[evaluate]`` keys the widgets of ``eval_fields(prefix)`` describe (empty inputs left out). Every ICL set
    picked is evaluated clean and once per shift typed: ``icl = [sst2, mr, sst2@typo:0.1, mr@typo:0.1]``."""
    q = screen.query_one
    sets = list(q(f"#{prefix}-icl", SelectionList).selected)
    shifts = shift_specs(q(f"#{prefix}-icl-shifts", Input).value)
    settings: dict = {
        "perplexity": list(q(f"#{prefix}-ppl", SelectionList).selected),
        "zeroshot": list(q(f"#{prefix}-zeroshot", SelectionList).selected),
        "icl": [*sets, *(f"{name}@{shift}" for shift in shifts for name in sets)],
        "icl_modes": list(q(f"#{prefix}-icl-modes", SelectionList).selected),
        "icl_retriever": q(f"#{prefix}-icl-retriever", Select).value,
        "tta": list(q(f"#{prefix}-tta", SelectionList).selected),
        "tta_episodic": q(f"#{prefix}-tta-episodic", Checkbox).value,
        "efficiency": q(f"#{prefix}-efficiency", Checkbox).value,
    }
    for suffix, (key, _, _) in SELECTS.items():
        settings[key] = q(f"#{prefix}-{suffix}", Select).value
    for suffix, (key, _) in INPUTS.items():
        value = _number(q(f"#{prefix}-{suffix}", Input).value)
        if value is not None:
            settings[key] = value
    return settings


def fill_eval_fields(screen, prefix: str, e: dict) -> None:
    """Show ``e`` (``eval_values``) in the widgets of ``eval_fields(prefix)``; unchanged ones are left alone."""
    q = screen.query_one
    sets, shifts = split_sets(e["icl"])
    lists = {"ppl": e["perplexity"], "zeroshot": e["zeroshot"], "icl": sets, "icl-modes": e["icl_modes"], "tta": e["tta"]}
    for kind, names in lists.items():
        widget = q(f"#{prefix}-{kind}", SelectionList)
        values = [widget.get_option_at_index(i).value for i in range(widget.option_count)]
        for name in names:
            if name not in values:  # a file: data set or lm_eval: task of this setup (or a bad name)
                widget.add_option((name, name, True))
        if sorted(widget.selected) != sorted(names):
            widget.deselect_all()
            for name in names:
                widget.select(name)
    shifts_input = q(f"#{prefix}-icl-shifts", Input)
    if shift_specs(shifts_input.value) != shifts:  # as typed, while it means the same
        shifts_input.value = ", ".join(shifts)
    if q(f"#{prefix}-icl-retriever", Select).value != e["icl_retriever"] and e["icl_retriever"] in RETRIEVERS:
        q(f"#{prefix}-icl-retriever", Select).value = e["icl_retriever"]
    for suffix, (key, _, _) in SELECTS.items():
        widget = q(f"#{prefix}-{suffix}", Select)
        options, value = _choices(suffix, e[key])
        if widget.value != value:
            widget.set_options(options)
            widget.value = value
    for key, kind in (("efficiency", "efficiency"), ("tta_episodic", "tta-episodic")):
        if q(f"#{prefix}-{kind}", Checkbox).value != bool(e[key]):
            q(f"#{prefix}-{kind}", Checkbox).value = bool(e[key])
    for suffix, (key, _) in INPUTS.items():
        widget = q(f"#{prefix}-{suffix}", Input)
        shown = "" if e.get(key) is None else str(e[key])
        if _number(widget.value) != _number(shown):
            widget.value = shown


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
        self._filling = False
        self._confirmed_out: Path | None = None

    # ------------------------------------------------------------------ layout
    def compose_body(self) -> ComposeResult:
        session = self.app.session
        e = eval_values(session.data.get("evaluate"))
        self.hidden = {k: e[k] for k in HIDDEN if e[k] != getattr(EvalSpec(), k)}  # the defaults left out
        with TabbedContent(id="eval-tabs"):
            with TabPane("Evaluate a model now", id="tab-eval-now"):
                with Horizontal(id="eval-main"):
                    with Vertical(id="eval-left"):
                        with VerticalScroll(id="eval-form", can_focus=False):
                            yield Label("Model", classes="eval-heading")
                            yield OptionList(id="eval-target", markup=False)
                            yield from eval_fields("eval", e)
                        yield Static("", id="eval-problem", markup=False)
                        yield Button("Evaluate (ctrl+e)", id="eval-start", variant="primary")
                    with Vertical(id="eval-right"):
                        yield Label("Evaluations", classes="eval-heading")
                        yield OptionList(id="eval-jobs", markup=False)
                        yield Static("nothing evaluated yet", id="eval-progress", markup=False)
                        yield ProgressBar(total=100, show_eta=False, id="eval-bar")
                        table = Table(id="eval-table", cursor_type="row", zebra_stripes=True)
                        table.add_columns("metric", "dataset", "value", "protocol", "bits/byte")
                        yield table
            with TabPane("Run settings: evaluation, export", id="tab-run-settings"):
                with VerticalScroll(id="run-settings", can_focus=False):
                    yield Static("What every run of the setup is called, measures and keeps. Edits go to the setup "
                                 "at once; ctrl+r runs it.", classes="eval-sub")
                    yield Label("Run", classes="eval-heading")
                    for key, label in (("name", "name"), ("description", "description"), ("reference", "reference")):
                        with Horizontal(classes="eval-field"):
                            yield Label(label)
                            yield Input(compact=True, id=f"run-{key}")
                    yield Label("Evaluated by the run (\\[evaluate])", classes="eval-heading")
                    yield Check("the dense model too, before compressing", bool(e["before"]), compact=True, id="run-before")
                    yield Check("measure the dense model again, not a stored figure (--fresh)", bool(e["fresh"]),
                                compact=True, id="run-fresh")
                    yield from eval_fields("run", e)
                    yield Label("Kept by the run (\\[export])", classes="eval-heading")
                    yield Check("export the compressed model (Evaluate can measure it later)", compact=True, id="run-save")
                    with Horizontal(classes="eval-field"):
                        yield Label("folder")
                        yield Input(placeholder="empty: a folder in the run's directory", compact=True, id="run-out")
                        yield Button("Browse", compact=True, id="run-browse")
                    with Horizontal(classes="eval-field"):
                        yield Label("dtype")
                        yield Select([(d, d) for d in DTYPES], value="auto", allow_blank=False, compact=True,
                                     id="run-dtype")
                    with Horizontal(classes="eval-field"):
                        yield Label("format")
                        yield Select([(f, f) for f in EXPORT_FORMATS], value="auto", allow_blank=False, compact=True,
                                     id="run-format")
                    yield Check("overwrite an earlier workbench export in that folder", compact=True, id="run-overwrite")
                    yield Static("", id="run-out-note", classes="eval-sub")
                    yield Static("", id="run-problem")

    def on_mount(self) -> None:
        # attach results to their run even while another screen is shown (on_state runs only while this one is)
        self.app.changed.subscribe(self, self._attach_finished)
        self.query_one("#eval-jobs").display = False
        self._fill_run_settings()

    # ------------------------------------------------------------------ targets
    def on_session(self) -> None:
        self._stale = True
        self._fill_run_settings()

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
        """The [evaluate] table the Evaluate-now form describes."""
        return {**copy.deepcopy(self.hidden), **read_eval_fields(self, "eval")}

    def build_spec(self) -> dict:
        """The evaluate job's spec; UserError (the validator's, or "nothing to evaluate") when it is not valid."""
        target = self.target()
        if target is None:
            raise UserError("no model picked", "pick the setup's model or a finished run in the list")
        if target.problem is not None:
            raise UserError(*target.problem[1:])
        if (problem := shifts_problem(self, "eval")) is not None:
            raise problem
        spec = spec_from_dict({"name": f"eval of {target.title}", "description": f"evaluation of {target.what}",
                               "reference": target.key if target.run_id else f"model:{target.model}",
                               "model": {**copy.deepcopy(target.settings), "name": target.model},
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

    def _widget_changed(self, widget) -> None:
        if (widget.id or "").startswith("run-"):
            self._edit_run_settings(widget)
        else:
            self.validate()

    def on_input_changed(self, event: Input.Changed) -> None:
        self._widget_changed(event.input)

    def on_selection_list_selected_changed(self, event: SelectionList.SelectedChanged) -> None:
        self._widget_changed(event.selection_list)

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self._widget_changed(event.checkbox)

    def on_select_changed(self, event: Select.Changed) -> None:
        self._widget_changed(event.select)

    # ------------------------------------------------------------------ run settings
    def _fill_run_settings(self) -> None:
        """Show the setup's name, [evaluate] and [export] in the Run settings tab."""
        session = self.app.session
        self._filling = True  # while the widgets are set from the setup: no folder questions
        try:
            name = self.query_one("#run-name", Input)
            if (session.data.get("name") if session.named else "") != name.value and not name.has_focus:
                name.value = str(session.data.get("name") or "") if session.named else ""
            for key in ("description", "reference"):
                widget = self.query_one(f"#run-{key}", Input)
                if widget.value != str(session.data.get(key) or ""):
                    widget.value = str(session.data.get(key) or "")
            e = eval_values(session.data.get("evaluate"))
            fill_eval_fields(self, "run", e)
            self._set(self.query_one("#run-before", Checkbox), bool(e["before"]))
            self._set(self.query_one("#run-fresh", Checkbox), bool(e["fresh"]))
            x = {**asdict(ExportSpec()), **{k: v for k, v in (session.data.get("export") or {}).items() if v is not None}}
            self._set(self.query_one("#run-save", Checkbox), x["save"] is True)
            self._set(self.query_one("#run-out", Input), str(x["out"] or ""))
            self._set(self.query_one("#run-dtype", Select), x["dtype"] if x["dtype"] in DTYPES else "auto")
            self._set(self.query_one("#run-format", Select), x["format"] if x["format"] in EXPORT_FORMATS else "auto")
            self._set(self.query_one("#run-overwrite", Checkbox), x["overwrite"] is True)
        finally:
            self._filling = False
        self._show_run_problem()

    @staticmethod
    def _set(widget, value) -> None:
        if widget.value != value:
            widget.value = value

    def _run_settings(self) -> tuple[dict, dict]:
        """The [evaluate] and [export] tables the Run settings tab describes."""
        session = self.app.session
        hidden = {k: v for k, v in (session.data.get("evaluate") or {}).items() if k in HIDDEN}
        evaluate = {**hidden, **read_eval_fields(self, "run"), "before": self.query_one("#run-before", Checkbox).value,
                    "fresh": self.query_one("#run-fresh", Checkbox).value}
        export = {"save": self.query_one("#run-save", Checkbox).value,
                  "out": self.query_one("#run-out", Input).value.strip() or None,
                  "dtype": self.query_one("#run-dtype", Select).value,
                  "format": self.query_one("#run-format", Select).value,
                  "overwrite": self.query_one("#run-overwrite", Checkbox).value}
        return evaluate, {k: v for k, v in export.items() if v is not None}

    def _edit_run_settings(self, widget) -> None:
        """Write what the Run settings tab shows into the setup (only what differs: a widget set from the setup
        reports its value too)."""
        session = self.app.session
        wid, before = widget.id, session.revision
        if wid == "run-name":
            if (session.data.get("name") if session.named else "") != widget.value.strip():
                session.set_name(widget.value)
        elif wid in ("run-description", "run-reference"):
            key = wid.removeprefix("run-")
            if str(session.data.get(key) or "") != widget.value:
                session.set(key, widget.value or None)
        elif wid == "run-overwrite" and widget.value and not session.get("export.overwrite", False):
            self._confirm_overwrite(widget)
        else:
            evaluate, export = self._run_settings()
            if eval_values(evaluate) != eval_values(session.data.get("evaluate")):
                session.set("evaluate", evaluate)
            old = {**asdict(ExportSpec()), **{k: v for k, v in (session.data.get("export") or {}).items() if v is not None}}
            if {**asdict(ExportSpec()), **export} != old:
                session.set("export", export)
        if session.revision != before:
            self.app.session_changed()
            self._seen_revision = session.revision  # our own edit: the widgets already show it
        self._show_run_problem()

    def _confirm_overwrite(self, check: Checkbox) -> None:
        out = self.query_one("#run-out", Input).value.strip() or "the run's own folder"

        def answer(yes: bool | None) -> None:
            if yes:
                self.app.session.set("export", self._run_settings()[1])
                self.app.session_changed()
                self._seen_revision = self.app.session.revision
                self._show_run_problem()
            else:
                check.value = False  # as the setup has it: nothing to write

        self.app.push_screen(ConfirmModal(f"Let the export replace what is in {out}? Only an earlier workbench export "
                                          "is replaced; any other folder with files is refused before the run starts.",
                                          "Replace it", "Keep it"), answer)

    def _check_out_folder(self, path_text: str) -> None:
        """Ask about an export folder that exists and holds files (a run would replace or refuse it)."""
        path = Path(path_text.strip()).expanduser()
        if not path_text.strip() or not path.is_dir() or not any(path.iterdir()) or path == self._confirmed_out:
            return
        if any(isinstance(s, ConfirmModal) for s in self.app.screen_stack):
            return  # asked already (enter, then the focus leaving the field)
        earlier = is_export(path)
        what = "an earlier workbench export" if earlier else "files that are not a workbench export"
        then = ("a run replaces it only with overwrite on" if earlier else "a run refuses to export there")

        def answer(yes: bool | None) -> None:
            if yes:
                self._confirmed_out = path  # asked once per folder
            else:
                self.query_one("#run-out", Input).value = ""

        self.app.push_screen(ConfirmModal(f"{path} exists and holds {what}: {then}. Export there?", "Use it",
                                          "Pick another"), answer)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "run-out":
            self._check_out_folder(event.value)

    def on_descendant_blur(self, event) -> None:
        if getattr(event.widget, "id", None) == "run-out" and not getattr(self, "_filling", False):
            self._check_out_folder(event.widget.value)

    def _show_run_problem(self) -> None:
        """The setup's first problem when it is about the Run settings tab; and what is at the export folder."""
        problem = shifts_problem(self, "run") or self.app.session.problem()
        line = self.query_one("#run-problem", Static)
        ours = problem is not None and problem.message.split(" ")[0].split(".")[0].split(":")[0] in (
            "evaluate", "export", "name", "description", "reference")
        line.update(problem_text(problem.message, problem.hint) if ours else "")
        line.display = ours
        session = self.app.session
        self.query_one("#run-name", Input).placeholder = f"automatic: {session.run_name()}" if not session.named else ""
        out = str(session.get("export.out") or "")
        note = self.query_one("#run-out-note", Static)
        path = Path(out).expanduser() if out else None
        if not session.get("export.save", False):
            note.update("not exported: Evaluate cannot measure the compressed model later")
        elif path is not None and path.is_dir() and any(path.iterdir()):
            earlier = is_export(path)
            note.update(f"{out} holds an earlier workbench export: " + (
                "overwrite is on, it is replaced" if session.get("export.overwrite", False) else
                "turn overwrite on to replace it") if earlier else f"{out} holds other files: the run refuses to export there")
        else:
            note.update(f"exported to {out or 'the run folder'} in {session.get('export.dtype', 'auto')}")


    # ------------------------------------------------------------------ launching
    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "eval-start":
            self.action_start()
        elif event.button.id == "run-browse":
            from .browse import FolderModal

            def chosen(path: str | None) -> None:
                if path:
                    self.query_one("#run-out", Input).value = path
                    self._check_out_folder(path)

            self.app.push_screen(FolderModal(self.query_one("#run-out", Input).value,
                                             title="Pick the folder the export goes to"), chosen)

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
        job = await self.app.submit("evaluate", spec, title=target.what)
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
            options.display = bool(jobs)  # an empty list is no place for the focus
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
        table = self.query_one("#eval-table", Table)
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
    """One line on where the job is: its current stage (naming what is evaluated) and count, or how it ended."""
    if job.status == "queued":
        return "queued: it starts when the worker is free"
    if job.status == "running":
        stage = job.stages.get(job.current) if job.current else None
        if stage is None:
            return "starting"
        count = f" {stage.done}/{stage.total}" if stage.total else ""
        detail = f" ({stage.detail})" if stage.detail else ""
        title = stage.title or stage.name
        if stage.name.startswith("evaluate:"):  # the worker's "Perplexity (dense)": a step-less spec to it
            title = f"{title.split(' (')[0]} of {job.title}"
        return f"{title}{detail}{count}"
    if job.status == "finished":
        took = human_seconds(job.ended - job.started) if job.ended and job.started else "--:--"
        return f"finished: {len(job.metrics)} result(s) in {took}"
    error = job.error or {}
    text = f"{job.status}: {error.get('message') or 'no reason given'}"
    return f"{text}\n{error['hint']}" if error.get("hint") else text


def metric_cells(m: dict) -> tuple[str, str, str, str, str]:
    """metric, dataset, value (± its standard error), protocol (perplexity), bits per byte."""
    value = report.cell_text(m, None, True)
    if m.get("name") == "perplexity" and m.get("stderr") is not None:
        value += f" ±{m['stderr']:.2f}"  # cell_text leaves perplexity's spread out of the comparison table
    bpb = (m.get("extra") or {}).get("bits_per_byte")
    return str(m.get("name")), str(m.get("dataset")), value, protocol_text(m), "" if bpb is None else f"{bpb:.4f}"

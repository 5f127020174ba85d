"""The calibration study view: a study preset's plan of runs, running it on the workers, and its results.

Opened over the Presets screen (enter on a study preset or on a study file)
or from the palette ("Open study: NAME"); escape goes back. The plan lists
the dense reference and every cell (source x method x sparsity x seed) of
``workbench.study`` with its state: done (a finished run with the same
settings is in the history, so it is reused exactly as ``workbench study``
reuses it), queued, running, failed, cancelled, or to do. ``r`` submits every
cell that is not done as an ordinary run job; ``c`` cancels the study's
running cell and drops its queued ones. The results (mean ± std over seeds,
perplexity against sparsity per source, the ranking of the sources) are read
from the history in a thread whenever another cell is done.
"""

from __future__ import annotations

import copy
import sqlite3
from dataclasses import dataclass

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Label, Select, Static, TabbedContent, TabPane
from textual.worker import get_current_worker

from workbench.errors import UserError, WorkbenchError
from workbench.history import History
from workbench.spec import RunSpec, load_preset_data
from workbench.study import (Cell, CellResult, StudySpec, aggregate, format_stat, load_study, ranking, reusable_runs,
                             spec_digest, study_jobs)

from .base import WorkbenchScreen
from .charts import CurveChart
from .state import JobState
from .widgets import ConfirmModal, human_seconds

STATUS_STYLES = {"done": "green", "running": "bold yellow", "queued": "yellow", "failed": "bold red", "died": "bold red",
                 "cancelled": "magenta", "to do": "", "?": "dim"}
NOT_DONE = ("to do", "failed", "cancelled")  # what ``r`` submits
RUN_WIDTH = 36  # the plan's last column: a run id, or the start of why it failed (the line below has it all)


@dataclass
class PlanRow:
    """One run of the study: the dense reference (``cell`` None) or a grid cell, and its state now."""

    cell: Cell | None
    spec: RunSpec
    digest: str
    status: str = "?"  # "?" until the history was read
    run_id: str | None = None
    note: str = ""  # why a failed cell failed

    def cells(self) -> tuple[str, str, str, str]:
        c = self.cell
        if c is None:
            return "dense", "-", "0%", "-"
        return c.source, c.method, f"{c.sparsity:.0%}", str(c.seed)


def study_presets() -> list[str]:
    """The shipped presets that are studies (they have a ``[study]`` table)."""
    from workbench.presets import preset_names

    names = []
    for name in preset_names():
        try:
            if "study" in load_preset_data(name):
                names.append(name)
        except UserError:
            continue
    return names


def open_study(app, name_or_path: str) -> bool:
    """Show the study view of a study preset (a name or a file); on a bad preset show why and return False."""
    try:
        study, base = load_study(name_or_path)
    except WorkbenchError as exc:
        app.show_exception(exc, f"The study {name_or_path} could not be opened")
        return False
    app.push_screen(StudyScreen(name_or_path, study, base))
    return True


def curve_series(table: dict, method: str, key: str) -> dict[str, list[tuple[float, float]]]:
    """Per calibration source, (sparsity in %, mean over seeds) of metric ``key`` for ``method``; sources without any left out."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in table["rows"]:
        if r["method"] == method and key in r["metrics"]:
            series.setdefault(r["source"], []).append((100 * r["sparsity"], r["metrics"][key]["mean"]))
    return series


def ranking_text(ranks: dict) -> Text:
    """The sources from best to worst per method and metric (``workbench.study.ranking``), as plain lines."""
    text = Text()
    for method, by_key in ranks.items():
        for key, order in by_key.items():
            what = f"{key} perplexity, lower is better" if " " not in key else f"{key}, higher is better"
            text.append(method, style="bold")
            text.append(f" · {what}\n")
            if not order:
                text.append("  no source has a result at every sparsity yet\n", style="dim")
            width = max((len(source) for source, _ in order), default=0)
            for place, (source, value) in enumerate(order, 1):
                text.append(f"  {place:>2}. {source:<{width}}  {value:.2f}\n")
            text.append("\n")
    if not text:
        text.append("no results yet", style="dim")
    return text


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {'sparsities' if what == 'sparsity' else what + 's'}"


def _history(path: str | None) -> History:
    return History(path) if path else History()


class StudyScreen(WorkbenchScreen):
    NAME = "study"
    TITLE = "Study"
    CSS_PATH = "study.tcss"
    BINDINGS = [
        Binding("r", "run_study", "Run the rest", id="study.run"),
        Binding("c", "cancel_study", "Cancel", id="study.cancel"),
        Binding("escape", "close", "Back", id="study.close"),
    ]

    def __init__(self, source: str, study: StudySpec, base: RunSpec):
        """``source``: the preset's name or path; ``study`` and ``base`` as ``load_study`` returns them."""
        super().__init__()
        self.source, self.study, self.base = source, study, base
        self.rows = [PlanRow(cell, spec, spec_digest(spec)) for cell, spec in study_jobs(study, base)]
        self._digests = {row.digest for row in self.rows}
        self.index: dict[str, str] | None = None  # digest -> finished run in the history; None until read
        self.table: dict | None = None  # ``aggregate``'s table, once read
        self.ranks: dict = {}
        self.chart_series: dict[str, list[tuple[float, float]]] = {}  # what the chart shows now
        self._job_digests: dict[str, str | None] = {}  # job id -> digest of its spec
        self._aggregated: frozenset | None = None  # the done runs the table was computed from
        self._shown: dict[int, tuple] = {}  # plan row -> (status, run text) on screen
        self._counts_text = ""

    # ------------------------------------------------------------------ layout
    def compose_body(self) -> ComposeResult:
        s = self.study
        datasets = list(self.base.evaluate.perplexity)
        grid = " × ".join(_count(len(values), what) for values, what in
                          ((s.sources, "source"), (s.methods, "method"), (s.sparsities, "sparsity"), (s.seeds, "seed")))
        yield Static(f"[b]{escape(s.name)}[/]: {grid} + dense = {len(self.rows)} runs", id="study-title")
        yield Static("reading the history...", id="study-counts")
        with TabbedContent(id="study-tabs"):
            with TabPane("Plan", id="study-tab-plan"):
                plan = DataTable(id="study-plan", cursor_type="row", zebra_stripes=True)
                for key, label in (("status", "status"), ("source", "source"), ("method", "method"),
                                   ("sparsity", "sparsity"), ("seed", "seed")):
                    plan.add_column(label, key=key)
                plan.add_column("run / why it failed", key="run", width=RUN_WIDTH)
                for i, row in enumerate(self.rows):
                    plan.add_row(Text("?", style="dim"), *map(Text, row.cells()), Text(""), key=str(i))
                yield plan
                yield Static("", id="study-detail")
            with TabPane("Table", id="study-tab-table"):
                yield DataTable(id="study-table", cursor_type="row", zebra_stripes=True)
            with TabPane("Chart", id="study-tab-chart"):
                with Horizontal(id="study-choices"):
                    yield Label("Method", classes="label")
                    yield Select([(m, m) for m in s.methods], value=s.methods[0], allow_blank=False, compact=True,
                                 id="study-method")
                    yield Label("Data set", classes="label")
                    if datasets:
                        yield Select([(d, d) for d in datasets], value=datasets[0], allow_blank=False, compact=True,
                                     id="study-dataset")
                    else:
                        yield Label("none: the study measures no perplexity", id="study-no-dataset")
                yield CurveChart(id="study-chart")
            with TabPane("Ranking", id="study-tab-ranking"):
                with VerticalScroll(id="study-ranking-scroll"):
                    yield Static("no results yet", id="study-ranking")

    def on_mount(self) -> None:  # the frame's on_mount runs too (Textual calls every class's handler)
        self.query_one("#study-plan", DataTable).focus()
        self._draw_chart()
        self.read_history(with_index=True, done={})

    # ------------------------------------------------------------------ state
    def on_state(self, changes: set[str]) -> None:
        self._update_plan()
        done = frozenset((row.digest, row.run_id) for row in self.rows if row.status == "done")
        if self.index is not None and done != self._aggregated:
            self._aggregated = done
            self.read_history(with_index=False, done=dict(done))

    def _latest_jobs(self) -> dict[str, JobState]:
        """Digest -> the newest run job of this app with that spec (submitted here, or earlier for the same cell).

        A finished one joins the index: its run is in the history (the worker client records it before the
        state hears of it), so a later failed attempt does not hide it.
        """
        latest: dict[str, JobState] = {}
        for job in self.app.state.jobs.values():
            if job.kind != "run":
                continue
            if job.id not in self._job_digests:
                self._job_digests[job.id] = spec_digest(copy.deepcopy(job.spec))
            digest = self._job_digests[job.id]
            if digest not in self._digests:
                continue
            if job.status == "finished" and job.run_id and self.index is not None:
                self.index.setdefault(digest, job.run_id)
            if digest not in latest or job.submitted >= latest[digest].submitted:
                latest[digest] = job
        return latest

    def _update_plan(self) -> None:
        latest = self._latest_jobs()
        index = self.index or {}
        for row in self.rows:
            job = latest.get(row.digest)
            row.note = ""
            if job is not None and (job.active or job.status == "finished"):
                row.status, row.run_id = ("done" if job.status == "finished" else job.status), job.run_id
            elif row.digest in index:
                row.status, row.run_id = "done", index[row.digest]
            elif job is not None:  # failed or cancelled, and no earlier run to fall back on
                row.status, row.run_id = job.status, job.run_id
                row.note = (job.error or {}).get("message") or ""
            else:
                row.status, row.run_id = ("?" if self.index is None else "to do"), None
        plan = self.query_one("#study-plan", DataTable)
        for i, row in enumerate(self.rows):
            shown = (row.status, row.note or row.run_id or "")
            if self._shown.get(i) != shown:
                self._shown[i] = shown
                plan.update_cell(str(i), "status", Text(row.status, style=STATUS_STYLES.get(row.status, "")))
                plan.update_cell(str(i), "run", Text(shown[1], style="red" if row.note else "dim"))
        self._show_detail()
        self._show_counts()

    def _show_detail(self) -> None:
        """The highlighted run in full: its cell, state, run id and, when it failed, why and what to do."""
        plan = self.query_one("#study-plan", DataTable)
        row = self.rows[plan.cursor_row] if 0 <= plan.cursor_row < len(self.rows) else None
        if row is None:
            return
        text = Text.assemble((row.cell.label() if row.cell else "the dense reference", "bold"), f": {row.status}")
        if row.run_id:
            text.append(f", run {row.run_id}")
        if row.note:
            job = self._latest_jobs().get(row.digest)
            hint = ((job.error or {}).get("hint") if job else None) or ""
            text.append(f"\n{row.note}", style="red")
            text.append(f" ({hint})" if hint else "")
        elif row.run_id and row.status in ("done", "failed", "cancelled"):
            text.append("  enter: open the run", style="dim")
        self.query_one("#study-detail", Static).update(text)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "study-plan":
            self._show_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a run of the plan that has one in the history opens it (the History screen's detail view)."""
        if event.data_table.id != "study-plan":
            return
        row = self.rows[event.cursor_row]
        if row.run_id and row.status in ("done", "failed", "cancelled"):
            from .rundetail import RunDetailScreen

            self.app.push_screen(RunDetailScreen(row.run_id))

    def counts(self) -> dict[str, int]:
        """How many runs of the plan are in each state."""
        found: dict[str, int] = {}
        for row in self.rows:
            found[row.status] = found.get(row.status, 0) + 1
        return found

    def _show_counts(self) -> None:
        counts = self.counts()
        if self.index is None:
            self._set_counts("reading the history...")
            return
        parts = [f"[{STATUS_STYLES[s]}]{counts[s]} {s}[/]" if STATUS_STYLES[s] else f"{counts[s]} {s}"
                 for s in ("done", "running", "queued", "failed", "cancelled", "to do") if counts.get(s)]
        rest = sum(counts.get(s, 0) for s in NOT_DONE)
        keys = f"[b]{self.app.key_for('study.run', 'r')}[/] runs the {rest} not done (asks first)" if rest else "nothing left to run"
        if counts.get("running") or counts.get("queued"):
            keys += f" · [b]{self.app.key_for('study.cancel', 'c')}[/] cancels"
        self._set_counts(" · ".join(parts) + f"   [dim]{keys}[/]")

    def _set_counts(self, text: str) -> None:
        if text != self._counts_text:  # progress events repaint often; the counts change only when a run ends
            self._counts_text = text
            self.query_one("#study-counts", Static).update(text)

    # ------------------------------------------------------------------ the history, in a thread
    @work(thread=True, exclusive=True, group="study-history", exit_on_error=False)
    def read_history(self, with_index: bool, done: dict[str, str]) -> None:
        """Read which cells the history already holds (``with_index``) and aggregate the done ones' metrics."""
        worker = get_current_worker()
        try:
            with _history(getattr(self.app, "history_path", None)) as history:
                index = None
                if with_index:
                    found = reusable_runs(history)
                    index = {d: found[d] for d in self._digests if d in found}
                    done = {**index, **done}
                results = [CellResult(row.cell, done.get(row.digest), reused=False) for row in self.rows]
                table = aggregate(self.study, results, history)
        except (WorkbenchError, sqlite3.Error) as exc:
            if not worker.is_cancelled:
                self.app.call_from_thread(self.app.show_error, getattr(exc, "message", None) or f"the run history could not be read: {exc}",
                                          getattr(exc, "hint", None) or "check that WORKBENCH_HOME is a writable folder",
                                          "The study's runs could not be read")
            return
        if not worker.is_cancelled:
            self.app.call_from_thread(self._history_read, index, frozenset(done.items()), table)

    def _history_read(self, index: dict[str, str] | None, done: frozenset, table: dict) -> None:
        if not self.is_mounted:
            return
        if index is not None:
            self.index = index
            self._aggregated = done
        self.table, self.ranks = table, ranking(table)
        self._show_table()
        self._draw_chart()
        self.query_one("#study-ranking", Static).update(ranking_text(self.ranks))
        self.on_state(set())  # the plan, now that the history is known; aggregates again if more is done since

    def _show_table(self) -> None:
        t, view = self.table, self.query_one("#study-table", DataTable)
        view.clear(columns=True)
        if t is None:
            return
        for key in ("method", "sparsity", "source", "n"):
            view.add_column(key, key=key)
        for key in t["metrics"]:
            view.add_column(f"{key} ppl" if " " not in key else key, key=key)
        for key in t["calibration"]:
            view.add_column(key, key=f"calibration {key}")
        if t["dense"]:
            view.add_row(*map(Text, ("dense", "0%", "-", "1")),
                         *(Text(f"{t['dense'][k]:.2f}" if k in t["dense"] else "-", justify="right") for k in t["metrics"]),
                         *(Text("") for _ in t["calibration"]), key="dense")
        for r in t["rows"]:
            n = max((s["n"] for s in r["metrics"].values()), default=0)
            view.add_row(*map(Text, (r["method"], f"{r['sparsity']:.0%}", r["source"], str(n))),
                         *(Text(format_stat(r["metrics"].get(k)), justify="right") for k in t["metrics"]),
                         *(Text(format_stat(r["calibration"].get(k)), justify="right") for k in t["calibration"]),
                         key=f"{r['method']}|{r['sparsity']}|{r['source']}")

    def _draw_chart(self) -> None:
        method = self.query_one("#study-method", Select).value
        datasets = self.query("#study-dataset")
        dataset = datasets.first(Select).value if datasets else None
        self.chart_series = curve_series(self.table, method, dataset) if self.table and dataset else {}
        self.query_one("#study-chart", CurveChart).update_series(
            self.chart_series, title=f"{method}: {dataset or 'no'} perplexity (mean over seeds)", xlabel="sparsity %",
            ylabel="perplexity", logy=True)

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._draw_chart()

    # ------------------------------------------------------------------ actions
    async def action_run_study(self) -> None:
        """Submit every run that is not done (to do, failed or cancelled) as a run job, in the plan's order."""
        if self.index is None:
            self.notify("still reading the history: which runs are done is not known yet", timeout=4)
            return
        self._update_plan()
        todo = [row for row in self.rows if row.status in NOT_DONE]
        if not todo:
            self.notify("nothing to run: every run of the study is done or on its way", timeout=4)
            return

        async def answer(yes: bool | None) -> None:
            if yes:
                await self._submit(todo)

        self.app.push_screen(ConfirmModal(f"Run the {len(todo)} run(s) of {self.study.name} that are not done? "
                                          f"{self._duration(len(todo))}", "Run them", "Not now"), answer)

    def _duration(self, runs: int) -> str:
        """Roughly how long ``runs`` more runs take, from the study's runs done so far (this app's, or the history's)."""
        seconds = [j.ended - j.started for j in self._latest_jobs().values()
                   if j.status == "finished" and j.started and j.ended]
        if not seconds:
            try:
                with _history(getattr(self.app, "history_path", None)) as history:
                    ids = {row.run_id for row in self.rows if row.status == "done" and row.run_id}
                    seconds = [r.finished - r.created for r in history.runs(limit=500) if r.id in ids and r.finished]
            except (WorkbenchError, sqlite3.Error):
                seconds = []
        if not seconds:
            return "How long one takes is not known yet: none of the study's runs has finished."
        each = sum(seconds) / len(seconds)
        return (f"At about {human_seconds(each)} each (the study's runs so far), roughly {human_seconds(each * runs)} "
                "in all on one worker.")

    async def _submit(self, todo: list) -> None:
        submitted = 0
        for row in todo:
            job = await self.app.submit("run", row.spec.to_dict(), title=row.spec.name)
            if job is None:  # the app showed why; the rest would fail the same way
                break
            submitted += 1
        if submitted:
            self.notify(f"submitted {submitted} run(s); the workers run them one at a time each", timeout=4)
        self.on_state(set())

    def action_cancel_study(self) -> None:
        """Cancel the study's running cell and drop its queued ones (after confirmation)."""
        active = [job for job in self._latest_jobs().values() if job.active]
        if not active:
            self.notify("no run of this study is running or queued", timeout=3)
            return
        queued = [job for job in active if job.status == "queued"]
        running = [job for job in active if job.status != "queued"]

        async def answer(yes: bool | None) -> None:
            if not yes:
                return
            for job in queued + running:  # the queued first, so that none starts in the meantime
                await self.app.bridge.cancel(job.id)

        self.app.push_screen(ConfirmModal(f"Cancel {len(running)} running and drop {len(queued)} queued run(s) of "
                                          f"{self.study.name}? Finished runs stay in the history and are reused.",
                                          "Cancel them", "Keep running"), answer)

    def action_close(self) -> None:
        self.app.pop_screen()

"""The History screen: every recorded run, newest first; open one, mark several and compare them, re-run, export.

It reads the run history (``workbench.history.History`` at the app's
``history_path``, else the default) directly: a page of runs and their
metrics is a few fast SQLite queries. The table is read again when a job of
this app starts or ends (the worker client records a run when it is submitted
and its events as they arrive), and when the screen shows again after a few
seconds, for runs made elsewhere; the same runs as shown leave the table as it is.
"""

from __future__ import annotations

import copy
import sqlite3
import time
from pathlib import Path

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from workbench.errors import UserError, WorkbenchError
from workbench.evaluation import report
from workbench.files import write_text_atomic
from workbench.history import RunRecord

from .base import WorkbenchScreen
from .compare import CompareScreen
from .widgets import ConfirmModal, PromptModal, Table, human_seconds
from .records import open_history, steps_text

PAGE = 200  # the newest runs listed
RELOAD_AFTER = 5.0  # seconds: showing the screen again sooner keeps the table it has
MARK = "✓"
# what matters first, so that 80 columns show it: the perplexities (with their protocol) before the run id and model
COLUMNS = (("mark", " "), ("name", "name"), ("status", "status"), ("steps", "steps"),
           ("perplexity", "perplexity (tok×win)"), ("sparsity", "sparsity"), ("started", "started"), ("id", "id"),
           ("model", "model"))
STATUS_STYLE = {"finished": "green", "running": "yellow", "failed": "red", "died": "bold red", "cancelled": "magenta"}


def started_text(record: RunRecord) -> str:
    """``10:15`` today, ``01-15 10:15`` this year, ``2024-12-31 10:15`` before (short, so 120 columns show the id)."""
    now, then = time.localtime(time.time()), time.localtime(record.created)
    if now[:3] == then[:3]:
        return time.strftime("%H:%M", then)
    return time.strftime("%m-%d %H:%M" if now.tm_year == then.tm_year else "%Y-%m-%d %H:%M", then)


def perplexity_cell(metrics: list[dict]) -> str:
    """Each data set's perplexity, dense -> compressed (or a later evaluation), with its protocol:
    ``wikitext2 30.00→60.00 (512×40)``; two protocols are both named."""
    ppl: dict[tuple, dict] = {}
    for m in metrics:
        if m["name"] == "perplexity" and m.get("value") is not None:
            ppl[(m["dataset"], m["phase"])] = m
    parts = []
    for ds in sorted({ds for ds, _ in ppl}):
        before, after = ppl.get((ds, "before")), ppl.get((ds, "eval"), ppl.get((ds, "after")))
        shown = [m for m in (before, after) if m is not None]
        shape = [f"{m.get('seqlen') or '?'}×{m.get('windows') or '?'}" for m in shown]
        if len(set(shape)) == 1:
            values = "→".join(format(m["value"], ".2f") for m in shown)
            parts.append(f"{ds} {values} ({shape[0]})")
        else:
            parts.append(f"{ds} " + "→".join(f"{m['value']:.2f} ({p})" for m, p in zip(shown, shape)))
    return "; ".join(parts)


class HistoryScreen(WorkbenchScreen):
    NAME = "history"
    TITLE = "History"
    CSS_PATH = "history.tcss"
    BINDINGS = [
        Binding("enter", "open", "Open", priority=True, id="history.open"),
        Binding("space", "mark", "Mark", id="history.mark"),
        Binding("c", "compare", "Compare", id="history.compare"),
        Binding("r", "rerun", "Re-run", id="history.rerun"),
        Binding("e", "export", "Export", id="history.export"),
    ]

    def __init__(self):
        super().__init__()
        self.records: list[RunRecord] = []
        self.marked: set[str] = set()
        self._stale = True  # read the history at the next repaint
        self._ended: set[str] = set()  # jobs seen ended, so each end reloads once
        self._problem: str | None = None
        self._loaded_at = -RELOAD_AFTER  # time.monotonic() of the last read
        self._rows: list[tuple] | None = None  # the cells shown (but the marks), one tuple per run
        self._read_runs: set[str] = set()  # the run ids of this app's jobs when the history was last read

    def compose_body(self) -> ComposeResult:
        with Vertical(id="history-body"):
            yield Static("", id="history-status")
            table = Table(id="history-table", cursor_type="row", zebra_stripes=True)
            for key, label in COLUMNS:
                table.add_column(label, key=key)
            yield table

    # ------------------------------------------------------------------ repaint
    def on_screen_resume(self) -> None:
        # Runs this app starts are read when they start and when they end (on_state); a re-read on showing catches
        # runs made elsewhere (a headless run), at most every few seconds, once the screen shows the table it has.
        if not self._stale and not self._new_runs() and time.monotonic() - self._loaded_at > RELOAD_AFTER:
            self.call_after_refresh(self.reload)

    def on_state(self, changes: set[str]) -> None:
        jobs = self.app.state.jobs
        ended = {j for j in changes if j in jobs and not jobs[j].active and jobs[j].kind != "inspect"}
        if self._stale or ended - self._ended or self._new_runs():
            self._ended |= ended
            self._stale = False
            self.reload()

    def _new_runs(self) -> bool:
        """Whether this app submitted a run since the table was read (the worker client records it at once)."""
        return any(j.run_id and j.run_id not in self._read_runs for j in self.app.state.jobs.values())

    def reload(self) -> None:
        """Read the newest runs and their metrics on a thread (the database may wait for another process's lock, or
        merge a journal, without holding up the screen), then show them; the cursor stays on its run."""
        self._read_runs = {j.run_id for j in self.app.state.jobs.values() if j.run_id}
        self.run_worker(self._read, thread=True, exclusive=True, group="history-read", exit_on_error=False)

    def _read(self) -> None:
        try:
            with open_history(self.app) as history:
                records = history.runs(limit=PAGE)
                metrics = {r.id: history.metrics(r.id) for r in records}
        except (WorkbenchError, sqlite3.Error) as exc:
            self.app.call_from_thread(self._show_problem, getattr(exc, "message", None) or f"the run history could not be read: {exc}",
                                      getattr(exc, "hint", None) or "check that WORKBENCH_HOME is a writable folder")
            return
        self.app.call_from_thread(self._show_runs, records, metrics)

    def _show_runs(self, records: list, metrics: dict) -> None:
        self._problem = None
        self._loaded_at = time.monotonic()
        rows = []
        for r in records:
            sparsity = report.step_sparsity(r)
            rows.append((r.name, r.status, steps_text(r), perplexity_cell(metrics[r.id]),
                         "" if sparsity is None else f"{sparsity:.0%}", started_text(r), r.id,
                         r.model or (r.spec.get("model") or {}).get("name", "")))
        self.records = records
        if rows != self._rows:  # the same runs as shown keep the table, its rendered lines and its marks
            self._rows = rows
            self._fill(rows)
        self._show_status()

    def _fill(self, rows: list[tuple]) -> None:
        table = self.query_one("#history-table", DataTable)
        keep, ids = self.cursor_run(), {row[6] for row in rows}
        self.marked &= ids
        table.clear()
        widths = [column.content_width for column in table.ordered_columns]
        for row in rows:
            cells = [Text(MARK if row[6] in self.marked else "")]
            cells += [Text(c, style=STATUS_STYLE.get(c, "") if i == 1 else "") for i, c in enumerate(row)]
            table.add_row(*cells, key=row[6])
            widths = [max(w, cell.cell_len) for w, cell in zip(widths, cells)]
        # Size the columns now: the table would do it when it next goes idle, and a repaint before that would draw
        # (and keep) every cell cut to its column's title.
        for column, width in zip(table.ordered_columns, widths):
            column.content_width = width
        if keep in ids:
            table.move_cursor(row=table.get_row_index(keep), animate=False)

    def _show_problem(self, message: str, hint: str) -> None:
        self.query_one("#history-status", Static).update(f"[red]{escape(message)}[/]  ({escape(hint)})")
        if message != self._problem:  # once, not at every repaint
            self._problem = message
            self.app.show_error(message, hint, "The run history could not be read")

    def _show_status(self) -> None:
        mark, compare = self.app.key_for("history.mark", "space"), self.app.key_for("history.compare", "c")
        if not self.records:
            text = f"no runs yet: {self.app.key_for('run.start', 'ctrl+r')} runs the current setup"
        else:
            text = f"{len(self.records)} run(s)"
            text += f", {len(self.marked)} marked ({compare} compares them)" if self.marked else f"; {mark} marks runs to compare"
        self.query_one("#history-status", Static).update(text)

    # ------------------------------------------------------------------ selection
    def cursor_run(self) -> str | None:
        """The id of the run under the cursor (None when the table is empty)."""
        table = self.query_one("#history-table", DataTable)
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def cursor_record(self) -> RunRecord | None:
        run_id = self.cursor_run()
        record = next((r for r in self.records if r.id == run_id), None)
        if record is None:
            self.notify("no run selected: the history is empty", severity="warning", timeout=4)
        return record

    def action_mark(self) -> None:
        run_id = self.cursor_run()
        if run_id is None:
            return
        self.marked ^= {run_id}
        table = self.query_one("#history-table", DataTable)
        table.update_cell(run_id, "mark", Text(MARK if run_id in self.marked else ""))
        table.action_cursor_down()
        self._show_status()

    def compare_ids(self) -> list[str]:
        """The runs to compare, oldest first: the marked ones, or the one marked and the cursor's."""
        ids = set(self.marked)
        cursor = self.cursor_run()
        if len(ids) == 1 and cursor is not None:
            ids.add(cursor)
        return [r.id for r in sorted(self.records, key=lambda r: r.created) if r.id in ids]

    # ------------------------------------------------------------------ actions
    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()  # a click on a row (enter is the screen's own binding)

    def action_open(self) -> None:
        from .rundetail import RunDetailScreen

        record = self.cursor_record()
        if record is not None:
            self.app.push_screen(RunDetailScreen(record.id))

    def action_compare(self) -> None:
        """The marked runs side by side (the command palette's "Compare runs" calls this)."""
        ids = self.compare_ids()
        if len(ids) < 2:
            self.notify(f"mark two or more runs with {self.app.key_for('history.mark', 'space')} to compare them",
                        severity="warning", timeout=5)
            return
        try:
            with open_history(self.app) as history:
                runs = [(history.get(i), history.metrics(i)) for i in ids]
            screen = CompareScreen(runs)
        except (WorkbenchError, sqlite3.Error) as exc:
            self.app.show_error(getattr(exc, "message", str(exc)), getattr(exc, "hint", None), "The runs could not be compared")
            return
        self.app.push_screen(screen)

    async def action_rerun(self) -> None:
        """Load the run's settings into the setup and run them again, after saying what that replaces and costs."""
        record = self.cursor_record()
        if record is None:
            return
        took = f"it took {human_seconds(record.finished - record.created)} last time" if record.finished else \
            "how long it takes is not known (it never finished)"
        edited = " Your setup's unsaved edits are lost." if self.app.session.edited else ""
        busy = " It waits behind the job running now." if self.app.bridge.busy() else ""
        question = (f"Replace the setup with the settings of {record.name} ({record.id}: {steps_text(record)}) and run "
                    f"it again? One run; {took}.{busy}{edited}")

        async def answer(yes: bool | None) -> None:
            if yes:
                self.app.session.load_spec(record.spec, record.name)
                self.app.session_changed()
                await self.app.action_run()

        self.app.push_screen(ConfirmModal(question, "Run it", "Not now"), answer)

    def action_export(self) -> None:
        """Save the run's settings as a preset file (TOML) that ``workbench run`` and the Presets screen read."""
        from workbench.spec import spec_from_dict, spec_to_toml

        record = self.cursor_record()
        if record is None:
            return
        try:
            text = spec_to_toml(spec_from_dict(copy.deepcopy(record.spec)))
        except UserError as exc:
            self.app.show_error(exc.message, exc.hint, "This run's settings cannot be saved as a preset")
            return

        def write(answer: str | None) -> None:
            if not answer:
                return
            path = Path(answer).expanduser()
            if not path.name.endswith(".toml"):
                path = path.with_name(path.name + ".toml")
            try:
                written = write_text_atomic(path, text)
            except UserError as exc:
                self.app.show_error(exc.message, exc.hint, "The preset was not saved")
            except OSError as exc:
                self.app.show_error(f"cannot write {path}: {exc.strerror or exc}", "pick a folder you can write to",
                                    "The preset was not saved")
            else:
                self.notify(f"saved {written}; run it headless with: workbench run {written}", timeout=8)

        default = record.name.replace("/", "-").replace("\\", "-") or "run"
        self.app.push_screen(PromptModal(f"Save the settings of {record.name} ({record.id}) as a preset file:",
                                         f"{default}.toml"), write)

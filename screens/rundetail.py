"""One run from the history in detail: its metrics (every phase), error, artifacts, per-layer chart and settings.

Pushed over the History screen; escape goes back. The run is read in a
thread, since a run that never finished keeps its per-layer results only in
its events, and a long run has many.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from dataclasses import dataclass, field

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static, TabbedContent, TabPane

from workbench.errors import UserError, WorkbenchError
from workbench.evaluation import report
from workbench.history import History, RunRecord

from .charts import LayerChart
from .protocol import protocol_text
from .widgets import KeyBar, Table, human_seconds


@dataclass
class RunDetail:
    record: RunRecord
    metrics: list[dict]
    artifacts: list[dict]
    layers: list[dict] = field(default_factory=list)  # the last step's per-layer results
    step: str = ""  # that step's label


def load_detail(history_path: str | None, run_id: str) -> RunDetail:
    """Everything the detail view shows (UserError when the run is not in the history)."""
    with (History(history_path) if history_path else History()) as history:
        record = history.get(run_id)
        detail = RunDetail(record, history.metrics(record.id), history.artifacts(record.id))
        steps = [s for s in (record.summary or {}).get("steps") or [] if s.get("layers")]
        if steps:
            detail.layers, detail.step = steps[-1]["layers"], steps[-1].get("label") or steps[-1].get("type", "")
        else:  # unfinished: the layers its events reported, of the last stage that had any
            done = [e for e in history.events(record.id) if e.get("type") == "layer_done"]
            if done:
                stage = done[-1]["stage"]
                by_layer = {e["layer"]: e for e in done if e["stage"] == stage}
                detail.layers, detail.step = [by_layer[i] for i in sorted(by_layer)], stage
    return detail


def layer_values(layers: list[dict]) -> tuple[list[float | None], float | None]:
    """(per-layer sparsity by layer index, with None where a layer is missing; the last target)."""
    count = max((l.get("layer", i) for i, l in enumerate(layers)), default=-1) + 1
    count = max([count] + [l.get("total") or 0 for l in layers])
    values: list[float | None] = [None] * count
    for i, l in enumerate(layers):
        values[l.get("layer", i)] = l.get("sparsity")
    return values, (layers[-1].get("target") if layers else None)


def spec_text(spec: dict) -> str:
    """The run's settings as a preset file would hold them (JSON when an older spec no longer validates)."""
    from workbench.spec import spec_from_dict, spec_to_toml

    try:
        return spec_to_toml(spec_from_dict(copy.deepcopy(spec)))
    except UserError:
        return json.dumps(spec, indent=2, sort_keys=True)


class RunDetailScreen(Screen):
    CSS_PATH = "history.tcss"
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="detail.close")]

    def __init__(self, run_id: str):
        super().__init__(id="run-detail")
        self.run_id = run_id
        self.detail: RunDetail | None = None
        self.layer_values: list[float | None] = []

    def compose(self) -> ComposeResult:
        yield Static(f"[b]{self.run_id}[/] [dim]reading the history...[/]", id="detail-title")
        with TabbedContent(id="detail-tabs"):
            with TabPane("Summary", id="detail-tab-summary"):
                with VerticalScroll(id="detail-summary"):
                    yield Static("", id="detail-error", markup=False)
                    yield Table(id="detail-metrics", cursor_type="row", zebra_stripes=True)
                    yield Static("", id="detail-artifacts", markup=False)
            with TabPane("Layers", id="detail-tab-layers"):
                yield LayerChart(id="detail-chart")
                yield Table(id="detail-layers", cursor_type="row", zebra_stripes=True)
            with TabPane("Settings", id="detail-tab-spec"):
                with VerticalScroll(id="detail-spec-scroll"):
                    yield Static("", id="detail-spec", markup=False)
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one("#detail-error").display = False
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self) -> None:
        try:
            detail = load_detail(getattr(self.app, "history_path", None), self.run_id)
        except (WorkbenchError, sqlite3.Error) as exc:
            self.app.call_from_thread(self.app.show_error, getattr(exc, "message", None) or f"cannot read the run: {exc}",
                                      getattr(exc, "hint", None) or "check that WORKBENCH_HOME is readable",
                                      "The run could not be opened")
            return
        self.app.call_from_thread(self.show, detail)

    def show(self, detail: RunDetail) -> None:
        if not self.is_mounted:  # closed before the history was read
            return
        self.detail = detail
        r = detail.record
        seconds = r.finished - r.created if r.finished else None
        model = r.model or (r.spec.get("model") or {}).get("name", "")
        back = self.app.key_for("detail.close", "escape")
        self.query_one("#detail-title", Static).update(
            f"[b]{escape(r.name)}[/] {r.id}  {r.status}  model {escape(str(model))}  {human_seconds(seconds)}  [dim]{back} back[/]")
        if r.error:
            error = self.query_one("#detail-error", Static)
            error.update(f"{r.error.get('kind') or 'failed'}: {r.error.get('message')}"
                         + (f"\nWhat to do: {r.error['hint']}" if r.error.get("hint") else ""))
            error.display = True
        metrics = self.query_one("#detail-metrics", Table)
        metrics.add_columns("phase", "metric", "value", "protocol", "bits/byte")
        for m in detail.metrics:
            bpb = (m.get("extra") or {}).get("bits_per_byte")
            metrics.add_row(*map(Text, (m["phase"], report.row_label((m["name"], m["dataset"]), m),
                                        report.cell_text(m, None, True), protocol_text(m),
                                        "" if bpb is None else f"{bpb:.4f}")))
        if not detail.metrics:
            metrics.add_row("", "no metrics recorded", "", "", "")
        found = [f"{a['kind']}: {a['path']}" for a in detail.artifacts]
        if r.out_dir:
            found.append(f"run folder: {r.out_dir}")
        self.query_one("#detail-artifacts", Static).update("Artifacts\n" + ("\n".join(found) or "none kept"))
        self.layer_values, target = layer_values(detail.layers)
        chart = self.query_one("#detail-chart", LayerChart)
        chart.display = bool(detail.layers)
        chart.update_layers(self.layer_values, total=len(self.layer_values) or None, target=target,
                            title=f"sparsity per layer: {detail.step}")
        layers = self.query_one("#detail-layers", Table)
        layers.add_columns("layer", "sparsity", "target", "seconds")
        if not detail.layers:
            layers.add_row("", "no per-layer results (a run without compression steps, or one that ended before them)", "", "")
        for i, l in enumerate(detail.layers):
            layers.add_row(str(l.get("layer", i)), _fraction(l.get("sparsity")), _fraction(l.get("target")),
                           "" if l.get("seconds") is None else f"{l['seconds']:.2f}")
        self.query_one("#detail-spec", Static).update(spec_text(r.spec))


def _fraction(value) -> str:
    return "" if value is None else f"{value:.4f}"

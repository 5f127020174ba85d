"""Runs side by side, each perplexity with its protocol, and deltas only between numbers measured the same way.

The columns are ``workbench compare``'s (``workbench.evaluation.report``):
the dense baseline first, then each run. Perplexity rows differ: there is
one row per data set *and protocol* (tokens per window, windows), so a run
measured on 16 windows never sits in a row with a baseline measured on 40.
A row's dense value is the baseline run's with that protocol, else the
``before`` measurement of a compared run with that protocol (a compression
run measures the dense model first, the same way), marked with ``*``; a
row without any dense value shows its numbers without a delta, and says so.
The chart has one series per method (``wanda``, ``sparsegpt``,
``lowrank``...) and data set, with markers and a legend, so runs of
different methods are never joined by one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Static, TabbedContent, TabPane

from workbench.evaluation import report

from .charts import CurveChart
from .protocol import protocol
from .widgets import KeyBar, Table
from .records import is_evaluation


@dataclass
class Comparison:
    columns: list  # report.Column, baseline first
    header: list[str]
    body: list[list[str]]
    notes: list[str] = field(default_factory=list)  # what the reader must know: protocols, borrowed baselines
    series: dict = field(default_factory=dict)  # chart name -> series name -> [(sparsity, value)]


def method_family(record) -> str:
    """What kind of compression a run did, without its amount: ``wanda``, ``owl-sparsegpt``, ``lowrank``, ``dense``."""
    names = []
    for step in record.spec.get("steps") or []:
        if not isinstance(step, dict):
            continue
        kind = step.get("type", "prune")
        if kind == "prune":
            allocation = step.get("allocation", "uniform")
            names.append(("" if allocation == "uniform" else f"{allocation}-") + str(step.get("method", "wanda")))
        else:
            names.append(str(kind))
    return " + ".join(names) or "dense"


def _shape(key: tuple) -> str:
    _, seqlen, windows = key
    return f"{seqlen if seqlen is not None else '?'} tok × {windows if windows is not None else '?'} win"


def compare(runs: list[tuple]) -> Comparison:
    """``runs``: (RunRecord, metrics) pairs in column order after the baseline (UserError when empty).

    An evaluation made in the Evaluate screen of a run that is compared too is left out: its results are that
    run's (phase ``eval``), not a dense model's.
    """
    ids = {r.id for r, _ in runs}
    dropped = [r for r, _ in runs if is_evaluation(r) and str(r.spec.get("reference"))[len("run:"):] in ids]
    runs = [(r, m) for r, m in runs if r not in dropped]
    cols = report.columns(runs)
    metrics = {r.id: m for r, m in runs}
    base = cols[0] if cols and cols[0].baseline else None

    def phases(c) -> tuple[str, ...]:
        if not c.record.spec.get("steps"):
            return ("before", "after", "eval")
        return ("before",) if c.baseline else ("after", "eval")

    # per column: its perplexities by protocol (a later phase, then a later metric, wins)
    ppl: list[dict[tuple, dict]] = []
    for c in cols:
        found: dict[tuple, dict] = {}
        for phase in phases(c):
            for m in metrics[c.run_id]:
                if m["phase"] == phase and protocol(m) is not None and m.get("value") is not None:
                    found[protocol(m)] = m
        ppl.append(found)
    # the dense value of each protocol: the baseline's, else a compared run's own measurement before compressing
    dense: dict[tuple, tuple[dict, object]] = {}
    if base is not None:
        dense.update({p: (m, base) for p, m in ppl[0].items()})
    column_of = {c.run_id: c for c in cols if not c.baseline}
    for r, ms in runs:
        for m in ms:
            if m["phase"] == "before" and protocol(m) is not None and m.get("value") is not None:
                dense.setdefault(protocol(m), (m, column_of.get(r.id, base)))
    header = ["metric"] + [c.label for c in cols]
    body, notes, borrowed = [], [], set()
    keys = sorted({p for found in ppl for p in found}, key=lambda p: (str(p[0]), p[1] or 0, p[2] or 0))
    for key in keys:
        base_metric, source = dense.get(key, (None, None))
        row = [f"perplexity {key[0]} ({_shape(key)})"]
        for i, c in enumerate(cols):
            if c.baseline:
                if base_metric is None:
                    row.append("-")
                    continue
                text = report.cell_text(base_metric, None, True)
                if source is not c:
                    text += " *"
                    borrowed.add(source.label)
                row.append(text)
            else:
                m = ppl[i].get(key)
                row.append(report.cell_text(m, base_metric, False) if m is not None else "-")
        if base_metric is None:
            row[0] += " (no dense value: no delta)"
        body.append(row)
    _, others = report.table_cells(cols)
    body += [r for r in others if not r[0].startswith("perplexity ")]
    datasets: dict[str, list] = {}
    for key in keys:
        datasets.setdefault(str(key[0]), []).append(key)
    for ds, found in datasets.items():
        if len(found) > 1:
            notes.append(f"{ds} was measured {len(found)} ways ({', '.join(_shape(k) for k in found)}): a row each")
    if borrowed:
        notes.append(f"* the dense model as {', '.join(sorted(borrowed))} measured it before compressing "
                     "(the baseline run measured it another way)")
    if dropped:
        notes.append(f"{', '.join(r.name for r in dropped)}: in the column of the run it evaluated")
    return Comparison(cols, header, body, notes, chart_series(cols, ppl, dense))


def chart_series(cols: list, ppl: list[dict[tuple, dict]], dense: dict) -> dict:
    """Perplexity against sparsity: one series per method and data set (its protocol too when the data set has
    several), each starting at its dense value; accuracy as ``report.chart_series`` draws it."""
    protocols: dict[str, set] = {}
    for found in ppl:
        for key in found:
            protocols.setdefault(str(key[0]), set()).add(key)
    perplexity: dict[str, list[tuple[float, float]]] = {}
    for c, found in zip(cols, ppl):
        if c.baseline or c.sparsity is None:
            continue
        for key, m in found.items():
            label = f"{method_family(c.record)} · {key[0]}" + (f" {_shape(key)}" if len(protocols[str(key[0])]) > 1 else "")
            points = perplexity.setdefault(label, [])
            if not points and key in dense:
                points.append((0.0, float(dense[key][0]["value"])))
            points.append((float(c.sparsity), float(m["value"])))
    series = {"perplexity": {k: sorted(v) for k, v in perplexity.items()}}
    accuracy = report.chart_series(cols).get("accuracy")
    if accuracy:
        series["accuracy"] = accuracy
    return series


class CompareScreen(Screen):
    """Runs side by side: metrics as rows, deltas against the dense model measured the same way, and charts."""

    CSS_PATH = "history.tcss"
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="compare.close")]

    def __init__(self, runs: list[tuple]):
        """``runs``: (RunRecord, metrics) pairs, in column order after the baseline; UserError when empty."""
        super().__init__(id="compare")
        self.comparison = compare(runs)
        self.columns, self.header, self.body = self.comparison.columns, self.comparison.header, self.comparison.body
        self.series = self.comparison.series

    def compose(self) -> ComposeResult:
        names = escape(", ".join(c.label for c in self.columns))
        yield Static(f"[b]Compare[/] {names}", id="compare-title")
        notes = ["a delta only against the dense model measured the same way (tok per window × windows)"]
        yield Static("\n".join(f"• {n}" for n in notes + self.comparison.notes), id="compare-notes", markup=False)
        table = Table(id="compare-table", cursor_type="row", zebra_stripes=True)
        for i, label in enumerate(self.header):
            table.add_column(label, key=str(i))
        table.add_rows([list(map(Text, row)) for row in self.body])
        yield table
        with TabbedContent(id="compare-charts"):
            for name in ("perplexity", "accuracy"):
                if name in self.series or name == "perplexity":
                    with TabPane(f"{name} against sparsity", id=f"compare-tab-{name}"):
                        yield CurveChart(id=f"compare-{name}")
        yield KeyBar()

    def on_mount(self) -> None:
        for name in ("perplexity", "accuracy"):
            charts = self.query(f"#compare-{name}")
            if charts:
                charts.first(CurveChart).update_series(self.series.get(name, {}), title=f"{name} against sparsity",
                                                       xlabel="sparsity", ylabel=name, markers=True)

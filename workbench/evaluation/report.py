"""Compare runs: one table (metrics as rows, runs as columns, the dense baseline first, deltas against it),
charts as text, and a Markdown report.

Used by ``workbench compare``, ``workbench report`` and the TUI's History
screen. Reads run records and metrics from the run history; no torch.

Columns: the dense baseline is the first run given without compression
steps, else the dense (``before``) metrics of the first run that has them.
Every compressed run is one column with its ``after`` metrics, updated by any
evaluation attached to it later (phase ``eval``, the latest first). A run
without steps that is not the baseline is a column of its own.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from workbench.errors import UserError

EFFICIENCY_LABELS = {
    "parameters": "parameters",
    "nonzero_parameters": "non-zero parameters",
    "disk_bytes": "size on disk (MB)",
    "export_bytes": "export on disk (MB)",
    "bits_per_weight": "bits per linear weight",
    "prefill_tokens_per_s": "prefill tokens/s",
    "decode_ms_per_token": "decode ms/token",
    "peak_memory_bytes": "peak memory (MiB)",
}
_SCALE = {"disk_bytes": 1e-6, "export_bytes": 1e-6, "peak_memory_bytes": 1 / 2**20}


@dataclass
class Column:
    run_id: str
    label: str
    metrics: dict = field(default_factory=dict)  # (name, dataset) -> metric dict
    sparsity: float | None = None  # 1 - non-zero / the dense model's parameters, or the steps' achieved sparsity
    baseline: bool = False
    record: object = None


@dataclass
class Row:
    key: tuple  # (name, dataset)
    label: str
    cells: list  # per column: metric dict or None


def _merge(metrics: list[dict], phases: tuple[str, ...]) -> dict:
    """The metrics of the given phases by (name, dataset); a later phase (and a later metric) wins."""
    out: dict = {}
    for phase in phases:
        for m in metrics:
            if m["phase"] == phase:
                out[(m["name"], m["dataset"])] = m
    return out


def step_sparsity(record) -> float | None:
    """The achieved sparsity of a run's last step that reports one (None for a dense run or an unfinished one)."""
    steps = (record.summary or {}).get("steps") or []
    values = [s["sparsity"] for s in steps if isinstance(s.get("sparsity"), (int, float))]
    return float(values[-1]) if values else None


def columns(runs: list[tuple]) -> list[Column]:
    """``runs``: (RunRecord, metrics) pairs in the order given; returns the columns, baseline first."""
    if not runs:
        raise UserError("no runs to compare", "give run ids: workbench compare RUN RUN ...")
    dense_runs = [(r, m) for r, m in runs if not r.spec.get("steps")]
    cols: list[Column] = []
    if dense_runs:
        r, m = dense_runs[0]
        cols.append(Column(r.id, f"dense ({r.id[-6:]})", _merge(m, ("before", "after", "eval")), 0.0, True, r))
    else:
        r, m = next(((r, m) for r, m in runs if any(x["phase"] == "before" for x in m)), (None, None))
        if r is not None:
            cols.append(Column(r.id, f"dense ({r.id[-6:]})", _merge(m, ("before",)), 0.0, True, r))
    for r, m in runs:
        if cols and cols[0].baseline and r is cols[0].record and not r.spec.get("steps"):
            continue
        phases = ("before", "after", "eval") if not r.spec.get("steps") else ("after", "eval")
        cols.append(Column(r.id, f"{r.name} ({r.id[-6:]})", _merge(m, phases), step_sparsity(r), False, r))
    dense_params = _value(cols[0].metrics.get(("parameters", "model"))) if cols else None
    for c in cols:
        nonzero = _value(c.metrics.get(("nonzero_parameters", "model")))
        if nonzero is not None and dense_params:
            c.sparsity = 1 - nonzero / dense_params
    return cols


def _value(metric: dict | None) -> float | None:
    return None if metric is None or metric.get("value") is None else float(metric["value"])


def _kind(metric: dict | None) -> str:
    """perplexity, zeroshot, icl, efficiency, or other (a metric some other step or evaluation records)."""
    metric = metric or {}
    return (metric.get("extra") or {}).get("kind") or ("perplexity" if metric.get("name") == "perplexity" else "other")


def _adapted(metric: dict | None) -> bool:
    """An accuracy (ICL or zero-shot) measured with test-time adaptation (its row has a time-ratio row beside it)."""
    return (((metric or {}).get("extra") or {}).get("tta") or "none") != "none"


def row_label(key: tuple, metric: dict | None = None) -> str:
    name, dataset = key
    if _kind(metric) == "perplexity":
        return f"perplexity {dataset}"
    if name == "icl_acc":
        return f"ICL {dataset} acc"
    if name == "tta_time_ratio":
        return f"ICL {dataset} time x plain" if _kind(metric) == "icl" else f"{dataset} time x plain"
    if name in EFFICIENCY_LABELS:
        return EFFICIENCY_LABELS[name] if dataset == "model" else f"{EFFICIENCY_LABELS[name]} ({dataset})"
    return f"{dataset} {name}"


def rows(cols: list[Column]) -> list[Row]:
    out = []
    for key in {k for c in cols for k in c.metrics}:
        cells = [c.metrics.get(key) for c in cols]
        out.append(Row(key, row_label(key, next(m for m in cells if m is not None)), cells))
        if key[0] in ("icl_acc", "acc") and any(_adapted(m) for m in cells):  # what the adaptation costs per query
            ratios = [None if m is None or m["extra"].get("time_ratio") is None else
                      {"name": "tta_time_ratio", "dataset": key[1], "value": m["extra"]["time_ratio"], "extra": {"kind": _kind(m)}}
                      for m in cells]
            shown = [r for r in ratios if r is not None]
            if shown:
                out.append(Row(("tta_time_ratio", key[1]), row_label(("tta_time_ratio", key[1]), shown[0]), ratios))
    out.sort(key=_sort_key)
    accs = [_mean_accuracy(c) for c in cols]
    if any(a is not None for a in accs):
        out.append(Row(("mean_acc", "zeroshot"), "zero-shot mean acc",
                       [None if a is None else {"name": "mean_acc", "dataset": "zeroshot", "value": a, "extra": {}} for a in accs]))
    out.append(Row(("sparsity", ""), "sparsity", [None if c.sparsity is None else {"name": "sparsity", "dataset": "", "value": c.sparsity,
                                                                                "extra": {}} for c in cols]))
    return out


KIND_ORDER = ("perplexity", "zeroshot", "icl", "efficiency", "other")


def _sort_key(row: Row) -> tuple:
    """Perplexity, then zero-shot tasks, ICL, efficiency; by data set within each."""
    kind = _kind(next(m for m in row.cells if m is not None))
    group = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    if kind == "efficiency":
        return (group, list(EFFICIENCY_LABELS).index(row.key[0]), row.key[1])
    return (group, row.key[1], row.key[0])


def _mean_accuracy(col: Column) -> float | None:
    accs = [m["value"] for (name, _), m in col.metrics.items() if name == "acc" and _kind(m) == "zeroshot" and not _adapted(m)]
    return statistics.fmean(accs) if accs else None


def _number(name: str, value: float) -> str:
    value *= _SCALE.get(name, 1)
    if name in ("parameters", "nonzero_parameters"):
        return f"{value:,.0f}"
    if name == "tta_time_ratio":
        return f"{value:.2f}x"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if name in ("acc", "acc_norm", "icl_acc", "mean_acc", "sparsity") or abs(value) < 10:
        return f"{value:.4f}"
    return f"{value:.2f}"


def cell_text(metric: dict | None, baseline: dict | None, is_baseline: bool) -> str:
    """``value ±spread (delta)``: the spread is lm-eval's standard error, or the std over ICL orders."""
    if metric is None or metric.get("value") is None:
        return "-"
    name = metric["name"]
    text = _number(name, metric["value"])
    spread = metric.get("stderr")
    if spread is None:
        spread = (metric.get("extra") or {}).get("std")
    if spread is not None and name not in ("perplexity",) + tuple(EFFICIENCY_LABELS):
        text += f" ±{_number(name, spread)}"
    if not is_baseline and baseline is not None and baseline.get("value") is not None:
        delta = metric["value"] - baseline["value"]
        text += f" ({'+' if delta >= 0 else '-'}{_number(name, abs(delta))})"
    return text


def table_cells(cols: list[Column]) -> tuple[list[str], list[list[str]]]:
    """Header and body as text: one row per metric, deltas against the first column."""
    header = ["metric"] + [c.label for c in cols]
    body = []
    for row in rows(cols):
        base = row.cells[0] if cols and cols[0].baseline else None
        body.append([row.label] + [cell_text(m, base, i == 0 and cols[0].baseline) for i, m in enumerate(row.cells)])
    return header, body


def perplexity_text(metrics: list[dict]) -> str:
    """Each data set's perplexity in one line, ``wikitext2 30.00 -> 60.00`` (dense -> compressed, or a later eval)."""
    ppl = {(m["dataset"], m["phase"]): m["value"] for m in metrics if m["name"] == "perplexity" and m.get("value") is not None}
    parts = []
    for ds in sorted({ds for ds, _ in ppl}):
        before, after = ppl.get((ds, "before")), ppl.get((ds, "after"), ppl.get((ds, "eval")))
        values = [f"{v:.2f}" for v in (before, after) if v is not None]
        parts.append(f"{ds} {' -> '.join(values)}")
    return "; ".join(parts)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- charts


def chart_series(cols: list[Column]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Points (sparsity, value) per chart and series: perplexity per data set, accuracy per zero-shot task and ICL set."""
    charts: dict[str, dict[str, list]] = {"perplexity": {}, "accuracy": {}}
    for c in cols:
        if c.sparsity is None:
            continue
        for (name, dataset), m in c.metrics.items():
            if name == "perplexity" and _kind(m) == "perplexity" and m.get("value") is not None:
                charts["perplexity"].setdefault(dataset, []).append((c.sparsity, m["value"]))
            elif name in ("acc", "icl_acc") and m.get("value") is not None:
                charts["accuracy"].setdefault(dataset, []).append((c.sparsity, m["value"]))
        mean = _mean_accuracy(c)
        if mean is not None:
            charts["accuracy"].setdefault("zero-shot mean", []).append((c.sparsity, mean))
    return {k: v for k, v in charts.items() if v}


def charts_text(cols: list[Column], width: int = 72, height: int = 18) -> str:
    """The charts drawn with plotext, as plain text (no colour codes), one after the other."""
    import plotext as plt

    out = []
    for title, series in chart_series(cols).items():
        plt.clear_figure()
        plt.plotsize(width, height)
        plt.theme("clear")
        for label, points in series.items():
            points = sorted(points)
            plt.plot([x for x, _ in points], [y for _, y in points], label=label, marker="dot")
        plt.title(f"{title} against sparsity")
        plt.xlabel("sparsity")
        out.append(plt.uncolorize(plt.build()))
    plt.clear_figure()
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- the Markdown report


def _layer_table(step: dict) -> str | None:
    layers = step.get("layers") or []
    if not layers:
        return None
    keys = [k for k, v in layers[0].items() if isinstance(v, (int, float, str)) and k != "layer"]
    header = ["layer"] + keys
    body = [[str(l.get("layer", i))] + [_fmt(l.get(k)) for k in keys] for i, l in enumerate(layers)]
    return markdown_table(header, body)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _versions(col: Column) -> dict:
    versions = dict((col.record.summary or {}).get("versions") or {}) if col.record is not None else {}
    lm = {(m.get("extra") or {}).get("lm_eval") for m in col.metrics.values()} - {None}
    if lm:
        versions["lm_eval"] = ", ".join(sorted(lm))
    return versions


def markdown_report(runs: list[tuple], title: str | None = None) -> str:
    """A self-contained Markdown report of the runs: comparison table, charts, per-layer allocation, settings, versions."""
    cols = columns(runs)
    header, body = table_cells(cols)
    parts = [f"# {title or 'Compression report'}", "",
             "Runs: " + ", ".join(f"`{r.id}` ({r.name}, {r.status}, model {r.model or r.spec.get('model', {}).get('name')})" for r, _ in runs),
             "", "## Comparison", "",
             "Metrics as rows, runs as columns; the first column is the dense baseline and the others show the "
             "difference from it in parentheses. ± is lm-eval's standard error, or the standard deviation over "
             "query orders for in-context learning.", "", markdown_table(header, body)]
    charts = charts_text(cols)
    if charts:
        parts += ["", "## Charts", "", "```text", charts, "```"]
    parts += ["", "## Per-layer allocation", ""]
    any_layers = False
    for r, _ in runs:
        for step in (r.summary or {}).get("steps") or []:
            table = _layer_table(step)
            if table:
                any_layers = True
                parts += [f"### `{r.id}`: {step.get('label', step.get('type'))}", "", table, ""]
    if not any_layers:
        parts += ["No run has per-layer results.", ""]
    parts += ["## Settings and versions", ""]
    for col in cols:
        r = col.record
        if r is None:
            continue
        parts += [f"### {col.label}", "", "```json", json.dumps(r.spec, indent=2, sort_keys=True), "```", ""]
        versions = _versions(col)
        if versions:
            parts += [", ".join(f"{k} {v}" for k, v in sorted(versions.items())), ""]
    return "\n".join(parts).rstrip() + "\n"



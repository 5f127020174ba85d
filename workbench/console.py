"""Headless progress display: rich progress bars fed by the event stream, and the final table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from .events import Event


class ProgressDisplay:
    """Consumes events; one bar per stage, advanced per layer or per batch of windows."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}", table_column=Column(ratio=3, no_wrap=True, overflow="ellipsis")),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}", table_column=Column(ratio=2, no_wrap=True, overflow="ellipsis")),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not enabled,
            expand=True,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, event: Event) -> None:
        kind = event.type
        p = self.progress
        if kind == "stage_started":
            self.tasks[event.stage] = p.add_task(event.title or event.stage, total=event.total, detail="")
        elif kind == "progress" and event.stage in self.tasks:
            p.update(self.tasks[event.stage], completed=event.done, total=event.total, detail=event.detail)
        elif kind == "layer_done" and event.stage in self.tasks:
            p.update(self.tasks[event.stage], completed=event.layer + 1, total=event.total,
                     detail=f"layer {event.layer}: {event.sparsity:.1%} in {event.seconds:.2f}s")
        elif kind == "stage_finished" and event.stage in self.tasks:
            tid = self.tasks[event.stage]
            total = next(t.total for t in p.tasks if t.id == tid) or 1
            p.update(tid, completed=total, total=total)
        elif kind == "metric":
            p.console.print(f"  {metric_text(event.to_dict())}")
        elif kind == "warning":
            p.console.print(f"[yellow]warning:[/] {event.message}", soft_wrap=True)  # a path in it stays whole
        elif kind == "log" and event.level in ("warning", "error"):
            p.console.print(f"[yellow]{event.level}:[/] {event.message}", soft_wrap=True)


def metric_text(m: dict) -> str:
    """One metric on one line: what, on which data, how it was measured, the value (with its error)."""
    how = [m.get("phase") or ""]
    if m.get("seqlen"):
        how.append(f"seqlen {m['seqlen']}, {m.get('windows')} windows")
    elif m.get("windows"):
        how.append(f"{m['windows']} samples")
    if m.get("limit"):
        how.append(f"limit {m['limit']}")
    if (m.get("extra") or {}).get("reused_from"):
        how.append(f"reused from run {m['extra']['reused_from']}")
    value = f"{m['value']:.4g}" if isinstance(m.get("value"), (int, float)) else str(m.get("value"))
    if m.get("stderr") is not None:
        value += f" ± {m['stderr']:.2g}"
    return f"{m.get('name')} {m.get('dataset')} ({', '.join(h for h in how if h)}): {value}"


def summary_table(summary: dict) -> Table:
    """Perplexity before/after per dataset, other metrics, what each step achieved, times."""
    table = Table(title=f"run {summary.get('run_id', '')}: {summary.get('name', '')}")
    table.add_column("what")
    table.add_column("value", justify="right")
    by_ds: dict[str, dict] = {}
    for m in summary.get("metrics", []):
        if m.get("name", "perplexity") == "perplexity":
            by_ds.setdefault(m["dataset"], {})[m["phase"]] = m
    for ds, phases in by_ds.items():
        any_m = next(iter(phases.values()))
        note = f"seqlen {any_m['seqlen']}, {any_m['windows']} windows" + (f", limit {any_m['limit']}" if any_m.get("limit") else "")
        for phase, label in (("before", "dense"), ("after", "compressed")):
            m = phases.get(phase)
            if m is None:
                continue
            bpb = (m.get("extra") or {}).get("bits_per_byte")
            table.add_row(f"perplexity {ds} {label} ({note})", f"{m['value']:.3f}" + (f"  ({bpb:.4f} bits/byte)" if bpb is not None else ""))
    others = [m for m in summary.get("metrics", []) if m.get("name", "perplexity") != "perplexity"]
    for m in others:  # accuracies, efficiency: dense first, then compressed
        phase = {"before": "dense", "after": "compressed"}.get(m.get("phase"), m.get("phase"))
        value = f"{m['value']:.4g}" + (f" ± {m['stderr']:.2g}" if m.get("stderr") is not None else "")
        table.add_row(f"{m['name']} {m['dataset']} {phase}", value)
    for step in summary.get("steps", []):
        if "sparsity" in step:
            table.add_row(f"{step['label']}: achieved sparsity", f"{step['sparsity']:.4f}")
        for key, value in (step.get("headline") or {}).items():  # other step types: {"what": "value"}
            table.add_row(f"{step['label']}: {key}", str(value))
        table.add_row(f"{step['label']}: time", f"{step.get('seconds', 0):.2f} s")
    for stage, seconds in summary.get("timings", {}).items():
        if stage.split(":")[0] not in {s.get("type", "prune") for s in summary.get("steps", [])}:
            table.add_row(f"time {stage}", f"{seconds:.2f} s")
    if summary.get("export"):
        table.add_row("exported to", str(summary["export"]))
    return table


def step_tables(step: dict) -> list[Table]:
    """The per-layer tables printed after a run for one step's report."""
    if step.get("type", "prune") == "prune":
        return [layer_table(step)]
    return []


def layer_table(step: dict) -> Table:
    """One row per decoder layer: target and achieved sparsity, the range over its linears, time."""
    table = Table(title=f"{step['label']}: per layer (achieved {step['sparsity']:.4f})")
    for col in ("layer", "target", "achieved", "linears min..max", "time s"):
        table.add_column(col, justify="right")
    for layer in step.get("layers", []):
        per_module = [m["sparsity"] for m in layer["modules"].values()]
        table.add_row(str(layer["layer"]), f"{layer['target']:.4f}", f"{layer['sparsity']:.4f}",
                      f"{min(per_module):.4f}..{max(per_module):.4f}", f"{layer['seconds']:.2f}")
    if "lm_head" in step:
        head = step["lm_head"]
        table.add_row("lm_head", f"{head['target']:.4f}", f"{head['sparsity']:.4f}", "", "")
    return table

"""The calibration study (``workbench study``).

Ji et al. ("Beware of Calibration Data for Pruning Large Language Models",
ICLR 2025) find that at high sparsity the calibration data matters more than
the pruning method. A study repeats their experiment on any model: a grid of
calibration sources x methods x sparsities x seeds, each cell a normal run in
the run history, summarized as the mean and standard deviation over seeds of
every evaluation metric, a chart of perplexity against sparsity (one line per
source) and the ranking of the sources for each method.

A study preset is a run preset (the base of every cell) with a ``[study]``
table::

    [study]
    sources = ["c4", "wikitext2", "books", "selfgen", "random"]
    methods = ["wanda", "sparsegpt"]   # magnitude, wanda, sparsegpt; "owl-" in front for OWL allocation
    sparsities = [0.5, 0.6, 0.7]
    seeds = [0, 1, 2]

A cell whose spec equals a finished run's spec (names and descriptions aside)
reuses that run, so a study can be resumed or extended without recomputing.
One dense run (the base without compression steps) gives the reference row.

No torch at import time: the engine is imported when a cell runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable

from .errors import Cancelled, RunError, UserError, WorkbenchError
from .pruning.family import PRUNE_METHODS, PruneStep
from .spec import RunSpec, apply_override, check_calibration_source, load_preset_data, spec_from_dict, validate

STUDY_METHODS = tuple(PRUNE_METHODS) + tuple(f"owl-{m}" for m in PRUNE_METHODS)
_STUDY_KEYS = ("sources", "methods", "sparsities", "seeds")
# Settings that name or describe a run without changing what it computes.
_NOT_IN_DIGEST = ("name", "description", "reference")


@dataclass
class StudySpec:
    """The ``[study]`` table: the grid every cell of the study is drawn from."""

    name: str = "study"
    sources: list[str] = field(default_factory=lambda: ["c4"])
    methods: list[str] = field(default_factory=lambda: ["wanda"])
    sparsities: list[float] = field(default_factory=lambda: [0.5])
    seeds: list[int] = field(default_factory=lambda: [0])

    def cells(self) -> list["Cell"]:
        return [Cell(source, method, sparsity, seed) for method in self.methods for sparsity in self.sparsities
                for source in self.sources for seed in self.seeds]


@dataclass(frozen=True)
class Cell:
    source: str
    method: str
    sparsity: float
    seed: int

    def label(self) -> str:
        return f"{self.source} | {self.method} {self.sparsity:.0%} | seed {self.seed}"


# ---------------------------------------------------------------- the study preset


def _grid_list(data: dict, key: str, kinds: tuple, what: str) -> list:
    value = data.get(key)
    if not isinstance(value, list) or not value:
        raise UserError(f"study.{key} must be a non-empty list of {what}", f"for example {key} = {json.dumps(getattr(StudySpec(), key))}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, kinds):
            raise UserError(f"study.{key}: {item!r} is not one of {what}", f"for example {key} = {json.dumps(getattr(StudySpec(), key))}")
    if len(set(value)) != len(value):
        raise UserError(f"study.{key} lists a value twice: {value}", "list each value once")
    return list(value)


def parse_study(data, name: str = "study") -> StudySpec:
    """Check a ``[study]`` table: known keys, non-empty lists, known sources and methods."""
    if not isinstance(data, dict):
        raise UserError("[study] must be a table", "write [study] followed by sources = [...], methods = [...], sparsities = [...], seeds = [...]")
    unknown = [k for k in data if k not in _STUDY_KEYS]
    if unknown:
        raise UserError(f"unknown key 'study.{unknown[0]}'", f"allowed keys in [study]: {', '.join(_STUDY_KEYS)}")
    study = StudySpec(
        name=name,
        sources=_grid_list(data, "sources", (str,), "calibration sources"),
        methods=_grid_list(data, "methods", (str,), "method names"),
        sparsities=[float(s) for s in _grid_list(data, "sparsities", (int, float), "numbers")],
        seeds=_grid_list(data, "seeds", (int,), "whole numbers"),
    )
    for source in study.sources:
        try:
            check_calibration_source(source, "study.sources")
        except UserError as exc:
            raise UserError(f"study.sources: {source!r} is not a calibration source ({exc.message})", exc.hint) from None
    for method in study.methods:
        if method not in STUDY_METHODS:
            raise UserError(f"study.methods: {method!r} is not a method", f"allowed: {', '.join(STUDY_METHODS)}")
    return study


def load_study(name_or_path: str, overrides: list[str] | None = None) -> tuple[StudySpec, RunSpec]:
    """A study preset: its ``[study]`` grid and the base run spec (the preset without ``[study]``).

    ``overrides`` (``key=value``) apply to both, e.g. ``study.seeds=[0,1]`` or
    ``evaluate.limit=8``. Every cell's spec is validated here, before any runs.
    """
    data = load_preset_data(name_or_path)
    for item in overrides or []:
        apply_override(data, item)
    if "study" not in data:
        raise UserError(f"the preset '{name_or_path}' has no [study] table", "run a single preset with: workbench run PRESET")
    study = parse_study(data.pop("study"), name=str(data.get("name", "study")))
    base = spec_from_dict(data)
    for cell in study.cells():
        cell_spec(base, study, cell)  # raises on the first impossible combination
    return study, base


def _template(base: RunSpec) -> PruneStep:
    if not base.steps:
        return PruneStep()
    if len(base.steps) != 1 or not isinstance(base.steps[0], PruneStep):
        raise UserError("a study's base spec must have one prune step (or none)",
                        "keep a single [[steps]] with type = \"prune\"; the grid sets its method and sparsity")
    return base.steps[0]


def cell_spec(base: RunSpec, study: StudySpec, cell: Cell) -> RunSpec:
    """The base spec with the cell's calibration source and seed, method and sparsity."""
    owl = cell.method.startswith("owl-")
    step = replace(_template(base), method=cell.method[len("owl-"):] if owl else cell.method, sparsity=cell.sparsity,
                   allocation="owl" if owl else "uniform", pattern="unstructured")
    spec = replace(base, name=f"{study.name} | {cell.label()}", steps=[step],
                   calibration=replace(base.calibration, source=cell.source, seed=cell.seed))
    try:
        return validate(spec)
    except UserError as exc:
        raise UserError(f"study cell {cell.label()}: {exc.message}", exc.hint) from None


def dense_spec(base: RunSpec, study: StudySpec) -> RunSpec:
    """The reference run: the base evaluated without compression (no calibration needed)."""
    return replace(base, name=f"{study.name} | dense", steps=[], evaluate=replace(base.evaluate, before=True))


def study_jobs(study: StudySpec, base: RunSpec) -> list[tuple[Cell | None, RunSpec]]:
    """Every run of the study in order: the dense reference (cell None) first, then the grid."""
    return [(None, dense_spec(base, study))] + [(cell, cell_spec(base, study, cell)) for cell in study.cells()]


def spec_digest(spec: RunSpec | dict) -> str | None:
    """The identity of what a run computes: sha256 of its canonical JSON without name, description and reference.

    A stored spec (a dict) is rebuilt first, so one written before a setting
    existed gets that setting's default and still matches; one that no longer
    validates gives None.
    """
    if isinstance(spec, dict):
        try:
            spec = spec_from_dict(spec)
        except UserError:
            return None
    data = {k: v for k, v in spec.to_dict().items() if k not in _NOT_IN_DIGEST}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- running


def run_cell(spec: RunSpec, history, emit=None, cancel: Callable[[], bool] | None = None) -> str:
    """Run one cell through the engine in this process, recording it in ``history``; return its run id.

    A failure is recorded with the run (kept in the history) and raised as a
    ``WorkbenchError``.
    """
    from .engine import Run
    from .events import RunFailed, fanout

    run = Run(spec, cancel=cancel)
    history.create_run(run.run_id, spec.to_dict(), name=spec.name, model=spec.model.name, out_dir=str(run.run_dir))
    run.emit = fanout(history.recorder(run.run_id), emit)

    def fail(kind: str, message: str, hint: str | None) -> None:
        run.emit(RunFailed(run_id=run.run_id, kind=kind, message=message, hint=hint))
        history.fail_run(run.run_id, kind, message, hint)

    try:
        summary = run.execute()
    except WorkbenchError as exc:
        fail(exc.kind, exc.message, exc.hint)
        raise
    except KeyboardInterrupt:
        fail("cancelled", "interrupted", None)
        raise Cancelled("the study was interrupted", "run it again to resume: finished cells are reused") from None
    except Exception as exc:  # a bug or a library failure: keep it with the run
        fail("run_failed", f"{type(exc).__name__}: {exc}", None)
        raise RunError(f"run {run.run_id} failed: {type(exc).__name__}: {exc}", f"see: workbench show {run.run_id}") from exc
    if summary.get("export"):
        history.add_artifact(run.run_id, "model", summary["export"])
    history.finish_run(run.run_id, summary)
    return run.run_id


@dataclass
class CellResult:
    cell: Cell | None  # None: the dense reference
    run_id: str | None
    reused: bool
    error: str | None = None


def reusable_runs(history) -> dict[str, str]:
    """Digest -> id of the newest finished run with that spec."""
    index: dict[str, str] = {}
    for run_id, spec in history.finished_specs():
        digest = spec_digest(spec)
        if digest is not None:
            index.setdefault(digest, run_id)
    return index


def run_study(study: StudySpec, base: RunSpec, history, cell_runner: Callable = run_cell,
              on_cell: Callable[[int, int, CellResult], None] | None = None,
              cancel: Callable[[], bool] | None = None) -> list[CellResult]:
    """Run every cell not already in ``history`` (the dense reference first); return one result per cell.

    ``cell_runner(spec, history) -> run id`` runs a cell (``run_cell`` in
    process). A cell that fails with bad input stops the study (every cell
    would); other failures are reported and the study goes on.
    ``on_cell(index, total, result)`` follows each cell; ``cancel()`` is
    checked between cells.
    """
    index = reusable_runs(history)
    jobs = study_jobs(study, base)
    results = []
    for i, (cell, spec) in enumerate(jobs):
        if cancel is not None and cancel():
            raise Cancelled("the study was cancelled", "run it again to resume: finished cells are reused")
        digest = spec_digest(spec)
        if digest in index:
            result = CellResult(cell, index[digest], reused=True)
        else:
            try:
                run_id = cell_runner(spec, history)
            except (UserError, Cancelled):
                raise
            except WorkbenchError as exc:
                result = CellResult(cell, None, reused=False, error=exc.message)
            else:
                index[digest] = run_id
                result = CellResult(cell, run_id, reused=False)
        results.append(result)
        if on_cell is not None:
            on_cell(i, len(jobs), result)
    return results


# ---------------------------------------------------------------- results


def _metric_key(metric: dict) -> str:
    return metric["dataset"] if metric["name"] == "perplexity" else f"{metric['name']} {metric['dataset']}"


def _after_metrics(history, run_id: str, phase: str = "after") -> dict[str, float]:
    return {_metric_key(m): m["value"] for m in history.metrics(run_id) if m["phase"] == phase and m["value"] is not None}


def _calibration_stats(history, run_id: str) -> dict[str, float]:
    """The dense model's perplexity on the cell's calibration windows and their divergence from the compared source."""
    summary = ((history.get(run_id).summary or {}).get("calibration") or {}).get("summary") or {}
    out = {}
    if summary.get("perplexity") is not None:
        out["calib ppl"] = summary["perplexity"]
    if summary.get("divergence"):
        out[f"JS vs {summary['divergence']['from']}"] = summary["divergence"]["js_bits"]
    return out


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def aggregate(study: StudySpec, results: list[CellResult], history) -> dict:
    """The study's table from the stored runs: per (method, sparsity, source), each metric's mean and sample std over seeds.

    Metrics are the compressed model's (phase "after"): perplexity by dataset
    (key: the dataset) and any other metric (key: "NAME DATASET"). Each row's
    "calibration" holds the calibration summary's numbers (the dense model's
    perplexity on the windows, the token divergence) the same way. The dense
    reference's metrics (phase "before") are under "dense".
    """
    done = [r for r in results if r.cell is not None and r.run_id]
    per_cell = {r.cell: _after_metrics(history, r.run_id) for r in done}
    calibration = {r.cell: _calibration_stats(history, r.run_id) for r in done}
    dense = next((r for r in results if r.cell is None and r.run_id), None)

    def keys_of(table: dict) -> list[str]:
        return list(dict.fromkeys(k for values in table.values() for k in values))

    keys, calibration_keys = keys_of(per_cell), keys_of(calibration)
    rows = []
    for method in study.methods:
        for sparsity in study.sparsities:
            for source in study.sources:
                cells = [Cell(source, method, sparsity, seed) for seed in study.seeds]
                row = {"method": method, "sparsity": sparsity, "source": source, "metrics": {}, "calibration": {}}
                for part, table, names in (("metrics", per_cell, keys), ("calibration", calibration, calibration_keys)):
                    for key in names:
                        values = [table[c][key] for c in cells if key in table.get(c, {})]
                        if values:
                            row[part][key] = _stats(values)
                rows.append(row)
    return {"study": study.name, "metrics": keys, "calibration": calibration_keys, "rows": rows,
            "dense": _after_metrics(history, dense.run_id, "before") if dense else {}}


def _lower_is_better(key: str) -> bool | None:
    """Perplexity (a bare dataset name): lower is better; accuracies: higher; other metrics are not ranked (None)."""
    if " " not in key:
        return True
    return False if "acc" in key.split(" ")[0] else None


def ranking(table: dict) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """Per method and metric, the sources from best to worst by the geometric mean over sparsities of their mean.

    The geometric mean keeps the highest sparsity, where perplexities are
    largest, from deciding the order alone. Sources missing a sparsity are
    left out of that ranking; metrics without a known direction (efficiency
    measurements) are not ranked.
    """
    out: dict[str, dict[str, list[tuple[str, float]]]] = {}
    methods = list(dict.fromkeys(r["method"] for r in table["rows"]))
    sources = list(dict.fromkeys(r["source"] for r in table["rows"]))
    sparsities = list(dict.fromkeys(r["sparsity"] for r in table["rows"]))
    for method in methods:
        out[method] = {}
        for key in (k for k in table["metrics"] if _lower_is_better(k) is not None):
            scores = []
            for source in sources:
                means = [r["metrics"][key]["mean"] for r in table["rows"]
                         if r["method"] == method and r["source"] == source and key in r["metrics"]]
                if len(means) == len(sparsities) and all(m > 0 and math.isfinite(m) for m in means):
                    scores.append((source, math.exp(statistics.fmean(math.log(m) for m in means))))
            out[method][key] = sorted(scores, key=lambda s: s[1], reverse=not _lower_is_better(key))
    return out


_MARKERS = ("o", "x", "+", "*", "#", "@", "%", "=")


def chart(table: dict, method: str, key: str, width: int = 72, height: int = 18) -> str:
    """Perplexity (log scale) against sparsity, one line per source, as terminal text."""
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")
    for i, source in enumerate(dict.fromkeys(r["source"] for r in table["rows"])):
        points = [(r["sparsity"], r["metrics"][key]["mean"]) for r in table["rows"]
                  if r["method"] == method and r["source"] == source and key in r["metrics"]]
        if points:  # plain text: each line gets its own marker character
            plt.plot([100 * s for s, _ in points], [v for _, v in points], label=source, marker=_MARKERS[i % len(_MARKERS)])
    plt.yscale("log")
    plt.title(f"{method}: {key} perplexity against sparsity")
    plt.xlabel("sparsity %")
    text = plt.uncolorize(plt.build())
    plt.clear_figure()
    return text


def format_stat(stat: dict | None) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if stat["std"] is not None else f"{stat['mean']:.2f}"


def table_view(table: dict):
    """The table as a rich Table: one row per method, sparsity and source; mean ± std over seeds per metric."""
    from rich.table import Table

    view = Table(title=f"study {table['study']}: mean ± std over seeds (n = seeds with a result)",
                 caption="calib ppl: the dense model's perplexity on the calibration windows; "
                         "JS vs X: Jensen-Shannon divergence (bits) of their token frequencies from X's")
    for col in ("method", "sparsity", "source", "n"):
        view.add_column(col, justify="right" if col in ("sparsity", "n") else "left")
    for key in table["metrics"]:
        view.add_column(f"{key} ppl" if " " not in key else key, justify="right")
    for key in table["calibration"]:
        view.add_column(key, justify="right")
    if table["dense"]:
        view.add_row("dense", "0%", "-", "1", *(f"{table['dense'][k]:.2f}" if k in table["dense"] else "-" for k in table["metrics"]),
                     *("" for _ in table["calibration"]))
    previous = None
    for r in table["rows"]:
        n = max((s["n"] for s in r["metrics"].values()), default=0)
        same = previous == (r["method"], r["sparsity"])
        view.add_row("" if same else r["method"], "" if same else f"{r['sparsity']:.0%}", r["source"], str(n),
                     *(format_stat(r["metrics"].get(k)) for k in table["metrics"]),
                     *(format_stat(r["calibration"].get(k)) for k in table["calibration"]))
        previous = (r["method"], r["sparsity"])
    return view


# ---------------------------------------------------------------- commands


def cmd_study(args) -> int:
    from rich.console import Console

    from .history import History

    study, base = load_study(args.preset, args.overrides)
    console = Console(stderr=True)
    out = Console()
    cells = len(study.cells()) + 1
    with History() as history:
        if args.plan:
            index = reusable_runs(history)
            todo = 0
            for cell, spec in study_jobs(study, base):
                found = index.get(spec_digest(spec))
                todo += found is None
                out.print(f"{cell.label() if cell else 'dense'}: " + (f"reuses run {found}" if found else "to run"))
            out.print(f"{cells} cells, {todo} to run")
            return 0
        console.print(f"study [bold]{study.name}[/]: {len(study.sources)} sources x {len(study.methods)} methods x "
                      f"{len(study.sparsities)} sparsities x {len(study.seeds)} seeds, and the dense reference ({cells} runs)")

        def on_cell(i: int, total: int, result: CellResult) -> None:
            label = result.cell.label() if result.cell else "dense"
            status = f"reused run {result.run_id}" if result.reused else f"[red]failed[/]: {result.error}" if result.error else f"run {result.run_id}"
            console.print(f"[{i + 1}/{total}] {label}: {status}")

        def runner(spec, history):
            from .console import ProgressDisplay

            with ProgressDisplay(console, enabled=not args.quiet) as display:
                return run_cell(spec, history, emit=display)

        results = run_study(study, base, history, cell_runner=runner, on_cell=on_cell)
        table = aggregate(study, results, history)
    ranks = ranking(table)
    if args.json:
        print(json.dumps({"table": table, "ranking": ranks,
                          "cells": [{"cell": vars(r.cell) if r.cell else "dense", "run_id": r.run_id, "reused": r.reused,
                                     "error": r.error} for r in results]}, indent=2))
    else:
        out.print(table_view(table))
        if not args.no_chart:
            for method in study.methods:
                for key in table["metrics"]:
                    if " " not in key:  # perplexity
                        out.print(chart(table, method, key), markup=False, highlight=False)
        for method, by_key in ranks.items():
            for key, order in by_key.items():
                out.print(f"ranking for {method} on {key}: " + " < ".join(f"{s} ({v:.2f})" for s, v in order))
        reused = sum(r.reused for r in results)
        out.print(f"{len(results)} runs: {reused} reused, {len(results) - reused} computed")
    return 1 if any(r.error for r in results) else 0


def register(sub) -> dict:
    """Add ``workbench study`` to ``sub``; return ``{name: handler}``."""
    study = sub.add_parser("study", help="run a calibration study preset: sources x methods x sparsities x seeds")
    study.add_argument("preset", help="a study preset (with a [study] table), e.g. study-calibration-demo")
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set study.seeds=[0,1] or --set evaluate.limit=8 (repeatable)")
    study.add_argument("--plan", action="store_true", help="list the cells and which are already in the history; run nothing")
    study.add_argument("--json", action="store_true", help="print the table, ranking and cells as JSON")
    study.add_argument("--no-chart", action="store_true", help="no perplexity charts")
    study.add_argument("--quiet", action="store_true", help="no progress bars")

    return {"study": cmd_study}


__all__ = ["StudySpec", "Cell", "load_study", "parse_study", "run_study", "run_cell", "aggregate", "ranking", "spec_digest",
           "register"]

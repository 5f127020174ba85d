"""Command-line commands for this feature (see ``workbench.cli.COMMAND_MODULES``).

- ``workbench eval [RUN] [--model M] [--zeroshot TASK...] [--icl SET...] [--efficiency] ...``:
  with a run id, evaluates the model that run left (its export, or the model
  of a run without steps) and stores the metrics with that run (phase
  ``eval``); with ``--model``, evaluates a model as a new run of its own.
- ``workbench compare RUN RUN ...``: the comparison table and charts.
- ``workbench report RUN ... --out FILE.md``: the Markdown report.

No torch at import time: the engine is imported when an evaluation runs.
"""

from __future__ import annotations

import json
import sys

from workbench.errors import UserError

EXIT_OK = 0


def register(sub) -> dict:
    """Add this module's subcommands to ``sub``; return ``{name: handler}``."""
    ev = sub.add_parser("eval", help="evaluate a model, or the model a run left, beyond perplexity",
                        description="Zero-shot tasks (lm-eval), in-context learning (zero-shot, few-shot, DAIL), "
                                    "efficiency and perplexity, on a model or on a finished run's model.")
    ev.add_argument("run", nargs="?", help="a run id (or a unique prefix): the metrics are stored with that run")
    ev.add_argument("--model", help="evaluate this model as a new run instead: 'demo', a folder or a hub id")
    ev.add_argument("--zeroshot", nargs="+", metavar="TASK",
                    help="bundled tasks (boolq piqa winogrande arc_easy arc_challenge openbookqa copa siqa "
                         "lambada_openai), lm_eval:NAME or file:TASK.yaml")
    ev.add_argument("--limit", type=int, metavar="N", help="the first N samples of each zero-shot task")
    ev.add_argument("--icl", nargs="+", metavar="SET",
                    help="sst2 sst5 mr cr subj trec agnews rte cb books-next, or file:PATH.jsonl; "
                         "NAME@typo:0.15 (shifts typo, words, case, space, joined by +) evaluates a shifted copy")
    ev.add_argument("--icl-mode", nargs="+", metavar="MODE", help="zeroshot fewshot dail (default: dail)")
    ev.add_argument("--k", type=int, help="demonstrations per query (default 4)")
    ev.add_argument("--memory", type=int, help="DAIL memory size M (default 32)")
    ev.add_argument("--retriever", help="bm25 or hidden (default bm25)")
    ev.add_argument("--max-entropy", type=float, help="DAIL: only predictions at most this uncertain (0..1) are demonstrations")
    ev.add_argument("--seeds", type=int, help="query orders for the ICL mean and std (default 3)")
    ev.add_argument("--icl-limit", type=int, metavar="N", help="a fixed random subset of N test queries per ICL set")
    ev.add_argument("--tta", nargs="+", metavar="MODE",
                    help="test-time adaptation of the ICL sets: none tent pcl, each evaluated (tta_* and pcl_* settings via --set)")
    ev.add_argument("--efficiency", action="store_true", help="parameters, size, prefill and decode speed, peak memory")
    ev.add_argument("--perplexity", nargs="+", metavar="SET", help="wikitext2, c4 or file:PATH")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any other setting, e.g. --set evaluate.batch_size=8 (repeatable)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    cmp = sub.add_parser("compare", help="compare runs: metrics as rows, runs as columns, deltas against the dense baseline")
    cmp.add_argument("runs", nargs="+", metavar="RUN")
    cmp.add_argument("--json", action="store_true", help="print the table as JSON")
    cmp.add_argument("--no-charts", action="store_true", help="the table only")

    rep = sub.add_parser("report", help="write a Markdown report of runs (table, charts as text, per-layer allocation, settings)")
    rep.add_argument("runs", nargs="+", metavar="RUN")
    rep.add_argument("--out", required=True, metavar="FILE.md")
    rep.add_argument("--title")
    return {"eval": cmd_eval, "compare": cmd_compare, "report": cmd_report}


# ----------------------------------------------------------------------------- eval


def _evaluate_settings(args) -> dict:
    """The [evaluate] table the flags ask for; perplexity only when asked."""
    flags = {"zeroshot": args.zeroshot, "zeroshot_limit": args.limit, "icl": args.icl, "icl_modes": args.icl_mode,
             "icl_k": args.k, "icl_memory": args.memory, "icl_retriever": args.retriever,
             "icl_max_entropy": args.max_entropy, "icl_seeds": args.seeds, "icl_limit": args.icl_limit,
             "tta": args.tta, "perplexity": args.perplexity or []}
    settings = {k: v for k, v in flags.items() if v is not None}
    if args.efficiency:
        settings["efficiency"] = True
    return settings


def eval_spec(args, model: str, model_settings: dict | None = None):
    """The RunSpec of an evaluation: no compression steps, the flags' [evaluate] table, then --set overrides."""
    from workbench.spec import apply_override, spec_from_dict

    data = {"name": "eval", "model": {**(model_settings or {}), "name": model}, "evaluate": _evaluate_settings(args)}
    for item in args.overrides:
        apply_override(data, item)
    spec = spec_from_dict(data)
    e = spec.evaluate
    if not (e.perplexity or e.zeroshot or e.icl or e.efficiency):
        raise UserError("nothing to evaluate", "add --zeroshot piqa, --icl sst2, --efficiency or --perplexity wikitext2")
    return spec


def cmd_eval(args) -> int:
    if bool(args.run) == bool(args.model):
        raise UserError("give either a run id or --model", "workbench eval RUN_ID --zeroshot piqa, or workbench eval --model demo --zeroshot piqa")
    if args.model:
        from workbench.cli import run_inprocess

        return run_inprocess(eval_spec(args, args.model), as_json=args.json, quiet=args.quiet)
    return attach_evaluation(args)


def attach_evaluation(args) -> int:
    """Evaluate the model a finished run left and store the metrics with that run (phase ``eval``)."""
    from pathlib import Path

    from rich.console import Console

    from workbench.console import ProgressDisplay
    from workbench.history import History

    with History() as history:
        record = history.get(args.run)
        model = history.model_of(record)
        if model is None:
            raise UserError(f"run {record.id} did not keep its compressed model",
                            "re-run it with --out FOLDER (export.save = true) to evaluate it later")
        if record.spec.get("steps") and not Path(model).is_dir():
            raise UserError(f"the exported model of run {record.id} is gone ('{model}')", "export it again, or evaluate another folder with --model")
        settings = {k: v for k, v in (record.spec.get("model") or {}).items() if k in ("dtype", "device", "trust_remote_code")}
        spec = eval_spec(args, model, settings)
        console = Console(stderr=True)
        console.print(f"evaluating run [bold]{record.id}[/] ({record.name}): {model}")
        display = ProgressDisplay(console, enabled=not args.quiet)
        metrics = _evaluate_into(history, record, spec, display)
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
    else:
        _print_metrics(metrics)
    return EXIT_OK


def _evaluate_into(history, record, spec, display) -> list[dict]:
    import torch

    from workbench.engine import Run
    from workbench.events import Log, fanout

    log = history.attach_to(record.id)  # a history that cannot be written costs nothing: a journal holds the events
    emit = fanout(log, display)
    run = Run(spec, emit=emit, run_id=record.id, run_dir=record.out_dir)
    emit(Log(message=f"evaluation attached to run {record.id}: {spec.model.name}"))
    try:
        with display, torch.no_grad():
            run.load()
            run.evaluate("eval")
    finally:
        log.close()
        if log.journal is not None and record.id not in history.merge_journals():
            print(f"warning: the run history could not be written ({log.problem}); the evaluation's records are in "
                  f"{log.journal} and are merged the next time it can be written", file=sys.stderr)
    return run.metrics


def _print_metrics(metrics: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .report import cell_text, row_label

    table = Table(title="evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for m in metrics:
        table.add_row(row_label((m["name"], m["dataset"]), m), cell_text(m, None, True))
    Console().print(table)


# ----------------------------------------------------------------------------- compare and report


def _load_runs(ids: list[str]) -> list[tuple]:
    from workbench.history import History

    with History() as history:
        runs = []
        for run_id in ids:
            record = history.get(run_id)
            runs.append((record, history.metrics(record.id)))
    return runs


def cmd_compare(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .report import charts_text, columns, table_cells

    cols = columns(_load_runs(args.runs))
    header, body = table_cells(cols)
    if args.json:
        print(json.dumps({"columns": [{"run_id": c.run_id, "label": c.label, "baseline": c.baseline, "sparsity": c.sparsity}
                                      for c in cols], "header": header, "rows": body}, indent=2))
        return EXIT_OK
    console = Console()
    table = Table(title="comparison (deltas against the first column)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    if not args.no_charts:
        charts = charts_text(cols)
        if charts:
            console.print(charts, markup=False, highlight=False)
    return EXIT_OK


def cmd_report(args) -> int:
    from workbench.files import write_text_atomic

    from .report import markdown_report

    path = write_text_atomic(args.out, markdown_report(_load_runs(args.runs), title=args.title))
    print(f"report written to {path}")
    return EXIT_OK

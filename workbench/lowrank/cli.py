"""``workbench search``: run a preset's rank-allocation search, on one machine or many, and resume it.

No torch at import time (see ``workbench.cli.COMMAND_MODULES``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from workbench.errors import UserError


def register(sub) -> dict:
    """Add this module's subcommands to ``sub``; return ``{name: handler}``."""
    p = sub.add_parser("search", help="run a low-rank preset's rank-allocation search (Optuna), resumable, with N workers")
    p.add_argument("preset", nargs="?", help="a shipped preset name or a .toml file with a lowrank step whose allocation is search")
    p.add_argument("--workers", type=int, help="worker processes running trials (one per GPU where there are GPUs)")
    p.add_argument("--storage", help="the study's storage: postgresql://USER:PASSWORD@HOST:PORT/DB (shared by machines) "
                                     "or a journal file (default: a journal file in the run's folder)")
    p.add_argument("--study", help="the study's name (default: derived from the preset, so the same preset shares one study)")
    p.add_argument("--resume", metavar="RUN", help="continue the search of an interrupted run (its finished trials are kept)")
    p.add_argument("--model", help="model: 'demo', a local folder or a hub id (overrides model.name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set steps.0.trials=20 (repeatable)")
    p.add_argument("--out", help="export the compressed model to this folder (safetensors + compression.json)")
    p.add_argument("--fresh", action="store_true",
                   help="measure the dense model again even when an identical measurement is stored (evaluate.fresh)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out replace an earlier workbench export in that folder (never any other folder)")
    p.add_argument("--merge", action="store_true", help="export plain linears (factors multiplied back) that vanilla transformers loads")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return {"search": cmd_search}


def search_step_index(data: dict) -> int:
    """The index of the first ``lowrank`` step with ``allocation = "search"`` in a spec's data."""
    for i, step in enumerate(data.get("steps") or []):
        if isinstance(step, dict) and step.get("type") == "lowrank" and step.get("allocation") == "search":
            return i
    raise UserError("the preset has no low-rank step with allocation = \"search\"",
                    "use a search preset such as lowrank-feature-bo-80, or --set steps.N.allocation=search")


def _resumed_data(run_id: str) -> dict:
    """The spec of an interrupted run, pinned to its study so the search continues there."""
    from workbench.history import History

    with History() as history:
        record = history.get(run_id)
        data = record.spec
        step = data["steps"][search_step_index(data)]
        marker = Path(record.out_dir or "") / "search" / "study.json"
        if not marker.is_file():
            raise UserError(f"run {record.id} has no search to resume (nothing at {marker})",
                            "it stopped before its search began: start it again with workbench search PRESET")
        if record.status == "running":  # its process is alive: two processes on one study is fine, but say so
            print(f"warning: run {record.id} is still running; this search joins its study", file=sys.stderr)
    study = json.loads(marker.read_text())
    step["storage"], step["study"] = study["storage"], study["study"]
    return data


def cmd_search(args) -> int:
    from workbench.cli import run_inprocess
    from workbench.spec import apply_override, load_preset_data, spec_from_dict

    if bool(args.preset) == bool(args.resume):
        raise UserError("give either a preset or --resume RUN", "workbench search lowrank-feature-bo-80, or workbench search --resume RUN_ID")
    data = _resumed_data(args.resume) if args.resume else load_preset_data(args.preset)
    for item in args.overrides:
        apply_override(data, item)
    index = search_step_index(data)
    flags = {"workers": args.workers, "storage": args.storage, "study": args.study}
    overrides = [f"steps.{index}.{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if args.merge:
        overrides.append(f"steps.{index}.merge=true")
    if args.model:
        overrides.append(f"model.name={json.dumps(args.model)}")
    if args.out or args.merge:
        overrides.append("export.save=true")
    if args.out:
        overrides.append(f"export.out={json.dumps(args.out)}")
    if args.overwrite:
        overrides.append("export.overwrite=true")
    if args.fresh:
        overrides.append("evaluate.fresh=true")
    for item in overrides:
        apply_override(data, item)
    spec = spec_from_dict(data)
    step = spec.steps[index]
    if step.storage and "://" in step.storage:  # fail before loading anything when the database cannot be reached
        from .search import open_storage

        open_storage(step.storage, step.heartbeat)
    return run_inprocess(spec, as_json=args.json, quiet=args.quiet)

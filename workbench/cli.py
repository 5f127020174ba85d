"""The ``workbench`` command: headless runs, presets, validation, history.

Exit codes: 0 success, 2 bad input (with one clear message and a hint, no
traceback), 1 a failure while a valid run executed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import traceback

from . import __version__
from .errors import RunError, UserError, WorkbenchError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
COMMANDS: dict = {}


def _err(message: str, hint: str | None = None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Compress large language models: prune, evaluate, export.")
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a preset or a TOML file headless")
    run.add_argument("preset", help="a shipped preset name (see: workbench presets) or a .toml file")
    run.add_argument("--model", help="model: 'demo', a local folder or a hub id (overrides model.name)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set steps.0.sparsity=0.6 (repeatable)")
    run.add_argument("--out", help="export the compressed model to this folder (safetensors + compression.json)")
    run.add_argument("--fresh", action="store_true",
                     help="measure the dense model again even when an identical measurement is stored (evaluate.fresh)")
    run.add_argument("--overwrite", action="store_true",
                     help="let --out replace an earlier workbench export in that folder (never any other folder)")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    run.add_argument("--backend", default="inprocess", metavar="WHERE",
                     help="where the engine runs: inprocess (this process, the default), local (a worker process on "
                          "this machine) or ssh://[USER@]HOST[:PORT] (a worker on another machine)")
    run.add_argument("--gpus", metavar="IDS", help="the GPUs the run may use: 0, or 0+1 for a model that needs both "
                                                    "(sets CUDA_VISIBLE_DEVICES of the engine's process)")
    run.add_argument("--worker-command", metavar="CMD",
                     help="the command that starts the worker (default: 'python -m workbench worker' of this Python "
                          "locally, 'workbench worker' over ssh), e.g. '~/venv/bin/workbench worker'")
    run.add_argument("--ssh-option", dest="ssh_options", action="append", default=[], metavar="OPTION",
                     help="an ssh -o option for ssh:// backends, e.g. IdentityFile=~/.ssh/gpu (repeatable)")
    run.add_argument("--hello-timeout", type=float, default=120.0, metavar="SECONDS",
                     help="how long a starting worker has to say hello (default 120; a worker that exits is reported at once)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("presets", help="list the shipped presets")
    val = sub.add_parser("validate", help="check a preset file without running it")
    val.add_argument("file")

    hist = sub.add_parser("history", help="list the runs in the run history")
    hist.add_argument("--limit", type=int, default=30)
    hist.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="show one run from the history")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--events", action="store_true", help="also list the run's events")
    for module in COMMAND_MODULES:
        COMMANDS.update(importlib.import_module(module).register(sub))
    return parser


# Commands defined beside the features they drive. Each module has
# ``register(subparsers) -> {command: handler}``; a handler takes the parsed
# arguments and returns an exit code (or raises a WorkbenchError). These
# modules must not import torch at import time.
COMMAND_MODULES = (
    "workbench.backends.cli",
    "workbench.lowrank.cli",
    "workbench.study",
    "workbench.data.cli",
    "workbench.evaluation.cli",
    "workbench.screens.cli",
)


# ---------------------------------------------------------------------- commands


def cmd_presets(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from workbench.presets import preset_names

    from .spec import load_preset_data

    table = Table(title="presets")
    table.add_column("name")
    table.add_column("description")
    table.add_column("reproduces")
    for name in preset_names():
        data = load_preset_data(name)
        table.add_row(name, data.get("description", ""), data.get("reference", ""))
    Console().print(table)
    return EXIT_OK


def cmd_validate(args) -> int:
    from .errors import UserError
    from .memory_estimate import check_spec
    from .spec import load_preset

    spec = load_preset(args.file)
    findings = check_spec(spec)  # the estimate the TUI's Inspect shows, against this machine
    for f in findings:
        if f.level == "problem":
            raise UserError(f"{f.key}: {f.message}", f.hint)
    for f in findings:
        print(f"warning: {f.message}" + (f" ({f.hint})" if f.hint else ""))
    print(f"ok: {args.file}: {spec.summary()}")
    return EXIT_OK


def cmd_run(args) -> int:
    from .spec import load_preset

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name={json.dumps(args.model)}")
    if args.out:
        overrides += ["export.save=true", f"export.out={json.dumps(args.out)}"]
    if args.overwrite:
        overrides.append("export.overwrite=true")
    if args.fresh:
        overrides.append("evaluate.fresh=true")
    spec = load_preset(args.preset, overrides)
    from workbench.backends.transports import gpu_group, parse_backend

    gpus = gpu_group(args.gpus)
    transport = parse_backend(args.backend, gpus, args.worker_command, args.ssh_options)
    if transport is None:
        if gpus:  # read when torch first touches CUDA, which has not happened yet in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["WORKBENCH_GPUS"] = ",".join(gpus)
            from .models import check_requested_gpus

            check_requested_gpus()
        return run_inprocess(spec, as_json=args.json, quiet=args.quiet)
    if args.hello_timeout <= 0:
        raise UserError(f"--hello-timeout {args.hello_timeout:g} must be a positive number of seconds", "the default is 120")
    return run_on_worker(spec, transport, as_json=args.json, quiet=args.quiet, hello_timeout=args.hello_timeout)


def run_inprocess(spec, as_json: bool = False, quiet: bool = False) -> int:
    """Run a spec in this process, recording every event in the run history."""
    from .engine import Run

    run = Run(spec)

    def execute(emit):
        run.emit = emit
        return run.execute()

    return _headless(spec, run.run_id, str(run.run_dir), execute, as_json, quiet)


def run_on_worker(spec, transport, as_json: bool = False, quiet: bool = False, hello_timeout: float = 120.0) -> int:
    """Run a spec in a worker process (``--backend local`` or ``ssh://HOST``); this process never imports torch.

    The worker's events are recorded in the run history as they arrive, so a
    worker that dies fails the run with the events so far kept.
    """
    from workbench.backends.client import BlockingClient

    from .events import Log
    from .history import new_run_id

    with BlockingClient(transport, restart=False, start_timeout=hello_timeout) as client:  # UserError when the worker cannot start
        hello, run_id = client.hello, new_run_id()
        devices = ", ".join(d["name"] for d in hello["devices"])
        about = (f"worker {transport.describe()}: pid {hello['pid']} on {hello['host']}, torch {hello.get('torch')}, "
                 f"devices: {devices}")

        def execute(emit):
            emit(Log(message=about))
            try:
                summary = client.run("run", emit, spec=spec.to_dict(), run_id=run_id)
            except RunError as exc:
                if exc.kind in ("worker_died", "worker_hung"):
                    exc.hint = f"the events so far are kept: workbench show {run_id}; {exc.hint}"
                raise
            if summary.get("export"):
                summary["export"] = transport.locate(summary["export"])
            return summary

        return _headless(spec, run_id, transport.locate(f"{hello['home']}/runs/{run_id}"), execute, as_json, quiet)


EXIT_TERMINATED = 128 + 15  # the shell's status for a process ended by SIGTERM


class _Signals:
    """SIGTERM (timeout, Slurm, systemd, docker stop) stops a command like Ctrl-C does, and says which it was."""

    terminated = False

    @classmethod
    def _on_term(cls, signum, frame):
        cls.terminated = True
        raise KeyboardInterrupt

    @classmethod
    def install(cls) -> None:
        import threading

        cls.terminated = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, cls._on_term)


class _Held:
    """Ctrl-C and SIGTERM wait (they are delivered afterwards) while a finished run's end is recorded."""

    _SIGNALS = {signal.SIGINT, signal.SIGTERM}

    def __enter__(self):
        self._blocked = hasattr(signal, "pthread_sigmask")
        if self._blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, self._SIGNALS)
        return self

    def __exit__(self, *exc):
        if self._blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._SIGNALS)


def _headless(spec, run_id: str, out_dir: str, execute, as_json: bool, quiet: bool) -> int:
    """Show progress and record every event in the run history while ``execute(emit)`` runs; print the summary.

    A failure keeps the events so far and marks the run failed (or cancelled)
    with its message, hint and details (a traceback, a worker's last output).
    Ctrl-C and SIGTERM cancel the run (exit 1 and 143) and record it as
    cancelled; once the run has finished, they only cut the printing short and
    the exit status stays 0, as the history says. When the history cannot be
    written, the run goes on and its records go to a journal merged back later.
    """
    from rich.console import Console

    from .console import ProgressDisplay, step_tables, summary_table
    from .events import RunFailed, fanout
    from .history import History

    console = Console(stderr=True)

    def notify(message: str) -> None:
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)  # paths stay whole

    history = History(notify=notify)
    log = history.open_run(run_id, spec.to_dict(), name=spec.name, model=spec.model.name, out_dir=out_dir)
    display = ProgressDisplay(console, enabled=not quiet)
    emit = fanout(log, display)
    console.print(f"run [bold]{run_id}[/]: {spec.summary()}")
    summary = None
    try:
        try:
            with display:
                summary = execute(emit)
        except KeyboardInterrupt:
            if summary is None:
                raise
        with _Held():
            if summary.get("export"):
                log.artifact("model", summary["export"])
            log.finish(summary)
    except KeyboardInterrupt:
        how = "terminated (SIGTERM)" if _Signals.terminated else "interrupted"
        with _Held():
            emit(RunFailed(run_id=run_id, kind="cancelled", message=how))
            log.fail("cancelled", f"{how}: the run was stopped before it finished")
        _err(f"{how}; the events so far are kept in the run history", f"workbench show {run_id}")
        _close(history, log, notify)
        return EXIT_TERMINATED if _Signals.terminated else EXIT_FAILED
    except WorkbenchError as exc:
        emit(RunFailed(run_id=run_id, kind=exc.kind, message=exc.message, hint=exc.hint))
        details = getattr(exc, "details", None)
        log.fail(exc.kind, exc.message, f"{exc.hint}\n{details}" if details else exc.hint)
        _err(exc.message, exc.hint)
        _close(history, log, notify)
        return exc.exit_code
    except Exception as exc:  # a bug or a library failure: keep what was computed, say where it is
        tb = traceback.format_exc()
        emit(RunFailed(run_id=run_id, kind="run_failed", message=f"{type(exc).__name__}: {exc}", hint=tb[-2000:]))
        log.fail("run_failed", f"{type(exc).__name__}: {exc}", tb[-4000:])
        _err(f"the run failed: {type(exc).__name__}: {exc}", f"the traceback is stored with the run: workbench show {run_id}")
        if os.environ.get("WORKBENCH_DEBUG"):
            print(tb, file=sys.stderr)
        _close(history, log, notify)
        return EXIT_FAILED
    _close(history, log, notify)
    try:
        for step in summary.get("steps", []):
            for table in step_tables(step):
                console.print(table)
        console.print(summary_table(summary))
        if as_json:
            print(json.dumps(summary, indent=2, default=str))
    except KeyboardInterrupt:
        _err("the run had finished and is recorded as finished; only its output was cut short",
             f"workbench show {run_id}")
    return EXIT_OK


def _close(history, log, notify) -> None:
    """Close the history; if the run had to be journaled, merge it now when possible, else say where it is."""
    if log.journal is not None:
        try:
            merged = log.run_id in history.merge_journals()
        except Exception:  # noqa: BLE001 - the journal stays for the next time
            merged = False
        if not merged:
            notify(f"the run history could not be written ({log.problem}); this run's records are in {log.journal} "
                   f"and are merged into the history the next time it can be written")
    history.close()


def cmd_history(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .evaluation.report import perplexity_text
    from .history import History

    with History(notify=_warn) as h:
        runs = h.runs(limit=args.limit)
        rows = [(r, h.metrics(r.id)) for r in runs]
    if args.json:
        print(json.dumps([{"id": r.id, "name": r.name, "status": r.status, "model": r.model, "created": r.created,
                           "metrics": {f"{m['dataset']}:{m['phase']}": m["value"] for m in metrics if m["name"] == "perplexity"}}
                          for r, metrics in rows], indent=2))
        return EXIT_OK
    import time as _time

    table = Table(title="run history")
    for col in ("run", "name", "status", "model", "started", "perplexity (dense -> compressed)"):
        table.add_column(col)
    for r, metrics in rows:
        table.add_row(r.id, r.name, r.status, r.model or "", _time.strftime("%Y-%m-%d %H:%M", _time.localtime(r.created)),
                      perplexity_text(metrics))
    Console().print(table)
    return EXIT_OK


def cmd_show(args) -> int:
    from rich.console import Console

    from .console import step_tables, summary_table
    from .history import History

    with History(notify=_warn) as h:
        r = h.get(args.run_id)
        metrics = h.metrics(r.id)
        events = h.events(r.id) if args.events or args.json else []
        artifacts = h.artifacts(r.id)
    if args.json:
        print(json.dumps({"id": r.id, "name": r.name, "status": r.status, "spec": r.spec, "summary": r.summary,
                          "error": r.error, "metrics": metrics, "artifacts": artifacts, "events": events}, indent=2))
        return EXIT_OK
    console = Console()
    console.print(f"[bold]{r.id}[/] {r.name}: {r.status}")
    console.print(json.dumps(r.spec, indent=2))
    if r.summary:
        for step in r.summary.get("steps", []):
            for table in step_tables(step):
                console.print(table)
        console.print(summary_table(r.summary))
    else:
        for m in metrics:
            console.print(f"perplexity {m['dataset']} {m['phase']}: {m['value']:.3f} (seqlen {m['seqlen']})")
    if r.error:
        console.print(f"[red]{r.error.get('kind')}[/]: {r.error.get('message')}")
        if r.error.get("hint"):
            console.print(f"hint: {r.error['hint']}")
    for a in artifacts:
        console.print(f"{a['kind']}: {a['path']}")
    for e in events:
        console.print(json.dumps(e))
    return EXIT_OK


COMMANDS.update({"run": cmd_run, "presets": cmd_presets, "validate": cmd_validate, "history": cmd_history, "show": cmd_show})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            parser.print_help()
            return EXIT_OK
        args = parser.parse_args(["ui"])  # no arguments in a terminal: open the workbench
    _Signals.install()
    try:
        return COMMANDS[args.command](args)
    except WorkbenchError as exc:
        _err(exc.message, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        if _Signals.terminated:
            _err("terminated (SIGTERM)")
            return EXIT_TERMINATED
        _err("interrupted")
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``workbench ui`` command (and ``workbench`` with no arguments). No torch, no Textual at import."""

from __future__ import annotations

import sys


def register(sub) -> dict:
    ui = sub.add_parser("ui", help="open the terminal workbench (what 'workbench' with no arguments does)",
                        description="The Textual workbench: pick a model, calibration data and compression steps, "
                                    "watch the run live, evaluate, compare runs. The engine runs in a worker process.")
    add_arguments(ui)
    return {"ui": cmd_ui}


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="quickstart", help="the preset (or .toml file) the setup starts from")
    parser.add_argument("--backend", metavar="WHERE",
                        help="where the worker runs: local (a worker process on this machine, the default) or "
                             "ssh://[USER@]HOST[:PORT]; default from the settings file's [backend]")
    parser.add_argument("--gpus", metavar="IDS", help="0 (one GPU), 0,1 (a worker per GPU), 0+1 (one worker with both)")
    parser.add_argument("--worker-command", metavar="CMD", help="the command that starts a worker, e.g. "
                                                                 "'~/venv/bin/workbench worker' on an ssh host")
    parser.add_argument("--ssh-option", dest="ssh_options", action="append", default=[], metavar="OPTION",
                        help="an ssh -o option for ssh:// backends (repeatable)")
    parser.add_argument("--hello-timeout", type=float, metavar="SECONDS",
                        help="how long a starting worker has to say hello (default 120; [backend] hello_timeout)")


def cmd_ui(args) -> int:
    from workbench.errors import UserError

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError("the workbench needs a terminal: standard input and output are not one",
                        "run it in a terminal (or over ssh -t); for scripts use: workbench run PRESET")
    from .config import load_config
    from .session import Backend, Session

    config = load_config()
    b = config.backend
    backend = Backend(where=args.backend or b.where, gpus=args.gpus if args.gpus is not None else b.gpus,
                      worker_command=args.worker_command or b.worker_command,
                      ssh_options=args.ssh_options or b.ssh_options)
    session = Session(args.preset, backend)  # a bad preset fails here, before the screen is taken over
    from .app import WorkbenchApp

    timeout = args.hello_timeout or config.hello_timeout
    WorkbenchApp(session, config=config, client_options={"start_timeout": timeout} if timeout else None).run()
    return 0

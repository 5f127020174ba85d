"""The ``workbench worker`` command (see ``workbench.cli.COMMAND_MODULES``). No torch at import."""

from __future__ import annotations


def register(sub) -> dict:
    """Add this module's subcommands to ``sub``; return ``{name: handler}``."""
    worker = sub.add_parser(
        "worker", help="serve jobs on stdin/stdout (started by the TUI or a --backend run, not by hand)",
        description="A worker process speaking the JSON-lines protocol of workbench.backends (see PROTOCOL.md) "
                    "on stdin/stdout. Clients start one per GPU (CUDA_VISIBLE_DEVICES), locally or over ssh.")
    worker.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                        help="how long a running job gets to stop at shutdown before the worker leaves without it")
    fake = worker.add_argument_group("fake mode (no torch; deterministic event streams for UI tests and benchmarks)")
    fake.add_argument("--fake", action="store_true", help="answer jobs with realistic fake events instead of the engine")
    fake.add_argument("--fake-delay", type=float, default=0.02, metavar="SECONDS", help="time per layer, search trial or evaluation window")
    fake.add_argument("--fake-layers", type=int, default=8, metavar="N", help="layers of the fake model")
    fake.add_argument("--fake-fail", metavar="KIND@N", help="fail at unit N: error, oom, crash or hang (e.g. crash@3)")
    fake.add_argument("--fake-noise", action="store_true", help="also write junk to stdout from Python and C at every unit")
    fake.add_argument("--fake-stream", type=int, default=0, metavar="N", help="a run job emits just N progress events")
    fake.add_argument("--fake-rate", type=float, default=0.0, metavar="R", help="events per second for --fake-stream (0: flat out)")
    return {"worker": cmd_worker}


def cmd_worker(args) -> int:
    from .worker import main

    if not args.fake:  # the engine (torch) is imported only by a worker that runs it
        from workbench.jobs import EngineJobs

        return main(EngineJobs, grace=args.grace)
    from .fake import FakeJobs, FakeOptions

    options = FakeOptions(delay=args.fake_delay, layers=args.fake_layers, fail=args.fake_fail, noise=args.fake_noise,
                          stream=args.fake_stream, rate=args.fake_rate)
    return main(lambda: FakeJobs(options), grace=args.grace)

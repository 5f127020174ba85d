"""A real PostgreSQL server backs a search study: two worker processes share it, heartbeats retry a dead trial.

The server is started in a temporary folder with Debian's ``initdb`` and
``pg_ctl`` (installed by ``.ci/run``). Outside CI the tests are skipped, with
the reason, when no server can be started; under ``CI`` that is a failure.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings

import pytest

from workbench.cli import main
from workbench.history import History


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL could not be started under CI: {reason}")
    pytest.skip(f"needs a PostgreSQL server: {reason}")


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if not (initdb and pg_ctl):
        _unavailable("initdb/pg_ctl not found (install the postgresql package)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install psycopg2-binary)")
    folder = tempfile.mkdtemp(prefix="workbench-pg-")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres system user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True, capture_output=True)
        shutil.chown(folder, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, log, port = os.path.join(folder, "data"), os.path.join(folder, "server.log"), _free_port()
    try:
        subprocess.run(prefix + [initdb, "-D", data, "-U", "workbench", "-A", "trust", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(prefix + [pg_ctl, "-D", data, "-l", log, "-w", "-t", "60", "start",
                                 "-o", f"-h 127.0.0.1 -p {port} -k {folder} -F"], check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(folder, ignore_errors=True)
        _unavailable(f"{exc} {detail.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql://workbench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgres_study(postgres_url, capsys):
    import optuna

    from workbench.lowrank.search import open_storage

    argv = ["search", "lowrank-feature-bo-80", "--workers", "2", "--storage", postgres_url, "--study", "shared-pg",
            "--set", "steps.0.trials=5", "--set", "calibration.nsamples=4", "--set", "calibration.seqlen=64",
            "--set", "evaluate.limit=1", "--set", "steps.0.objective_chunks=2", "--set", "steps.0.objective_seqlen=64",
            "--set", 'steps.0.sampler="tpe"', "--quiet", "--json"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    study = optuna.load_study(study_name="shared-pg", storage=open_storage(postgres_url))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 5 <= len(complete) <= 6
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert len({t.user_attrs["worker"] for t in complete}) == 2
    assert summary["steps"][0]["search"]["study"] == "shared-pg"
    with History() as history:
        trial_events = [e for e in history.events(summary["run_id"]) if e["type"] == "trial"]
    assert sorted(e["number"] for e in trial_events) == sorted(t.number for t in study.trials)


def test_a_trial_whose_worker_stops_beating_is_retried(postgres_url):
    """A trial left running by a dead process is failed after the grace period and its allocation runs again."""
    from workbench.lowrank.search import open_storage, open_study, run_trials

    storage = open_storage(postgres_url, heartbeat=1)
    study = open_study(storage, "heartbeat", ["type", ["qk"], 0.2, 1.0], {"test": "heartbeat"}, "tpe", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Optuna notes that heartbeats normally come from optimize()
        dead = study.ask()
    dead.suggest_float("qk", 0.2, 1.0)
    storage.record_heartbeat(dead._trial_id)  # one beat, then the "process" is gone
    time.sleep(2.5)  # past the grace period (2 heartbeats)

    evaluated = []

    def objective(trial):
        value = trial.suggest_float("qk", 0.2, 1.0)
        evaluated.append((trial.number, value))
        return value

    run_trials(study, objective, trials=2)
    trials = {t.number: t for t in study.trials}
    assert trials[dead.number].state.name == "FAIL"
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == trials[dead.number].params
    assert sum(t.state.name == "COMPLETE" for t in trials.values()) == 2
    assert evaluated[0] == (retry[0].number, retry[0].params["qk"])  # the retry ran first

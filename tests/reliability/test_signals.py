"""Runs that die say so: SIGTERM, SIGKILL and Ctrl-C, in process and with a worker process."""

from __future__ import annotations

import signal
import time

import pytest

from reliability_support import alive, finish, history_rows, one_error, send, start, wait_for_event, worker_pid, workbench

pytestmark = pytest.mark.slow


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inprocess", "local"])
def test_sigterm_cancels_records_and_exits_143(home, work, backend):
    """R12/R13: SIGTERM (timeout, Slurm, docker stop) mid-run: exit 143, a message, the run cancelled, events kept."""
    proc = start("run", "slow.toml", "--backend", backend, home=home, cwd=work)
    wait_for_event(home, "layer_done", proc=proc)
    send(proc, signal.SIGTERM)
    done = finish(proc, timeout=60)
    assert done.code == 143, done.err
    one_error(done, "terminated", "SIGTERM")
    [run] = history_rows(home)
    assert run["status"] == "cancelled"
    assert "layer_done" in run["types"] and run["types"][-1] == "run_failed"
    if backend == "local":
        pid = worker_pid(home)
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "the worker outlived its client"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inprocess", "local"])
def test_sigkill_leaves_a_run_that_history_calls_died(home, work, backend):
    """R14/R15: SIGKILL of the CLI mid-run: history and show say 'died' (not 'running'), events kept."""
    proc = start("run", "slow.toml", "--backend", backend, home=home, cwd=work)
    wait_for_event(home, "layer_done", proc=proc)
    send(proc, signal.SIGKILL)
    proc.wait()
    [before] = history_rows(home)
    assert before["status"] == "running"  # nothing could record the end
    listing = workbench("history", "--json", home=home)
    assert listing.code == 0, listing.err
    import json

    [entry] = json.loads(listing.out)
    assert entry["status"] == "died"
    shown = workbench("show", before["id"], home=home)
    assert shown.code == 0 and "died" in shown.out and "ended without recording an end" in shown.out
    [after] = history_rows(home)
    assert after["status"] == "died" and after["events"] == before["events"]
    if backend == "local":
        pid = worker_pid(home)
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "the worker outlived its killed client"


@pytest.mark.slow
def test_ctrl_c_cancels_and_records(home, work):
    """R16: one Ctrl-C mid-run: exit 1, 'interrupted', the run cancelled with its events."""
    proc = start("run", "slow.toml", home=home, cwd=work)
    wait_for_event(home, "layer_done", proc=proc)
    send(proc, signal.SIGINT)
    done = finish(proc, timeout=60)
    assert done.code == 1
    one_error(done, "interrupted")
    [run] = history_rows(home)
    assert run["status"] == "cancelled" and "layer_done" in run["types"]


@pytest.mark.slow
def test_ctrl_c_twice_with_a_worker_kills_it_and_records(home, work):
    """R17: Ctrl-C twice with a worker: the worker is killed, exit 1, the run recorded cancelled."""
    proc = start("run", "slow.toml", "--backend", "local", home=home, cwd=work)
    wait_for_event(home, "layer_done", proc=proc)
    send(proc, signal.SIGINT)
    time.sleep(0.2)
    send(proc, signal.SIGINT)
    done = finish(proc, timeout=60)
    assert done.code == 1, done.err
    assert "Traceback" not in done.err
    [run] = history_rows(home)
    assert run["status"] in ("cancelled", "failed") and run["status"] != "running"


@pytest.mark.slow
def test_a_killed_worker_fails_the_run_with_its_events(home, work):
    """R18: kill -9 of the worker mid-run: exit 1 naming the signal, the run failed with its events."""
    proc = start("run", "slow.toml", "--backend", "local", home=home, cwd=work)
    wait_for_event(home, "layer_done", proc=proc)
    send_to = worker_pid(home)
    import os

    os.kill(send_to, signal.SIGKILL)
    done = finish(proc, timeout=60)
    assert done.code == 1
    one_error(done, "SIGKILL")
    [run] = history_rows(home)
    assert run["status"] == "failed" and run["error"]["kind"] == "worker_died" and "layer_done" in run["types"]


@pytest.mark.slow
def test_sigterm_to_the_worker_itself_stops_its_job_and_says_why(home, work):
    """R19: SIGTERM sent to the worker (a job scheduler ending it): the job stops, the client says so, exit 1."""
    import os

    proc = start("run", "slow.toml", "--backend", "local", home=home, cwd=work)
    wait_for_event(home, "layer_done", proc=proc)
    os.kill(worker_pid(home), signal.SIGTERM)
    done = finish(proc, timeout=60)
    assert done.code == 1
    one_error(done, "SIGTERM")
    [run] = history_rows(home)
    assert run["status"] in ("cancelled", "failed") and "layer_done" in run["types"]


@pytest.mark.slow
def test_two_runs_on_one_history_both_finish(home, work):
    """R20: two runs at once on one history: both finish and both are recorded with all their events."""
    procs = [start("run", "fast.toml", home=home, cwd=work) for _ in range(2)]
    results = [finish(p, timeout=180) for p in procs]
    assert [r.code for r in results] == [0, 0], [r.err for r in results]
    rows = history_rows(home)
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert all(r["types"][-1] == "run_finished" for r in rows)

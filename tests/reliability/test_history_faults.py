"""A damaged, locked or unwritable history never becomes a traceback, and never costs a run its events."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from reliability_support import finish, history_rows, one_error, start, workbench


def _make_history(home, runs: int = 3) -> None:
    from workbench.history import History

    with History(home / "history.sqlite") as h:
        for i in range(runs):
            h.create_run(f"run-{i}", {"name": f"r{i}"}, name=f"r{i}")
            for j in range(200):
                h.add_event(f"run-{i}", {"type": "log", "level": "info", "message": f"event {j} " + "x" * 200})
            h.finish_run(f"run-{i}", {"metrics": []})
        h.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _damaged_copies(home) -> list:
    return sorted(p for p in home.iterdir() if p.name.startswith("history.sqlite.damaged-"))


def test_a_file_that_is_not_a_database_is_moved_aside(home):
    """R21: history.sqlite holding garbage: `workbench history` says so, keeps the file aside, exit 0."""
    garbage = os.urandom(50_000)
    (home / "history.sqlite").write_bytes(garbage)
    done = workbench("history", home=home)
    assert done.code == 0, done.err
    assert "Traceback" not in done.err and "damaged" in done.err and ".recover" in done.err
    [aside] = _damaged_copies(home)
    assert aside.read_bytes() == garbage  # kept as it was
    assert history_rows(home) == []  # a new, empty history


def test_a_partly_overwritten_database_is_detected(home):
    """R22: a history whose pages are partly overwritten: detected on read, moved aside, no traceback."""
    _make_history(home)
    path = home / "history.sqlite"
    data = bytearray(path.read_bytes())
    assert len(data) > 40_000
    data[8192:40_000] = os.urandom(40_000 - 8192)  # b-tree pages, after the header page
    path.write_bytes(bytes(data))
    done = workbench("history", home=home)
    assert done.code == 0, done.err
    assert "Traceback" not in done.err and "damaged" in done.err
    assert len(_damaged_copies(home)) == 1


def test_show_on_a_damaged_database_is_one_clear_error(home):
    """R23: `workbench show RUN` on a damaged file: the warning, then 'no run' with exit 2, no traceback."""
    (home / "history.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    done = workbench("show", "run-0", home=home)
    assert done.code == 2
    assert "damaged" in done.err
    one_error(done, "no run")


@pytest.mark.slow
def test_a_run_on_a_damaged_history_runs_and_is_recorded_in_a_new_one(home, work):
    """R24: `workbench run` with a damaged history: warned, the run finishes, recorded in the new history."""
    (home / "history.sqlite").write_bytes(os.urandom(8192))
    done = workbench("run", "fast.toml", home=home, cwd=work)
    assert done.code == 0, done.err
    assert "damaged" in done.err
    [run] = history_rows(home)
    assert run["status"] == "finished"


def _hold_lock(home, seconds: float) -> subprocess.Popen:
    """Another process holding the history's write lock for ``seconds``."""
    code = (f"import sqlite3, sys, time\n"
            f"db = sqlite3.connect({str(home / 'history.sqlite')!r}, isolation_level=None)\n"
            f"db.execute('PRAGMA journal_mode=WAL'); db.execute('BEGIN EXCLUSIVE')\n"
            f"db.execute('CREATE TABLE IF NOT EXISTS lockholder (x)'); db.execute('INSERT INTO lockholder VALUES (1)')\n"
            f"print('locked', flush=True); time.sleep({seconds}); db.execute('COMMIT')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow
def test_a_lock_held_past_the_busy_timeout_is_waited_for(home, work):
    """R25: another process holds the write lock for 10 s as a run starts: it waits, says so, then records normally."""
    _make_history(home, runs=1)
    holder = _hold_lock(home, 10)
    done = workbench("run", "fast.toml", home=home, cwd=work, WORKBENCH_HISTORY_TIMEOUT="0.5")
    holder.wait()
    assert done.code == 0, done.err
    assert "waiting for the run history" in done.err and "Traceback" not in done.err
    assert not list((home / "runs").glob("*/history-journal*.jsonl"))  # it waited; nothing was journaled
    assert [r["status"] for r in history_rows(home)] == ["finished", "finished"]


@pytest.mark.slow
def test_a_history_locked_for_the_whole_run_costs_nothing(home, work):
    """R26: the lock outlasts the longest wait for the whole run: exit 0, the journal is named, merged later."""
    _make_history(home, runs=1)
    holder = _hold_lock(home, 600)
    try:
        done = workbench("run", "fast.toml", home=home, cwd=work, WORKBENCH_HISTORY_TIMEOUT="0.2",
                         WORKBENCH_HISTORY_MAX_WAIT="1")
    finally:
        holder.kill()
        holder.wait()
    assert done.code == 0, done.err
    assert "history-journal.jsonl" in done.err and "Traceback" not in done.err
    listing = workbench("history", home=home)
    assert listing.code == 0 and "merged the journal" in listing.err
    run = [r for r in history_rows(home) if r["id"] != "run-0"][0]
    assert run["status"] == "finished" and run["types"][0] == "run_started" and run["types"][-1] == "run_finished"


@pytest.mark.slow
def test_a_run_whose_history_is_locked_midway_keeps_going_and_is_merged(home, work):
    """R27: the history gets locked mid-run: the run finishes, its later events go to a journal, merged in order."""
    from workbench.history import History

    History(home / "history.sqlite").close()
    proc = start("run", "slow.toml", home=home, cwd=work, WORKBENCH_HISTORY_TIMEOUT="0.2",
                 WORKBENCH_HISTORY_MAX_WAIT="1")
    from reliability_support import wait_for_event

    wait_for_event(home, "layer_done", proc=proc)
    holder = _hold_lock(home, 5)
    done = finish(proc, timeout=180)
    holder.wait()
    assert done.code == 0, done.err
    assert "Traceback" not in done.err
    if history_rows(home)[0]["status"] != "finished":  # the lock outlived the run: the next command merges it
        assert "merged the journal" in workbench("history", home=home).err
    [run] = history_rows(home)
    assert run["status"] == "finished"
    assert run["types"][0] == "run_started" and run["types"][-1] == "run_finished"
    assert run["types"].count("layer_done") == 8  # every layer of the demo model, none lost


def test_a_journal_left_by_a_killed_run_is_merged_as_died(home):
    """R28: a journal whose writer was killed: the next `workbench history` merges it, the run 'died', events kept."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = home / "runs" / "run-x"
    folder.mkdir(parents=True)
    head = {"op": "create", "spec": {"name": "x"}, "name": "x", "model": "demo", "out_dir": None,
            "owner": {"host": socket.gethostname(), "pid": dead.pid, "start": None}, "created": time.time()}
    lines = [head] + [{"op": "event", "event": {"type": "log", "level": "info", "message": f"m{i}"}} for i in range(5)]
    (folder / "history-journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"op": "ev')
    done = workbench("history", home=home)
    assert done.code == 0, done.err
    [run] = history_rows(home)
    assert run["id"] == "run-x" and run["status"] == "died" and run["events"] == 5
    assert not (folder / "history-journal.jsonl").exists()


def test_an_unwritable_history_folder_is_one_clear_error(home, work):
    """R29: WORKBENCH_HOME is a file: exit 2 naming it, no traceback."""
    blocker = work / "not-a-folder"
    blocker.write_text("x")
    done = workbench("history", home=blocker)
    assert done.code == 2
    one_error(done, "history")

"""The reliability suite's tools: the real ``workbench`` command in a subprocess, and what it left behind.

Every case drives the installed command as a user would (its exit code, its
stderr, the signals it gets) and then reads the run history with plain
``sqlite3`` and the file system byte for byte, independently of the code under
test.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# A run of a few seconds on the demo model: 4 x 64 calibration tokens, magnitude 50%, 2 evaluation windows.
FAST = """name = "fast"
[model]
name = "demo"
[calibration]
source = "c4"
nsamples = 4
seqlen = 64
summary = false
[[steps]]
type = "prune"
method = "magnitude"
sparsity = 0.5
[evaluate]
perplexity = ["wikitext2"]
seqlen = 64
limit = 2
before = false
"""

# Long enough to be interrupted on purpose: SparseGPT over 16 x 128 tokens, then 40 evaluation windows.
SLOW = FAST.replace('method = "magnitude"', 'method = "sparsegpt"').replace("nsamples = 4", "nsamples = 16") \
    .replace("seqlen = 64\nsummary", "seqlen = 128\nsummary").replace("limit = 2", "limit = 40")


@dataclass
class Done:
    code: int
    out: str
    err: str
    seconds: float


def env_for(home: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update({"WORKBENCH_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "120"})
    env.pop("WORKBENCH_DEBUG", None)
    env.update(extra)
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench", *args]


def workbench(*args: str, home: Path, cwd: Path | None = None, timeout: float = 180, **env: str) -> Done:
    """Run ``workbench ARGS`` to its end."""
    t0 = time.monotonic()
    proc = subprocess.run(command(*args), cwd=cwd, env=env_for(home, **env), capture_output=True, text=True,
                          timeout=timeout)
    return Done(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def start(*args: str, home: Path, cwd: Path | None = None, **env: str) -> subprocess.Popen:
    """Start ``workbench ARGS`` in its own process group (signals are sent to it alone)."""
    return subprocess.Popen(command(*args), cwd=cwd, env=env_for(home, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> Done:
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=timeout)
    return Done(proc.returncode, out, err, time.monotonic() - t0)


def history_rows(home: Path) -> list[dict]:
    """Every run in the history: id, status, error kind, number of events (read directly with sqlite3)."""
    path = home / "history.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(str(path), timeout=30)
    try:
        rows = db.execute("SELECT id, status, error FROM runs ORDER BY created").fetchall()
        out = []
        for run_id, status, error in rows:
            n = db.execute("SELECT COUNT(*) FROM events WHERE run_id = ?", (run_id,)).fetchone()[0]
            types = [t for (t,) in db.execute("SELECT type FROM events WHERE run_id = ? ORDER BY seq", (run_id,))]
            out.append({"id": run_id, "status": status, "error": json.loads(error) if error else None,
                        "events": n, "types": types})
        return out
    finally:
        db.close()


def wait_for_event(home: Path, kind: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> dict:
    """Poll the history until some run has an event of type ``kind``; return that run's row."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for row in history_rows(home):
                if kind in row["types"]:
                    return row
        except sqlite3.Error:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before a {kind} event: {proc.stderr.read()}")
        time.sleep(0.1)
    raise AssertionError(f"no {kind} event within {timeout} s")


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` with its bytes (None for folders): compared byte for byte."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def user_files(folder: Path) -> dict:
    """A folder of the user's own files and subfolders; returns its snapshot."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes, not a model")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "corpus.jsonl").write_bytes(b'{"text": "mine"}\n' * 50)
    (folder / ".config").write_bytes(bytes(range(256)))
    return snapshot(folder)


def one_error(done: Done, *words: str) -> None:
    """One ``error:`` line with a hint, no traceback, every word present (case-insensitive)."""
    lines = done.err.splitlines()
    assert "Traceback" not in done.err, done.err
    assert sum(line.startswith("error: ") for line in lines) == 1, done.err
    assert any(line.strip().startswith("hint: ") for line in lines), done.err
    for word in words:
        assert word.lower() in done.err.lower(), (word, done.err)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def worker_pid(home: Path) -> int | None:
    """The pid of the worker a run used, from the 'worker ...: pid N on HOST' log event."""
    db = sqlite3.connect(str(home / "history.sqlite"), timeout=30)
    try:
        for (data,) in db.execute("SELECT data FROM events WHERE type = 'log'"):
            message = json.loads(data).get("message", "")
            if message.startswith("worker ") and ": pid " in message:
                return int(message.split(": pid ", 1)[1].split()[0])
    finally:
        db.close()
    return None


def send(proc: subprocess.Popen, sig: signal.Signals) -> None:
    os.kill(proc.pid, sig)

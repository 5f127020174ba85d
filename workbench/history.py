"""Run history in a SQLite database: runs, their specs, events, metrics, artifacts.

The database lives in ``workbench_home()/history.sqlite`` (``WORKBENCH_HOME``
overrides the user data folder). Every event a run emits is stored as it
arrives, so a run that fails or is killed keeps what it had computed. No torch.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .events import Event, json_safe

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,            -- running, finished, failed, cancelled
    model TEXT,
    spec TEXT NOT NULL,              -- JSON
    summary TEXT,                    -- JSON, when finished
    error TEXT,                      -- JSON {kind, message, hint}, when failed
    out_dir TEXT
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    dataset TEXT NOT NULL,
    phase TEXT NOT NULL,
    value REAL,
    seqlen INTEGER,
    windows INTEGER,
    limit_windows INTEGER,
    stderr REAL,
    extra TEXT                       -- JSON, e.g. {"bits_per_byte": ...}
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id);
"""


def workbench_home() -> Path:
    """Where workbench keeps its history, caches and run folders."""
    env = os.environ.get("WORKBENCH_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "workbench"


def cache_dir() -> Path:
    return workbench_home() / "cache"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass
class RunRecord:
    id: str
    name: str
    created: float
    finished: float | None
    status: str
    model: str | None
    spec: dict
    summary: dict | None
    error: dict | None
    out_dir: str | None


class History:
    """A connection to the run history. Safe to open from several processes (WAL)."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else workbench_home() / "history.sqlite"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"cannot open the run history at {self.path}: {exc}", "set WORKBENCH_HOME to a writable folder") from None
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; each event's commit skips an fsync (6x cheaper)
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._migrate()
        self._seq: dict[str, int] = {}

    def _migrate(self) -> None:
        """Add the columns later versions introduced to a history file written by an older one."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(metrics)")}
        for column, kind in (("stderr", "REAL"), ("extra", "TEXT")):
            if column not in have:
                self.db.execute(f"ALTER TABLE metrics ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------- writing
    def create_run(self, run_id: str, spec: dict, name: str = "", model: str = "", out_dir: str | None = None) -> None:
        self.db.execute(
            "INSERT INTO runs (id, name, created, status, model, spec, out_dir) VALUES (?, ?, ?, 'running', ?, ?, ?)",
            (run_id, name or spec.get("name", "run"), time.time(), model, json.dumps(spec), out_dir),
        )
        self._seq[run_id] = 0

    def add_event(self, run_id: str, event: Event | dict) -> None:
        data = event.to_dict() if isinstance(event, Event) else dict(event)
        seq = self._seq.get(run_id)
        if seq is None:
            row = self.db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM events WHERE run_id = ?", (run_id,)).fetchone()
            seq = row[0]
        self._seq[run_id] = seq + 1
        self.db.execute(
            "INSERT INTO events (run_id, seq, time, type, data) VALUES (?, ?, ?, ?, ?)",
            (run_id, seq, time.time(), data["type"], json.dumps(json_safe(data))),
        )
        if data["type"] == "metric":
            self.db.execute(
                "INSERT INTO metrics (run_id, name, dataset, phase, value, seqlen, windows, limit_windows, stderr, extra) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, data["name"], data["dataset"], data["phase"], data["value"], data.get("seqlen"), data.get("windows"),
                 data.get("limit"), data.get("stderr"), json.dumps(json_safe(data.get("extra") or {}))),
            )

    def attach_metrics(self, run_id: str, metrics: list[dict], note: str = "") -> None:
        """Store metrics measured later on a run's model with that run, as phase ``eval`` (like ``workbench eval RUN``)."""
        if note:
            self.add_event(run_id, {"type": "log", "level": "info", "message": note})
        for m in metrics:
            keys = ("name", "dataset", "value", "seqlen", "windows", "limit", "stderr", "extra")
            self.add_event(run_id, {"type": "metric", **{k: m.get(k) for k in keys}, "phase": "eval"})

    def add_artifact(self, run_id: str, kind: str, path: str) -> None:
        self.db.execute("INSERT INTO artifacts (run_id, kind, path) VALUES (?, ?, ?)", (run_id, kind, path))

    def finish_run(self, run_id: str, summary: dict) -> None:
        self.db.execute(
            "UPDATE runs SET status = 'finished', finished = ?, summary = ? WHERE id = ?",
            (time.time(), json.dumps(json_safe(summary)), run_id),
        )

    def fail_run(self, run_id: str, kind: str, message: str, hint: str | None = None) -> None:
        status = "cancelled" if kind == "cancelled" else "failed"
        self.db.execute(
            "UPDATE runs SET status = ?, finished = ?, error = ? WHERE id = ?",
            (status, time.time(), json.dumps({"kind": kind, "message": message, "hint": hint}), run_id),
        )

    def recorder(self, run_id: str):
        """An emit function that stores every event of one run."""

        def record(event: Event) -> None:
            self.add_event(run_id, event)

        return record

    # ------------------------------------------------------------- reading
    def _record(self, row) -> RunRecord:
        return RunRecord(
            id=row[0], name=row[1], created=row[2], finished=row[3], status=row[4], model=row[5],
            spec=json.loads(row[6]), summary=json.loads(row[7]) if row[7] else None,
            error=json.loads(row[8]) if row[8] else None, out_dir=row[9],
        )

    _COLUMNS = "id, name, created, finished, status, model, spec, summary, error, out_dir"

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        sql = f"SELECT {self._COLUMNS} FROM runs ORDER BY created DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [self._record(r) for r in self.db.execute(sql)]

    def finished_specs(self) -> list[tuple[str, dict]]:
        """(run id, spec) of every finished run, newest first: what a study looks up to reuse runs."""
        rows = self.db.execute("SELECT id, spec FROM runs WHERE status = 'finished' ORDER BY created DESC")
        return [(run_id, json.loads(spec)) for run_id, spec in rows]

    def get(self, run_id: str) -> RunRecord:
        """A run by id, or by a unique prefix of its id."""
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM runs WHERE id LIKE ? ORDER BY created DESC", (run_id + "%",)).fetchall()
        if not rows:
            raise UserError(f"no run '{run_id}' in the history ({self.path})", "list the runs with: workbench history")
        if len(rows) > 1 and rows[0][0] != run_id:
            raise UserError(f"'{run_id}' matches {len(rows)} runs", "give more characters of the run id")
        return self._record(rows[0])

    def events(self, run_id: str) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute("SELECT data FROM events WHERE run_id = ? ORDER BY seq", (run_id,))]

    def metrics(self, run_id: str) -> list[dict]:
        cols = ("name", "dataset", "phase", "value", "seqlen", "windows", "limit", "stderr", "extra")
        rows = self.db.execute(
            "SELECT name, dataset, phase, value, seqlen, windows, limit_windows, stderr, extra FROM metrics "
            "WHERE run_id = ? ORDER BY rowid", (run_id,)
        )
        out = []
        for r in rows:
            item = dict(zip(cols, r))
            item["extra"] = json.loads(item["extra"]) if item["extra"] else {}
            out.append(item)
        return out

    def artifacts(self, run_id: str) -> list[dict]:
        return [{"kind": k, "path": p} for k, p in self.db.execute("SELECT kind, path FROM artifacts WHERE run_id = ?", (run_id,))]

    def model_of(self, record: RunRecord) -> str | None:
        """The model a run leaves behind, for evaluations attached to it later (their metrics have phase "eval").

        Its exported folder when it saved one; for a run without compression
        steps, the model it loaded; None when the compressed model was not kept.
        """
        for artifact in self.artifacts(record.id):
            if artifact["kind"] == "model":
                return artifact["path"]
        if record.summary and record.summary.get("export"):
            return record.summary["export"]
        if not record.spec.get("steps"):
            return (record.spec.get("model") or {}).get("name")
        return None

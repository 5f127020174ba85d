"""Run history in a SQLite database: runs, their specs, events, metrics, artifacts.

The database lives in ``workbench_home()/history.sqlite`` (``WORKBENCH_HOME``
overrides the user data folder). Every event a run emits is stored as it
arrives, so a run that fails or is killed keeps what it had computed. No torch.

Nothing here is lost or becomes a traceback:

- Each running run records its owner (host, process id and start time) and a
  heartbeat. A run whose owner is gone without recording an end is marked
  ``died`` the next time the history is read; its events are kept.
- Another process holding the write lock is waited for, with backoff and a
  message through ``notify``, for up to ``WORKBENCH_HISTORY_MAX_WAIT`` seconds
  (default 600); then ``HistoryUnavailable`` says who to look for.
- A damaged database file (not a database, or partly overwritten) is moved
  aside to ``history.sqlite.damaged-TIMESTAMP`` and a new one is started, with
  a notice saying so and how to recover the old runs.
- A run being recorded (``open_run``) whose history writes fail keeps running:
  its records go to a journal in its run folder
  (``runs/RUN_ID/history-journal.jsonl``), merged into the history the next
  time it is opened.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import RunError, UserError
from .events import Event, json_safe

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,            -- running, finished, failed, cancelled, died
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

JOURNAL = "history-journal.jsonl"
HEARTBEAT_EVERY = 30.0  # seconds between heartbeats of a running run
DEAD_AFTER = 600.0  # a running run of another host whose heartbeat is older than this has died
ENDED = ("finished", "failed", "cancelled", "died")


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


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


# ------------------------------------------------------------------------ owners


def _process_start(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def this_process() -> dict:
    """The owner record of a run recorded by this process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def owner_alive(owner: dict, heartbeat: float | None, now: float | None = None) -> bool:
    """Whether the process that owns a running run is still there.

    On its own host: the process exists and started when the owner record says.
    On another host: its heartbeat is recent (``DEAD_AFTER``).
    """
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        pid = owner["pid"]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        except OSError:
            return False
        start = _process_start(pid)
        return owner.get("start") is None or start is None or start == owner["start"]
    if heartbeat is None:
        return True  # nothing to judge by
    return (now or time.time()) - heartbeat < DEAD_AFTER


# ------------------------------------------------------------------------ records


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
    owner: dict | None = None
    heartbeat: float | None = None


class HistoryUnavailable(RunError):
    """The history database cannot be used now (locked too long, or its folder cannot be written)."""

    kind = "history_unavailable"


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _is_damage(exc: sqlite3.Error) -> bool:
    """A damaged file, as opposed to a busy one or a bug in a statement."""
    if _is_busy(exc):
        return False
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and any(
        words in text for words in ("not a database", "malformed", "disk image", "file is encrypted", "corrupt"))


class History:
    """A connection to the run history. Safe to open from several processes (WAL).

    ``notify(message)`` hears about waits for a lock and about a damaged file
    moved aside (the headless CLI prints them); they are also kept in
    ``notices``.
    """

    def __init__(self, path: Path | str | None = None, notify: Callable[[str], None] | None = None):
        self.path = Path(path) if path is not None else workbench_home() / "history.sqlite"
        self.notify = notify
        self.notices: list[str] = []
        self.busy_timeout = _env_seconds("WORKBENCH_HISTORY_TIMEOUT", 5.0)
        self.max_wait = _env_seconds("WORKBENCH_HISTORY_MAX_WAIT", 600.0)
        self._seq: dict[str, int] = {}
        self._lock = threading.RLock()
        self.db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot open the run history at {self.path}: {exc.strerror or exc}",
                            "set WORKBENCH_HOME to a writable folder") from None
        self._open()
        self.merge_journals()

    # ------------------------------------------------------------- connection
    def _connect(self) -> None:
        try:
            self.db = sqlite3.connect(str(self.path), timeout=self.busy_timeout, isolation_level=None,
                                      check_same_thread=False)
        except sqlite3.Error as exc:
            raise UserError(f"cannot open the run history at {self.path}: {exc}", "set WORKBENCH_HOME to a writable folder") from None
        self.db.execute("PRAGMA foreign_keys=ON")

    def _open(self) -> None:
        """Connect, set up the schema; a damaged file is moved aside and a new one started."""
        self._connect()
        try:
            self._retry(self._setup)
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                self._close_db()
                raise UserError(f"cannot use the run history at {self.path}: {exc}",
                                "check the file and its folder; set WORKBENCH_HOME to use another") from None
            self._quarantine(str(exc))

    def _setup(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; each event's commit skips an fsync (6x cheaper)
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns later versions introduced to a history file written by an older one."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(metrics)")}
        for column, kind in (("stderr", "REAL"), ("extra", "TEXT")):
            if column not in have:
                self.db.execute(f"ALTER TABLE metrics ADD COLUMN {column} {kind}")
        have = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        for column, kind in (("owner", "TEXT"), ("heartbeat", "REAL")):
            if column not in have:
                self.db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

    def _close_db(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None

    def _say(self, message: str) -> None:
        self.notices.append(message)
        if self.notify is not None:
            self.notify(message)

    def _quarantine(self, reason: str) -> Path:
        """Move a damaged database (and its WAL files) aside and start a new one; say so."""
        self._close_db()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):
            extra = self.path.with_name(self.path.name + suffix)
            if extra.exists():
                os.replace(extra, aside.with_name(aside.name + suffix))
        self._seq.clear()
        self._say(f"the run history {self.path} was damaged ({reason}); it was moved to {aside} and a new one started. "
                  f"To recover the runs it held: sqlite3 {aside} .recover | sqlite3 {self.path}.recovered")
        self._connect()
        try:
            self._retry(self._setup)
        except sqlite3.Error as exc:
            self._close_db()
            raise UserError(f"cannot start a new run history at {self.path}: {exc}",
                            "set WORKBENCH_HOME to a writable folder") from None
        return aside

    def _retry(self, op: Callable):
        """Run ``op`` waiting out another process's lock with backoff (``notify`` hears it once)."""
        waited, delay, said = 0.0, 0.25, False
        t0 = time.monotonic()
        while True:
            try:
                return op()
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise
                waited = time.monotonic() - t0
                if waited >= self.max_wait:
                    raise HistoryUnavailable(
                        f"the run history {self.path} stayed locked by another process for {waited:.0f} s",
                        f"find the process holding it (fuser {self.path}) or wait for it to finish; the run's own "
                        f"records are kept in a journal and merged later") from None
                if not said:
                    said = True
                    self._say(f"waiting for the run history {self.path}: another process is writing to it")
                time.sleep(min(delay, max(0.0, self.max_wait - waited)))
                delay = min(delay * 2, 5.0)

    def _run(self, op: Callable):
        """``op()`` under the lock, waiting out locks; a damaged file is moved aside and ``op`` tried once more."""
        with self._lock:
            if self.db is None:
                raise HistoryUnavailable(f"the run history {self.path} is closed", "open it again")
            try:
                return self._retry(op)
            except sqlite3.DatabaseError as exc:
                if not _is_damage(exc) and not self._damaged():
                    raise
                self._quarantine(str(exc))
                return self._retry(op)

    def _damaged(self) -> bool:
        try:
            row = self.db.execute("PRAGMA quick_check(1)").fetchone()
        except sqlite3.DatabaseError:
            return True
        return not row or row[0] != "ok"

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._run(lambda: self.db.execute(sql, params).fetchall())

    def _write(self, sql: str, params: tuple = ()) -> None:
        self._run(lambda: self.db.execute(sql, params))

    def close(self) -> None:
        with self._lock:
            self._close_db()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------- writing
    def create_run(self, run_id: str, spec: dict, name: str = "", model: str = "", out_dir: str | None = None,
                   owner: dict | None = None, created: float | None = None) -> None:
        now = time.time()
        self._write(
            "INSERT INTO runs (id, name, created, status, model, spec, out_dir, owner, heartbeat) "
            "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
            (run_id, name or spec.get("name", "run"), created or now, model, json.dumps(spec), out_dir,
             json.dumps(owner or this_process()), now),
        )
        self._seq[run_id] = 0

    def heartbeat(self, run_id: str) -> None:
        """Say that the process recording ``run_id`` is still there."""
        self._write("UPDATE runs SET heartbeat = ? WHERE id = ? AND status = 'running'", (time.time(), run_id))

    def add_event(self, run_id: str, event: Event | dict) -> None:
        data = event.to_dict() if isinstance(event, Event) else dict(event)
        self._run(lambda: self._insert_event(run_id, data))

    def _insert_event(self, run_id: str, data: dict) -> None:
        seq = self._seq.get(run_id)
        if seq is None:
            row = self.db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM events WHERE run_id = ?", (run_id,)).fetchone()
            seq = row[0]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT INTO events (run_id, seq, time, type, data) VALUES (?, ?, ?, ?, ?)",
                (run_id, seq, data.get("time") or time.time(), data["type"], json.dumps(json_safe(data))),
            )
            if data["type"] == "metric":
                self.db.execute(
                    "INSERT INTO metrics (run_id, name, dataset, phase, value, seqlen, windows, limit_windows, stderr, extra) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, data["name"], data["dataset"], data["phase"], data["value"], data.get("seqlen"),
                     data.get("windows"), data.get("limit"), data.get("stderr"), json.dumps(json_safe(data.get("extra") or {}))),
                )
            self.db.execute("COMMIT")
        except BaseException:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._seq.pop(run_id, None)  # re-read from the database next time
            raise
        self._seq[run_id] = seq + 1

    def attach_metrics(self, run_id: str, metrics: list[dict], note: str = "") -> None:
        """Store metrics measured later on a run's model with that run, as phase ``eval`` (like ``workbench eval RUN``)."""
        if note:
            self.add_event(run_id, {"type": "log", "level": "info", "message": note})
        for m in metrics:
            keys = ("name", "dataset", "value", "seqlen", "windows", "limit", "stderr", "extra")
            self.add_event(run_id, {"type": "metric", **{k: m.get(k) for k in keys}, "phase": "eval"})

    def add_artifact(self, run_id: str, kind: str, path: str) -> None:
        self._write("INSERT INTO artifacts (run_id, kind, path) VALUES (?, ?, ?)", (run_id, kind, path))

    def finish_run(self, run_id: str, summary: dict, when: float | None = None) -> None:
        self._write(
            "UPDATE runs SET status = 'finished', finished = ?, summary = ? WHERE id = ?",
            (when or time.time(), json.dumps(json_safe(summary)), run_id),
        )

    def fail_run(self, run_id: str, kind: str, message: str, hint: str | None = None, when: float | None = None) -> None:
        status = {"cancelled": "cancelled", "died": "died"}.get(kind, "failed")
        self._write(
            "UPDATE runs SET status = ?, finished = ?, error = ? WHERE id = ?",
            (status, when or time.time(), json.dumps({"kind": kind, "message": message, "hint": hint}), run_id),
        )

    def recorder(self, run_id: str):
        """An emit function that stores every event of one run."""

        def record(event: Event) -> None:
            self.add_event(run_id, event)

        return record

    def open_run(self, run_id: str, spec: dict, name: str = "", model: str = "", out_dir: str | None = None) -> "RunLog":
        """Create a run and return what records it, falling back to a journal when the database fails."""
        log = RunLog(self, run_id, {"op": "create", "spec": spec, "name": name or spec.get("name", "run"),
                                    "model": model, "out_dir": out_dir, "owner": this_process(), "created": time.time()})
        log.create()
        return log

    def attach_to(self, run_id: str) -> "RunLog":
        """What records events added to an existing run (an evaluation of its model), journal fallback included."""
        return RunLog(self, run_id, {"op": "attach", "owner": this_process(), "created": time.time()})

    # ------------------------------------------------------------- dead runs and journals
    def reap(self) -> list[str]:
        """Mark running runs whose owning process is gone as ``died`` (their events are kept); return their ids.

        Best effort: when the history cannot be written now (another process
        holds it too long), the ids are still returned and readers show them
        as died; the next reader records it.
        """
        rows = self._query("SELECT id, owner, heartbeat FROM runs WHERE status = 'running'")
        now, dead = time.time(), []
        for run_id, owner_text, heartbeat in rows:
            try:
                owner = json.loads(owner_text) if owner_text else None
            except ValueError:
                owner = None
            if not isinstance(owner, dict) or owner_alive(owner, heartbeat, now):
                continue
            if self._journal_path(run_id).is_file():
                continue  # its journal holds the rest; merge_journals decides
            try:
                self._write("UPDATE runs SET status = 'died', finished = ?, error = ? WHERE id = ? AND status = 'running'",
                            (heartbeat or now, json.dumps(self._died(owner)), run_id))
            except HistoryUnavailable:
                pass
            dead.append(run_id)
        return dead

    @staticmethod
    def _died(owner: dict) -> dict:
        where = f"pid {owner.get('pid')} on {owner.get('host')}"
        return {"kind": "died", "message": f"the process that ran it ({where}) ended without recording an end "
                                           "(killed, or its machine went down)",
                "hint": "its events up to then are kept; run it again to get a result"}

    def _reaped(self, records: list[RunRecord]) -> list[RunRecord]:
        dead = set(self.reap())
        for r in records:
            if r.id in dead and r.status == "running":  # not recorded yet (the history is busy): shown all the same
                r.status, r.error = "died", self._died(r.owner or {})
        return records

    def _journal_path(self, run_id: str) -> Path:
        return self.path.parent / "runs" / run_id / JOURNAL

    def merge_journals(self) -> list[str]:
        """Merge the journals of runs whose history writes failed (their writer gone or done); return their ids."""
        runs = self.path.parent / "runs"
        try:
            journals = sorted(runs.glob(f"*/{JOURNAL}"))
        except OSError:
            return []
        merged = []
        for path in journals:
            try:
                if self._merge_journal(path):
                    merged.append(path.parent.name)
            except (OSError, ValueError, sqlite3.Error, RunError, UserError):
                continue  # tried again next time
        return merged

    def _merge_journal(self, path: Path) -> bool:
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
        if not records or records[0].get("op") not in ("create", "attach"):
            return False
        head, run_id = records[0], path.parent.name
        attached = head["op"] == "attach"
        ended = attached or any(r.get("op") in ("finish", "fail") for r in records)
        if owner_alive(head.get("owner") or {}, records[-1].get("time")) and not any(
                r.get("op") in ("finish", "fail", "closed") for r in records):
            return False  # still being written
        row = self._query("SELECT status FROM runs WHERE id = ?", (run_id,))
        if attached and not row:
            return False  # the run it belongs to is not in this history
        if not row:
            self.create_run(run_id, head["spec"], head.get("name", ""), head.get("model", ""), head.get("out_dir"),
                            owner=head.get("owner"), created=head.get("created"))
        have = {r[0] for r in self._query("SELECT data FROM events WHERE run_id = ?", (run_id,))}
        for record in records[1:]:
            op = record.get("op")
            if op == "event" and json.dumps(json_safe(record["event"])) not in have:
                self.add_event(run_id, record["event"])
            elif op == "artifact":
                self.add_artifact(run_id, record["kind"], record["path"])
            elif op == "finish":
                self.finish_run(run_id, record["summary"], when=record.get("time"))
            elif op == "fail":
                self.fail_run(run_id, record["kind"], record["message"], record.get("hint"), when=record.get("time"))
        if not ended:
            self.fail_run(run_id, "died", "the process that ran it ended without recording an end",
                          "its events up to then are kept (they were journaled while the history could not be written)")
        os.replace(path, path.with_name("history-journal.merged.jsonl"))
        self._say(f"merged the journal of run {run_id} into the run history")
        return True

    # ------------------------------------------------------------- reading
    _COLUMNS = "id, name, created, finished, status, model, spec, summary, error, out_dir, owner, heartbeat"

    def _record(self, row) -> RunRecord:
        def load(text):
            try:
                return json.loads(text) if text else None
            except ValueError:
                return None

        return RunRecord(
            id=row[0], name=row[1], created=row[2], finished=row[3], status=row[4], model=row[5],
            spec=load(row[6]) or {}, summary=load(row[7]), error=load(row[8]), out_dir=row[9],
            owner=load(row[10]), heartbeat=row[11],
        )

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        sql = f"SELECT {self._COLUMNS} FROM runs ORDER BY created DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self._reaped([self._record(r) for r in self._query(sql)])

    def finished_specs(self) -> list[tuple[str, dict]]:
        """(run id, spec) of every finished run, newest first: what a study looks up to reuse runs."""
        rows = self._query("SELECT id, spec FROM runs WHERE status = 'finished' ORDER BY created DESC")
        return [(run_id, json.loads(spec)) for run_id, spec in rows]

    def get(self, run_id: str) -> RunRecord:
        """A run by id, or by a unique prefix of its id."""
        rows = self._query(f"SELECT {self._COLUMNS} FROM runs WHERE id LIKE ? ORDER BY created DESC", (run_id + "%",))
        if not rows:
            raise UserError(f"no run '{run_id}' in the history ({self.path})", "list the runs with: workbench history")
        if len(rows) > 1 and rows[0][0] != run_id:
            raise UserError(f"'{run_id}' matches {len(rows)} runs", "give more characters of the run id")
        return self._reaped([self._record(rows[0])])[0]

    def events(self, run_id: str) -> list[dict]:
        return [json.loads(r[0]) for r in self._query("SELECT data FROM events WHERE run_id = ? ORDER BY seq", (run_id,))]

    def metrics(self, run_id: str) -> list[dict]:
        cols = ("name", "dataset", "phase", "value", "seqlen", "windows", "limit", "stderr", "extra")
        rows = self._query(
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
        return [{"kind": k, "path": p} for k, p in self._query("SELECT kind, path FROM artifacts WHERE run_id = ?", (run_id,))]

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


class RunLog:
    """Records one run in the history; when the database cannot be written, in a journal beside the run folder.

    The run keeps going either way: a history that is locked for too long,
    damaged under a running run, or on a full disk costs nothing already
    computed. ``journal`` is the journal's path once it is used; the next
    ``History`` opened merges it back. A daemon thread records a heartbeat
    every ``HEARTBEAT_EVERY`` seconds until the run ends.
    """

    def __init__(self, history: History, run_id: str, head: dict):
        self.history, self.run_id, self.head = history, run_id, head
        self.journal: Path | None = None
        self.problem: str | None = None
        self._ended = threading.Event()
        self._beats: threading.Thread | None = None

    def _beat_loop(self) -> None:
        while not self._ended.wait(HEARTBEAT_EVERY):
            self.beat()

    def _fallback(self, exc: Exception) -> None:
        self.problem = str(getattr(exc, "message", None) or exc)
        self.journal = self.history._journal_path(self.run_id)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        if not self.journal.exists():
            self._append(dict(self.head))

    def _append(self, record: dict) -> None:
        record.setdefault("time", time.time())
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _do(self, op: Callable[[], None], record: dict | None) -> None:
        if self.journal is None:
            try:
                op()
                return
            except (sqlite3.Error, RunError, UserError) as exc:
                self._fallback(exc)
        if record is not None:
            self._append(record)

    def create(self) -> None:
        h = self.head
        self._do(lambda: self.history.create_run(self.run_id, h["spec"], h["name"], h["model"], h["out_dir"],
                                                 owner=h["owner"], created=h["created"]), None)
        # long layers emit nothing for minutes: the heartbeat keeps the run alive for readers on other hosts
        self._beats = threading.Thread(target=self._beat_loop, name=f"heartbeat-{self.run_id}", daemon=True)
        self._beats.start()

    def __call__(self, event: Event | dict) -> None:
        data = event.to_dict() if isinstance(event, Event) else dict(event)
        self._do(lambda: self.history.add_event(self.run_id, data), {"op": "event", "event": data})

    def beat(self) -> None:
        if self.journal is None and not self._ended.is_set():
            try:
                self.history.heartbeat(self.run_id)
            except (sqlite3.Error, RunError, UserError):
                pass

    def artifact(self, kind: str, path: str) -> None:
        self._do(lambda: self.history.add_artifact(self.run_id, kind, path), {"op": "artifact", "kind": kind, "path": path})

    def finish(self, summary: dict) -> None:
        self._ended.set()
        self._do(lambda: self.history.finish_run(self.run_id, summary), {"op": "finish", "summary": summary})

    def fail(self, kind: str, message: str, hint: str | None = None) -> None:
        self._ended.set()
        self._do(lambda: self.history.fail_run(self.run_id, kind, message, hint),
                 {"op": "fail", "kind": kind, "message": message, "hint": hint})

    def close(self) -> None:
        """Say that nothing more will be recorded (an attached evaluation that ended): its journal may be merged."""
        self._ended.set()
        if self.journal is not None:
            self._append({"op": "closed"})


__all__ = ["History", "HistoryUnavailable", "RunLog", "RunRecord", "workbench_home", "cache_dir", "new_run_id",
           "this_process", "owner_alive", "ENDED"]

"""The client side of the worker protocol: start workers, send them jobs, receive their events.

No torch here: the TUI and headless runs use this module and the engine runs
in the worker processes.

- ``WorkerClient``: one worker process (asyncio). ``start()`` spawns it and
  waits for its hello; ``submit(kind, ...)`` queues a job and returns its id;
  ``events(job)`` yields the job's updates up to its result or error;
  ``events()`` yields every update of the worker; ``cancel(job)``; ``close()``.
  It drains the worker's stderr into a log file, pings an idle worker and
  kills a hung one, kills a worker whose job ignores ``cancel`` past a grace
  period, notices a worker that dies at once (end of its stdout), fails the
  job it was running with the exit status and the last lines of its stderr,
  and starts a fresh worker for the jobs still waiting.
- ``WorkerPool``: several workers (one per GPU group) behind one event stream.
- ``BlockingClient``: the same for synchronous code (the headless CLI), with
  the event loop on a background thread.

Everything that happens arrives as an ``Update`` (see its docstring).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import re
import shlex
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from workbench.errors import Cancelled, RunError, UserError, WorkbenchError
from workbench.events import Emit, Event, RunFailed, event_from_dict
from workbench.history import History, workbench_home

from .protocol import JOB_KINDS, WORKER_TYPES, ProtocolError, Sequencer, VersionMismatch, decode, encode
from .transports import LocalTransport, Transport, parse_gpus


@dataclass
class Update:
    """Something that happened on a worker.

    ``kind`` is one of:

    - ``hello``: a worker is ready (``data``: its hello: versions, devices,
      pid, host); sent again after a restart;
    - ``accepted`` / ``started``: the worker queued / began ``job``;
    - ``event``: an engine event of ``job`` (``event``);
    - ``result``: ``job`` finished (``data["result"]``);
    - ``error``: ``job`` failed, was cancelled, or its worker died
      (``data``: kind, message, hint, and traceback or the worker's last
      stderr lines);
    - ``died``: the worker ended unexpectedly (``data``: returncode, reason,
      stderr, jobs); ``hung``: it stopped answering pings and is killed;
    - ``memory``: a pong carried the worker's devices with their memory
      now (``data["devices"]``, the shape of hello's ``devices``); the
      client's ``devices`` holds the latest;
    - ``stderr``: one line of the worker's stderr (``data["line"]``);
    - ``protocol``: a line was malformed or not understood and was skipped.

    ``seq`` and ``sent`` are the worker's message number and its wall-clock
    time when it wrote the message (0 for updates the client makes itself).
    """

    worker: str
    kind: str
    job: str | None = None
    event: Event | None = None
    data: dict = field(default_factory=dict)
    seq: int = 0
    sent: float = 0.0

    @property
    def terminal(self) -> bool:
        """The last update of its job."""
        return self.job is not None and self.kind in ("result", "error")


def worker_error(data: dict) -> WorkbenchError:
    """The exception for a job's ``error`` update: UserError for bad input, Cancelled, else RunError.

    ``kind`` is the worker's error kind (e.g. ``out_of_memory``,
    ``worker_died``); ``details`` holds the traceback or the worker's last
    stderr lines, for the run history.
    """
    kind = data.get("kind") or "run_failed"
    cls = {"bad_input": UserError, "cancelled": Cancelled}.get(kind, RunError)
    exc = cls(data.get("message") or "the worker reported an error", data.get("hint"))
    exc.kind = kind
    exc.details = data.get("traceback") or "\n".join(data.get("stderr") or []) or None
    return exc


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "ended"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


async def _exit_of(proc: asyncio.subprocess.Process, every: float = 0.05) -> int:
    """The process's exit status as soon as it exits (``proc.wait()`` also waits for its pipes to close)."""
    while proc.returncode is None:
        await asyncio.sleep(every)
    return proc.returncode


class Hub:
    """Hands every update to each reader of ``events()``; shared by the workers of a pool."""

    def __init__(self):
        self._queues: list[asyncio.Queue] = []

    def publish(self, update: Update) -> None:
        for q in self._queues:
            q.put_nowait(update)

    def close(self) -> None:
        for q in self._queues:
            q.put_nowait(None)

    async def events(self) -> AsyncIterator[Update]:
        """Updates from the moment iteration begins (not the call) until the client closes."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues.append(q)
        try:
            while (update := await q.get()) is not None:
                yield update
        finally:
            self._queues.remove(q)


@dataclass
class _Job:
    id: str
    kind: str
    payload: dict
    done: asyncio.Future
    state: str = "sent"  # sent, accepted, running, done
    generation: int = -1  # the worker generation it was last sent to
    outcome: Update | None = None
    backlog: list | None = None  # updates kept until events(job) reads them
    queues: list = field(default_factory=list)
    cancel_requested: bool = False


class WorkerClient:
    """One worker process and its jobs (see the module docstring).

    ``heartbeat``: seconds between pings of an idle worker; ``hung_after``:
    seconds without a pong before it is declared hung and replaced;
    ``cancel_grace``: seconds a cancelled running job gets before the
    worker's process group is killed; ``restart``: start a fresh worker after
    one dies; ``log_path``: where its stderr goes (default: the ``logs``
    folder of the workbench home); ``on_update``: called with every update;
    ``history``: a ``workbench.history.History`` (used from the event loop's
    thread) in which every job submitted with a ``run_id`` is recorded as a
    run: its events as they arrive, then its summary, or its error (a dead
    worker's included) with the events so far kept.

    ``devices`` is the worker's latest report of its devices and their free
    memory: the hello's, replaced by each pong that carries one (``ping()``
    while a job runs to refresh it; each also publishes a ``memory`` update).
    """

    def __init__(self, transport: Transport, *, name: str | None = None, hub: Hub | None = None,
                 on_update: Callable[[Update], None] | None = None, heartbeat: float = 5.0, hung_after: float = 30.0,
                 cancel_grace: float = 10.0, start_timeout: float = 120.0, restart: bool = True,
                 log_path: Path | str | None = None, stderr_lines: int = 40, history: History | None = None):
        self.transport = transport
        self.name = name or transport.describe()
        self.hub = hub or Hub()
        self._own_hub = hub is None
        self.on_update = on_update
        self.history = history
        self.heartbeat, self.hung_after, self.cancel_grace = heartbeat, hung_after, cancel_grace
        self.start_timeout, self.restart = start_timeout, restart
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-")
        self.log_path = Path(log_path) if log_path else workbench_home() / "logs" / f"worker-{slug}.log"
        self.hello: dict | None = None
        self.devices: list[dict] = []
        self.stderr_tail: deque[str] = deque(maxlen=stderr_lines)
        self._jobs: dict[str, _Job] = {}
        self._logs: dict[str, Any] = {}  # run id -> the history's RunLog of a job recorded as a run
        self._proc: asyncio.subprocess.Process | None = None
        self._generation = 0
        self._alive = False  # the current process said hello and has not ended
        self._closing = False
        self._dead = False  # ended and not restarted
        self._kill_reason: str | None = None
        self._hello_waiter: asyncio.Future | None = None
        self._pings: dict[int, asyncio.Future] = {}
        self._seq = Sequencer()
        self._tasks: set[asyncio.Task] = set()
        self._reader: asyncio.Task | None = None
        self._stderr: asyncio.Task | None = None
        self._log = None

    # ------------------------------------------------------------------ public
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> str | None:
        """The id of the job the worker is computing now."""
        return next((j.id for j in self._jobs.values() if j.state == "running"), None)

    @property
    def pending(self) -> int:
        """Jobs sent to this worker and not finished."""
        return sum(j.outcome is None for j in self._jobs.values())

    async def start(self) -> dict:
        """Start the worker and wait for its hello; UserError when it cannot start."""
        self._closing = self._dead = False
        await self._spawn()
        self._spawn_task(self._heartbeat())
        return self.hello

    async def submit(self, kind: str, *, follow: bool = True, **payload: Any) -> str:
        """Queue a job (``run``/``evaluate``: ``spec=``, ``run_id=``; ``inspect``: ``model=``); returns its id.

        With ``follow`` the job's updates are kept until ``events(job)`` reads
        them, so none is missed however late it starts reading; turn it off
        when only the pool-wide ``events()`` is read.
        """
        if kind not in JOB_KINDS:
            raise UserError(f"unknown job kind {kind!r}", f"use one of: {', '.join(JOB_KINDS)}")
        if self._closing or self._dead:
            raise RunError(f"the worker ({self.name}) is not running", "start it again with start()")
        job = _Job(id=uuid.uuid4().hex[:12], kind=kind, payload=payload, done=asyncio.get_running_loop().create_future(),
                   backlog=[] if follow else None)
        self._jobs[job.id] = job
        if self.history is not None and payload.get("run_id"):
            spec = payload.get("spec") or {"model": payload.get("model") or {}}
            self._logs[payload["run_id"]] = self.history.open_run(
                payload["run_id"], spec, name=spec.get("name") or kind, model=(spec.get("model") or {}).get("name", "demo"))
        if self._alive:  # else the restart in progress sends it
            await self._send_job(job)
        return job.id

    async def cancel(self, job_id: str) -> None:
        """Ask the worker to stop ``job_id`` at its next layer boundary; kill it after ``cancel_grace``."""
        job = self._job(job_id)
        if job.outcome is not None or job.cancel_requested:
            return
        job.cancel_requested = True
        await self._send("cancel", job.id)
        self._spawn_task(self._enforce_cancel(job, self._generation))

    async def wait(self, job_id: str) -> Update:
        """The job's last update (``result`` or ``error``)."""
        return await asyncio.shield(self._job(job_id).done)

    async def events(self, job_id: str | None = None) -> AsyncIterator[Update]:
        """The updates of one job up to its last, or (no job) every update until close."""
        if job_id is None:
            async for update in self.hub.events():
                yield update
            return
        job = self._job(job_id)
        q: asyncio.Queue = asyncio.Queue()
        for update in job.backlog if job.backlog is not None else ([job.outcome] if job.outcome else []):
            q.put_nowait(update)
        job.backlog = None
        job.queues.append(q)
        try:
            while True:
                update = await q.get()
                yield update
                if update.terminal:
                    return
        finally:
            job.queues.remove(q)

    async def ping(self, timeout: float = 10.0) -> float:
        """Round-trip seconds of a ping; TimeoutError when no pong comes back in time."""
        message = self._seq.make("ping")
        waiter = asyncio.get_running_loop().create_future()
        self._pings[message.seq] = waiter
        t0 = time.perf_counter()
        try:
            await self._write(message)
            await asyncio.wait_for(waiter, timeout)
        finally:
            self._pings.pop(message.seq, None)
        return time.perf_counter() - t0

    def kill(self, reason: str = "killed", group: bool = False) -> None:
        """Kill the worker's process group now; its running job fails and a fresh worker starts.

        ``group``: also when the worker itself has exited (what it left running in its group).
        """
        if self._proc is not None and (self._proc.returncode is None or group):
            self._kill_reason = self._kill_reason or reason
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def close(self, timeout: float = 10.0) -> None:
        """Shut the worker down (its jobs are cancelled), killing it if it does not leave in ``timeout``."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            await self._send("shutdown")
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                self.kill("closed")
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._stderr is not None and not self._stderr.done():
            self._stderr.cancel()  # e.g. an ssh child still holding the pipe; the log closes now
            await asyncio.gather(self._stderr, return_exceptions=True)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_hub:
            self.hub.close()

    # ------------------------------------------------------------------ process
    async def _spawn(self) -> None:
        self._generation += 1
        self._alive = False
        self.stderr_tail.clear()
        self._hello_waiter = asyncio.get_running_loop().create_future()
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        argv = self.transport.argv()
        self._log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shlex.join(argv)}\n".encode())
        self._log.flush()
        try:
            proc = await self.transport.spawn()
        except OSError as exc:
            raise UserError(f"cannot start the worker ({self.name}): {exc}", self.transport.start_hint()) from None
        self._proc = proc
        self._stderr = asyncio.create_task(self._drain_stderr(proc))
        self._reader = asyncio.create_task(self._read(proc, self._generation))
        self._spawn_task(self._watch(proc))
        # the process's exit is watched beside its stdout: a child it left behind can hold the pipe open
        exited = asyncio.ensure_future(_exit_of(proc))
        try:
            await asyncio.wait({self._hello_waiter, exited}, timeout=self.start_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not self._hello_waiter.done():
            if proc.returncode is not None:  # it ended before its hello
                await asyncio.sleep(0.2)  # the last stderr lines
                last = next((line for line in reversed(self.stderr_tail) if line.strip()), "")
                self.kill("ended before hello", group=True)  # whatever it left running in its process group
                self._start_failed(f"the worker ({self.name}) {describe_exit(proc.returncode)} before it was ready"
                                   + (f": {last}" if last else ""))
            else:
                self._hello_waiter.cancel()
                self.kill("no hello")
                raise UserError(f"the worker ({self.name}) did not say hello within {self.start_timeout:g} s",
                                f"{self.transport.start_hint()}; a slow machine may need a longer --hello-timeout "
                                f"(or hello_timeout in the [backend] settings)") from None
        self.hello = self._hello_waiter.result()  # raises what _start_failed set
        self._publish(Update(self.name, "hello", data=self.hello))

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """When the worker process has exited but its pipes stay open (a child it left holds them), kill its group.

        The reader then sees the end of the worker's output and reports the
        death at once, instead of waiting for a child that may never end.
        """
        await _exit_of(proc, every=0.5)
        await asyncio.sleep(1.0)  # normally the reader has seen the end of stdout by now
        if self._proc is proc and not self._reader.done():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _start_failed(self, message: str, hint: str | None = None) -> None:
        if self._hello_waiter is not None and not self._hello_waiter.done():
            self._hello_waiter.set_exception(UserError(message, hint or self.transport.start_hint()))

    async def _read(self, proc: asyncio.subprocess.Process, generation: int) -> None:
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # longer than the line limit: the reader skipped it
                self._publish(Update(self.name, "protocol", data={"message": "a line longer than the limit was skipped"}))
                continue
            if not line:
                break
            if not line.strip():
                continue
            try:
                message = decode(line, other="worker")
            except VersionMismatch as exc:
                hint = exc.hint(here="this machine", there=f"the worker's machine ({self.name})")
                if self._hello_waiter is not None and not self._hello_waiter.done():
                    self._start_failed(str(exc), hint)
                    self.kill("version")
                else:
                    self._publish(Update(self.name, "protocol", data={"message": str(exc), "hint": hint}))
                continue
            except ProtocolError as exc:
                self._publish(Update(self.name, "protocol", data={"message": str(exc)}))
                continue
            try:
                self._dispatch(message)
            except Exception as exc:  # noqa: BLE001 - a message this client cannot handle is skipped, never fatal
                self._publish(Update(self.name, "protocol", message.job,
                                     data={"message": f"a {message.type} message could not be handled and was skipped: "
                                                      f"{type(exc).__name__}: {exc}"}))
        await self._ended(proc, generation)

    def _dispatch(self, message) -> None:
        kind, job = message.type, self._jobs.get(message.job or "")
        if kind not in WORKER_TYPES:
            self._publish(Update(self.name, "protocol", message.job, data={"message": f"a worker does not send {kind!r} messages"}))
        elif kind == "hello":
            if self._hello_waiter is not None and not self._hello_waiter.done():
                self.hello, self._alive = message.data, True
                self.devices = list(message.data.get("devices") or [])
                self._hello_waiter.set_result(message.data)
        elif kind == "pong":
            waiter = self._pings.get(message["reply_to"])
            if waiter is not None and not waiter.done():
                waiter.set_result(message.data)
            devices = message.get("devices")
            if isinstance(devices, list):  # an older worker's pong has none
                self.devices = devices
                self._publish(Update(self.name, "memory", data={"devices": devices}, seq=message.seq, sent=message.t))
        elif kind == "bye":
            pass
        elif job is None or job.outcome is not None:
            if kind == "error" and self._hello_waiter is not None and not self._hello_waiter.done():
                self._start_failed(f"the worker ({self.name}) could not start: {message['message']}", message.get("hint"))
            elif kind == "error" and message["kind"] != "unknown_job":  # unknown_job: a cancel that crossed a result
                self._publish(Update(self.name, "protocol", message.job, data=message.data, seq=message.seq, sent=message.t))
        elif kind == "event":
            try:
                event = event_from_dict(message["event"])
            except (KeyError, TypeError, ValueError) as exc:
                self._publish(Update(self.name, "protocol", job.id, data={"message": f"unknown or malformed event skipped: {exc}",
                                                                         "event": message["event"]}))
                return
            self._publish(Update(self.name, "event", job.id, event=event, seq=message.seq, sent=message.t), job)
        elif kind in ("accepted", "started"):
            job.state = "accepted" if kind == "accepted" else "running"
            self._publish(Update(self.name, kind, job.id, data=message.data, seq=message.seq, sent=message.t), job)
        elif kind in ("result", "error"):
            self._finish(job, Update(self.name, kind, job.id, data=message.data, seq=message.seq, sent=message.t))

    async def _ended(self, proc: asyncio.subprocess.Process, generation: int) -> None:
        """The worker's stdout closed: it exited or died. Fail its running job, restart for the rest."""
        returncode = await proc.wait()
        if self._stderr is not None:
            await asyncio.wait({self._stderr}, timeout=2.0)
        was_alive, self._alive = self._alive, False
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.cancel()
        how = describe_exit(returncode)
        last = next((line for line in reversed(self.stderr_tail) if line.strip()), "")
        if not was_alive:  # it never said hello: start() reports it
            self._start_failed(f"the worker ({self.name}) {how} before it was ready" + (f": {last}" if last else ""))
            return
        reason, self._kill_reason = self._kill_reason, None
        unfinished = [j for j in self._jobs.values() if j.outcome is None]
        if self._closing:
            for job in unfinished:
                self._finish(job, self._error(job, "cancelled", f"job {job.id} was cancelled: the client closed its worker"))
            return
        running = [j for j in unfinished if j.state == "running"]
        for job in running:
            if job.cancel_requested and reason == "cancel":
                update = self._error(job, "cancelled", f"job {job.id} did not stop within {self.cancel_grace:g} s of the "
                                                       f"cancel request; its worker was killed", hint=None)
            elif reason == "hung":
                update = self._error(job, "worker_hung", f"the worker ({self.name}) stopped answering and was killed "
                                                         f"while running job {job.id}")
            else:
                note = f"; its last output: {last}" if last else ""
                hint = ("SIGKILL is what the kernel's out-of-memory killer sends: use fewer calibration samples, a 16-bit "
                        f"dtype or a machine with more memory; the worker's log: {self.log_path}"
                        if returncode == -signal.SIGKILL else f"the worker's log: {self.log_path}")
                update = self._error(job, "worker_died", f"the worker ({self.name}) {how} while running job {job.id} "
                                                         f"({job.kind}){note}", hint=hint)
            self._finish(job, update)
        self._publish(Update(self.name, "died", data={"returncode": returncode, "reason": reason or how,
                                                     "stderr": list(self.stderr_tail), "jobs": [j.id for j in running]}))
        if not self.restart:
            self._dead = True
            for job in [j for j in unfinished if j.outcome is None]:
                self._finish(job, self._error(job, "worker_died", f"the worker ({self.name}) {how} before job {job.id} started"))
            return
        try:
            await self._spawn()
        except WorkbenchError as exc:
            self._dead = True
            for job in [j for j in self._jobs.values() if j.outcome is None]:
                self._finish(job, self._error(job, "worker_died", f"the worker could not be restarted: {exc.message}", exc.hint))
            return
        for job in [j for j in self._jobs.values() if j.outcome is None and j.generation != self._generation]:
            await self._send_job(job)

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        """Copy the worker's stderr to the log and keep its last lines (progress bars' \\r too)."""
        pending = b""
        while chunk := await proc.stderr.read(65536):
            self._log.write(chunk)
            self._log.flush()
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            pending = pending[-65536:]
            for raw in lines:
                self._stderr_line(raw)
        self._stderr_line(pending)

    def _stderr_line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip()
        if text.strip():
            self.stderr_tail.append(text)
            self._publish(Update(self.name, "stderr", data={"line": text}))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            if not self._alive or self.pending:
                continue
            generation = self._generation
            try:
                await self.ping(self.hung_after)
            except asyncio.TimeoutError:
                if self._alive and generation == self._generation and not self._closing:
                    self._publish(Update(self.name, "hung", data={"seconds": self.hung_after}))
                    self.kill("hung")
            except asyncio.CancelledError:
                if self._closing:
                    raise  # close() stops the heartbeat; a ping cancelled by a death is just skipped

    async def _enforce_cancel(self, job: _Job, generation: int) -> None:
        await asyncio.wait({job.done}, timeout=self.cancel_grace)
        if job.outcome is None and job.state == "running" and generation == self._generation:
            self.kill("cancel")

    # ------------------------------------------------------------------ internals
    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise UserError(f"no job {job_id!r} on worker {self.name}", "use the id submit() returned") from None

    def _error(self, job: _Job, kind: str, message: str, hint: str | None = None) -> Update:
        return Update(self.name, "error", job.id, data={"kind": kind, "message": message, "hint": hint,
                                                        "stderr": list(self.stderr_tail)})

    def _finish(self, job: _Job, update: Update) -> None:
        job.state, job.outcome = "done", update
        self._publish(update, job)
        if not job.done.done():
            job.done.set_result(update)

    def _publish(self, update: Update, job: _Job | None = None) -> None:
        if self.on_update is not None:
            self.on_update(update)
        if job is not None:
            self._record(job, update)
            if job.backlog is not None:
                job.backlog.append(update)
            for q in job.queues:
                q.put_nowait(update)
        self.hub.publish(update)

    def _record(self, job: _Job, update: Update) -> None:
        log = self._logs.get(job.payload.get("run_id") or "")
        if log is None:
            return
        if update.kind == "event":
            log(update.event)
        elif update.kind == "result":
            summary = update.data["result"]
            if summary.get("export"):
                log.artifact("model", self.transport.locate(summary["export"]))
            log.finish(summary)
        elif update.kind == "error":
            d = update.data
            log(RunFailed(run_id=log.run_id, kind=d["kind"], message=d["message"], hint=d.get("hint")))
            details = d.get("traceback") or "\n".join(d.get("stderr") or [])
            log.fail(d["kind"], d["message"], "\n".join(filter(None, [d.get("hint"), details])) or None)
        if update.terminal:
            self._logs.pop(log.run_id, None)

    def _spawn_task(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_job(self, job: _Job) -> None:
        job.generation, job.state = self._generation, "sent"
        await self._send(job.kind, job.id, **job.payload)

    async def _send(self, message_type: str, job: str | None = None, /, **data: Any) -> None:
        await self._write(self._seq.make(message_type, job, **data))

    async def _write(self, message) -> None:
        proc = self._proc
        if proc is None or proc.stdin.is_closing():
            return  # the worker is gone: its death is being handled, waiting jobs are resent
        try:
            proc.stdin.write(encode(message))
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass


class WorkerPool:
    """Several workers behind one event stream; jobs go to the least busy one unless a worker is named."""

    def __init__(self, transports: list[Transport], **options: Any):
        self.hub = Hub()
        self.workers = [WorkerClient(t, hub=self.hub, **options) for t in transports]
        self._owner: dict[str, WorkerClient] = {}

    @classmethod
    def for_gpus(cls, gpus: str | None, transport: Transport | None = None, **options: Any) -> "WorkerPool":
        """One worker per GPU group of ``--gpus`` (``0,1``: two workers; ``0+1``: one with both)."""
        base = transport or LocalTransport()
        groups = parse_gpus(gpus) or [base.gpus]
        return cls([dataclasses.replace(base, gpus=group) for group in groups], **options)

    async def start(self) -> list[dict]:
        try:
            return list(await asyncio.gather(*(w.start() for w in self.workers)))
        except BaseException:
            await self.close()
            raise

    async def submit(self, kind: str, *, worker: int | None = None, **kwargs: Any) -> str:
        client = self.workers[worker] if worker is not None else min(self.workers, key=lambda w: w.pending)
        job = await client.submit(kind, **kwargs)
        self._owner[job] = client
        return job

    def _client(self, job_id: str) -> WorkerClient:
        if job_id not in self._owner:
            raise UserError(f"no job {job_id!r} in this pool", "use the id submit() returned")
        return self._owner[job_id]

    async def cancel(self, job_id: str) -> None:
        await self._client(job_id).cancel(job_id)

    async def wait(self, job_id: str) -> Update:
        return await self._client(job_id).wait(job_id)

    def events(self, job_id: str | None = None) -> AsyncIterator[Update]:
        return self._client(job_id).events(job_id) if job_id else self.hub.events()

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self.workers), return_exceptions=True)
        self.hub.close()


class BlockingClient:
    """One worker for synchronous code: the event loop runs on a background thread.

    ``run(kind, emit, ...)`` submits a job, hands each engine event to
    ``emit`` on the calling thread and returns the result, or raises the
    job's error (``worker_error``). Ctrl-C cancels the job (a second one
    kills the worker) and raises KeyboardInterrupt once it has stopped.
    With ``record``, jobs submitted with a ``run_id`` are recorded in the run
    history (see ``WorkerClient``).
    """

    def __init__(self, transport: Transport, *, record: bool = False, **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="workbench-client", daemon=True)
        self.client = WorkerClient(transport, **options)
        self._record = record
        self.job: str | None = None  # the job run() is following

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> dict:
        if self._record:  # a SQLite connection belongs to the thread that opens it: the loop's
            self.client.history = History()
        return await self.client.start()

    async def _close(self) -> None:
        await self.client.close()
        if self.client.history is not None:
            self.client.history.close()

    def start(self) -> dict:
        self._thread.start()
        return self._call(self._start())

    def __enter__(self) -> "BlockingClient":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def hello(self) -> dict | None:
        return self.client.hello

    def submit(self, kind: str, **payload: Any) -> str:
        return self._call(self.client.submit(kind, **payload))

    def cancel(self, job_id: str) -> None:
        self._call(self.client.cancel(job_id))

    def ping(self, timeout: float = 10.0) -> float:
        return self._call(self.client.ping(timeout))

    def run(self, kind: str, emit: Emit | None = None, **payload: Any) -> dict:
        updates: queue.Queue = queue.Queue()

        async def follow(job_id: str) -> None:
            async for update in self.client.events(job_id):
                updates.put(update)

        job_id = self.job = self.submit(kind, **payload)
        asyncio.run_coroutine_threadsafe(follow(job_id), self._loop)
        interrupted = False
        while True:
            try:
                update = updates.get(timeout=0.2)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                if interrupted:
                    self._loop.call_soon_threadsafe(self.client.kill, "cancel")
                else:
                    self.cancel(job_id)
                interrupted = True
                continue
            if update.kind == "event" and emit is not None:
                emit(update.event)
            elif update.terminal:
                break
        if update.kind == "result":
            return update.data["result"]
        if interrupted:
            raise KeyboardInterrupt
        raise worker_error(update.data)

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._call(self._close(), timeout=60)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        self._loop.close()

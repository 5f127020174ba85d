"""The worker process: runs jobs for one client over the JSON-lines protocol.

``workbench worker`` is started by a client through a transport (a local
subprocess, or ``ssh HOST workbench worker``); nobody types into it. It

- moves the real stdout aside before anything else runs (``take_stdio``), so a
  library's ``print``, a progress bar or a C ``printf`` lands on stderr and can
  never corrupt the protocol;
- reads client messages on the main thread and runs jobs one at a time on a
  job thread, so ``ping`` and ``cancel`` are answered while a job computes;
- reports a malformed or unknown line as an ``error`` and keeps going;
- treats end of input like ``shutdown``: an orphaned worker (its client or
  its ssh connection gone) cancels its job and exits.

What a job does is delegated to a ``Jobs`` object: ``workbench.jobs.EngineJobs``
(the real engine, torch imported on start) or ``workbench.backends.fake.FakeJobs``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Protocol

from workbench.errors import UserError, WorkbenchError
from workbench.events import Emit, json_safe

from .protocol import CLIENT_TYPES, PROTOCOL_VERSION, ProtocolError, Sequencer, VersionMismatch, decode, encode, read_lines

OOM_HINT = ("the model or its activations do not fit in memory: use a 16-bit dtype (model.dtype), fewer "
            "calibration samples (calibration.nsamples) or keep activations on the CPU (calibration.offload_activations = true)")


# --------------------------------------------------------------------------- the outgoing side


class Channel:
    """Numbered messages written whole, one line each, from any thread.

    A write that fails (the client is gone) closes the channel; later sends
    are dropped and ``closed`` tells running jobs to stop.
    """

    def __init__(self, out: BinaryIO):
        self._out = out
        self._lock = threading.Lock()
        self._seq = Sequencer()
        self.closed = False

    def send(self, message_type: str, job: str | None = None, /, **data: Any) -> None:
        with self._lock:
            if self.closed:
                return
            message = self._seq.make(message_type, job, **data)
            try:
                line = encode(message)
            except (TypeError, ValueError):  # nan/inf or a non-JSON value: send its nearest JSON form
                message.data = json.loads(json.dumps(json_safe(message.data), default=str))
                line = encode(message)
            try:
                self._out.write(line)
                self._out.flush()
            except (OSError, ValueError):
                self.closed = True


# --------------------------------------------------------------------------- what jobs do


class Jobs(Protocol):
    """What a worker runs: the real engine or the fake one."""

    def hello(self) -> dict: ...

    def execute(self, job: "Job", emit: Emit, cancel: Callable[[], bool]) -> dict: ...

    # optional: ``devices() -> list[dict]``, the hello's ``devices`` taken now; called on the main thread for each
    # ping while a job runs, so it must be quick


@dataclass
class Job:
    id: str
    kind: str  # run, evaluate, inspect, preview
    request: Any  # the parsed spec (run, evaluate) or model spec (inspect)
    run_id: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_requested: bool = False  # by the client (as opposed to the worker stopping)


def parse_job(kind: str, data: dict):
    """The validated request of a job message; raises UserError before the job is accepted."""
    from workbench.spec import spec_from_dict

    if kind == "inspect":
        return spec_from_dict({"model": data["model"]}).model
    if kind == "preview":  # only the model and calibration matter; a half-edited step must not block a preview
        return spec_from_dict({k: v for k, v in data["spec"].items() if k in ("model", "calibration")})
    spec = spec_from_dict(data["spec"])
    if kind == "evaluate" and spec.steps:
        raise UserError(f"an evaluate job takes a spec without steps; this one has {len(spec.steps)}",
                        "send it as a run job, or remove its [[steps]]")
    return spec


def _is_oom(exc: BaseException | None) -> bool:
    # by name: torch.OutOfMemoryError and torch.cuda.OutOfMemoryError, without importing torch
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def describe_error(exc: BaseException) -> dict:
    """The payload of an ``error`` message for an exception raised by a job."""
    if isinstance(exc, WorkbenchError):
        kind = "out_of_memory" if _is_oom(exc.__cause__) else exc.kind
        return {"kind": kind, "message": exc.message, "hint": exc.hint, "traceback": None}
    tb = traceback.format_exc()
    if _is_oom(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"kind": "out_of_memory", "message": f"out of memory: {first}", "hint": OOM_HINT, "traceback": tb}
    return {"kind": "run_failed", "message": f"{type(exc).__name__}: {exc}",
            "hint": "this is a bug or a library failure; the traceback is stored with the run", "traceback": tb}


# --------------------------------------------------------------------------- the worker


def _job_of(line: bytes) -> str | None:
    """The job id of a line that failed to decode, when it can be read at all (for the error reply)."""
    try:
        job = json.loads(line).get("job")
    except Exception:  # noqa: BLE001 - any unreadable line (too deep, not JSON, not an object) has no job to name
        return None
    return job if isinstance(job, str) else None


class Worker:
    """Reads client messages, queues jobs, runs them one at a time on a job thread."""

    def __init__(self, channel: Channel, jobs: Jobs, grace: float = 10.0):
        self.channel = channel
        self.jobs = jobs
        self.grace = grace
        self.queue: deque[Job] = deque()
        self.current: Job | None = None
        self.stopping = False
        self.stop_reason = ""
        self._cv = threading.Condition()

    # -------------------------------------------------------------- main thread
    def serve(self, stream: BinaryIO) -> int:
        self.channel.send("hello", protocol=PROTOCOL_VERSION, **self.jobs.hello())
        runner = threading.Thread(target=self._run_jobs, name="workbench-jobs", daemon=True)
        runner.start()
        reason = "the client closed the connection"
        try:
            reason = self._read(stream) or reason
        except _Terminated:
            reason = "terminated (SIGTERM)"
        self._stop(reason, runner)
        return 0

    def _read(self, stream: BinaryIO) -> str | None:
        """Handle the client's messages until shutdown (its reason) or the end of input (None)."""
        for line in read_lines(stream):
            if not line.strip():
                continue
            try:
                message = decode(line, other="client")
            except VersionMismatch as exc:
                self.channel.send("error", _job_of(line), kind="version", message=str(exc),
                                  hint=exc.hint(here="the worker's machine", there="the client's machine"))
                continue
            except ProtocolError as exc:
                self.channel.send("error", _job_of(line), kind="protocol", message=str(exc),
                                  hint="the line was skipped; the worker is still running")
                continue
            if message.type == "shutdown":
                return "shutdown requested"
            self.handle(message)
        return None

    def handle(self, message) -> None:
        kind, job_id = message.type, message.job
        if kind not in CLIENT_TYPES:
            self.channel.send("error", job_id, kind="protocol", message=f"a worker does not accept {kind!r} messages",
                              hint=f"a client sends {', '.join(CLIENT_TYPES)}")
        elif kind == "ping":
            with self._cv:
                busy, queued = (self.current.id if self.current else None), len(self.queue)
            self.channel.send("pong", reply_to=message.seq, busy=busy, queued=queued, **self._devices())
        elif kind == "cancel":
            self._cancel(job_id)
        else:
            self._accept(message)

    def _devices(self) -> dict:
        """``{"devices": [...]}`` for a pong, or nothing when the jobs cannot tell (a failed query never fails the pong)."""
        devices = getattr(self.jobs, "devices", None)
        if devices is None:
            return {}
        try:
            return {"devices": devices()}
        except Exception as exc:  # e.g. a CUDA error: the pong still answers, without memory
            print(f"workbench worker: cannot read device memory: {exc}", file=sys.stderr)
            return {}

    def _accept(self, message) -> None:
        job_id = message.job
        with self._cv:
            in_use = (self.current is not None and self.current.id == job_id) or any(j.id == job_id for j in self.queue)
        if in_use:
            self.channel.send("error", job_id, kind="protocol", message=f"job id {job_id!r} is already queued or running",
                              hint="give every job its own id")
            return
        try:
            request = parse_job(message.type, message.data)
        except Exception as exc:  # a UserError for bad input; anything else is reported the same way
            self.channel.send("error", job_id, **describe_error(exc))
            return
        job = Job(id=job_id, kind=message.type, request=request, run_id=message.get("run_id"))
        with self._cv:
            position = len(self.queue) + (self.current is not None)
            self.queue.append(job)
            # sent under the lock so "accepted" always precedes the job thread's "started"
            self.channel.send("accepted", job_id, position=position)
            self._cv.notify()

    def _cancel(self, job_id: str | None) -> None:
        with self._cv:
            if self.current is not None and self.current.id == job_id:
                self.current.cancel_requested = True
                self.current.cancel.set()  # the job raises Cancelled at its next layer boundary
                return
            queued = next((j for j in self.queue if j.id == job_id), None)
            if queued is not None:
                self.queue.remove(queued)
        if queued is not None:
            self.channel.send("error", job_id, kind="cancelled", message="the job was cancelled before it started", hint=None)
        else:
            self.channel.send("error", job_id, kind="unknown_job", message=f"no job {job_id!r} is queued or running",
                              hint="it may have finished already")

    def _stop(self, reason: str, runner: threading.Thread) -> None:
        with self._cv:
            self.stopping = True
            self.stop_reason = reason
            dropped = list(self.queue)
            self.queue.clear()
            if self.current is not None:
                self.current.cancel.set()
            self._cv.notify_all()
        for job in dropped:
            self.channel.send("error", job.id, kind="cancelled", message=f"the worker stopped before the job started ({reason})")
        runner.join(self.grace)
        if runner.is_alive():  # a job that ignores cancellation: leave without it
            self.channel.send("bye", reason=f"{reason}; a job did not stop within {self.grace:g} s and was abandoned")
            sys.stderr.flush()
            os._exit(0)
        self.channel.send("bye", reason=reason)

    # -------------------------------------------------------------- job thread
    def _run_jobs(self) -> None:
        while True:
            with self._cv:
                while not self.queue and not self.stopping:
                    self._cv.wait()
                if not self.queue:
                    return
                job = self.current = self.queue.popleft()
                self.channel.send("started", job.id)

            def emit(event, job_id=job.id) -> None:
                self.channel.send("event", job_id, event=event.to_dict())

            def cancelled(job=job) -> bool:
                return job.cancel.is_set() or self.channel.closed

            try:
                result = self.jobs.execute(job, emit, cancelled)
            except Exception as exc:  # every failure becomes an error message; the worker stays up
                error = describe_error(exc)
                if error["kind"] == "cancelled" and self.stopping and not job.cancel_requested:
                    error["message"] = f"the job was stopped: the worker is stopping ({self.stop_reason})"
                self.channel.send("error", job.id, **error)
            else:
                self.channel.send("result", job.id, kind=job.kind, result=result)
            finally:
                with self._cv:
                    self.current = None


# --------------------------------------------------------------------------- process setup


def take_stdio() -> tuple[BinaryIO, BinaryIO]:
    """Move the protocol's descriptors aside: (input, output) streams only the worker uses.

    File descriptor 1 is pointed at stderr and 0 at /dev/null, so whatever else
    in the process writes to stdout (Python or C) or reads stdin cannot touch
    the protocol.
    """
    sys.stdout.flush()
    proto_out, proto_in = os.dup(1), os.dup(0)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return os.fdopen(proto_in, "rb"), os.fdopen(proto_out, "wb")


class _Terminated(Exception):
    """SIGTERM reached the worker: stop like a shutdown (cancel the job, report it, say bye)."""


def _on_term(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the worker is already stopping
    raise _Terminated


def main(jobs_factory: Callable[[], Jobs], grace: float = 10.0) -> int:
    """Run a worker on this process's stdin/stdout until shutdown, end of input or SIGTERM."""
    stream, out = take_stdio()
    channel = Channel(out)
    try:
        jobs = jobs_factory()
    except WorkbenchError as exc:  # e.g. a fake worker's bad option: say so on the protocol, then leave
        channel.send("error", kind=exc.kind, message=exc.message, hint=exc.hint)
        return 2
    signal.signal(signal.SIGTERM, _on_term)
    return Worker(channel, jobs, grace=grace).serve(stream)

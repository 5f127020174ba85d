"""The UI's link to its workers: starts them, submits jobs, folds every update into ``UIState``.

It runs on the app's event loop and never blocks it: worker processes do the
work, and reading their updates only changes plain data. The app repaints
from that data on a timer (see ``WorkbenchApp``), which is how floods of
progress events are merged. No Textual, no torch.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from typing import Any, Callable

from workbench.errors import UserError, WorkbenchError
from workbench.history import History, new_run_id

from .session import Backend
from .state import JobState, UIState

MEMORY_POLL = 2.0  # seconds between memory reports asked of a busy worker


class WorkerBridge:
    """Workers for one backend choice. ``state`` holds what they reported; ``on_change`` is called after updates."""

    def __init__(self, state: UIState, backend: Backend, *, history_path: str | None = None,
                 on_change: Callable[[], None] | None = None, client_options: dict | None = None):
        self.state, self.backend = state, backend
        self.history_path = history_path
        self.on_change = on_change or (lambda: None)
        self.client_options = client_options or {}
        self.pool = None
        self._starting: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- lifecycle
    def transports(self) -> list:
        """The transports of ``backend`` (UserError for a bad backend or GPU list)."""
        from workbench.backends.transports import parse_backend, parse_gpus

        b = self.backend
        base = parse_backend(b.where, None, b.worker_command, b.ssh_options)
        if base is None:
            raise UserError("the in-process backend is for headless runs: the UI never loads torch itself",
                            "use the local backend (a worker process on this machine)")
        groups = parse_gpus(b.gpus)
        return [dataclasses.replace(base, gpus=g) for g in groups] if groups else [base]

    def announce(self) -> None:
        """Show the workers as starting, before their processes are (the first screen says what is coming)."""
        try:
            transports = self.transports()
        except UserError:
            return  # the start reports it
        for t in transports:
            self.state.worker(t.describe()).status = "starting"
        self.state.changed.add("workers")

    @property
    def started(self) -> bool:
        return self.pool is not None

    async def start(self) -> list[dict]:
        """Start the workers (once; concurrent callers wait for the same start). UserError when they cannot start."""
        if self.pool is not None:
            return [w.hello for w in self.pool.workers if w.hello]
        if self._starting is None or self._starting.done() and self._starting.exception() is not None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)
        return [w.hello for w in self.pool.workers if w.hello]

    async def _start(self) -> None:
        from workbench.backends.client import WorkerPool

        transports = self.transports()
        for t in transports:
            self.state.worker(t.describe()).status = "starting"
        self.state.changed.add("workers")
        self.on_change()
        history = History(self.history_path) if self.history_path else History()
        pool = WorkerPool(transports, history=history, **self.client_options)
        reader = asyncio.ensure_future(self._read(pool))
        self._tasks.add(reader)
        try:
            await pool.start()
        except WorkbenchError as exc:
            reader.cancel()
            for t in transports:
                w = self.state.worker(t.describe())
                w.status, w.message = "dead", exc.message
            self.state.changed.add("workers")
            self.on_change()
            raise
        self.pool = pool
        self._spawn(self._poll_memory())

    async def restart(self, backend: Backend | None = None) -> list[dict]:
        """Close the workers and start fresh ones (for a new backend choice)."""
        await self.close()
        self.state.workers.clear()
        if backend is not None:
            self.backend = backend
        return await self.start()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        pool, self.pool, self._starting = self.pool, None, None
        if pool is not None:
            await pool.close()

    # ---------------------------------------------------------------- jobs
    async def submit(self, kind: str, *, spec: dict | None = None, title: str = "") -> JobState:
        """Start the workers if needed and queue a job: ``run``/``evaluate`` a spec dict (recorded in the history),
        ``inspect`` its model, or ``preview`` its calibration data."""
        await self.start()
        spec = copy.deepcopy(spec or {})
        if kind == "inspect":
            payload: dict[str, Any] = {"model": spec.get("model") or {"name": "demo"}}
            run_id = None
        elif kind == "preview":  # not a run: nothing for the history
            payload, run_id = {"spec": spec}, None
        else:
            run_id = new_run_id()
            payload = {"spec": spec, "run_id": run_id}
        job_id = await self.pool.submit(kind, follow=False, **payload)
        job = JobState(job_id, kind, title or spec.get("name") or kind, spec=spec, run_id=run_id)
        self.state.add_job(job)
        self.on_change()
        return job

    async def cancel(self, job_id: str) -> None:
        job = self.state.jobs.get(job_id)
        if job is None or not job.active or self.pool is None:
            return
        job.cancel_requested = True
        job.logs.append(("warning", "cancel requested: the worker stops at the next layer boundary"))
        self.state.changed.add(job_id)
        await self.pool.cancel(job_id)
        self.on_change()

    def kill_worker(self, index: int = 0) -> None:
        """Kill a worker's process (its job fails and a fresh worker starts); for recovery and tests."""
        if self.pool is not None:
            self.pool.workers[index].kill("killed from the UI")

    # ---------------------------------------------------------------- internals
    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, pool) -> None:
        async for update in pool.events():
            self.state.apply(update)
            self.on_change()

    async def _poll_memory(self) -> None:
        """Ask busy workers for their memory now and then (their pong carries it)."""
        while self.pool is not None:
            await asyncio.sleep(MEMORY_POLL)
            for worker in list(self.pool.workers if self.pool else []):
                if worker.running:
                    try:
                        await worker.ping(timeout=MEMORY_POLL)
                    except (asyncio.TimeoutError, asyncio.CancelledError, WorkbenchError, OSError):
                        pass

    def busy(self) -> bool:
        return any(j.active for j in self.state.jobs.values())

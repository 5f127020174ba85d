"""What the TUI tests share: an app on a fake worker, and waiting for a condition without fixed sleeps."""

from __future__ import annotations

import shlex
import sys
import time

from workbench.screens.app import WorkbenchApp
from workbench.screens.config import Config
from workbench.screens.session import Backend, Session

SMALL, LARGE = (80, 24), (120, 40)


def fake_backend(*args: str, delay: float = 0.01, layers: int = 8) -> Backend:
    """A local fake worker (no torch): ``args`` are extra ``workbench worker`` options, e.g. ``--fake-fail crash@3``."""
    command = [sys.executable, "-m", "workbench", "worker", "--fake", "--fake-delay", str(delay), "--fake-layers", str(layers), *args]
    return Backend(worker_command=shlex.join(command))


def make_app(preset: str = "quickstart", backend: Backend | None = None, start_worker: bool = True, **kwargs) -> WorkbenchApp:
    """The app on a fake worker, with default settings (no user config file)."""
    session = Session(preset, backend or fake_backend())
    return WorkbenchApp(session, config=Config(), start_worker=start_worker, **kwargs)


async def wait_for(pilot, condition, timeout: float = 30.0, what: str = "the condition") -> None:
    """Let the app run until ``condition()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await pilot.pause(0.05)


async def worker_ready(pilot, app: WorkbenchApp) -> None:
    await wait_for(pilot, lambda: any(w.status == "ready" for w in app.state.workers.values()), what="the worker's hello")


async def job_done(pilot, app: WorkbenchApp, job=None, timeout: float = 60.0):
    """Wait until ``job`` (default: the latest) has ended; returns it."""
    await wait_for(pilot, lambda: (job or app.state.latest()) is not None and not (job or app.state.latest()).active,
                   timeout, "the job to end")
    return job or app.state.latest()


async def choose(pilot, selector: str, value) -> None:
    """Pick ``value`` in a select (as choosing it from the list does) and let the screen handle it."""
    pilot.app.screen.query_one(selector).value = value
    await pilot.pause()


async def type_into(pilot, selector: str, text: str) -> None:
    """Focus an input, clear it and type ``text`` key by key."""
    widget = pilot.app.screen.query_one(selector)
    widget.focus()
    widget.value = ""
    await pilot.press(*text)
    await pilot.pause()

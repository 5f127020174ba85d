"""Every screen at 80x24 and 120x40 on fixed data, compared with the accepted SVG snapshots.

The data: no worker process, a frozen clock, UTC, a ready fake worker with fixed devices, and
jobs and history runs made by the fake worker's own event streams (``backends/fake/``) on
that clock, so every number and time on screen is the same on every machine. After a change
to a screen, look at the report and accept the new pictures with
``pytest tests/tui/test_tui_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from rich.text import Text

from tui_support import LARGE, SMALL, make_app, wait_for
from workbench import __version__
from workbench.backends import fake
from workbench.backends.fake import jobs as fake_jobs, preview as fake_preview, steps as fake_steps
from workbench.backends.client import Update
from workbench.backends.worker import Job
from workbench.errors import WorkbenchError
from workbench.history import History
from workbench.screens.session import Backend
from workbench.screens.state import JobState, UIState
from workbench.screens.widgets import SCREENS
from workbench.spec import load_preset_data, spec_from_dict

NOW = 1736942400.0  # 2025-01-15 12:00:00 UTC: "now" on every snapshot
GIB = 2**30
WORKER = "local"
HELLO = {  # what a fake worker says, minus everything that names this machine
    "protocol": 1, "workbench": __version__, "python": "3.11.7", "torch": None, "transformers": None,
    "devices": [{"kind": "cpu", "name": "x86_64", "total": 64 * GIB, "free": 48 * GIB},
                {"kind": "cuda", "index": 0, "name": "Fake GPU 0", "total": 80 * GIB, "free": 79 * GIB}],
    "pid": 4242, "host": "gpu-box", "home": "~/.local/share/workbench", "cuda_visible_devices": None, "fake": True,
}
# (run id, preset, minutes before NOW, a failure the fake worker injects)
RUNS = [
    ("20250115-101500-a1b2c3", "magnitude-50", 105, None),
    ("20250115-103000-d4e5f6", "sparsegpt-2of4", 90, "error@3"),
    ("20250115-110000-0a1b2c", "quickstart", 60, None),
]


class Clock:
    """``time.time`` and the fake worker's clock: it moves only when told (each unit of work: 0.25 s)."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += 0.25


def _fake_stream(clock: Clock, kind: str, request, run_id: str | None, emit, fail: str | None = None) -> dict:
    """Run one fake-worker job in this process on ``clock``; raises the worker's error for a failing one."""
    jobs = fake.FakeJobs(fake.FakeOptions(delay=0.25, layers=8, fail=fail))

    def stamped(event):
        if hasattr(event, "time"):
            event.time = clock()
        emit(event)

    return jobs.execute(Job(id=f"job-{kind}", kind=kind, request=request, run_id=run_id), stamped, lambda: False)


def _fixed_state(clock: Clock) -> UIState:
    """A ready worker and three finished jobs (inspect, run, evaluate) on the frozen clock."""
    state = UIState()
    state.apply(Update(WORKER, "hello", data=HELLO))
    model = {"model": {"name": "demo"}}
    evaluate = {**model, "evaluate": {"perplexity": ["wikitext2", "c4"], "limit": 8}}
    jobs = [  # kind, title, spec, run id
        ("inspect", "demo", model, None),
        ("run", "quickstart", load_preset_data("quickstart"), RUNS[-1][0]),
        ("evaluate", "demo", evaluate, "20250115-111500-e7f8a9"),
    ]
    for index, (kind, title, spec, run_id) in enumerate(jobs, 1):
        request = spec_from_dict(spec)
        job = state.add_job(JobState(f"job-{index}", kind, title, spec=spec, run_id=run_id, submitted=clock()))
        state.apply(Update(WORKER, "accepted", job=job.id))
        state.apply(Update(WORKER, "started", job=job.id))
        result = _fake_stream(clock, kind, request.model if kind == "inspect" else request, run_id,
                              lambda e, job=job: state.apply(Update(WORKER, "event", job=job.id, event=e)))
        state.apply(Update(WORKER, "result", job=job.id, data={"result": result}))
        clock.now += 60
    state.take_changes()
    return state


def _fixed_history(clock: Clock, path: str) -> None:
    """The run history: the fake worker's runs of three presets, one of them failed, at fixed times."""
    with History(path) as history:
        for run_id, preset, minutes, fail in RUNS:
            clock.now = NOW - minutes * 60
            spec = spec_from_dict(load_preset_data(preset))
            history.create_run(run_id, spec.to_dict(), spec.name, model=spec.model.name)
            try:
                summary = _fake_stream(clock, "run", spec, run_id, history.recorder(run_id), fail)
            except WorkbenchError as exc:
                history.fail_run(run_id, "run_failed", exc.message, exc.hint)
            else:
                history.finish_run(run_id, summary)


@pytest.fixture
def fixed_app(tmp_path, monkeypatch):
    """Make the app on fixed data, showing a given screen; the clock stays at NOW while it renders."""
    clock = Clock(NOW)
    monkeypatch.setattr(time, "time", clock)
    for module in (fake_jobs, fake_steps, fake_preview):  # the fake worker's timings follow the clock
        monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=clock, sleep=clock.sleep, time=clock))
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    # relative paths under a fresh folder: anything a screen shows of them is the same everywhere
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_HOME", "home")
    monkeypatch.setenv("XDG_CONFIG_HOME", "config")
    _fixed_history(clock, "home/history.sqlite")
    clock.now = NOW - 40 * 60
    state = _fixed_state(clock)
    clock.now = NOW

    async def no_worker(*args, **kwargs):
        return None  # the snapshots never start a worker process, whatever a screen asks

    def make(screen: str):
        app = make_app(backend=Backend(), start_worker=False, start_screen=screen)
        app.session.loaded_at = NOW - 3 * 3600  # the setup was loaded before the jobs on the fixed clock
        app.state = app.bridge.state = state
        app.bridge.start = no_worker
        app.bridge.submit = no_worker
        return app

    yield make
    monkeypatch.undo()
    time.tzset()


async def _history_shown(pilot, screen: str) -> None:
    """History reads the database on a thread, started after its first refresh: wait for the runs it shows, and
    for the table to have sized its columns to them (a DataTable does that when it next goes idle)."""
    if screen != "history":
        return

    def settled() -> bool:
        table = pilot.app.screen.query_one("#history-table")
        if table.row_count == 0:
            return False
        rows = [table.get_row_at(r) for r in range(table.row_count)]
        return all(not column.auto_width or column.content_width >= max(Text(str(row[i])).cell_len for row in rows)
                   for i, column in enumerate(table.ordered_columns))

    await wait_for(pilot, settled, what="the history's runs, in columns as wide as they are")


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "120x40"])
@pytest.mark.parametrize("screen", [name for name, _, _ in SCREENS])
def test_screen(screen, size, fixed_app, snap_compare):
    async def settle(pilot):
        await wait_for(pilot, lambda: pilot.app.screen.id == f"screen-{screen}", what=f"the {screen} screen")
        await _history_shown(pilot, screen)
        await pilot.app.workers.wait_for_complete()  # screens read files and the history in threads
        await pilot.pause()

    assert snap_compare(fixed_app(screen), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "120x40"])
def test_study_view(size, fixed_app, snap_compare):
    """The calibration study view of the demo study, opened from Presets: every cell still to do."""
    from workbench.screens.study import open_study

    async def open_it(pilot):
        await wait_for(pilot, lambda: pilot.app.screen.id == "screen-presets", what="the presets screen")
        assert open_study(pilot.app, "study-calibration-demo")
        await wait_for(pilot, lambda: pilot.app.screen.id == "screen-study", what="the study view")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(fixed_app("presets"), terminal_size=size, run_before=open_it)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "120x40"])
@pytest.mark.parametrize("view", ["detail", "compare", "help", "run-settings", "quit"])
def test_pushed_view(view, size, fixed_app, snap_compare):
    """The views pushed over a screen: a run's detail, a comparison, the keys of History, the run settings tab of
    Evaluate, and the question ctrl+q asks with an edited setup."""
    from workbench.screens.compare import CompareScreen
    from workbench.screens.rundetail import RunDetailScreen

    start = {"detail": "history", "compare": "history", "help": "history", "run-settings": "evaluate", "quit": "run"}[view]

    async def open_it(pilot):
        app = pilot.app
        await wait_for(pilot, lambda: app.screen.id == f"screen-{start}", what=f"the {start} screen")
        await _history_shown(pilot, start)
        await app.workers.wait_for_complete()
        await pilot.pause()
        if view == "detail":
            app.push_screen(RunDetailScreen(RUNS[-1][0]))
            await wait_for(pilot, lambda: getattr(app.screen, "detail", None) is not None, what="the detail")
        elif view == "compare":
            with History("home/history.sqlite") as history:
                runs = [(history.get(run_id), history.metrics(run_id)) for run_id, _, _, fail in RUNS if fail is None]
            app.push_screen(CompareScreen(runs))
        elif view == "help":
            await pilot.press("question_mark")
        elif view == "run-settings":
            app.screen.query_one("#eval-tabs").active = "tab-run-settings"
        elif view == "quit":
            app.session.set("steps.0.sparsity", 0.6)
            app.session_changed()
            await pilot.press("ctrl+q")
        await app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(fixed_app(start), terminal_size=size, run_before=open_it)

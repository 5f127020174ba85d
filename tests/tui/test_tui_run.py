"""The Run screen on the fake worker: live progress, per-layer results, cancel, failures, search trials, 80x24 layout.

The fake worker's sparsities are exactly the step's target and its
perplexity is ``30 * (1 + 4 s^2)`` on WikiText-2 after a prune step of
sparsity ``s`` (``backends/fake/``), so the expected values are known.
"""

from __future__ import annotations

import io
import itertools

import pytest
from rich.console import Console
from textual.widgets import DataTable, ProgressBar, RichLog, Static
from textual_plotext.plot import Plot

from tui_support import LARGE, SMALL, fake_backend, job_done, make_app, wait_for, worker_ready
from worker_support import async_test
from workbench.history import History
from workbench.screens.charts import LayerChart, TrialChart
from workbench.screens.widgets import ConfirmModal


def screen_text(app) -> str:
    """The screen as plain text, as a terminal would show it (what ``export_screenshot`` draws, without SVG)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def text_of(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def table_rows(app, selector: str = "#layer-table") -> list[list[str]]:
    table = app.screen.query_one(selector, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def log_text(app) -> str:
    return "\n".join(strip.text for strip in app.screen.query_one("#run-log", RichLog).lines)


def record_calls(monkeypatch, cls, name: str, on: list | None = None) -> list[tuple[tuple, dict]]:
    """Every call of ``cls.name`` (which still runs), as (args, kwargs); ``on`` also collects the instances."""
    calls: list[tuple[tuple, dict]] = []
    original = getattr(cls, name)

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        if on is not None:
            on.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, spy)
    return calls


async def run_and_wait(pilot, app, timeout: float = 60.0):
    """Start a run with ctrl+r and wait until it ended and the screen painted its outcome."""
    before = app.state.latest("run")
    await worker_ready(pilot, app)
    await pilot.press("ctrl+r")
    await wait_for(pilot, lambda: app.state.latest("run") is not before, what="the run to be submitted")
    job = await job_done(pilot, app, app.state.latest("run"), timeout)
    await wait_for(pilot, lambda: app.screen.query_one("#run-final").display and job.status in text_of(app, "#run-final"),
                   what="the outcome panel")
    return job


PPL_AFTER = 30.0 * (1 + 4 * 0.5 ** 2)  # the fake's wikitext2 perplexity after wanda 50%


async def run_to_first_layer(pilot, app):
    """Press ctrl+r once the worker is up; the run job, once its first layer is pruned."""
    await worker_ready(pilot, app)
    await pilot.press("ctrl+r")
    await wait_for(pilot, lambda: app.state.latest("run") is not None and app.state.latest("run").layers.get("prune:0"),
                   what="the first pruned layer")
    return app.state.latest("run")


@async_test
async def test_a_quickstart_run_fills_table_and_chart_and_ends_with_the_perplexities(monkeypatch):
    layer_calls = record_calls(monkeypatch, LayerChart, "update_layers")
    tables: list[DataTable] = []
    record_calls(monkeypatch, DataTable, "add_row", on=tables)
    app = make_app("quickstart", fake_backend(delay=0.01, layers=8))
    async with app.run_test(size=SMALL) as pilot:
        ready = screen_text(app)
        assert "Ready to run" in ready and "demo: wanda 50%" in ready and "ctrl+r" in ready
        job = await run_and_wait(pilot, app)
        await wait_for(pilot, lambda: app.screen.query_one("#layer-table", DataTable).row_count == 8, what="8 table rows")

        assert job.status == "finished"
        rows = table_rows(app)
        assert [r[0] for r in rows] == [str(i) for i in range(8)]
        assert [r[1] for r in rows] == ["0.5000"] * 8
        assert str(app.screen.query_one("#layer-table", DataTable).ordered_columns[1].label) == "sparsity"
        args, kwargs = layer_calls[-1]
        assert list(args[0]) == [0.5] * 8 and kwargs["total"] == 8 and kwargs["target"] == 0.5
        assert kwargs.get("ylabel", "sparsity") == "sparsity"

        final = text_of(app, "#run-final")
        assert f"wikitext2 perplexity 30.00 → {PPL_AFTER:.2f}" in final and "60.00" in final
        assert job.run_id and job.run_id in final
        assert "Evaluate" in final and "History" in final
        assert app.screen.query_one("#overall-bar", ProgressBar).percentage == 1.0
        assert "wanda 50%: done in" in log_text(app) and "LlamaForCausalLM with 8 layers" in log_text(app)
        # repaints add only what is new: one row per layer, each log line written once
        assert sum(t.id == "layer-table" for t in tables) == 8
        assert log_text(app).count("▸") == sum(level == "stage" for level, _ in job.logs) == 10
        assert log_text(app).count("LlamaForCausalLM with 8 layers") == 1

        # everything important is on the 80x24 screen: the outcome, the bar at 100%, chart and table
        text = screen_text(app)
        for needle in ("finished", "100%", "30.00 → 60.00", "sparsity per layer", "0.5000"):
            assert needle in text, needle
        width, height = SMALL
        for selector, min_height in (("#run-title", 1), ("#overall-bar", 1), ("#run-final", 3), ("#layer-chart", 8),
                                     ("#layer-table", 5), ("#run-log", 3)):
            region = app.screen.query_one(selector).region
            assert region.height >= min_height and region.bottom <= height - 2 and region.right <= width, (selector, region)


@async_test
async def test_at_120x40_every_layer_row_and_the_log_are_visible():
    app = make_app("quickstart", fake_backend(delay=0.01, layers=8))
    async with app.run_test(size=LARGE) as pilot:
        await run_and_wait(pilot, app)
        await wait_for(pilot, lambda: app.screen.query_one("#layer-table", DataTable).row_count == 8, what="8 table rows")
        assert app.screen.query_one("#layer-table").region.height >= 9  # header + 8 rows
        text = screen_text(app)
        assert all(f"{i}      0.5000" in text for i in range(8))
        assert "Perplexity (compressed): done in" in text


@async_test
async def test_cancel_asks_first_then_the_run_ends_cancelled_and_is_not_finished_in_the_history():
    app = make_app("quickstart", fake_backend(delay=0.2, layers=20))  # 4 s of layers: time to cancel on a busy machine
    app.session.set("evaluate.limit", 2)
    async with app.run_test(size=SMALL) as pilot:
        job = await run_to_first_layer(pilot, app)
        await wait_for(pilot, lambda: "ETA" in text_of(app, "#stage-eta") and "running" in text_of(app, "#run-title"),
                       what="the live stage line")
        assert "wanda 50%" in screen_text(app)

        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the confirmation")
        assert job.active  # nothing is cancelled before the answer
        await pilot.press("y")
        await job_done(pilot, app, job)
        await wait_for(pilot, lambda: "cancelled" in text_of(app, "#run-final"), what="the cancelled outcome")

        assert job.status == "cancelled" and len(job.layers["prune:0"]) < 20
        assert "History" in text_of(app, "#run-final") and "cancelled" in screen_text(app)
        with History() as history:
            assert history.get(job.run_id).status == "cancelled"


@pytest.mark.slow
@async_test
async def test_a_killed_worker_fails_the_run_and_a_fresh_worker_runs_the_next_one():
    app = make_app("quickstart", fake_backend(delay=0.1, layers=16))
    app.session.set("evaluate.limit", 2)
    async with app.run_test(size=SMALL) as pilot:
        job = await run_to_first_layer(pilot, app)
        app.bridge.kill_worker()
        await job_done(pilot, app, job)
        await wait_for(pilot, lambda: "failed" in text_of(app, "#run-final"), what="the failure panel")

        assert job.status == "failed" and job.error["kind"] == "worker_died"
        final = text_of(app, "#run-final")
        assert "the worker died" in final and "killed by signal 9" in final and "History" in final
        assert "What to do:" in final
        # the app keeps working and shows the fresh worker ready
        await wait_for(pilot, lambda: all(w.status == "ready" for w in app.state.workers.values()), what="a fresh worker")
        await wait_for(pilot, lambda: "Fake GPU" in text_of(app, "#worker-line"), what="the worker line")

        second = await run_and_wait(pilot, app)
        assert second is not job and second.status == "finished"
        assert f"{PPL_AFTER:.2f}" in text_of(app, "#run-final")
        assert [r[1] for r in table_rows(app)] == ["0.5000"] * 16  # the new run's rows only


@async_test
async def test_an_out_of_memory_failure_shows_message_and_hint():
    app = make_app("quickstart", fake_backend("--fake-fail", "oom@2", delay=0.01, layers=8))
    async with app.run_test(size=SMALL) as pilot:
        job = await run_and_wait(pilot, app)
        assert job.status == "failed" and job.error["kind"] == "out_of_memory"
        final = text_of(app, "#run-final")
        assert "failed: out of memory" in final
        assert "out of memory: fake allocation failure at unit 2" in final
        assert "What to do: the model or its activations do not fit in memory" in final
        assert "failed: out of memory" in screen_text(app) and "What to do:" in screen_text(app)
        assert len(job.layers["prune:0"]) == 2 and table_rows(app)[-1][0] == "1"  # layers 0 and 1 were reported


@async_test
async def test_a_rank_search_charts_every_trial_with_the_running_best_and_the_best_allocation(monkeypatch):
    trial_calls = record_calls(monkeypatch, TrialChart, "update_trials")
    layer_calls = record_calls(monkeypatch, LayerChart, "update_layers")
    plots: list = []
    lines = record_calls(monkeypatch, Plot, "plot", on=plots)
    app = make_app("lowrank-feature-bo-80", fake_backend(delay=0.01, layers=4))
    app.session.set("steps.0.trials", 6)
    app.session.set("evaluate.limit", 2)
    async with app.run_test(size=SMALL) as pilot:
        job = await run_and_wait(pilot, app)
        assert job.status == "finished"
        (stage, trials), = job.trials.items()
        assert len(trials) == 6

        plotted = trial_calls[-1][0][0]
        objectives = [t["objective"] for t in trials]
        assert [o for _, o in plotted] == objectives and [n for n, _ in plotted] == [t["number"] for t in trials]
        running_best = list(itertools.accumulate(objectives, min))
        assert [t["best"]["objective"] for t in trials] == running_best  # the worker's best-so-far is the running minimum
        trial_plt = app.screen.query_one(TrialChart).plt
        best_line = [args for (args, _), plt in zip(lines, plots) if plt is trial_plt][-1]
        assert list(best_line[0]) == [t["number"] for t in trials] and list(best_line[1]) == running_best

        best = min(trials, key=lambda t: t["objective"])
        rows = table_rows(app, "#best-table")
        assert rows == [[name, f"{value:.3f}"] for name, value in best["params"].items()]
        assert "trials 6/6" in text_of(app, "#trial-summary")
        assert f"wikitext2 perplexity 30.00 → {30.0 * (1 + 4 * 0.2 ** 2):.2f}" in text_of(app, "#run-final")  # retention 0.8

        # the low-rank layers: the retained fraction (0.8), labelled as such
        args, kwargs = layer_calls[-1]
        assert [round(v, 6) for v in args[0]] == [0.8] * 4 and kwargs["ylabel"] == "retained"
        assert str(app.screen.query_one("#layer-table", DataTable).ordered_columns[1].label) == "retained"
        assert [r[1] for r in table_rows(app)] == ["0.8000"] * 4

        # v flips the left pane between the layers and the search
        assert app.screen.query_one("#run-charts").current == "layer-chart"
        await pilot.press("v")
        assert app.screen.query_one("#run-charts").current == "trial-pane"
        assert app.screen.query_one("#run-tables").current == "best-table"


@async_test
async def test_without_a_run_the_screen_shows_the_setup_or_what_is_wrong_with_it():
    app = make_app("quickstart", start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        assert "demo: wanda 50%" in text_of(app, "#run-ready")
        app.session.set("steps.0.sparsity", 1.5)
        app.session_changed()
        await wait_for(pilot, lambda: "not valid" in text_of(app, "#run-ready"), what="the validation problem")
        problem = app.session.problem()
        assert problem.message in text_of(app, "#run-ready")
        assert not app.screen.query_one("#run-live").display


@pytest.mark.slow
@async_test
async def test_a_run_queued_behind_another_shows_once_the_first_ends():
    app = make_app("quickstart", fake_backend(delay=0.2, layers=4))  # about 2 s a run: the second waits in the queue
    app.session.set("evaluate.limit", 2)
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.latest("run") is not None and app.state.latest("run").status == "running",
                       what="the first run to start")
        first = app.state.latest("run")
        screen, repaints = app.screen, []
        paint = screen.on_state
        screen.on_state = lambda changes: (paint(changes), repaints.append(changes))
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.latest("run") is not first, what="the second run to be queued")
        second = app.state.latest("run")
        await wait_for(pilot, lambda: any(second.id in changes for changes in repaints), what="a repaint after the submission")
        assert second.status == "queued" and first.status == "running"  # one job at a time on the one worker
        assert screen.shown_job() is first and first.run_id in text_of(app, "#run-title")
        await job_done(pilot, app, second)
        await wait_for(pilot, lambda: second.run_id in text_of(app, "#run-final"), what="the second run's outcome")
        assert first.status == second.status == "finished"


@async_test
async def test_a_quantize_step_charts_each_layers_output_error_on_its_own_scale(monkeypatch):
    layer_calls = record_calls(monkeypatch, LayerChart, "update_layers")
    app = make_app("gptq-w4a16", fake_backend(delay=0.01, layers=4))
    app.session.set("evaluate.limit", 2)
    async with app.run_test(size=SMALL) as pilot:
        job = await run_and_wait(pilot, app)
        assert job.status == "finished"
        (stage, rows), = job.layers.items()
        errors = [r["value"] for r in rows]
        assert stage == "quantize:0" and len(errors) == 4 and errors == sorted(errors) and errors[0] > 0
        args, kwargs = layer_calls[-1]
        assert list(args[0]) == errors and kwargs["ylabel"] == "relative error" and kwargs["unit_range"] is False
        assert kwargs["title"] == "quantization output error per layer" and kwargs["target"] is None
        assert str(app.screen.query_one("#layer-table", DataTable).ordered_columns[1].label) == "output error"
        assert [r[1] for r in table_rows(app)] == [f"{e:.3g}" for e in errors]

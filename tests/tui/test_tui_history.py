"""The History screen on the fake worker: the run table, a run's detail, comparing runs, export and re-run."""

from __future__ import annotations

import copy

import pytest

from tui_support import SMALL, fake_backend, make_app, wait_for, worker_ready
from worker_support import async_test
from workbench.evaluation import report
from workbench.history import History
from workbench.screens.compare import CompareScreen
from workbench.screens.rundetail import RunDetailScreen
from workbench.screens.widgets import ConfirmModal, PromptModal, human_seconds
from workbench.spec import load_preset, spec_from_dict

LAYERS = 8  # the fake worker's default


def fake_ppl(sparsity: float, dense: float = 30.0) -> float:
    """The fake worker's documented perplexity after one prune step (WikiText-2 dense: 30)."""
    return dense * (1 + 4 * sparsity ** 2)


async def _show(pilot, app, mode: str):
    app.switch_mode(mode)
    await wait_for(pilot, lambda: app.screen.id == f"screen-{mode}" and app.screen.query("Footer"), what=f"the {mode} screen")
    return app.screen


async def _start_run(pilot, app, sparsity: float, windows: int = 5):
    """Set the step's sparsity and press ctrl+r, as a user would; returns the new job."""
    app.session.set("steps.0.sparsity", sparsity)
    app.session.set("evaluate.limit", windows)
    app.session_changed()
    before = set(app.state.jobs)
    await pilot.press("ctrl+r")
    await wait_for(pilot, lambda: set(app.state.jobs) - before, what="the run job")
    (job_id,) = set(app.state.jobs) - before
    return app.state.jobs[job_id]


async def _run(pilot, app, sparsity: float, windows: int = 5):
    job = await _start_run(pilot, app, sparsity, windows)
    await wait_for(pilot, lambda: not job.active, timeout=60, what=f"the run at {sparsity}")
    assert job.status == "finished"
    return job


def _table(screen, selector: str) -> list[list[str]]:
    table = screen.query_one(selector)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def _column(screen, name: str) -> list[str]:
    keys = [c.key.value for c in screen.query_one("#history-table").ordered_columns]
    return [row[keys.index(name)] for row in _table(screen, "#history-table")]


@pytest.mark.slow
@async_test
async def test_the_table_lists_runs_newest_first_refreshes_when_a_job_ends_and_opens_a_run():
    app = make_app(backend=fake_backend(delay=0.1))
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        first = await _run(pilot, app, 0.5, windows=1)  # 10 units of 0.1 s
        screen = await _show(pilot, app, "history")
        await wait_for(pilot, lambda: _column(screen, "id") == [first.run_id], what="the first run listed")
        second = await _start_run(pilot, app, 0.6, windows=12)  # 32 units: time to look while it runs
        await _show(pilot, app, "history")
        # shown again: the running run is listed, newest first
        await wait_for(pilot, lambda: _column(screen, "id") == [second.run_id, first.run_id], what="both runs listed")
        assert second.active and _column(screen, "status") == ["running", "finished"]
        # the end of a job refreshes the shown table
        await wait_for(pilot, lambda: _column(screen, "status") == ["finished", "finished"], what="the second run's end")
        assert _column(screen, "steps") == ["wanda 60%", "wanda 50%"]
        assert _column(screen, "sparsity") == ["60%", "50%"]
        # each with its protocol: the fake's 512-token windows, as many as the run's window limit
        assert _column(screen, "perplexity") == [f"wikitext2 30.00→{fake_ppl(0.6):.2f} (512×12)",
                                                 f"wikitext2 30.00→{fake_ppl(0.5):.2f} (512×1)"]
        assert fake_ppl(0.6) == pytest.approx(73.2)

        # open the older run: its per-layer results, metrics and settings
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.detail is not None,
                       what="the run's detail")
        detail = app.screen
        assert detail.run_id == first.run_id
        assert detail.layer_values == [0.5] * LAYERS
        assert [row[:2] for row in _table(detail, "#detail-layers")] == [[str(i), "0.5000"] for i in range(LAYERS)]
        assert _table(detail, "#detail-metrics") == [["before", "perplexity wikitext2", "30.00", "512 tok × 1 win", ""],
                                                      ["after", "perplexity wikitext2", f"{fake_ppl(0.5):.2f}", "512 tok × 1 win", ""]]
        assert "sparsity = 0.5" in str(detail.query_one("#detail-spec").render())
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen, what="back to the table")


@pytest.mark.slow
@async_test
async def test_compare_marked_runs_shows_the_reports_table_and_their_points():
    app = make_app()
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        first, second = await _run(pilot, app, 0.5), await _run(pilot, app, 0.6)
        screen = await _show(pilot, app, "history")
        await wait_for(pilot, lambda: len(_column(screen, "id")) == 2, what="both runs listed")
        screen.query_one("#history-table").focus()

        await pilot.press("c")  # nothing marked: it says what to do
        await wait_for(pilot, lambda: any("mark two or more" in n.message for n in app._notifications), what="the hint")
        assert not isinstance(app.screen, CompareScreen)

        await pilot.press("space", "space")  # each mark moves the cursor down
        assert _column(screen, "mark") == ["✓", "✓"]
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the comparison")
        compare = app.screen
        with History() as history:  # the same runs read back from the history, oldest first
            runs = [(history.get(j.run_id), history.metrics(j.run_id)) for j in (first, second)]
        header = ["metric"] + [c.label for c in report.columns(runs)]
        shown = compare.query_one("#compare-table")
        assert [str(c.label) for c in shown.ordered_columns] == header
        body = _table(compare, "#compare-table")
        # the values themselves, from the fake's formula: dense baseline first, deltas against it, and the protocol
        # (the fake's 512-token windows, 5 of them) in the row's name
        row = next(r for r in body if r[0].startswith("perplexity wikitext2"))
        assert row[0] == "perplexity wikitext2 (512 tok × 5 win)"
        assert row[1:] == ["30.00", f"{fake_ppl(0.5):.2f} (+{fake_ppl(0.5) - 30:.2f})", f"{fake_ppl(0.6):.2f} (+{fake_ppl(0.6) - 30:.2f})"]
        # the chart: one wanda series, the dense point and one point per run, at its sparsity
        points = compare.series["perplexity"]["wanda · wikitext2"]
        assert [x for x, _ in points] == pytest.approx([0.0, 0.5, 0.6])
        assert [y for _, y in points] == pytest.approx([30.0, fake_ppl(0.5), fake_ppl(0.6)])

        # one marked run and the cursor's are compared too
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen, what="back to the table")
        await pilot.press("up", "space", "up")  # unmark the newer run, leave the cursor on it
        assert _column(screen, "mark") == ["", "✓"]
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the comparison of two")
        assert [c.run_id for c in app.screen.columns[1:]] == [first.run_id, second.run_id]

        # the command palette's "Compare runs", from another screen, compares the same runs
        await pilot.press("escape")
        await _show(pilot, app, "evaluate")
        app.open_compare()
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the comparison from the palette")
        assert [c.run_id for c in app.screen.columns[1:]] == [first.run_id, second.run_id]


@async_test
async def test_export_writes_a_preset_that_loads_back_and_rerun_starts_the_same_spec(tmp_path):
    app = make_app()
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        job = await _run(pilot, app, 0.5)
        screen = await _show(pilot, app, "history")
        await wait_for(pilot, lambda: _column(screen, "id") == [job.run_id], what="the run listed")
        with History() as history:
            record = history.get(job.run_id)

        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptModal), what="the file name prompt")
        field = app.screen.query_one("#modal-input")
        assert field.value == f"{record.name}.toml"  # in the current folder by default
        field.value = str(tmp_path / "mine")
        await pilot.press("enter")
        path = tmp_path / "mine.toml"
        await wait_for(pilot, path.exists, what="the preset file")
        assert load_preset(str(path)).to_dict() == spec_from_dict(record.spec).to_dict()
        assert not list(tmp_path.glob(".mine.toml.*"))  # the temporary file was renamed, not left behind

        await wait_for(pilot, lambda: app.screen is screen, what="back to the table")
        before, setup = set(app.state.jobs), copy.deepcopy(app.session.data)
        await pilot.press("r")  # one key would replace the setup and start work: it asks first, saying what and how long
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the question")
        question = app.screen.question
        assert record.id in question and "One run" in question
        assert f"took {human_seconds(record.finished - record.created)}" in question
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen is screen, what="back to the table")
        await pilot.pause(0.2)
        assert set(app.state.jobs) == before and app.session.data == setup  # declined: nothing changed
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the question again")
        await pilot.press("y")
        await wait_for(pilot, lambda: set(app.state.jobs) - before, what="the re-run")
        (again,) = [app.state.jobs[j] for j in set(app.state.jobs) - before]
        assert again.kind == "run" and again.run_id != record.id
        assert again.spec == record.spec
        await wait_for(pilot, lambda: not again.active, what="the re-run to end")
        with History() as history:
            rerun = history.get(again.run_id)
        assert rerun.status == "finished" and rerun.spec == record.spec


@async_test
async def test_a_failed_run_shows_its_error_and_the_layers_it_finished():
    with History() as history:
        spec = spec_from_dict({"name": "too-big", "steps": [{"type": "prune", "method": "sparsegpt", "sparsity": 0.7}]}).to_dict()
        history.create_run("20250101-000000-ddd004", spec, name="too-big", model="demo")
        for layer in range(3):  # three of eight layers done before the failure; no summary
            history.add_event("20250101-000000-ddd004", {"type": "layer_done", "stage": "prune:0", "layer": layer, "total": LAYERS,
                                                         "sparsity": 0.7, "target": 0.7, "seconds": 0.1, "modules": {}})
        history.fail_run("20250101-000000-ddd004", "out_of_memory", "out of memory: tried to allocate 2.00 GiB",
                         "use fewer calibration samples")
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show(pilot, app, "history")
        await wait_for(pilot, lambda: _column(screen, "status") == ["failed"], what="the failed run listed")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.detail is not None,
                       what="the run's detail")
        detail = app.screen
        error = str(detail.query_one("#detail-error").render())
        assert detail.query_one("#detail-error").display
        assert "out_of_memory" in error and "tried to allocate 2.00 GiB" in error and "use fewer calibration samples" in error
        assert detail.layer_values == [0.7, 0.7, 0.7] + [None] * (LAYERS - 3)
        assert _table(detail, "#detail-metrics") == [["", "no metrics recorded", "", "", ""]]


def _metric(run_id: str, history: History, phase: str, value: float, windows: int, seqlen: int = 512) -> None:
    history.add_event(run_id, {"type": "metric", "name": "perplexity", "dataset": "wikitext2", "phase": phase,
                               "value": value, "seqlen": seqlen, "windows": windows})


@async_test
async def test_compare_across_protocols_keeps_rows_apart_and_takes_the_dense_value_measured_the_same_way():
    dense_spec = spec_from_dict({"name": "dense", "steps": []}).to_dict()
    pruned_spec = spec_from_dict({"name": "pruned", "steps": [{"type": "prune", "method": "sparsegpt", "sparsity": 0.6}]}).to_dict()
    lowrank_spec = spec_from_dict({"name": "factored", "steps": [{"type": "lowrank", "retention": 0.8}]}).to_dict()
    with History() as history:
        history.create_run("20250101-000000-den001", dense_spec, name="dense", model="demo")
        _metric("20250101-000000-den001", history, "before", 30.0, windows=40)  # the baseline: 40 windows
        history.finish_run("20250101-000000-den001", {"steps": []})
        history.create_run("20250101-000001-pru002", pruned_spec, name="pruned", model="demo")
        _metric("20250101-000001-pru002", history, "before", 31.0, windows=16)  # this run measured 16 windows
        _metric("20250101-000001-pru002", history, "after", 60.0, windows=16)
        _metric("20250101-000001-pru002", history, "eval", 55.0, windows=8)  # evaluated later on 8 windows
        history.finish_run("20250101-000001-pru002", {"steps": [{"label": "sparsegpt 60%", "sparsity": 0.6}]})
        history.create_run("20250101-000002-low003", lowrank_spec, name="factored", model="demo")
        _metric("20250101-000002-low003", history, "after", 45.0, windows=40)
        history.finish_run("20250101-000002-low003", {"steps": [{"label": "lowrank 80%", "sparsity": 0.2}]})
    app = make_app(start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _show(pilot, app, "history")
        await wait_for(pilot, lambda: len(_column(screen, "id")) == 3, what="the three runs")
        # the history names each perplexity's protocol (tokens × windows): 16 and 8 windows for the same model
        pruned_row = _column(screen, "perplexity")[1]
        assert "30" not in pruned_row and "(512×16)" in pruned_row and "(512×8)" in pruned_row
        screen.query_one("#history-table").focus()
        await pilot.press("space", "space", "space", "c")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the comparison")
        rows = {r[0]: r[1:] for r in _table(app.screen, "#compare-table")}
        # one row per protocol; the dense column holds the baseline's 40-window value, and the pruned run's own
        # 16-window measurement before compressing (marked *) where the baseline has none
        assert rows["perplexity wikitext2 (512 tok × 40 win)"] == ["30.00", "-", "45.00 (+15.00)"]
        assert rows["perplexity wikitext2 (512 tok × 16 win)"] == ["31.00 *", "60.00 (+29.00)", "-"]
        eight = rows["perplexity wikitext2 (512 tok × 8 win) (no dense value: no delta)"]
        assert eight == ["-", "55.00", "-"]  # no dense value measured on 8 windows: no delta
        notes = str(app.screen.query_one("#compare-notes").render())
        assert "wikitext2 was measured 3 ways" in notes and "a row each" in notes and "* the dense model as pruned" in notes
        # the chart: one series per method, never a line from sparsegpt to lowrank
        series = app.screen.series["perplexity"]
        assert set(series) == {"sparsegpt · wikitext2 512 tok × 16 win", "sparsegpt · wikitext2 512 tok × 8 win",
                               "lowrank · wikitext2 512 tok × 40 win"}
        assert series["lowrank · wikitext2 512 tok × 40 win"] == [(0.0, 30.0), (0.2, 45.0)]

"""The study view: a study preset's plan, running its cells on the fake worker, reuse from the history, failures, cancel.

The fake worker's perplexity depends only on the pruning sparsity s (every
calibration source ties): ``dense * (1 + 4 s^2)`` with dense 30 on
WikiText-2 and 50 on other data sets such as books (``backends/fake/``).
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
from textual.widgets import DataTable, OptionList, Select

from tui_support import LARGE, SMALL, fake_backend, make_app, wait_for
from worker_support import async_test
from workbench.history import History
from workbench.screens.browse import FolderModal
from workbench.screens.commands import WorkbenchCommands
from workbench.screens.rundetail import RunDetailScreen
from workbench.screens.study import StudyScreen, open_study
from workbench.screens.widgets import ConfirmModal
from workbench.study import load_study, spec_digest

SOURCES, METHODS, SPARSITIES, SEEDS = ["c4", "books"], ["wanda"], [0.5, 0.7], [0, 1]
DATASETS = ["books", "wikitext2"]
STUDY = f"""
name = "tiny-study"
description = "study-calibration-demo on a reduced grid"

[model]
name = "demo"
dtype = "float32"
device = "cpu"

[calibration]
nsamples = 4
seqlen = 32
compare = "books"

[[steps]]
type = "prune"
method = "wanda"
sparsity = 0.5

[evaluate]
perplexity = {DATASETS!r}
limit = 3
seqlen = 64
before = false

[study]
sources = {SOURCES!r}
methods = {METHODS!r}
sparsities = {SPARSITIES!r}
seeds = {SEEDS!r}
""".replace("'", '"')
GRID = list(itertools.product(SOURCES, METHODS, SPARSITIES, SEEDS))
RUNS = len(GRID) + 1  # and the dense reference


def fake_ppl(dataset: str, sparsity: float = 0.0) -> float:
    return (30.0 if dataset == "wikitext2" else 50.0) * (1 + 4 * sparsity ** 2)


@pytest.fixture()
def study_file(tmp_path):
    path = tmp_path / "tiny-study.toml"
    path.write_text(STUDY, encoding="utf-8")
    return str(path)


async def open_and_read(pilot, app, source: str) -> StudyScreen:
    """Open the study view and wait until it has read the history."""
    assert open_study(app, source)
    await wait_for(pilot, lambda: isinstance(app.screen, StudyScreen) and app.screen.index is not None,
                   what="the study view to read the history")
    return app.screen


def plan_status(screen: StudyScreen) -> dict[tuple, str]:
    """(source, method, sparsity, seed) or "dense" -> the status column as the plan table shows it."""
    table = screen.query_one("#study-plan", DataTable)
    found = {}
    for i, row in enumerate(screen.rows):
        key = "dense" if row.cell is None else (row.cell.source, row.cell.method, row.cell.sparsity, row.cell.seed)
        found[key] = str(table.get_cell(str(i), "status"))
    return found


def history_runs() -> list:
    with History() as history:
        return history.runs()


@async_test
async def test_a_study_opens_from_the_presets_screen_and_the_palette_with_every_run_to_do(study_file, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(study_file).parent)  # the file browser opens in the working directory
    name = "study-calibration-demo"
    study, _ = load_study(name)
    expected = len(study.sources) * len(study.methods) * len(study.sparsities) * len(study.seeds) + 1
    app = make_app("quickstart", start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        before = copy.deepcopy(app.session.data)
        await pilot.press("7")
        listing = app.screen.query_one("#preset-list", OptionList)
        await wait_for(pilot, lambda: listing.option_count > 0, what="the preset list")
        listing.focus()
        for _ in range(listing.option_count):
            if listing.highlighted_option.id == name:
                break
            await pilot.press("down")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, StudyScreen) and app.screen.index is not None, what="the study")
        screen = app.screen
        assert screen.source == name and len(screen.rows) == expected
        statuses = plan_status(screen)
        assert set(statuses) == {"dense"} | set(itertools.product(study.sources, study.methods, study.sparsities, study.seeds))
        assert set(statuses.values()) == {"to do"}
        assert screen.query_one("#study-plan", DataTable).row_count == expected
        assert f"{expected} to do" in str(screen.query_one("#study-counts").render())
        assert app.session.data == before  # a study does not replace the setup being edited

        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen.id == "screen-presets", what="the Presets screen again")
        await pilot.press("o")
        await wait_for(pilot, lambda: isinstance(app.screen, FolderModal), what="the file browser")
        tree = app.screen.query_one("#folder-tree")
        await wait_for(pilot, lambda: len(tree.root.children) >= 1, what="the folder's files")
        await pilot.press("down")
        assert str(app.screen.highlighted) == study_file
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, StudyScreen) and app.screen.index is not None, what="the file's study")
        assert app.screen.source == study_file and len(app.screen.rows) == RUNS
        await pilot.press("escape")

        commands = {title: callback for title, callback, _ in WorkbenchCommands(app.screen).commands()}
        assert f"Open preset: {name}" not in commands
        commands[f"Open study: {name}"]()
        await wait_for(pilot, lambda: isinstance(app.screen, StudyScreen) and app.screen.source == name
                       and app.screen.index is not None, what="the palette's study")


async def confirm_run(pilot, app) -> str:
    """Answer yes to r's question (how many runs, roughly how long); returns the question."""
    await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="r's question")
    question = app.screen.question
    await pilot.press("y")
    return question


@async_test
async def test_r_runs_every_cell_the_results_follow_the_fake_formula_and_a_new_app_reuses_them(study_file):
    app = make_app("quickstart", fake_backend(delay=0.01, layers=2))
    async with app.run_test(size=LARGE) as pilot:
        screen = await open_and_read(pilot, app, study_file)
        assert set(plan_status(screen).values()) == {"to do"}
        await pilot.press("r")  # hours of compute on a real grid: it asks first, saying how many runs
        question = await confirm_run(pilot, app)
        assert f"the {RUNS} run(s)" in question and "not known yet" in question
        await wait_for(pilot, lambda: set(plan_status(screen).values()) == {"done"}, 60, "every run to be done")
        assert len(app.state.jobs) == RUNS and all(j.status == "finished" for j in app.state.jobs.values())
        await wait_for(pilot, lambda: screen.table is not None and screen.table["dense"]
                       and all(r["metrics"] for r in screen.table["rows"]), what="the aggregated table")

        runs = history_runs()
        assert len(runs) == RUNS and {r.status for r in runs} == {"finished"}
        assert {spec_digest(r.spec) for r in runs} == {row.digest for row in screen.rows}

        t = screen.table
        assert t["dense"] == {d: pytest.approx(fake_ppl(d)) for d in DATASETS}
        assert [(r["source"], r["method"], r["sparsity"]) for r in t["rows"]] == \
            [(src, m, s) for m in METHODS for s in SPARSITIES for src in SOURCES]
        view = screen.query_one("#study-table", DataTable)
        for r in t["rows"]:
            for d in DATASETS:
                stat = r["metrics"][d]
                assert stat["n"] == len(SEEDS) and stat["mean"] == pytest.approx(fake_ppl(d, r["sparsity"]))
                assert stat["std"] == pytest.approx(0.0)
                key = f"{r['method']}|{r['sparsity']}|{r['source']}"
                assert str(view.get_cell(key, d)) == f"{fake_ppl(d, r['sparsity']):.2f} ± 0.00"
        assert str(view.get_cell("dense", "books")) == "50.00"

        # the chart: one line per source, at the grid's sparsities, for the chosen data set
        assert screen.query_one("#study-dataset", Select).value == "books"
        expected = [(100 * s, pytest.approx(fake_ppl("books", s))) for s in SPARSITIES]
        assert screen.chart_series == {src: expected for src in SOURCES}
        screen.query_one("#study-dataset", Select).value = "wikitext2"
        await wait_for(pilot, lambda: screen.chart_series["c4"][0][1] == pytest.approx(fake_ppl("wikitext2", 0.5)),
                       what="the chart to follow the data set")
        assert sorted(screen.chart_series) == sorted(SOURCES) and [x for x, _ in screen.chart_series["books"]] == [50, 70]

        # the ranking: every source, scored by the geometric mean over sparsities of its mean
        for d in DATASETS:
            geo = math.exp(sum(math.log(fake_ppl(d, s)) for s in SPARSITIES) / len(SPARSITIES))
            assert screen.ranks["wanda"][d] == [(src, pytest.approx(geo)) for src in SOURCES]  # a tie keeps the grid's order
            assert f"{geo:.2f}" in str(screen.query_one("#study-ranking").render())

    fresh = make_app("quickstart", start_worker=False)  # a new app: only the history knows the runs
    async with fresh.run_test(size=SMALL) as pilot:
        screen = await open_and_read(pilot, fresh, study_file)
        await wait_for(pilot, lambda: set(plan_status(screen).values()) == {"done"}, what="the runs to be found")
        by_digest = {spec_digest(r.spec): r.id for r in runs}
        assert all(row.run_id == by_digest[row.digest] for row in screen.rows)
        await pilot.press("r")
        await wait_for(pilot, lambda: any("nothing to run" in n.message for n in fresh._notifications), what="the notice")
        assert fresh.state.jobs == {} and fresh.bridge.pool is None  # nothing submitted, no worker started
        assert len(history_runs()) == RUNS


@async_test
async def test_a_failed_run_is_shown_failed_and_the_others_finish(study_file):
    # --fake-fail error@2 fails each job at unit 2 of its first compression step, or of its evaluation when it has
    # none: with 2 layers only the dense reference (3 evaluation windows) reaches unit 2.
    app = make_app("quickstart", fake_backend("--fake-fail", "error@2", delay=0.01, layers=2))
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_and_read(pilot, app, study_file)
        await pilot.press("r")
        await confirm_run(pilot, app)
        await wait_for(pilot, lambda: len(app.state.jobs) == RUNS and not any(j.active for j in app.state.jobs.values()),
                       60, "every run to end")
        await wait_for(pilot, lambda: "to do" not in plan_status(screen).values(), what="the plan to repaint")
        statuses = plan_status(screen)
        assert statuses.pop("dense") == "failed" and set(statuses.values()) == {"done"}
        dense = screen.rows[0]
        assert dense.cell is None and dense.note == "fake failure at unit 2"
        assert str(screen.query_one("#study-plan", DataTable).get_cell("0", "run")) == "fake failure at unit 2"
        assert "1 failed" in str(screen.query_one("#study-counts").render())
        runs = history_runs()
        assert sorted(r.status for r in runs) == ["failed"] + ["finished"] * len(GRID)
        await wait_for(pilot, lambda: screen.table is not None and all(r["metrics"] for r in screen.table["rows"]),
                       what="the table of the finished cells")
        assert screen.table["dense"] == {}

        screen.query_one("#study-plan", DataTable).focus()
        await pilot.press("enter")  # the failed run, as the history recorded it
        await wait_for(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.detail is not None,
                       what="the run's detail view")
        assert app.screen.detail.record.id == dense.run_id and app.screen.detail.record.status == "failed"
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen, what="the study view again")

        await pilot.press("r")  # only the failed run is submitted again
        question = await confirm_run(pilot, app)
        assert "the 1 run(s)" in question and "each (the study's runs so far)" in question  # the others' time
        await wait_for(pilot, lambda: len(app.state.jobs) == RUNS + 1, what="the retry")
        retry = app.state.latest("run")
        assert spec_digest(copy.deepcopy(retry.spec)) == dense.digest


@async_test
async def test_cancel_stops_the_running_run_and_drops_the_queued_ones(study_file):
    app = make_app("quickstart", fake_backend(delay=0.5, layers=2))
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_and_read(pilot, app, study_file)
        await pilot.press("r")
        await confirm_run(pilot, app)
        await wait_for(pilot, lambda: "running" in plan_status(screen).values(), what="the first run to start")
        assert list(plan_status(screen).values()).count("queued") == RUNS - 1
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: not any(j.active for j in app.state.jobs.values()), what="every run to stop")
        jobs = sorted(app.state.jobs.values(), key=lambda j: j.submitted)
        assert [j.status for j in jobs] == ["cancelled"] * RUNS
        assert jobs[0].started is not None and all(j.started is None for j in jobs[1:])  # only the first ever ran
        await wait_for(pilot, lambda: set(plan_status(screen).values()) == {"cancelled"}, what="the plan to repaint")
        assert not any(r.status == "finished" for r in history_runs())

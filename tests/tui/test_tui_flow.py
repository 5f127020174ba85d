"""A whole session as a user would have it: a preset walked through guided, run, changed, run again, compared."""

from __future__ import annotations

import pytest

from test_tui_presets import highlight, open_presets
from tui_support import SMALL, fake_backend, job_done, make_app, type_into, wait_for, worker_ready
from worker_support import async_test
from workbench.history import History
from workbench.screens.compare import CompareScreen
from workbench.spec import load_preset


def cells(table) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


@pytest.mark.slow
@async_test
async def test_a_guided_preset_runs_then_a_changed_setup_runs_and_history_compares_them():
    app = make_app("quickstart", fake_backend(delay=0.005))
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        listing = await open_presets(pilot, app)
        await highlight(pilot, listing, "wanda-50")
        await pilot.press("enter")  # a guided walk: Model, Calibration, Compression, Run
        for screen in ("calibration", "compression", "run"):
            await wait_for(pilot, lambda: app.screen.query("#guide") and app.screen.query_one("#guide").display,
                           what="the guide banner")
            await pilot.press("ctrl+n")
            await wait_for(pilot, lambda: app.screen.id == f"screen-{screen}", what=f"the {screen} screen")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.latest("run") is not None, what="the first run")
        first = await job_done(pilot, app)
        assert first.status == "finished" and first.spec == load_preset("wanda-50").to_dict()

        # change the sparsity on the Compression screen and run the changed setup
        await pilot.press("ctrl+b")
        await wait_for(pilot, lambda: app.screen.id == "screen-compression", what="the Compression screen")
        await type_into(pilot, "#field-sparsity", "0.7")
        await wait_for(pilot, lambda: app.session.get("steps.0.sparsity") == 0.7, what="the edited sparsity")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.latest("run") is not first, what="the second run")
        second = await job_done(pilot, app)
        assert second.status == "finished" and second.spec["steps"][0]["sparsity"] == 0.7

        # History: both runs, marked and compared against the report computed from the history itself
        await pilot.press("6")
        await wait_for(pilot, lambda: app.screen.id == "screen-history" and app.screen.query_one("#history-table").row_count == 2,
                       what="both runs in History")
        app.screen.query_one("#history-table").focus()
        await pilot.press("space", "space", "c")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the comparison")
        with History() as history:
            runs = [(history.get(j.run_id), history.metrics(j.run_id)) for j in (first, second)]
        # the edited setup's run is named after what it does, not after the preset it came from
        assert [r.name for r, _ in runs] == ["wanda-50", "demo wanda 70%"]
        header = ["metric"] + [f"dense ({first.run_id[-6:]})", f"wanda-50 ({first.run_id[-6:]})",
                               f"demo wanda 70% ({second.run_id[-6:]})"]
        assert [str(c.label) for c in app.screen.query_one("#compare-table").ordered_columns] == header
        body = cells(app.screen.query_one("#compare-table"))
        # the fake worker's perplexity: 30 dense on WikiText-2, times 1 + 4 s^2 after a step of sparsity s, measured
        # on the preset's windows of the fake's 512-token context
        windows = load_preset("wanda-50").evaluate.limit or 10
        row = next(r for r in body if r[0].startswith("perplexity wikitext2"))
        assert row[0] == f"perplexity wikitext2 (512 tok × {windows} win)"
        assert row[1] == "30.00" and row[2].startswith("60.00") and row[3].startswith(f"{30 * (1 + 4 * 0.49):.2f}")
        points = app.screen.series["perplexity"]["wanda · wikitext2"]
        assert [x for x, _ in points] == pytest.approx([0.0, 0.5, 0.7])

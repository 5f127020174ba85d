"""The Evaluate screen on the fake worker: results as they arrive, inline validation, evaluations attached to history runs."""

from __future__ import annotations

import pytest

from tui_support import SMALL, fake_backend, make_app, wait_for, worker_ready
from worker_support import async_test
from workbench.errors import UserError
from workbench.history import History
from workbench.screens.evaluate import NO_MODEL_HINT
from workbench.screens.widgets import MessageModal
from workbench.spec import spec_from_dict

# the fake worker's documented dense perplexities (backends/fake/)
DENSE = {"wikitext2": 30.0, "c4": 40.0}


async def _show_evaluate(pilot, app):
    await pilot.press("5")
    await wait_for(pilot, lambda: app.screen.id == "screen-evaluate" and app.screen.query("Footer"), what="the Evaluate screen")
    return app.screen


def _rows(screen) -> list[list[str]]:
    table = screen.query_one("#eval-table")
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def _problem(screen) -> str:
    return str(screen.query_one("#eval-problem").render())


def _modal(app) -> MessageModal | None:
    return next((s for s in app.screen_stack if isinstance(s, MessageModal)), None)


def _record_run(history: History, run_id: str, *, export: str | None, sparsity: float = 0.6, dtype: str = "auto") -> None:
    """A finished compression run as the client records it, with its exported model folder when ``export``."""
    spec = spec_from_dict({"name": f"pruned-{run_id[-3:]}", "model": {"name": "demo", "dtype": dtype},
                           "steps": [{"type": "prune", "method": "wanda", "sparsity": sparsity}]}).to_dict()
    history.create_run(run_id, spec, name=spec["name"], model="demo")
    if export:
        history.add_artifact(run_id, "model", export)
    history.finish_run(run_id, {"steps": [{"type": "prune", "label": f"wanda {sparsity:.0%}", "sparsity": sparsity}],
                                "export": export})


@async_test
async def test_perplexity_on_two_data_sets_fills_a_row_each_with_the_fake_values():
    app = make_app()
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        screen = await _show_evaluate(pilot, app)
        assert screen.focused is screen.query_one("#eval-target")  # the dense model is the first choice
        # tick c4 by keyboard: wikitext2 is already chosen (the quickstart setup's data set)
        datasets = screen.query_one("#eval-ppl")
        datasets.focus()
        await pilot.press("down", "space")
        assert datasets.selected == ["wikitext2", "c4"]
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: app.state.latest("evaluate") is not None, what="the evaluate job")
        job = app.state.latest("evaluate")
        assert job.spec["model"]["name"] == "demo" and job.spec["steps"] == []
        assert job.spec["evaluate"]["perplexity"] == ["wikitext2", "c4"]
        await wait_for(pilot, lambda: not job.active and len(_rows(screen)) == 2, what="both results in the table")
        assert job.status == "finished"
        # each perplexity with its protocol: the fake's 512-token context, the setup's window limit
        windows = app.session.get("evaluate.limit")
        assert _rows(screen) == [["perplexity", ds, f"{DENSE[ds]:.2f}", f"512 tok × {windows} win", ""]
                                 for ds in ("wikitext2", "c4")]
        assert str(screen.query_one("#eval-progress").render()).startswith("finished: 2 result(s)")
        # the evaluation is a run of its own in the history, without steps
        with History() as history:
            record = history.get(job.run_id)
            assert record.spec["steps"] == [] and record.status == "finished"
            assert {(m["dataset"], m["value"]) for m in history.metrics(record.id)} == set(DENSE.items())


@async_test
async def test_an_invalid_setting_shows_the_validators_message_and_does_not_launch():
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show_evaluate(pilot, app)
        assert _problem(screen) == ""
        limit = screen.query_one("#eval-limit")
        limit.focus()
        await pilot.press("end", *["backspace"] * len(limit.value), "0")
        with pytest.raises(UserError) as expected:  # the CLI's message for the same value
            spec_from_dict({"evaluate": {"limit": 0}})
        await wait_for(pilot, lambda: expected.value.message in _problem(screen), what="the validator's message")
        assert expected.value.hint in _problem(screen)
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: _modal(app) is not None, what="the error modal")
        assert _modal(app).message == expected.value.message
        assert not app.state.jobs  # nothing was submitted
        await pilot.press("escape")
        # no data set, task or efficiency chosen: the same words as 'workbench eval' without flags
        await pilot.press("backspace")
        screen.query_one("#eval-ppl").deselect_all()
        await wait_for(pilot, lambda: "nothing to evaluate" in _problem(screen), what="'nothing to evaluate'")
        screen.query_one("#eval-efficiency").value = True
        await wait_for(pilot, lambda: _problem(screen) == "", what="a valid form again")


@pytest.mark.slow
@async_test
async def test_evaluating_an_exported_run_stores_its_metrics_with_the_run_as_phase_eval(tmp_path):
    export = tmp_path / "pruned-model"
    export.mkdir()
    with History() as history:
        _record_run(history, "20250101-000000-aaa001", export=str(export), dtype="float32")
    app = make_app(backend=fake_backend(delay=0.05))  # 40 windows: two seconds, to switch screens meanwhile
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        screen = await _show_evaluate(pilot, app)
        targets = screen.query_one("#eval-target")
        await pilot.press("down")  # from the setup's model to the run
        assert targets.highlighted_option.id == "run:20250101-000000-aaa001"
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: app.state.latest("evaluate") is not None, what="the evaluate job")
        job = app.state.latest("evaluate")
        # the run's exported folder, loaded with the run's model settings
        assert job.spec["model"]["name"] == str(export) and job.spec["model"]["dtype"] == "float32"
        await pilot.press("6")  # the results are stored even while another screen is shown
        await wait_for(pilot, lambda: app.screen.id == "screen-history", what="the History screen")
        assert job.active
        await wait_for(pilot, lambda: not job.active, what="the evaluation to end")

        def attached():
            with History() as history:
                return [m for m in history.metrics("20250101-000000-aaa001") if m["phase"] == "eval"]

        await wait_for(pilot, lambda: len(attached()) == 1, what="the metrics stored with the run")
        assert [(m["name"], m["dataset"], m["value"]) for m in attached()] == [("perplexity", "wikitext2", DENSE["wikitext2"])]
        with History() as history:
            events = history.events("20250101-000000-aaa001")
        assert any(e["type"] == "log" and job.run_id in e["message"] for e in events)  # which evaluation it came from


@async_test
async def test_a_run_without_a_kept_model_is_listed_but_cannot_be_evaluated(tmp_path):
    export = tmp_path / "pruned-model"
    export.mkdir()
    with History() as history:
        _record_run(history, "20250101-000000-bbb002", export=None)
        _record_run(history, "20250101-000001-ccc003", export=str(export))
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show_evaluate(pilot, app)
        targets = screen.query_one("#eval-target")
        assert [o.id for o in targets.options] == ["dense", "run:20250101-000001-ccc003", "run:20250101-000000-bbb002"]
        kept, lost = targets.options[1:]
        assert not kept.disabled
        assert lost.disabled and f"(no model kept: {NO_MODEL_HINT})" in str(lost.prompt)  # why, where it is listed
        await pilot.press("down", "down")  # the keyboard passes over it
        assert targets.highlighted_option.id == "dense"
        await pilot.press("down")
        assert targets.highlighted_option.id == "run:20250101-000001-ccc003"
        assert _problem(screen) == ""
        # its exported folder disappears while another screen is shown: the choice stays, with the reason
        await pilot.press("6")
        export.rmdir()
        await _show_evaluate(pilot, app)
        await wait_for(pilot, lambda: "is gone" in _problem(screen), what="why it cannot be evaluated")
        assert targets.get_option("run:20250101-000001-ccc003").disabled
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: _modal(app) is not None, what="the error modal")
        assert "20250101-000001-ccc003" in _modal(app).message and _modal(app).hint == NO_MODEL_HINT
        assert not app.state.jobs  # nothing was submitted

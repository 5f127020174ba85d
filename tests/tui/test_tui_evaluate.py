"""The Evaluate screen on the fake worker: results as they arrive, inline validation, evaluations attached to history runs."""

from __future__ import annotations

import pytest

from tui_support import SMALL, choose, fake_backend, make_app, type_into, wait_for, worker_ready
from worker_support import async_test
from workbench.errors import UserError
from workbench.history import History
from workbench.screens.evaluate import (NO_MODEL_HINT, eval_values, fill_eval_fields, read_eval_fields, shift_specs,
                                        split_sets)
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


async def _tick(pilot, screen, selector: str, *values: str) -> None:
    """Toggle ``values`` in a selection list by keyboard, from its first option down."""
    widget = screen.query_one(selector)
    widget.focus()
    await pilot.pause()
    widget.highlighted = 0
    at, options = 0, [widget.get_option_at_index(i).value for i in range(widget.option_count)]
    for value in values:
        index = options.index(value)
        await pilot.press(*["down"] * (index - at), "space")
        at = index
    await pilot.pause()


@async_test
async def test_icl_sets_are_evaluated_under_the_shifts_typed_with_the_adaptations_picked():
    app = make_app(start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show_evaluate(pilot, app)
        await _tick(pilot, screen, "#eval-icl", "books-next")
        # multiple choice: the validator refuses dail (the default mode) for it, with its own words
        await wait_for(pilot, lambda: "multiple choice" in _problem(screen), what="the multiple-choice problem")
        await _tick(pilot, screen, "#eval-icl-modes", "zeroshot", "dail")
        await _tick(pilot, screen, "#eval-tta", "none", "tent", "pcl")
        await type_into(pilot, "#eval-icl-shifts", "typo:0.1, typo:0.3")
        await type_into(pilot, "#eval-tta-lr", "5e-4")
        form = {"#eval-tta-steps": "2", "#eval-pcl-strength": "0.2", "#eval-pcl-how": "gaussian", "#eval-tta-params": "lora",
                "#eval-tta-episodic": False}
        for selector, value in form.items():
            await choose(pilot, selector, value)
        await wait_for(pilot, lambda: _problem(screen) == "", what="a valid form")
        settings = screen.settings()
        assert settings["icl"] == ["books-next", "books-next@typo:0.1", "books-next@typo:0.3"]
        assert settings["icl_modes"] == ["zeroshot"] and settings["tta"] == ["tent", "pcl"]
        assert {k: settings[k] for k in ("tta_steps", "tta_lr", "tta_batch", "tta_episodic", "tta_params", "pcl_how",
                                         "pcl_strength")} == {"tta_steps": 2, "tta_lr": 5e-4, "tta_batch": 4,
                                                              "tta_episodic": False, "tta_params": "lora",
                                                              "pcl_how": "gaussian", "pcl_strength": 0.2}
        evaluate = screen.build_spec()["evaluate"]  # what the job would get: the validator took it as it is
        assert evaluate["icl"] == settings["icl"] and evaluate["tta"] == ["tent", "pcl"] and evaluate["tta_lr"] == 5e-4
        # a shift written wrong: the validator's message, under the form, and no job
        await choose(pilot, "#eval-icl-shifts", "typo:0.1, typo:lots")
        with pytest.raises(UserError) as expected:
            spec_from_dict({"evaluate": {"icl": ["books-next@typo:lots"], "icl_modes": ["zeroshot"]}})
        await wait_for(pilot, lambda: expected.value.message in _problem(screen), what="the validator's message")
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: _modal(app) is not None, what="the error modal")
        assert _modal(app).message == expected.value.message
        assert not app.state.jobs
        await pilot.press("escape")
        # no shift at all: said as such (the validator would call books-next@fast an unknown data set)
        await choose(pilot, "#eval-icl-shifts", "fast")
        await wait_for(pilot, lambda: "'fast' is not a shift" in _problem(screen), what="'not a shift'")
        # shifts with no set to apply them to
        await choose(pilot, "#eval-icl-shifts", "case:0.5")
        screen.query_one("#eval-icl").deselect_all()
        await wait_for(pilot, lambda: "none is picked" in _problem(screen), what="shifts without a set")
        await choose(pilot, "#eval-icl-shifts", "")
        screen.query_one("#eval-tta").deselect_all()  # no adaptation either: valid again
        await wait_for(pilot, lambda: _problem(screen) == "", what="a valid form again")


def test_set_names_split_into_sets_and_shifts_as_written():
    names = ["sst2", "sst2@typo:0.10", "mr@typo:0.10", "file:/data/a@b.jsonl", "sst2@typo:lots", "cr@words:0.1+case:0.05"]
    assert split_sets(names) == (["sst2", "mr", "file:/data/a@b.jsonl", "cr"], ["typo:0.10", "typo:lots", "words:0.1+case:0.05"])
    assert shift_specs(" typo:0.1,, @case:0.2 , typo:0.1,") == ["typo:0.1", "case:0.2"]


ROUND_TRIP = {"perplexity": ["wikitext2"], "icl": ["sst2", "mr", "sst2@typo:0.15", "mr@typo:0.15",
                                                  "sst2@words:0.1+case:0.05", "mr@words:0.1+case:0.05"],
              "icl_modes": ["zeroshot", "dail"], "tta": ["none", "pcl"], "tta_steps": 3, "tta_lr": 0.0005,
              "tta_batch": 8, "tta_episodic": False, "tta_params": "lora", "pcl_how": "gaussian", "pcl_strength": 0.25}


@async_test
async def test_shifted_sets_and_adaptation_settings_round_trip_through_both_forms():
    app = make_app(start_worker=False)
    unseen = {"pcl_where": "embeddings", "tta_lora_rank": 8}  # settings the form does not show: kept as they are
    for key, value in unseen.items():
        app.session.set(f"evaluate.{key}", value)
    async with app.run_test(size=SMALL) as pilot:
        screen = await _show_evaluate(pilot, app)
        assert {k: screen.settings().get(k) for k in unseen} == unseen
        for prefix in ("eval", "run"):
            fill_eval_fields(screen, prefix, eval_values(ROUND_TRIP))
            await pilot.pause()
            assert screen.query_one(f"#{prefix}-icl").selected == ["sst2", "mr"]
            assert screen.query_one(f"#{prefix}-icl-shifts").value == "typo:0.15, words:0.1+case:0.05"
            read = read_eval_fields(screen, prefix)
            assert {k: read[k] for k in ROUND_TRIP} == ROUND_TRIP, prefix
            # and back to the defaults: no shifts, no adaptation
            fill_eval_fields(screen, prefix, eval_values({}))
            await pilot.pause()
            read = read_eval_fields(screen, prefix)
            assert screen.query_one(f"#{prefix}-icl-shifts").value == ""
            assert {k: read[k] for k in ROUND_TRIP} == {k: v for k, v in eval_values({}).items() if k in ROUND_TRIP}
        # the setup's [evaluate] shows in the Run settings tab, and an edit there writes the shifted names back
        app.session.set("evaluate", {**ROUND_TRIP, **unseen})
        app.session_changed()
        screen.query_one("#eval-target").focus()
        await pilot.press("]")
        await wait_for(pilot, lambda: screen.query_one("#eval-tabs").active == "tab-run-settings", what="the tab")
        await wait_for(pilot, lambda: screen.query_one("#run-icl-shifts").value == "typo:0.15, words:0.1+case:0.05",
                       what="the setup's shifts in the Run settings tab")
        assert {k: v for k, v in read_eval_fields(screen, "run").items() if k in ROUND_TRIP} == ROUND_TRIP
        await type_into(pilot, "#run-icl-shifts", "space:0.2")
        await wait_for(pilot, lambda: app.session.get("evaluate.icl") == ["sst2", "mr", "sst2@space:0.2", "mr@space:0.2"],
                       what="the new shift in the setup")
        assert app.session.get("evaluate.tta") == ["none", "pcl"] and app.session.get("evaluate.tta_lr") == 0.0005
        assert {k: app.session.get(f"evaluate.{k}") for k in unseen} == unseen
        await type_into(pilot, "#run-icl-shifts", "space:2")  # outside [0, 1]: the setup's problem, in the tab
        await wait_for(pilot, lambda: "outside [0, 1]" in str(screen.query_one("#run-problem").render()),
                       what="the validator's message in the Run settings tab")

"""The Compression screen: adding, editing, reordering and removing steps, with inline validation (fake worker, 80x24)."""

from __future__ import annotations

import copy

import pytest
from textual.widgets import Input, OptionList, Select, Static

from tui_support import SMALL, make_app, wait_for, worker_ready
from worker_support import async_test
from workbench.errors import UserError
from workbench.screens.compression import StepTypeModal
from workbench.screens.stepforms import StepForm
from workbench.screens.widgets import ConfirmModal, MessageModal
from workbench.pruning.family import PruneStep
from workbench.spec import load_preset_data, spec_from_dict

# lowrank fields whose comments say they drive the allocation search (workbench/spec_lowrank.py)
SEARCH_FIELDS = ["space", "trials", "sampler", "ratio_min", "ratio_max", "slack", "objective_data", "objective_chunks",
                 "objective_seqlen", "kl_weight", "finalists", "storage", "study", "workers", "heartbeat"]


def validator_message(data: dict) -> str:
    """The preset validator's message for this setup (it must be invalid)."""
    with pytest.raises(UserError) as caught:
        spec_from_dict(copy.deepcopy(data))
    return caught.value.message


def preset_data(name: str) -> dict:
    data = load_preset_data(name)
    data.pop("guide", None)
    return data


async def open_compression(pilot, app, index: int = 0) -> StepForm:
    await pilot.press("3")
    await wait_for(pilot, lambda: app.screen.id == "screen-compression", what="the Compression screen")
    return await form_for(pilot, app, index)


async def form_for(pilot, app, index: int) -> StepForm:
    await wait_for(pilot, lambda: any(f.index == index for f in app.screen.query(StepForm)), what=f"the form of step {index}")
    return app.screen.query_one(StepForm)


async def retype(pilot, field: Input, text: str) -> None:
    field.focus()
    await pilot.press("end", *["backspace"] * len(field.value), *text)


def shown(form: StepForm, name: str) -> bool:
    return form.query_one(f"#row-{name}").display


def list_labels(app) -> list[str]:
    steps = app.screen.query_one("#steps", OptionList)
    return [str(steps.get_option_at_index(i).prompt) for i in range(steps.option_count)]


@async_test
async def test_an_impossible_sparsity_is_flagged_as_typed_and_run_refuses():
    app = make_app("quickstart")
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        await open_compression(pilot, app)
        app.screen.query_one("#steps", OptionList).focus()
        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, StepTypeModal), what="the step type choice")
        await pilot.press("enter")  # prune is the first type
        await wait_for(pilot, lambda: len(app.session.data["steps"]) == 2, what="the new step")
        expected_steps = preset_data("quickstart")["steps"] + [{"type": "prune"}]
        assert app.session.data["steps"] == expected_steps
        form = await form_for(pilot, app, 1)

        await retype(pilot, form.query_one("#field-sparsity", Input), "1.5")
        await wait_for(pilot, lambda: app.session.get("steps.1.sparsity") == 1.5, what="the typed sparsity")
        data = preset_data("quickstart")
        data["steps"].append({"type": "prune", "sparsity": 1.5})
        expected = validator_message(data)
        assert expected.startswith("steps.1.sparsity")
        error = form.query_one("#error-sparsity", Static)
        await wait_for(pilot, lambda: error.display and expected in str(error.content), what="the inline message")
        assert not form.query_one("#form-problem").display  # it is next to the field, not under the form
        assert list_labels(app)[1].endswith("✗")

        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: isinstance(app.screen, MessageModal), what="the refusal")
        assert expected in app.screen.message
        assert app.state.jobs == {}
        await pilot.press("escape")

        await retype(pilot, app.screen.query_one("#field-sparsity", Input), "0.6")
        await wait_for(pilot, lambda: not error.display, what="the message to clear")
        assert app.session.problem() is None
        assert app.session.data["steps"][1] == {"type": "prune", "sparsity": 0.6}
        assert list_labels(app) == ["1. wanda 50%", f"2. {PruneStep(sparsity=0.6).label()}"]


@async_test
async def test_owl_and_nm_problems_show_beside_the_field_or_under_the_form():
    app = make_app("owl-wanda-70")
    async with app.run_test(size=SMALL) as pilot:
        form = await open_compression(pilot, app)
        assert shown(form, "owl_lambda") and shown(form, "owl_m") and not shown(form, "blocksize")

        await retype(pilot, form.query_one("#field-owl_lambda", Input), "0.6")
        data = preset_data("owl-wanda-70")
        data["steps"][0]["owl_lambda"] = 0.6
        beside = validator_message(data)
        assert beside.startswith("steps.0.owl_lambda")
        await wait_for(pilot, lambda: expected_in(form, "#error-owl_lambda", beside), what="the lambda message")

        # a lambda the range accepts, but 0.7 + 0.35 pushes layers past 100%: the message names no field
        await retype(pilot, form.query_one("#field-owl_lambda", Input), "0.35")
        data["steps"][0]["owl_lambda"] = 0.35
        combined = validator_message(data)
        assert combined.startswith("steps.0:")
        await wait_for(pilot, lambda: expected_in(form, "#form-problem", combined), what="the message under the form")
        assert not form.query_one("#error-owl_lambda").display

        await retype(pilot, form.query_one("#field-owl_lambda", Input), "0.08")
        form.query_one("#field-pattern", Select).value = "2:4"  # N:M cannot take OWL's per-layer sparsities
        await wait_for(pilot, lambda: app.session.get("steps.0.pattern") == "2:4", what="the pattern")
        data["steps"][0].update(owl_lambda=0.08, pattern="2:4")
        nm = validator_message(data)
        assert "N:M" in nm
        await wait_for(pilot, lambda: expected_in(form, "#form-problem", nm), what="the N:M message")
        assert not shown(form, "sparsity")  # N:M fixes the sparsity

        form.query_one("#field-allocation", Select).value = "uniform"
        await wait_for(pilot, lambda: app.session.problem() is None, what="a valid setup")
        await wait_for(pilot, lambda: not form.query_one("#form-problem").display, what="the message to clear")
        assert not shown(form, "owl_lambda")


def expected_in(form: StepForm, selector: str, message: str) -> bool:
    widget = form.query_one(selector, Static)
    return widget.display and message in str(widget.content)


@async_test
async def test_lowrank_search_fields_show_only_with_the_search_allocation():
    app = make_app("lowrank-feature-uniform-80")
    async with app.run_test(size=SMALL) as pilot:
        form = await open_compression(pilot, app)
        assert not any(shown(form, name) for name in SEARCH_FIELDS + ["energy"])
        assert shown(form, "retention") and shown(form, "method")

        allocation = form.query_one("#field-allocation", Select)
        allocation.value = "search"
        await wait_for(pilot, lambda: all(shown(form, name) for name in SEARCH_FIELDS), what="the search fields")
        assert app.session.get("steps.0.allocation") == "search"
        assert not shown(form, "energy")

        allocation.value = "energy"
        await wait_for(pilot, lambda: shown(form, "energy"), what="the energy field")
        assert not any(shown(form, name) for name in SEARCH_FIELDS)
        assert app.session.problem() is None


@async_test
async def test_reordering_moves_the_steps_in_the_session():
    app = make_app("openba-style")
    async with app.run_test(size=SMALL) as pilot:
        await open_compression(pilot, app)
        original = preset_data("openba-style")["steps"]
        assert [s["type"] for s in original] == ["vocab", "depth", "width"]
        app.screen.query_one("#steps", OptionList).focus()
        await pilot.press("down")  # the depth step
        await form_for(pilot, app, 1)
        await pilot.press("shift+up")
        await wait_for(pilot, lambda: app.session.data["steps"] == [original[1], original[0], original[2]], what="depth first")
        assert app.screen.query_one("#steps", OptionList).highlighted == 0  # the moved step stays selected
        await pilot.press("shift+down", "shift+down")
        await wait_for(pilot, lambda: app.session.data["steps"] == [original[0], original[2], original[1]], what="depth last")
        assert list_labels(app)[2].startswith("3. depth: remove 2 layers")
        assert app.session.spec().to_dict()["steps"][2]["type"] == "depth"


@async_test
async def test_removing_a_step_asks_first():
    app = make_app("openba-style")
    async with app.run_test(size=SMALL) as pilot:
        await open_compression(pilot, app)
        original = preset_data("openba-style")["steps"]
        app.screen.query_one("#steps", OptionList).focus()
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the confirmation")
        assert "vocabulary" in app.screen.question
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmModal), what="the modal to close")
        assert app.session.data["steps"] == original

        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: app.session.data["steps"] == original[1:], what="the step to go")
        await wait_for(pilot, lambda: len(list_labels(app)) == 2, what="the list to follow")
        assert list_labels(app)[0].startswith("1. depth")


@async_test
async def test_a_letter_in_a_number_shows_with_the_validators_message_and_an_empty_field_means_the_default():
    app = make_app("quickstart", start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_compression(pilot, app)
        field = form.query_one("#field-sparsity", Input)
        await retype(pilot, field, "0.6x")
        assert field.value == "0.6x"  # the letter is kept, not dropped
        data = preset_data("quickstart")
        data["steps"][0]["sparsity"] = "0.6x"
        expected = validator_message(data)
        error = form.query_one("#error-sparsity", Static)
        await wait_for(pilot, lambda: error.display and expected in str(error.content), what="the validator's message")

        await retype(pilot, field, "")
        await wait_for(pilot, lambda: "sparsity" not in app.session.data["steps"][0], what="the key to be left out")
        assert field.placeholder == f"default {PruneStep().sparsity}"
        assert app.session.problem() is None and not error.display
        assert app.session.spec().steps[0].sparsity == PruneStep().sparsity


@async_test
async def test_a_fields_help_line_goes_with_its_form():
    app = make_app("lowrank-feature-bo-80", start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_compression(pilot, app)
        form.query_one("#field-trials").focus()
        await pilot.pause()
        help_line = app.screen.query_one("#field-help", Static)
        assert str(help_line.content).startswith("trials")
        app.session.add_step({"type": "prune"})
        app.session_changed()
        steps = app.screen.query_one("#steps", OptionList)
        await wait_for(pilot, lambda: steps.option_count == len(app.session.steps), what="the new step in the list")
        await pilot.pause(0.2)  # the list's repaint, which keeps the highlight where it was, is done
        steps.focus()
        await pilot.press("end")
        await form_for(pilot, app, len(app.session.steps) - 1)
        await pilot.pause()
        assert "trials" not in str(help_line.content)  # the prune form shows no low-rank help


@async_test
async def test_the_quantize_editor_shows_the_fields_of_its_method_and_scheme_and_flags_bad_bits():
    app = make_app("gptq-w4a16")
    async with app.run_test(size=SMALL) as pilot:
        form = await open_compression(pilot, app)
        assert all(shown(form, name) for name in ("method", "weights", "bits", "group_size", "blocksize", "actorder"))
        assert not shown(form, "awq_grid")

        form.query_one("#field-method", Select).value = "awq"
        await wait_for(pilot, lambda: shown(form, "awq_grid") and shown(form, "awq_quantizer"), what="the AWQ fields")
        form.query_one("#field-method", Select).value = "rtn"
        await wait_for(pilot, lambda: not shown(form, "blocksize") and not shown(form, "awq_grid"), what="RTN's fields")

        form.query_one("#field-weights", Select).value = "fp8"
        await wait_for(pilot, lambda: not shown(form, "bits") and not shown(form, "group_size"), what="FP8's fields")
        assert app.session.problem() is None and app.session.spec().steps[0].label() == "rtn FP8"

        form.query_one("#field-weights", Select).value = "int"
        await retype(pilot, form.query_one("#field-group_size", Input), "-4")
        data = preset_data("gptq-w4a16")
        data["steps"][0].update(method="rtn", weights="int", group_size=-4)
        expected = validator_message(data)
        await wait_for(pilot, lambda: expected_in(form, "#error-group_size", expected), what="the group size message")

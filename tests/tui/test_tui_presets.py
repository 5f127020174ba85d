"""Presets: the shipped [guide] tables, the Presets screen, the guided session, opening and saving preset files."""

from __future__ import annotations

import copy
import tomllib

import pytest
from textual.widgets import Input, OptionList

from tui_support import SMALL, job_done, make_app, wait_for, worker_ready
from worker_support import async_test
from workbench.errors import UserError
from workbench.presets import preset_file, preset_names
from workbench.screens.widgets import MessageModal, PromptModal
from workbench.spec import load_preset, load_preset_data, spec_from_dict
from workbench.study import load_study

GUIDED = ("model", "calibration", "compression", "run")


def raw_preset(name: str) -> dict:
    return tomllib.loads(preset_file(name).read_text(encoding="utf-8"))


def test_every_run_preset_explains_each_guided_screen_and_all_presets_still_load():
    runs = 0
    for name in preset_names():
        data = raw_preset(name)
        if "study" in data:
            load_study(name)  # the [study] loader still accepts it
            continue
        runs += 1
        guide = data["guide"]
        assert set(guide) == set(GUIDED), name
        for screen, text in guide.items():
            assert isinstance(text, str) and 40 <= len(text) <= 200, (name, screen)
        spec = load_preset(name)
        assert "guide" not in spec.to_dict()  # explanations are not part of the run
    assert runs >= 10


@pytest.mark.parametrize("guide, words", [
    ({"model": "fine", "run": 3}, ["guide.run = 3", "not a string"]),
    ("read the paper", ["guide must be a table", "str"]),
])
def test_a_guide_that_is_not_a_table_of_strings_is_rejected(tmp_path, guide, words):
    data = load_preset_data("quickstart")
    data["guide"] = guide
    with pytest.raises(UserError) as caught:
        spec_from_dict(data)
    for word in words:
        assert word in caught.value.message
    assert caught.value.hint

    path = tmp_path / "bad-guide.toml"
    path.write_text(preset_file("quickstart").read_text().replace('model = "The bundled', 'model = 3\nx = "The bundled'))
    with pytest.raises(UserError, match=r"guide\.model = 3 is not a string"):
        load_preset(str(path))


async def open_presets(pilot, app):
    await pilot.press("7")
    await wait_for(pilot, lambda: app.screen.id == "screen-presets", what="the Presets screen")
    listing = app.screen.query_one("#preset-list", OptionList)
    await wait_for(pilot, lambda: listing.option_count > 0, what="the preset list")
    return listing


async def highlight(pilot, listing: OptionList, name: str) -> None:
    listing.focus()
    for _ in range(listing.option_count):
        if listing.highlighted_option is not None and listing.highlighted_option.id == name:
            return
        await pilot.press("down")
    raise AssertionError(f"{name} is not in the preset list")


async def answer_prompt(pilot, app, text: str) -> None:
    await wait_for(pilot, lambda: isinstance(app.screen, PromptModal), what="the prompt")
    app.screen.query_one("#modal-input", Input).value = text
    await pilot.press("enter")


@pytest.mark.slow
@async_test
async def test_a_guided_session_explains_each_screen_in_order_and_runs_the_preset():
    name = "owl-wanda-70"
    notes = raw_preset(name)["guide"]
    app = make_app("quickstart")
    async with app.run_test(size=SMALL) as pilot:
        await worker_ready(pilot, app)
        listing = await open_presets(pilot, app)
        await highlight(pilot, listing, name)
        await wait_for(pilot, lambda: name in str(app.screen.query_one("#preset-preview").content), what="the preview")
        preview = str(app.screen.query_one("#preset-preview").content)
        assert load_preset(name).steps[0].label() in preview  # "owl-wanda 70%"

        await pilot.press("enter")
        expected_data = raw_preset(name)
        del expected_data["guide"]
        for i, screen in enumerate(GUIDED):
            if i:
                await pilot.press("ctrl+n")
            await wait_for(pilot, lambda: app.screen.id == f"screen-{screen}", what=f"the {screen} screen")
            banner = app.screen.query_one("#guide")
            await wait_for(pilot, lambda: banner.display and notes[screen] in str(banner.render()), what=f"the {screen} note")
        assert app.session.data == expected_data
        await pilot.press("ctrl+b")
        await wait_for(pilot, lambda: app.screen.id == "screen-compression", what="one screen back")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: app.screen.id == "screen-run", what="the Run screen again")

        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state.latest("run") is not None, what="the run to start")
        job = await job_done(pilot, app)
        assert job.spec == load_preset(name).to_dict()
        assert job.status == "finished"


@async_test
async def test_save_as_preset_refuses_a_blank_name_and_names_the_preset_after_its_file(tmp_path):
    app = make_app("quickstart")
    async with app.run_test(size=SMALL) as pilot:
        app.session.set("steps.0.sparsity", 0.6)
        app.session_changed()
        await open_presets(pilot, app)
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptModal), what="the prompt")
        assert "(enter)" in str(app.screen.query_one("#ok").label) and "(escape)" in str(app.screen.query_one("#cancel").label)
        await answer_prompt(pilot, app, "   ")  # a blank name: the dialog stays and says why
        await pilot.pause(0.2)
        assert isinstance(app.screen, PromptModal)
        problem = app.screen.query_one("#modal-problem")
        assert problem.display and "needs a file name" in str(problem.render())
        assert list(tmp_path.iterdir()) == []

        path = tmp_path / "mine.toml"
        await answer_prompt(pilot, app, str(path))
        await wait_for(pilot, lambda: path.exists(), what="the preset file")
        # the preset is the setup, named after its file (as a shipped preset's name is its file's)
        assert load_preset(str(path)).to_dict() == load_preset("quickstart", ["steps.0.sparsity=0.6", "name='mine'"]).to_dict()
        assert app.session.run_name() == "mine" and not app.session.edited


async def pick_file(pilot, app, path) -> None:
    """In the file browser (opened in the working directory), move down to ``path`` and take it with enter."""
    from workbench.screens.browse import FolderModal

    await wait_for(pilot, lambda: isinstance(app.screen, FolderModal), what="the file browser")
    tree = app.screen.query_one("#folder-tree")
    await wait_for(pilot, lambda: len(tree.root.children) >= 3, what="the tree to list the folder")
    for _ in range(len(tree.root.children) + 1):
        if app.screen.highlighted == path:
            break
        await pilot.press("down")
    assert app.screen.highlighted == path
    await pilot.press("enter")


@async_test
async def test_a_bad_preset_file_shows_why_and_keeps_the_setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the browser opens in the working directory
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "broken"\n[model\nname = "demo"\n')
    invalid = tmp_path / "invalid.toml"
    invalid.write_text('name = "invalid"\n[[steps]]\ntype = "prune"\nsparsity = 1.5\n')
    good = tmp_path / "good.toml"
    good.write_text('name = "good"\n[[steps]]\ntype = "prune"\nmethod = "magnitude"\nsparsity = 0.3\n')
    with pytest.raises(UserError) as caught:
        spec_from_dict({"name": "invalid", "steps": [{"type": "prune", "sparsity": 1.5}]})
    expected = {broken: "is not valid TOML", invalid: caught.value.message}

    app = make_app("quickstart")
    async with app.run_test(size=SMALL) as pilot:
        await open_presets(pilot, app)
        before = copy.deepcopy(app.session.data)
        for path, message in expected.items():
            await pilot.press("o")
            await pick_file(pilot, app, path)
            await wait_for(pilot, lambda: isinstance(app.screen, MessageModal), what="the error")
            assert message in app.screen.message and app.screen.hint
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen.id == "screen-presets", what="the modal to close")
            assert app.session.data == before and app.session.preset == "quickstart"

        await pilot.press("o")
        await pick_file(pilot, app, good)
        await wait_for(pilot, lambda: app.session.preset == str(good), what="the good file to load")
        assert app.session.data == tomllib.loads(good.read_text())
        assert app.session.guide is None


@async_test
async def test_a_study_preset_opens_its_study_view_and_does_not_replace_the_setup():
    from workbench.screens.study import StudyScreen

    studies = [name for name in preset_names() if "study" in raw_preset(name)]
    assert studies
    app = make_app("quickstart")
    async with app.run_test(size=SMALL) as pilot:
        listing = await open_presets(pilot, app)
        before = copy.deepcopy(app.session.data)
        await highlight(pilot, listing, studies[0])
        preview = app.screen.query_one("#preset-preview")
        await wait_for(pilot, lambda: f"headless: workbench study {studies[0]}" in str(preview.content), what="the command")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, StudyScreen), what="the study view")
        assert app.screen.source == studies[0]
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen.id == "screen-presets", what="the Presets screen again")
        assert app.session.data == before and app.session.guide is None

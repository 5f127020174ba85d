"""The setup the UI edits: dotted-key edits, validation identical to the preset validator, saving as a preset."""

import pytest

from workbench.errors import UserError
from workbench.screens.config import load_config
from workbench.screens.session import Session, run_presets
from workbench.spec import load_preset, load_preset_data, spec_from_dict


def test_a_session_starts_as_the_preset_and_edits_reach_the_spec():
    s = Session("wanda-50")
    assert s.spec().to_dict() == load_preset("wanda-50").to_dict()
    s.set("steps.0.sparsity", 0.6)
    s.set("calibration.nsamples", 16)
    spec = s.spec()
    assert spec.steps[0].sparsity == 0.6 and spec.calibration.nsamples == 16
    assert s.get("steps.0.sparsity") == 0.6 and s.get("steps.7.sparsity", "none") == "none"
    s.set("calibration.nsamples", None)  # removed: the engine's default applies again
    assert "nsamples" not in s.data["calibration"] and s.spec().calibration.nsamples == spec_from_dict({}).calibration.nsamples


def test_the_problem_is_the_validators_own_message():
    s = Session("wanda-50")
    s.set("steps.0.sparsity", 1.5)
    data = load_preset_data("wanda-50")
    data["steps"][0]["sparsity"] = 1.5
    with pytest.raises(UserError) as expected:
        spec_from_dict(data)
    problem = s.problem()
    assert problem is not None and problem.message == expected.value.message and problem.hint == expected.value.hint
    s.set("steps.0.sparsity", 0.5)
    assert s.problem() is None


def test_steps_are_added_moved_and_removed_in_order():
    s = Session("quickstart")
    s.add_step({"type": "prune", "method": "magnitude", "sparsity": 0.2})
    s.add_step({"type": "lowrank", "retention": 0.9}, index=0)
    assert [st["type"] for st in s.steps] == ["lowrank", "prune", "prune"]
    assert s.move_step(0, +2) == 2
    assert [st.get("method") for st in s.steps] == ["wanda", "magnitude", None]
    s.remove_step(1)
    assert [st["type"] for st in s.spec().to_dict()["steps"]] == ["prune", "lowrank"]


def test_save_as_preset_writes_a_file_the_headless_run_reads_back(tmp_path):
    s = Session("owl-wanda-70")
    s.set("steps.0.sparsity", 0.65)
    path = s.save_preset(tmp_path / "mine")
    assert path.name == "mine.toml" and [p.name for p in tmp_path.iterdir()] == ["mine.toml"]  # no temporary left
    assert load_preset(str(path)).to_dict() == s.spec().to_dict()
    nested = s.save_preset(tmp_path / "new" / "folder" / "x.toml")
    assert load_preset(str(nested)).to_dict() == s.spec().to_dict()
    (tmp_path / "taken.toml").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        s.save_preset(tmp_path / "taken.toml")


def test_study_presets_are_not_single_runs():
    names = [name for name, _ in run_presets()]
    assert "quickstart" in names and not any(n.startswith("study-") for n in names)
    with pytest.raises(UserError, match="study"):
        Session("study-calibration-demo")


def test_settings_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[keymap]\n"screen.history" = "h"\n[backend]\nwhere = "ssh://gpu"\ngpus = "0,1"\n')
    config = load_config(path)
    assert config.problem is None and config.keymap == {"screen.history": "h"}
    assert (config.backend.where, config.backend.gpus) == ("ssh://gpu", "0,1")
    path.write_text("[keymap\n")
    broken = load_config(path)
    assert broken.problem is not None and str(path) in broken.problem[0] and broken.keymap == {}
    path.write_text('[backend]\nhost = "x"\n')
    assert "host" in load_config(path).problem[0]
    assert load_config(tmp_path / "missing.toml").problem is None

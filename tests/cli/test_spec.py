"""Presets and the run spec: parsing, validation messages, overrides."""

import json

import pytest

from workbench.errors import UserError
from workbench.presets import preset_names
from workbench.pruning.family import PruneStep
from workbench.spec import apply_override, load_preset, parse_toml, spec_from_dict, spec_to_toml

PAPER_PRESETS = ["magnitude-50", "wanda-50", "sparsegpt-50", "wanda-2of4", "sparsegpt-2of4", "owl-wanda-70"]


def test_shipped_presets_validate_and_cite_their_setting():
    names = preset_names()
    for name in ["quickstart", *PAPER_PRESETS]:
        assert name in names
    for name in PAPER_PRESETS:
        spec = load_preset(name)
        assert spec.reference, name
        # the papers' calibration setting: 128 C4 samples of 2048 tokens (capped at the model's context), seed 0
        assert (spec.calibration.source, spec.calibration.nsamples, spec.calibration.seed) == ("c4", 128, 0)
        assert spec.calibration.seqlen is None
        assert len(spec.steps) == 1 and isinstance(spec.steps[0], PruneStep)
    assert load_preset("wanda-2of4").steps[0].nm == (2, 4)
    owl = load_preset("owl-wanda-70").steps[0]
    assert (owl.allocation, owl.sparsity, owl.owl_m, owl.owl_lambda) == ("owl", 0.7, 5.0, 0.08)


QUANT_PRESETS = {  # name -> (method, weights, bits, group size) of its quantize step
    "gptq-w4a16": ("gptq", "int", 4, 128), "awq-w4a16": ("awq", "int", 4, 128), "rtn-w8a16": ("rtn", "int", 8, 0),
    "sparsegpt-2of4-w4a16": ("gptq", "int", 4, 128), "fp8-weights": ("rtn", "fp8", 4, 128),
}


def test_quantization_presets_validate_and_cite_their_setting():
    for name, (method, weights, bits, group) in QUANT_PRESETS.items():
        spec = load_preset(name)
        assert spec.reference and spec.description, name
        step = spec.steps[-1]
        assert step.type == "quantize" and (step.method, step.weights, step.bits, step.group_size) == (method, weights, bits, group), name
        assert step.symmetric  # symmetric exports load everywhere
    two_four = load_preset("sparsegpt-2of4-w4a16").steps
    assert [s.type for s in two_four] == ["prune", "quantize"] and two_four[0].nm == (2, 4)
    gptq = load_preset("gptq-w4a16")
    assert (gptq.calibration.source, gptq.calibration.nsamples, gptq.calibration.seqlen) == ("c4", 128, None)


def test_overrides_reach_nested_keys_and_list_items():
    spec = load_preset("quickstart", ["steps.0.sparsity=0.6", "calibration.nsamples=8", "model.name=demo", 'evaluate.perplexity=["c4"]'])
    assert spec.steps[0].sparsity == 0.6
    assert spec.calibration.nsamples == 8
    assert spec.evaluate.perplexity == ["c4"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("steps.0.sparsity=1.0", ["steps.0.sparsity", "1.0", "[0, 1)"]),
        ("steps.0.sparsity=-0.1", ["steps.0.sparsity", "-0.1"]),
        ("steps.0.pattern=4:4", ["4:4", "0 < N < M"]),
        ("steps.0.pattern=5:3", ["5:3"]),
        ("steps.0.pattern=half", ["half", "unstructured"]),
        ("steps.0.method=obs", ["steps.0.method", "obs", "magnitude, wanda, sparsegpt"]),
        ("calibration.source=books2", ["books2", "c4, wikitext2, books"]),
        ("calibration.nsamples=0", ["calibration.nsamples"]),
        ("calibration.colour=1", ["calibration.colour", "nsamples"]),
        ("model.dtype=int3", ["int3", "float32"]),
        ("evaluate.perplexity=['ptb']", ["ptb", "wikitext2"]),
        ("steps.3.sparsity=0.5", ["no item 3"]),
        ("calibration.nsamples=lots", ["calibration.nsamples", "lots", "integer"]),
    ],
)
def test_bad_values_name_the_key_the_value_and_the_allowed_ones(override, words):
    with pytest.raises(UserError) as info:
        load_preset("quickstart", [override])
    text = str(info.value)
    for word in words:
        assert word in text, (word, text)


def test_owl_lambda_that_would_leave_the_range_is_refused():
    with pytest.raises(UserError, match="owl_lambda"):
        load_preset("owl-wanda-70", ["steps.0.owl_lambda=0.35"])


def test_nm_with_owl_is_refused():
    with pytest.raises(UserError, match="N:M"):
        load_preset("owl-wanda-70", ["steps.0.pattern=2:4"])


def test_malformed_toml_and_unknown_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[model\nname = 'demo'\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_preset(str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("name = 'x'\nmodle = 3\n")
    with pytest.raises(UserError, match="unknown key 'modle'"):
        load_preset(str(unknown))
    with pytest.raises(UserError, match="does not exist"):
        load_preset(str(tmp_path / "missing.toml"))


def test_spec_survives_json_and_toml_round_trips():
    spec = load_preset("owl-wanda-70", ["calibration.seqlen=256"])
    again = spec_from_dict(json.loads(spec.to_json()))
    assert again == spec
    from_toml = spec_from_dict(parse_toml(spec_to_toml(spec), "written"))
    assert from_toml == spec


def test_override_syntax_errors():
    with pytest.raises(UserError, match="key=value"):
        apply_override({}, "steps.0.sparsity")

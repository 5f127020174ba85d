"""Structured steps in run specs and presets: parsing, labels, and one clear message for each impossible setting."""

from __future__ import annotations

import pytest

from workbench.errors import UserError
from workbench.spec import load_preset, spec_from_dict
from workbench.structured.family import DepthStep, VocabStep, WidthStep


def _spec(step: dict):
    return spec_from_dict({"steps": [step]})


def test_shipped_structured_presets():
    openba = load_preset("openba-style")
    assert [s.type for s in openba.steps] == ["vocab", "depth", "width"]
    vocab, depth, width = openba.steps
    assert (vocab.fraction, vocab.source) == (0.5, "books")
    assert (depth.remove, depth.criterion, depth.selection) == (2, "block_influence", "middle")
    assert (width.mlp_width, width.method) == (0.75, "activation")
    assert "books" in openba.evaluate.perplexity and openba.evaluate.efficiency

    short = load_preset("shortgpt-25").steps[0]
    assert isinstance(short, DepthStep) and (short.fraction, short.criterion) == (0.25, "block_influence")
    flap = load_preset("flap-20").steps[0]
    assert isinstance(flap, WidthStep) and (flap.mlp_width, flap.attention_width, flap.method, flap.bias_compensation) == (0.8, 0.8, "flap", True)


def test_labels_say_what_the_step_does():
    assert DepthStep(remove=1, criterion="angular").label() == "depth: remove 1 layer (angular)"
    assert DepthStep(fraction=0.25, selection="middle").label() == "depth: remove 25% of layers (block influence, non-consecutive middle)"
    assert WidthStep(mlp_width=0.75, attention_heads=8, bias_compensation=True).label() == \
        "width: MLP 75% and 8 heads (activation, bias compensation)"
    assert VocabStep(size=4096, source="books").label() == "vocabulary: keep 4096 tokens (books)"


@pytest.mark.parametrize("step,message,hint", [
    ({"type": "depth", "fraction": 1.0}, "steps.0.fraction = 1.0 is outside (0, 1)", "removes every layer"),
    ({"type": "depth", "remove": 0}, "steps.0.remove = 0 must be at least 1", "number of decoder layers"),
    ({"type": "depth"}, "set exactly one of remove and fraction", "remove = 2"),
    ({"type": "depth", "remove": 2, "fraction": 0.2}, "set exactly one of remove and fraction", "remove = 2"),
    ({"type": "depth", "remove": 2, "criterion": "angular", "selection": "middle"}, "consecutive layers", "block_influence"),
    ({"type": "depth", "remove": 2, "criterion": "entropy"}, "steps.0.criterion = 'entropy' is not allowed", "block_influence"),
    ({"type": "width", "mlp_width": 0.0}, "steps.0.mlp_width = 0.0 is outside (0, 1]", "fraction kept"),
    ({"type": "width", "mlp_width": 1.2}, "steps.0.mlp_width = 1.2 is outside (0, 1]", "fraction kept"),
    ({"type": "width", "attention_width": -0.5}, "steps.0.attention_width = -0.5 is outside (0, 1]", "fraction kept"),
    ({"type": "width"}, "this width step removes nothing", "below 1"),
    ({"type": "width", "attention_heads": 0}, "steps.0.attention_heads = 0 must be at least 1", "query heads"),
    ({"type": "width", "attention_heads": 4, "attention_width": 0.5}, "attention_width or attention_heads, not both", "exact count"),
    ({"type": "width", "mlp_width": 0.5, "method": "taylor"}, "steps.0.method = 'taylor' is not allowed", "flap"),
    ({"type": "vocab", "size": 256}, "not larger than the byte alphabet (256 tokens)", "every byte needs a token"),
    ({"type": "vocab", "size": 100}, "not larger than the byte alphabet", "any text"),
    ({"type": "vocab", "fraction": 1.5}, "steps.0.fraction = 1.5 is outside (0, 1)", "fraction of the vocabulary"),
    ({"type": "vocab", "size": 4096, "source": "nowhere"}, "steps.0.source = 'nowhere' is not a calibration source", "file:PATH"),
    ({"type": "vocab", "size": 4096, "source": "random"}, "steps.0.source = 'random' is not a text corpus", "books"),
    ({"type": "vocab", "size": 4096, "source": "mix:c4=0.5,books=0.5"}, "is not a text corpus", "file:PATH"),
])
def test_impossible_settings_get_one_clear_message(step, message, hint):
    with pytest.raises(UserError) as info:
        _spec(step)
    assert message in info.value.message
    assert hint in info.value.hint


def test_unknown_keys_name_the_allowed_ones():
    with pytest.raises(UserError, match="unknown key 'steps.0.layers'") as info:
        _spec({"type": "depth", "layers": 2})
    assert "remove" in info.value.hint and "criterion" in info.value.hint

"""Every step checked against the loaded model before the first step runs.

A setting that only the model can judge (removing more layers than it has, a
vocabulary larger than its own, an N:M pattern its input sizes do not divide,
a width its grouped-query layout cannot take) fails right after loading, with
the step it belongs to, instead of after earlier steps have spent their time.

The steps are walked in order over ``ModelFacts``, a small description of the
model that each structural step updates as it would change it (layers removed,
vocabulary kept), so a second depth step is judged against the layers the
first one leaves. What a step's runner checks again when it runs stays there:
the preflight is an early copy of the cheap checks, not a replacement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError


@dataclass
class ModelFacts:
    """What the steps before this one leave of the model (as far as checks need)."""

    adapter: object
    tokenizer: object
    layers: int
    vocab: int
    steps_before: list[str] = field(default_factory=list)  # the step types already walked

    @classmethod
    def of(cls, loaded) -> "ModelFacts":
        return cls(adapter=loaded.adapter, tokenizer=loaded.tokenizer, layers=len(loaded.adapter.layers),
                   vocab=len(loaded.tokenizer))


def _prune(facts: ModelFacts, step, where: str) -> None:
    from .models import weight_matrix

    adapter = facts.adapter
    if step.include_lm_head and adapter.tied_lm_head:
        raise UserError(f"{where}: the LM head shares its weights with the input embeddings",
                        "leave include_lm_head off for this model")
    nm = step.nm
    if nm and "width" not in facts.steps_before and "lowrank" not in facts.steps_before:
        m = nm[1]
        for name, module in adapter.linear_modules(adapter.layers[0]).items():
            cols = weight_matrix(module).shape[1]
            if cols % m:
                raise UserError(f"{where}: pattern {step.pattern}: {name} has {cols} input features, not a multiple of {m}",
                                "choose M dividing every layer's input size (2:4 and 4:8 fit all common models)")


def _depth(facts: ModelFacts, step, where: str) -> None:
    from .structured import depth as D
    from .structured.layout import DECODER_FAMILIES, require_model_type

    require_model_type(facts.adapter, "depth pruning", DECODER_FAMILIES)
    count = D.layer_count(facts.layers, step.remove, step.fraction, where)
    if step.selection == "middle":
        D.check_middle(facts.layers, count)
    facts.layers -= count


def _width(facts: ModelFacts, step, where: str) -> None:
    from .structured import width as W
    from .structured.layout import LLAMA_LIKE, require_model_type

    require_model_type(facts.adapter, "width pruning", LLAMA_LIKE)
    if "lowrank" in facts.steps_before:
        return  # its runner refuses factorized projections with the layer it finds them in
    geom = W.geometry(facts.adapter.layers[0], W.head_dim(facts.adapter.config))
    group = geom.num_heads // geom.num_kv_heads
    if step.attention_heads is not None and (step.attention_heads % group or step.attention_heads > geom.num_heads):
        raise UserError(f"{where}.attention_heads = {step.attention_heads} breaks the grouped-query layout: each "
                        f"key/value head serves {group} query heads and layers have {geom.num_heads} query heads",
                        f"use a multiple of {group} from {group} to {geom.num_heads}")


def _vocab(facts: ModelFacts, step, where: str) -> None:
    from .structured.vocab import read_vocabulary

    read_vocabulary(facts.tokenizer)  # a tokenizer vocabulary pruning cannot handle is refused now
    if step.size is not None:
        if step.size >= facts.vocab:
            raise UserError(f"{where}: the vocabulary has {facts.vocab} tokens, so keeping {step.size} removes nothing",
                            f"keep fewer than {facts.vocab} tokens (size), or use fraction")
        facts.vocab = step.size
    elif step.fraction is not None:
        facts.vocab = max(1, round(facts.vocab * step.fraction))


CHECKS = {"prune": _prune, "depth": _depth, "width": _width, "vocab": _vocab}


def check_steps(loaded, steps: list) -> None:
    """Check every step against ``loaded`` in order; the first problem is a UserError naming its step."""
    facts = ModelFacts.of(loaded)
    for index, step in enumerate(steps):
        check = CHECKS.get(step.type)
        if check is not None:
            check(facts, step, f"steps.{index}")
        facts.steps_before.append(step.type)


__all__ = ["check_steps", "ModelFacts", "CHECKS"]

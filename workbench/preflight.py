"""Every step checked against the loaded model before the first step runs.

A setting that only the model can judge (removing more layers than it has, a
vocabulary larger than its own, an N:M pattern its input sizes do not divide,
a width its grouped-query layout cannot take) fails right after loading, with
the step it belongs to, instead of after earlier steps have spent their time.

The steps are walked in order over ``ModelFacts``, a small description of the
model that each structural step's check updates as it would change it
(layers removed, vocabulary kept), so a second depth step is judged against
the layers the first one leaves. Each step type registers its ``check``
(``workbench.registry``). What a step's runner checks again when it runs
stays there: the preflight is an early copy of the cheap checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .registry import load, step_type


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


def check_steps(loaded, steps: list) -> None:
    """Check every step against ``loaded`` in order (each type's registered ``check``); the first problem is a UserError."""
    facts = ModelFacts.of(loaded)
    for index, step in enumerate(steps):
        entry = step_type(step.type)
        if entry.check is not None:
            load(entry.check)(facts, step, f"steps.{index}")
        facts.steps_before.append(step.type)


__all__ = ["check_steps", "ModelFacts"]

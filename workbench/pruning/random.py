"""Random pruning: uniformly random weights go, a floor every scoring method has to beat in a study.

The scores are uniform random numbers from ``group.options["generator"]``
(seeded by ``calibration.seed`` and the layer), masked like any other score:
per output row by default, across the matrix with ``scope = "matrix"``, or N:M.
"""

from __future__ import annotations

import torch

from .methods import Group, _masked


def prune(group: Group) -> dict[str, dict]:
    generator = group.options["generator"]
    return _masked(group, lambda w: torch.rand(w.shape, generator=generator).to(w.device))


__all__ = ["prune"]

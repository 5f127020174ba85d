"""The two-layer module that replaces a factorized linear, and the rebuild of saved checkpoints.

``LowRankLinear`` computes ``B (A x) + b'`` with ``A`` (rank x in) in
``.a`` and ``B`` (out x rank) with the bias in ``.b``; its state-dict keys are
``NAME.a.weight``, ``NAME.b.weight`` and ``NAME.b.bias``. A factorized
checkpoint records, in ``compression.json``, one structure entry of kind
``"lowrank"`` listing every replaced module with its shape, rank and bias, and
``apply_structure`` (registered in ``workbench.rebuild``) rebuilds those
modules before the weights are loaded.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from workbench.errors import UserError


class LowRankLinear(nn.Module):
    """``y = B (A x) + b'``: a rank-``rank`` pair in place of an (out x in) linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, dtype=None) -> "LowRankLinear":
        """A module holding ``a`` (rank x in), ``b`` (out x rank) and ``bias``, cast to ``dtype``."""
        dtype = dtype or a.dtype
        module = cls(a.shape[1], b.shape[0], a.shape[0], bias is not None, device="meta", dtype=dtype)
        module.a.weight = nn.Parameter(a.to(dtype).contiguous(), requires_grad=False)
        module.b.weight = nn.Parameter(b.to(dtype).contiguous(), requires_grad=False)
        if bias is not None:
            module.b.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.b.bias is not None}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at dotted ``name`` under ``root``; return the module it replaces."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, leaf)
    setattr(parent, leaf, module)
    return old


@contextmanager
def swapped(root: nn.Module, replacements: dict[str, nn.Module]):
    """``replacements`` (dotted name under ``root`` -> module) in place for the block, the originals back after."""
    originals = {name: set_submodule(root, name, module) for name, module in replacements.items()}
    try:
        yield
    finally:
        for name, module in originals.items():
            set_submodule(root, name, module)


def structure_entry(modules: dict[str, dict]) -> dict:
    """The ``compression.json`` structure entry for factorized modules: ``{qualified name: {out, in, rank, bias}}``."""
    return {"kind": "lowrank", "modules": modules}


def apply_structure(model: nn.Module, entry: dict) -> None:
    """Replace each module named in a ``lowrank`` structure entry by an empty ``LowRankLinear`` of its rank.

    The new modules take the dtype and device of the modules they replace (the
    meta device while a checkpoint is rebuilt); the saved weights fill them next.
    """
    modules = entry.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise UserError("a 'lowrank' structure entry lists no modules", "re-export the model")
    for name, info in modules.items():
        try:
            old = model.get_submodule(name)
            rank, out_features, in_features, bias = int(info["rank"]), int(info["out"]), int(info["in"]), bool(info["bias"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"the 'lowrank' structure entry for {name!r} does not fit the model: {exc}",
                            "the folder's config.json and compression.json come from different exports; export again") from None
        weight = getattr(old, "weight", None)
        new = LowRankLinear(in_features, out_features, rank, bias, device=getattr(weight, "device", None),
                            dtype=getattr(weight, "dtype", None))
        set_submodule(model, name, new)

"""Where a whole model runs while it is evaluated: one GPU, all GPUs, or the CPU; never a failure.

The engine keeps the model in CPU memory between stages (compression moves one
layer at a time to the device). Evaluations need the whole model: it goes to
the compute device when it fits that device's free memory; a model larger than
one GPU is spread over all of them with accelerate's device map (whole decoder
layers per GPU); a model larger than all of them stays in CPU memory and runs
there. Afterwards it is back on the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

# Free memory a placement leaves for activations, logits and the KV cache, as a fraction of the weights.
HEADROOM = 0.25


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def plan(need: int, free: list[int], headroom: float = HEADROOM) -> str:
    """``"single"`` (the first device holds it), ``"split"`` (all devices together do) or ``"cpu"``."""
    want = need * (1 + headroom)
    if free and want <= free[0]:
        return "single"
    if len(free) > 1 and want <= sum(free):
        return "split"
    return "cpu"


def split_map(model, free: dict[int, int], headroom: float = HEADROOM) -> dict | None:
    """accelerate's device map over the GPUs in ``free`` (bytes each), whole decoder layers per GPU; None if it does not fit."""
    from accelerate import infer_auto_device_map

    from workbench.models import get_adapter

    layer_class = type(get_adapter(model).layers[0]).__name__
    max_memory = {i: int(b / (1 + headroom)) for i, b in free.items()}
    max_memory["cpu"] = 0
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=[layer_class])
    if any(not isinstance(d, int) for d in device_map.values()):
        return None
    return dict(device_map)


def _free_memory(device: torch.device) -> dict[int, int]:
    order = [device.index or 0] + [i for i in range(torch.cuda.device_count()) if i != (device.index or 0)]
    return {i: torch.cuda.mem_get_info(i)[0] for i in order}


@contextmanager
def placed(model, device, warn: Callable[[str], None] | None = None):
    """Run the block with ``model`` where it fits; yields the device its inputs go to."""
    device = torch.device(device)
    if device.type != "cuda":
        yield device
        return
    free = _free_memory(device)
    how = plan(model_bytes(model), list(free.values()))
    device_map = split_map(model, free) if how == "split" else None
    if how == "split" and device_map is None:
        how = "cpu"
    if how == "cpu":
        if warn is not None:
            warn(f"the model ({model_bytes(model) / 2**30:.1f} GiB) does not fit the free GPU memory; evaluating on the CPU")
        yield torch.device("cpu")
        return
    try:
        if how == "single":
            model.to(device)
        else:
            from accelerate import dispatch_model

            dispatch_model(model, device_map=device_map)
        yield torch.device("cuda", next(iter(free)))
    finally:
        if how == "split":
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(model, recurse=True)
        model.to("cpu")
        torch.cuda.empty_cache()

"""Layer-by-layer calibration: one decoder layer on the compute device at a time.

``capture_inputs`` runs the model's own forward up to the decoder layers and
records, for every layer and every calibration batch, the exact positional and
keyword arguments the model passes it (attention mask, position ids, rotary
embeddings, per-layer masks of sliding-window models...), with the KV cache
removed: a cache handed from call to call would make each layer attend to keys
left by earlier samples. Layer 0's input hidden states are kept; the layers
themselves are not computed during capture.

``LayerRunner`` re-runs one layer over those inputs to turn them into the
next layer's inputs, in place; ``Resident`` keeps one layer on the compute
device meanwhile. The per-layer loop itself, with the statistics methods
need, is ``workbench.sweep``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")


class StopForward(Exception):
    """Raised in a hook to stop a forward pass early (at the final norm, or once the statistics are in)."""


def _is_cache(value) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Cache)


def _sanitize(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args = tuple(None if _is_cache(a) else a for a in args)
    clean = {}
    for key, value in kwargs.items():
        if key in _CACHE_KWARGS or _is_cache(value):
            clean[key] = None
        elif key == "use_cache":
            clean[key] = False
        else:
            clean[key] = value
    return args, clean


def _share_equal(value, reference):
    """Reuse the first batch's tensors where a later batch's are equal (masks, rotary tables)."""
    if isinstance(value, torch.Tensor) and isinstance(reference, torch.Tensor):
        if value is reference:
            return reference
        if value.shape == reference.shape and value.dtype == reference.dtype and value.device == reference.device and torch.equal(value, reference):
            return reference
        return value
    if isinstance(value, tuple) and isinstance(reference, tuple) and len(value) == len(reference):
        return tuple(_share_equal(v, r) for v, r in zip(value, reference))
    return value


@dataclass
class Captured:
    """Layer 0's inputs per batch and every layer's other arguments per batch."""

    hidden: list[torch.Tensor]  # per batch: (batch, seqlen, hidden), on the storage device
    layer_args: list[list[tuple[tuple, dict]]]  # [layer][batch] -> (args after hidden_states, kwargs)


def _move_modules(modules: list[nn.Module], device) -> None:
    for module in modules:
        module.to(device)


@torch.no_grad()
def capture_inputs(adapter, tokens: torch.Tensor, device, batch_size: int = 8, store_device=None) -> Captured:
    """Run the model's forward over ``tokens`` (n, seqlen) and record every decoder layer's arguments."""
    model = adapter.model
    layers = adapter.layers
    store_device = torch.device(store_device) if store_device is not None else torch.device(device)
    batches = list(torch.split(tokens, batch_size))
    hidden: list[torch.Tensor] = []
    layer_args: list[list] = [[None] * len(batches) for _ in range(len(layers))]
    state = {"batch": 0}

    def recorder(index: int):
        def forward(*args, **kwargs):
            if args:
                states, rest = args[0], args[1:]
            else:
                states, rest = kwargs.pop("hidden_states"), ()
            rest, kwargs = _sanitize(rest, kwargs)
            b = state["batch"]
            if b > 0 and layer_args[index][0] is not None:
                ref_args, ref_kwargs = layer_args[index][0]
                rest = tuple(_share_equal(v, r) for v, r in zip(rest, ref_args))
                kwargs = {k: _share_equal(v, ref_kwargs.get(k)) for k, v in kwargs.items()}
            layer_args[index][b] = (rest, kwargs)
            if index == 0:
                hidden.append(states.detach().to(store_device))
            return states  # the layers are not computed during capture

        return forward

    stop_at = adapter.final_norm if adapter.final_norm is not None else adapter.lm_head

    def stop(module, inputs):
        raise StopForward

    pre = adapter.pre_layer_modules()
    handle = stop_at.register_forward_pre_hook(stop)
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    _move_modules(pre, device)
    try:
        for b, batch in enumerate(batches):
            state["batch"] = b
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward
        _move_modules(pre, _model_home(adapter))
    missing = [i for i, per_batch in enumerate(layer_args) if any(a is None for a in per_batch)]
    if missing:
        raise RuntimeError(f"decoder layers {missing} were not called by the model's forward")
    return Captured(hidden=hidden, layer_args=layer_args)


def _model_home(adapter) -> str:
    """Where the model's weights live between layer visits (the engine keeps them on the CPU)."""
    return getattr(adapter, "home_device", "cpu")


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class Resident:
    """Keeps one module on the compute device for a block, then puts its CPU tensors back.

    Moving back reuses the module's original CPU tensors instead of allocating
    new ones, and copies the device values into them only with ``write_back``
    (after compression changed the weights): a dense pass moves nothing back.
    Tensors the block created on the device (new submodules, such as a
    low-rank pair) are moved to the CPU. On a CPU device it does nothing.
    """

    def __init__(self, module: nn.Module, device, write_back: bool = False):
        self.module = module
        self.device = torch.device(device)
        self.write_back = write_back
        self._params: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._buffers: list[tuple[nn.Module, str, torch.Tensor]] = []

    def __enter__(self) -> nn.Module:
        if self.device.type == "cpu":
            return self.module
        self._already = {id(t) for mod in self.module.modules() for t in (*mod._parameters.values(), *mod._buffers.values())
                         if t is not None and t.device == self.device}
        for mod in self.module.modules():
            for param in mod._parameters.values():
                if param is not None and param.device != self.device:
                    self._params.append((param, param.data))
                    param.data = param.data.to(self.device)
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.device != self.device:
                    self._buffers.append((mod, name, buf))
                    mod._buffers[name] = buf.to(self.device)
        return self.module

    def __exit__(self, *exc) -> None:
        for param, home in self._params:
            if self.write_back and exc[0] is None:
                home.copy_(param.data)
            param.data = home
        for mod, name, home in self._buffers:
            mod._buffers[name] = home
        self._params.clear()
        self._buffers.clear()
        if self.device.type != "cpu":  # modules the block created on the device (a low-rank pair) go home too
            for mod in self.module.modules():
                for param in mod._parameters.values():
                    if param is not None and param.device == self.device and id(param) not in self._already:
                        param.data = param.data.to("cpu")
                for name, buf in list(mod._buffers.items()):
                    if buf is not None and buf.device == self.device and id(buf) not in self._already:
                        mod._buffers[name] = buf.to("cpu")


class LayerRunner:
    """Runs captured inputs through layers one at a time, in place."""

    def __init__(self, adapter, captured: Captured, device, store_device=None):
        self.adapter = adapter
        self.captured = captured
        self.device = torch.device(device)
        self.store_device = torch.device(store_device) if store_device is not None else self.device

    def forward_batch(self, layer: nn.Module, index: int, b: int) -> torch.Tensor:
        """Layer ``index``'s output for calibration batch ``b`` (its stored input left as it is)."""
        args, kwargs = self.captured.layer_args[index][b]
        x = self.captured.hidden[b].to(self.device)
        return _layer_output(layer(x, *args, **kwargs))

    def propagate_batch(self, layer: nn.Module, index: int, b: int) -> None:
        """Replace batch ``b``'s stored input by this layer's output."""
        self.captured.hidden[b] = self.forward_batch(layer, index, b).to(self.store_device)

    @torch.no_grad()
    def propagate(self, layer: nn.Module, index: int) -> None:
        """Replace the stored inputs by this layer's outputs (the next layer's inputs)."""
        for b in range(len(self.captured.hidden)):
            self.propagate_batch(layer, index, b)

    @torch.no_grad()
    def final_hidden(self) -> list[torch.Tensor]:
        """The last layer's outputs passed through the modules before the LM head (final norm...)."""
        post = self.adapter.post_layer_modules()
        _move_modules(post, self.device)
        outs = []
        for h in self.captured.hidden:
            x = h.to(self.device)
            for module in post:
                x = module(x)
            outs.append(x)
        _move_modules(post, _model_home(self.adapter))
        return outs

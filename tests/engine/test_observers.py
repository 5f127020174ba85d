"""The observer protocol and the layer sweep: every statistic equals a direct computation from captured tensors.

The independent reference records each linear's input and output with plain
forward hooks during an ordinary forward of the same layer on the same
batches, and computes each statistic from those tensors by its definition
(float64 where it matters). Linears that share an input (q/k/v, gate/up) must
get one observer object per statistic; a statistic defined here, outside the
package, works through the sweep as the built-in ones do.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from workbench.layerwise import capture_inputs
from workbench.models import get_adapter
from workbench.observers import GROUP, Hessian, InputAbsMean, InputMoments, OutputCovariance, SquaredNorm
from workbench.sweep import LayerSweep, Watch

SEQ, SAMPLES, BATCH = 12, 6, 4  # uneven batches: 4 and 2


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, use_cache=False)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tokens = torch.randint(0, 97, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))
    return model, tokens


def _recorded(adapter, tokens, layer_index: int):
    """Each linear's inputs and outputs in layer ``layer_index`` per batch, from ordinary forwards (no sweep)."""
    captured = capture_inputs(adapter, tokens, "cpu", batch_size=BATCH)
    with torch.no_grad():
        for i in range(layer_index):  # the dense inputs of the layer
            layer = adapter.layers[i]
            for b, h in enumerate(captured.hidden):
                args, kwargs = captured.layer_args[i][b]
                out = layer(h, *args, **kwargs)
                captured.hidden[b] = out[0] if isinstance(out, tuple) else out
        layer = adapter.layers[layer_index]
        seen: dict[str, dict[str, list]] = {}

        def keep(name):
            def hook(module, inputs, output):
                seen.setdefault(name, {"in": [], "out": []})
                seen[name]["in"].append(inputs[0].detach().clone())
                seen[name]["out"].append(output.detach().clone())

            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in adapter.linear_modules(layer).items()]
        for b, h in enumerate(captured.hidden):
            args, kwargs = captured.layer_args[layer_index][b]
            layer(h, *args, **kwargs)
        for handle in handles:
            handle.remove()
    return seen


def _stats_of(adapter, tokens, watch: Watch, layer_index: int, dense: bool):
    kept = {}
    sweep = LayerSweep(adapter, tokens, "cpu", batch_size=BATCH)
    sweep.run(lambda layer, i, stats: kept.__setitem__(i, stats), watch, dense=dense, layers=range(layer_index + 1))
    return kept[layer_index]


@pytest.mark.parametrize("dense", [False, True], ids=["compressing", "dense"])
@pytest.mark.parametrize("layer_index", [0, 1])
def test_input_statistics_equal_their_definitions(tiny, dense, layer_index):
    model, tokens = tiny
    adapter = get_adapter(model)
    seen = _recorded(adapter, tokens, layer_index)
    watch = Watch(inputs={"sq_norm": SquaredNorm, "hessian": Hessian, "abs_mean": InputAbsMean, "moments": InputMoments})
    stats = _stats_of(adapter, tokens, watch, layer_index, dense)
    for name, tensors in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors["in"]]).double()
        got = stats.inputs[name]
        torch.testing.assert_close(got["sq_norm"].double(), x.pow(2).sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["hessian"].double(), x.t() @ x, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["abs_mean"].double(), x.abs().mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["moments"].mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["moments"].variance.double(), x.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["moments"].norm.double(), x.norm(dim=0), rtol=1e-5, atol=1e-6)


def test_linears_reading_one_input_share_one_observer(tiny):
    model, tokens = tiny
    adapter = get_adapter(model)
    stats = _stats_of(adapter, tokens, Watch(inputs={"hessian": Hessian}), 0, dense=False)
    groups = sorted(sorted(g) for g in stats.groups)
    assert groups == sorted([["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                             ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]])
    h = {name: stats.inputs[name]["hessian"] for name in stats.inputs}
    assert h["self_attn.q_proj"] is h["self_attn.k_proj"] is h["self_attn.v_proj"]
    assert h["mlp.gate_proj"] is h["mlp.up_proj"] and h["mlp.down_proj"] is not h["mlp.up_proj"]


def test_output_covariance_equals_the_pooled_definition(tiny):
    model, tokens = tiny
    adapter = get_adapter(model)
    seen = _recorded(adapter, tokens, 0)
    names = ["self_attn.o_proj", "mlp.down_proj"]
    watch = Watch(outputs={"covariance": OutputCovariance},
                  linears=lambda i, layer: {n: adapter.linear_modules(layer)[n] for n in names})
    stats = _stats_of(adapter, tokens, watch, 0, dense=False)
    assert SAMPLES < GROUP  # one pooled group: the sample covariance of every token of every sample
    for name in names:
        y = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name]["out"]]).double()
        covariance, mean = stats.outputs[name]["covariance"]
        torch.testing.assert_close(mean.double(), y.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(covariance.double(), torch.cov(y.t()), rtol=1e-4, atol=1e-5)
    assert set(stats.outputs) == set(names)


class MaxAbs:
    """A statistic defined outside the package: the largest |x| of each feature."""

    def __init__(self, features: int, device):
        self.value = torch.zeros(features, device=device)

    def update(self, x: torch.Tensor) -> None:
        self.value = torch.maximum(self.value, x.reshape(-1, x.shape[-1]).abs().amax(0))

    def result(self) -> torch.Tensor:
        return self.value


def test_a_new_statistic_works_through_the_sweep(tiny):
    model, tokens = tiny
    adapter = get_adapter(model)
    seen = _recorded(adapter, tokens, 1)
    stats = _stats_of(adapter, tokens, Watch(inputs={"max_abs": MaxAbs}), 1, dense=True)
    for name, tensors in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors["in"]])
        torch.testing.assert_close(stats.inputs[name]["max_abs"], x.abs().amax(0))


def test_a_compressing_sweep_feeds_each_layer_the_changed_layers_outputs(tiny):
    """fn zeroes layer 0's MLP output projection; layer 1 must see the outputs of that changed layer."""
    model, tokens = tiny
    changed = copy.deepcopy(model)
    adapter = get_adapter(changed)
    with torch.no_grad():
        adapter.layers[0].mlp.down_proj.weight.zero_()
    expected = _recorded(adapter, tokens, 1)["self_attn.q_proj"]["in"]  # the changed model's own forward
    fresh = get_adapter(copy.deepcopy(model))
    seen = {}

    def change(layer, i, stats):
        if i == 0:
            layer.mlp.down_proj.weight.data.zero_()
        else:
            seen["x"] = stats.inputs["self_attn.q_proj"]["sq_norm"]

    LayerSweep(fresh, tokens, "cpu", batch_size=BATCH).run(change, Watch(inputs={"sq_norm": SquaredNorm}))
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in expected])
    torch.testing.assert_close(seen["x"], x.pow(2).sum(0), rtol=1e-5, atol=1e-6)

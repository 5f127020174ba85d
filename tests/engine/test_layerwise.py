"""Layer-by-layer execution reproduces the model's own forward, for every supported family.

The independent reference is the model's full forward pass: capturing the
inputs of layer 0 with every argument each layer receives, then running the
layers one at a time, must give the same logits. Sliding-window models check
that per-layer masks are captured per layer, and repeated batches check that no
KV cache leaks from one call to the next.
"""

import pytest
import torch
import transformers as tf

from workbench.observers import Hessian, SquaredNorm
from workbench.sweep import LayerSweep, Watch
from workbench.layerwise import LayerRunner, capture_inputs
from workbench.models import get_adapter

SEQ = 24

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=97, max_position_embeddings=64),
    "mistral-sliding": lambda: tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, sliding_window=6),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=97, max_position_embeddings=64),
    "qwen3": lambda: tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=64),
    "gemma": lambda: tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=8, vocab_size=97, max_position_embeddings=64),
    "gemma2-alternating": lambda: tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=64,
                                                  sliding_window=5),
    "opt": lambda: tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=97,
                                max_position_embeddings=64, word_embed_proj_dim=32),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=97, n_positions=64),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                         vocab_size=97, max_position_embeddings=64),
    "phi": lambda: tf.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                vocab_size=97, max_position_embeddings=64),
}


def _tiny(name):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config.use_cache = False
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_by_layer_reproduces_the_full_forward(name):
    model = _tiny(name)
    adapter = get_adapter(model)
    tokens = torch.randint(0, 97, (5, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=tokens, use_cache=False).logits
        captured = capture_inputs(adapter, tokens, "cpu", batch_size=2)  # uneven batches: 2, 2, 1
        assert [h.shape[0] for h in captured.hidden] == [2, 2, 1]
        runner = LayerRunner(adapter, captured, "cpu")
        for i, layer in enumerate(adapter.layers):
            runner.propagate(layer, i)
        logits = torch.cat([adapter.compute_logits(h) for h in captured.hidden])
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_sweep_statistics_group_linears_that_share_an_input():
    model = _tiny("llama")
    adapter = get_adapter(model)
    tokens = torch.randint(0, 97, (4, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        captured = capture_inputs(adapter, tokens, "cpu", batch_size=4)
        layer = adapter.layers[0]
        linears = adapter.linear_modules(layer)
        # independent: record each linear's input with plain hooks and compare
        seen = {}

        def keep(name):
            def hook(module, inputs, output):
                seen[name] = inputs[0].reshape(-1, inputs[0].shape[-1])

            return hook

        hooks = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
        args, kwargs = captured.layer_args[0][0]
        layer(captured.hidden[0], *args, **kwargs)
        for h in hooks:
            h.remove()
        kept = {}
        watch = Watch(inputs={"sq_norm": SquaredNorm, "hessian": Hessian})
        LayerSweep(adapter, device="cpu", captured=captured).run(lambda lay, i, s: kept.update(stats=s), watch,
                                                                 layers=range(1))
    stats = kept["stats"]
    groups = sorted(sorted(g) for g in stats.groups)
    assert groups == sorted([sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]), ["self_attn.o_proj"],
                             sorted(["mlp.gate_proj", "mlp.up_proj"]), ["mlp.down_proj"]])
    for name, x in seen.items():
        torch.testing.assert_close(stats.inputs[name]["sq_norm"], x.pow(2).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.inputs[name]["hessian"], x.t() @ x, rtol=1e-4, atol=1e-4)
    assert stats.inputs["self_attn.q_proj"]["hessian"] is stats.inputs["self_attn.v_proj"]["hessian"]  # computed once

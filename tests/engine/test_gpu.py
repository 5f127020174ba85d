"""Checks that need a CUDA device; skipped (with the reason) on machines without one."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _deep_llama(layers=16, hidden=512, intermediate=1536):
    import transformers as tf

    from workbench.models import LoadedModel, get_adapter

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=None, adapter=get_adapter(model), source="tiny", device=torch.device("cuda:0"),
                       dtype=torch.float32)


def test_layer_by_layer_on_cuda_matches_the_cpu_forward():
    from workbench.layerwise import LayerRunner, capture_inputs

    loaded = _deep_llama(4)
    tokens = torch.randint(0, 1000, (6, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = loaded.model(input_ids=tokens, use_cache=False).logits
        captured = capture_inputs(loaded.adapter, tokens, "cuda:0", batch_size=4)
        runner = LayerRunner(loaded.adapter, captured, "cuda:0")
        for i, layer in enumerate(loaded.adapter.layers):
            layer.to("cuda:0")
            runner.propagate(layer, i)
            layer.to("cpu")
        loaded.model.to("cuda:0")
        logits = torch.cat([loaded.adapter.compute_logits(h) for h in captured.hidden]).cpu()
        loaded.model.to("cpu")
    torch.testing.assert_close(logits, reference, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_sparsegpt_on_cuda_matches_the_cpu(pattern):
    from workbench.pruning.sparsegpt import sparsegpt_prune

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g)
    w = torch.randn(384, 256, generator=g)
    h = x.t() @ x
    n, m = pattern
    cpu = sparsegpt_prune(w, h, 0.5, n=n, m=m)
    gpu = sparsegpt_prune(w.cuda(), h.cuda(), 0.5, n=n, m=m)
    assert torch.equal(cpu.mask, gpu.mask.cpu()) or (cpu.mask != gpu.mask.cpu()).float().mean() < 1e-3
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_peak_gpu_memory_stays_near_one_layer(method):
    from workbench.pruning.runner import prune
    from workbench.pruning.family import PruneStep

    # Layers large enough that the CUDA libraries' fixed workspaces (tens of MB) do not dominate, and deep
    # enough that the whole model dwarfs what one layer needs: the layer, the activations, and the
    # statistics (SparseGPT's Hessians, in_features squared per linear, with working copies for down_proj:
    # about 7 layers' worth at these shapes). The peak does not grow with depth; the model does.
    loaded = _deep_llama(24, hidden=1024, intermediate=4096)
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    tokens = torch.randint(0, 1000, (16, 128), generator=torch.Generator().manual_seed(0))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    report = prune(loaded, tokens, PruneStep(method=method, sparsity=0.5), batch_size=8)
    peak = torch.cuda.max_memory_allocated() - before
    assert abs(report["sparsity"] - 0.5) < 0.01
    # the whole model never sits on the GPU: one layer, the embeddings, activations and statistics do
    assert peak < 0.35 * model_bytes, (peak, model_bytes)
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())

"""Efficiency: parameter counts against the masks, size against the files save_pretrained writes, speed, 2:4 on GPU."""

import json
import math
import struct

import pytest
import torch

from workbench.evaluation import efficiency, placement


def _tiny(tied: bool = False, hidden: int = 32, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=tied, pad_token_id=None, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config).to(dtype).eval()


def _prune_2_4(model) -> None:
    """Keep the two largest of every four consecutive weights in each row of every decoder linear."""
    for module in efficiency._decoder_linears(model).values():
        w = module.weight.data
        groups = w.reshape(-1, 4)
        keep = groups.abs().topk(2, dim=1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
        groups.mul_(mask)


def test_nonzero_parameters_match_the_masks(one_thread):
    model = _tiny()
    total_before, nonzero_before = efficiency.parameter_counts(model)
    assert total_before == sum(p.numel() for p in model.parameters())
    assert nonzero_before == total_before  # random normal weights and unit norms: no zero yet
    gen = torch.Generator().manual_seed(1)
    zeroed = 0
    for module in efficiency._decoder_linears(model).values():
        mask = torch.rand(module.weight.shape, generator=gen) < 0.6
        module.weight.data[mask] = 0
        zeroed += int(mask.sum())
    total, nonzero = efficiency.parameter_counts(model)
    assert total == total_before and nonzero == total_before - zeroed


def test_tied_embeddings_are_counted_once():
    tied, untied = _tiny(tied=True), _tiny(tied=False)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    emb = untied.get_input_embeddings().weight.numel()
    assert efficiency.parameter_counts(untied)[0] - efficiency.parameter_counts(tied)[0] == emb
    assert efficiency.disk_bytes(untied) - efficiency.disk_bytes(tied) == emb * 4


@pytest.mark.parametrize("tied, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_size_on_disk_equals_the_tensor_bytes_of_the_saved_files(tmp_path, tied, dtype):
    model = _tiny(tied=tied, dtype=dtype)
    model.save_pretrained(tmp_path)
    data = 0
    for f in tmp_path.glob("*.safetensors"):
        raw = f.read_bytes()
        header_len = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + header_len])
        data += sum(end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]])
    assert efficiency.disk_bytes(model) == data


def test_2_4_pattern_check():
    assert efficiency.is_2_4(torch.tensor([[1.0, 0, 0, 2, 0, 3, 4, 0]]))
    assert not efficiency.is_2_4(torch.tensor([[1.0, 1, 0, 2, 0, 3, 4, 0]]))
    assert not efficiency.is_2_4(torch.ones(2, 6))  # not a multiple of four columns
    model = _tiny()
    _prune_2_4(model)
    assert all(efficiency.is_2_4(m.weight) for m in efficiency._decoder_linears(model).values())
    total, nonzero = efficiency.parameter_counts(model)
    linear = sum(m.weight.numel() for m in efficiency._decoder_linears(model).values())
    assert total - nonzero == linear // 2


def test_measure_on_the_cpu(one_thread):
    model = _tiny()
    result = efficiency.measure(model, None, "cpu", seqlen=1000, new_tokens=4, repeats=1)
    assert result["seqlen"] == 128 - 4  # capped at the model's context, leaving room for the generated tokens
    assert set(result["runs"]) == {"dense"}  # no semi-structured kernels on the CPU
    dense = result["runs"]["dense"]
    assert dense["prefill_tokens_per_s"] > 0 and math.isfinite(dense["prefill_tokens_per_s"])
    assert dense["decode_ms_per_token"] >= 0 and dense["peak_memory_bytes"] > 0
    names = {(m["name"], m["dataset"]) for m in efficiency.metrics(result)}
    assert ("nonzero_parameters", "model") in names and ("prefill_tokens_per_s", "dense") in names


def test_placement_plan():
    assert placement.plan(10, [20]) == "single"
    assert placement.plan(10, [12]) == "cpu"  # no room for activations
    assert placement.plan(10, [8, 8]) == "split"
    assert placement.plan(10, [4, 4]) == "cpu"
    assert placement.plan(10, []) == "cpu"


def test_split_map_keeps_decoder_layers_whole():
    model = _tiny()
    per_layer = placement.model_bytes(model.model.layers[0])
    rest = placement.model_bytes(model) - 2 * per_layer
    free = {0: int((rest + per_layer) * 1.3), 1: int((rest + per_layer) * 1.3)}
    device_map = placement.split_map(model, free)
    assert device_map is not None and set(device_map.values()) == {0, 1}
    assert device_map.get("model.layers.0") in (0, 1) and device_map.get("model.layers.1") in (0, 1)
    assert placement.split_map(model, {0: per_layer, 1: per_layer}) is None  # does not fit: no map


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_2_4_model_gives_the_same_logits_sparse_and_dense():
    model = _tiny(hidden=256, dtype=torch.float16).cuda()
    _prune_2_4(model)
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        dense = model(input_ids=ids).logits.float()
        with efficiency.semi_structured(model) as converted:
            assert converted["converted"] == len(efficiency._decoder_linears(model))
            sparse = model(input_ids=ids).logits.float()
    assert torch.allclose(sparse, dense, atol=2e-2, rtol=2e-2)
    assert all(type(m.weight.data) is torch.Tensor for m in efficiency._decoder_linears(model).values())  # dense again
    result = efficiency.measure(model, None, "cuda", seqlen=64, new_tokens=4, repeats=1)
    assert set(result["runs"]) == {"dense", "2:4"}

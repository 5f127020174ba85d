"""A small random Llama with the demo model's tokenizer: fast, deterministic (seed 0), and not the demo model's answers."""

from __future__ import annotations


def tiny_llama(max_position_embeddings: int = 256):
    """``(model, tokenizer)``: 2 layers of width 32, grouped-query attention, the demo tokenizer's vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workbench.models import DEMO_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=max_position_embeddings, pad_token_id=1,
                         bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).eval(), tokenizer

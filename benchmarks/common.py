"""What several benchmarks share: a Llama-2-7B-shaped model with random weights, and the table printer.

torch is imported where the model is built, so the UI benchmark measures a process without it.
"""

from __future__ import annotations


def random_llama(device, layers: int, hidden: int = 4096, intermediate: int = 11008, dtype=None,
                 keep_on="cpu", **config_kwargs):
    """A Llama with random weights (N(0, 0.02) matrices, unit norms), made on ``device`` (fast on a GPU)
    and kept on ``keep_on`` (the engine moves one layer at a time to the GPU); ``dtype`` defaults to bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000,
                         max_position_embeddings=4096, **config_kwargs)
    dtype = dtype or torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=keep_on).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 0.02)
            else:
                p.fill_(1.0)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(keep_on)
    return model


def _gpu(r: dict) -> str:
    return f"{r['gpu_peak_gib']:.2f}" if r.get("gpu_peak_gib") is not None else "-"


# the columns every benchmark ends with: the ratio to its baseline and the peak memory
RATIO_AND_MEMORY = [
    ("x baseline", ">10", lambda r: f"{r['ratio']:.2f}"),
    ("CPU RSS GiB", ">12", lambda r: f"{r['cpu_rss_gib']:.2f}"),
    ("GPU peak GiB", ">13", _gpu),
]


def print_table(rows: list[dict], columns: list[tuple]) -> None:
    """Print ``rows`` under ``columns``: ``(title, format spec such as "<40" or ">9", row -> text)``."""
    head = " ".join(f"{title:{spec}}" for title, spec, _ in columns)
    print(head)
    print("-" * len(head))
    for r in rows:
        print(" ".join(f"{text(r):{spec}}" for _, spec, text in columns))

"""Self-generated calibration data: generation throughput and the calibration step's total time.

Each model gets, in one run:

- baseline: one teacher-forced forward pass over as many tokens as selfgen
  generates (no sampling, no KV cache): the least work that touches every
  generated position once;
- generation: ``selfgen.generate`` (sampling with the KV cache, batched);
  its tokens per second and its time as a multiple of the baseline;
- for the demo model, the whole calibration step as a run does it
  (generate, score, filter, cut windows, summary), with an empty cache and
  again with the set cached, and the same step on ``c4`` for comparison.

    python benchmarks/selfgen_bench.py                  # the demo model on the CPU: 128 x 512 tokens
    python benchmarks/selfgen_bench.py --llama7b        # also a Llama-2-7B-shaped random bf16 model, 128 x 2048, when CUDA is present
    python benchmarks/selfgen_bench.py --json out.json  # the rows as JSON too

A random-weight 7B model almost never emits its end-of-sequence token, so it
generates the full length: the worst case for time and KV-cache memory.
Model loading is excluded from every number.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_bench import measure  # noqa: E402  (wall time, peak CPU RSS, peak GPU memory)

from workbench.data import selfgen  # noqa: E402
from workbench.data.sampling import calibration_data  # noqa: E402
from workbench.data.sources import SourceContext  # noqa: E402
from workbench.data.summary import calibration_summary  # noqa: E402
from workbench.spec import SelfGenSpec  # noqa: E402


@torch.no_grad()
def teacher_forced(model, count: int, length: int, batch_size: int, vocab: int, device) -> int:
    """One forward pass over ``count`` random sequences of ``length`` tokens, in batches; returns the tokens processed."""
    gen = torch.Generator().manual_seed(0)
    for start in range(0, count, batch_size):
        rows = min(batch_size, count - start)
        ids = torch.randint(0, vocab, (rows, length), generator=gen).to(device)
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return count * length


def generation_rows(label, model, prompts, params, max_new, eos, device, rows):
    vocab = int(model.get_output_embeddings().weight.shape[0])
    length = len(prompts[0]) + max_new
    holder = {}
    base_s, base_rss, base_gpu = measure(
        lambda: holder.update(tokens=teacher_forced(model, len(prompts), length, params.batch_size, vocab, device)), device)
    rows.append({"model": label, "what": "baseline: teacher-forced forward", "seconds": base_s, "tokens": holder["tokens"],
                 "ratio": 1.0, "cpu_rss_gib": base_rss, "gpu_peak_gib": base_gpu})
    gen_s, gen_rss, gen_gpu = measure(lambda: holder.update(out=selfgen.generate(model, prompts, params, max_new, eos, 0, device)), device)
    new_tokens = holder["out"][1]
    rows.append({"model": label, "what": f"generation ({len(prompts)} x {max_new} new, batch {params.batch_size})", "seconds": gen_s,
                 "tokens": new_tokens, "ratio": gen_s / base_s, "cpu_rss_gib": gen_rss, "gpu_peak_gib": gen_gpu})
    print(f"  {label}: generated {new_tokens:,} tokens in {gen_s:.1f} s", file=sys.stderr, flush=True)
    return holder["out"][0]


def demo_rows(nsamples, seqlen, batch_size, rows):
    from workbench.models import load_model

    loaded = load_model("demo", dtype="float32", device="cpu")
    device = torch.device("cpu")
    params = SelfGenSpec(batch_size=batch_size)
    count = math.ceil(nsamples / params.keep)
    tok = loaded.tokenizer
    prompts = selfgen.pick_prompts(selfgen.seed_texts(params.corpus), tok, count, params.prefix_tokens, 0)
    label = f"demo (cpu, fp32, {nsamples}x{seqlen})"
    max_new = selfgen.max_new_tokens(loaded.model, tok, params, seqlen)  # as the calibration step generates
    generation_rows(label, loaded.model, prompts, params, max_new, tok.eos_token_id, device, rows)

    with tempfile.TemporaryDirectory() as cache:
        context = SourceContext(options={"selfgen": params}, device=device)

        def step(source):
            data = calibration_data(source, tok, nsamples, seqlen, 0, cache, loaded.model, context, with_documents=True)
            calibration_summary(data, tok, loaded.model, device)

        base_s, base_rss, _ = measure(lambda: step("c4"), device)
        rows.append({"model": label, "what": "calibration step: c4", "seconds": base_s, "tokens": nsamples * seqlen, "ratio": 1.0,
                     "cpu_rss_gib": base_rss, "gpu_peak_gib": None})
        for what in ("calibration step: selfgen, empty cache", "calibration step: selfgen, cached"):
            s, rss, _ = measure(lambda: step("selfgen"), device)
            rows.append({"model": label, "what": what, "seconds": s, "tokens": nsamples * seqlen, "ratio": s / base_s,
                         "cpu_rss_gib": rss, "gpu_peak_gib": None})


def llama7b_rows(device, nsamples, seqlen, batch_size, layers, rows):
    from common import random_llama

    model = random_llama(device, layers, keep_on=device, bos_token_id=1, eos_token_id=2)
    config = model.config
    params = SelfGenSpec(batch_size=batch_size)
    count = math.ceil(nsamples / params.keep)
    prompts = torch.randint(3, config.vocab_size, (count, 1 + params.prefix_tokens), generator=torch.Generator().manual_seed(0))
    prompts[:, 0] = config.bos_token_id
    label = f"llama-7b shape ({layers} layers, bf16, {nsamples}x{seqlen})"
    seqs = generation_rows(label, model, prompts.tolist(), params, seqlen, config.eos_token_id, device, rows)
    s, rss, gpu = measure(lambda: selfgen.sample_perplexities(model, seqs, device), device)
    rows.append({"model": label, "what": "scoring the samples (filter)", "seconds": s, "tokens": sum(map(len, seqs)),
                 "ratio": s / rows[-2]["seconds"], "cpu_rss_gib": rss, "gpu_peak_gib": gpu})


def print_table(rows):
    from common import RATIO_AND_MEMORY, print_table as print_rows

    def rate(r):
        return f"{r['tokens'] / r['seconds'] if r['seconds'] else float('nan'):,.0f}"

    print_rows(rows, [("model", "<40", lambda r: r["model"]), ("what", "<44", lambda r: r["what"]),
                      ("wall s", ">8", lambda r: f"{r['seconds']:.2f}"), ("tokens/s", ">9", rate)] + RATIO_AND_MEMORY)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="demo model seqlen (its context is 512)")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences generated at once")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--llama7b", action="store_true", help="also the 7B shape on CUDA (128 x 2048)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the 7B shape")
    ap.add_argument("--llama7b-tokens", default="128x2048", help="calibration of the 7B shape, NxL")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    rows: list[dict] = []
    if not args.skip_demo:
        demo_rows(args.nsamples, args.seqlen, args.batch_size, rows)
    if args.llama7b:
        if torch.cuda.is_available():
            n, l = (int(v) for v in args.llama7b_tokens.split("x"))
            llama7b_rows(torch.device("cuda"), n, l, args.batch_size, args.layers, rows)
            print(f"GPU: {torch.cuda.get_device_name(0)}")
        else:
            print("no CUDA device: skipping the 7B shape", file=sys.stderr)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M')}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

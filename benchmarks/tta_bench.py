"""Per-query latency of test-time adaptation (none / Tent / PCL), with the plain evaluation as the baseline in the same run.

The model (the demo model by default, or a random-weight model of a given
shape) answers the ``books-next`` queries (four candidate sentences after a
passage) three ways, each in its own process so that peak memory is its own:

- none: the plain evaluation (one forward per query);
- tent: one Adam step on the normalization parameters per batch of queries,
  minimizing the entropy of the choice distribution, then the plain forward;
- pcl: one clean and one perturbed forward per query and one step per batch,
  then the plain forward.

    python benchmarks/tta_bench.py                       # the demo model, 64 queries, CPU
    python benchmarks/tta_bench.py --shape 7b --device cuda --dtype bfloat16 --queries 32

Prints wall time, seconds per query, the ratio to none and peak memory (host
RSS, and GPU memory on CUDA).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {  # random-weight Llama shapes (hidden, intermediate, layers, heads, kv heads)
    "7b": (4096, 11008, 32, 32, 32),
    "1b": (2048, 5632, 22, 32, 4),
}


def _load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from workbench.models import DEMO_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    dtype = getattr(torch, args.dtype)
    if args.shape == "demo":
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, torch_dtype=dtype)
    else:
        h, i, n, a, kv = SHAPES[args.shape]
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                             num_attention_heads=a, num_key_value_heads=kv, max_position_embeddings=2048)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.to(args.device).eval(), tokenizer


def one(args) -> dict:
    """One mode in this process."""
    import torch

    from workbench.evaluation.icl import ICLConfig, evaluate_dataset
    from workbench.evaluation.tta import TTAConfig

    torch.set_num_threads(args.threads)
    model, tokenizer = _load(args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    [result] = evaluate_dataset(model, tokenizer, "books-next", [ICLConfig(mode="zeroshot")], seeds=1, limit=args.queries,
                                adaptations=[TTAConfig(args.mode, lr=args.lr, steps=args.steps, batch=args.batch)])
    if args.device == "cuda":
        torch.cuda.synchronize()
    return {"mode": args.mode, "wall_s": time.perf_counter() - started, "s_per_query": result["extra"]["seconds_per_query"],
            "accuracy": result["value"], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="demo", choices=["demo", *SHAPES])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one(args)))
        return 0
    rows = []
    for mode in ("none", "tent", "pcl"):
        argv = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = rows[0]["s_per_query"]
    print(f"{args.shape} on {args.device} ({args.dtype}), books-next, {args.queries} queries, batch {args.batch}, "
          f"{args.steps} step(s), lr {args.lr}")
    print(f"{'mode':<6} {'wall s':>8} {'ms/query':>9} {'x none':>7} {'acc':>6} {'peak RSS MiB':>13} {'peak GPU MiB':>13}")
    for r in rows:
        r["ratio"] = r["s_per_query"] / base
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(f"{r['mode']:<6} {r['wall_s']:>8.2f} {1000 * r['s_per_query']:>9.1f} {r['ratio']:>7.2f} {r['accuracy']:>6.3f} "
              f"{r['peak_rss_mib']:>13.0f} {gpu:>13}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Structured compression of the demo model: quality of each criterion, and size and speed of the exported models.

    OMP_NUM_THREADS=1 python benchmarks/structured_demo.py [--limit 100] [--nsamples 64] [--only depth,width,vocab,openba]

Every configuration is a headless engine run (``workbench.engine.Run``) on
the CPU in float32: calibration on ``books`` (the two held-out calibration
books, ``nsamples`` windows of 512 tokens, seed 0), perplexity and bits per
byte at seqlen 512 on WikiText-2 test and the four held-out evaluation books
(the first ``limit`` windows of each). Groups:

- depth: 2 of 8 layers removed by Block Influence (lowest, and OpenBA-V2's
  non-adjacent middle rule), angular distance (one block), exact perplexity
  increase, the last two layers, and random choices (seeds 0, 1, 2);
- width: MLP width 75% by activation-aware scores, FLAP (with and without
  bias compensation), weight magnitude and random channels;
- vocab: 4,096 tokens counted on the calibration books;
- openba: the ``openba-style`` preset.

Then the dense model and one model per group are exported (bfloat16, as the
demo checkpoint) and reloaded with ``AutoModelForCausalLM`` and
``AutoTokenizer``; for each the script prints size on disk, parameters,
prefill throughput (one 512-token window of held-out text) and
greedy decode latency (64 new tokens after a 32-token prompt, KV cache), in
float32 on this CPU, the models taking turns over ``rounds`` rounds (medians),
and the ratios to the dense model measured in the same process. Peak memory
is the process's maximum resident set.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.engine import Run  # noqa: E402
from workbench.perplexity import eval_text  # noqa: E402
from workbench.spec import spec_from_dict  # noqa: E402

DEPTH = [
    ("BI, lowest", {"criterion": "block_influence"}),
    ("BI, middle (OpenBA-V2)", {"criterion": "block_influence", "selection": "middle"}),
    ("angular block", {"criterion": "angular"}),
    ("perplexity (exact)", {"criterion": "perplexity"}),
    ("last two", {"criterion": "last"}),
    *[(f"random, seed {s}", {"criterion": "random", "seed": s}) for s in (0, 1, 2)],
]
WIDTH = [
    ("activation", {"method": "activation"}),
    ("flap", {"method": "flap"}),
    ("flap + bias compensation", {"method": "flap", "bias_compensation": True}),
    ("magnitude", {"method": "magnitude"}),
    ("random", {"method": "random"}),
]
OPENBA = [{"type": "vocab", "fraction": 0.5, "source": "books"},
          {"type": "depth", "remove": 2, "criterion": "block_influence", "selection": "middle"},
          {"type": "width", "mlp_width": 0.75, "method": "activation"}]
# One exported model per group for the size and speed comparison.
EXPORTED = ("dense", "depth: BI, lowest", "width: activation", "vocab: 4096 (books)", "openba-style")


def configurations(groups: set[str]) -> list[tuple[str, list[dict]]]:
    configs = [("dense", [])]
    if "depth" in groups:
        configs += [(f"depth: {name}", [{"type": "depth", "remove": 2, **kw}]) for name, kw in DEPTH]
    if "width" in groups:
        configs += [(f"width: {name}", [{"type": "width", "mlp_width": 0.75, **kw}]) for name, kw in WIDTH]
    if "vocab" in groups:
        configs.append(("vocab: 4096 (books)", [{"type": "vocab", "size": 4096, "source": "books"}]))
    if "openba" in groups:
        configs.append(("openba-style", OPENBA))
    return configs


def run(name: str, steps: list[dict], args, out: Path | None) -> dict:
    spec = spec_from_dict({
        "name": name, "model": {"name": "demo", "dtype": "float32", "device": "cpu"},
        "calibration": {"source": "books", "nsamples": args.nsamples, "seqlen": 512, "seed": 0},
        "steps": steps,
        "evaluate": {"perplexity": ["wikitext2", "books"], "seqlen": 512, "limit": args.limit, "batch_size": 4},
        "export": {"save": out is not None, "out": str(out) if out else None, "dtype": "bfloat16"},
    })
    t0 = time.perf_counter()
    summary = Run(spec).execute()
    metrics = {m["dataset"]: (m["value"], m["extra"]["bits_per_byte"]) for m in summary["metrics"]}
    params = summary["steps"][-1]["parameters_after"] if summary["steps"] else summary["model"]["total_params"]
    return {"name": name, "metrics": metrics, "parameters": params, "seconds": time.perf_counter() - t0,
            "headlines": [s.get("headline") for s in summary["steps"]],
            "removed": [s.get("removed") for s in summary["steps"] if s["type"] == "depth"]}


def speed(folders: dict[str, Path], text: str, rounds: int) -> dict[str, dict]:
    """Size, prefill tokens/s and decode ms/token of exported folders, in float32 on the CPU.

    The models take turns, ``rounds`` times, and each figure is the median
    over the rounds, so a change in the machine's load hits every model alike.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models, results = {}, {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :512]
        models[name] = (model, ids)
        results[name] = {"bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "text_bytes_per_token": len(tokenizer.decode(ids[0]).encode("utf-8")) / ids.shape[1],
                         "prefill": [], "decode": []}
    with torch.no_grad():
        for model, ids in models.values():
            model(input_ids=ids)  # warm-up
        for _ in range(rounds):
            for name, (model, ids) in models.items():
                t0 = time.perf_counter()
                model(input_ids=ids)
                results[name]["prefill"].append(ids.shape[1] / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                model.generate(ids[:, :32], max_new_tokens=64, min_new_tokens=64, do_sample=False)
                results[name]["decode"].append((time.perf_counter() - t0) / 64 * 1000)
    for r in results.values():
        r["prefill_tokens_per_s"] = statistics.median(r.pop("prefill"))
        r["decode_ms_per_token"] = statistics.median(r.pop("decode"))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=100, help="first N windows of 512 tokens of each evaluation set")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows of 512 tokens")
    ap.add_argument("--only", default="depth,width,vocab,openba", help="groups to run")
    ap.add_argument("--rounds", type=int, default=9, help="timing rounds (medians are reported)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    groups = set(args.only.split(","))
    wall = time.perf_counter()
    exports = Path(tempfile.mkdtemp(prefix="structured-demo-"))
    rows = []
    for name, steps in configurations(groups):
        out = exports / f"m{len(rows)}" if name in EXPORTED else None
        rows.append(run(name, steps, args, out))
        rows[-1]["export"] = str(out) if out else None
        m = rows[-1]["metrics"]
        print(f"{name}: " + ", ".join(f"{d} {p:.2f} ({b:.4f} bpb)" for d, (p, b) in m.items()) +
              f"  [{rows[-1]['seconds']:.0f} s]", file=sys.stderr, flush=True)

    print("\n| configuration | parameters | wikitext2 ppl | wikitext2 bits/byte | books ppl | books bits/byte | removed layers |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        w, b = r["metrics"]["wikitext2"], r["metrics"]["books"]
        removed = ", ".join(str(x) for x in r["removed"][0]) if r["removed"] else ""
        print(f"| {r['name']} | {r['parameters'] / 1e6:.2f}M | {w[0]:.2f} | {w[1]:.4f} | {b[0]:.2f} | {b[1]:.4f} | {removed} |")

    timed = list(speed({r["name"]: Path(r["export"]) for r in rows if r["export"]}, eval_text("books")[:20_000], args.rounds).items())
    base = timed[0][1]
    print("\n| exported model | size on disk | ratio | parameters | prefill tokens/s | ratio | text bytes/s ratio | decode ms/token | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in timed:
        bytes_rate = s["prefill_tokens_per_s"] * s["text_bytes_per_token"]
        base_rate = base["prefill_tokens_per_s"] * base["text_bytes_per_token"]
        print(f"| {name} | {s['bytes'] / 2**20:.1f} MiB | {s['bytes'] / base['bytes']:.2f} | {s['parameters'] / 1e6:.2f}M | "
              f"{s['prefill_tokens_per_s']:.0f} | {s['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f} | "
              f"{bytes_rate / base_rate:.2f} | {s['decode_ms_per_token']:.2f} | {s['decode_ms_per_token'] / base['decode_ms_per_token']:.2f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nwall time {time.perf_counter() - wall:.0f} s, peak resident memory {peak:.0f} MiB, "
          f"{torch.get_num_threads()} thread(s), exports in {exports}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "speed": dict(timed)}, indent=2, default=str))


if __name__ == "__main__":
    main()

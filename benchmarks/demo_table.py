"""Perplexity of the demo model after each method at 50%, 70% and 2:4 (the closing-note table).

    python benchmarks/demo_table.py --books PATH/books-eval.txt [--limit N]

Calibration: 128 C4 samples of 512 tokens, seed 0. Perplexity at seqlen 512,
non-overlapping windows, float32, on WikiText-2 test and (with --books) on a
held-out text file. Prints a Markdown table and the wall time of each pruning.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.data.sampling import calibration_samples  # noqa: E402
from workbench.models import load_model  # noqa: E402
from workbench.perplexity import eval_tokens, perplexity  # noqa: E402
from workbench.pruning.runner import prune  # noqa: E402
from workbench.pruning.family import PruneStep  # noqa: E402

SETTINGS = [("50%", {"sparsity": 0.5}), ("70%", {"sparsity": 0.7}), ("2:4", {"pattern": "2:4"})]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--books", help="a held-out text file (e.g. the books-eval.txt of the demo model's card)")
    ap.add_argument("--limit", type=int, default=None, help="first N windows of each set")
    ap.add_argument("--owl", action="store_true", help="also OWL-Wanda at 70%")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model("demo", dtype="float32", device="auto")
    tok = loaded.tokenizer
    sets = {"wikitext2": eval_tokens("wikitext2", tok, 512)}
    if args.books:
        sets["books"] = eval_tokens(f"file:{args.books}", tok, 512)
    tokens = calibration_samples("c4", tok, nsamples=128, seqlen=512, seed=0)
    dense_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    device = torch.device(loaded.device)

    def ppl():
        loaded.model.to(device)
        out = {n: perplexity(loaded.model, ids, 512, limit=args.limit, batch_size=8)["ppl"] for n, ids in sets.items()}
        loaded.model.to("cpu")
        return out

    rows = [("dense", "-", ppl(), 0.0)]
    print(f"dense: {rows[-1][2]}", file=sys.stderr, flush=True)
    configs = [(m, label, kw) for label, kw in SETTINGS for m in METHODS]
    if args.owl:
        configs.append(("owl-wanda", "70%", {"sparsity": 0.7, "allocation": "owl"}))
    for method, label, kw in configs:
        loaded.model.load_state_dict(dense_state)
        step = PruneStep(method=method.replace("owl-", ""), **kw)
        t0 = time.perf_counter()
        prune(loaded, tokens, step, batch_size=16)
        seconds = time.perf_counter() - t0
        rows.append((method, label, ppl(), seconds))
        print(f"{method} {label}: {rows[-1][2]} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    names = list(sets)
    windows = {n: ids.shape[1] // 512 if args.limit is None else min(args.limit, ids.shape[1] // 512) for n, ids in sets.items()}
    print("| method | sparsity | " + " | ".join(f"{n} ppl ({windows[n]} windows of 512)" for n in names) + " | prune time (s) |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for method, label, values, seconds in rows:
        print(f"| {method} | {label} | " + " | ".join(f"{values[n]:.2f}" for n in names) + f" | {seconds:.1f} |")


if __name__ == "__main__":
    main()

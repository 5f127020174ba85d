"""Wall time and peak memory of the evaluations, each with a baseline measured in the same run.

- The full zero-shot suite (the nine bundled tasks) on the demo model, in
  memory through ``workbench.evaluation.zeroshot``; baseline: lm-eval loading
  the exported checkpoint itself (``simple_evaluate(model="hf", ...)``, what
  its command line does) on the same task files.
- DAIL on SST-2 (every test query, several orders); baseline: zero-shot on
  the same queries with the same prompt.
- With CUDA: prefill tokens/s of a Llama-2-7B-shaped random float16 model,
  dense and with its 2:4-pruned linears in semi-structured sparse form;
  baseline: the dense model.

    python benchmarks/eval_bench.py                       # the demo model on the CPU
    python benchmarks/eval_bench.py --limit 50 --seeds 1  # a quick pass
    python benchmarks/eval_bench.py --llama7b --json out.json

Model loading is excluded from the in-memory numbers and included in the
zero-shot baseline, since loading is part of what that path costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune_bench import measure  # noqa: E402  (benchmarks/ is the script's folder)

from workbench.evaluation import efficiency, icl, zeroshot  # noqa: E402
from workbench.models import load_model  # noqa: E402


def zeroshot_rows(loaded, limit, batch_size, baseline: bool) -> list[dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from workbench.export import export_model

    device = torch.device("cpu")
    tasks = list(zeroshot.BUNDLED_TASKS)
    rows = []
    results = {}

    def ours():
        results["ours"] = zeroshot.evaluate_tasks(loaded.model, loaded.tokenizer, tasks, limit=limit, batch_size=batch_size)

    label = f"zero-shot suite, 9 tasks{'' if limit is None else f', limit {limit}'}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_model(loaded.model, loaded.tokenizer, Path(tmp) / "demo", {})
        if baseline:
            manager = TaskManager(include_path=str(zeroshot.TASKS_DIR), include_defaults=False)

            def theirs():
                results["theirs"] = simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"},
                                                    tasks=[t + zeroshot.LOCAL_SUFFIX for t in tasks], limit=limit, device="cpu",
                                                    batch_size=batch_size, task_manager=manager,
                                                    bootstrap_iters=zeroshot.BOOTSTRAP_ITERS)

            base = measure(theirs, device)
            rows.append(_row(label, "lm-eval loads the export (baseline)", base, base[0]))
        s = measure(ours, device)
        rows.append(_row(label, "in memory (workbench)", s, rows[0]["seconds"] if rows else None))
    accs = {m["dataset"]: m["value"] for m in results["ours"] if m["name"] == "acc"}
    rows[-1]["accuracy"] = accs
    if baseline:
        theirs_acc = {t: results["theirs"]["results"][t + zeroshot.LOCAL_SUFFIX]["acc,none"] for t in tasks}
        rows[-1]["same_as_baseline"] = theirs_acc == accs
    return rows


def dail_rows(loaded, limit, seeds, k, memory) -> list[dict]:
    device = torch.device("cpu")
    rows, results = [], {}
    label = f"SST-2 {'all' if limit is None else limit} queries, K={k}, M={memory}"
    configs = {"zero-shot (baseline)": [icl.ICLConfig(mode="zeroshot")],
               f"DAIL bm25, {seeds} orders": [icl.ICLConfig(mode="dail", k=k, memory=memory)],
               f"DAIL hidden, {seeds} orders": [icl.ICLConfig(mode="dail", k=k, memory=memory, retriever="hidden")]}
    for name, config in configs.items():
        def run(config=config, name=name):
            results[name] = icl.evaluate_dataset(loaded.model, loaded.tokenizer, "sst2", config, seeds=seeds, limit=limit)

        s = measure(run, device)
        rows.append(_row(label, name, s, rows[0]["seconds"] if rows else None))
        r = results[name][0]
        rows[-1]["accuracy"] = {"mean": r["value"], "std": r["extra"]["std"]}
    return rows


def llama7b_rows(seqlen: int, batch_size: int, layers: int) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device("cuda")
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    for module in efficiency._decoder_linears(model).values():  # 2:4 by magnitude: keep two of every four
        groups = module.weight.data.view(-1, 4)
        keep = groups.abs().topk(2, dim=1).indices
        groups.mul_(torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True))
    label = f"llama-7b shape ({layers} layers, fp16, {batch_size}x{seqlen} prefill)"
    rows = []
    with torch.no_grad():
        dense = efficiency.prefill_tokens_per_s(model, seqlen, batch_size, repeats=5)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append({"model": label, "what": "dense weights (baseline)", "tokens_per_s": dense, "ratio": 1.0, "gpu_peak_gib": peak})
        with efficiency.semi_structured(model) as converted:
            torch.cuda.reset_peak_memory_stats(device)
            sparse = efficiency.prefill_tokens_per_s(model, seqlen, batch_size, repeats=5)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append({"model": label, "what": f"2:4 semi-structured ({converted['converted']} linears)", "tokens_per_s": sparse,
                     "ratio": sparse / dense, "gpu_peak_gib": peak})
    return rows


def _row(model: str, what: str, measured: tuple, baseline_seconds: float | None) -> dict:
    seconds, rss, gpu = measured
    return {"model": model, "what": what, "seconds": seconds, "ratio": seconds / baseline_seconds if baseline_seconds else 1.0,
            "cpu_rss_gib": rss, "gpu_peak_gib": gpu}


def print_table(rows: list[dict]) -> None:
    head = f"{'benchmark':<48} {'what':<40} {'wall s / tok/s':>14} {'x baseline':>10} {'peak GiB':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        value = f"{r['seconds']:.1f} s" if "seconds" in r else f"{r['tokens_per_s']:,.0f}"
        peak = r.get("cpu_rss_gib") if r.get("gpu_peak_gib") is None else r["gpu_peak_gib"]
        print(f"{r['model']:<48} {r['what']:<40} {value:>14} {r['ratio']:>10.2f} {peak:>9.2f}")
        if "accuracy" in r:
            print(f"{'':<48} accuracy: {json.dumps(r['accuracy'], default=lambda v: round(v, 4))}"
                  + (f"; same as the baseline: {r['same_as_baseline']}" if "same_as_baseline" in r else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, help="samples per zero-shot task and SST-2 queries (default: all)")
    ap.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size")
    ap.add_argument("--seeds", type=int, default=3, help="DAIL query orders")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--memory", type=int, default=32)
    ap.add_argument("--no-baseline", action="store_true", help="skip lm-eval's own loading path (halves the zero-shot time)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: zeroshot, dail")
    ap.add_argument("--llama7b", action="store_true", help="the 7B-shaped 2:4 prefill comparison (needs CUDA)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048, help="prefill length of the 7B shape")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows: list[dict] = []
    loaded = load_model("demo", dtype="float32", device="cpu")
    with torch.no_grad():
        if "zeroshot" not in skip:
            rows += zeroshot_rows(loaded, args.limit, args.batch_size, not args.no_baseline)
        if "dail" not in skip:
            rows += dail_rows(loaded, args.limit, args.seeds, args.k, args.memory)
    if args.llama7b:
        if torch.cuda.is_available():
            rows += llama7b_rows(args.seqlen, 1, args.layers)
            print(f"GPU: {torch.cuda.get_device_name(0)}")
        else:
            print("no CUDA device: skipping the 7B shape", file=sys.stderr)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

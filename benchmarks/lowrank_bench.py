"""Cost of a rank-allocation search: the statistics pass, seconds per trial, a whole search, peak memory.

The baseline, measured in the same run, is one dense pass of the objective
(the model run layer by layer over the objective chunks, no factors): a trial
can cost no less. Each row prints its ratio to it. A trial is one truncation
of the cached factors plus one objective pass; the statistics and
eigendecompositions are paid once, before the trials.

    python benchmarks/lowrank_bench.py                 # the demo model on the CPU, 50 GP trials
    python benchmarks/lowrank_bench.py --llama7b       # also a Llama-2-7B-shaped random bf16 model when CUDA is present
    python benchmarks/lowrank_bench.py --json out.json # the table as JSON too

Model loading is excluded from every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_bench import measure  # noqa: E402

from workbench.lowrank import search as S  # noqa: E402
from workbench.lowrank.allocation import Budget, search_space  # noqa: E402
from workbench.lowrank.compress import LayerPass, apply_sequential, dense_factorizations  # noqa: E402
from workbench.lowrank.objective import Objective, objective_tokens  # noqa: E402
from workbench.models import LoadedModel, get_adapter  # noqa: E402


@torch.no_grad()
def bench(label, loaded, calibration, objective_ids, trials, sampler, batch_size, rows):
    device = torch.device(loaded.device)
    budget = Budget.of(loaded.adapter, pair_bias=True)
    space = search_space(budget, "type", 0.2, 1.0)
    box: dict = {}

    def add(what, seconds, rss, gpu, base):
        rows.append({"model": label, "what": what, "seconds": seconds, "ratio": seconds / base, "cpu_rss_gib": rss,
                     "gpu_peak_gib": gpu})
        print(f"  {label} {what}: {seconds:.2f} s", file=sys.stderr, flush=True)

    box["objective"] = Objective(loaded, objective_ids, 1e-3, batch_size)
    base, rss, gpu = measure(lambda: box["objective"].measure(), device)
    add("dense objective pass (baseline)", base, rss, gpu, base)

    def statistics():
        box["factors"] = dense_factorizations(LayerPass(loaded, calibration, budget, "feature", batch_size=batch_size))

    add("statistics + eigendecompositions (once)", *measure(statistics, device), base)

    setup = S.SearchSetup(budget, space, box["factors"], box["objective"], 0.8, 0.1, loaded.dtype)
    with tempfile.TemporaryDirectory() as folder:
        storage = S.open_storage(str(Path(folder) / "study.journal"))
        study = S.open_study(storage, "bench", space.signature(), {"bench": label}, sampler, 0)
        seconds, rss, gpu = measure(lambda: S.run_trials(study, setup.trial_function(S.worker_id()), trials), device)
        durations = [t.user_attrs["seconds"] for t in study.trials if t.state.name == "COMPLETE" and "same_as" not in t.user_attrs]
        best = S.best_trials(study, 1)[0]
    add(f"one evaluated trial (mean of {len(durations)})", sum(durations) / len(durations), rss, gpu, base)
    add(f"search: {trials} trials ({sampler}, incl. sampler)", seconds, rss, gpu, base)
    ranks = space.ranks(budget, best.user_attrs["ratios"])
    box.pop("factors")

    def apply():
        apply_sequential(LayerPass(loaded, calibration, budget, "feature", batch_size=batch_size), ranks, 0.8)

    add("sequential application of the best", *measure(apply, device), base)
    return rows


def demo_rows(device, nsamples, seqlen, chunks, chunk_len, trials, sampler, batch_size, rows):
    from workbench.data.sampling import calibration_samples
    from workbench.models import load_model

    loaded = load_model("demo", dtype="float32", device=str(device))
    calibration = calibration_samples("c4", loaded.tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
    objective_ids = objective_tokens("wikitext2", loaded.tokenizer, chunks, chunk_len)
    label = f"demo ({device.type}, fp32, {nsamples}x{seqlen}, objective {chunks}x{chunk_len})"
    return bench(label, loaded, calibration, objective_ids, trials, sampler, batch_size, rows)


def llama7b_rows(device, layers, shape, nsamples, seqlen, chunks, chunk_len, trials, sampler, batch_size, rows):
    """A Llama-2-7B-shaped model with random bf16 weights (made on the device, kept in CPU memory)."""
    from common import random_llama

    hidden, intermediate = shape
    model = random_llama(device, layers, hidden, intermediate)
    loaded = LoadedModel(model, None, get_adapter(model), "random-7b", device, torch.bfloat16)
    ids = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, 32000, (nsamples, seqlen), generator=ids)
    objective_ids = torch.randint(0, 32000, (chunks, chunk_len), generator=ids)
    label = f"llama-7b shape ({layers} layers, {hidden}x{intermediate}, bf16, {device.type}, {nsamples}x{seqlen})"
    return bench(label, loaded, calibration, objective_ids, trials, sampler, batch_size, rows)


def print_table(rows):
    from common import RATIO_AND_MEMORY, print_table as print_rows

    print_rows(rows, [("model", "<64", lambda r: r["model"]), ("what", "<40", lambda r: r["what"]),
                      ("wall s", ">9", lambda r: f"{r['seconds']:.3f}")] + RATIO_AND_MEMORY)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--sampler", default="gp", choices=("gp", "tpe"))
    ap.add_argument("--nsamples", type=int, default=256, help="calibration samples (the preset's)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8, help="objective chunks (the preset's)")
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--demo-devices", default="cpu,cuda", help="devices for the demo model (those present)")
    ap.add_argument("--llama7b", action="store_true", help="also the 7B shape (needs CUDA, or --llama7b-device cpu)")
    ap.add_argument("--llama7b-device", default="cuda")
    ap.add_argument("--layers", type=int, default=32, help="layers of the 7B shape")
    ap.add_argument("--shape", default="4096x11008", help="hidden x intermediate of the 7B shape")
    ap.add_argument("--llama7b-tokens", default="128x2048", help="calibration of the 7B shape, NxL")
    ap.add_argument("--llama7b-objective", default="8x512", help="objective chunks of the 7B shape, NxL")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    rows: list[dict] = []
    if args.llama7b:
        device = torch.device(args.llama7b_device)
        if device.type == "cuda" and not cuda:
            print("no CUDA device: skipping the 7B shape", file=sys.stderr)
        else:
            n, l = (int(v) for v in args.llama7b_tokens.split("x"))
            c, cl = (int(v) for v in args.llama7b_objective.split("x"))
            shape = tuple(int(v) for v in args.shape.split("x"))
            llama7b_rows(device, args.layers, shape, n, l, c, cl, args.trials, args.sampler, args.batch_size, rows)
    for name in args.demo_devices.split(","):
        if name == "cpu" or (name == "cuda" and cuda):
            demo_rows(torch.device(name), args.nsamples, args.seqlen, args.chunks, args.chunk_len, args.trials, args.sampler,
                      args.batch_size, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print_table(rows)


if __name__ == "__main__":
    main()

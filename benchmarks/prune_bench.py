"""Wall time and peak memory of each pruning stage, with a baseline measured in the same run.

The baseline is one dense layer-by-layer pass (capture the inputs, run every
layer once over all calibration tokens): the work every calibrated method must
at least do. Each method's ratio to it is printed beside its time.

    python benchmarks/prune_bench.py                 # the demo model on the CPU (128 x 512 C4 tokens)
    python benchmarks/prune_bench.py --llama7b       # also a Llama-2-7B-shaped random bf16 model when CUDA is present
    python benchmarks/prune_bench.py --json out.json # the table as JSON too

Model loading is excluded from every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.layerwise import LayerRunner, Resident, capture_inputs  # noqa: E402
from workbench.models import LoadedModel, get_adapter  # noqa: E402
from workbench.pruning.runner import prune  # noqa: E402
from workbench.pruning.family import PruneStep  # noqa: E402


class PeakRSS:
    """Samples the process's resident memory in a thread; the peak over a block."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.proc = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, rss.peak / 2**30, gpu


@torch.no_grad()
def dense_pass(loaded, tokens, batch_size):
    adapter = loaded.adapter
    device = torch.device(loaded.device)
    captured = capture_inputs(adapter, tokens, device, batch_size)
    runner = LayerRunner(adapter, captured, device)
    for i, layer in enumerate(adapter.layers):
        with Resident(layer, device):
            runner.propagate(layer, i)


def bench_model(label, loaded, tokens, methods, batch_size, rows=None, sink=None):
    device = torch.device(loaded.device)
    rows = [] if rows is None else rows
    sink = sink or (lambda rows: None)
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    base_s, base_rss, base_gpu = measure(lambda: dense_pass(loaded, tokens, batch_size), device)
    rows.append({"model": label, "method": "dense pass (baseline)", "seconds": base_s, "ratio": 1.0,
                 "cpu_rss_gib": base_rss, "gpu_peak_gib": base_gpu})
    sink(rows)
    for name, step in methods:
        loaded.model.load_state_dict(state)
        s, rss, gpu = measure(lambda step=step: prune(loaded, tokens, step, batch_size=batch_size), device)
        rows.append({"model": label, "method": name, "seconds": s, "ratio": s / base_s, "cpu_rss_gib": rss, "gpu_peak_gib": gpu})
        print(f"  {label} {name}: {s:.2f} s", file=sys.stderr, flush=True)
        sink(rows)
    loaded.model.load_state_dict(state)
    return rows


METHODS = [
    ("magnitude 50%", PruneStep(method="magnitude", sparsity=0.5)),
    ("wanda 50%", PruneStep(method="wanda", sparsity=0.5)),
    ("sparsegpt 50%", PruneStep(method="sparsegpt", sparsity=0.5)),
    ("wanda 2:4", PruneStep(method="wanda", pattern="2:4")),
    ("sparsegpt 2:4", PruneStep(method="sparsegpt", pattern="2:4")),
]


def demo_rows(device, nsamples, seqlen, batch_size, rows=None, sink=None):
    from workbench.data.sampling import calibration_samples
    from workbench.models import load_model

    loaded = load_model("demo", dtype="float32", device=str(device))
    tokens = calibration_samples("c4", loaded.tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
    return bench_model(f"demo ({device.type}, fp32, {nsamples}x{seqlen})", loaded, tokens, METHODS, batch_size, rows, sink)


def llama7b_rows(device, nsamples, seqlen, batch_size, layers=32, rows=None, sink=None, methods=None):
    from common import random_llama

    model = random_llama(device, layers)
    config = model.config
    loaded = LoadedModel(model=model, tokenizer=None, adapter=get_adapter(model), source="random-7b",
                         device=device, dtype=torch.bfloat16)
    tokens = torch.randint(0, config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    wanted = methods or ("wanda 50%", "sparsegpt 50%", "magnitude 50%", "sparsegpt 2:4")
    methods = [next(m for m in METHODS if m[0] == name) for name in wanted]
    return bench_model(f"llama-7b shape ({layers} layers, bf16, {nsamples}x{seqlen})", loaded, tokens, methods, batch_size, rows, sink)


def print_table(rows):
    from common import RATIO_AND_MEMORY, print_table as print_rows

    print_rows(rows, [("model", "<44", lambda r: r["model"]), ("method", "<22", lambda r: r["method"]),
                      ("wall s", ">8", lambda r: f"{r['seconds']:.2f}")] + RATIO_AND_MEMORY)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="demo model seqlen (its context is 512)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--demo-devices", default="cpu,cuda", help="devices for the demo model (those present)")
    ap.add_argument("--llama7b", action="store_true", help="also the 7B shape (needs CUDA, or --llama7b-device cpu)")
    ap.add_argument("--llama7b-device", default="cuda")
    ap.add_argument("--layers", type=int, default=32, help="layers of the 7B shape")
    ap.add_argument("--llama7b-tokens", default="128x2048", help="calibration of the 7B shape, NxL")
    ap.add_argument("--json", help="also write the rows to this file (rewritten after every row)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    rows: list[dict] = []

    def sink(current):
        if args.json:
            Path(args.json).write_text(json.dumps(current, indent=2))

    if args.llama7b:
        device = torch.device(args.llama7b_device)
        if device.type == "cuda" and not cuda:
            print("no CUDA device: skipping the 7B shape", file=sys.stderr)
        else:
            n, l = (int(v) for v in args.llama7b_tokens.split("x"))
            llama7b_rows(device, n, l, args.batch_size, args.layers, rows, sink)
    for name in args.demo_devices.split(","):
        if name == "cpu" or (name == "cuda" and cuda):
            demo_rows(torch.device(name), args.nsamples, args.seqlen, args.batch_size, rows, sink)
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print_table(rows)


if __name__ == "__main__":
    main()

"""Quantization on the demo model: perplexity, bits per weight, size on disk, wall time and peak memory per method,
with llm-compressor's GPTQ and RTN beside it on the same calibration windows and the same evaluation.

Each configuration runs in a fresh process (so its peak resident memory is its own): workbench's engine
quantizes, evaluates WikiText-2 and the held-out books, and exports in compressed-tensors format (size
on disk). The peer runs in its own virtual environment, made here on first use with torch pinned first
(llm-compressor is never a dependency of workbench); its saved models are evaluated by workbench's
evaluation, as ours are. The baseline of the time ratio is one dense layer-by-layer pass of the demo model
over the same windows (the work every calibrated method does at least once), measured in the same run.
Times: workbench's steps (capture, statistics, quantization, propagation; loading and evaluation left out);
llm-compressor's whole oneshot call (its data preparation, calibration passes and quantization).

    python benchmarks/quant_bench.py                      # 128 x 512 C4 windows, 120 evaluation windows per set
    python benchmarks/quant_bench.py --no-peer            # workbench only
    python benchmarks/quant_bench.py --peer-venv DIR      # where the peer's environment is (made when missing)
    python benchmarks/quant_bench.py --json out.json      # the rows as JSON too
    python benchmarks/quant_bench.py --llama7b            # GPTQ W4 g128 on a Llama-2-7B-shaped random model (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [  # (label, steps)
    ("dense", []),
    ("rtn W4 g128", [{"type": "quantize", "method": "rtn"}]),
    ("gptq W4 g128", [{"type": "quantize", "method": "gptq"}]),
    ("gptq W4 g128 actorder", [{"type": "quantize", "method": "gptq", "actorder": True}]),
    ("awq W4 g128", [{"type": "quantize", "method": "awq"}]),
    ("rtn W8", [{"type": "quantize", "method": "rtn", "bits": 8, "group_size": 0}]),
    ("gptq W8", [{"type": "quantize", "method": "gptq", "bits": 8, "group_size": 0}]),
    ("awq W8", [{"type": "quantize", "method": "awq", "bits": 8, "group_size": 0}]),
    ("sparsegpt 50% + gptq W4", [{"type": "prune", "method": "sparsegpt", "sparsity": 0.5}, {"type": "quantize", "method": "gptq"}]),
    ("sparsegpt 2:4 + gptq W4", [{"type": "prune", "method": "sparsegpt", "pattern": "2:4"}, {"type": "quantize", "method": "gptq"}]),
    ("joint 2:4 + gptq W4 (one sweep)", [{"type": "quantize", "method": "gptq", "pattern": "2:4"}]),
    ("fp8 weights", [{"type": "quantize", "method": "rtn", "weights": "fp8"}]),
]
PEER = [("llm-compressor gptq W4 g128", "gptq", "W4A16"), ("llm-compressor rtn W4 g128", "rtn", "W4A16"),
        ("llm-compressor rtn W8", "rtn", "W8A16")]


def _spec(model: str, steps: list, args, out: str | None) -> dict:
    spec = {"name": "quant-bench", "model": {"name": model},
            "calibration": {"source": "c4", "nsamples": args.samples, "seqlen": args.seqlen, "seed": 0, "summary": False},
            "steps": steps, "evaluate": {"perplexity": ["wikitext2", "books"], "limit": args.limit, "before": False, "fresh": True}}
    if out:
        spec["export"] = {"save": True, "out": out, "dtype": "bfloat16"}  # the checkpoint's dtype
    return spec


def dense_pass_child(samples: int, seqlen: int) -> None:
    """The baseline in this process: one dense layer-by-layer pass of the demo model over the calibration windows
    (capture the inputs, run every layer once), the work every calibrated method does at least once."""
    import time

    import torch

    from benchmarks.prune_bench import dense_pass
    from workbench.data.sampling import calibration_data
    from workbench.models import load_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "0")) or torch.get_num_threads())
    loaded = load_model("demo", dtype="float32", device="cpu")
    ids = calibration_data("c4", loaded.tokenizer, nsamples=samples, seqlen=seqlen, seed=0).ids
    t0 = time.perf_counter()
    dense_pass(loaded, ids, 8)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "metrics": {}, "size": None, "bits": None, "sparsity": 0.0,
                                  "cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def child(spec_json: str) -> None:
    """One configuration in this process: run the spec, print what the table needs as one JSON line."""
    import torch

    from workbench.engine import execute
    from workbench.spec.validate import spec_from_dict

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "0")) or torch.get_num_threads())
    summary = execute(spec_from_dict(json.loads(spec_json)))
    metrics = {m["dataset"]: m["value"] for m in summary["metrics"] if m.get("name", "perplexity") == "perplexity"}
    steps = summary["steps"]
    quant = next((s for s in steps if s["type"] == "quantize"), None)
    out = summary.get("export")
    size = sum(p.stat().st_size for p in Path(out).glob("*.safetensors")) if out else None
    bits = file_bits(Path(out)) if out else None
    print("RESULT " + json.dumps({
        "seconds": sum(s.get("seconds", 0.0) for s in steps), "metrics": metrics, "size": size,
        "bits": bits, "bits_report": quant.get("bits_per_weight") if quant else None,
        "sparsity": next((s["sparsity"] for s in steps if "sparsity" in s), 0.0),
        "cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def file_bits(folder: Path) -> float | None:
    """Stored bits per quantized weight in a compressed-tensors folder: packed codes, scales and zero points as written."""
    from safetensors import safe_open

    width = {"BF16": 16, "F16": 16, "F32": 32, "I32": 32, "I8": 8, "F8_E4M3": 8, "I64": 64}
    config = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if not config:
        return None
    bits, weights = 0, 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            for key in keys:
                module, _, leaf = key.rpartition(".")
                quantized = f"{module}.weight_scale" in keys
                if not quantized or leaf not in ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                    continue
                part = f.get_slice(key)
                numel = 1
                for n in part.get_shape():
                    numel *= n
                bits += numel * width[part.get_dtype()]
                if leaf == "weight_shape":
                    shape = f.get_tensor(key).tolist()
                    weights += shape[0] * shape[1]
                elif leaf == "weight":
                    weights += numel
    return bits / weights if weights else None


def _run_child(spec: dict | None, args=None) -> dict:
    what = ["--child", json.dumps(spec)] if spec is not None else ["--dense-pass", f"{args.samples}x{args.seqlen}"]
    done = subprocess.run([sys.executable, __file__, *what], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"a configuration failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def peer_python(venv: Path) -> Path:
    """The peer environment's python, made when missing: torch pinned to this torch's version first, then llm-compressor."""
    python = venv / "bin" / "python"
    if not python.exists():
        import torch

        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pin = torch.__version__.split("+")[0]
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"torch=={pin}"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "llmcompressor"], check=True)
    return python


def llama7b(device: str, layers: int, tokens: str, out_json: str | None) -> None:
    """GPTQ W4 g128 on a Llama-2-7B-shaped random bf16 model, one layer resident: time and peak memory against one dense
    layer-by-layer pass (the baseline), and the compressed-tensors export's size against the dense bf16 checkpoint."""
    import torch

    from benchmarks.common import RATIO_AND_MEMORY, print_table, random_llama
    from benchmarks.prune_bench import dense_pass, measure
    from workbench.context import StepContext
    from workbench.evaluation.efficiency import disk_bytes
    from workbench.models import LoadedModel, get_adapter
    from workbench.quantization.family import QuantizeStep
    from workbench.quantization.step import quantize
    from workbench.spec.schema import RunSpec

    dev = torch.device(device)
    n, length = (int(v) for v in tokens.split("x"))
    model = random_llama(dev, layers)
    loaded = LoadedModel(model=model, tokenizer=None, adapter=get_adapter(model), source="random-7b", device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(0))
    spec = RunSpec()
    spec.calibration.batch_size = 8
    spec.export.dtype = "bfloat16"
    dense_bytes = disk_bytes(model)
    rows = []
    base, rss, gpu = measure(lambda: dense_pass(loaded, ids, 8), dev)
    rows.append({"label": "dense pass (baseline)", "seconds": base, "ratio": 1.0, "cpu_rss_gib": rss, "gpu_peak_gib": gpu,
                 "size": dense_bytes})
    for label, step in (("gptq W4 g128", QuantizeStep(method="gptq")), ("rtn W4 g128", QuantizeStep(method="rtn"))):
        ctx = StepContext(loaded=loaded, spec=spec, run_id="bench", index=0, tokens=ids, run_dir=Path(tempfile.gettempdir()), emit=lambda e: None)
        seconds, rss, gpu = measure(lambda step=step, ctx=ctx: quantize(ctx, step, "quantize:0"), dev)
        rows.append({"label": label, "seconds": seconds, "ratio": seconds / base, "cpu_rss_gib": rss, "gpu_peak_gib": gpu,
                     "size": disk_bytes(model)})
        print(f"{label}: {seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"Llama-2-7B shape, {layers} layers, bf16, {n} x {length} calibration tokens on {device}")
    print_table(rows, [("method", "<24", lambda r: r["label"]), ("seconds", ">9", lambda r: f"{r['seconds']:.2f}"),
                       ("export GB", ">10", lambda r: f"{r['size'] / 1e9:.2f}"), *RATIO_AND_MEMORY])
    if out_json:
        Path(out_json).write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--limit", type=int, default=120, help="evaluation windows per set")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--peer-venv", default=str(Path(tempfile.gettempdir()) / "workbench-peer-llmcompressor"))
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dense-pass", help=argparse.SUPPRESS)
    parser.add_argument("--llama7b", action="store_true", help="GPTQ on a 7B-shaped random model instead (a GPU run)")
    parser.add_argument("--llama7b-device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", default="128x2048", help="calibration of the 7B shape, NxL")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.dense_pass:
        dense_pass_child(*(int(v) for v in args.dense_pass.split("x")))
        return
    if args.llama7b:
        llama7b(args.llama7b_device, args.layers, args.tokens, args.json)
        return

    from benchmarks.common import print_table
    from workbench.models import DEMO_MODEL_DIR

    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    rows = []
    try:
        base = _run_child(None, args)
        base["label"] = "dense pass (baseline)"
        rows.append(base)
        for label, steps in CONFIGS:
            out = str(work / label.replace(" ", "_").replace("%", "").replace(":", "of")) if steps else None
            r = _run_child(_spec("demo", steps, args, out))
            r["label"] = label
            rows.append(r)
            print(f"{label}: {r}", file=sys.stderr, flush=True)
        if not args.no_peer:
            import torch

            from transformers import AutoTokenizer

            from workbench.data.sampling import calibration_data

            windows = calibration_data("c4", AutoTokenizer.from_pretrained(DEMO_MODEL_DIR), nsamples=args.samples,
                                       seqlen=args.seqlen, seed=0).ids  # the windows workbench's runs calibrated on
            torch.save(windows, work / "windows.pt")
            python = peer_python(Path(args.peer_venv))
            for label, method, scheme in PEER:
                out = work / f"peer-{method}-{scheme}"
                done = subprocess.run([str(python), str(ROOT / "benchmarks" / "peer_llmcompressor.py"), "--model", str(DEMO_MODEL_DIR),
                                       "--windows", str(work / "windows.pt"), "--method", method, "--scheme", scheme, "--out", str(out)],
                                      capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
                if done.returncode or not line.startswith("{"):
                    raise SystemExit(f"llm-compressor failed:\n{done.stderr[-4000:]}")
                peer = json.loads(line)
                ev = _run_child(_spec(str(out), [], args, None))  # its model, through workbench's evaluation
                rows.append({"label": label, "seconds": peer["seconds"], "cpu_rss_gib": peer["cpu_rss_gib"], "metrics": ev["metrics"],
                             "size": sum(p.stat().st_size for p in out.glob("*.safetensors")), "bits": file_bits(out), "sparsity": 0.0})
                print(f"{label}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows[0]["seconds"] or 1e-9
    for r in rows:
        r["ratio"] = r["seconds"] / base if r["seconds"] else 0.0
    print(f"demo model, {args.samples} x {args.seqlen} C4 calibration tokens, perplexity on the first {args.limit} windows of each set")
    print_table(rows, [
        ("method", "<34", lambda r: r["label"]),
        ("wikitext2", ">10", lambda r: f"{r['metrics']['wikitext2']:.2f}" if "wikitext2" in r["metrics"] else "-"),
        ("books", ">8", lambda r: f"{r['metrics']['books']:.2f}" if "books" in r["metrics"] else "-"),
        ("bits/w", ">7", lambda r: f"{r['bits']:.3f}" if r.get("bits") else "16"),
        ("sparsity", ">8", lambda r: f"{r.get('sparsity') or 0:.2f}"),
        ("MB on disk", ">10", lambda r: f"{r['size'] / 1e6:.2f}" if r.get("size") else "-"),
        ("seconds", ">8", lambda r: f"{r['seconds']:.2f}"),
        ("x baseline", ">10", lambda r: f"{r['ratio']:.2f}"),
        ("CPU RSS GiB", ">12", lambda r: f"{r['cpu_rss_gib']:.2f}"),
    ])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

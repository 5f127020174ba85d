"""llm-compressor as a peer: its GPTQ or RTN on a model, with calibration windows given as token ids.

Runs inside llm-compressor's own virtual environment (``quant_bench.py`` makes
it; llm-compressor is never a dependency of workbench). It imports nothing
from workbench. Prints one JSON line: the quantization's wall time and the
process's peak resident memory; the compressed model is saved to ``--out`` in
llm-compressor's compressed-tensors format, which the benchmark then
evaluates with workbench's evaluation, the same as its own models.

    PEER/bin/python benchmarks/peer_llmcompressor.py --model M --windows w.pt --method gptq --scheme W4A16 --out DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="a torch file with the calibration token ids, (samples, seqlen)")
    parser.add_argument("--method", choices=("gptq", "rtn"), required=True)
    parser.add_argument("--scheme", default="W4A16", help="W4A16 (4-bit, groups of 128, symmetric) or W8A16")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if args.threads:
        torch.set_num_threads(args.threads)
    windows = torch.load(args.windows, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")  # the checkpoint's dtype, as its users load it
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    if args.method == "gptq":
        recipe = GPTQModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    else:
        recipe = QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": seconds, "cpu_rss_gib": peak, "out": args.out}))


if __name__ == "__main__":
    main()

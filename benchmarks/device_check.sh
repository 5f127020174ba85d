#!/usr/bin/env bash
# The GPU checks in one go: the CUDA tests, the pruning benchmark (a Llama-2-7B-shaped
# random bf16 model with 128 x 2048 calibration tokens, then the demo model). Results land
# in $OUT (default benchmarks/out); the benchmark rewrites its JSON after every row. Then the
# 2:4 semi-structured tests and the dense vs 2:4 prefill benchmark of a 7B-shaped model; then the
# test-time adaptation latency (none / Tent / PCL) on the same shape; then GPTQ on it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
python3 benchmarks/prune_bench.py --llama7b --demo-devices cuda --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_efficiency.py 2>&1 | tail -15 | tee -a "$OUT/tests.txt"
python3 benchmarks/eval_bench.py --llama7b --skip zeroshot,dail --json "$OUT/eval_bench.json" 2>&1 | tee "$OUT/eval_bench.txt"
# test-time adaptation: per-query latency of none / Tent / PCL on a 7B-shaped random bf16 model
python3 benchmarks/tta_bench.py --shape 7b --device cuda --dtype bfloat16 --queries 16 --json "$OUT/tta_bench.json" 2>&1 | tee "$OUT/tta_bench.txt"
# quantization: GPTQ W4 g128 on a 7B-shaped random bf16 model (128 x 2048 tokens, one layer resident), time and peak memory
python3 benchmarks/quant_bench.py --llama7b --json "$OUT/quant_bench.json" 2>&1 | tee "$OUT/quant_bench.txt"

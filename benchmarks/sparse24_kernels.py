"""One 2:4 linear against its dense twin, per kernel backend: why a 2:4 model is or is not faster.

``workbench eval --efficiency`` converts 2:4-sparse linears to PyTorch's
semi-structured format. Whether that pays depends on the kernel PyTorch picks
(CUTLASS, or cuSPARSELt where it is available) and on the GPU. This times
``F.linear`` for the Llama-7B MLP shapes at 2,048 tokens, fp16: the dense
weight (the baseline), then the same 2:4 weight in each available backend.

    python benchmarks/sparse24_kernels.py            # needs CUDA
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

SHAPES = {"gate/up 4096->11008": (11008, 4096), "down 11008->4096": (4096, 11008)}


def timed(fn, repeats: int = 50) -> float:
    """Milliseconds per call, after warm-up, by CUDA events."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def two_four(w: torch.Tensor) -> torch.Tensor:
    groups = w.reshape(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    return (groups * torch.zeros_like(groups).scatter_(1, keep, 1.0)).reshape(w.shape)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 0
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"cuSPARSELt available: {torch.backends.cusparselt.is_available()}")
    backends = [("CUTLASS", True)] + ([("cuSPARSELt", False)] if torch.backends.cusparselt.is_available() else [])
    print(f"{'linear':<22} {'tokens':>6} {'what':<22} {'ms':>8} {'speed-up':>8} {'max abs diff':>13}")
    for name, (out_f, in_f) in SHAPES.items():
        for tokens in (2048, 16):
            g = torch.Generator(device="cuda").manual_seed(0)
            w = two_four(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16, generator=g) * 0.02)
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16, generator=g)
            dense_ms = timed(lambda: F.linear(x, w))
            reference = F.linear(x, w)
            print(f"{name:<22} {tokens:>6} {'dense (baseline)':<22} {dense_ms:>8.3f} {1.0:>8.2f} {0.0:>13.2e}")
            for label, force_cutlass in backends:
                SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
                try:
                    sparse = to_sparse_semi_structured(w)
                    ms = timed(lambda: F.linear(x, sparse))
                    diff = (F.linear(x, sparse) - reference).abs().max().item()
                except (RuntimeError, ValueError) as exc:
                    print(f"{name:<22} {tokens:>6} {label:<22} failed: {str(exc).splitlines()[0]}")
                    continue
                print(f"{name:<22} {tokens:>6} {label + ' 2:4':<22} {ms:>8.3f} {dense_ms / ms:>8.2f} {diff:>13.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

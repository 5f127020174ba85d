"""The ``quantize`` step: RTN, GPTQ or AWQ over every decoder linear, on the layer sweep.

GPTQ and AWQ read each layer's Hessian (and AWQ the inputs' mean absolute
values) from one pass of the calibration batches, quantize every linear of
the layer, and the quantized layer's outputs feed the next one (the same
sequential protocol as SparseGPT). RTN needs no data. Each linear keeps its
dequantized weights in memory (evaluations run on them) and carries its codes,
scales and zero points (``QuantState``) for the compressed-tensors export.
The embeddings, the LM head and the linears ``ignore`` names stay in 16 bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from workbench.errors import UserError
from workbench.events import Log, WarningEvent
from workbench.models import weight_matrix
from workbench.observers import statistic
from workbench.sweep import Watch

from .awq import apply_scale, fold_groups, search_scale
from .family import QuantizeStep
from .quantizer import QuantArgs, bits_per_weight, fp8_available, gptq, output_error, rtn

STATE_ATTR = "workbench_quant"


@dataclass
class QuantState:
    """What a quantized linear carries for the export: its scheme, codes (CPU), scales and zero points per (row, group)."""

    args: QuantArgs
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, int]

    def matches(self, module: nn.Module) -> bool:
        """Whether the module still holds exactly these quantized weights (no later step changed it)."""
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != self.shape:
            return False
        return bool(torch.equal(self.dequantized(module.weight.dtype), module.weight.detach().cpu()))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        g = self.args.group(self.shape[1])
        s = self.scale.float().repeat_interleave(g, dim=1)
        z = self.zero.float().repeat_interleave(g, dim=1) if self.zero is not None else 0.0
        return ((self.codes.float() - z) * s).to(dtype)


def quant_args(step: QuantizeStep) -> QuantArgs:
    if step.weights == "fp8":
        return QuantArgs(bits=8, kind="fp8", symmetric=True, group_size=0)
    return QuantArgs(bits=step.bits, kind="int", symmetric=step.symmetric, group_size=step.group_size)


def ignored(full_name: str, patterns: list[str]) -> bool:
    return any(full_name.endswith(p) or re.search(p, full_name) for p in patterns)


def scale_dtype_for(spec, loaded) -> torch.dtype:
    """The dtype the export stores scales in: the export's dtype when it is 16-bit or asked for; else (a float32 or
    unknown checkpoint under ``auto``) the model's 16-bit dtype, or bfloat16."""
    dtype = loaded.export_dtype(spec.export.dtype)
    sixteen = (torch.bfloat16, torch.float16)
    if dtype in sixteen or (dtype is not None and spec.export.dtype != "auto"):
        return dtype
    return loaded.dtype if loaded.dtype in sixteen else torch.bfloat16


@torch.no_grad()
def quantize(ctx, step: QuantizeStep, stage: str) -> dict:
    """Quantize ``ctx``'s model layer by layer; return the step's report."""
    loaded = ctx.loaded
    adapter = loaded.adapter
    args = quant_args(step)
    scale_dtype = scale_dtype_for(ctx.spec, loaded)
    nm = step.nm
    n, m = nm if nm else (0, 0)
    data = step.method != "rtn"
    stats_names = {"gptq": ("hessian",), "awq": ("hessian", "abs_mean"), "rtn": ()}[step.method]
    sweep = ctx.sweep(stage)

    def selected(index: int, layer: nn.Module) -> dict[str, nn.Module]:
        prefix = adapter.layer_name(index)
        return {name: mod for name, mod in adapter.linear_modules(layer).items()
                if isinstance(mod, nn.Linear) and not ignored(f"{prefix}.{name}", step.ignore)}

    watch = Watch(inputs={name: statistic(name) for name in stats_names}, linears=lambda i, layer: selected(i, layer)) if data else None
    kept: list[str] = []
    undivided: list[str] = []  # linears whose input size the group size does not divide, kept in 16 bits

    def quantize_layer(layer: nn.Module, i: int, stats) -> dict:
        linears = selected(i, layer)
        prefix = adapter.layer_name(i)
        kept.extend(f"{prefix}.{name}" for name, mod in adapter.linear_modules(layer).items() if name not in linears)
        originals = {name: weight_matrix(mod).detach().float().clone() for name, mod in linears.items()}
        hessians = {name: stats.inputs[name]["hessian"] for name in linears} if stats is not None else {}
        scales: dict[str, torch.Tensor] = {}  # AWQ: each linear's column scale
        row_scales: dict[str, torch.Tensor] = {}  # AWQ: a linear whose rows carry the next group's scale (v -> o, up -> down)
        extra: dict[str, dict] = {}
        if step.method == "awq":
            for prev_name, prev, names in fold_groups(adapter, layer):
                names = [nme for nme in names if nme in linears]
                if not names:
                    continue
                s, alpha, ratio = search_scale([weight_matrix(linears[nme]) for nme in names], hessians[names[0]],
                                               stats.inputs[names[0]]["abs_mean"], args, scale_dtype, step.awq_grid)
                apply_scale(prev, [linears[nme] for nme in names], s)
                if prev_name in linears:
                    row_scales[prev_name] = s
                for nme in names:
                    scales[nme] = s
                    extra[nme] = {"awq_alpha": alpha, "awq_error_ratio": ratio, "awq_folded_into": prev_name}
        modules = {}
        for name, mod in list(linears.items()):
            try:
                args.check(weight_matrix(mod).shape[1], f"{prefix}.{name}")
            except ValueError:  # a linear an earlier step made (a low-rank factor): the model's own were checked at loading
                undivided.append(f"{prefix}.{name}")
                del linears[name]
        use_gptq = step.method == "gptq" or (step.method == "awq" and step.awq_quantizer == "gptq")
        # linears that read one input (and, with AWQ, carry one scale) are quantized as one stacked matrix: rows are
        # independent given the Hessian, so q/k/v and gate/up share one factorization and one column sweep
        batches: dict[tuple, list[str]] = {}
        for group in (stats.groups if stats is not None else [[name] for name in linears]):
            for name in group:
                if name in linears:
                    batches.setdefault((group[0], id(scales.get(name))), []).append(name)
        for names in batches.values():
            weights = [weight_matrix(linears[name]) for name in names]
            H = hessians.get(names[0])
            if H is not None and names[0] in scales:
                s = scales[names[0]].to(H.device)
                H = H / s[:, None] / s[None, :]
            stacked = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
            try:
                if use_gptq:
                    result = gptq(stacked, H, args, scale_dtype, blocksize=step.blocksize, percdamp=step.percdamp,
                                  actorder=step.actorder, static_groups=step.static_groups, sparsity=0.0 if nm else step.sparsity,
                                  n=n, m=m, row_groups=[w.shape[0] for w in weights])
                else:
                    result = rtn(stacked, args, scale_dtype)
            except ValueError as exc:
                raise UserError(f"{stage}: {prefix}.{'/'.join(names)}: {exc}", "raise percdamp or use more calibration tokens") from None
            r0 = 0
            for name, w in zip(names, weights):
                r1 = r0 + w.shape[0]
                deq = result.weight[r0:r1]
                w.copy_(deq.to(w.dtype))
                setattr(linears[name], STATE_ATTR, QuantState(args, result.codes[r0:r1].cpu(), result.scale[r0:r1].cpu(),
                                                              None if result.zero is None else result.zero[r0:r1].cpu(),
                                                              tuple(w.shape)))
                effective = deq  # the function the original weights computed, to compare with them
                if name in scales:
                    effective = effective / scales[name].to(effective.device)[None, :]
                if name in row_scales:
                    effective = effective * row_scales[name].to(effective.device)[:, None]
                zeros = int(result.mask[r0:r1].sum())  # pruned before or in this sweep (codes that round to zero do not count)
                modules[name] = {"shape": list(w.shape), "numel": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel(),
                                 "bits": bits_per_weight(args, w.shape[1], torch.finfo(scale_dtype).bits),
                                 "error": output_error(originals[name], effective, hessians.get(name)), **extra.get(name, {})}
                r0 = r1
        modules = {name: modules[name] for name in linears}  # in module order
        errors = [mod["error"] for mod in modules.values()]
        numel = sum(mod["numel"] for mod in modules.values())
        zeros = sum(mod["zeros"] for mod in modules.values())
        return {"layer": i, "target": 0.0, "value": sum(errors) / len(errors) if errors else 0.0,
                "sparsity": zeros / numel if numel else 0.0, "modules": modules}

    layers = sweep.run(quantize_layer, watch, data=data)
    numel = sum(mod["numel"] for entry in layers for mod in entry["modules"].values())
    stored = sum(mod["numel"] * mod["bits"] for entry in layers for mod in entry["modules"].values())
    zeros = sum(mod["zeros"] for entry in layers for mod in entry["modules"].values())
    sixteen = ["embeddings", "lm_head"] + kept + undivided
    if undivided:
        ctx.emit(WarningEvent(message=f"{len(undivided)} linears whose input size the group size {args.group_size} does not divide "
                                      f"stay in 16 bits: {', '.join(undivided[:4])}{' ...' if len(undivided) > 4 else ''}"))
    report = {"type": "quantize", "label": step.label(), "method": step.method, "scheme": step.scheme, "weights": step.weights,
              "bits": args.code_bits, "group_size": args.group_size, "symmetric": args.symmetric,
              "scale_dtype": str(scale_dtype).replace("torch.", ""), "quantized_params": numel,
              "bits_per_weight": stored / numel if numel else None, "kept_16bit": sixteen, "layers": layers}
    if zeros:
        report["sparsity"] = zeros / numel  # the pruning the quantizer kept (or did, in a joint sweep)
    report["metrics"] = [{"name": "bits_per_weight", "dataset": "model", "value": report["bits_per_weight"] or 16.0,
                          "extra": {"kind": "efficiency", "scheme": step.scheme, "quantized_params": numel}}]
    errors = [entry["value"] for entry in layers]
    report["error"] = sum(errors) / len(errors) if errors else 0.0
    report["headline"] = {"bits per weight": f"{report['bits_per_weight']:.3f} over {numel:,} linear weights" if numel else "none",
                          "output error": f"{report['error']:.4g} (mean relative, per layer)"}
    return report


def run_step(ctx, step: QuantizeStep) -> dict:
    """The engine's runner for ``type = "quantize"`` (``workbench.registry``)."""
    name = f"quantize:{ctx.index}"
    with ctx.stage(name, f"Quantizing: {step.label()}", total=len(ctx.adapter.layers)):
        report = quantize(ctx, step, name)
    report["seconds"] = ctx.timings[name]
    kept = report["kept_16bit"]
    ctx.emit(Log(message=f"{step.label()}: {report['headline']['bits per weight']}; kept in 16 bits: "
                         f"{', '.join(kept[:6])}{f' and {len(kept) - 6} more' if len(kept) > 6 else ''}"))
    return report


def check(facts, step: QuantizeStep, where: str) -> None:
    """Right after loading: an already quantized checkpoint, FP8 without the dtype, a group size the inputs do not take."""
    adapter = facts.adapter
    if adapter.quantization is not None:
        raise UserError(f"{where}: the model is already quantized (its config.json has a quantization_config)",
                        "quantize the unquantized checkpoint")
    if step.weights == "fp8" and not fp8_available():
        raise UserError(f"{where}: FP8 weights need torch.float8_e4m3fn, which this torch ({torch.__version__}) lacks",
                        "install torch 2.1 or newer, or use weights = \"int\" with bits = 8")
    args = quant_args(step)
    if args.kind == "int" and args.group_size and not ({"width", "lowrank"} & set(facts.steps_before)):
        for name, mod in adapter.linear_modules(adapter.layers[0]).items():
            cols = weight_matrix(mod).shape[1]
            if cols % args.group_size:
                raise UserError(f"{where}.group_size = {args.group_size} does not divide {name}'s {cols} input features",
                                "choose a group size dividing every linear's input size (128 fits common models), "
                                "or group_size = 0 for one scale per output channel")


__all__ = ["quantize", "run_step", "check", "QuantState", "quant_args", "STATE_ATTR", "scale_dtype_for"]

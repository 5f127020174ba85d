"""The engine's runner for the structured steps ``depth``, ``width`` and ``vocab``.

Each runner checks what needs the model (layer counts, the grouped-query
layout, the tokenizer, whether biases can be added) before any work, scores
on the run's calibration tokens where its criterion needs them, changes the
model in place and reports the parameters before and after. A vocabulary
step also replaces the run's tokenizer and re-expresses the calibration
tokens in the new ids, so that later steps calibrate on the same text.
"""

from __future__ import annotations

import time

import torch

from workbench.errors import UserError
from workbench.events import LayerDone, Log, Progress, WarningEvent
from workbench.layerwise import LayerRunner, Resident, capture_inputs
from workbench.pruner import _check_cancel

from . import depth as D
from . import vocab as V
from . import width as W
from .layout import DECODER_FAMILIES, LLAMA_LIKE, change, parameter_count, require_model_type


def run_step(run, index: int, step) -> dict:
    """The engine's runner for ``type = "depth" | "width" | "vocab"`` (see ``workbench.engine.STEP_RUNNERS``)."""
    runners = {"depth": _depth, "width": _width, "vocab": _vocab}
    name = f"{step.type}:{index}"
    model = run.loaded.model
    before = parameter_count(model)
    with run.stage(name, step.label(), total=len(run.loaded.adapter.layers)):
        report = runners[step.type](run, name, step, f"steps.{index}")
    after = parameter_count(model)
    report = {"type": step.type, "label": step.label(), "seconds": run.timings[name],
              "parameters_before": before, "parameters_after": after, **report}
    report["headline"] = {**report.get("headline", {}), "parameters": change(before, after)}
    run.emit(Log(message=f"{step.label()}: {', '.join(f'{k} {v}' for k, v in report['headline'].items())}"))
    return report


def _calibration_options(run) -> dict:
    c = run.spec.calibration
    return {"batch_size": c.batch_size, "store": "cpu" if c.offload_activations else None}


def _progress(run, stage: str, detail: str):
    def progress(done: int, total: int) -> None:
        run.emit(Progress(stage=stage, done=done, total=total, detail=detail))

    return progress


# ------------------------------------------------------------------ depth


def _depth(run, stage: str, step, where: str) -> dict:
    loaded = run.loaded
    adapter = loaded.adapter
    require_model_type(adapter, "depth pruning", DECODER_FAMILIES)
    others = sorted({e["kind"] for e in run.structure if not D.renumberable(e)})
    if others:
        raise UserError(f"{where}: a depth step cannot follow a {', '.join(others)} step, whose recorded structure it cannot renumber",
                        "put the depth step before it in [[steps]]")
    total = len(adapter.layers)
    count = D.layer_count(total, step.remove, step.fraction, where)
    if step.selection == "middle":
        D.check_middle(total, count)
    progress = _progress(run, stage, step.criterion.replace("_", " "))
    scoring = dict(cancel=run.cancel, progress=progress, **_calibration_options(run))
    report: dict = {"criterion": step.criterion, "selection": step.selection}
    scores = None
    if step.criterion == "block_influence":
        scores = D.block_influence(adapter, run.tokens, loaded.device, **scoring)
        report["score"] = "block influence (1 - cos(input, output))"
    elif step.criterion == "angular":
        _, scores = D.residual_similarity(adapter, run.tokens, loaded.device, span=count, **scoring)
        report["score"] = f"angular distance across the {count} layers from each start"
    elif step.criterion == "perplexity":
        scores, base = D.perplexity_increase(loaded, run.tokens, run.spec.calibration.batch_size, run.cancel, progress)
        report["score"] = "calibration perplexity increase with the layer skipped"
        report["calibration_perplexity"] = base
    elif step.criterion == "random":
        scores = D.random_scores(total, step.seed)
        report["score"] = f"random (seed {step.seed})"
    if step.criterion == "last":
        removed = list(range(total - count, total))
    elif step.criterion == "angular":
        removed = D.consecutive_block(scores, count)
    else:
        removed = (D.middle if step.selection == "middle" else D.lowest)(scores, count)
    if scores is not None:
        run.emit(Log(message=f"{report['score']}: " + ", ".join(f"{i}: {s:.4f}" for i, s in enumerate(scores))))
    keep = D.remove_layers(adapter, removed)
    D.renumber_structure(run.structure, adapter.layers_path, keep)
    report.update(scores=scores, removed=removed, layers_before=total, layers_after=len(keep),
                  headline={"layers removed": f"{', '.join(map(str, removed))} of {total}"})
    return report


# ------------------------------------------------------------------ width


def _targets(step, geoms: list[W.Geometry], where: str) -> tuple[list[int], list[int]]:
    """Channels and key/value groups each layer keeps under a uniform allocation."""
    group = geoms[0].num_heads // geoms[0].num_kv_heads
    if step.attention_heads is not None:
        fewest = min(g.num_heads for g in geoms)
        if step.attention_heads % group or step.attention_heads > fewest:
            raise UserError(
                f"{where}.attention_heads = {step.attention_heads} breaks the grouped-query layout: each key/value head "
                f"serves {group} query heads and layers have {fewest} query heads",
                f"use a multiple of {group} from {group} to {fewest}")
        groups = [step.attention_heads // group] * len(geoms)
    else:
        groups = [max(1, round(g.num_kv_heads * step.attention_width)) for g in geoms]
    channels = [max(1, round(g.intermediate_size * step.mlp_width)) for g in geoms]
    return channels, groups


def _width(run, stage: str, step, where: str) -> dict:
    loaded = run.loaded
    adapter = loaded.adapter
    require_model_type(adapter, "width pruning", LLAMA_LIKE)
    W.require_plain_linears(adapter)
    layers = adapter.layers
    dim = W.head_dim(adapter.config)
    geoms = [W.geometry(layer, dim) for layer in layers]
    channels, groups = _targets(step, geoms, where)
    parts = [p for p, changed in (("mlp", any(c < g.intermediate_size for c, g in zip(channels, geoms))),
                                  ("attention", any(k < g.num_kv_heads for k, g in zip(groups, geoms)))) if changed]
    if step.attention_width < 1.0 and "attention" not in parts:
        run.emit(WarningEvent(message=f"{where}: attention_width {step.attention_width} of {geoms[0].num_kv_heads} key/value "
                                      "groups rounds to all of them: no heads are removed"))
    if not parts:
        raise UserError(f"{where}: this width step removes nothing from this model", "lower mlp_width or attention_width")
    if step.bias_compensation:
        W.bias_parts_ok(adapter, parts)
        W.enable_biases(adapter, parts)
    pass_ = _WidthPass(run, stage, step, parts)
    if step.allocation == "global":
        scores = [pass_.score(i, propagate=True) for i in range(len(layers))]
        if "mlp" in parts:
            kept = W.global_keep([s["channels"] for s in scores], round(sum(g.intermediate_size for g in geoms) * step.mlp_width))
            for s, k in zip(scores, kept):
                s["keep_channels"] = k
        if "attention" in parts:
            kept = W.global_keep([s["groups"] for s in scores], round(sum(g.num_kv_heads for g in geoms) * step.attention_width))
            for s, k in zip(scores, kept):
                s["keep_groups"] = k
        for i, s in enumerate(scores):
            pass_.apply(i, s)
    else:
        for i in range(len(layers)):
            s = pass_.score(i, propagate=False)
            if "mlp" in parts:
                s["keep_channels"] = W.top(s["channels"], channels[i])
            if "attention" in parts:
                s["keep_groups"] = W.top(s["groups"], groups[i])
            pass_.apply(i, s)
            pass_.propagate(i)
    after = [W.geometry(layer, dim) for layer in layers]
    if all(g == after[0] for g in after):
        W.set_config_widths(adapter.config, after[0], dim)
    if any(g != after[0] for g in after) or any(e["kind"] == "width" for e in run.structure):
        run.structure.append(W.structure_entry(adapter))

    def span(values: list[int]) -> str:
        return str(values[0]) if min(values) == max(values) else f"{min(values)}..{max(values)}"

    headline = {}
    if "mlp" in parts:
        headline["MLP channels"] = f"{span([g.intermediate_size for g in geoms])} -> {span([g.intermediate_size for g in after])}"
    if "attention" in parts:
        headline["attention heads"] = f"{span([g.num_heads for g in geoms])} -> {span([g.num_heads for g in after])}"
    return {"method": step.method, "allocation": step.allocation, "bias_compensation": step.bias_compensation,
            "layers": pass_.layers, "headline": headline}


class _WidthPass:
    """Scores and prunes the layers of one width step, keeping one layer on the device at a time."""

    def __init__(self, run, stage: str, step, parts: list[str]):
        self.run, self.stage, self.step, self.parts = run, stage, step, parts
        self.adapter = run.loaded.adapter
        self.device = torch.device(run.loaded.device)
        self.dim = W.head_dim(self.adapter.config)
        self.generator = torch.Generator().manual_seed(step.seed)
        self.layers: list[dict] = []
        self.runner = None
        if step.method in ("activation", "flap") or step.bias_compensation:
            options = _calibration_options(run)
            store = torch.device(options["store"]) if options["store"] else self.device
            captured = capture_inputs(self.adapter, run.tokens, self.device, options["batch_size"], store)
            self.runner = LayerRunner(self.adapter, captured, self.device, store)

    def score(self, i: int, propagate: bool) -> dict:
        """Channel and key/value-group scores of layer ``i`` (and the mean inputs bias compensation needs)."""
        _check_cancel(self.run.cancel)
        t0 = time.perf_counter()
        layer = self.adapter.layers[i]
        geom = W.geometry(layer, self.dim)
        if self.runner is None:
            result = self._scores(layer, geom, None, None)
        else:
            with Resident(layer, self.device):
                gram = self.step.method == "activation" and "attention" in self.parts
                mlp, attn = W.collect_moments(self.runner, layer, i, geom.num_heads, gram)
                result = self._scores(layer, geom, mlp, attn)
                if propagate:
                    self.runner.propagate(layer, i)
        result["seconds"] = time.perf_counter() - t0
        return result

    def _scores(self, layer, geom: W.Geometry, mlp, attn) -> dict:
        method = self.step.method
        out = {}
        if "mlp" in self.parts:
            out["channels"] = W.channel_scores(method, layer.mlp.down_proj.weight.data, mlp, self.generator).cpu()
        if "attention" in self.parts:
            heads = W.head_scores(method, layer.self_attn.o_proj.weight.data, geom.num_heads, attn, self.generator)
            out["groups"] = W.group_scores(heads.cpu(), geom.num_kv_heads)
        if self.step.bias_compensation:
            out["mlp_mean"], out["attention_mean"] = mlp.mean.cpu(), attn.mean.cpu()
        return out

    def apply(self, i: int, scores: dict) -> None:
        """Remove the units ``scores`` does not keep from layer ``i``, and report it."""
        t0 = time.perf_counter()
        layer = self.adapter.layers[i]
        numel = sum(m.weight.numel() for m in self.adapter.linear_modules(layer).values())
        if "keep_channels" in scores:
            W.prune_mlp(layer, scores["keep_channels"], scores.get("mlp_mean"))
        if "keep_groups" in scores:
            W.prune_heads(layer, scores["keep_groups"], self.dim, scores.get("attention_mean"))
        geom = W.geometry(layer, self.dim)
        W.set_layer_widths(layer, geom)
        left = sum(m.weight.numel() for m in self.adapter.linear_modules(layer).values())
        seconds = scores["seconds"] + time.perf_counter() - t0
        removed = 1.0 - left / numel
        self.layers.append({"layer": i, "intermediate_size": geom.intermediate_size, "num_heads": geom.num_heads,
                            "num_kv_heads": geom.num_kv_heads, "removed": removed, "seconds": seconds})
        modules = {name: {"shape": list(m.weight.shape)} for name, m in self.adapter.linear_modules(layer).items()}
        self.run.emit(LayerDone(stage=self.stage, layer=i, total=len(self.adapter.layers), sparsity=removed,
                                target=removed, seconds=seconds, modules=modules))

    def propagate(self, i: int) -> None:
        """Turn layer ``i``'s inputs into the next layer's, through the pruned layer."""
        if self.runner is not None:
            layer = self.adapter.layers[i]
            with Resident(layer, self.device):
                self.runner.propagate(layer, i)


# ------------------------------------------------------------------ vocabulary


def _token_counts(tokenizer, source: str | None, tokens: torch.Tensor) -> torch.Tensor:
    """How often each token occurs in the documents of ``source`` (all of them), or in the calibration windows."""
    size = len(tokenizer)
    if source is None:
        return torch.bincount(tokens.reshape(-1), minlength=size)
    from workbench.calibration import text_documents

    counts = torch.zeros(size, dtype=torch.long)
    documents = text_documents(source)
    for start in range(0, len(documents), 64):
        ids = tokenizer(documents[start:start + 64], add_special_tokens=False, verbose=False)["input_ids"]
        counts += torch.bincount(torch.tensor([i for doc in ids for i in doc], dtype=torch.long), minlength=size)
    return counts


def _vocab(run, stage: str, step, where: str) -> dict:
    loaded = run.loaded
    require_model_type(loaded.adapter, "vocabulary pruning", DECODER_FAMILIES)
    V.read_vocabulary(loaded.tokenizer)  # refuses unsupported tokenizers before counting
    before = len(loaded.tokenizer)
    size = step.size if step.size is not None else round(step.fraction * before)
    counts = _token_counts(loaded.tokenizer, step.source, run.tokens)
    result = V.prune_vocabulary(loaded.model, loaded.tokenizer, counts, size)
    loaded.tokenizer = result.tokenizer
    run.tokens = V.remap_tokens(run.tokens, result.table)
    return {"source": step.source or run.spec.calibration.source, "counted_tokens": int(counts.sum()),
            "vocab_before": before, "vocab_after": len(result.kept), "by_frequency": result.by_frequency,
            "coverage": result.coverage,
            "headline": {"vocabulary": f"{before} -> {len(result.kept)} tokens",
                         "counted tokens kept as they are": f"{result.coverage:.2%}"}}

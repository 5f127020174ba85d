"""The engine's runner for the structured steps ``depth``, ``width`` and ``vocab``.

Each runner checks what needs the model (layer counts, the grouped-query
layout, the tokenizer, whether biases can be added) before any work, scores
on the run's calibration tokens where its criterion needs them, changes the
model in place and reports the parameters before and after. A vocabulary
step also replaces the run's tokenizer and re-expresses the calibration
tokens in the new ids, so that later steps calibrate on the same text.
"""

from __future__ import annotations


import torch

from workbench.data.sampling import text_documents
from workbench.errors import UserError
from workbench.events import LayerDone, Log, Progress, WarningEvent
from workbench.observers import InputMoments
from workbench.sweep import LayerSweep, Watch

from . import depth as D
from . import vocab as V
from . import width as W
from .layout import DECODER_FAMILIES, LLAMA_LIKE, change, parameter_count, require_model_type


def check(facts, step, where: str) -> None:
    """What only the model can judge, right after loading (``workbench.preflight``); updates ``facts`` as the step would."""
    {"depth": _check_depth, "width": _check_width, "vocab": _check_vocab}[step.type](facts, step, where)


def _check_depth(facts, step, where: str) -> None:
    require_model_type(facts.adapter, "depth pruning", DECODER_FAMILIES)
    count = D.layer_count(facts.layers, step.remove, step.fraction, where)
    if step.selection == "middle":
        D.check_middle(facts.layers, count)
    facts.layers -= count


def _check_width(facts, step, where: str) -> None:
    require_model_type(facts.adapter, "width pruning", LLAMA_LIKE)
    if "lowrank" in facts.steps_before:
        return  # its runner refuses factorized projections, naming the layer where it finds them
    geom = W.geometry(facts.adapter.layers[0], W.head_dim(facts.adapter.config))
    _targets(step, [geom], where)


def _check_vocab(facts, step, where: str) -> None:
    V.read_vocabulary(facts.tokenizer)  # a tokenizer vocabulary pruning cannot handle is refused now
    if step.size is not None:
        if step.size >= facts.vocab:
            raise UserError(f"{where}: the vocabulary has {facts.vocab} tokens, so keeping {step.size} removes nothing",
                            f"keep fewer than {facts.vocab} tokens (size), or use fraction")
        facts.vocab = step.size
    elif step.fraction is not None:
        facts.vocab = max(1, round(facts.vocab * step.fraction))


def run_step(ctx, step) -> dict:
    """The engine's runner for ``type = "depth" | "width" | "vocab"`` (``workbench.registry``)."""
    runners = {"depth": _depth, "width": _width, "vocab": _vocab}
    name = f"{step.type}:{ctx.index}"
    model = ctx.model
    before = parameter_count(model)
    with ctx.stage(name, step.label(), total=len(ctx.adapter.layers)):
        report = runners[step.type](ctx, name, step, f"steps.{ctx.index}")
    after = parameter_count(model)
    report = {"type": step.type, "label": step.label(), "seconds": ctx.timings[name],
              "parameters_before": before, "parameters_after": after, **report}
    report["headline"] = {**report.get("headline", {}), "parameters": change(before, after)}
    ctx.emit(Log(message=f"{step.label()}: {', '.join(f'{k} {v}' for k, v in report['headline'].items())}"))
    return report


def _calibration_options(ctx) -> dict:
    c = ctx.spec.calibration
    return {"batch_size": c.batch_size, "store": ctx.store}


def _progress(ctx, stage: str, detail: str):
    def progress(done: int, total: int) -> None:
        ctx.emit(Progress(stage=stage, done=done, total=total, detail=detail))

    return progress


# ------------------------------------------------------------------ depth


def _depth(ctx, stage: str, step, where: str) -> dict:
    loaded = ctx.loaded
    adapter = loaded.adapter
    require_model_type(adapter, "depth pruning", DECODER_FAMILIES)
    others = sorted({e["kind"] for e in ctx.structure if not D.renumberable(e)})
    if others:
        raise UserError(f"{where}: a depth step cannot follow a {', '.join(others)} step, whose recorded structure it cannot renumber",
                        "put the depth step before it in [[steps]]")
    total = len(adapter.layers)
    count = D.layer_count(total, step.remove, step.fraction, where)
    if step.selection == "middle":
        D.check_middle(total, count)
    progress = _progress(ctx, stage, step.criterion.replace("_", " "))
    scoring = dict(cancel=ctx.cancel, progress=progress, **_calibration_options(ctx))
    report: dict = {"criterion": step.criterion, "selection": step.selection}
    scores = None
    if step.criterion == "block_influence":
        scores = D.block_influence(adapter, ctx.tokens, loaded.device, **scoring)
        report["score"] = "block influence (1 - cos(input, output))"
    elif step.criterion == "angular":
        _, scores = D.residual_similarity(adapter, ctx.tokens, loaded.device, span=count, **scoring)
        report["score"] = f"angular distance across the {count} layers from each start"
    elif step.criterion == "perplexity":
        scores, base = D.perplexity_increase(loaded, ctx.tokens, ctx.spec.calibration.batch_size, ctx.cancel, progress)
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
        ctx.emit(Log(message=f"{report['score']}: " + ", ".join(f"{i}: {s:.4f}" for i, s in enumerate(scores))))
    keep = D.remove_layers(adapter, removed)
    D.renumber_structure(ctx.structure, adapter.layers_path, keep)
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


def _width(ctx, stage: str, step, where: str) -> dict:
    loaded = ctx.loaded
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
        ctx.emit(WarningEvent(message=f"{where}: attention_width {step.attention_width} of {geoms[0].num_kv_heads} key/value "
                                      "groups rounds to all of them: no heads are removed"))
    if not parts:
        raise UserError(f"{where}: this width step removes nothing from this model", "lower mlp_width or attention_width")
    if step.bias_compensation:
        W.bias_parts_ok(adapter, parts)
        W.enable_biases(adapter, parts)
    pass_ = _WidthPass(ctx, stage, step, parts)
    if step.allocation == "global":
        scores = pass_.score_all()
        if "mlp" in parts:
            kept = W.global_keep([s["channels"] for s in scores], round(sum(g.intermediate_size for g in geoms) * step.mlp_width))
            for s, k in zip(scores, kept):
                s["keep_channels"] = k
        if "attention" in parts:
            kept = W.global_keep([s["groups"] for s in scores], round(sum(g.num_kv_heads for g in geoms) * step.attention_width))
            for s, k in zip(scores, kept):
                s["keep_groups"] = k
        for i, s in enumerate(scores):  # no calibration data: the changes are made on the host, layer by layer
            pass_.apply(adapter.layers[i], i, s)
            pass_.announce(i, s)
    else:
        pass_.prune_sequentially(channels, groups)
    after = [W.geometry(layer, dim) for layer in layers]
    if all(g == after[0] for g in after):
        W.set_config_widths(adapter.config, after[0], dim)
    if any(g != after[0] for g in after) or any(e["kind"] == "width" for e in ctx.structure):
        ctx.record_structure(W.structure_entry(adapter))

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
    """Scores and prunes the layers of one width step on a layer sweep (statistics only for the methods that read data)."""

    def __init__(self, ctx, stage: str, step, parts: list[str]):
        self.ctx, self.stage, self.step, self.parts = ctx, stage, step, parts
        self.adapter = ctx.adapter
        self.dim = W.head_dim(self.adapter.config)
        self.generator = torch.Generator().manual_seed(step.seed)
        self.layers: list[dict] = []
        self.data = step.method in ("activation", "flap") or step.bias_compensation
        self.sweep = ctx.sweep(stage)

    def _watch(self) -> Watch:
        """Moments of the inputs of ``down_proj`` (channel activations) and ``o_proj`` (head outputs, with per-head
        Gram matrices for the activation method's head scores: its input is ``num_heads`` slices of ``head_dim``)."""
        gram = self.step.method == "activation" and "attention" in self.parts
        dim = self.dim
        factories = {"mlp.down_proj": {"moments": InputMoments},
                     "self_attn.o_proj": {"moments": lambda features, device: InputMoments(features, device,
                                                                                           features // dim if gram else 0)}}
        return Watch(inputs=lambda name: factories[name],
                     linears=lambda i, layer: {"mlp.down_proj": layer.mlp.down_proj, "self_attn.o_proj": layer.self_attn.o_proj})

    def score(self, layer, i: int, stats) -> dict:
        """Channel and key/value-group scores of layer ``i`` (and the mean inputs bias compensation needs)."""
        geom = W.geometry(layer, self.dim)
        mlp = stats.inputs["mlp.down_proj"]["moments"] if stats is not None else None
        attn = stats.inputs["self_attn.o_proj"]["moments"] if stats is not None else None
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

    def score_all(self) -> list[dict]:
        """Every layer's scores from the dense model (each layer fed the dense previous one's outputs)."""
        scoring = LayerSweep(self.adapter, self.ctx.tokens, self.ctx.device, batch_size=self.ctx.spec.calibration.batch_size,
                             store=self.ctx.store, cancel=self.ctx.cancel)
        return scoring.run(self.score, self._watch() if self.data else None, dense=True, data=self.data)

    def prune_sequentially(self, channels: list[int], groups: list[int]) -> None:
        """Score, prune and propagate each layer in turn: each layer is scored on the pruned layers' outputs."""

        def score(layer, i, stats) -> dict:
            s = self.score(layer, i, stats)
            if "mlp" in self.parts:
                s["keep_channels"] = W.top(s["channels"], channels[i])
            if "attention" in self.parts:
                s["keep_groups"] = W.top(s["groups"], groups[i])
            return s

        def apply(layer, i, s) -> None:
            self.apply(layer, i, s)
            self._report(i, s)

        reports = self.sweep.run(score, self._watch() if self.data else None, data=self.data, apply=apply)
        for entry, report in zip(self.layers, reports):
            entry["seconds"] = report["seconds"]

    def apply(self, layer, i: int, scores: dict) -> None:
        """Remove the units ``scores`` does not keep from layer ``i`` (on the host)."""
        numel = sum(m.weight.numel() for m in self.adapter.linear_modules(layer).values())
        if "keep_channels" in scores:
            W.prune_mlp(layer, scores["keep_channels"], scores.get("mlp_mean"))
        if "keep_groups" in scores:
            W.prune_heads(layer, scores["keep_groups"], self.dim, scores.get("attention_mean"))
        geom = W.geometry(layer, self.dim)
        W.set_layer_widths(layer, geom)
        left = sum(m.weight.numel() for m in self.adapter.linear_modules(layer).values())
        scores["geometry"], scores["removed"] = geom, 1.0 - left / numel

    def _report(self, i: int, scores: dict) -> None:
        """Turn layer ``i``'s scores into what its LayerDone carries, and keep its entry of the step's report."""
        layer = self.adapter.layers[i]
        geom, removed, seconds = scores["geometry"], scores["removed"], scores.get("seconds", 0.0)
        modules = {name: {"shape": list(m.weight.shape)} for name, m in self.adapter.linear_modules(layer).items()}
        scores.clear()
        scores.update(sparsity=removed, target=removed, value=removed, modules=modules, seconds=seconds)
        self.layers.append({"layer": i, "intermediate_size": geom.intermediate_size, "num_heads": geom.num_heads,
                            "num_kv_heads": geom.num_kv_heads, "removed": removed, "seconds": seconds})

    def announce(self, i: int, scores: dict) -> None:
        """The LayerDone of a layer changed after the whole dense scoring pass (global allocation)."""
        self._report(i, scores)
        self.ctx.emit(LayerDone(stage=self.stage, layer=i, total=len(self.adapter.layers), sparsity=scores["sparsity"],
                                target=scores["target"], seconds=scores["seconds"], modules=scores["modules"],
                                value=scores["value"]))


# ------------------------------------------------------------------ vocabulary


def _token_counts(tokenizer, source: str | None, tokens: torch.Tensor) -> torch.Tensor:
    """How often each token occurs in the documents of ``source`` (all of them), or in the calibration windows."""
    size = len(tokenizer)
    if source is None:
        return torch.bincount(tokens.reshape(-1), minlength=size)
    counts = torch.zeros(size, dtype=torch.long)
    documents = text_documents(source)
    for start in range(0, len(documents), 64):
        ids = tokenizer(documents[start:start + 64], add_special_tokens=False, verbose=False)["input_ids"]
        counts += torch.bincount(torch.tensor([i for doc in ids for i in doc], dtype=torch.long), minlength=size)
    return counts


def _vocab(ctx, stage: str, step, where: str) -> dict:
    loaded = ctx.loaded
    require_model_type(loaded.adapter, "vocabulary pruning", DECODER_FAMILIES)
    V.read_vocabulary(loaded.tokenizer)  # refuses unsupported tokenizers before counting
    before = len(loaded.tokenizer)
    size = step.size if step.size is not None else round(step.fraction * before)
    counts = _token_counts(loaded.tokenizer, step.source, ctx.tokens)
    result = V.prune_vocabulary(loaded.model, loaded.tokenizer, counts, size)
    loaded.tokenizer = result.tokenizer
    ctx.replace_tokens(V.remap_tokens(ctx.tokens, result.table))
    return {"source": step.source or ctx.spec.calibration.source, "counted_tokens": int(counts.sum()),
            "vocab_before": before, "vocab_after": len(result.kept), "by_frequency": result.by_frequency,
            "coverage": result.coverage,
            "headline": {"vocabulary": f"{before} -> {len(result.kept)} tokens",
                         "counted tokens kept as they are": f"{result.coverage:.2%}"}}

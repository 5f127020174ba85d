"""The fake worker's imitation of each step type, named by its registry entry (``workbench.registry``: ``fake``).

Each function is ``fn(run, index, step) -> (report, effective sparsity)``:
it emits the stages, layer events and logs the engine's runner emits, through
``run`` (``workbench.backends.fake.jobs.FakeRun``), and returns a report with
the engine's keys. No torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from workbench.errors import UserError
from workbench.events import LayerDone, Log, Progress, Trial
from workbench.history import workbench_home

from .model import HEADS, HIDDEN, MODULE_TYPES, trial_objective, trial_ratios


def structured(run, index: int, step) -> tuple[dict, float]:
    """``depth``, ``width`` and ``vocab``: the imitation of each, with the parameters before and after."""
    before = run.parameters()
    report, effective = {"depth": depth, "width": width, "vocab": vocab}[step.type](run, index, step)
    after = run.parameters()
    report.update(parameters_before=before, parameters_after=after)
    report.setdefault("headline", {})["parameters"] = f"{before:,} -> {after:,} ({(after - before) / before:+.1%})"
    return report, effective


def prune(run, index: int, step) -> tuple[dict, float]:
    """A pruning step: one LayerDone per layer at the target, and the engine's report (method, pattern, allocation,
    target, achieved sparsity, per-layer entries; the OWL ratios and the LM head when they apply)."""
    name = f"{step.type}:{index}"
    nm = step.nm
    target = nm[0] / nm[1] if nm else step.sparsity
    report = {"type": step.type, "label": step.label(), "method": step.method, "pattern": step.pattern,
              "allocation": step.allocation, "target": target, "layers": []}

    def layer(i: int) -> None:
        modules = {n: {"shape": s, "zeros": round(target * s[0] * s[1]), "numel": s[0] * s[1], "sparsity": target,
                       "target": target} for n, s in run.shapes.items()}
        report["layers"].append({"layer": i, "target": target, "sparsity": target, "modules": modules,
                                 "seconds": run.options.delay})
        run.emit(LayerDone(stage=name, layer=i, total=run.layers, sparsity=target, target=target,
                           seconds=run.options.delay, modules=modules))

    run.stage(name, f"Pruning: {step.label()}", run.layers, layer, failing=True)
    report["seconds"] = run.timings[name]
    report["sparsity"] = target
    if step.include_lm_head:
        o, i = run.vocab, HIDDEN  # the LM head's (out, in)
        report["lm_head"] = {"shape": [o, i], "zeros": round(target * o * i), "numel": o * i, "sparsity": target,
                             "target": target}
    if step.allocation == "owl":
        report["outlier_ratios"] = [round(5.0 + 0.1 * i, 2) for i in range(run.layers)]
    run.emit(Log(message=f"{step.label()}: achieved sparsity {target:.4f} of the decoder's linear weights"))
    return report, target


def quantize(run, index: int, step) -> tuple[dict, float]:
    """A quantize step: one LayerDone per layer with a relative output error that grows with depth, and the engine's
    report (scheme, bits per weight, per-layer modules, what stays in 16 bits)."""
    name = f"{step.type}:{index}"
    bits = 8 if step.weights == "fp8" else step.bits
    per_weight = bits + (16 + (0 if step.symmetric or step.weights == "fp8" else bits)) / (step.group_size or HIDDEN)
    report = {"type": step.type, "label": step.label(), "method": step.method, "scheme": step.scheme, "weights": step.weights,
              "bits": bits, "group_size": step.group_size, "symmetric": step.symmetric, "layers": []}
    base = 0.004 * 2 ** (8 - bits) / 16

    def layer(i: int) -> None:
        error = base * (1 + 0.1 * i)
        modules = {n: {"shape": s, "numel": s[0] * s[1], "zeros": 0, "sparsity": 0.0, "bits": per_weight, "error": error}
                   for n, s in run.shapes.items()}
        report["layers"].append({"layer": i, "target": 0.0, "value": error, "sparsity": 0.0, "modules": modules,
                                 "seconds": run.options.delay})
        run.emit(LayerDone(stage=name, layer=i, total=run.layers, sparsity=0.0, target=0.0, seconds=run.options.delay,
                           modules=modules, value=error))

    run.stage(name, f"Quantizing: {step.label()}", run.layers, layer, failing=True)
    numel = run.layers * sum(o * i for o, i in run.shapes.values())
    nm = step.nm
    sparsity = (nm[0] / nm[1] if nm else step.sparsity) if step.joint else (run.effective[-1] if run.effective else 0.0)
    report.update(seconds=run.timings[name], scale_dtype="bfloat16", quantized_params=numel, bits_per_weight=per_weight,
                  kept_16bit=["embeddings", "lm_head"], error=sum(e["value"] for e in report["layers"]) / run.layers,
                  headline={"bits per weight": f"{per_weight:.3f} over {numel:,} linear weights",
                            "output error": f"{base:.4g} (mean relative, per layer)"},
                  metrics=[{"name": "bits_per_weight", "dataset": "model", "value": per_weight,
                            "extra": {"kind": "efficiency", "scheme": step.scheme, "quantized_params": numel}}])
    if sparsity:
        report["sparsity"] = sparsity
    run.emit(Log(message=f"{step.label()}: {report['headline']['bits per weight']}"))
    return report, sparsity


# ---------------------------------------------------------------- low-rank
def lowrank_modules(run, retention: float) -> dict:
    """Per linear of a layer that keeps ``retention`` of its linear parameters: rank, parameters, fraction retained.

    Value projections stay dense, as in the engine; the others share one
    ratio, so the per-linear numbers are close to (not exactly) the layer's.
    """
    dense = {n: o * i for n, (o, i) in run.shapes.items()}
    fixed = sum(v for n, v in dense.items() if n.split(".")[-1] not in MODULE_TYPES)
    ratio = min(1.0, max(0.0, (retention * sum(dense.values()) - fixed) / (sum(dense.values()) - fixed)))
    modules = {}
    for name, (o, i) in run.shapes.items():
        rank = max(1, round(ratio * o * i / (o + i))) if name.split(".")[-1] in MODULE_TYPES else None
        params = rank * (o + i) if rank else o * i
        modules[name] = {"shape": [o, i], "rank": rank, "params": params, "dense_params": o * i,
                         "retained": params / (o * i)}
    return modules

def lowrank(run, index: int, step) -> tuple[dict, float]:
    stage, layers, retention = f"lowrank:{index}", run.layers, step.retention
    report: dict = {"type": "lowrank", "label": step.label(), "method": step.method, "allocation": step.allocation,
                    "retention": retention}
    t0 = time.perf_counter()
    if step.allocation != "uniform":
        def statistics(i: int) -> None:
            run.emit(Progress(stage=f"{stage}:statistics", done=i + 1, total=layers, detail="statistics and factorizations"))

        run.stage(f"{stage}:statistics", f"Low-rank statistics and factorizations ({step.method})", layers, statistics,
                   failing=True)
    title = f"Low-rank: {step.label()}"
    if step.allocation == "search":
        report["search"] = search(run, stage, index, step)
        title = f"Applying trial {report['search']['best']['number']} sequentially"
    elif step.allocation == "energy":
        report["energy"] = step.energy or retention
    else:
        report["ratio"] = round(retention, 4)
    modules = lowrank_modules(run, retention)
    entries: list[dict] = []

    def layer(i: int) -> None:
        entries.append({"layer": i, "retained": retention, "seconds": run.options.delay, "modules": modules})
        run.emit(LayerDone(stage=f"{stage}:apply", layer=i, total=layers, sparsity=1 - retention, target=1 - retention,
                            seconds=run.options.delay, modules=modules, value=retention))

    run.stage(f"{stage}:apply", title, layers, layer, failing=True)
    dense = layers * sum(o * i for o, i in run.shapes.values())
    kept = round(retention * dense)
    retained = f"{retention:.2%} of the decoder's linear parameters ({kept:,} of {dense:,})"
    headline = {"retained": retained}
    if "search" in report:
        best, trials = report["search"]["best"], report["search"]["trials"]
        headline["best trial"] = (f"#{best['number']} of {trials}: objective {best['objective']:.3f} "
                                  f"(sequential {best['sequential_objective']:.3f})")
    report.update({"retained": retention, "params": {"dense": dense, "after": kept}, "layers": entries,
                   "ranks": {f"{i}.{n}": m["rank"] for i in range(layers) for n, m in modules.items() if m["rank"]},
                   "headline": headline, "seconds": round(time.perf_counter() - t0, 3)})
    run.emit(Log(message=f"{step.label()}: {retained}"))
    return report, 1 - retention

def search(run, stage: str, index: int, step) -> dict:
    """The fake rank search: ``trials`` complete trials (see ``trial_objective``); returns the step's search report."""
    name, trials = f"{stage}:search", step.trials
    if step.space == "type":
        groups = list(dict.fromkeys(MODULE_TYPES.values()))
    else:
        groups = [f"layer_{i:0{len(str(run.layers - 1))}d}" for i in range(run.layers)]
    study = step.study or f"{run.spec.name}-{index}-fake"
    # the study's finished trials go to a journal (one JSON line each) beside a marker in the run's folder, as the
    # engine's do, so a cancelled search resumes from them: a run whose step names the journal as its storage
    folder = workbench_home() / "runs" / run.run_id / "search"
    journal = Path(step.storage) if step.storage else folder / "study.journal"
    folder.mkdir(parents=True, exist_ok=True)
    journal.parent.mkdir(parents=True, exist_ok=True)
    (folder / "study.json").write_text(json.dumps({"storage": str(journal), "study": study}) + "\n")
    finished = [int(line) for line in journal.read_text().split()] if journal.is_file() else []
    run.emit(Log(message=f"study {study!r} in {journal} (fake worker: {len(finished)} trial(s) finished before)"))
    best: dict = {}
    metrics: dict[int, dict] = {}

    def trial(n: int, again: bool = False) -> None:
        objective, kl = trial_objective(n), 50.0 / (n + 1)
        params = trial_ratios(n, groups, step.ratio_min, step.ratio_max)
        if not best or objective < best["objective"]:
            best.update(number=n, objective=objective, params=params)
        metrics[n] = {"perplexity": objective - step.kl_weight * kl, "kl": kl, "retained": step.retention}
        run.emit(Trial(stage=name, study=study, number=n, state="complete", params=params, objective=objective,
                        metrics=metrics[n], seconds=run.options.delay, best=dict(best)))
        run.emit(Progress(stage=name, done=n + 1, total=trials,
                           detail=f"best {best['objective']:.3f} (trial {best['number']})"))
        if not again:
            with journal.open("a") as f:
                f.write(f"{n}\n")

    done = min(len(finished), trials)

    def replay() -> None:  # the finished trials of a resumed study, reported at once as the engine's poll does
        for n in range(done):
            trial(n, again=True)

    run.stage(name, f"Rank search: {trials} trials ({step.sampler}, {step.space} space)", trials, trial, failing=True,
               start=done, before=replay)
    chosen = metrics[best["number"]]
    return {"best": {"number": best["number"], "objective": best["objective"], "sequential_objective": best["objective"],
                     "ratios": best["params"]},
            "finalists": [{"number": best["number"], "search_objective": best["objective"],
                           "sequential_objective": best["objective"], "perplexity": chosen["perplexity"],
                           "kl": chosen["kl"]}],
            "kendall_tau": None, "study": study, "storage": str(journal), "space": step.space,
            "sampler": step.sampler, "trials": trials}

# ---------------------------------------------------------------- structured
def depth(run, index: int, step) -> tuple[dict, float]:
    name, total, where = f"depth:{index}", run.layers, f"steps.{index}"
    count = step.remove if step.remove is not None else round(step.fraction * total)
    if count < 1:
        raise UserError(f"{where}: {step.fraction} of {total} layers rounds to no layer",
                        "raise the fraction, or set remove = 1")
    if count >= total:
        raise UserError(f"{where}: removing {count} of the model's {total} decoder layers would leave none",
                        f"remove at most {total - 1} layers")
    removed = list(range(total - count, total)) if step.criterion == "last" else list(range(total - 1 - count, total - 1))
    scored = step.criterion not in ("last", "random")  # as in the engine: only scoring criteria report progress

    def layer(i: int) -> None:
        if scored:
            run.emit(Progress(stage=name, done=i + 1, total=total, detail=step.criterion.replace("_", " ")))

    run.stage(name, step.label(), total, layer, failing=True)
    scores = [round((0.1 if i in removed else 0.5) + 0.001 * i, 4) for i in range(total)] if scored else None
    run.layers -= count
    report = {"type": "depth", "label": step.label(), "seconds": run.timings[name], "criterion": step.criterion,
              "selection": step.selection, "score": "fake", "scores": scores, "removed": removed,
              "layers_before": total, "layers_after": run.layers,
              "headline": {"layers removed": f"{', '.join(map(str, removed))} of {total}"}}
    return report, count / total

def width(run, index: int, step) -> tuple[dict, float]:
    name, total = f"width:{index}", run.layers
    head_dim, group = HIDDEN // HEADS, run.heads // run.kv_heads
    before_i, before_heads = run.shapes["mlp.gate_proj"][0], run.heads
    channels = max(1, round(before_i * step.mlp_width))
    if step.attention_heads is not None:
        groups = step.attention_heads // group
    else:
        groups = max(1, round(run.kv_heads * step.attention_width))
    if channels == before_i and groups == run.kv_heads:
        raise UserError(f"steps.{index}: this width step removes nothing from this model",
                        "lower mlp_width or attention_width")
    before = sum(o * i for o, i in run.shapes.values())
    heads, kv = groups * group * head_dim, groups * head_dim
    run.shapes.update({"self_attn.q_proj": [heads, HIDDEN], "self_attn.k_proj": [kv, HIDDEN],
                        "self_attn.v_proj": [kv, HIDDEN], "self_attn.o_proj": [HIDDEN, heads],
                        "mlp.gate_proj": [channels, HIDDEN], "mlp.up_proj": [channels, HIDDEN],
                        "mlp.down_proj": [HIDDEN, channels]})
    run.heads, run.kv_heads = groups * group, groups
    removed = 1.0 - sum(o * i for o, i in run.shapes.values()) / before
    modules = {n: {"shape": list(s)} for n, s in run.shapes.items()}
    layers: list[dict] = []

    def layer(i: int) -> None:
        layers.append({"layer": i, "intermediate_size": channels, "num_heads": run.heads, "num_kv_heads": groups,
                       "removed": removed, "seconds": run.options.delay})
        run.emit(LayerDone(stage=name, layer=i, total=total, sparsity=removed, target=removed,
                            seconds=run.options.delay, modules=modules, value=removed))

    run.stage(name, step.label(), total, layer, failing=True)
    headline = {}
    if channels != before_i:
        headline["MLP channels"] = f"{before_i} -> {channels}"
    if run.heads != before_heads:
        headline["attention heads"] = f"{before_heads} -> {run.heads}"
    report = {"type": "width", "label": step.label(), "seconds": run.timings[name], "method": step.method,
              "allocation": step.allocation, "bias_compensation": step.bias_compensation, "layers": layers,
              "headline": headline}
    return report, removed

def vocab(run, index: int, step) -> tuple[dict, float]:
    name, before, total = f"vocab:{index}", run.vocab, run.layers
    size = step.size if step.size is not None else round(step.fraction * before)
    if size >= before:
        raise UserError(f"steps.{index}: keeping {size} tokens removes nothing from a vocabulary of {before}",
                        f"keep fewer than {before} tokens")
    params = run.parameters()

    def layer(i: int) -> None:
        run.emit(Progress(stage=name, done=i + 1, total=total, detail="counting tokens"))

    run.stage(name, step.label(), total, layer, failing=True)
    run.vocab = size
    c = run.spec.calibration
    report = {"type": "vocab", "label": step.label(), "seconds": run.timings[name],
              "source": step.source or c.source, "counted_tokens": c.nsamples * (c.seqlen or 512),
              "vocab_before": before, "vocab_after": size, "by_frequency": size - 256, "coverage": size / before,
              "headline": {"vocabulary": f"{before} -> {size} tokens",
                           "counted tokens kept as they are": f"{size / before:.2%}"}}
    return report, 2 * (before - size) * HIDDEN / params

"""The evaluations beyond perplexity that a run's ``[evaluate]`` table asks for, as stages of the engine's Run.

``Run.evaluate(phase)`` calls :func:`prepare` before any model work (so an
unknown task, a missing task file or a data set with a bad label fails
first), then, with the model placed on the device, :func:`run_all`: zero-shot
tasks, in-context learning, efficiency. Every number becomes a ``Metric``
event with the phase (before: dense, after: compressed, eval: an evaluation
attached to a finished run) through ``run.add_metric``.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.events import Progress

from .tta_settings import configs_from_spec as tta_configs


def requested(e) -> bool:
    return bool(e.zeroshot or e.icl or e.efficiency)


def phase_label(phase: str) -> str:
    return {"before": "dense", "after": "compressed"}.get(phase, phase)


@dataclass
class Prepared:
    tasks: dict | None  # zeroshot.load_tasks, loaded anew for each phase (a Task keeps its last requests)


def prepare(e) -> Prepared:
    """Load what the evaluations read, so bad input is reported before the model is run."""
    from .icl_data import get_dataset, parse_set_name, read_examples

    tasks = None
    if e.zeroshot:
        from .zeroshot import load_tasks

        tasks = load_tasks(list(e.zeroshot))
    for name in e.icl:
        dataset = get_dataset(parse_set_name(name)[0], e.icl_labels, e.icl_template)
        read_examples(dataset, "test")
        if "fewshot" in e.icl_modes:
            read_examples(dataset, "train")
    return Prepared(tasks)


def run_all(run, phase: str, prepared: Prepared, device) -> None:
    """Zero-shot, ICL and efficiency, as the spec asks, on the model already placed (inputs go to ``device``)."""
    e = run.spec.evaluate
    if e.zeroshot:
        _zeroshot(run, phase, prepared)
    if e.icl:
        _icl(run, phase)
    if e.efficiency:
        _efficiency(run, phase, device)


def _progress(run, stage: str):
    def report(detail: str, done: int, total: int) -> None:
        run.emit(Progress(stage=stage, done=done, total=total, detail=detail))

    return report


def _record(run, phase: str, results: list[dict]) -> None:
    for r in results:
        run.add_metric({"name": r["name"], "dataset": r["dataset"], "phase": phase, "value": r["value"],
                        "stderr": r.get("stderr"), "windows": r.get("samples"), "limit": r.get("limit"),
                        "extra": r.get("extra", {})})


def _adapting(e) -> str:
    """What a stage's title adds when the evaluation adapts at test time."""
    return f", test-time adaptation: {', '.join(e.tta)}" if set(e.tta) - {"none"} else ""


def _zeroshot(run, phase: str, prepared: Prepared) -> None:
    from .zeroshot import evaluate_tasks

    e = run.spec.evaluate
    stage = f"zeroshot:{phase}"
    with run.stage(stage, f"Zero-shot tasks ({phase_label(phase)}): {', '.join(e.zeroshot)}{_adapting(e)}"):
        results = evaluate_tasks(run.loaded.model, run.loaded.tokenizer, list(e.zeroshot), limit=e.zeroshot_limit,
                                 batch_size=e.batch_size, progress=_progress(run, stage), cancel=run.cancel, tasks=prepared.tasks,
                                 adaptations=tta_configs(e))
    _record(run, phase, results)


def _icl(run, phase: str) -> None:
    from .icl import configs_from_spec, evaluate_dataset

    e = run.spec.evaluate
    stage = f"icl:{phase}"
    with run.stage(stage, f"In-context learning ({phase_label(phase)}): {', '.join(e.icl)} x {', '.join(e.icl_modes)}{_adapting(e)}"):
        for name in e.icl:  # each mode's result is recorded as soon as it is measured
            evaluate_dataset(run.loaded.model, run.loaded.tokenizer, name, configs_from_spec(e), seeds=e.icl_seeds,
                             limit=e.icl_limit, labels=e.icl_labels, template=e.icl_template,
                             context_length=run.context_seqlen(), progress=_progress(run, stage), cancel=run.cancel,
                             adaptations=tta_configs(e), on_result=lambda r: _record(run, phase, [r]))


def _efficiency(run, phase: str, device) -> None:
    from . import efficiency

    stage = f"efficiency:{phase}"
    with run.stage(stage, f"Efficiency ({phase_label(phase)}) on {device}"):
        result = efficiency.measure(run.loaded.model, run.loaded.tokenizer, device, seqlen=min(512, run.context_seqlen()))
    _record(run, phase, efficiency.metrics(result))

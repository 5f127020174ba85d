"""The fake worker speaks like the engine: every shipped preset, shrunk, runs on both; stages, events and reports match.

The UI's tests run against the fake worker (no torch, fixed numbers), so the
fake must not drift from what users see: for each shipped run preset, made
tiny (a few calibration windows and evaluation windows, two search trials),
the real engine and the fake worker run the same spec. The stages they
announce (names, in order), the step plans, the kinds of events they emit,
and the keys of their summaries, step reports, per-layer entries and
metrics must be the same. Only the numbers differ.
"""

from __future__ import annotations

import copy

import pytest

from workbench.backends.fake import FakeJobs, FakeOptions
from workbench.backends.worker import Job
from workbench.engine import Run
from workbench.presets import preset_names
from workbench.spec import load_preset_data, spec_from_dict

pytestmark = pytest.mark.slow

# events whose presence depends on the data (warnings, log lines), not on the stages a step goes through
LOOSE_EVENTS = {"log", "warning", "progress"}


def _tiny(name: str, tmp_path) -> dict:
    data = copy.deepcopy(load_preset_data(name))
    data.pop("guide", None)
    data["model"] = {"name": "demo", "dtype": "float32", "device": "cpu"}
    data["calibration"] = {**data.get("calibration", {}), "nsamples": 4, "seqlen": 64, "summary": False,
                           "batch_size": 4}
    data["calibration"].pop("compare", None)
    evaluate = data.setdefault("evaluate", {})
    evaluate.update({"perplexity": ["wikitext2"], "seqlen": 64, "limit": 1, "before": True})
    for key in ("zeroshot", "icl", "efficiency", "zeroshot_limit"):
        evaluate.pop(key, None)
    for i, step in enumerate(data.get("steps", [])):
        if step.get("type") == "lowrank" and step.get("allocation") == "search":
            step.update(trials=2, objective_chunks=1, objective_seqlen=32, storage=str(tmp_path / f"study{i}.journal"))
        if step.get("type") == "vocab" and step.get("source"):
            step["source"] = "c4"
        if step.get("type") == "depth" and step.get("criterion") == "perplexity":
            step["criterion"] = "block_influence"
    data["export"] = {"save": False}
    return data


def _engine(data: dict) -> tuple[list, dict]:
    events = []
    summary = Run(spec_from_dict(copy.deepcopy(data)), emit=events.append).execute()
    return events, summary


def _fake(data: dict) -> tuple[list, dict]:
    events = []
    jobs = FakeJobs(FakeOptions(delay=0.0, layers=8))
    job = Job(id="conformance", kind="run", request=spec_from_dict(copy.deepcopy(data)), run_id="conformance")
    summary = jobs.execute(job, events.append, lambda: False)
    return events, summary


def _shape(events: list, summary: dict) -> dict:
    """What must match: stage order, step plans, event kinds, and the keys of everything reported."""
    stages = [e.stage for e in events if e.type == "stage_started"]
    plans = [(e.kind, [(s["stage"], s["quantity"]) for s in e.stages]) for e in events if e.type == "stage_plan"]
    kinds = sorted({e.type for e in events} - LOOSE_EVENTS)
    layer_stages = sorted({e.stage for e in events if e.type == "layer_done"})
    steps = [{"type": s.get("type"), "keys": sorted(s),
              "layer_keys": sorted(s["layers"][0]) if s.get("layers") else None} for s in summary["steps"]]
    metrics = sorted({tuple(sorted(m)) for m in summary["metrics"]})
    return {"summary_keys": sorted(summary), "stages": stages, "plans": plans, "events": kinds,
            "layer_done_stages": layer_stages, "steps": steps, "metric_keys": metrics}


RUN_PRESETS = [name for name in preset_names() if "study" not in load_preset_data(name)]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_PRESETS)
def test_the_fake_worker_matches_the_engine(name, tmp_path, monkeypatch, one_thread):
    (tmp_path / "engine").mkdir()
    (tmp_path / "fake").mkdir()
    engine = _shape(*_engine(_tiny(name, tmp_path / "engine")))
    fake = _shape(*_fake(_tiny(name, tmp_path / "fake")))
    for key in engine:
        assert fake[key] == engine[key], key

"""The UI's state: progress and ETA by hand-computed values, and scripted worker updates folded into jobs."""

from __future__ import annotations

import pytest

from workbench.backends.client import Update
from workbench.events import (LayerDone, Log, Metric, Progress, RunStarted, StageFinished, StageStarted, Trial,
                              WarningEvent)
from workbench.screens.state import JobState, LogLines, StageState, UIState

SPEC = {"name": "tiny", "steps": [{"type": "prune", "method": "wanda", "sparsity": 0.5}], "evaluate": {"perplexity": ["wikitext2"]}}


def job_with(stages: dict[str, StageState], **kwargs) -> JobState:
    job = JobState("j1", "run", spec=SPEC, status="running", **kwargs)
    job.stages = stages
    return job


def finished(name: str) -> StageState:
    return StageState(name, total=None, seconds=1.0)


def test_expected_stages_of_a_prune_run():
    assert JobState("j", "run", spec=SPEC).expected_stages == ["load", "calibrate", "evaluate:before", "prune:0", "evaluate:after"]
    no_before = {**SPEC, "evaluate": {"before": False}}
    assert JobState("j", "run", spec=no_before).expected_stages == ["load", "calibrate", "prune:0", "evaluate:after"]
    assert JobState("j", "evaluate", spec={"evaluate": {}}).expected_stages == ["load", "evaluate:before"]


def test_progress_counts_finished_stages_and_the_current_share():
    stages = {n: finished(n) for n in ("load", "calibrate", "evaluate:before")}
    stages["prune:0"] = StageState("prune:0", total=8, done=2)
    # 5 expected stages: 3 finished + 2/8 of the fourth
    assert job_with(stages).progress() == pytest.approx((3 + 2 / 8) / 5)
    assert job_with({}).progress() == 0.0
    assert JobState("j", "run", spec=SPEC, status="finished").progress() == 1.0
    # a stage without a total counts only when it finished
    assert job_with({"load": StageState("load", done=3)}).progress() == 0.0


def test_progress_counts_unexpected_stages_too():
    stages = {n: finished(n) for n in ("load", "calibrate", "evaluate:before", "prune:0", "evaluate:after")}
    stages["export"] = StageState("export", total=4, done=1)
    assert job_with(stages).progress() == pytest.approx((5 + 0.25) / 6)


def test_eta_scales_the_elapsed_time_by_the_fraction_left():
    stages = {n: finished(n) for n in ("load", "calibrate", "evaluate:before")}
    stages["prune:0"] = StageState("prune:0", total=8, done=2)  # progress 0.65
    job = job_with(stages, started=100.0)
    assert job.eta(now=113.0) == pytest.approx(13.0 * 0.35 / 0.65)
    assert job_with({}, started=100.0).eta(now=110.0) is None  # nothing done yet: unknown
    assert JobState("j", "run", spec=SPEC, status="finished", started=1.0).eta(now=5.0) == 0.0
    assert JobState("j", "run", spec=SPEC, status="queued").eta(now=5.0) is None


def test_eta_counts_down_while_a_stage_reports_nothing_instead_of_growing():
    stages = {n: finished(n) for n in ("load", "calibrate", "evaluate:before")}
    stages["prune:0"] = StageState("prune:0", total=8, done=2)  # progress 0.65
    job = job_with(stages, started=100.0)
    first = job.eta(now=113.0)
    assert first == pytest.approx(13.0 * 0.35 / 0.65)
    assert job.eta(now=118.0) == pytest.approx(first - 5.0)  # no progress for 5 s: 5 s less, not more
    assert job.eta(now=1000.0) == 0.0
    stages["prune:0"].done = 4  # progress again: a fresh estimate from the time so far
    assert job.eta(now=1000.0) == pytest.approx(900.0 * (1 - job.progress()) / job.progress())


def test_stage_eta_from_its_rate():
    stage = StageState("prune:0", total=8, done=2, started=10.0)
    assert stage.eta(now=14.0) == pytest.approx(6 / (2 / 4))  # 2 units in 4 s, 6 left
    assert StageState("x", total=8, done=0, started=10.0).eta(now=14.0) is None
    assert StageState("x", total=None, done=3, started=10.0).eta(now=14.0) is None
    assert StageState("x", total=8, done=8, started=10.0, seconds=4.0).eta(now=99.0) == 0.0


def test_log_lines_count_every_append_and_return_only_new_ones():
    logs = LogLines(maxlen=3)
    for i in range(5):
        logs.append(("info", str(i)))
    assert logs.appended == 5 and [m for _, m in logs] == ["2", "3", "4"]
    assert [m for _, m in logs.since(0)] == ["2", "3", "4"]  # the older ones fell off
    assert [m for _, m in logs.since(3)] == ["3", "4"]
    assert logs.since(5) == []


# ---------------------------------------------------------------- a scripted run, update by update
def ev(event) -> Update:
    return Update("w0", "event", "j1", event=event)


def layer(i: int, sparsity: float, errors: list[float] | None = None) -> LayerDone:
    modules = {f"m{k}": {"sparsity": sparsity, "error": e} for k, e in enumerate(errors or [])}
    return LayerDone(stage="prune:0", layer=i, total=4, sparsity=sparsity, target=0.5, seconds=0.25, modules=modules)


SCRIPT = [
    Update("w0", "accepted", "j1"),
    Update("w0", "started", "j1"),
    ev(RunStarted(run_id="r-1")),
    ev(StageStarted(stage="load", title="Loading demo")),
    ev(StageFinished(stage="load", seconds=0.5)),
    ev(Log(message="LlamaForCausalLM with 4 layers")),
    ev(StageStarted(stage="evaluate:before", title="Perplexity (dense)", total=2)),
    ev(Progress(stage="evaluate:before", done=1, total=2, detail="wikitext2")),
    ev(Progress(stage="evaluate:before", done=2, total=2, detail="wikitext2")),
    ev(Metric(name="perplexity", dataset="wikitext2", value=30.0, phase="before", windows=2)),
    ev(StageFinished(stage="evaluate:before", seconds=1.0)),
    ev(StageStarted(stage="prune:0", title="wanda 50%", total=4)),
    ev(layer(0, 0.5, [0.1, 0.3])),
    ev(layer(1, 0.49)),
    ev(layer(0, 0.5, [0.2])),  # the same layer again replaces its row
    ev(WarningEvent(message="layer 1 fell short of its target")),
    ev(Trial(stage="lowrank:1:search", number=0, objective=50.0, params={"qk": 0.5}, best={"number": 0, "objective": 50.0})),
    ev(Trial(stage="lowrank:1:search", number=1, objective=45.0, params={"qk": 0.7}, best={"number": 1, "objective": 45.0})),
    ev(Metric(name="perplexity", dataset="wikitext2", value=60.0, phase="after", windows=2)),
    ev(Metric(name="acc", dataset="piqa", value=0.7, phase="after", stderr=0.01)),
]


def scripted_state() -> tuple[UIState, JobState]:
    state = UIState()
    job = state.add_job(JobState("j1", "run", "tiny", spec=SPEC))
    state.take_changes()
    for update in SCRIPT:
        state.apply(update)
    return state, job


def test_a_scripted_run_folds_into_stages_layers_trials_metrics_and_logs():
    state, job = scripted_state()
    assert (job.status, job.worker, job.run_id, job.current) == ("running", "w0", "r-1", "prune:0")
    assert job.events == len(SCRIPT) - 2
    assert state.take_changes() == {"j1"}

    assert list(job.stages) == ["load", "evaluate:before", "prune:0"]
    assert job.stages["load"].finished and job.stages["load"].seconds == 0.5
    before = job.stages["evaluate:before"]
    assert (before.total, before.done, before.detail, before.seconds) == (2, 2, "wikitext2", 1.0)
    prune = job.stages["prune:0"]
    assert (prune.total, prune.done, prune.finished) == (4, 2, False)

    assert [r["layer"] for r in job.layers["prune:0"]] == [1, 0]  # layer 0's second report moved to the end
    assert job.layers["prune:0"][1]["modules"] == {"m0": {"sparsity": 0.5, "error": 0.2}}
    assert job.layer_values() == ("prune:0", [0.5, 0.49, None, None], 4, 0.5)

    assert [t["number"] for t in job.trials["lowrank:1:search"]] == [0, 1]
    assert job.trials["lowrank:1:search"][1]["best"] == {"number": 1, "objective": 45.0}

    assert job.metric_value("wikitext2", "before") == 30.0
    assert job.metric_value("wikitext2", "after") == 60.0
    assert job.metric_value("piqa", "after", "acc") == 0.7
    assert job.metric_value("c4", "after") is None
    assert next(m for m in job.metrics if m["name"] == "acc")["stderr"] == 0.01

    assert list(job.logs) == [
        ("stage", "Loading demo: started"), ("stage", "Loading demo: done in 0.5 s"),
        ("info", "LlamaForCausalLM with 4 layers"),
        ("stage", "Perplexity (dense): started"), ("stage", "Perplexity (dense): done in 1.0 s"),
        ("stage", "wanda 50%: started"), ("warning", "layer 1 fell short of its target"),
    ]
    # the scripted stages: load, evaluate:before finished; prune:0 at 2/4 of 5 expected stages
    assert job.progress() == pytest.approx((2 + 2 / 4) / 5)


def test_result_ends_the_job_and_adds_metrics_whose_events_were_missed():
    state, job = scripted_state()
    summary = {"metrics": [{"name": "perplexity", "dataset": "wikitext2", "phase": "after", "value": 60.0},
                           {"name": "perplexity", "dataset": "c4", "phase": "after", "value": 80.0}]}
    state.apply(Update("w0", "result", "j1", data={"result": summary}))
    assert job.status == "finished" and not job.active and job.result == summary
    assert job.metric_value("c4", "after") == 80.0
    assert sum(1 for m in job.metrics if m["dataset"] == "wikitext2" and m["phase"] == "after") == 1
    assert job.progress() == 1.0


@pytest.mark.parametrize("kind, status", [("worker_died", "failed"), ("out_of_memory", "failed"), ("cancelled", "cancelled")])
def test_an_error_update_ends_the_job_with_its_message_and_hint(kind, status):
    state, job = scripted_state()
    state.apply(Update("w0", "error", "j1", data={"kind": kind, "message": "it broke", "hint": "do this", "stderr": ["a", "b"]}))
    assert job.status == status and not job.active
    assert job.error == {"kind": kind, "message": "it broke", "hint": "do this", "details": "a\nb"}
    # a cancel is what the user asked for: a warning, not an error
    assert job.logs[-1] == ("warning" if kind == "cancelled" else "error", "it broke (do this)")


def test_a_hint_that_names_the_run_as_RUN_gets_the_runs_id():
    state, job = scripted_state()
    job.run_id = "20250101-000000-abc123"
    state.apply(Update("w0", "error", "j1", data={"kind": "cancelled", "message": "the search was cancelled",
                                                  "hint": "resume with workbench search --resume RUN"}))
    assert job.error["hint"] == "resume with workbench search --resume 20250101-000000-abc123"
    assert job.logs[-1] == ("warning", "the search was cancelled (resume with workbench search --resume 20250101-000000-abc123)")


def test_worker_updates_hello_memory_and_death():
    state = UIState()
    gpu = {"kind": "cuda", "name": "GPU 0", "total": 100, "free": 90}
    state.apply(Update("w0", "hello", data={"devices": [gpu]}))
    w = state.workers["w0"]
    assert (w.status, w.devices) == ("ready", [gpu])
    assert state.take_changes() == {"workers"}
    state.apply(Update("w0", "memory", data={"devices": [{**gpu, "free": 40}]}))
    assert w.devices[0]["free"] == 40
    state.apply(Update("w0", "memory", data={}))  # a report without devices keeps the last ones
    assert w.devices[0]["free"] == 40
    state.apply(Update("w0", "died", data={"reason": "was killed by signal 9 (SIGKILL)"}))
    assert w.status == "dead" and "SIGKILL" in w.message
    severity, message, hint = state.notices[-1]
    assert severity == "error" and "w0" in message and "History" in hint


def test_updates_for_unknown_jobs_are_ignored():
    state = UIState()
    state.apply(Update("w0", "event", "nope", event=StageStarted(stage="load")))
    assert state.jobs == {} and state.take_changes() == set()


def test_latest_picks_the_last_submitted_job_of_a_kind():
    state = UIState()
    state.add_job(JobState("a", "run", submitted=1.0))
    state.add_job(JobState("b", "evaluate", submitted=3.0))
    state.add_job(JobState("c", "run", submitted=2.0))
    assert state.latest("run").id == "c" and state.latest().id == "b" and state.latest("inspect") is None


def test_a_low_rank_search_step_expects_its_three_stages():
    job = JobState("j", "run", spec={"steps": [{"type": "lowrank", "allocation": "search"}, {"type": "prune"}]})
    assert job.expected_stages == ["load", "calibrate", "evaluate:before", "lowrank:0:statistics", "lowrank:0:search",
                                   "lowrank:0:apply", "prune:1", "evaluate:after"]
    energy = JobState("k", "run", spec={"steps": [{"type": "lowrank", "allocation": "energy"}], "evaluate": {"before": False}})
    assert energy.expected_stages == ["load", "calibrate", "lowrank:0:statistics", "lowrank:0:apply", "evaluate:after"]

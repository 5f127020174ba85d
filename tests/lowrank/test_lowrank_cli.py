"""``workbench search`` on the demo model: worker processes on one journal, resume after a kill, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_support import expect_bad_input, run_cli
from workbench.history import History

PRESET = "lowrank-feature-bo-80"
FAST = ["--set", "calibration.nsamples=4", "--set", "calibration.seqlen=64", "--set", "evaluate.limit=1",
        "--set", "steps.0.objective_chunks=2", "--set", "steps.0.objective_seqlen=64", "--set", 'steps.0.sampler="tpe"', "--quiet"]


def _study(run_dir: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    marker = json.loads((run_dir / "search" / "study.json").read_text())
    storage = optuna.storages.JournalStorage(JournalFileBackend(marker["storage"]))
    return optuna.load_study(study_name=marker["study"], storage=storage), storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_share_one_journal_study(capsys):
    code, out, err = run_cli(capsys, "search", PRESET, "--workers", "2", "--set", "steps.0.trials=6", *FAST, "--json")
    assert code == 0, err
    summary = json.loads(out)  # nothing but the summary on stdout (Optuna logs nothing there)
    with History() as history:
        record = history.get(summary["run_id"])
        events = history.events(record.id)
    study, storage = _study(Path(record.out_dir))
    assert len(storage.get_all_studies()) == 1
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 6 <= len(complete) <= 7  # two workers may each start the last trial
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both processes ran trials
    assert os.getpid() not in {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in complete}
    trial_events = [e for e in events if e["type"] == "trial"]
    assert sorted(e["number"] for e in trial_events) == sorted(numbers)
    assert summary["steps"][0]["search"]["trials"] == len(complete)


@pytest.mark.slow
def test_a_killed_search_resumes_without_losing_finished_trials(capsys, tmp_path):
    cmd = [sys.executable, "-m", "workbench", "search", PRESET, "--set", "steps.0.trials=5", *FAST[:-1],
           "--set", "steps.0.objective_seqlen=128"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        study = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.2)
            assert proc.poll() is None, proc.stderr.read().decode()
            with History() as history:
                runs = history.runs()
            marker = Path(runs[0].out_dir) / "search" / "study.json" if runs else None
            if marker is None or not marker.is_file():
                continue
            study, _ = _study(marker.parent.parent)
            if sum(t.state.name == "COMPLETE" for t in study.trials) >= 2:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = marker.parent.parent
    before, _ = _study(run_dir)
    finished = {t.number: (t.value, t.params) for t in before.trials if t.state.name == "COMPLETE"}
    assert len(finished) >= 2
    orphans = [t.number for t in before.trials if t.state.name == "RUNNING"]
    code, out, err = run_cli(capsys, "search", "--resume", runs[0].id, "--quiet", "--json")
    assert code == 0, err
    after, _ = _study(run_dir)
    complete = [t for t in after.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 5
    assert {t.number: (t.value, t.params) for t in complete if t.number in finished} == finished  # nothing lost
    for number in orphans:  # the trial the kill interrupted was failed and its allocation run again
        assert after.trials[number].state.name == "FAIL"
        assert any(t.system_attrs.get("failed_trial") == number for t in complete)
    summary = json.loads(out)
    with History() as history:
        assert history.get(runs[0].id).status == "died"  # killed: its process is gone, and the history says so
        trial_events = [e for e in history.events(summary["run_id"]) if e["type"] == "trial"]
    assert {e["number"] for e in trial_events} >= set(finished)  # the resumed run shows the whole study


@pytest.mark.slow
def test_study_clash_with_a_different_search_space(capsys, tmp_path):
    from workbench.lowrank.search import open_storage, open_study

    journal = tmp_path / "shared.journal"
    study = open_study(open_storage(str(journal)), "shared", ["layer", ["layer_0", "layer_1"], 0.2, 1.0], {"x": 1}, "tpe", 0)
    study.enqueue_trial({"layer_0": 0.5, "layer_1": 0.5})
    expect_bad_input(capsys, "search", PRESET, "--storage", str(journal), "--study", "shared", "--set", "steps.0.trials=2", *FAST,
         words=["'shared'", "different search space", "layer_0"])


def test_an_unreachable_storage_is_refused_before_anything_runs(capsys):
    url = f"postgresql://workbench:secret@127.0.0.1:{_free_port()}/studies"
    err = expect_bad_input(capsys, "search", PRESET, "--storage", url, *FAST, words=["cannot reach the study storage", "127.0.0.1"])
    assert "secret" not in err  # the password is not printed
    with History() as history:
        assert history.runs() == []


@pytest.mark.slow
def test_an_unreachable_storage_in_a_run_keeps_the_dense_evaluation(capsys):
    url = f"postgresql://workbench@127.0.0.1:{_free_port()}/studies"
    expect_bad_input(capsys, "run", PRESET, "--set", f'steps.0.storage="{url}"', *FAST, words=["cannot reach the study storage"])
    with History() as history:
        record = history.runs()[0]
        assert record.status == "failed"
        assert [m["phase"] for m in history.metrics(record.id)] == ["before"]


@pytest.mark.parametrize("value", ["1.5", "0", "-0.2"])
def test_retention_outside_the_unit_interval(capsys, value):
    expect_bad_input(capsys, "search", PRESET, "--set", f"steps.0.retention={value}", *FAST, words=["retention", "(0, 1]"])


def test_search_needs_a_search_step_and_one_source(capsys):
    expect_bad_input(capsys, "search", "lowrank-svd-uniform-80", *FAST, words=["allocation = \"search\""])
    expect_bad_input(capsys, "search", *FAST, words=["--resume"])
    expect_bad_input(capsys, "search", "--resume", "nosuchrun", words=["nosuchrun"])

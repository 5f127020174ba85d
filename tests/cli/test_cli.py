"""Headless CLI: bad input gets one clear message and exit code 2; a good run exits 0 and lands in the history."""

import json
import subprocess
import sys

import pytest

from cli_support import expect_bad_input, run_cli
from workbench.history import History

FAST = ["--set", "calibration.nsamples=4", "--set", "calibration.seqlen=64", "--set", "evaluate.limit=2", "--quiet"]


def test_missing_model_path(capsys, tmp_path):
    expect_bad_input(capsys, "run", "quickstart", "--model", str(tmp_path / "nowhere"), *FAST, words=["does not exist"])


def test_unknown_architecture(capsys, tmp_path):
    folder = tmp_path / "bloomish"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bloom", "architectures": ["BloomForCausalLM"]}))
    expect_bad_input(capsys, "run", "quickstart", "--model", str(folder), *FAST, words=["bloom", "llama"])


@pytest.mark.parametrize("override, word", [("steps.0.sparsity=1.2", "[0, 1)"), ("steps.0.pattern=4:4", "0 < N < M"),
                                            ("calibration.source=nope", "calibration source")])
def test_impossible_settings(capsys, override, word):
    expect_bad_input(capsys, "run", "quickstart", "--set", override, words=[word])


def test_empty_and_binary_calibration_files(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_bad_input(capsys, "run", "quickstart", "--set", f'calibration.source="file:{empty}"', *FAST, words=["empty"])
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    expect_bad_input(capsys, "run", "quickstart", "--set", f'calibration.source="file:{binary}"', *FAST, words=[str(binary)])


def test_nsamples_larger_than_the_data_allows(capsys, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("A short text about nothing in particular. " * 40)
    err = expect_bad_input(capsys, "run", "quickstart", "--set", f'calibration.source="file:{small}"',
               "--set", "calibration.nsamples=500", "--set", "calibration.seqlen=64", "--quiet")
    assert "window" in err or "samples" in err
    # the failed run is in the history, marked failed, with the events it emitted before failing
    with History() as h:
        run = h.runs()[0]
        assert run.status == "failed" and run.error["kind"] == "bad_input"
        assert [e["type"] for e in h.events(run.id)][:2] == ["run_started", "stage_started"]


def test_malformed_toml_and_unknown_key(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    expect_bad_input(capsys, "run", str(bad), words=["not valid TOML"])
    expect_bad_input(capsys, "validate", str(bad), words=["not valid TOML"])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[calibration]\nsamples = 3\n")
    expect_bad_input(capsys, "validate", str(unknown), words=["calibration.samples", "nsamples"])


@pytest.mark.slow
def test_a_run_exits_0_prints_json_and_is_recorded(capsys):
    code, out, err = run_cli(capsys, "run", "quickstart", *FAST, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert [m["phase"] for m in summary["metrics"]] == ["before", "after"]
    assert all(m["seqlen"] == 512 and m["windows"] == 2 and m["limit"] == 2 for m in summary["metrics"])
    with History() as h:
        record = h.get(summary["run_id"])
        assert record.status == "finished"
        stored = {(m["dataset"], m["phase"]): m["value"] for m in h.metrics(record.id)}
    assert stored == {(m["dataset"], m["phase"]): m["value"] for m in summary["metrics"]}
    code, out, _ = run_cli(capsys, "history", "--json")
    assert code == 0 and json.loads(out)[0]["id"] == summary["run_id"]
    code, out, _ = run_cli(capsys, "show", summary["run_id"][:12], "--json")
    assert code == 0 and json.loads(out)["summary"]["run_id"] == summary["run_id"]
    expect_bad_input(capsys, "show", "no-such-run", words=["no run"])


@pytest.mark.slow
def test_the_installed_command_runs_the_quickstart_preset(tmp_path):
    """The README's headless Quick start command, in a real subprocess (with a smaller evaluation)."""
    proc = subprocess.run([sys.executable, "-m", "workbench", "run", "quickstart", "--set", "evaluate.limit=4", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with History() as h:  # the subprocess inherits this test's WORKBENCH_HOME
        run = h.runs()[0]
        assert run.status == "finished" and run.spec["name"] == "quickstart"
        assert {(m["dataset"], m["phase"]) for m in h.metrics(run.id)} == {("wikitext2", "before"), ("wikitext2", "after")}


def test_presets_lists_every_shipped_preset(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    for name in ("quickstart", "wanda-50", "sparsegpt-2of4", "owl-wanda-70"):
        assert name in out

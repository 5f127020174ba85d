"""Bad input: one clear message naming the problem and the fix, exit 2, nothing recorded as computed."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from reliability_support import FAST, history_rows, one_error, workbench

DEMO = Path(__file__).resolve().parents[2] / "workbench" / "assets" / "demo-llama"


def _preset(work: Path, text: str, name: str = "case.toml") -> str:
    (work / name).write_text(text)
    return name


def _demo_copy(work: Path) -> Path:
    target = work / "model"
    shutil.copytree(DEMO, target)
    return target


@dataclass
class Case:
    id: str
    what: str
    argv: Callable[[Path], list]  # the arguments of `workbench`, given the working folder (which it may prepare)
    words: tuple
    code: int = 2
    runs: str = "none"  # what the history holds afterwards: none (refused before a run began), failed, finished
    loaded: bool = False  # whether loading the model began before the refusal (a load stage was recorded)
    extra: dict = field(default_factory=dict)


def _truncated_shard(work):
    model = _demo_copy(work)
    shard = model / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    return ["run", "fast.toml", "--model", str(model)]


def _overwritten_header(work):
    model = _demo_copy(work)
    shard = model / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[:16] = b"garbage-garbage!"
    shard.write_bytes(bytes(data))
    return ["run", "fast.toml", "--model", str(model)]


def _no_config(work):
    model = _demo_copy(work)
    (model / "config.json").unlink()
    return ["run", "fast.toml", "--model", str(model)]


def _empty_calibration(work):
    (work / "empty.txt").write_text("")
    return ["run", "fast.toml", "--set", f'calibration.source="file:{work / "empty.txt"}"']


CASES = [
    Case("R39", "a preset that is not valid TOML",
         lambda w: ["run", _preset(w, "[model\nname = 'demo'")], ("not valid TOML",)),
    Case("R40", "an impossible sparsity",
         lambda w: ["run", "fast.toml", "--set", "steps.0.sparsity=1.5"], ("sparsity", "1.5")),
    Case("R41", "an unknown preset key",
         lambda w: ["run", "fast.toml", "--set", "calibration.samples=8"], ("samples",)),
    Case("R42", "a --set without '='",
         lambda w: ["run", "fast.toml", "--set", "steps.0.sparsity"], ("steps.0.sparsity",)),
    Case("R43", "a model folder that does not exist",
         lambda w: ["run", "fast.toml", "--model", "./no-such-model"], ("no-such-model",), runs="failed", loaded=True),
    Case("R44", "a model folder without config.json", _no_config, ("config.json",), runs="failed", loaded=True),
    Case("R45", "a truncated safetensors shard", _truncated_shard,
         ("model-00002-of-00002.safetensors", "damaged", "again"), runs="failed", loaded=True),
    Case("R46", "a safetensors shard with an overwritten header", _overwritten_header,
         ("model-00001-of-00002.safetensors", "damaged"), runs="failed", loaded=True),
    Case("R47", "an empty calibration file", _empty_calibration, ("empty.txt",), runs="failed", loaded=True),
    Case("R48", "removing more layers than the model has, after a prune step",
         lambda w: ["run", _preset(w, FAST + '[[steps]]\ntype = "depth"\nremove = 9\n')],
         ("steps.1", "8 decoder layers"), runs="failed", loaded=True),
    Case("R49", "a vocabulary larger than the model's, after a prune step",
         lambda w: ["run", _preset(w, FAST + '[[steps]]\ntype = "vocab"\nsize = 999999\n')],
         ("steps.1", "999999"), runs="failed", loaded=True),
    Case("R50", "an N:M pattern the model's input sizes do not divide",
         lambda w: ["run", "fast.toml", "--set", 'steps.0.pattern="3:7"'], ("3:7", "not a multiple of 7"),
         runs="failed", loaded=True),
    Case("R51", "--gpus naming a GPU that does not exist (in process)",
         lambda w: ["run", "fast.toml", "--gpus", "3"], ("GPU 3 does not exist",)),
    Case("R52", "--gpus naming a GPU that does not exist (worker)",
         lambda w: ["run", "fast.toml", "--gpus", "2", "--backend", "local"], ("GPU 2 does not exist",)),
    Case("R53", "a MySQL study storage without its driver",
         lambda w: ["search", "lowrank-feature-bo-80", "--storage", "mysql://u:p@localhost/db"], ("mysqlclient",)),
    Case("R54", "an unknown backend",
         lambda w: ["run", "fast.toml", "--backend", "carrier-pigeon"], ("carrier-pigeon",)),
    Case("R55", "a hello timeout that is not positive",
         lambda w: ["run", "fast.toml", "--backend", "local", "--hello-timeout", "0"], ("--hello-timeout",)),
    Case("R56", "a preset file that does not exist",
         lambda w: ["run", "nothing-here.toml"], ("nothing-here.toml",)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.loaded else []) for c in CASES])
def test_bad_input(case, home, work):
    argv = case.argv(work)
    done = workbench(*argv, home=home, cwd=work)
    assert done.code == case.code, (case.what, done.err)
    one_error(done, *case.words)
    rows = history_rows(home)
    if case.runs == "none":
        assert rows == [], case.what
    else:
        [run] = rows
        assert run["status"] == case.runs and run["error"]["kind"] == "bad_input", (case.what, run)
        assert ("layer_done" in run["types"]) is False  # no compression work was done before the refusal
        stages = [t for t in run["types"] if t == "stage_started"]
        assert bool(stages) == case.loaded, (case.what, run["types"])


@pytest.mark.slow
def test_a_window_longer_than_the_context_is_capped_with_a_warning(home, work):
    """R57: evaluate.seqlen and calibration.seqlen 4096 on a 512-token model: capped at 512 with a warning each."""
    done = workbench("run", "fast.toml", "--set", "evaluate.seqlen=4096", "--set", "calibration.seqlen=4096",
                     "--set", "evaluate.limit=1", "--set", "calibration.nsamples=2", "--json", home=home, cwd=work)
    assert done.code == 0, done.err
    assert "evaluate.seqlen = 4096 exceeds the model's context (512)" in done.err
    assert "calibration.seqlen = 4096 exceeds the model's context (512)" in done.err
    import json

    summary = json.loads(done.out)
    assert summary["calibration"]["seqlen"] == 512
    assert [m["seqlen"] for m in summary["metrics"]] == [512]


@pytest.mark.slow
def test_a_preset_with_a_byte_order_mark_is_accepted(home, work):
    """R58: a preset saved with a UTF-8 byte-order mark validates and runs."""
    (work / "bom.toml").write_bytes(b"\xef\xbb\xbf" + FAST.encode())
    done = workbench("validate", "bom.toml", home=home, cwd=work)
    assert done.code == 0 and done.out.startswith("ok:"), done.err
    done = workbench("run", "bom.toml", home=home, cwd=work)
    assert done.code == 0, done.err


def test_ctrl_c_after_the_run_finished_keeps_exit_0_and_the_history(monkeypatch, capsys, tmp_path):
    """R59: Ctrl-C while the finished run's tables print: exit 0 as the history says 'finished', not 'interrupted'."""
    from workbench import cli
    from workbench.history import History
    from workbench.spec import load_preset

    spec = load_preset("quickstart")

    def printing_interrupted(summary):
        raise KeyboardInterrupt

    monkeypatch.setattr("workbench.console.summary_table", printing_interrupted)
    code = cli._headless(spec, "run-done", str(tmp_path), lambda emit: {"run_id": "run-done", "metrics": [], "steps": []},
                         as_json=False, quiet=True)
    err = capsys.readouterr().err
    assert code == 0
    assert "finished" in err and "interrupted" not in err.split("error:")[-1].split("\n")[0].replace("cut short", "")
    with History() as h:
        assert h.get("run-done").status == "finished"

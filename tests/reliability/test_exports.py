"""Exports never delete what they did not write (the CLI in a subprocess, files compared byte for byte)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from reliability_support import history_rows, one_error, send, snapshot, start, user_files, workbench

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_out_dot_in_a_folder_of_user_files_is_refused(home, work):
    """R01: `--out .` where the user's files are: exit 2 before loading, every file kept."""
    before = user_files(work)
    done = workbench("run", "fast.toml", "--out", ".", home=home, cwd=work)
    assert done.code == 2
    one_error(done, "not a workbench export", str(work))
    assert snapshot(work) == before
    [run] = history_rows(home)
    assert run["status"] == "failed" and run["error"]["kind"] == "bad_input"
    assert "stage_started" not in run["types"]  # refused before the model was loaded


@pytest.mark.slow
def test_out_a_non_empty_folder_is_refused_even_with_overwrite(home, work):
    """R02: `--out DIR --overwrite` onto the user's folder: exit 2, the folder byte for byte."""
    target = work / "results"
    before = user_files(target)
    done = workbench("run", "fast.toml", "--out", "results", "--overwrite", home=home, cwd=work)
    assert done.code == 2
    one_error(done, "not a workbench export", "results")
    assert snapshot(target) == before


@pytest.mark.slow
def test_out_an_existing_file_is_refused(home, work):
    """R03: `--out FILE`: exit 2, the file kept."""
    (work / "model.bin").write_bytes(b"\x00weights\xff" * 10)
    done = workbench("run", "fast.toml", "--out", "model.bin", home=home, cwd=work)
    assert done.code == 2
    one_error(done, "model.bin", "file")
    assert (work / "model.bin").read_bytes() == b"\x00weights\xff" * 10


def test_out_under_a_file_is_refused_before_loading(home, work):
    """R04: a parent of `--out` is a file: exit 2 before the model is loaded."""
    (work / "plain").write_text("a file")
    done = workbench("run", "fast.toml", "--out", "plain/model", home=home, cwd=work)
    assert done.code == 2
    one_error(done, "plain", "is a file")
    [run] = history_rows(home)
    assert "stage_started" not in run["types"]
    assert (work / "plain").read_text() == "a file"


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only file system (a read-only tmpfs as root, else a folder without write permission)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a read-only file system here: {done.stderr.decode().strip()}")
        yield path
        subprocess.run(["umount", str(path)], capture_output=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


@pytest.mark.slow
def test_out_on_a_read_only_file_system_is_refused_before_loading(home, work, read_only):
    """R05: `--out` on a read-only file system: exit 2 before loading, not an OSError after the run."""
    done = workbench("run", "fast.toml", "--out", str(read_only / "model"), home=home, cwd=work)
    assert done.code == 2
    one_error(done, "not writable", str(read_only))
    [run] = history_rows(home)
    assert "stage_started" not in run["types"]


@pytest.mark.slow
def test_an_earlier_export_needs_overwrite(home, work):
    """R06/R07: an earlier export is kept without --overwrite (exit 2), replaced with it (exit 0)."""
    first = workbench("run", "fast.toml", "--out", "pruned", home=home, cwd=work)
    assert first.code == 0, first.err
    before = snapshot(work / "pruned")
    second = workbench("run", "fast.toml", "--out", "pruned", home=home, cwd=work)
    assert second.code == 2
    one_error(second, "earlier workbench export", "--overwrite")
    assert snapshot(work / "pruned") == before
    third = workbench("run", "fast.toml", "--out", "pruned", "--overwrite", "--set", "steps.0.sparsity=0.6",
                      home=home, cwd=work)
    assert third.code == 0, third.err
    info = json.loads((work / "pruned" / "compression.json").read_text())
    assert info["spec"]["steps"][0]["sparsity"] == 0.6
    assert sorted(p.name for p in work.iterdir()) == ["fast.toml", "pruned", "slow.toml"]


@pytest.mark.slow
def test_an_export_holding_user_files_is_not_replaced(home, work):
    """R08: the user added files to an export: --overwrite refuses, naming them; everything kept."""
    assert workbench("run", "fast.toml", "--out", "pruned", home=home, cwd=work).code == 0
    (work / "pruned" / "eval-notes.md").write_text("results I wrote by hand")
    before = snapshot(work / "pruned")
    done = workbench("run", "fast.toml", "--out", "pruned", "--overwrite", home=home, cwd=work)
    assert done.code == 2
    one_error(done, "eval-notes.md")
    assert snapshot(work / "pruned") == before


@pytest.mark.slow
def test_stale_temporary_folders_are_cleaned_by_the_next_export(home, work):
    """R09: a folder a killed export left behind (its writer gone) is removed by the next export there."""
    stale = work / ".pruned.tmp-0badf00d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    pid = subprocess.Popen(["true"])
    pid.wait()
    (stale / ".workbench-partial").write_text(json.dumps({"host": socket.gethostname(), "pid": pid.pid}))
    marking = work / ".pruned.pre-0badcafe"  # killed while it marked its folder: the mark names a gone writer
    marking.mkdir()
    (marking / ".workbench-partial").write_text(json.dumps({"host": socket.gethostname(), "pid": pid.pid}))
    unmarked = work / ".pruned.pre-00c0ffee"  # killed before it wrote the mark, a minute ago
    unmarked.mkdir()
    os.utime(unmarked, (time.time() - 120, time.time() - 120))
    fresh = work / ".pruned.pre-0000beef"  # just made by a writer about to mark it: kept
    fresh.mkdir()
    mine = work / ".pruned.tmp-notours"  # not our naming: never touched
    mine.mkdir()
    done = workbench("run", "fast.toml", "--out", "pruned", home=home, cwd=work)
    assert done.code == 0, done.err
    assert not stale.exists() and mine.is_dir()
    assert not marking.exists() and not unmarked.exists() and fresh.is_dir()
    assert (work / "pruned" / "compression.json").is_file()


@pytest.mark.slow
def test_a_killed_export_leaves_no_folder_that_looks_complete(home, work):
    """R10: SIGKILL while the export is written: the target never appears half-written; the next export cleans up."""
    proc = start("run", "fast.toml", "--out", "pruned", home=home, cwd=work)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(p.name.startswith(".pruned.tmp-") for p in work.iterdir()):
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    send(proc, signal.SIGKILL)
    proc.wait()
    target = work / "pruned"
    assert not target.exists() or (target / "compression.json").is_file()  # absent, or whole
    done = workbench("run", "fast.toml", "--out", "pruned", "--overwrite", home=home, cwd=work)
    assert done.code == 0, done.err
    assert [p.name for p in work.iterdir() if p.name.startswith(".pruned")] == []


@pytest.mark.slow
def test_an_empty_folder_is_filled(home, work):
    """R11: an existing empty folder (e.g. made by the user for the export) receives it; exit 0."""
    (work / "empty").mkdir()
    done = workbench("run", "fast.toml", "--out", "empty", home=home, cwd=work)
    assert done.code == 0, done.err
    assert (work / "empty" / "compression.json").is_file()
    shutil.rmtree(work / "empty")

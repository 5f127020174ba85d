"""End to end in a real terminal: ``workbench`` in an 80x24 tmux window runs the quickstart on the
real worker and the demo model, shows the perplexities the run recorded, and quits on ctrl+q."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from workbench.history import History

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (CI installs it; locally: apt-get install tmux)"),
]

TIMEOUT = 180.0  # the quickstart alone takes about 15 s on two cores; the machine may be busy


def _workbench() -> list[str]:
    """The console script of this interpreter's install, else ``python -m workbench``."""
    script = Path(sys.executable).with_name("workbench")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "workbench"]


class Terminal:
    """One tmux server of its own with one 80x24 window and no status line."""

    def __init__(self, tmp_path: Path):
        self.base = ["tmux", "-L", f"workbench-e2e-{uuid.uuid4().hex[:8]}", "-f", str(tmp_path / "tmux.conf")]
        (tmp_path / "tmux.conf").write_text("set -g status off\nset -g remain-on-exit on\n")
        self.status_file = tmp_path / "exit-status"
        self.screen = ""

    def tmux(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=True, timeout=30).stdout

    def start(self, command: list[str], env: dict[str, str]) -> None:
        # the shell records the exit status: tmux's own pane_dead_status is sometimes never filled in
        line = shlex.join(["sh", "-c", f'"$@"; echo $? > {shlex.quote(str(self.status_file))}', "sh",
                           "env", *(f"{k}={v}" for k, v in env.items()), *command])
        self.tmux("new-session", "-d", "-s", "wb", "-x", "80", "-y", "24", line)

    def capture(self) -> str:
        self.screen = self.tmux("capture-pane", "-p", "-t", "wb")
        return self.screen

    def exit_status(self) -> str | None:
        """The program's exit status once it has ended and its pane is dead; None before."""
        dead = self.tmux("list-panes", "-t", "wb", "-F", "#{pane_dead}").strip() == "1"
        written = self.status_file.read_text().strip() if self.status_file.exists() else ""
        return written if dead and written else None

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


def _until(condition, deadline: float, what: str):
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _finished_run(history_file: Path):
    """The run's record once it has ended (None before); a failed run fails the test with its error."""
    if not history_file.exists():
        return None
    with History(history_file) as history:
        runs = history.runs()
    if not runs or runs[0].status == "running":
        return None
    assert runs[0].status == "finished", f"the run ended {runs[0].status}: {runs[0].error}"
    return runs[0]


def test_the_workbench_runs_the_quickstart_in_a_terminal(tmp_path):
    home, config = tmp_path / "home", tmp_path / "config"
    env = {"WORKBENCH_HOME": str(home), "XDG_CONFIG_HOME": str(config), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "")}
    terminal = Terminal(tmp_path)
    deadline = time.monotonic() + TIMEOUT
    try:
        terminal.start(_workbench(), env)
        _until(lambda: "Compression" in terminal.capture(), deadline, "the first screen")  # the screen bar
        terminal.tmux("send-keys", "-t", "wb", "C-r")
        run = _until(lambda: _finished_run(home / "history.sqlite"), deadline, "the run to finish")

        with History(home / "history.sqlite") as history:
            metrics = {m["phase"]: m["value"] for m in history.metrics(run.id)
                       if m["name"] == "perplexity" and m["dataset"] == "wikitext2"}
        assert set(metrics) == {"before", "after"}, metrics
        assert metrics["after"] > metrics["before"]  # 50% sparsity costs some perplexity
        shown = [f"{metrics['before']:.2f}", f"{metrics['after']:.2f}"]
        _until(lambda: all(text in terminal.capture() for text in shown), deadline, f"the perplexities {shown} on screen")

        terminal.tmux("send-keys", "-t", "wb", "C-q")
        assert _until(terminal.exit_status, deadline, "the workbench to exit") == "0"
    except AssertionError as exc:
        logs = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-2000:]
                       for p in sorted((home / "logs").glob("*")))
        raise AssertionError(f"{exc}\n--- the last screen:\n{terminal.screen}{logs}") from None
    finally:
        terminal.close()

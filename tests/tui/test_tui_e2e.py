"""End to end in a real terminal: a whole session of ``workbench`` in an 80x24 tmux window, on the real worker
and the demo model. The run settings (a window limit, export on) are edited with the keyboard, the quickstart
runs and shows the perplexities it recorded, the kept model is evaluated, History compares them with each
perplexity's protocol, and ctrl+q asks before quitting an edited setup."""

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

TIMEOUT = 300.0  # the quickstart alone takes about 15 s on two cores, the evaluation a few more; the machine may be busy


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


def _runs(history_file: Path) -> list:
    if not history_file.exists():
        return []
    with History(history_file) as history:
        return history.runs()


@pytest.mark.slow
def test_a_whole_session_in_a_terminal(tmp_path):
    home, config = tmp_path / "home", tmp_path / "config"
    env = {"WORKBENCH_HOME": str(home), "XDG_CONFIG_HOME": str(config), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "")}
    terminal = Terminal(tmp_path)
    deadline = time.monotonic() + TIMEOUT
    def keys(*names: str) -> None:
        """Type keys as a person does, a few a second, not as one burst."""
        for name in names:
            terminal.tmux("send-keys", "-t", "wb", name)
            time.sleep(0.15)

    history_file = home / "history.sqlite"
    try:
        terminal.start(_workbench(), env)
        _until(lambda: "Compression" in terminal.capture(), deadline, "the first screen")  # the screen bar

        # Evaluate › Run settings: the run's window limit, and export on, with the keyboard only
        keys("5")
        _until(lambda: "Evaluate a model now" in terminal.capture(), deadline, "the Evaluate screen")
        keys("]")  # the next tab; the focus goes to its first field (the name)
        _until(lambda: "automatic: quickstart" in terminal.capture(), deadline, "the Run settings tab")
        keys(*["Tab"] * 6, "C-u", "4")  # name, description, reference, before, fresh, data sets: the window limit
        keys(*["Tab"] * 23, "Space")  # on to "export the compressed model", past the ICL and adaptation fields
        _until(lambda: "✓▌ export the compressed model" in terminal.capture(), deadline, "export turned on")
        keys("4")  # the Run screen: what ctrl+r would run, with the edited settings
        _until(lambda: "Ready to run demo wanda 50%" in terminal.capture() and "(4 windows)" in terminal.screen
               and "model exported" in terminal.screen, deadline, "the edited setup ready to run")
        keys("C-r")
        run = _until(lambda: _finished_run(history_file), deadline, "the run to finish")
        assert run.spec["evaluate"]["limit"] == 4 and run.spec["export"]["save"] is True
        assert run.name == "demo wanda 50%"  # an edited setup is named from what it does
        with History(history_file) as history:
            metrics = {m["phase"]: m for m in history.metrics(run.id) if m["name"] == "perplexity"}
            kept = history.model_of(run)
        assert set(metrics) == {"before", "after"} and metrics["after"]["windows"] == 4
        assert metrics["after"]["value"] > metrics["before"]["value"]  # 50% sparsity costs some perplexity
        assert kept and (Path(kept) / "config.json").is_file()
        # each perplexity with its protocol (tokens per window × windows) on the Run screen
        shown = f"{metrics['before']['value']:.2f} → {metrics['after']['value']:.2f} (512 tok × 4 win)"
        _until(lambda: shown in terminal.capture(), deadline, f"{shown!r} on screen")

        # evaluate the kept model: Evaluate, back to its first tab, the run is the second target
        keys("5")
        _until(lambda: "Evaluate a model now" in terminal.capture(), deadline, "the Evaluate screen again")
        keys("[")
        time.sleep(0.5)
        keys("Down", "C-e")
        evaluation = _until(lambda: next((r for r in _runs(history_file) if r.name.startswith("eval of")
                                          and r.status in ("finished", "failed")), None), deadline, "the evaluation")
        assert evaluation.status == "finished", evaluation.error
        assert evaluation.name == f"eval of demo wanda 50% ({run.id[-6:]})"
        with History(history_file) as history:
            attached = [m for m in history.metrics(run.id) if m["phase"] == "eval" and m["name"] == "perplexity"]
        assert attached and attached[0]["windows"] == 40  # the Evaluate form's limit (the quickstart's)

        # History: compare the run and its evaluation, each perplexity on its protocol's row
        keys("6")
        _until(lambda: "eval of demo" in terminal.capture(), deadline, "both runs in History")
        keys("Space", "Space", "c")
        _until(lambda: "Compare" in terminal.capture() and "tok × 4 win" in terminal.screen
               and "tok × 40 win" in terminal.screen, deadline, "the comparison with its protocols")
        keys("Escape")
        time.sleep(1.0)  # an escape and a key close behind it can read as alt+key

        keys("C-q")  # the setup was edited and not saved: it asks first
        _until(lambda: "Quit the workbench?" in terminal.capture(), deadline, "the quit question")
        keys("y")
        assert _until(terminal.exit_status, deadline, "the workbench to exit") == "0"
    except AssertionError as exc:
        logs = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-2000:]
                       for p in sorted((home / "logs").glob("*")))
        raise AssertionError(f"{exc}\n--- the last screen:\n{terminal.screen}{logs}") from None
    finally:
        terminal.close()

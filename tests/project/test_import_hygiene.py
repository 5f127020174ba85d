"""The UI process must never import torch: the package, the spec and the preset loader stay light."""

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_package_spec_presets_history_do_not_import_torch():
    mods = _modules_after(
        "import workbench, workbench.spec, workbench.presets, workbench.events, workbench.history, workbench.errors\n"
        "from workbench.spec import load_preset\nload_preset('owl-wanda-70')"
    )
    assert "workbench.spec" in mods  # the imports really happened
    assert "torch" not in mods and "transformers" not in mods


def test_the_data_registries_do_not_import_torch():
    """What validation and the UI ask of workbench.data (calibration sources, mixtures, evaluation texts, window
    lengths, the calib command's parser) stays light, file and Hub sources included."""
    mods = _modules_after(
        "from workbench.data import evaluation_text, mixtures, sources, windows\n"
        "from workbench.spec import spec_from_dict\n"
        "sources.check_source('mix:c4=0.5,selfgen:books=0.25,random=0.25')\n"
        "for s in ('hf:allenai/c4:en:validation', 'file:notes.jsonl', 'selfgen:c4', 'mix:c4=0.5,books=0.5'):\n"
        "    sources.describe_source(s)\n"
        "assert 'c4' in sources.text_source_names() and mixtures.mixture_counts(mixtures.parse_mixture('a=0.5,b=0.5'), 4) == [2, 2]\n"
        "evaluation_text.check_evaluation_set('file:notes.txt'); evaluation_text.describe_evaluation_set('c4')\n"
        "assert windows.window_length(4096, 2048, 'calibration.seqlen', lambda m: None) == 2048\n"
        "spec_from_dict({'calibration': {'source': 'selfgen:file:x.txt', 'compare': 'random', 'selfgen': {'corpus': 'hf:a:train'}},\n"
        "                'evaluate': {'perplexity': ['books', 'file:x.txt']}})\n"
        "from workbench.cli import build_parser\nbuild_parser()"
    )
    assert {"workbench.data.sources", "workbench.data.mixtures", "workbench.data.evaluation_text", "workbench.data.cli"} <= mods
    assert not {"torch", "transformers", "datasets"} & mods


def test_cli_validate_does_not_import_torch():
    mods = _modules_after("from workbench.cli import main\nmain(['validate', 'quickstart'])")
    assert "workbench.cli" in mods
    assert "torch" not in mods


def test_the_worker_client_side_does_not_import_torch():
    """The client and the protocol drive a (fake) worker end to end, and a --backend run records it, without torch."""
    mods = _modules_after(
        "import sys\n"
        "from workbench.backends.client import BlockingClient\n"
        "from workbench.backends.transports import LocalTransport\n"
        "with BlockingClient(LocalTransport(args=['--fake', '--fake-delay', '0'])) as c:\n"
        "    assert c.run('run', spec={'steps': [{'type': 'prune'}]})['metrics']\n"
        "from workbench.cli import main\n"
        "worker = sys.executable + ' -m workbench worker --fake --fake-delay 0'\n"
        "assert main(['run', 'quickstart', '--backend', 'local', '--worker-command', worker, '--quiet']) == 0"
    )
    assert {"workbench.backends.client", "workbench.backends.protocol", "workbench.backends.transports"} <= mods
    assert "torch" not in mods and "transformers" not in mods


# Runs in a clean interpreter: the app on a fake worker, every screen shown once, then the
# modules loaded. A meta-path hook records who imports torch or transformers, for the failure message.
_APP_SCRIPT = r"""
import asyncio, shlex, sys, traceback

class Spy:
    stacks = {}

    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "transformers") and name not in self.stacks:
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")]
            self.stacks[name] = "".join(traceback.format_list(frames[-12:]))
        return None

sys.meta_path.insert(0, Spy())

from workbench.screens.app import WorkbenchApp
from workbench.screens.config import Config
from workbench.screens.session import Backend, Session
from workbench.screens.widgets import SCREENS

async def main():
    worker = shlex.join([sys.executable, "-m", "workbench", "worker", "--fake", "--fake-delay", "0"])
    app = WorkbenchApp(Session("quickstart", Backend(worker_command=worker)), config=Config())
    async with app.run_test(size=(80, 24)) as pilot:
        async def until(condition, what):
            for _ in range(600):
                if condition():
                    return
                await pilot.pause(0.05)
            raise SystemExit(f"timed out waiting for {what}")

        await until(lambda: app.first_paint is not None, "the first paint")
        await until(lambda: any(w.status == "ready" for w in app.state.workers.values()), "the worker's hello")
        for mode, _, key in SCREENS:
            app.screen.set_focus(None)
            await pilot.press(key)
            await until(lambda: app.screen.id == f"screen-{mode}", f"key {key} to show {mode}")
        print("shown:", " ".join(m for m, _, _ in SCREENS))

asyncio.run(main())
for name, stack in Spy.stacks.items():
    print(f"=== {name} imported from:\n{stack}")
print("loaded:", " ".join(m for m in ("torch", "transformers") if m in sys.modules))
"""


@pytest.mark.slow
def test_the_app_never_imports_torch_on_any_screen():
    out = subprocess.run([sys.executable, "-c", _APP_SCRIPT], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "shown: model calibration compression run evaluate history presets" in out.stdout
    assert "loaded: \n" in out.stdout and "imported from" not in out.stdout, out.stdout

"""The UI process must never import torch: the package, the spec and the preset loader stay light."""

import subprocess
import sys


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

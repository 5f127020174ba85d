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

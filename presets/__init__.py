"""The presets shipped with workbench (TOML files beside this module).

Installed as ``workbench.presets``. Parsing and validation live in
``workbench.spec``; this module only finds the files. No torch here.
"""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_file(name: str) -> Path | None:
    """The file of a shipped preset, or None when there is no such preset."""
    path = PRESET_DIR / f"{name}.toml"
    return path if path.is_file() else None

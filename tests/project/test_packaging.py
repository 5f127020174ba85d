"""What a regular (not editable) install ships: every package folder of the source tree is listed in pyproject.toml.

An editable install finds any folder, so a subpackage missing from
``[tool.setuptools] packages`` goes unnoticed until someone installs a wheel.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_for_installation():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    roots = tool["package-dir"]  # installed name -> folder
    found = set()
    for name, folder in roots.items():
        base = REPO / folder
        found |= {".".join([name, *init.parent.relative_to(base).parts]) for init in base.rglob("__init__.py")}
    listed = set(tool["packages"])
    assert {"workbench", "workbench.data", "workbench.spec"} <= found  # the walk found the packages
    assert sorted(found - listed) == []
    assert sorted(listed - found) == []

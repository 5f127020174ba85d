"""Where a model comes from: the bundled demo, a local folder, or a hub id. No torch.

The engine (``workbench.models``) and the UI judge a model name with the same
rules and messages, so a folder that does not exist is flagged as it is typed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from workbench.errors import UserError

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo-llama"
SOURCE_HINT = "pass a folder with config.json and weights, or a hub id such as org/name, or 'demo'"

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


def looks_like_hub_id(name: str) -> bool:
    return (
        bool(_HUB_ID.fullmatch(name))
        and len(name) <= 96
        and ".." not in name
        and "--" not in name
        and not name.endswith(".")
    )


def looks_like_path(name: str) -> bool:
    if name.startswith(("/", ".", "~", "\\")):
        return True
    if re.match(r"[A-Za-z]:[\\/]", name):  # Windows drive
        return True
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    if any(s in name for s in seps):
        first = re.split(r"[\\/]", name, maxsplit=1)[0]
        if first and Path(first).exists():
            return True
    return not looks_like_hub_id(name)


def resolve_model_source(name: str) -> tuple[str, str]:
    """Where a model comes from: ``("demo", folder)``, ``("local", folder)`` or ``("hub", id)``.

    Raises UserError for a path that does not exist, a file instead of a folder, or a
    folder without config.json.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise UserError(f"model must be a string, got {type(name).__name__}", hint=SOURCE_HINT)
    name = os.fspath(name).strip()
    if not name:
        raise UserError("no model given", hint=SOURCE_HINT)
    if name == "demo":
        return "demo", str(DEMO_MODEL_DIR)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder '{name}' has no config.json",
                            hint="pass a folder written by save_pretrained (config.json, weights, tokenizer), "
                                 "or a hub id such as org/name, or 'demo'")
        return "local", str(path)
    if path.exists():
        raise UserError(f"'{name}' is a file, not a model folder", hint=SOURCE_HINT)
    if looks_like_path(name):
        raise UserError(f"model folder '{name}' does not exist", hint=SOURCE_HINT)
    return "hub", name


def model_problem(name: str) -> UserError | None:
    """What ``resolve_model_source`` would raise for ``name`` on this machine, or None."""
    try:
        resolve_model_source(name)
    except UserError as exc:
        return exc
    return None

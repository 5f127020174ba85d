"""Presets (TOML files, shipped or the user's), ``--set key=value`` overrides, and writing a spec back as TOML. No torch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from workbench.errors import UserError

from .schema import RunSpec
from .validate import spec_from_dict


def parse_toml(text: str, origin: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{origin} is not valid TOML: {exc}", "check the quoting and brackets on that line") from None


def resolve_preset(name_or_path: str) -> Path:
    """A shipped preset's name, or a path to a TOML file."""
    from workbench.presets import preset_file, preset_names

    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise UserError(f"preset file '{name_or_path}' does not exist", f"shipped presets: {', '.join(preset_names())}")
        return path
    found = preset_file(name_or_path)
    if found is None:
        raise UserError(f"no preset named '{name_or_path}'", f"shipped presets: {', '.join(preset_names())}; or pass a .toml file")
    return found


def load_preset_data(name_or_path: str) -> dict:
    path = resolve_preset(name_or_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read preset '{path}': {exc}", "pass a UTF-8 TOML file") from None
    return parse_toml(text, str(path))


def load_preset(name_or_path: str, overrides: list[str] | None = None) -> RunSpec:
    data = load_preset_data(name_or_path)
    for item in overrides or []:
        apply_override(data, item)
    return spec_from_dict(data)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string: --set model.name=demo


def apply_override(data: dict, item: str) -> None:
    """Apply one ``key=value`` (dotted key; ``steps.0.sparsity`` indexes the step list)."""
    if "=" not in item:
        raise UserError(f"--set {item!r} is not key=value", "for example --set steps.0.sparsity=0.6 or --set calibration.nsamples=64")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {item!r} has an empty key", "for example --set model.name=demo")
    value = _parse_value(raw.strip())
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {key}: '{where}' has no item {part}", f"there are {len(node)} item(s), numbered from 0")
            node = node[int(part)]
        else:
            if part == "steps" and part not in node:
                node[part] = []
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"--set {key}: no item {last}", f"there are {len(node)} item(s), numbered from 0")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {key}: '{'.'.join(parts[:-1])}' is a value, not a table", "check the key")


def spec_to_toml(spec: RunSpec) -> str:
    """Write a spec as a preset file (used by 'save as preset')."""
    import tomli_w

    data = _strip_none(spec.to_dict())
    return tomli_w.dumps(data)


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value

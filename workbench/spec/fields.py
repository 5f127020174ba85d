"""Settings with what an editor needs to know about them, in the dataclass itself.

``setting(default, help=..., choices=..., when=...)`` is ``dataclasses.field``
with metadata: the one-line help, the allowed values (``open=True`` when
other values are allowed too, such as N:M patterns), and when the setting
applies (``when=("allocation", ("search",))``: shown only while that field has
one of those values). The TUI's step editors and the documentation read it with
``setting_info``; validation stays in each spec's ``validate``. No torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, *, help: str = "", choices: tuple = (), open: bool = False,
            when: tuple[str, tuple] | None = None, default_factory: Any = _MISSING) -> Any:
    """A dataclass field with editor metadata (see the module docstring)."""
    metadata = {"help": help, "choices": tuple(choices), "open": open, "when": when}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SettingInfo:
    """One setting of a spec dataclass, as an editor shows it."""

    name: str
    kind: str  # bool | int | float | str | list
    optional: bool  # None is allowed (an empty input means "the engine's default")
    default: Any
    choices: tuple = ()
    open: bool = False  # values outside ``choices`` are allowed
    help: str = ""
    when: tuple[str, tuple] | None = None

    def applies(self, values: dict, defaults: dict | None = None) -> bool:
        """Whether the setting applies given the other settings' ``values`` (missing ones take their defaults)."""
        if self.when is None:
            return True
        field, allowed = self.when
        return values.get(field, (defaults or {}).get(field)) in allowed


def _kind(annotation: Any) -> tuple[str, bool]:
    ann = str(annotation).replace(" ", "")
    optional = "None" in ann
    base = ann.replace("|None", "").replace("None|", "")
    return ("list" if base.startswith("list") else base if base in ("bool", "int", "float") else "str"), optional


def setting_info(cls) -> tuple[SettingInfo, ...]:
    """Every setting of a spec dataclass in its order (``type`` left out)."""
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "type":
            continue
        kind, optional = _kind(f.type)
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        meta = f.metadata or {}
        out.append(SettingInfo(name=f.name, kind=kind, optional=optional, default=default,
                               choices=tuple(meta.get("choices", ())), open=bool(meta.get("open", False)),
                               help=meta.get("help", ""), when=meta.get("when")))
    return tuple(out)


__all__ = ["setting", "setting_info", "SettingInfo"]

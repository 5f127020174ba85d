"""Small checks every spec's ``validate`` shares: one message naming the key, the value and what is allowed. No torch."""

from __future__ import annotations

from typing import Any

from workbench.errors import UserError


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{key} = {value!r} is not allowed", f"allowed: {', '.join(map(str, allowed))}")


def fraction(key: str, value: float, hint: str) -> None:
    """A fraction strictly between 0 and 1."""
    if not (0.0 < value < 1.0):
        raise UserError(f"{key} = {value} is outside (0, 1)", hint)


def one_of(where: str, count_key: str, count, fraction_key: str, fraction_value) -> None:
    """Exactly one of two settings (a count or a fraction) is given."""
    if (count is None) == (fraction_value is None):
        raise UserError(f"{where}: set exactly one of {count_key} and {fraction_key}",
                        f"for example {count_key} = 2, or {fraction_key} = 0.25")


__all__ = ["choice", "fraction", "one_of"]

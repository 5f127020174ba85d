"""Errors as values with a message and a hint.

``UserError`` is bad input (exit code 2 in headless mode); ``RunError`` is a
failure while a valid run was executing (exit code 1); ``Cancelled`` is a run
stopped on request.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base error: a one-line message saying what happened and a hint saying what to do."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "hint": self.hint}


class UserError(WorkbenchError):
    """The input is wrong: a path, a preset value, a model, a data source."""

    exit_code = 2
    kind = "bad_input"


class RunError(WorkbenchError):
    """A valid run failed while it executed."""

    exit_code = 1
    kind = "run_failed"


class Cancelled(WorkbenchError):
    """The run was cancelled at a layer boundary."""

    exit_code = 1
    kind = "cancelled"


CANCEL_HINT = "partial results are kept in the run history"


def check_cancel(cancel, hint: str = CANCEL_HINT) -> None:
    """Raise ``Cancelled`` when ``cancel()`` says the run was cancelled (every layer boundary calls this)."""
    if cancel is not None and cancel():
        raise Cancelled("the run was cancelled", hint)

"""The Evaluate screen (placeholder until its module is written)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Static

from .base import WorkbenchScreen


class EvaluateScreen(WorkbenchScreen):
    NAME = "evaluate"
    TITLE = "Evaluate"

    def compose_body(self) -> ComposeResult:
        yield Static("Evaluate", id="body")

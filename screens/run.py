"""The Run screen (placeholder until its module is written)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Static

from .base import WorkbenchScreen


class RunScreen(WorkbenchScreen):
    NAME = "run"
    TITLE = "Run"

    def compose_body(self) -> ComposeResult:
        yield Static("Run", id="body")

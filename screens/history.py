"""The History screen (placeholder until its module is written)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Static

from .base import WorkbenchScreen


class HistoryScreen(WorkbenchScreen):
    NAME = "history"
    TITLE = "History"

    def compose_body(self) -> ComposeResult:
        yield Static("History", id="body")

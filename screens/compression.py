"""The Compression screen (placeholder until its module is written)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Static

from .base import WorkbenchScreen


class CompressionScreen(WorkbenchScreen):
    NAME = "compression"
    TITLE = "Compression"

    def compose_body(self) -> ComposeResult:
        yield Static("Compression", id="body")

"""The Presets screen (placeholder until its module is written)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Static

from .base import WorkbenchScreen


class PresetsScreen(WorkbenchScreen):
    NAME = "presets"
    TITLE = "Presets"

    def compose_body(self) -> ComposeResult:
        yield Static("Presets", id="body")

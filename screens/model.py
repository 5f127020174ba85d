"""The Model screen (placeholder until its module is written)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Static

from .base import WorkbenchScreen


class ModelScreen(WorkbenchScreen):
    NAME = "model"
    TITLE = "Model"

    def compose_body(self) -> ComposeResult:
        yield Static("Model", id="body")

"""The Calibration screen (placeholder until its module is written)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Static

from .base import WorkbenchScreen


class CalibrationScreen(WorkbenchScreen):
    NAME = "calibration"
    TITLE = "Calibration"

    def compose_body(self) -> ComposeResult:
        yield Static("Calibration", id="body")

"""Run-spec steps for structured compression (depth, width, vocabulary). No torch here."""

from __future__ import annotations

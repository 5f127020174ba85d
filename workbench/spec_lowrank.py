"""Run-spec step for low-rank compression (``[[steps]] type = "lowrank"``). No torch here."""

from __future__ import annotations

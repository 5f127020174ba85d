"""Command-line commands for this feature (see ``workbench.cli.COMMAND_MODULES``)."""

from __future__ import annotations


def register(sub) -> dict:
    """Add this module's subcommands to ``sub``; return ``{name: handler}``."""
    return {}

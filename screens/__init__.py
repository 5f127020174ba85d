"""Textual user interface (see the TUI issue); installed as ``workbench.screens``."""

"""Picking a model folder: the folder-browser modal, and what a folder holds.

``local_model_problem`` tells, without torch, what ``workbench.models``
would say about a model name when the worker shares this machine's files
(a missing folder, a file, a folder without config.json). ``FolderModal``
is a directory tree that dismisses with the chosen folder (or None).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Label, Static

from workbench.errors import UserError
from workbench.model_source import model_problem


def local_model_problem(name: str) -> UserError | None:
    """What is wrong with ``name`` as a model on this machine (the engine's own message), or None."""
    return model_problem(name.strip() or "demo")


def folder_note(path: Path) -> str:
    """One line of markup on a folder as a model: whether it has config.json and weights."""
    shown = escape(str(path))
    if not path.is_dir():
        return f"{shown} is not a folder"
    if not (path / "config.json").is_file():
        return f"[yellow]no config.json[/] in {shown}: not a model folder"
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return f"[green]config.json found[/] in {shown}" + ("" if weights else " [yellow](no weight files)[/]")


class FolderTree(DirectoryTree):
    """A directory tree of folders only (a model is a folder)."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if p.is_dir() and not p.name.startswith(".")]


def start_folder(typed: str) -> Path:
    """Where the browser opens: the typed folder, else its nearest existing parent, else the home folder."""
    path = Path(typed.strip() or "~").expanduser()
    for candidate in (path, *path.parents):
        if candidate.is_dir() and str(candidate) not in (".", ""):
            return candidate.resolve()
    return Path.home()


class FolderModal(ModalScreen[str | None]):
    """Browse for a model folder: enter opens a folder, u uses the highlighted one, backspace goes up."""

    BINDINGS = [
        Binding("u", "use", "Use folder", id="browse.use"),
        Binding("backspace", "up", "Parent folder", id="browse.up"),
        Binding("escape", "cancel", "Cancel", id="browse.cancel"),
    ]

    def __init__(self, typed: str = ""):
        super().__init__(classes="modal", id="folder-modal")
        self.root = start_folder(typed)
        self.highlighted = self.root

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Pick a model folder (one with config.json)", id="modal-title")
            yield FolderTree(self.root, id="folder-tree")
            yield Static(folder_note(self.root), id="folder-note")
            with Horizontal(id="modal-buttons"):
                yield Button("Use folder (u)", id="use", variant="primary", compact=True)
                yield Button("Parent (backspace)", id="up", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one(FolderTree).focus()

    def on_tree_node_highlighted(self, event: FolderTree.NodeHighlighted) -> None:
        entry = event.node.data
        if entry is not None:
            self.highlighted = Path(entry.path)
            self.query_one("#folder-note", Static).update(folder_note(self.highlighted))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        {"use": self.action_use, "up": self.action_up, "cancel": self.action_cancel}[event.button.id]()

    def action_use(self) -> None:
        self.dismiss(str(self.highlighted))

    def action_up(self) -> None:
        tree = self.query_one(FolderTree)
        parent = Path(tree.path).resolve().parent
        tree.path = parent
        self.highlighted = parent
        self.query_one("#folder-note", Static).update(folder_note(parent))

    def action_cancel(self) -> None:
        self.dismiss(None)

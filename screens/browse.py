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
    """A directory tree of folders only (a model is a folder), or of folders and files with ``suffix``."""

    def __init__(self, path, suffix: str | None = None, **kwargs):
        self.suffix = suffix
        super().__init__(path, **kwargs)

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".")
                and (p.is_dir() or (self.suffix is not None and p.suffix == self.suffix))]


def start_folder(typed: str) -> Path:
    """Where the browser opens: the typed folder, else its nearest existing parent, else the working directory."""
    typed = typed.strip()
    if typed:
        path = Path(typed).expanduser()
        for candidate in (path, *path.parents):
            if candidate.is_dir() and str(candidate) not in (".", ""):
                return candidate.resolve()
    return Path.cwd()


def folder_title(path: Path) -> str:
    """A folder as the browser names it: its whole path (``/`` is "/ (the root folder)")."""
    return f"{path} (the root folder)" if path == Path(path.anchor) else str(path)


class FolderModal(ModalScreen[str | None]):
    """Browse for a model folder (or, with ``suffix``, a file): enter opens a folder (or takes a file), u uses the
    highlighted entry, backspace goes up, escape cancels."""

    BINDINGS = [
        Binding("u", "use", "Use it", id="browse.use"),
        Binding("backspace", "up", "Parent folder", id="browse.up"),
        Binding("escape", "cancel", "Cancel", id="browse.cancel"),
    ]

    def __init__(self, typed: str = "", suffix: str | None = None, title: str = "Pick a model folder (one with config.json)"):
        super().__init__(classes="modal", id="folder-modal")
        self.root = start_folder(typed)
        self.highlighted = self.root
        self.suffix, self.title_text = suffix, title

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.title_text, id="modal-title")
            yield Static(f"in {escape(folder_title(self.root))}", id="folder-where")
            yield FolderTree(self.root, suffix=self.suffix, id="folder-tree")
            yield Static(self._note(self.root), id="folder-note")
            with Horizontal(id="modal-buttons"):
                yield Button("Use it (u)", id="use", variant="primary", compact=True)
                yield Button("Parent (backspace)", id="up", compact=True)
                yield Button("Cancel (escape)", id="cancel", compact=True)

    def _note(self, path: Path) -> str:
        if self.suffix is None:
            return folder_note(path)
        if path.is_file():
            return f"[green]{escape(path.name)}[/]: u or enter takes it"
        return f"{escape(str(path))}: a folder; enter opens it"

    def on_mount(self) -> None:
        self.query_one(FolderTree).focus()

    def on_tree_node_highlighted(self, event: FolderTree.NodeHighlighted) -> None:
        entry = event.node.data
        if entry is not None:
            self.highlighted = Path(entry.path)
            self.query_one("#folder-note", Static).update(self._note(self.highlighted))

    def on_directory_tree_file_selected(self, event: FolderTree.FileSelected) -> None:
        event.stop()
        self.dismiss(str(event.path))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        {"use": self.action_use, "up": self.action_up, "cancel": self.action_cancel}[event.button.id]()

    def action_use(self) -> None:
        if self.suffix is not None and not self.highlighted.is_file():
            self.query_one("#folder-note", Static).update(f"[red]pick a {self.suffix} file[/] (enter opens a folder)")
            return
        self.dismiss(str(self.highlighted))

    def action_up(self) -> None:
        tree = self.query_one(FolderTree)
        parent = Path(tree.path).resolve().parent
        tree.path = parent
        self.highlighted = parent
        self.query_one("#folder-where", Static).update(f"in {escape(folder_title(parent))}")
        self.query_one("#folder-note", Static).update(self._note(parent))

    def action_cancel(self) -> None:
        self.dismiss(None)

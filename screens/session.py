"""The setup being edited in the UI: a run spec as plain data, where it runs, and the guided-session state.

Screens edit ``Session.data`` (the same dict a preset's TOML parses to) and
ask ``problem()`` for the first validation error, which is the preset
validator's own message, so the UI flags exactly what ``workbench validate``
would. No torch, no Textual.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import UserError
from workbench.model_source import model_problem
from workbench.files import write_text_atomic
from workbench.spec import RunSpec, check_guide, load_preset_data, spec_from_dict, spec_to_toml
from workbench.spec.validate import build_step

DEFAULT_PRESET = "quickstart"
SCREEN_ORDER = ("model", "calibration", "compression", "run")  # the guided walk


@dataclass
class Backend:
    """Where the UI's worker runs: ``local`` (this machine), ``ssh://[USER@]HOST[:PORT]``.

    ``gpus``: ``""`` (inherit), ``0``, ``0,1`` (a worker per GPU) or ``0+1``
    (one worker with both). ``worker_command`` replaces the default command.
    """

    where: str = "local"
    gpus: str = ""
    worker_command: str | None = None
    ssh_options: list[str] = field(default_factory=list)

    def describe(self) -> str:
        gpus = f", GPUs {self.gpus}" if self.gpus else ""
        return f"{self.where}{gpus}"


@dataclass
class Guide:
    """A guided session: the preset being walked through and where the walk is."""

    preset: str
    description: str = ""
    reference: str = ""
    notes: dict[str, str] = field(default_factory=dict)  # screen -> a short explanation of that screen's values
    position: int = 0

    @property
    def screen(self) -> str:
        return SCREEN_ORDER[min(self.position, len(SCREEN_ORDER) - 1)]

    def note(self, screen: str) -> str:
        return self.notes.get(screen) or self.description


def run_presets() -> list[tuple[str, dict]]:
    """(name, data) of the shipped presets that describe one run (study presets are grids of runs: see screens/study.py)."""
    from workbench.presets import preset_names

    found = []
    for name in preset_names():
        try:
            data = load_preset_data(name)
        except UserError:
            continue
        if "study" not in data:
            found.append((name, data))
    return found


class Session:
    def __init__(self, preset: str | None = DEFAULT_PRESET, backend: Backend | None = None):
        self.backend = backend or Backend()
        self.data: dict = {}
        self.preset: str | None = None
        self.guide: Guide | None = None
        self.revision = 0  # bumped by every change, so screens know when to re-read
        self.loaded_at = 0.0  # time.time() of the last preset or spec loaded: runs before it belong to another setup
        self.saved_revision = 0  # the revision last loaded or saved: edits after it are lost on quit
        self.named = False  # the user gave the run a name; else runs are named from the setup
        self._loaded: dict = {}  # the setup as loaded, to tell an edited one
        if preset:
            self.load_preset(preset)

    # ---------------------------------------------------------------- loading and saving
    def load_preset(self, name_or_path: str, guided: bool = False) -> None:
        """Replace the setup with a preset's (UserError when it cannot be read)."""
        data = load_preset_data(name_or_path)
        if "study" in data:
            raise UserError(f"'{name_or_path}' is a study preset (a grid of runs), not a single run",
                            f"run it headless: workbench study {name_or_path}")
        notes = data.pop("guide", None) or {}
        check_guide(notes)
        self.data, self.preset = data, name_or_path
        self.guide = Guide(name_or_path, data.get("description", ""), data.get("reference", ""),
                           {k: str(v) for k, v in notes.items()}) if guided else None
        self._loaded_now()

    def load_spec(self, spec: dict, name: str | None = None) -> None:
        """Replace the setup with a spec dict (e.g. a run from the history)."""
        self.data, self.preset, self.guide = copy.deepcopy(spec), name, None
        self._loaded_now()

    def _loaded_now(self) -> None:
        self.touch()
        self.loaded_at, self.saved_revision, self.named = time.time(), self.revision, False
        self._loaded = copy.deepcopy(self.data)

    @property
    def edited(self) -> bool:
        """Whether the setup changed since it was loaded or saved (quitting would lose those edits)."""
        return self.revision != self.saved_revision and self.data != self._loaded

    def run_name(self) -> str:
        """The name a run of the setup gets: the user's, else the preset's while unedited, else one from the setup."""
        name = self.data.get("name")
        if self.named and isinstance(name, str) and name.strip():
            return name.strip()
        unedited = {k: v for k, v in self.data.items() if k != "name"} == {k: v for k, v in self._loaded.items() if k != "name"}
        if unedited and self._loaded.get("name"):
            return str(self._loaded["name"])
        return setup_name(self.data)

    def set_name(self, name: str) -> None:
        """Name the runs of the setup; a blank name names them from the setup again."""
        self.named = bool(name.strip())
        if self.named:
            self.data["name"] = name.strip()
        else:
            self.data.pop("name", None)
        self.touch()

    def touch(self) -> None:
        self.revision += 1

    def spec(self) -> RunSpec:
        """The validated spec, named by ``run_name``; raises the validator's UserError, or the engine's for a local
        model folder that cannot load."""
        spec = spec_from_dict(copy.deepcopy(self.data))
        spec.name = self.run_name()
        if self.backend.where == "local":  # the worker reads this machine's folders
            problem = model_problem(spec.model.name)
            if problem is not None:
                raise problem
        return spec

    def problem(self) -> UserError | None:
        """The first thing wrong with the setup, or None."""
        try:
            self.spec()
        except UserError as exc:
            return exc
        return None

    def to_toml(self) -> str:
        return spec_to_toml(self.spec())

    def save_preset(self, path: str | Path) -> Path:
        """Write the (valid) setup as a preset file, atomically (missing folders are made); returns the path.

        A setup the user did not name takes the file's name, as a shipped preset's name is its file's.
        """

        path = Path(str(path).strip()).expanduser()
        if not path.name or path.name in (".", "..", ".toml"):
            raise UserError("the preset needs a file name", "type a name such as my-recipe.toml")
        if path.suffix != ".toml":
            path = path.with_name(path.name + ".toml")
        spec = self.spec()
        if not self.named:
            spec.name = path.stem
        write_text_atomic(path, spec_to_toml(spec))
        self.data["name"] = spec.name
        self.named = True  # the file's name is the setup's name from now on
        self.saved_revision = self.revision = self.revision + 1
        self._loaded = copy.deepcopy(self.data)
        return path

    # ---------------------------------------------------------------- editing
    def get(self, key: str, default: Any = None) -> Any:
        """A dotted key's value (``calibration.nsamples``, ``steps.0.sparsity``), or ``default``."""
        node: Any = self.data
        for part in key.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return default
        return node

    def set(self, key: str, value: Any) -> None:
        """Set a dotted key (None removes it, so the engine's default applies)."""
        if value is None:
            *parents, last = key.split(".")
            node = self.get(".".join(parents)) if parents else self.data
            if isinstance(node, dict):
                node.pop(last, None)
            elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node.pop(int(last))
        else:
            _set_path(self.data, key.split("."), value)
        self.touch()

    @property
    def steps(self) -> list[dict]:
        return self.data.setdefault("steps", [])

    def add_step(self, step: dict, index: int | None = None) -> int:
        steps = self.steps
        index = len(steps) if index is None else index
        steps.insert(index, dict(step))
        self.touch()
        return index

    def remove_step(self, index: int) -> None:
        del self.steps[index]
        self.touch()

    def move_step(self, index: int, offset: int) -> int:
        steps = self.steps
        target = max(0, min(len(steps) - 1, index + offset))
        steps.insert(target, steps.pop(index))
        self.touch()
        return target


def setup_name(data: dict) -> str:
    """A run name from the setup itself: the model's short name and the steps' labels (``demo sparsegpt 60%``)."""
    model = str((data.get("model") or {}).get("name") or "demo").rstrip("/")
    model = model.rsplit("/", 1)[-1] or model
    labels = []
    for i, step in enumerate(data.get("steps") or []):
        try:
            labels.append(build_step(copy.deepcopy(step), i).label())
        except Exception:  # a value being typed: its type names the step meanwhile
            labels.append(str(step.get("type", "step")) if isinstance(step, dict) else "step")
    return f"{model} {' + '.join(labels) or 'dense'}"


def _set_path(data: dict, parts: list[str], value: Any) -> None:
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value

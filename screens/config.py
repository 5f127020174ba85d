"""The user's settings file: ``$XDG_CONFIG_HOME/workbench/config.toml`` (default ``~/.config/workbench``).

```toml
[keymap]              # binding id = key(s); see the ids in the footer's help or the README
"screen.history" = "h"
"run.start" = "ctrl+g"

[backend]             # where the UI's worker runs by default
where = "local"       # or "ssh://user@gpu-box"
gpus = "0"
worker_command = "~/venv/bin/workbench worker"
```

A broken file never stops the app: ``load_config`` returns the defaults and
the problem, which the app shows once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .session import Backend


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "workbench" / "config.toml"


@dataclass
class Config:
    keymap: dict[str, str] = field(default_factory=dict)
    backend: Backend = field(default_factory=Backend)
    path: Path | None = None
    problem: tuple[str, str] | None = None  # (message, hint) when the file could not be used
    hello_timeout: float | None = None  # seconds a starting worker has to say hello ([backend] hello_timeout)


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    config = Config(path=path)
    if not path.is_file():
        return config
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        config.problem = (f"the settings file {path} could not be read: {exc}", "fix it, or move it away to use the defaults")
        return config
    keymap = data.get("keymap", {})
    if not isinstance(keymap, dict) or not all(isinstance(v, str) for v in keymap.values()):
        config.problem = (f"{path}: [keymap] must map binding ids to key strings", 'for example "screen.history" = "h"')
    else:
        config.keymap = dict(keymap)
    backend = data.get("backend", {})
    if isinstance(backend, dict):
        allowed = {"where", "gpus", "worker_command", "ssh_options", "hello_timeout"}
        unknown = sorted(set(backend) - allowed)
        if unknown:
            config.problem = (f"{path}: unknown [backend] key(s) {', '.join(unknown)}", f"allowed: {', '.join(sorted(allowed))}")
        else:
            config.backend = Backend(where=str(backend.get("where", "local")), gpus=str(backend.get("gpus", "")),
                                     worker_command=backend.get("worker_command"),
                                     ssh_options=list(backend.get("ssh_options", [])))
            timeout = backend.get("hello_timeout")
            if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
                config.problem = (f"{path}: [backend] hello_timeout = {timeout!r} must be a positive number of seconds",
                                  "for example hello_timeout = 300")
            elif timeout is not None:
                config.hello_timeout = float(timeout)
    return config

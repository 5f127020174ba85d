"""Files and folders the workbench writes: atomically, and never over what the user owns.

No torch here; the engine, the UI and the CLI share these.

- ``atomic_write`` / ``write_text_atomic``: a file appears whole or not at all
  (a temporary file in the same folder, renamed into place).
- Export folders: ``check_export_target`` says, before any work, whether a
  folder may receive an export. Only a folder that is itself a workbench export
  (its ``compression.json`` says so, and it holds nothing the export did not
  write) may be replaced, and only when the user asked to overwrite; an empty
  folder is filled; anything else is refused. ``new_temp_folder`` and
  ``move_into_place`` build the export beside its target and put it there in
  one rename; ``clean_stale`` removes the temporary folders a killed export
  left behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .errors import RunError, UserError
from .model_source import DEMO_MODEL_DIR

INFO_FILE = "compression.json"
EXPORTED_BY = "workbench"
PARTIAL_MARK = ".workbench-partial"  # inside a temporary export folder: who is writing it
# .NAME.tmp-1a2b3c4d (being written), .NAME.old-1a2b3c4d (a replaced export on its way out) and
# .NAME.pre-1a2b3c4d (a temporary folder being marked, for the instant before it is renamed .tmp-)
_TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.(?P<tag>tmp|old|pre)-[0-9a-f]{8}$")
PRE_STALE_AFTER = 60.0  # an unmarked .pre- folder older than this was left by a writer killed before it marked it
# what an export of an older version wrote (it did not list its files)
_EXPORT_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".py", ".tiktoken")
STALE_AFTER = 24 * 3600.0  # a temporary folder of another host (or without a mark) older than this is stale


# ---------------------------------------------------------------------------- files


@contextmanager
def atomic_file(path):
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without an error.

    Readers never see a partial file, and an interruption (an error, a
    cancel, Ctrl-C) leaves no file at all. Missing parent folders are made.
    For writers that want a path (``safetensors.torch.save_file``).
    """
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path, write: Callable[[Any], None]) -> None:
    """Write ``path`` atomically (``atomic_file``); ``write(fh)`` gets a binary file."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; UserError when the path cannot be written."""
    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        raise UserError(f"'{path}' is a folder", "give a file name such as report.md")
    try:
        atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
    except OSError as exc:
        raise UserError(f"cannot write '{path}': {exc.strerror or exc}", "check the folder and its permissions") from None
    return path


# ---------------------------------------------------------------------------- export folders


def read_export_info(folder) -> dict:
    """The ``compression.json`` of an exported folder (empty dict when absent or unreadable)."""
    path = Path(os.fspath(folder)).expanduser() / INFO_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_export(folder) -> bool:
    """Whether ``folder`` holds a workbench export (its ``compression.json`` says so)."""
    info = read_export_info(folder)
    if str(info.get("exported_by", "")).split(" ")[0] == EXPORTED_BY:
        return True
    versions = info.get("versions")
    return isinstance(versions, dict) and "workbench" in versions  # written before exports named themselves


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of an export folder that the export did not write (the user's files)."""
    info = read_export_info(folder)
    listed = info.get("files")
    foreign = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if isinstance(listed, list):
            ours = entry.name in listed or entry.name == INFO_FILE
        else:
            ours = entry.is_file() and not entry.is_symlink() and entry.name.endswith(_EXPORT_SUFFIXES)
        if not ours or entry.is_dir() or entry.is_symlink():
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(path.anchor or "/")


def check_export_target(out_dir, overwrite: bool = False) -> dict:
    """Refuse, before any work, an export folder that cannot or must not receive the export.

    Returns ``{"path", "replaces": bool, "free_bytes"}``. Raises UserError naming
    the folder and the fix when: the path is a file, or a parent is; the
    folder is not empty and is not a workbench export; it is an export but
    ``overwrite`` was not asked for, or it also holds files the export did not
    write; or the nearest existing folder cannot be written (permissions, a
    read-only file system).
    """
    out = Path(os.fspath(out_dir)).expanduser().absolute()
    if out.name in ("", ".", ".."):
        raise UserError(f"export path '{out_dir}' is not a folder name", "pass a folder path such as runs/pruned-model")
    try:
        if out.exists() and out.resolve() == DEMO_MODEL_DIR.resolve():
            raise UserError("refusing to export over the bundled demo model", "pass another output folder")
    except OSError:
        pass
    replaces = False
    if out.is_symlink() and not out.exists():
        raise UserError(f"export path '{out}' is a broken symbolic link", "pass another folder, or remove the link")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"export path '{out}' is an existing file, not a folder",
                            "pass a new folder path (it is created) or an earlier export folder with --overwrite")
        try:
            entries = os.listdir(out)
        except OSError as exc:
            raise UserError(f"cannot read the export folder '{out}': {exc.strerror or exc}",
                            "check its permissions, or choose another folder") from None
        if entries:
            if not is_export(out):
                raise UserError(f"export folder '{out}' is not empty and is not a workbench export "
                                f"({len(entries)} entries, e.g. {sorted(entries)[0]!r}); nothing in it is touched",
                                "choose a new or empty folder for --out (export.out)")
            foreign = _foreign_entries(out)
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise UserError(f"export folder '{out}' holds an earlier export and also files it did not write: {shown}",
                                "move those files away, or choose another folder for --out")
            if not overwrite:
                raise UserError(f"export folder '{out}' holds an earlier workbench export",
                                "pass --overwrite (export.overwrite = true) to replace it, or choose another folder")
            replaces = True
    ancestor = _existing_ancestor(out if out.exists() else out.parent)
    if not ancestor.is_dir():
        raise UserError(f"cannot create the export folder '{out}': '{ancestor}' is a file, not a folder",
                        "choose an export path whose parent folders are folders")
    _probe_writable(ancestor, out)
    try:
        free = shutil.disk_usage(ancestor).free
    except OSError:
        free = None
    return {"path": str(out), "replaces": replaces, "free_bytes": free}


def prepare_export_target(out_dir, overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Clean what killed exports left beside ``out_dir`` (``clean_stale``), then ``check_export_target``."""
    out = Path(os.fspath(out_dir)).expanduser().absolute()
    if out.parent.is_dir():
        for message in clean_stale(out.parent, out.name):
            if log is not None:
                log(message)
    return check_export_target(out, overwrite)


def _probe_writable(folder: Path, out: Path) -> None:
    """Create and remove a probe folder in ``folder``: the only reliable test (ACLs, read-only mounts, quotas)."""
    try:
        probe = Path(tempfile.mkdtemp(prefix=".workbench-probe-", dir=folder))
        probe.rmdir()
    except OSError as exc:
        raise UserError(f"cannot write the export to '{out}': '{folder}' is not writable ({exc.strerror or exc})",
                        "choose a folder you can write to for --out (export.out), or fix its permissions") from None


def checkpoint_bytes(folder) -> int | None:
    """The size of the weight files of a model folder (None when there are none): about an export's size."""
    try:
        files = [p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file()]
    except OSError:
        return None
    return sum(p.stat().st_size for p in files) or None


def export_space_warning(free_bytes: int | None, needed_bytes: int | None, out) -> str | None:
    """A warning when the free space looks too small for an export of about ``needed_bytes``."""
    if free_bytes is None or not needed_bytes or free_bytes >= needed_bytes * 1.05:
        return None
    gib = 1024 ** 3
    return (f"the export to '{out}' needs about {needed_bytes / gib:.2f} GiB but only {free_bytes / gib:.2f} GiB "
            f"are free there; it may fail at the end of the run")


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def new_temp_folder(parent: Path, stem: str, tag: str = "tmp") -> Path:
    """Create ``parent/.STEM.TAG-XXXXXXXX`` and mark it with this process (host, pid) so it can be cleaned later.

    A ``tmp`` folder is made and marked as ``.STEM.pre-XXXXXXXX`` and renamed
    once marked, so a ``.tmp-`` folder always says who writes it, even when
    the writer is killed the instant after creating it.
    """
    for _ in range(100):
        token = secrets.token_hex(4)
        candidate = parent / f".{stem}.{tag}-{token}"
        made = parent / f".{stem}.pre-{token}" if tag == "tmp" else candidate
        try:
            made.mkdir()
        except FileExistsError:
            continue
        if tag == "tmp":
            (made / PARTIAL_MARK).write_text(json.dumps({"host": _host(), "pid": os.getpid(), "time": time.time()}))
            if candidate.exists():
                shutil.rmtree(made, ignore_errors=True)
                continue
            os.rename(made, candidate)
        return candidate
    raise RunError(f"could not create a temporary folder in '{parent}'", f"remove stale .{stem}.{tag}-* folders there")


def _age(folder: Path) -> float:
    try:
        return time.time() - folder.stat().st_mtime
    except OSError:
        return 0.0


def _is_stale(folder: Path) -> bool:
    try:
        mark = json.loads((folder / PARTIAL_MARK).read_text())
    except (OSError, ValueError):
        mark = None
    if isinstance(mark, dict) and mark.get("host") == _host() and isinstance(mark.get("pid"), int):
        return not _pid_alive(mark["pid"])
    try:
        age = time.time() - folder.stat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER


def clean_stale(parent: Path, stem: str | None = None) -> list[str]:
    """Remove what killed exports left in ``parent`` (only folders of our own naming); return what was done.

    A temporary folder (``.NAME.tmp-*``) whose writer is gone is removed. A
    replaced export on its way out (``.NAME.old-*``) is removed when ``NAME``
    exists (the new export is in place), and put back as ``NAME`` when it does
    not (the swap was interrupted). ``stem`` limits this to one export name.
    """
    done: list[str] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return done
    for entry in sorted(entries):
        match = _TEMP_NAME.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink() or (stem is not None and match["stem"] != stem):
            continue
        target = parent / match["stem"]
        if match["tag"] == "pre":  # holds at most its mark: stale when its writer is gone, or unmarked for a minute
            if _is_stale(entry) or (not (entry / PARTIAL_MARK).exists() and _age(entry) > PRE_STALE_AFTER):
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed the stale temporary folder {entry.name}")
        elif match["tag"] == "tmp":
            if _is_stale(entry):
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed the stale temporary folder {entry.name}")
        elif target.exists() or target.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry.name}, an export replaced by {target.name}")
        else:
            try:
                os.rename(entry, target)
                done.append(f"restored {target.name} from {entry.name} (a replacement was interrupted)")
            except OSError:
                pass
    return done


def move_into_place(tmp: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Put the finished export folder ``tmp`` at ``out_dir``.

    - ``out_dir`` absent: one rename.
    - ``out_dir`` an empty folder: the files move into it, ``compression.json``
      last, so the folder (the user's, with its permissions) is kept and never
      looks complete before it is.
    - ``out_dir`` an earlier export and ``overwrite``: it is renamed aside, the
      new folder renamed in, the old one removed; a failure puts it back.

    Anything else is refused (``check_export_target``'s rules, checked again now).
    """
    (tmp / PARTIAL_MARK).unlink(missing_ok=True)
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        return
    info = check_export_target(out_dir, overwrite)
    if not info["replaces"]:  # an empty folder
        names = sorted(os.listdir(tmp), key=lambda n: n == INFO_FILE)
        for name in names:
            os.rename(tmp / name, out_dir / name)
        tmp.rmdir()
        return
    old = new_temp_folder(out_dir.parent, out_dir.name, "old")
    old.rmdir()  # only the name was needed; os.rename needs the target to be absent
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_file", "atomic_write", "write_text_atomic", "check_export_target", "clean_stale", "is_export", "move_into_place",
           "new_temp_folder", "prepare_export_target", "read_export_info", "export_space_warning", "INFO_FILE"]

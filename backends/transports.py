"""How a client starts a worker: a local subprocess, or the same command over ssh.

A transport only builds the command line and environment; the client spawns
it as an asyncio subprocess with piped stdin/stdout/stderr in its own process
session (so the worker never reads the terminal and ``killpg`` reaches every
process it started), and with a line limit large enough for any message.
No torch here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from dataclasses import dataclass, field

from workbench.errors import UserError

from .protocol import MAX_LINE

GPU_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # an index, or a GPU UUID like GPU-8a1b...


def parse_gpus(text: str | None) -> list[list[str]]:
    """Worker GPU groups: ``"0,1"`` is two workers of one GPU each, ``"0+1"`` one worker with both.

    None or "" gives one worker that inherits ``CUDA_VISIBLE_DEVICES``
    (returned as ``[]``, i.e. no groups to pin).
    """
    if text is None or not text.strip():
        return []
    groups = []
    for part in text.split(","):
        ids = [g.strip() for g in part.split("+")]
        if not all(GPU_ID.match(g) for g in ids):
            raise UserError(f"--gpus {text!r} is not a list of GPU groups",
                            "use indices: 0 (one GPU), 0,1 (a worker on each), 0+1 (one worker with both)")
        groups.append(ids)
    seen = [g for group in groups for g in group]
    if len(seen) != len(set(seen)):
        raise UserError(f"--gpus {text!r} gives a GPU to more than one worker", "list each GPU once, e.g. 0,1 or 0+1")
    return groups


@dataclass
class Transport:
    """The command that starts one worker, and the environment it gets.

    ``gpus`` (one group of ``parse_gpus``) becomes ``CUDA_VISIBLE_DEVICES``;
    ``env`` adds variables; ``args`` are appended to the worker command
    (e.g. ``["--fake"]``).
    """

    gpus: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)

    def worker_env(self) -> dict[str, str]:
        env = dict(self.env)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = env["WORKBENCH_GPUS"] = ",".join(self.gpus)  # the engine checks they exist
        return env

    def argv(self) -> list[str]:
        raise NotImplementedError

    def process_env(self) -> dict[str, str]:
        """The environment of the local process this transport starts."""
        return dict(os.environ)

    def describe(self) -> str:
        raise NotImplementedError

    def locate(self, path: str) -> str:
        """A path on the worker's machine as seen from here."""
        return path

    def start_hint(self) -> str:
        raise NotImplementedError

    async def spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self.process_env(), start_new_session=True, limit=MAX_LINE)

    def _gpu_note(self) -> str:
        return f", GPU {'+'.join(self.gpus)}" if self.gpus else ""


@dataclass
class LocalTransport(Transport):
    """A worker process on this machine: ``python -m workbench worker`` of this interpreter by default."""

    command: list[str] | None = None

    def argv(self) -> list[str]:
        return list(self.command or [sys.executable, "-m", "workbench", "worker"]) + list(self.args)

    def process_env(self) -> dict[str, str]:
        return {**os.environ, **self.worker_env()}

    def describe(self) -> str:
        return f"local{self._gpu_note()}"

    def start_hint(self) -> str:
        return f"check that this command runs: {shlex.join(self.argv())}"


@dataclass
class SshTransport(Transport):
    """``ssh -T HOST [ENV=...] REMOTE_COMMAND``: the same protocol over ssh's pipes.

    ``remote_command`` is run by the remote user's shell (a venv's
    ``/path/venv/bin/workbench worker``, or ``python3 -m workbench worker``).
    ``options`` are ssh ``-o`` options (``IdentityFile=...``, ``Port=...``).
    BatchMode is on: ssh never prompts, it fails with a message instead.
    """

    host: str = ""
    remote_command: str = "workbench worker"
    options: list[str] = field(default_factory=list)
    ssh: str = "ssh"

    def argv(self) -> list[str]:
        assignments = [f"{k}={shlex.quote(v)}" for k, v in self.worker_env().items()]
        remote = " ".join(assignments + [self.remote_command] + [shlex.quote(a) for a in self.args])
        opts = [arg for opt in ["BatchMode=yes", *self.options] for arg in ("-o", opt)]
        return [self.ssh, "-T", *opts, self.host, remote]

    def describe(self) -> str:
        return f"ssh {self.host}{self._gpu_note()}"

    def locate(self, path: str) -> str:
        return f"{self.host}:{path}"

    def start_hint(self) -> str:
        return (f"check that 'ssh {self.host} {self.remote_command}' works without a password prompt "
                "(key authentication), or give the worker's path with --worker-command")


def gpu_group(text: str | None) -> list[str] | None:
    """The GPUs of the one worker a headless run uses (``0`` or ``0+1``); None: inherit."""
    groups = parse_gpus(text)
    if len(groups) > 1:
        every = "+".join(g for group in groups for g in group)
        raise UserError(f"--gpus {text} asks for {len(groups)} workers, but a run uses one",
                        f"give the run all of them with --gpus {every}")
    return groups[0] if groups else None


def parse_backend(backend: str, gpus: list[str] | None = None, worker_command: str | None = None,
                  ssh_options: list[str] | None = None) -> Transport | None:
    """The transport for ``--backend local`` or ``ssh://[USER@]HOST[:PORT]``; None for ``inprocess``."""
    if ssh_options and not backend.startswith("ssh://"):
        raise UserError("--ssh-option applies to ssh:// backends only", "drop it, or use --backend ssh://HOST")
    if backend == "inprocess":
        if worker_command:
            raise UserError("--worker-command needs a worker backend", "add --backend local or --backend ssh://HOST")
        return None
    if backend == "local":
        return LocalTransport(gpus=gpus, command=shlex.split(worker_command) if worker_command else None)
    match = re.fullmatch(r"ssh://(?:([^@/:\s]+)@)?([^@/:\s]+)(?::(\d+))?/?", backend)
    if match:
        user, host, port = match.groups()
        options = list(ssh_options or []) + ([f"Port={port}"] if port else [])
        return SshTransport(gpus=gpus, host=f"{user}@{host}" if user else host, options=options,
                            remote_command=worker_command or "workbench worker")
    raise UserError(f"unknown backend {backend!r}", "use --backend inprocess, local or ssh://[USER@]HOST[:PORT]")

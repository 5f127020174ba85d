"""The worker protocol: one JSON object per line on the worker's stdin and stdout.

Standard library only, so a client in any environment (the TUI, a script, a
future non-Python front end) can speak it without torch. ``PROTOCOL.md`` in
this folder documents every message with an example.

Every message carries an envelope: ``v`` (the protocol version), ``seq`` (the
sender's message counter, from 1), ``t`` (the sender's wall-clock time when it
wrote the line, for latency measurement), ``type`` and ``job`` (the job the
message is about, or null). The payload fields sit beside the envelope.

``decode`` never lets a bad line through: it raises ``ProtocolError`` (or
``VersionMismatch``) and the reader reports the line and skips it, so one
corrupted or unknown line is never fatal to the connection.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1

# Longest line either side accepts (a run summary of a very deep model is a few MB).
MAX_LINE = 64 * 1024 * 1024
# Deepest nesting of objects and arrays either side accepts (a run summary nests about 8 levels).
MAX_DEPTH = 100

ENVELOPE = ("v", "seq", "t", "type", "job")
JOB_KINDS = ("run", "evaluate", "inspect", "preview")

# type -> {payload field: the JSON type it must have}. Only the fields a
# receiver cannot do without are checked; optional ones (hint, traceback, ...)
# may be missing or null.
_OBJECT, _ARRAY, _INT, _STR = dict, list, int, str
SCHEMA: dict[str, dict[str, type]] = {
    # worker -> client
    "hello": {"protocol": _INT, "workbench": _STR, "python": _STR, "devices": _ARRAY, "pid": _INT},
    "accepted": {"position": _INT},
    "started": {},
    "event": {"event": _OBJECT},
    "result": {"result": _OBJECT},
    "error": {"kind": _STR, "message": _STR},
    "pong": {"reply_to": _INT},
    "bye": {},
    # client -> worker
    "run": {"spec": _OBJECT},
    "evaluate": {"spec": _OBJECT},
    "inspect": {"model": _OBJECT},
    "preview": {"spec": _OBJECT},
    "cancel": {},
    "ping": {},
    "shutdown": {},
}
WORKER_TYPES = ("hello", "accepted", "started", "event", "result", "error", "pong", "bye")
CLIENT_TYPES = ("run", "evaluate", "inspect", "preview", "cancel", "ping", "shutdown")
# messages that are about one job and must name it
NEEDS_JOB = frozenset({"accepted", "started", "event", "result", "run", "evaluate", "inspect", "preview", "cancel"})


class ProtocolError(ValueError):
    """A line that is not a valid message: reported by the reader and skipped."""


class VersionMismatch(ProtocolError):
    """The other side speaks another protocol version."""

    def __init__(self, theirs: int, ours: int = PROTOCOL_VERSION, other: str = "worker"):
        self.theirs, self.ours, self.other = theirs, ours, other
        newer = f"the {other}" if theirs > ours else "this side"
        super().__init__(f"the {other} speaks protocol version {theirs}, this side speaks version {ours} ({newer} is newer)")

    def hint(self, here: str = "this machine", there: str = "the worker's machine") -> str:
        """Which side to upgrade, in the words of the caller (e.g. "host gpu1")."""
        where = here if self.theirs > self.ours else there
        return f"upgrade workbench on {where} (pip install -U workbench) so both sides speak the same version"


@dataclass
class Message:
    """One protocol message: the envelope and its payload fields (``data``)."""

    type: str
    job: str | None = None
    data: dict = field(default_factory=dict)
    seq: int = 0
    v: int = PROTOCOL_VERSION
    t: float = 0.0

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def encode(message: Message) -> bytes:
    """The message as one UTF-8 JSON line (with its newline).

    Raises ``ValueError`` for a payload JSON cannot carry exactly (nan, inf,
    a payload key that shadows the envelope): the sender must clean it first.
    """
    clash = set(message.data) & set(ENVELOPE)
    if clash:
        raise ValueError(f"payload fields {sorted(clash)} collide with the envelope")
    body = {"v": message.v, "seq": message.seq, "t": message.t or time.time(), "type": message.type, "job": message.job}
    body.update(message.data)
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def _excerpt(line: bytes | str, limit: int = 120) -> str:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.rstrip("\r\n")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def decode(line: bytes | str, other: str = "worker") -> Message:
    """Parse one line; raise ``ProtocolError`` for anything that is not a valid message.

    ``other`` names the sender in the messages ("worker" or "client").
    A message with another protocol version raises ``VersionMismatch`` before
    its payload is checked, so a newer peer's hello is refused with the right reason.
    """
    if len(line) > MAX_LINE:
        raise ProtocolError(f"a line of {len(line)} bytes is longer than the limit ({MAX_LINE} bytes)")
    try:
        body = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed line (not JSON: {exc}): {_excerpt(line)!r}") from None
    except RecursionError:
        raise ProtocolError(f"a line nested deeper than the limit ({MAX_DEPTH} levels): {_excerpt(line, 40)!r}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the parser raises, a bad line is reported and skipped
        raise ProtocolError(f"a line that could not be read ({type(exc).__name__}: {exc}): {_excerpt(line)!r}") from None
    if _too_deep(body, line):
        raise ProtocolError(f"a line nested deeper than the limit ({MAX_DEPTH} levels): {_excerpt(line, 40)!r}")
    if not isinstance(body, dict):
        raise ProtocolError(f"malformed line (a JSON {type(body).__name__}, not an object): {_excerpt(line)!r}")
    version = body.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(f"line without a protocol version 'v': {_excerpt(line)!r}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version, PROTOCOL_VERSION, other)
    kind, seq, job, sent = body.get("type"), body.get("seq"), body.get("job"), body.get("t", 0.0)
    if not isinstance(kind, str):
        raise ProtocolError(f"message without a 'type': {_excerpt(line)!r}")
    if kind not in SCHEMA:
        raise ProtocolError(f"unknown message type {kind!r} (protocol version {PROTOCOL_VERSION} knows: {', '.join(SCHEMA)})")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ProtocolError(f"{kind} message without an integer 'seq'")
    if not isinstance(sent, (int, float)) or isinstance(sent, bool):
        raise ProtocolError(f"{kind} message with a non-numeric time 't'")
    if job is not None and not isinstance(job, str):
        raise ProtocolError(f"{kind} message with a non-string job id {job!r}")
    if kind in NEEDS_JOB and not job:
        raise ProtocolError(f"{kind} message without the 'job' it is about")
    data = {k: v for k, v in body.items() if k not in ENVELOPE}
    for name, expected in SCHEMA[kind].items():
        value = data.get(name)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ProtocolError(f"{kind} message: field {name!r} must be a JSON {_JSON_NAMES[expected]}, got {value!r:.80}")
    if kind == "event" and not isinstance(data["event"].get("type"), str):
        raise ProtocolError("event message: the event has no 'type'")
    return Message(type=kind, job=job, data=data, seq=seq, v=version, t=float(sent))


_JSON_NAMES = {dict: "object", list: "array", int: "integer", str: "string"}


def _too_deep(body: Any, line: bytes | str) -> bool:
    """Whether ``body`` nests containers more than ``MAX_DEPTH`` levels (iterative: no recursion to exhaust)."""
    opening = (b"[", b"{") if isinstance(line, bytes) else ("[", "{")
    if line.count(opening[0]) + line.count(opening[1]) <= MAX_DEPTH:
        return False  # cannot be deeper than the number of containers
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def read_lines(stream, limit: int = MAX_LINE):
    """The lines of a binary stream, each at most ``limit`` bytes; a longer one is yielded cut, so ``decode`` refuses it.

    The rest of an over-long line is read and dropped, so the next line starts clean.
    """
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := stream.readline(limit + 1)) and not rest.endswith(b"\n"):
                pass
        yield line


class Sequencer:
    """Numbers the messages one side sends (1, 2, ...) and stamps their send time."""

    def __init__(self):
        self.seq = 0

    def make(self, message_type: str, job: str | None = None, /, **data: Any) -> Message:
        if message_type not in SCHEMA:
            raise ValueError(f"unknown message type {message_type!r}")
        self.seq += 1
        return Message(type=message_type, job=job, data=data, seq=self.seq, t=time.time())

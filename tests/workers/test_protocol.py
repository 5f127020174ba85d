"""The JSON-lines protocol: every message type round-trips; bad lines are refused with a reason, never accepted."""

import json
import math
import re
from pathlib import Path

import pytest

from workbench.backends.protocol import (CLIENT_TYPES, PROTOCOL_VERSION, SCHEMA, WORKER_TYPES, Message, ProtocolError,
                                         Sequencer, VersionMismatch, decode, encode)
from workbench.events import LayerDone, Metric

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "backends" / "PROTOCOL.md"

# one realistic payload per message type: (job, payload)
EXAMPLES = {
    "hello": (None, {"protocol": 1, "workbench": "0.1.0", "python": "3.11.7", "torch": "2.13.0", "transformers": "5.1.0",
                     "devices": [{"kind": "cpu", "total": 2**34, "free": 2**33}], "pid": 4242, "host": "gpu1", "fake": False}),
    "accepted": ("j1", {"position": 2}),
    "started": ("j1", {}),
    "event": ("j1", {"event": LayerDone(stage="prune:0", layer=3, total=8, sparsity=0.5, target=0.5,
                                        modules={"mlp.up_proj": {"shape": [768, 256], "sparsity": 0.5}}).to_dict()}),
    "result": ("j1", {"kind": "run", "result": {"run_id": "r1", "metrics": [{"dataset": "wikitext2", "value": 12.5}]}}),
    "error": ("j1", {"kind": "out_of_memory", "message": "out of memory: CUDA", "hint": "fewer samples", "traceback": None}),
    "pong": (None, {"reply_to": 7, "busy": "j1", "queued": 0}),
    "bye": (None, {"reason": "shutdown requested"}),
    "run": ("j2", {"spec": {"name": "x", "steps": [{"type": "prune", "sparsity": 0.5}]}, "run_id": "r2"}),
    "evaluate": ("j3", {"spec": {"model": {"name": "/models/out"}, "steps": [], "evaluate": {"limit": 4}}, "run_id": "r3"}),
    "inspect": ("j4", {"model": {"name": "demo", "dtype": "auto"}}),
    "preview": ("j5", {"spec": {"model": {"name": "demo"}, "calibration": {"source": "mix:c4=0.5,books=0.5", "nsamples": 8}}}),
    "cancel": ("j2", {}),
    "ping": (None, {}),
    "shutdown": (None, {}),
}


def test_the_examples_cover_every_message_type_of_both_directions():
    assert set(EXAMPLES) == set(SCHEMA) == set(WORKER_TYPES) | set(CLIENT_TYPES)


@pytest.mark.parametrize("kind", sorted(SCHEMA))
def test_round_trip(kind):
    job, payload = EXAMPLES[kind]
    seq = Sequencer()
    seq.make("ping")  # numbering continues across messages
    message = seq.make(kind, job, **payload)
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = decode(line)
    assert (back.type, back.job, back.seq, back.v) == (kind, job, 2, PROTOCOL_VERSION)
    assert back.data == payload
    assert back.t == pytest.approx(message.t)
    # what goes on the wire is plain JSON with the envelope beside the payload
    raw = json.loads(line)
    assert {k: raw[k] for k in ("v", "seq", "type", "job")} == {"v": 1, "seq": 2, "type": kind, "job": job}


def test_newlines_inside_strings_stay_on_one_line():
    message = Sequencer().make("error", "j1", kind="run_failed", message="two\nlines", hint=None, traceback="a\r\nb\n")
    line = encode(message)
    assert line.count(b"\n") == 1
    assert decode(line)["traceback"] == "a\r\nb\n"


def test_values_json_cannot_hold_are_refused_at_encoding():
    event = Metric(dataset="wikitext2", value=math.inf).to_dict()
    with pytest.raises(ValueError):
        encode(Sequencer().make("event", "j1", event=event))
    with pytest.raises(ValueError, match="envelope"):
        encode(Message(type="ping", data={"seq": 3}))


def test_a_truncated_line_is_refused_at_every_cut():
    job, payload = EXAMPLES["run"]
    line = encode(Sequencer().make("run", job, **payload))
    for cut in range(len(line) - 1):  # every proper prefix; the last is the full object without its newline
        with pytest.raises(ProtocolError):
            decode(line[:cut])


@pytest.mark.parametrize("line, words", [
    (b"hello world\n", "not JSON"),
    (b"\xff\xfe{}\n", "not JSON"),
    (b"[1, 2]\n", "not an object"),
    (b'{"seq": 1, "type": "ping"}\n', "protocol version"),
    (b'{"v": true, "seq": 1, "type": "ping"}\n', "protocol version"),
    (b'{"v": 1, "seq": 1}\n', "'type'"),
    (b'{"v": 1, "seq": 1, "type": "launch", "job": "j1"}\n', "unknown message type 'launch'"),
    (b'{"v": 1, "seq": "1", "type": "ping"}\n', "seq"),
    (b'{"v": 1, "seq": 1, "type": "ping", "t": "noon"}\n', "time"),
    (b'{"v": 1, "seq": 1, "type": "ping", "job": 5}\n', "job id"),
    (b'{"v": 1, "seq": 1, "type": "run", "spec": {}}\n', "without the 'job'"),
    (b'{"v": 1, "seq": 1, "type": "run", "job": "j1", "spec": []}\n', "'spec' must be a JSON object"),
    (b'{"v": 1, "seq": 1, "type": "accepted", "job": "j1", "position": true}\n', "'position' must be a JSON integer"),
    (b'{"v": 1, "seq": 1, "type": "error", "job": "j1", "message": "x"}\n', "'kind'"),
    (b'{"v": 1, "seq": 1, "type": "event", "job": "j1", "event": {"stage": "x"}}\n', "no 'type'"),
])
def test_malformed_lines_are_refused_with_the_reason(line, words):
    with pytest.raises(ProtocolError) as info:
        decode(line)
    assert not isinstance(info.value, VersionMismatch)
    assert words in str(info.value)


def test_a_version_mismatch_says_which_side_to_upgrade():
    newer = b'{"v": 2, "seq": 1, "type": "hello", "job": null, "whatever": "v2 adds"}\n'
    with pytest.raises(VersionMismatch) as info:
        decode(newer, other="worker")
    exc = info.value
    assert (exc.theirs, exc.ours) == (2, 1)
    assert "worker speaks protocol version 2" in str(exc)
    assert "upgrade workbench on this machine" in exc.hint()  # the worker is newer: upgrade the client's side
    older = b'{"v": 0, "seq": 1, "type": "hello", "job": null}\n'
    with pytest.raises(VersionMismatch) as info:
        decode(older, other="worker")
    assert "upgrade workbench on the worker's machine" in info.value.hint()
    assert "on gpu1" in info.value.hint(there="gpu1")


def test_protocol_md_shows_a_valid_example_of_every_message():
    text = PROTOCOL_MD.read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", text, flags=re.S)
    seen = {}
    for block in blocks:
        for line in block.splitlines():
            message = decode(line)
            seen.setdefault(message.type, message)
    assert set(seen) == set(SCHEMA)
    # the documented events are real engine events
    from workbench.events import event_from_dict

    for block in blocks:
        message = decode(block.splitlines()[0])
        if message.type == "event":
            assert event_from_dict(message["event"]).type == message["event"]["type"]

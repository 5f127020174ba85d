"""Protocol faults: a bad line on either side is reported and skipped; a worker that dies or never starts is reported at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from reliability_support import env_for, history_rows, one_error, workbench

DEEP = b"[" * 5000 + b"]" * 5000 + b"\n"


def _worker(home):
    """A real fake worker on pipes: (process, send(bytes), receive() -> dict)."""
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "worker", "--fake"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env_for(home))

    def send(line: bytes) -> None:
        proc.stdin.write(line)
        proc.stdin.flush()

    def receive() -> dict:
        return json.loads(proc.stdout.readline())

    assert receive()["type"] == "hello"
    return proc, send, receive


def _ping(send, receive, seq: int) -> dict:
    send(json.dumps({"v": 1, "seq": seq, "t": time.time(), "type": "ping", "job": None}).encode() + b"\n")
    return receive()


@pytest.mark.parametrize("line", [DEEP, b'{"v": 1, "type": "run", "job": "j", "spec": ' + b"{\"a\":" * 3000 + b"1" + b"}" * 3001 + b"\n",
                                  b"\xff\xfe\x00 not utf-8\n", b'{"v": 1, "seq": 1, "t": 0, "type": "run", "job": 7}\n'],
                         ids=["deep-array", "deep-object", "not-utf8", "bad-job-id"])
def test_a_bad_line_to_the_worker_is_an_error_reply_and_it_keeps_running(home, line):
    """R30-R33: deeply nested (4 KB, 5,000 levels), not UTF-8, a wrong field type: one error reply, the worker answers pings."""
    proc, send, receive = _worker(home)
    try:
        send(line)
        reply = receive()
        assert reply["type"] == "error" and reply["kind"] == "protocol", reply
        pong = _ping(send, receive, 2)
        assert pong["type"] == "pong" and pong["reply_to"] == 2
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


BAD_WORKER = textwrap.dedent("""
    import json, os, socket, sys, time
    def send(body):
        body.setdefault("v", 1); body.setdefault("t", time.time())
        sys.stdout.write(json.dumps(body) + "\\n"); sys.stdout.flush()
    send({"seq": 1, "type": "hello", "job": None, "protocol": 1, "workbench": "x", "python": "3", "devices": [],
          "pid": os.getpid(), "host": socket.gethostname(), "home": os.environ["WORKBENCH_HOME"]})
    job = json.loads(sys.stdin.readline())
    send({"seq": 2, "type": "accepted", "job": job["job"], "position": 0})
    send({"seq": 3, "type": "started", "job": job["job"]})
    sys.stdout.write("[" * 5000 + "]" * 5000 + "\\n")
    sys.stdout.write('{"v": 1, "seq": 4, "t": 0, "type": "event", "job": "%s", "event": ' % job["job"] + '{"a":' * 3000 + '1' + '}' * 3001 + "\\n")
    send({"seq": 5, "type": "event", "job": job["job"], "event": {"type": "log", "level": "info", "message": "still here"}})
    send({"seq": 6, "type": "result", "job": job["job"], "kind": "run",
          "result": {"run_id": job["run_id"], "name": "x", "metrics": [], "steps": [], "timings": {}}})
    sys.stdin.readline()
""")


def test_a_bad_line_from_a_worker_is_skipped_and_the_run_finishes(home, work):
    """R34: a worker sends lines nested 5,000 and 3,000 levels deep: the client skips them, the run finishes, exit 0."""
    script = work / "bad_worker.py"
    script.write_text(BAD_WORKER)
    done = workbench("run", "fast.toml", "--backend", "local", "--worker-command", f"{sys.executable} {script}",
                     home=home, cwd=work, timeout=60)
    assert done.code == 0, done.err
    assert "Traceback" not in done.err
    [run] = history_rows(home)
    assert run["status"] == "finished" and "log" in run["types"]


def test_a_worker_that_dies_before_hello_is_reported_at_once(home, work):
    """R35: the worker exits before hello while a child it left holds its pipes: reported in seconds, exit 2."""
    command = "sh -c 'echo cannot import torch >&2; sleep 60 & exit 3'"
    done = workbench("run", "fast.toml", "--backend", "local", "--worker-command", command, home=home, cwd=work,
                     timeout=60)
    assert done.code == 2
    one_error(done, "exited with status 3", "cannot import torch")
    assert done.seconds < 20


def test_a_worker_that_never_says_hello_times_out_as_set(home, work):
    """R36: a worker that never says hello: --hello-timeout 2 reports it after about 2 s, naming the setting."""
    done = workbench("run", "fast.toml", "--backend", "local", "--worker-command", "sleep 60", "--hello-timeout", "2",
                     home=home, cwd=work, timeout=60)
    assert done.code == 2
    one_error(done, "did not say hello within 2 s", "--hello-timeout")
    assert done.seconds < 20


def test_a_missing_worker_command_is_one_clear_error(home, work):
    """R37: --worker-command that does not exist: exit 2 naming it."""
    done = workbench("run", "fast.toml", "--backend", "local", "--worker-command", "/nonexistent/workbench-worker",
                     home=home, cwd=work, timeout=60)
    assert done.code == 2
    one_error(done, "/nonexistent/workbench-worker")


def test_a_line_longer_than_the_limit_is_refused_and_the_next_one_read():
    """R38: read_lines cuts a line longer than the limit, decode refuses it, and the next line is read whole."""
    import io

    from workbench.backends.protocol import ProtocolError, decode, read_lines

    good = json.dumps({"v": 1, "seq": 2, "t": 0, "type": "ping", "job": None}).encode() + b"\n"
    stream = io.BytesIO(b'{"v": 1, "pad": "' + b"x" * 5000 + b'"}\n' + good)
    lines = list(read_lines(stream, limit=1000))
    assert len(lines) == 2 and len(lines[0]) == 1001 and lines[1] == good
    with pytest.raises(ProtocolError):
        decode(lines[0], other="client")
    assert decode(lines[1], other="client").type == "ping"

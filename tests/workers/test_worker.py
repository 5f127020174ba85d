"""Real worker subprocesses in fake mode (no torch): the conversation, job lifecycle, cancellation, crashes, hangs.

The engine's own workers are tested in test_worker_engine.py; the ssh
transport in test_ssh.py.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from worker_support import FAKE, SPEC, async_test, event_types, fake, follow, scripted

from workbench.backends.client import WorkerClient, WorkerPool
from workbench.backends.fake import compressed_perplexity, dense_perplexity
from workbench.backends.protocol import decode
from workbench.cli import main
from workbench.history import History


def test_on_the_wire_bad_lines_are_answered_and_skipped_and_stdout_noise_never_reaches_the_stream():
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "worker", *FAKE, "--fake-layers", "3", "--fake-noise"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def send(raw: bytes):
            proc.stdin.write(raw)
            proc.stdin.flush()

        def receive():
            line = proc.stdout.readline()
            assert line, proc.stderr.read().decode()
            return decode(line)  # raises on any line that is not a valid message

        hello = receive()
        assert hello.type == "hello" and hello["fake"] is True and hello["pid"] == proc.pid

        send(b"garbage\n")
        reply = receive()
        assert (reply.type, reply.job, reply["kind"]) == ("error", None, "protocol") and "not JSON" in reply["message"]
        send(b'{"v":1,"seq":2,"type":"run","job":"j9","spec":{"na\n')  # a truncated line
        reply = receive()
        assert reply["kind"] == "protocol" and "not JSON" in reply["message"]
        send(b'{"v":1,"seq":3,"type":"launch","job":"j7"}\n')
        reply = receive()
        assert (reply.job, reply["kind"]) == ("j7", "protocol") and "unknown message type 'launch'" in reply["message"]
        send(b'{"v":2,"seq":4,"type":"ping","job":null}\n')
        reply = receive()
        assert reply["kind"] == "version" and "upgrade workbench on the worker's machine" in reply["hint"]
        send(b'{"v":1,"seq":5,"type":"bye","job":null}\n')
        reply = receive()
        assert reply["kind"] == "protocol" and "does not accept 'bye'" in reply["message"]
        send(b'{"v":1,"seq":6,"type":"cancel","job":"nope"}\n')
        assert receive()["kind"] == "unknown_job"
        send(b'{"v":1,"seq":7,"type":"ping","job":null}\n')
        pong = receive()
        assert pong.type == "pong" and pong["reply_to"] == 7 and pong["busy"] is None

        send(json.dumps({"v": 1, "seq": 8, "type": "run", "job": "j1", "spec": SPEC}).encode() + b"\n")
        replies = []
        while not replies or replies[-1].type not in ("result", "error"):
            replies.append(receive())
        assert [r.type for r in replies[:2]] == ["accepted", "started"] and replies[-1].type == "result"
        seqs = [hello.seq, reply.seq, pong.seq] + [r.seq for r in replies]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

        send(b'{"v":1,"seq":9,"type":"shutdown","job":null}\n')
        bye = receive()
        assert bye.type == "bye" and bye["reason"] == "shutdown requested"
        assert proc.wait(10) == 0
        assert proc.stdout.read() == b""
        noise = proc.stderr.read().decode()
        for source in ("from print", "from os.write", "from C printf", '"type": "result", "noise"'):
            assert source in noise, source
    finally:
        proc.kill()
        proc.wait()


@async_test
async def test_a_run_streams_its_events_in_order_then_its_result():
    client = WorkerClient(fake())
    hello = await client.start()
    assert hello["fake"] and hello["pid"] == client.pid
    try:
        job = await client.submit("run", spec=SPEC, run_id="r-1")
        updates = await follow(client, job)
    finally:
        await client.close()
    assert [u.kind for u in updates[:2]] == ["accepted", "started"] and updates[-1].kind == "result"
    seqs = [u.seq for u in updates]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    stages = [u.event.stage for u in updates if u.kind == "event" and u.event.type == "stage_started"]
    assert stages == ["load", "calibrate", "evaluate:before", "prune:0", "evaluate:after"]
    types = event_types(updates)
    assert types[0] == "run_started" and types[-1] == "run_finished"
    assert [u.event.layer for u in updates if u.kind == "event" and u.event.type == "layer_done"] == list(range(8))
    metrics = [u.event for u in updates if u.kind == "event" and u.event.type == "metric"]
    assert [(m.phase, m.value) for m in metrics] == [("before", dense_perplexity("wikitext2")),
                                                     ("after", compressed_perplexity("wikitext2", [0.5]))]
    result = updates[-1].data["result"]
    assert result["run_id"] == "r-1"
    assert [m["value"] for m in result["metrics"]] == [m.value for m in metrics]


@async_test
async def test_a_reader_that_starts_late_still_gets_every_update():
    client = WorkerClient(fake())
    await client.start()
    try:
        job = await client.submit("run", spec=SPEC)
        outcome = await client.wait(job)
        updates = await follow(client, job)
    finally:
        await client.close()
    assert outcome.kind == "result"
    assert updates[0].kind == "accepted" and updates[-1] is outcome
    assert event_types(updates).count("layer_done") == 8


@async_test
async def test_cancel_stops_a_run_at_a_layer_boundary_and_the_worker_runs_the_next_job():
    client = WorkerClient(fake("--fake-delay", "0.1"))
    await client.start()
    try:
        job = await client.submit("run", spec=SPEC)
        updates = []
        async for update in client.events(job):
            updates.append(update)
            if update.kind == "event" and update.event.type == "layer_done" and update.event.layer == 1:
                await client.cancel(job)
        layers = [u.event.layer for u in updates if u.kind == "event" and u.event.type == "layer_done"]
        assert updates[-1].kind == "error" and updates[-1].data["kind"] == "cancelled"
        assert layers[:2] == [0, 1] and len(layers) <= 3  # at most the layer in flight finishes
        pid = client.pid
        following = await client.submit("run", spec=SPEC)
        assert (await client.wait(following)).kind == "result"
        assert client.pid == pid  # the same worker
    finally:
        await client.close()


@async_test
async def test_cancel_drops_a_queued_job_before_it_starts():
    client = WorkerClient(fake("--fake-delay", "0.02"))
    await client.start()
    try:
        first = await client.submit("run", spec=SPEC)
        second = await client.submit("run", spec=SPEC)
        await client.cancel(second)
        dropped = await follow(client, second)
        assert [u.kind for u in dropped] == ["accepted", "error"]
        assert dropped[0].data["position"] == 1 and "before it started" in dropped[-1].data["message"]
        assert (await client.wait(first)).kind == "result"
    finally:
        await client.close()


@async_test
async def test_a_job_that_ignores_cancel_gets_its_worker_killed_after_the_grace_period():
    client = WorkerClient(fake("--fake-fail", "hang@2"), cancel_grace=0.5)
    await client.start()
    try:
        pid = client.pid
        job = await client.submit("run", spec=SPEC)
        async for update in client.events(job):
            if update.kind == "event" and update.event.type == "layer_done" and update.event.layer == 1:
                await client.cancel(job)
        assert update.kind == "error" and update.data["kind"] == "cancelled"
        assert "did not stop within 0.5 s" in update.data["message"]
        # a fresh worker takes the next job (the hang is at layer 2 of a step; inspect has none)
        inspect = await client.submit("inspect", model={"name": "demo"})
        assert (await client.wait(inspect)).data["result"]["num_layers"] == 8
        assert client.pid != pid
    finally:
        await client.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@async_test
async def test_a_crash_fails_the_running_job_and_a_new_worker_runs_the_waiting_ones():
    seen = []
    client = WorkerClient(fake("--fake-fail", "crash@3", "--fake-noise"), on_update=seen.append)
    first = await client.start()
    try:
        job = await client.submit("run", spec=SPEC)
        waiting = await client.submit("evaluate", spec={"steps": [], "evaluate": {"limit": 2}})
        died = await client.wait(job)
        assert died.kind == "error" and died.data["kind"] == "worker_died"
        assert "was killed by signal 9 (SIGKILL)" in died.data["message"] and f"job {job}" in died.data["message"]
        assert "out-of-memory killer" in died.data["hint"]
        assert any("fake noise 2" in line for line in died.data["stderr"])  # the worker's last words
        outcome = await client.wait(waiting)
        assert outcome.kind == "result" and outcome.data["result"]["metrics"][0]["phase"] == "before"
    finally:
        await client.close()
    kinds = [u.kind for u in seen]
    assert kinds.count("hello") == 2 and "died" in kinds
    hellos = [u.data["pid"] for u in seen if u.kind == "hello"]
    assert hellos[0] == first["pid"] != hellos[1]
    # the events the job sent before it died were delivered, up to the crash
    layers = [u.event.layer for u in seen if u.job == job and u.kind == "event" and u.event.type == "layer_done"]
    assert layers == [0, 1, 2]


@pytest.mark.parametrize("failure, kind, words", [("oom@1", "out_of_memory", "calibration.nsamples"),
                                                  ("error@1", "run_failed", "--fake-fail")])
@async_test
async def test_failures_inside_a_job_become_errors_with_a_hint_and_the_worker_stays(failure, kind, words):
    client = WorkerClient(fake("--fake-fail", failure))
    await client.start()
    try:
        pid = client.pid
        outcome = await client.wait(await client.submit("run", spec=SPEC))
        assert outcome.data["kind"] == kind and words in outcome.data["hint"]
        assert client.pid == pid and await client.ping() < 5
    finally:
        await client.close()


@async_test
async def test_bad_input_is_refused_before_the_job_is_queued():
    client = WorkerClient(fake())
    await client.start()
    try:
        with_steps = await client.submit("evaluate", spec=SPEC)
        impossible = await client.submit("run", spec={"steps": [{"type": "prune", "sparsity": 1.5}]})
        for job, words in ((with_steps, "without steps"), (impossible, "sparsity = 1.5")):
            updates = await follow(client, job)
            assert [u.kind for u in updates] == ["error"]
            assert updates[0].data["kind"] == "bad_input" and words in updates[0].data["message"]
            assert updates[0].data["hint"]
    finally:
        await client.close()


@async_test
async def test_a_hung_worker_is_noticed_by_the_heartbeat_and_replaced():
    seen = []
    client = WorkerClient(fake(), heartbeat=0.1, hung_after=1.0, on_update=seen.append)
    await client.start()
    try:
        stuck = client.pid
        os.kill(stuck, signal.SIGSTOP)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if [u.kind for u in seen].count("hello") == 2:
                break
        assert client.pid != stuck
        assert [u.kind for u in seen if u.kind in ("hung", "died", "hello")] == ["hello", "hung", "died", "hello"]
        assert await client.ping() < 5
    finally:
        await client.close()


@async_test
async def test_one_worker_per_gpu_or_one_worker_for_several():
    pool = WorkerPool.for_gpus("0,1", fake())
    hellos = await pool.start()
    try:
        assert [h["cuda_visible_devices"] for h in hellos] == ["0", "1"]
        assert [[d["name"] for d in h["devices"] if d["kind"] == "cuda"] for h in hellos] == [["Fake GPU 0"], ["Fake GPU 1"]]
        jobs = [await pool.submit("run", worker=i, spec=SPEC) for i in (0, 1)]
        outcomes = [await pool.wait(j) for j in jobs]
        assert [o.kind for o in outcomes] == ["result", "result"]
        assert [o.worker for o in outcomes] == [w.name for w in pool.workers] == ["local, GPU 0", "local, GPU 1"]
    finally:
        await pool.close()
    both = WorkerPool.for_gpus("0+1", fake())
    (hello,) = await both.start()
    await both.close()
    assert hello["cuda_visible_devices"] == "0,1"
    assert [d["name"] for d in hello["devices"] if d["kind"] == "cuda"] == ["Fake GPU 0", "Fake GPU 1"]


# ----------------------------------------------------------------- foreign or broken workers (scripts)

PONG_LOOP = """
    import json, sys
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["type"] == "shutdown":
            break
        if msg["type"] == "ping":
            print(json.dumps({"v": 1, "seq": 9, "t": 0, "type": "pong", "job": None, "reply_to": msg["seq"]}), flush=True)
"""
HELLO = '{"v": %d, "seq": 1, "type": "hello", "job": null, "protocol": %d, "workbench": "9", "python": "3", "devices": [], "pid": 1}'


@async_test
async def test_a_worker_of_another_protocol_version_is_refused_at_hello():
    client = WorkerClient(scripted(f"print('{HELLO % (2, 2)}', flush=True)\nimport time; time.sleep(30)"))
    with pytest.raises(Exception) as info:
        await client.start()
    await client.close()
    assert type(info.value).__name__ == "UserError"
    assert "speaks protocol version 2" in info.value.message and "upgrade workbench on this machine" in info.value.hint


@async_test
async def test_a_worker_that_exits_before_hello_is_reported_with_its_status_and_last_words():
    client = WorkerClient(scripted("import sys; sys.stderr.write('no CUDA driver found\\n'); sys.exit(3)"))
    with pytest.raises(Exception) as info:
        await client.start()
    await client.close()
    assert "exited with status 3 before it was ready: no CUDA driver found" in info.value.message
    assert "check that this command runs" in info.value.hint


@async_test
async def test_malformed_and_unknown_lines_from_a_worker_are_reported_and_skipped():
    seen = []
    lines = ["not json at all", HELLO % (1, 1), '{"v": 1, "seq": 2, "type": "telemetry", "job": null}',
             '{"v": 1, "seq": 3, "type": "accepted", "job": "j1"']  # the last one truncated
    script = "".join(f"print({line!r}, flush=True)\n" for line in lines) + textwrap.dedent(PONG_LOOP)
    client = WorkerClient(scripted(script), on_update=seen.append)
    await client.start()
    try:
        assert await client.ping() < 5  # the connection survived every bad line
    finally:
        await client.close()
    problems = [u.data["message"] for u in seen if u.kind == "protocol"]
    assert len(problems) == 3
    assert "not JSON" in problems[0] and "unknown message type 'telemetry'" in problems[1] and "not JSON" in problems[2]


# ----------------------------------------------------------------- the headless CLI on a worker


def _fake_command(*extra: str) -> str:
    return " ".join([sys.executable, "-m", "workbench", "worker", *FAKE, *extra])


FAST = ["--set", "calibration.nsamples=4", "--set", "calibration.seqlen=64", "--set", "evaluate.limit=3", "--quiet"]


def test_cli_run_on_a_local_worker_is_recorded_in_the_history(capsys):
    code = main(["run", "quickstart", "--backend", "local", "--worker-command", _fake_command(), *FAST, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    with History() as h:
        run = h.get(summary["run_id"])
        events = h.events(run.id)
        metrics = h.metrics(run.id)
    assert run.status == "finished" and run.summary["metrics"] == summary["metrics"]
    assert events[0]["type"] == "log" and events[0]["message"].startswith("worker local: pid ")
    assert events[1]["type"] == "run_started" and events[-1]["type"] == "run_finished"
    assert [e["layer"] for e in events if e["type"] == "layer_done"] == list(range(8))
    assert [(m["phase"], m["value"]) for m in metrics] == [("before", 30.0), ("after", compressed_perplexity("wikitext2", [0.5]))]


def test_cli_a_dead_worker_fails_the_run_with_one_message_and_keeps_its_events(capsys):
    code = main(["run", "quickstart", "--backend", "local", "--worker-command", _fake_command("--fake-fail", "crash@3"), *FAST])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1 and sum(line.strip().startswith("hint: ") for line in lines) == 1
    assert "was killed by signal 9 (SIGKILL)" in err and "Traceback" not in err
    with History() as h:
        run = h.runs()[0]
        events = h.events(run.id)
    assert run.status == "failed" and run.error["kind"] == "worker_died"
    assert f"workbench show {run.id}" in err
    assert [e["layer"] for e in events if e["type"] == "layer_done"] == [0, 1, 2]
    assert events[-1]["type"] == "run_failed" and "run_finished" not in [e["type"] for e in events]


@pytest.mark.parametrize("argv, words", [
    (["--backend", "gpu9"], "unknown backend 'gpu9'"),
    (["--backend", "local", "--ssh-option", "Port=22"], "--ssh-option applies to ssh://"),
    (["--worker-command", "workbench worker"], "--worker-command needs a worker backend"),
    (["--backend", "local", "--gpus", "0,1"], "a run uses one"),
    (["--backend", "local", "--gpus", "0+0"], "more than one worker"),
    (["--backend", "local", "--worker-command", "/nonexistent/bin/workbench worker"], "cannot start the worker"),
])
def test_cli_bad_backend_settings_get_one_message_and_exit_2(capsys, argv, words):
    code = main(["run", "quickstart", *argv, *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1 and "hint: " in err
    assert words in err
    with History() as h:
        assert h.runs() == []  # nothing started, nothing recorded


def test_ctrl_c_on_a_headless_run_cancels_the_job_records_it_and_the_worker_leaves():
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "run", "quickstart", "--backend", "local", "--quiet",
                             "--worker-command", _fake_command("--fake-delay", "0.1"), "--set", "evaluate.limit=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            with History() as h:
                runs = h.runs()
                events = h.events(runs[0].id) if runs else []
            if any(e["type"] == "layer_done" for e in events):
                break
            time.sleep(0.05)
        worker_pid = int(re.search(r"pid (\d+)", events[0]["message"]).group(1))
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "error: interrupted" in err and "Traceback" not in err
    with History() as h:
        run = h.get(runs[0].id)
        types = [e["type"] for e in h.events(run.id)]
    assert run.status == "cancelled" and types[-1] == "run_failed" and "run_finished" not in types
    with pytest.raises(ProcessLookupError):  # the CLI shut its worker down before exiting
        os.kill(worker_pid, 0)


def test_an_out_of_memory_error_is_recognised_by_its_cause_or_its_type():
    from workbench.backends.worker import describe_error
    from workbench.errors import RunError

    try:
        try:
            raise MemoryError("host")
        except MemoryError as oom:
            raise RunError("out of memory: host", "use fewer calibration samples") from oom
    except RunError as exc:  # how the engine reports it
        assert describe_error(exc) == {"kind": "out_of_memory", "message": "out of memory: host",
                                       "hint": "use fewer calibration samples", "traceback": None}
    cuda_oom = type("OutOfMemoryError", (RuntimeError,), {})  # torch.OutOfMemoryError, matched by name
    try:
        raise cuda_oom("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
    except RuntimeError as exc:
        error = describe_error(exc)
    assert error["kind"] == "out_of_memory" and error["message"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "calibration.nsamples" in error["hint"] and "offload_activations" in error["hint"] and "dtype" in error["hint"]
    try:
        raise KeyError("x")
    except KeyError as exc:
        error = describe_error(exc)
    assert error["kind"] == "run_failed" and "KeyError" in error["traceback"]


def test_numbers_json_cannot_hold_are_sent_as_null():
    import io

    from workbench.backends.worker import Channel
    from workbench.events import Metric

    out = io.BytesIO()
    channel = Channel(out)
    channel.send("event", "j1", event=Metric(dataset="wikitext2", value=float("inf"), extra={"bits_per_byte": float("nan")}).to_dict())
    message = decode(out.getvalue())
    assert message["event"]["value"] is None and message["event"]["extra"] == {"bits_per_byte": None}
    assert message["event"]["dataset"] == "wikitext2" and message.seq == 1

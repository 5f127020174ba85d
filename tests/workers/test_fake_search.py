"""The fake worker's low-rank searches and structured steps, and live device memory in pongs (real subprocesses, no torch)."""

from __future__ import annotations

import pytest
from worker_support import async_test, fake, follow, scripted

from workbench.backends.client import WorkerClient

GIB = 2**30
LAYERS = 4
TYPE_GROUPS = ["qk", "o", "gate", "up", "down"]  # the search's "type" space on a Llama model (value projections stay dense)
RUN = {"calibration": {"nsamples": 4, "seqlen": 64}, "evaluate": {"limit": 2, "seqlen": 64}}


def events_of(updates, kind: str, stage: str | None = None) -> list:
    return [u.event for u in updates if u.kind == "event" and u.event.type == kind and (stage is None or u.event.stage == stage)]


def fake_gpu(devices: list[dict]) -> dict:
    (gpu,) = [d for d in devices if d["kind"] == "cuda"]
    return gpu


def documented_objective(n: int) -> float:
    """The fake search's objective of trial n, as PROTOCOL.md and backends/fake/ state it."""
    return 40 + 20 / (n + 1) + (n * 7 % 5)


@async_test
async def test_lowrank_search_trials_layers_and_memory_during_the_run():
    seen = []
    client = WorkerClient(fake("--fake-delay", "0.03", "--fake-layers", str(LAYERS)), on_update=seen.append,
                          heartbeat=3600)
    try:
        hello = await client.start()
        at_hello = fake_gpu(hello["devices"])["free"]
        assert client.devices == hello["devices"]
        step = {"type": "lowrank", "allocation": "search", "trials": 7, "retention": 0.7, "ratio_min": 0.3, "ratio_max": 0.9}
        job = await client.submit("run", spec={"name": "lr-search", "steps": [step], **RUN})
        updates, during = [], None
        async for update in client.events(job):
            updates.append(update)
            if during is None and update.kind == "event" and update.event.type == "trial":
                await client.ping()  # the worker answers on its main thread while the job runs
                during = fake_gpu(client.devices)["free"]
        assert updates[-1].kind == "result", updates[-1].data
        memory = [u for u in seen if u.kind == "memory"]
        assert memory and fake_gpu(memory[0].data["devices"])["free"] == during
        assert during < at_hello and (at_hello - during) % GIB == 0  # 1 GiB per finished unit of work
        await client.ping()
        assert fake_gpu(client.devices)["free"] == at_hello  # given back when the job ended
    finally:
        await client.close()

    stages = [e.stage for e in events_of(updates, "stage_started")]
    assert stages.index("lowrank:0:statistics") < stages.index("lowrank:0:search") < stages.index("lowrank:0:apply")
    trials = events_of(updates, "trial")
    assert len(trials) == 7 and [t.number for t in trials] == list(range(7))
    assert all(t.stage == "lowrank:0:search" and t.state == "complete" for t in trials)
    objectives = [documented_objective(n) for n in range(7)]
    assert [t.objective for t in trials] == pytest.approx(objectives)
    best_so_far, best = [], None
    for n, value in enumerate(objectives):
        if best is None or value < objectives[best]:
            best = n
        best_so_far.append((best, objectives[best]))
    assert [(t.best["number"], t.best["objective"]) for t in trials] == best_so_far
    assert [t.best["number"] for t in trials] != [t.number for t in trials]  # some trials are worse than the best so far
    for t in trials:
        assert list(t.params) == TYPE_GROUPS and all(0.3 <= r <= 0.9 for r in t.params.values())
        assert t.best["params"] == trials[t.best["number"]].params

    layers = events_of(updates, "layer_done", "lowrank:0:apply")
    assert [e.layer for e in layers] == list(range(LAYERS))
    assert all(e.sparsity == 1 - 0.7 and e.target == 1 - 0.7 for e in layers)
    modules = layers[0].modules
    assert modules["self_attn.v_proj"]["rank"] is None and modules["self_attn.v_proj"]["retained"] == 1.0
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        m = modules[name]
        out, inp = m["shape"]
        assert m["rank"] >= 1 and m["params"] == m["rank"] * (out + inp) and m["retained"] == m["params"] / (out * inp)

    summary = updates[-1].data["result"]
    (report,) = summary["steps"]
    assert report["search"]["best"]["number"] == best_so_far[-1][0] and report["search"]["trials"] == 7
    assert report["search"]["best"]["ratios"] == trials[best_so_far[-1][0]].params
    assert report["retained"] == 0.7 and len(report["layers"]) == LAYERS
    (after,) = [m for m in summary["metrics"] if m["phase"] == "after"]
    assert after["value"] == pytest.approx(30.0 * (1 + 4 * (1 - 0.7) ** 2))  # wikitext2's dense 30, effective sparsity 0.3


@async_test
async def test_structured_steps_events_and_effective_sparsity():
    client = WorkerClient(fake("--fake-delay", "0.005", "--fake-layers", str(LAYERS)))
    steps = [{"type": "depth", "remove": 1}, {"type": "width", "mlp_width": 0.5}, {"type": "vocab", "size": 4128}]
    try:
        await client.start()
        updates = await follow(client, await client.submit("run", spec={"name": "structured", "steps": steps, **RUN}))
    finally:
        await client.close()
    assert updates[-1].kind == "result", updates[-1].data
    summary = updates[-1].data["result"]
    depth, width, vocab = summary["steps"]

    # depth: scored layer by layer, then the layer before the last one goes; later steps see three layers
    assert [e.done for e in events_of(updates, "progress", "depth:0")] == [1, 2, 3, 4]
    assert depth["removed"] == [2] and (depth["layers_before"], depth["layers_after"]) == (4, 3)

    # width: half of the 768 MLP channels go; attention is untouched
    attention = 256 * 256 + 2 * (128 * 256) + 256 * 256
    mlp_before, mlp_after = 3 * 768 * 256, 3 * 384 * 256
    removed = 1 - (attention + mlp_after) / (attention + mlp_before)
    layers = events_of(updates, "layer_done", "width:1")
    assert [e.layer for e in layers] == [0, 1, 2]
    assert all(e.sparsity == pytest.approx(removed) and e.target == e.sparsity for e in layers)
    assert layers[0].modules["mlp.gate_proj"]["shape"] == [384, 256] and layers[0].modules["mlp.down_proj"]["shape"] == [256, 384]
    assert width["headline"]["MLP channels"] == "768 -> 384"

    # vocab: half of the 8256 tokens go, from the embeddings and the untied LM head
    assert [e.done for e in events_of(updates, "progress", "vocab:2")] == [1, 2, 3]
    assert (vocab["vocab_before"], vocab["vocab_after"]) == (8256, 4128)
    params = 3 * (attention + mlp_after + 2 * 256) + 2 * 8256 * 256 + 256
    assert vocab["parameters_before"] == params
    assert vocab["parameters_after"] == params - 2 * 4128 * 256

    effective = [1 / 4, removed, 2 * 4128 * 256 / params]
    expected = 30.0
    for s in effective:
        expected *= 1 + 4 * s * s
    (after,) = [m for m in summary["metrics"] if m["phase"] == "after"]
    assert after["value"] == pytest.approx(expected)


@async_test
async def test_a_pong_without_devices_keeps_the_hello_devices():
    client = WorkerClient(scripted("""
        import json, sys
        devices = [{"kind": "cpu", "name": "x", "total": 100, "free": 50}]
        print(json.dumps({"v": 1, "seq": 1, "t": 0, "type": "hello", "job": None, "protocol": 1, "workbench": "9",
                          "python": "3", "devices": devices, "pid": 1}), flush=True)
        for line in sys.stdin:
            msg = json.loads(line)
            if msg["type"] == "ping":
                print(json.dumps({"v": 1, "seq": 2, "t": 0, "type": "pong", "job": None, "reply_to": msg["seq"]}), flush=True)
            elif msg["type"] == "shutdown":
                break
    """), heartbeat=3600)
    seen = []
    client.on_update = seen.append
    try:
        await client.start()
        await client.ping()
        assert client.devices == [{"kind": "cpu", "name": "x", "total": 100, "free": 50}]
        assert not [u for u in seen if u.kind == "memory"]
    finally:
        await client.close()

"""Workers running the real engine on the demo model.

A run on a worker must give exactly what the same run gives in this process;
cancel, kill -9 and a library printing on stdout must leave the client and
the next job unharmed.
"""

import json
import os
import signal
import sys
import textwrap

import pytest
import torch
from torch import nn
from worker_support import SPEC

from workbench.backends.client import BlockingClient
from workbench.backends.transports import LocalTransport
from workbench.cli import main
from workbench.errors import Cancelled, RunError
from workbench.history import History

ENV = {"OMP_NUM_THREADS": "1"}  # the demo model is tiny: one thread is enough
EVALUATE = {"steps": [], "evaluate": SPEC["evaluate"]}

# A worker whose model loader prints on stdout from Python, the raw descriptor and C, as careless libraries do.
NOISY_WORKER = textwrap.dedent("""
    import ctypes, os, sys
    import workbench.models.loading as models

    real_load = models.load_model

    def noisy_load(*args, **kwargs):
        print("library print on stdout")
        os.write(1, b"library write on descriptor 1\\n")
        libc = ctypes.CDLL(None)
        libc.printf(b"library printf from C\\n")
        libc.fflush(None)
        return real_load(*args, **kwargs)

    models.load_model = noisy_load
    from workbench.cli import main
    sys.exit(main(["worker"]))
""")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One workbench home for the module's worker and reference run (the per-test home is function scoped)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("engine-home")
        mp.setenv("WORKBENCH_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def reference(home, one_thread):
    """The tiny run, computed in this process: what the worker must reproduce."""
    from workbench.engine import execute
    from workbench.spec import spec_from_dict

    return execute(spec_from_dict(SPEC))


@pytest.fixture(scope="module")
def worker(home):
    """One worker for the module, with the noisy loader: every job below also checks the stream survives it."""
    with BlockingClient(LocalTransport(command=[sys.executable, "-c", NOISY_WORKER], env=ENV), record=True) as client:
        yield client


def test_hello_reports_the_versions_and_the_memory(worker):
    import transformers

    hello = worker.hello
    assert hello["fake"] is False and hello["pid"] == worker.client.pid
    assert (hello["torch"], hello["transformers"]) == (torch.__version__, transformers.__version__)
    cpu = hello["devices"][0]
    assert cpu["kind"] == "cpu" and cpu["total"] >= cpu["free"] > 0
    assert len([d for d in hello["devices"] if d["kind"] == "cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


@pytest.mark.slow
def test_a_run_on_the_worker_equals_the_same_run_in_process(worker, reference):
    events = []
    summary = worker.run("run", events.append, spec=SPEC, run_id="engine-run")
    assert summary["run_id"] == "engine-run"
    got = [(m["dataset"], m["phase"], m["value"]) for m in summary["metrics"]]
    want = [(m["dataset"], m["phase"], m["value"]) for m in reference["metrics"]]
    assert [g[:2] for g in got] == [w[:2] for w in want] == [("wikitext2", "before"), ("wikitext2", "after")]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], rel=1e-6)
    assert summary["steps"][0]["sparsity"] == reference["steps"][0]["sparsity"]
    types = [e.type for e in events]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    assert [e.stage for e in events if e.type == "stage_started"] == ["load", "calibrate", "evaluate:before", "prune:0", "evaluate:after"]
    assert [e.layer for e in events if e.type == "layer_done"] == list(range(8))


def test_an_evaluate_job_measures_the_dense_model(worker, reference):
    summary = worker.run("evaluate", spec=EVALUATE)
    (metric,) = summary["metrics"]
    dense = next(m for m in reference["metrics"] if m["phase"] == "before")
    assert metric["phase"] == "before" and metric["value"] == pytest.approx(dense["value"], rel=1e-6)
    assert summary["steps"] == []


def test_inspect_describes_every_linear_and_the_memory_a_run_needs(worker, one_thread):
    from workbench.models import load_model

    info = worker.run("inspect", model={"name": "demo", "device": "cpu"})
    model = load_model("demo", device="cpu").model
    shapes = {name: list(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.startswith("model.layers.")}
    assert info["linear_shapes"] == shapes and len(shapes) == 8 * 7
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert (info["total_params"], info["num_layers"], info["architecture"]) == (params, 8, "LlamaForCausalLM")
    assert info["memory"] == {"dtype": "float32", "weights": params * 4, "largest_layer": layer * 4,
                              "activations_per_sample": 2 * 512 * 256 * 4, "seqlen": 512}


def test_cancel_stops_the_engine_at_a_layer_boundary_and_the_worker_stays(worker):
    layers = []

    def emit(event):
        if event.type == "layer_done":
            layers.append(event.layer)
            if len(layers) == 1:
                worker.cancel(worker.job)

    pid = worker.client.pid
    with pytest.raises(Cancelled) as info:
        worker.run("run", emit, spec=SPEC)
    assert info.value.kind == "cancelled" and layers[0] == 0 and len(layers) < 8
    assert worker.run("evaluate", spec=EVALUATE)["metrics"][0]["phase"] == "before"
    assert worker.client.pid == pid


@pytest.mark.slow
def test_kill_9_mid_run_fails_the_run_in_the_history_and_a_new_worker_runs_the_next_job(worker, home):
    """Last of the module's worker tests: it replaces the worker."""
    killed = worker.client.pid

    def emit(event):
        if event.type == "layer_done" and worker.client.pid == killed:
            os.killpg(killed, signal.SIGKILL)

    with pytest.raises(RunError) as info:
        worker.run("run", emit, spec=SPEC, run_id="killed-run")
    exc = info.value
    assert exc.kind == "worker_died" and "was killed by signal 9 (SIGKILL)" in exc.message
    assert "library printf from C" in exc.details  # the worker's last stderr lines: its stdout noise went there

    with History(home / "history.sqlite") as history:
        record = history.get("killed-run")
        types = [e["type"] for e in history.events("killed-run")]
    assert record.status == "failed" and record.error["kind"] == "worker_died"
    assert "library print on stdout" in record.error["hint"]
    assert types[0] == "run_started" and "layer_done" in types and types[-1] == "run_failed"
    assert "run_finished" not in types

    # the client is still here: a fresh worker (same noisy loader) runs the next job
    summary = worker.run("evaluate", spec=EVALUATE, run_id="after-kill")
    assert worker.client.pid != killed and summary["metrics"][0]["phase"] == "before"
    with History(home / "history.sqlite") as history:
        assert history.get("after-kill").status == "finished" and len(history.metrics("after-kill")) == 1


@pytest.mark.slow
def test_cli_backend_local_runs_the_engine_in_a_worker_and_records_the_run(capsys, monkeypatch, reference):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = main(["run", "quickstart", "--backend", "local", "--set", "calibration.nsamples=4", "--set", "calibration.seqlen=64",
                 "--set", "evaluate.limit=3", "--set", "evaluate.seqlen=64", "--quiet", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert [m["value"] for m in summary["metrics"]] == pytest.approx([m["value"] for m in reference["metrics"]], rel=1e-6)
    with History() as h:
        record = h.get(summary["run_id"])
        types = [e["type"] for e in h.events(record.id)]
    assert record.status == "finished" and types[0] == "log" and types[-1] == "run_finished"
    assert types.count("layer_done") == 8 and types.count("metric") == 2

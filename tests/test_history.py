"""The run history is a real SQLite file that other processes can read."""

import sqlite3

from workbench.events import LayerDone, Metric, RunStarted
from workbench.history import History, workbench_home


def test_history_records_runs_events_and_metrics(tmp_path):
    path = tmp_path / "h.sqlite"
    with History(path) as h:
        h.create_run("r1", {"name": "a"}, name="a", model="demo")
        rec = h.recorder("r1")
        rec(RunStarted(run_id="r1", spec={"name": "a"}))
        rec(LayerDone(stage="prune:0", layer=0, total=2, sparsity=0.5, modules={"q": {"zeros": 2}}))
        rec(Metric(dataset="wikitext2", value=12.5, phase="after", seqlen=512, windows=3))
        h.fail_run("r1", "run_failed", "boom", "try again")
    # read it back with the sqlite3 module directly: the file is the interface
    db = sqlite3.connect(path)
    assert db.execute("SELECT status FROM runs WHERE id='r1'").fetchone()[0] == "failed"
    types = [r[0] for r in db.execute("SELECT type FROM events WHERE run_id='r1' ORDER BY seq")]
    assert types == ["run_started", "layer_done", "metric"]
    assert db.execute("SELECT value, seqlen, windows FROM metrics").fetchone() == (12.5, 512, 3)
    with History(path) as h:
        assert h.get("r1").error["message"] == "boom"
        assert h.events("r1")[1]["modules"] == {"q": {"zeros": 2}}
        # a second connection continues the sequence numbers
        h.add_event("r1", Metric(dataset="c4", value=1.0))
        assert [e["type"] for e in h.events("r1")][-1] == "metric" and len(h.events("r1")) == 4


def test_default_location_follows_workbench_home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    assert workbench_home() == tmp_path / "home"
    with History() as h:
        h.create_run("x", {}, name="x")
    assert (tmp_path / "home" / "history.sqlite").exists()

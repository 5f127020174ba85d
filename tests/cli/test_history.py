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


def test_a_history_written_before_metric_errors_existed_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL, finished REAL,
                           status TEXT NOT NULL, model TEXT, spec TEXT NOT NULL, summary TEXT, error TEXT, out_dir TEXT);
        CREATE TABLE metrics (run_id TEXT NOT NULL, name TEXT NOT NULL, dataset TEXT NOT NULL, phase TEXT NOT NULL,
                              value REAL, seqlen INTEGER, windows INTEGER, limit_windows INTEGER);
        INSERT INTO runs VALUES ('old', 'a', 1.0, 2.0, 'finished', 'demo', '{}', NULL, NULL, NULL);
        INSERT INTO metrics VALUES ('old', 'perplexity', 'wikitext2', 'after', 31.5, 512, 4, NULL);
    """)
    old.commit()
    old.close()
    with History(path) as h:
        assert h.metrics("old") == [{"name": "perplexity", "dataset": "wikitext2", "phase": "after", "value": 31.5,
                                     "seqlen": 512, "windows": 4, "limit": None, "stderr": None, "extra": {}}]
        h.create_run("new", {"name": "b"})
        h.add_event("new", Metric(name="acc", dataset="piqa", value=0.6, stderr=0.02, extra={"lm_eval": "0.4"}))
        got = h.metrics("new")[0]
    assert (got["stderr"], got["extra"]) == (0.02, {"lm_eval": "0.4"})
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(metrics)")}
    assert {"stderr", "extra"} <= columns


def test_metrics_attached_later_are_stored_as_eval_with_a_note(tmp_path):
    from workbench.history import History

    with History(tmp_path / "h.sqlite") as h:
        h.create_run("r1", {"name": "x"}, name="x")
        h.attach_metrics("r1", [{"name": "perplexity", "dataset": "c4", "value": 41.5, "phase": "after", "seqlen": 64}],
                         note="evaluated by run r2")
        metrics = h.metrics("r1")
        events = h.events("r1")
    assert [(m["dataset"], m["phase"], m["value"], m["seqlen"]) for m in metrics] == [("c4", "eval", 41.5, 64)]
    assert [e["type"] for e in events] == ["log", "metric"] and events[0]["message"] == "evaluated by run r2"

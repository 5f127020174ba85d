"""The calibration study: grid presets, reuse of runs in the history, the aggregate table, bad input."""

from __future__ import annotations

import json
import math
import sqlite3
import statistics
from collections import defaultdict

import pytest

from workbench import study as S
from workbench.cli import main
from workbench.errors import RunError, UserError
from workbench.history import History, workbench_home
from workbench.spec import load_preset, spec_from_dict

TINY_STUDY = """
name = "tiny-study"

[model]
name = "demo"
dtype = "float32"
device = "cpu"

[calibration]
nsamples = 4
seqlen = 32

[[steps]]
type = "prune"
method = "wanda"
sparsity = 0.5

[evaluate]
perplexity = ["books", "wikitext2"]
limit = 2
seqlen = 64
before = false

[study]
sources = ["books", "random"]
methods = ["wanda", "magnitude"]
sparsities = [0.5]
seeds = [0, 1]
"""


@pytest.fixture()
def preset(tmp_path):
    path = tmp_path / "tiny-study.toml"
    path.write_text(TINY_STUDY, encoding="utf-8")
    return str(path)


def refuse(spec, history):
    raise AssertionError(f"{spec.name} should have been reused")


def direct_table(db_path) -> dict[tuple, list[float]]:
    """(method, sparsity, source, dataset) -> compressed perplexities, straight from the history's tables."""
    db = sqlite3.connect(str(db_path))
    rows = db.execute(
        "SELECT r.spec, m.dataset, m.value FROM runs r JOIN metrics m ON m.run_id = r.id "
        "WHERE r.status = 'finished' AND m.phase = 'after' AND m.name = 'perplexity'"
    ).fetchall()
    db.close()
    groups: dict[tuple, list[float]] = defaultdict(list)
    for spec_json, dataset, value in rows:
        spec = json.loads(spec_json)
        step = spec["steps"][0]
        method = ("owl-" if step["allocation"] == "owl" else "") + step["method"]
        groups[(method, step["sparsity"], spec["calibration"]["source"], dataset)].append(value)
    return groups


@pytest.mark.slow
def test_a_study_runs_each_cell_once_reuses_runs_and_aggregates_the_stored_metrics(preset, capsys, one_thread):
    assert main(["study", preset, "--json", "--quiet"]) == 0
    first = json.loads(capsys.readouterr().out)
    with History() as h:
        runs = h.runs()
    assert len(runs) == 9 and all(r.status == "finished" for r in runs)  # 2 x 2 x 1 x 2 cells and the dense reference
    assert sum(not c["reused"] for c in first["cells"]) == 9

    # The aggregate table equals the mean and sample standard deviation over seeds computed from the stored runs.
    direct = direct_table(workbench_home() / "history.sqlite")
    table = first["table"]
    assert table["metrics"] == ["books", "wikitext2"]
    assert len(table["rows"]) == 4
    for row in table["rows"]:
        for dataset in ("books", "wikitext2"):
            values = direct[(row["method"], row["sparsity"], row["source"], dataset)]
            assert len(values) == 2
            stat = row["metrics"][dataset]
            assert stat["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert stat["std"] == pytest.approx(statistics.stdev(values), rel=1e-9)
        assert row["calibration"]["calib ppl"]["n"] == 2
    assert set(table["dense"]) == {"books", "wikitext2"}
    # random calibration data is far from what the demo model reads
    rows = {(r["method"], r["source"]): r for r in table["rows"]}
    assert rows[("wanda", "random")]["calibration"]["calib ppl"]["mean"] > 10 * rows[("wanda", "books")]["calibration"]["calib ppl"]["mean"]

    # A second invocation computes nothing: every cell is found in the history.
    study, base = S.load_study(preset)
    with History() as h:
        again = S.run_study(study, base, h, cell_runner=refuse)
        assert len(h.runs()) == 9
    assert all(r.reused for r in again)
    assert [r.run_id for r in again] == [c["run_id"] for c in first["cells"]]
    assert main(["study", preset, "--plan"]) == 0
    assert "9 cells, 0 to run" in capsys.readouterr().out

    # Extending the grid runs only the new cells.
    ran = []
    study, base = S.load_study(preset, ['study.sources=["books"]', "study.seeds=[0, 1, 2]"])
    with History() as h:
        results = S.run_study(study, base, h, cell_runner=lambda spec, hist: ran.append(spec) or S.run_cell(spec, hist))
    assert [(s.calibration.source, s.steps[0].method, s.calibration.seed) for s in ran] == [("books", "wanda", 2), ("books", "magnitude", 2)]
    assert sum(r.reused for r in results) == len(results) - 2


def test_the_cli_table_chart_and_ranking(preset, capsys, monkeypatch):
    """The human output, on a history whose runs are reused (the runs come from a stub runner writing metrics)."""
    study, base = S.load_study(preset)
    with History() as h:
        def fake(spec, hist):
            run_id = f"run-{len(hist.runs())}"
            hist.create_run(run_id, spec.to_dict(), name=spec.name)
            source = spec.calibration.source
            for ds in ("books", "wikitext2"):
                value = (100.0 if source == "random" else 60.0) + spec.calibration.seed
                hist.add_event(run_id, {"type": "metric", "name": "perplexity", "dataset": ds,
                                        "phase": "after" if spec.steps else "before", "value": value})
            hist.finish_run(run_id, {"calibration": None})
            return run_id

        S.run_study(study, base, h, cell_runner=fake)
    assert main(["study", preset, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "60.50 ± 0.71" in out and "100.50 ± 0.71" in out  # seeds 0 and 1
    assert "ranking for wanda on books: books (60.50) < random (100.50)" in out
    assert "wanda: books perplexity against sparsity" in out
    assert "9 runs: 9 reused, 0 computed" in out


def test_failed_cells_are_reported_and_bad_input_stops_the_study(preset):
    study, base = S.load_study(preset)

    def flaky(spec, history):
        if spec.calibration.source == "random" and spec.calibration.seed == 1:
            raise RunError("out of memory", "smaller batches")
        return f"id-{spec.name}"

    with History() as h:
        results = S.run_study(study, base, h, cell_runner=flaky)
        assert [r.error for r in results].count("out of memory") == 2
        assert sum(r.run_id is not None for r in results) == 7

        def bad(spec, history):
            raise UserError("the data is unreadable", "fix it")

        with pytest.raises(UserError):
            S.run_study(study, base, h, cell_runner=bad)


def test_ranking_orders_sources_by_the_geometric_mean_over_sparsities():
    def row(source, sparsity, books, acc):
        return {"method": "wanda", "sparsity": sparsity, "source": source,
                "metrics": {"books": {"mean": books}, "acc piqa": {"mean": acc}, "decode_ms_per_token dense": {"mean": 1.0}}}

    table = {"metrics": ["books", "acc piqa", "decode_ms_per_token dense"], "rows": [
        row("c4", 0.5, 10.0, 0.6), row("c4", 0.7, 1000.0, 0.5),
        row("books", 0.5, 20.0, 0.7), row("books", 0.7, 200.0, 0.6),
    ]}
    ranks = S.ranking(table)["wanda"]
    assert ranks["books"] == [("books", pytest.approx(math.sqrt(20 * 200))), ("c4", pytest.approx(math.sqrt(10 * 1000)))]
    assert [s for s, _ in ranks["acc piqa"]] == ["books", "c4"]  # higher accuracy first
    assert "decode_ms_per_token dense" not in ranks  # no known direction: not ranked


# ----------------------------------------------------------------- presets and the spec identity


def test_shipped_study_presets():
    study, base = S.load_study("study-calibration-demo")
    assert set(study.sources) == {"c4", "wikitext2", "books", "selfgen", "random"}
    assert set(study.methods) >= {"wanda", "sparsegpt"} and study.sparsities == [0.5, 0.6, 0.7] and len(study.seeds) >= 2
    assert set(base.evaluate.perplexity) == {"books", "wikitext2"}
    paper, base = S.load_study("study-calibration-paper")
    assert (base.calibration.nsamples, base.calibration.seqlen) == (128, 2048)
    assert paper.seeds == [0, 5, 10, 15, 20] and paper.sparsities == [0.6] and paper.methods == ["wanda", "owl-wanda"]
    assert "selfgen" in paper.sources and base.steps[0].pattern == "unstructured"
    owl = S.cell_spec(base, paper, S.Cell("selfgen", "owl-wanda", 0.6, 5))
    assert (owl.steps[0].method, owl.steps[0].allocation, owl.calibration.seed) == ("wanda", "owl", 5)


def test_spec_digest_ignores_names_and_fills_defaults_of_older_specs():
    spec = load_preset("quickstart")
    digest = S.spec_digest(spec)
    assert S.spec_digest(spec_from_dict({**spec.to_dict(), "name": "other", "description": "x"})) == digest
    older = spec.to_dict()
    del older["calibration"]["selfgen"]  # written before that setting existed
    assert S.spec_digest(older) == digest
    assert S.spec_digest(load_preset("quickstart", ["steps.0.sparsity=0.6"])) != digest
    assert S.spec_digest({"model": {"name": ""}}) is None  # no longer valid: never matches


@pytest.mark.parametrize("overrides, words", [
    (['study.sources=["c4", "bookcorpus"]'], ["study.sources", "bookcorpus"]),
    (['study.methods=["wanda", "obs"]'], ["study.methods", "obs", "owl-wanda"]),
    (["study.sparsities=[]"], ["study.sparsities", "non-empty"]),
    (["study.seeds=[0, 0]"], ["twice"]),
    (["study.grid=1"], ["study.grid"]),
    (['study.methods=["owl-wanda"]', "study.sparsities=[0.95]"], ["books | owl-wanda 95%", "owl_lambda"]),
])
def test_bad_grids_are_refused_with_one_message(preset, capsys, overrides, words):
    code = main(["study", preset, *(a for o in overrides for a in ("--set", o))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 1 and "hint: " in err
    for word in words:
        assert word in err
    with History() as h:
        assert h.runs() == []


def test_running_a_study_preset_as_a_single_run_says_how_to_run_it(preset, capsys):
    assert main(["run", preset]) == 2
    assert "workbench study" in capsys.readouterr().err
    assert main(["study", "quickstart"]) == 2
    assert "no [study] table" in capsys.readouterr().err

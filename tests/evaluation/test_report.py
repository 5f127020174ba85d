"""Comparison table, charts and Markdown report from a real run history; evaluations attached to runs."""

import json

import pytest

from workbench.cli import main
from workbench.errors import UserError
from workbench.events import Metric
from workbench.evaluation import report
from workbench.files import write_text_atomic
from workbench.history import History


def _metric(name, dataset, value, phase, kind=None, **extra):
    return Metric(name=name, dataset=dataset, value=value, phase=phase, stderr=extra.pop("stderr", None),
                  extra={**({"kind": kind} if kind else {}), **extra})


def _record(history, run_id, name, steps, metrics, summary_steps=()):
    spec = {"name": name, "model": {"name": "demo"}, "steps": steps}
    history.create_run(run_id, spec, name=name, model="demo")
    for m in metrics:
        history.add_event(run_id, m)
    history.finish_run(run_id, {"steps": list(summary_steps), "versions": {"workbench": "0.1.0", "torch": "2.x"}})


LAYERS = [{"layer": i, "target": 0.5, "sparsity": 0.5 + i / 100, "seconds": 0.1, "modules": {"q": {}}} for i in range(3)]


@pytest.fixture
def runs():
    with History() as h:
        _record(h, "r1-dense", "dense", [], [
            _metric("perplexity", "wikitext2", 20.0, "before"),
            _metric("acc", "piqa", 0.70, "before", "zeroshot", stderr=0.01, lm_eval="0.4.13"),
            _metric("acc_norm", "piqa", 0.72, "before", "zeroshot", stderr=0.01),
            _metric("acc", "boolq", 0.60, "before", "zeroshot", stderr=0.02),
            _metric("icl_acc", "sst2/dail", 0.80, "before", "icl", std=0.02),
            _metric("parameters", "model", 1000, "before", "efficiency"),
            _metric("nonzero_parameters", "model", 990, "before", "efficiency"),
        ])
        _record(h, "r2-pruned", "wanda", [{"type": "prune"}], [
            _metric("perplexity", "wikitext2", 21.0, "before"),
            _metric("perplexity", "wikitext2", 30.0, "after"),
            _metric("acc", "piqa", 0.60, "after", "zeroshot", stderr=0.01),
            _metric("acc", "boolq", 0.55, "after", "zeroshot", stderr=0.02),
            _metric("parameters", "model", 1000, "after", "efficiency"),
            _metric("nonzero_parameters", "model", 500, "after", "efficiency"),
        ], summary_steps=[{"type": "prune", "label": "wanda 50%", "sparsity": 0.5, "layers": LAYERS}])
        h.add_event("r2-pruned", _metric("acc", "piqa", 0.62, "eval", "zeroshot", stderr=0.01))  # attached later
        return [(h.get(i), h.metrics(i)) for i in ("r1-dense", "r2-pruned")]


def test_columns_put_the_dense_baseline_first_and_take_later_evaluations(runs):
    cols = report.columns(runs)
    assert [c.run_id for c in cols] == ["r1-dense", "r2-pruned"] and cols[0].baseline and not cols[1].baseline
    assert cols[1].metrics[("perplexity", "wikitext2")]["value"] == 30.0  # after, not the run's own before
    assert cols[1].metrics[("acc", "piqa")]["value"] == 0.62  # the attached evaluation replaces the after value
    assert cols[0].sparsity == pytest.approx(1 - 990 / 1000) and cols[1].sparsity == pytest.approx(0.5)
    alone = report.columns(runs[1:])  # no dense run given: the compressed run's own dense metrics are the baseline
    assert alone[0].baseline and alone[0].metrics[("perplexity", "wikitext2")]["value"] == 21.0
    assert alone[1].metrics[("perplexity", "wikitext2")]["value"] == 30.0


def test_table_shows_values_and_deltas_against_the_baseline(runs):
    header, body = report.table_cells(report.columns(runs))
    assert header == ["metric", "dense (-dense)", "wanda (pruned)"]
    rows = {r[0]: r[1:] for r in body}
    assert list(rows)[0] == "perplexity wikitext2"
    assert rows["perplexity wikitext2"] == ["20.00", f"30.00 (+{30.0 - 20.0:.2f})"]
    assert rows["piqa acc"] == ["0.7000 ±0.0100", f"0.6200 ±0.0100 (-{0.70 - 0.62:.4f})"]
    assert rows["piqa acc_norm"] == ["0.7200 ±0.0100", "-"]
    assert rows["ICL sst2/dail acc"] == ["0.8000 ±0.0200", "-"]
    assert rows["non-zero parameters"] == ["990", "500 (-490)"]
    mean_before, mean_after = (0.70 + 0.60) / 2, (0.62 + 0.55) / 2
    assert rows["zero-shot mean acc"] == [f"{mean_before:.4f}", f"{mean_after:.4f} (-{mean_before - mean_after:.4f})"]


def test_robustness_rows_sit_beside_their_clean_rows_with_the_time_ratio():
    def acc(dataset, value, tta="none", ratio=None, shift=None):
        return _metric("icl_acc", dataset, value, "before", "icl", std=0.01, tta=tta, time_ratio=ratio, shift=shift)

    with History() as h:
        _record(h, "r5-robust", "dense", [], [
            acc("books-next/zeroshot", 0.36, ratio=1.0), acc("books-next/zeroshot+pcl", 0.37, "pcl", 3.25),
            acc("books-next@typo:0.3/zeroshot", 0.33, ratio=1.0, shift="typo:0.3"),
            acc("books-next@typo:0.3/zeroshot+tent", 0.34, "tent", 2.5, shift="typo:0.3"),
        ])
        runs = [(h.get("r5-robust"), h.metrics("r5-robust"))]
    header, body = report.table_cells(report.columns(runs))
    labels = [r[0] for r in body]
    assert labels[:6] == ["ICL books-next/zeroshot acc", "ICL books-next/zeroshot+pcl acc", "ICL books-next/zeroshot+pcl time x plain",
                          "ICL books-next@typo:0.3/zeroshot acc", "ICL books-next@typo:0.3/zeroshot+tent acc",
                          "ICL books-next@typo:0.3/zeroshot+tent time x plain"]
    rows = {r[0]: r[1] for r in body}
    assert rows["ICL books-next/zeroshot+pcl time x plain"] == "3.25x"
    assert rows["ICL books-next@typo:0.3/zeroshot+tent acc"] == "0.3400 ±0.0100"


def test_charts_are_plain_text(runs):
    text = report.charts_text(report.columns(runs))
    assert "\x1b" not in text
    assert "perplexity against sparsity" in text and "accuracy against sparsity" in text
    assert "wikitext2" in text and "zero-shot mean" in text
    points = report.chart_series(report.columns(runs))
    assert points["perplexity"]["wikitext2"] == [(pytest.approx(0.01), 20.0), (0.5, 30.0)]


def test_markdown_report_holds_table_layers_settings_versions(runs, tmp_path):
    text = report.markdown_report(runs, title="Wanda on the demo model")
    assert text.startswith("# Wanda on the demo model")
    assert "| metric | dense (-dense) | wanda (pruned) |" in text
    assert "| perplexity wikitext2 | 20.00 | 30.00 (+10.00) |" in text
    layer_rows = [line for line in text.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(layer_rows) == 3 and "0.5200" in layer_rows[2]
    assert '"name": "wanda"' in text and "lm_eval 0.4.13" in text and "torch 2.x" in text
    assert "```text" in text and "\x1b" not in text
    out = write_text_atomic(tmp_path / "sub" / "report.md", text)
    assert out.read_text() == text and [p.name for p in out.parent.iterdir()] == ["report.md"]
    with pytest.raises(UserError, match="is a folder"):
        write_text_atomic(tmp_path, text)


def test_compare_and_report_commands(runs, tmp_path, capsys):
    assert main(["compare", "r1", "r2", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [c["run_id"] for c in table["columns"]] == ["r1-dense", "r2-pruned"]
    assert main(["compare", "r1", "r2"]) == 0
    assert "perplexity against sparsity" in capsys.readouterr().out
    assert main(["report", "r1", "r2", "--out", str(tmp_path / "r.md")]) == 0
    assert "| perplexity wikitext2 |" in (tmp_path / "r.md").read_text()
    assert main(["compare", "nope"]) == 2 and "no run 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluations_of_a_run_land_in_its_history(one_thread, tmp_path, capsys):
    """A pruned run evaluates zero-shot and efficiency before and after; a later evaluation attaches to it."""
    out = tmp_path / "pruned"
    code = main(["run", "quickstart", "--set", "calibration.nsamples=4", "--set", "calibration.seqlen=64", "--set", "evaluate.limit=2",
                 "--set", 'evaluate.zeroshot=["copa"]', "--set", "evaluate.zeroshot_limit=4", "--set", "evaluate.efficiency=true",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    with History() as h:
        run = h.runs()[0]
        metrics = h.metrics(run.id)
    phases = {(m["name"], m["dataset"], m["phase"]) for m in metrics}
    assert {("acc", "copa", "before"), ("acc", "copa", "after"), ("nonzero_parameters", "model", "after")} <= phases
    nonzero = {m["phase"]: m["value"] for m in metrics if m["name"] == "nonzero_parameters"}
    layers = run.summary["steps"][0]["layers"]
    zeros = sum(m["zeros"] for layer in layers for m in layer["modules"].values())
    linear = sum(m["numel"] for layer in layers for m in layer["modules"].values())
    assert nonzero["before"] - nonzero["after"] == pytest.approx(zeros, abs=linear * 1e-4)  # the step's zeros, counted
    assert main(["eval", run.id[:15], "--icl", "sst2", "--icl-limit", "4", "--icl-mode", "zeroshot", "--quiet"]) == 0
    with History() as h:
        attached = [m for m in h.metrics(run.id) if m["phase"] == "eval"]
    assert [(m["name"], m["dataset"]) for m in attached] == [("icl_acc", "sst2/zeroshot")]
    assert main(["report", run.id, "--out", str(tmp_path / "r.md")]) == 0
    assert "ICL sst2/zeroshot acc" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (["eval", "--model", "demo"], ["nothing to evaluate"]),
    (["eval", "--model", "demo", "--icl", "sst2", "--k", "8", "--memory", "4"], ["is larger than", "icl_memory"]),
    (["eval", "--model", "demo", "--icl", "sst2", "--icl-mode", "fewshot", "--icl-limit", "2", "--set", "evaluate.icl=['mr']"],
     ["mr has no train split"]),
    (["eval"], ["either a run id or --model"]),
    (["eval", "--model", "demo", "--icl", "books-next@blur:0.1", "--icl-mode", "zeroshot"], ["unknown shift 'blur'"]),
    (["eval", "--model", "demo", "--icl", "books-next@typo:1.5", "--icl-mode", "zeroshot"], ["'1.5'", "outside [0, 1]"]),
    (["eval", "--model", "demo", "--perplexity", "wikitext2", "--tta", "pcl"], ["adapts on classification sets", "perplexity"]),
    (["eval", "--model", "demo", "--icl", "books-next", "--icl-mode", "zeroshot", "--tta", "tent", "--set", "evaluate.tta_steps=-1"],
     ["tta_steps = -1"]),
    (["eval", "--model", "demo", "--icl", "books-next", "--tta", "pcl"], ["multiple choice", "icl_modes"]),
])
def test_bad_evaluation_requests(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_a_run_that_kept_no_model_cannot_be_evaluated_later(capsys):
    with History() as h:
        _record(h, "r3-gone", "wanda", [{"type": "prune"}], [])
    assert main(["eval", "r3-gone", "--efficiency"]) == 2
    err = capsys.readouterr().err
    assert "did not keep its compressed model" in err and "--out" in err


def test_perplexity_text_reads_dense_then_compressed_or_a_later_evaluation():
    from workbench.evaluation.report import perplexity_text

    metrics = [
        {"name": "perplexity", "dataset": "wikitext2", "phase": "before", "value": 30.0},
        {"name": "perplexity", "dataset": "wikitext2", "phase": "after", "value": 60.004},
        {"name": "perplexity", "dataset": "c4", "phase": "eval", "value": 41.5},
        {"name": "accuracy", "dataset": "piqa", "phase": "after", "value": 0.6},
    ]
    assert perplexity_text(metrics) == "c4 41.50; wikitext2 30.00 -> 60.00"
    assert perplexity_text(metrics[2:]) == "c4 41.50" and perplexity_text([]) == ""

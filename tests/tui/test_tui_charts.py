"""The TUI's charts: downsampling, and what each chart asks plotext to draw (read back through spies)."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from textual.app import App

from workbench.screens.charts import CurveChart, LayerChart, TrialChart, downsample, integer_ticks


class Spy:
    """Records the calls of a plot method and passes them on."""

    def __init__(self, target, name: str):
        self.calls: list[tuple[tuple, dict]] = []
        self._original = getattr(target, name)
        setattr(target, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self._original(*args, **kwargs)


def spy(chart, *names: str) -> dict[str, Spy]:
    spies = {name: Spy(chart.plt, name) for name in names}
    spies["refresh"] = Spy(chart, "refresh")
    return spies


class ChartApp(App):
    """One chart, alone on the screen or in a pane of ``width`` x ``height`` cells."""

    def __init__(self, chart, width: int | None = None, height: int | None = None):
        super().__init__()
        self.chart = chart
        if width:
            self.chart.styles.width, self.chart.styles.height = width, height

    def compose(self):
        yield self.chart


def with_chart(chart, test, size=(80, 24), pane=(None, None)):
    """Run ``test(chart, pilot)`` with the chart mounted in a small app."""

    async def main():
        app = ChartApp(chart, *pane)
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await test(chart, pilot)

    asyncio.run(asyncio.wait_for(main(), 60))


def shown(chart) -> str:
    """The chart as the widget renders it (plotext's build, with the app's theme), without colours."""
    return chart.render().plain


def running_min(values):
    best, out = math.inf, []
    for v in values:
        best = v if v < best else best
        out.append(best)
    return out


# ------------------------------------------------------------------ downsample


@pytest.mark.parametrize("n,limit", [(1000, 200), (201, 200), (5000, 7), (999, 3), (50, 10), (10, 2)])
def test_downsample_bounds_endpoints_extremes_and_order(n, limit):
    rng = random.Random(n * 31 + limit)
    points = [(float(i), rng.gauss(0.0, 1.0)) for i in range(n)]
    kept = downsample(points, limit)
    assert len(kept) <= limit
    assert kept[0] == points[0] and kept[-1] == points[-1]
    xs = [x for x, _ in kept]
    assert xs == sorted(set(xs))  # the input's order, no point twice
    assert all(points[int(x)] == (x, y) for x, y in kept)  # only input points
    if limit >= 4:  # room for at least one bucket besides the endpoints
        ys = [y for _, y in points]
        assert min(ys) in [y for _, y in kept] and max(ys) in [y for _, y in kept]


def test_downsample_keeps_short_series_and_a_single_spike():
    short = [(float(i), float(i % 3)) for i in range(150)]
    assert downsample(short, 200) == short
    flat = [(float(i), 1.0) for i in range(10_000)]
    flat[4321] = (4321.0, 99.0)
    flat[7777] = (7777.0, -5.0)
    kept = downsample(flat, 50)
    assert (4321.0, 99.0) in kept and (7777.0, -5.0) in kept and len(kept) <= 50


# ------------------------------------------------------------------ LayerChart


def test_layer_chart_bars_at_finished_layers_target_line_and_unit_range():
    async def test(chart, pilot):
        s = spy(chart, "bar", "hline", "xlim", "ylim", "text")
        chart.update_layers([0.5, None, 0.7, 0.6], total=8, target=0.5)
        (args, kwargs), = s["bar"].calls
        assert list(args[0]) == [0, 2, 3] and list(args[1]) == [0.5, 0.7, 0.6]
        assert s["hline"].calls == [((0.5,), {})]
        assert s["xlim"].calls[-1][0] == (-0.5, 7.5)  # the axis spans all 8 layers before they are done
        assert s["ylim"].calls[-1][0] == (0, 1)
        assert len(s["refresh"].calls) == 1 and not s["text"].calls

        chart.update_layers([0.5, None, 0.7, 0.6], total=8, target=0.5)  # unchanged: nothing redrawn
        assert len(s["bar"].calls) == 1 and len(s["refresh"].calls) == 1

        chart.update_layers([0.5, 0.55, 0.7, 0.6], total=8, target=0.5)
        assert list(s["bar"].calls[-1][0][0]) == [0, 1, 2, 3] and len(s["refresh"].calls) == 2
        await pilot.pause()
        text = shown(chart)
        assert "sparsity per layer" in text and "waiting" not in text

    with_chart(LayerChart(), test)


def test_layer_chart_values_outside_unit_range_keep_an_automatic_axis():
    async def test(chart, pilot):
        s = spy(chart, "bar", "ylim", "hline")
        chart.update_layers([12.0, 30.0, 18.5], title="perplexity per layer", ylabel="ppl")
        assert list(s["bar"].calls[0][0][1]) == [12.0, 30.0, 18.5]
        assert not s["ylim"].calls and not s["hline"].calls
        assert "perplexity per layer" in shown(chart)

    with_chart(LayerChart(), test)


def test_layer_chart_empty_state_then_first_layer():
    async def test(chart, pilot):
        s = spy(chart, "bar", "text")
        chart.update_layers([None] * 4, total=4)
        assert not s["bar"].calls and s["text"].calls[0][0][0] == "waiting for the first layer"
        assert "waiting for the first layer" in shown(chart)
        chart.update_layers([0.25, None, None, None], total=4)
        assert list(s["bar"].calls[0][0][0]) == [0]
        assert "waiting for the first layer" not in shown(chart)

    with_chart(LayerChart(), test)


def test_layer_chart_is_legible_in_a_small_pane():
    async def test(chart, pilot):
        chart.update_layers([0.5] * 20, total=32, target=0.5)
        await pilot.pause()
        assert (chart.size.width, chart.size.height) == (38, 10)
        lines = shown(chart).splitlines()
        assert len(lines) == 10 and all(len(line) <= 38 for line in lines)
        ticks = [int(t) for t in lines[-2].split()]  # the last line is the y label
        assert "sparsity per layer" in lines[0] and ticks == [0, 10, 20, 30]  # a round step, evenly spaced

    with_chart(LayerChart(), test, pane=(38, 10))


# ------------------------------------------------------------------ TrialChart


def test_trial_chart_scatter_skips_failed_trials_and_line_is_the_running_minimum():
    objectives = {n: 40 + 20 / (n + 1) + (n * 7 % 5) for n in range(12)}
    trials = [(n, None if n in (3, 8) else objectives[n]) for n in range(12)]
    trials[5], trials[6] = trials[6], trials[5]  # trials may arrive out of order from parallel workers

    async def test(chart, pilot):
        s = spy(chart, "scatter", "plot")
        chart.update_trials(trials)
        finished = [n for n in range(12) if n not in (3, 8)]
        (sx, sy), _ = s["scatter"].calls[0]
        assert list(sx) == finished and list(sy) == [objectives[n] for n in finished]
        (px, py), _ = s["plot"].calls[0]
        assert list(px) == finished and list(py) == running_min([objectives[n] for n in finished])
        assert list(py) != list(sy)  # the formula's wiggle makes some trials worse than the best so far
        chart.update_trials(list(trials))
        assert len(s["refresh"].calls) == 1 and len(s["scatter"].calls) == 1
        await pilot.pause()
        assert "trials (objective, lower is better)" in shown(chart)

    with_chart(TrialChart(), test)


def test_trial_chart_empty_states_and_diverged_trials():
    async def test(chart, pilot):
        s = spy(chart, "scatter", "text")
        chart.update_trials([])
        assert s["text"].calls[-1][0][0] == "no trials yet" and "no trials yet" in shown(chart)
        chart.update_trials([(0, None), (1, float("nan"))])
        assert s["text"].calls[-1][0][0] == "no finished trial yet" and not s["scatter"].calls
        chart.update_trials([(0, 1e12), (1, 45.0), (2, 44.0)])  # 1e12: a diverged trial's stand-in objective
        assert list(s["scatter"].calls[0][0][1]) == [45.0, 44.0]

    with_chart(TrialChart(), test)


def test_trial_chart_downsamples_long_searches_but_keeps_the_best():
    rng = random.Random(7)
    trials = [(n, 50 + rng.random() * 10) for n in range(3000)]
    trials[1234] = (1234, 12.5)

    async def test(chart, pilot):
        s = spy(chart, "scatter", "plot")
        chart.update_trials(trials)
        xs, ys = s["scatter"].calls[0][0]
        assert len(xs) <= 200 and 12.5 in ys and xs[0] == 0 and xs[-1] == 2999
        px, py = s["plot"].calls[0][0]
        assert len(px) <= 200 and py[-1] == 12.5

    with_chart(TrialChart(), test)


# ------------------------------------------------------------------ CurveChart


def test_curve_chart_one_labelled_line_per_series():
    series = {"wanda": [(0.1 * i, 30 * (1 + 4 * (0.1 * i) ** 2)) for i in range(8)],
              "magnitude": [(0.1 * i, 30 * (1 + 9 * (0.1 * i) ** 2)) for i in range(8)]}

    async def test(chart, pilot):
        s = spy(chart, "plot", "xlabel", "ylabel")
        chart.update_series(series, title="perplexity vs sparsity", xlabel="sparsity", ylabel="ppl")
        assert [c[1]["label"] for c in s["plot"].calls] == ["wanda", "magnitude"]
        assert [list(c[0][1]) for c in s["plot"].calls] == [[y for _, y in series[k]] for k in ("wanda", "magnitude")]
        assert s["xlabel"].calls[0][0] == ("sparsity",) and s["ylabel"].calls[0][0] == ("ppl",)
        chart.update_series({k: list(v) for k, v in series.items()}, title="perplexity vs sparsity", xlabel="sparsity",
                            ylabel="ppl")
        assert len(s["refresh"].calls) == 1
        chart.update_series({"wanda": series["wanda"]}, title="perplexity vs sparsity")
        assert s["plot"].calls[-1][1]["label"] is None  # a single series needs no legend
        await pilot.pause()
        assert "perplexity vs sparsity" in shown(chart)

    with_chart(CurveChart(), test)


def test_curve_chart_log_scale_plots_logarithms_and_stays_stable_across_repaints():
    async def test(chart, pilot):
        s = spy(chart, "plot", "yticks", "text")
        chart.update_series({"ppl": [(0.0, 10.0), (0.5, 100.0), (0.7, -1.0), (0.9, 1000.0)]}, title="log", logy=True)
        (xs, ys), _ = s["plot"].calls[0]
        assert list(xs) == [0.0, 0.5, 0.9]  # y <= 0 has no logarithm
        assert list(ys) == pytest.approx([1.0, 2.0, 3.0])
        ticks, labels = s["yticks"].calls[-1][0]
        assert labels == ["10", "100", "1e+03"]
        await pilot.pause()
        first = shown(chart)
        assert first == shown(chart) and "log" in first  # plotext's own log scale would re-apply log at each build
        chart.update_series({"ppl": [(0.0, 0.0)]}, logy=True)
        assert s["text"].calls[-1][0][0] == "no data yet"

    with_chart(CurveChart(), test)


def test_a_chart_plotext_cannot_draw_shows_a_note_instead_of_failing():
    async def test(chart, pilot):
        chart.update_layers([0.5, 0.5], total=2)

        def broken():
            raise IndexError("list index out of range")

        chart.plt.build = broken  # e.g. plotext's legend code at some sizes
        assert "cannot be drawn" in shown(chart)
        chart.refresh()
        await pilot.pause()
        assert pilot.app.is_running

    with_chart(LayerChart(), test)


def test_integer_ticks_are_evenly_spaced_by_a_round_step():
    assert integer_ticks(0, 7) == [0, 2, 4, 6]  # not 0 2 4 5 7
    assert integer_ticks(0, 31) == [0, 10, 20, 30]
    assert integer_ticks(0, 39) == [0, 10, 20, 30, 39]
    assert integer_ticks(0, 3) == [0, 1, 2, 3]
    assert integer_ticks(5, 5) == [5]
    for last in range(1, 200):
        ticks = integer_ticks(0, last)
        gaps = {b - a for a, b in zip(ticks, ticks[1:])}
        assert len(ticks) <= 6 and ticks[0] == 0 and ticks[-1] <= last
        assert len(gaps - {min(gaps)}) <= 1  # one round step, and at most one shorter gap to the last layer


def test_layer_bars_of_eight_layers_in_a_small_pane_stay_apart():
    async def test(chart, pilot):
        chart.update_layers([0.5] * 8, total=8, target=None)
        await pilot.pause()
        lines = shown(chart).splitlines()
        bar_line = next(line for line in lines if "█" in line)
        blocks = [b for b in bar_line.split(" ") if "█" in b]
        assert len(blocks) == 8  # a blank column between each two bars: layers 0 to 2 are not one block

    with_chart(LayerChart(), test, pane=(38, 10))

"""Every chart of the TUI, drawn with plotext through textual-plotext.

- ``LayerChart``: one bar per compressed layer, filling in as layers finish,
  with the step's target as a horizontal line;
- ``TrialChart``: a search's trials and the best objective so far;
- ``CurveChart``: named lines, e.g. perplexity versus sparsity.

A repaint re-renders every point, so the charts plot at most ``MAX_POINTS``
per series (``downsample``), and an ``update_*`` call with the same data as
the last one returns at once, so screens may call it on every state change.
Settings suit small panes (an 80x24 terminal leaves a chart about 38x10
cells): a few integer ticks, no grid; colours follow the app's theme.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

from rich.text import Text
from textual_plotext import PlotextPlot

MAX_POINTS = 200
X_TICKS = 5  # at most this many labelled ticks on an x axis: more do not fit 38 columns
MARKERS = ("o", "x", "+", "*", "#", "@")  # one per series of a chart with markers
DIVERGED = 1e12  # the objective a search records for a diverged trial: plotted, it would flatten the rest


def downsample(points: Sequence[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most ``limit`` of ``points``, in their order: the first, the last, and each bucket's lowest and highest y.

    Keeping each bucket's extremes (rather than every n-th point) makes a
    spike or a dip survive however long the series grows.
    """
    points = list(points)
    if len(points) <= limit:
        return points
    if limit < 3:
        return [points[0], points[-1]][:max(limit, 0)]
    inner, buckets = points[1:-1], (limit - 2) // 2
    kept = [points[0]]
    for b in range(buckets):
        chunk = inner[b * len(inner) // buckets:(b + 1) * len(inner) // buckets]
        if not chunk:
            continue
        low = min(range(len(chunk)), key=lambda i: chunk[i][1])
        high = max(range(len(chunk)), key=lambda i: chunk[i][1])
        kept.extend(chunk[i] for i in sorted({low, high}))
    kept.append(points[-1])
    return kept


def integer_ticks(first: int, last: int, count: int = X_TICKS) -> list[int]:
    """Up to ``count`` integers from ``first``, evenly spaced by a round step (1, 2, 5, 10, 20, 50...), up to
    ``last``; ``last`` itself too when it is more than half a step past the last of them."""
    if last <= first:
        return [first]
    step = 1
    while (last - first) / step > count - 1:
        step = next(s for s in (2 * step, 5 * step // 2, 5 * step) if s > step and (str(s)[0] in "125"))
    ticks = list(range(first, last + 1, step))
    if last - ticks[-1] > step / 2:
        ticks.append(last)
    return ticks


class Chart(PlotextPlot):
    """A plot that redraws only when its input changes, and says so when it has nothing to show."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._last: Any = None

    def render(self):
        try:
            return super().render()
        except Exception:  # plotext fails on some sizes and data; a chart must never take the app down
            return Text("(this chart cannot be drawn at this size)", style="dim")

    def changed(self, key: Any) -> bool:
        """Whether ``key`` (the full input of an update) differs from the last; remembers it."""
        if key == self._last:
            return False
        self._last = key
        return True

    def start(self, title: str) -> None:
        """Forget the previous drawing (data, limits, ticks, labels) and set the title."""
        self.plt.clear_figure()
        self.plt.title(title)

    def empty(self, title: str, message: str) -> None:
        """An empty frame with ``message`` in its middle."""
        self.start(title)
        self.plt.xlim(0, 1)
        self.plt.ylim(0, 1)
        self.plt.xticks([])
        self.plt.yticks([])
        self.plt.text(message, 0.5, 0.5, alignment="center")
        self.refresh()


class LayerChart(Chart):
    """Per-layer bars (e.g. sparsity) that fill in layer by layer, a blank column between bars where there is room."""

    _args: tuple | None = None

    def bar_width(self, count: int) -> float:
        """The bars' width (a fraction of a layer's columns) that leaves at least one blank column between them."""
        columns = max(1, self.size.width - 6) / max(1, count)  # the plot beside its y axis labels
        if columns < 3:
            return 1.0  # too narrow for gaps: the bars touch rather than thin out to nothing
        return max(0.3, min(0.8, (columns - 2.2) / columns))

    def on_resize(self, event) -> None:
        if self._args is not None:  # the gaps depend on the width: draw the same data again
            values, total, target, title, ylabel, unit_range = self._args
            self.update_layers(values, total=total, target=target, title=title, ylabel=ylabel, unit_range=unit_range)

    def update_layers(self, values: Sequence[float | None], *, total: int | None = None, target: float | None = None,
                      title: str = "sparsity per layer", ylabel: str = "sparsity", unit_range: bool = True) -> None:
        """Bars at the layers with a value (``None``: not done yet).

        ``total`` (the model's layer count) fixes the x axis at 0..total-1
        from the start, so the chart fills in; ``target`` draws a horizontal
        line; the y axis spans 0..1 when every value (and the target) does,
        unless ``unit_range`` is off (small values such as errors get their own scale).
        """
        values = list(values)
        self._args = (values, total, target, title, ylabel, unit_range)
        if not self.changed((tuple(values), total, target, title, ylabel, unit_range, self.size.width)):
            return
        bars = [(i, float(v)) for i, v in enumerate(values) if v is not None]
        if not bars:
            self.empty(title, "waiting for the first layer")
            return
        self.start(title)
        plt = self.plt
        xs, ys = zip(*bars)
        count = max(total or 0, len(values))
        plt.bar(list(xs), list(ys), width=self.bar_width(count))
        plt.xlim(-0.5, count - 0.5)
        ticks = integer_ticks(0, count - 1)
        plt.xticks(ticks, [str(t) for t in ticks])
        if target is not None:
            plt.hline(target)
        if unit_range and all(0.0 <= y <= 1.0 for y in ys + ((target,) if target is not None else ())):
            plt.ylim(0, 1)
            plt.yticks([0, 0.5, 1])
        else:
            plt.yfrequency(3)
        if ylabel:
            plt.ylabel(ylabel)
        self.refresh()


class TrialChart(Chart):
    """A search's trials: each finished trial's objective, and the best so far."""

    def update_trials(self, trials: Sequence[tuple[int, float | None]], *,
                      title: str = "trials (objective, lower is better)", waiting: str | None = None) -> None:
        """``trials``: ``(number, objective)``; ``None`` (a failed or pruned trial) and diverged values are skipped.

        Trials are drawn by number; the line is the running minimum of the
        objectives in that order.
        """
        trials = [(int(n), o) for n, o in trials]
        if not self.changed((tuple(trials), title, waiting)):
            return
        finished = sorted((n, float(o)) for n, o in trials if o is not None and math.isfinite(o) and o < DIVERGED)
        if not finished:
            self.empty(title, "no finished trial yet" if trials else waiting or "no trials yet")
            return
        self.start(title)
        plt = self.plt
        numbers = [n for n, _ in finished]
        best = list(zip(numbers, itertools.accumulate((o for _, o in finished), min)))
        points = downsample(finished)
        plt.scatter([n for n, _ in points], [o for _, o in points], marker="dot")
        line = downsample(best)
        plt.plot([n for n, _ in line], [o for _, o in line])
        ticks = integer_ticks(numbers[0], numbers[-1])
        plt.xticks(ticks, [str(t) for t in ticks])
        plt.yfrequency(3)
        self.refresh()


class CurveChart(Chart):
    """One line per named series (e.g. perplexity versus sparsity for several methods)."""

    def update_series(self, series: Mapping[str, Sequence[tuple[float, float]]], *, title: str = "", xlabel: str = "",
                      ylabel: str = "", logy: bool = False, markers: bool = False) -> None:
        """Draw each series as a line, labelled by its name when there are several.

        With ``logy`` the y axis is logarithmic and points with y <= 0 are
        left out. With ``markers`` each series' points get a marker of their
        own (``MARKERS``) and the legend names every series, even a single one.
        """
        # plotext's own log scale transforms the data in place at every build (each repaint), so the
        # logarithm is taken here and the ticks are labelled with the original values.
        series = {name: [(float(x), float(y)) for x, y in points] for name, points in series.items()}
        if not self.changed((tuple((n, tuple(p)) for n, p in series.items()), title, xlabel, ylabel, logy, markers)):
            return
        drawn = {name: [(x, y) for x, y in points if math.isfinite(y) and (y > 0 or not logy)]
                 for name, points in series.items()}
        drawn = {name: points for name, points in drawn.items() if points}
        if not drawn:
            self.empty(title, "no data yet")
            return
        if logy:
            drawn = {name: [(x, math.log10(y)) for x, y in points] for name, points in drawn.items()}
        self.start(title)
        plt = self.plt
        for i, (name, points) in enumerate(drawn.items()):
            points = downsample(points)
            xs, ys = [x for x, _ in points], [y for _, y in points]
            if markers:
                plt.plot(xs, ys, marker="braille")
                plt.scatter(xs, ys, marker=MARKERS[i % len(MARKERS)], label=f"{MARKERS[i % len(MARKERS)]} {name}")
            else:
                plt.plot(xs, ys, marker="braille", label=name if len(drawn) > 1 else None)
        plt.xfrequency(X_TICKS)
        if logy:
            ys = [y for points in drawn.values() for _, y in points]
            low, high = min(ys), max(ys)
            ticks = [low + (high - low) * i / 2 for i in range(3)] if high > low else [low]
            plt.yticks(ticks, [f"{10 ** t:.3g}" for t in ticks])
        else:
            plt.yfrequency(3)
        if xlabel:
            plt.xlabel(xlabel)
        if ylabel:
            plt.ylabel(ylabel)
        self.refresh()

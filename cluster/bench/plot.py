"""Charts of `semipd bench serve` results (`semipd bench plot`): SLO attainment and P90 TTFT/TPOT against
request rate, one line per label (bars per label, with goodput, for one window of several configurations).
matplotlib is imported only when a figure is drawn, and without pyplot (no global state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cluster.bench.metrics import SLOs, percentile_key
from cluster.bench.result import BenchResult
from cluster.bench.sweep import metrics_under, rate_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NO_SLO_TEXT = "no SLO given\n(--goodput)"


class _Point(NamedTuple):
    rate: float
    attainment_pct: float | None
    goodput: float | None
    ttft_ms: float
    tpot_ms: float


def plot_results(results: Sequence[BenchResult], out: str | Path, slos: SLOs | None = None,
                 percentile: float = 90.0, rate_axis: str = "configured") -> Path:
    """One PNG of `results_figure`."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    results_figure(results, slos, percentile, rate_axis).savefig(path, format="png", dpi=100)
    return path


def results_figure(results: Sequence[BenchResult], slos: SLOs | None = None, percentile: float = 90.0,
                   rate_axis: str = "configured") -> Figure:
    """SLO attainment (%), P90 TTFT and P90 TPOT (ms) against request rate (`rate_of` on `rate_axis`), one line per label
    (runs with the same label form a sweep). When every label ran once at one and the same rate
    (one window of several configurations, such as a shifting load), bars per label instead, with
    goodput beside attainment. `slos` overrides the targets stored in the results (attainment is
    recomputed from the records)."""
    if not results:
        raise ValueError("no results to plot")
    series: dict[str, list[_Point]] = {}
    for r in results:
        m = metrics_under(r, slos, (percentile,))
        series.setdefault(r.label or "run", []).append(_Point(
            rate_of(r, rate_axis), m.slo_attainment_pct, m.request_goodput, m.distributions["ttft"].percentile(percentile),
            m.distributions["tpot"].percentile(percentile)))
    rates = {p.rate for points in series.values() for p in points}
    one_window = len(series) > 1 and len(rates) == 1 and all(len(points) == 1 for points in series.values())
    fig = _bar_figure(series, percentile) if one_window else _line_figure(series, percentile, rate_axis)
    if slos is not None and slos.active:
        fig.suptitle("SLOs: " + ", ".join(f"{k} {v:g} ms" for k, v in slos.as_dict().items()))
    return fig


def _line_figure(series: dict[str, list[_Point]], percentile: float, rate_axis: str) -> Figure:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    p = percentile_key(percentile)
    for ax, title in zip(axes, ("SLO attainment (%)", f"P{p} TTFT (ms)", f"P{p} TPOT (ms)")):
        ax.set_title(title)
        ax.set_xlabel(f"{rate_axis} request rate (req/s)")
        ax.grid(True, alpha=0.3)
    any_slo = False
    for label, points in series.items():
        points.sort(key=lambda t: t.rate)
        xs = [t.rate for t in points]
        att = [t.attainment_pct for t in points]
        if all(a is not None for a in att):
            any_slo = True
            axes[0].plot(xs, att, marker="o", label=label)
        axes[1].plot(xs, [t.ttft_ms for t in points], marker="o", label=label)
        axes[2].plot(xs, [t.tpot_ms for t in points], marker="o", label=label)
    if any_slo:
        axes[0].set_ylim(0, 105)
    else:
        axes[0].text(0.5, 0.5, NO_SLO_TEXT, ha="center", va="center", transform=axes[0].transAxes)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig


def _bar_figure(series: dict[str, list[_Point]], percentile: float) -> Figure:
    from matplotlib.figure import Figure

    labels = list(series)
    points = [series[label][0] for label in labels]
    fig = Figure(figsize=(max(12.0, 2.2 * len(labels)), 5.0), layout="constrained")
    axes = fig.subplots(1, 4)
    p = percentile_key(percentile)
    panels = (("SLO attainment (%)", [t.attainment_pct for t in points]),
              ("goodput (req/s)", [t.goodput for t in points]),
              (f"P{p} TTFT (ms)", [t.ttft_ms for t in points]),
              (f"P{p} TPOT (ms)", [t.tpot_ms for t in points]))
    for ax, (title, values) in zip(axes, panels):
        ax.set_title(f"{title} at {points[0].rate:g} req/s")
        ax.grid(True, axis="y", alpha=0.3)
        if any(v is None for v in values):
            ax.text(0.5, 0.5, NO_SLO_TEXT, ha="center", va="center", transform=ax.transAxes)
            continue
        ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    return fig


__all__ = ["plot_results", "results_figure"]

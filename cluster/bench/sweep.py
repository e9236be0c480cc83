"""Runs compared across request rates: where each run sits on a request-rate axis (`rate_of`: the rate
configured, or the rate its requests were offered at), its metrics under common SLOs and percentiles
(`metrics_under`), and per label (runs with the same label form a sweep) the highest rate it sustained
within the SLOs (`sustained_rates`, printed as a markdown table by `format_sustained_rates`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.bench.metrics import BenchMetrics, SLOs, compute_metrics
from cluster.bench.result import BenchResult
from cluster.bench.traffic import offered_load

RATE_AXES = ("configured", "offered")


def rate_of(result: BenchResult, axis: str = "configured") -> float:
    """Where `result` sits on a request-rate axis. `configured`: the rate asked for (for an infinite one, the
    achieved request throughput); `offered`: the rate its requests were sent at over the span of their
    arrivals (`offered_load`). A short Poisson window can land far from its configured rate (H200 run 19,
    15 s windows: configured 35 req/s offered 31.4, below configured 30's 30.9), and every server measured on
    the same seeds saw the same offered rate, so comparisons across rates read right on the offered axis."""
    if axis not in RATE_AXES:
        raise ValueError(f"unknown rate axis {axis!r}; choose from {', '.join(RATE_AXES)}")
    if axis == "configured":
        return result.metrics.request_throughput if math.isinf(result.request_rate) else result.request_rate
    load = offered_load(result.records)
    if load is None:
        raise ValueError(f"{result.label or 'run'} at {result.request_rate:g} req/s has fewer than two request "
                         f"records with distinct send times: its offered rate is unknown")
    return load[0]


def metrics_under(result: BenchResult, slos: SLOs | None, percentiles: Sequence[float] = (90.0,)) -> BenchMetrics:
    """`result`'s metrics under `slos` (None: its own) and `percentiles`: recomputed from its records,
    or its saved aggregates when it has none and they answer the question."""
    if result.records or result.metrics.num_requests == 0:
        return compute_metrics(result.records, result.metrics.duration_s, slos or result.slos, percentiles)
    stored = {p for p, _ in result.metrics.distributions["ttft"].percentiles}
    if (slos is None or slos == result.slos) and set(percentiles) <= stored:
        return result.metrics
    raise ValueError(f"{result.label or 'run'} at {rate_of(result):g} req/s was saved without its per-request records: "
                     f"only its own SLOs ({result.slos.as_dict() or 'none'}) and percentiles {sorted(stored)} apply")


@dataclass(frozen=True)
class SustainedRate:
    """The highest request rate a label's sweep kept within the SLOs at `attainment_pct`.

    `last_passing`: the highest swept rate below which every swept rate passed (None: the
    lowest already failed); `crossing`: where attainment falls through the target, linearly
    interpolated between that rate and the next one (== last_passing when no rate failed).
    """

    label: str
    attainment_pct: float
    last_passing: float | None
    crossing: float | None
    points: tuple[tuple[float, float], ...]  # (rate, attainment %) in rate order


def sustained_rates(results: Sequence[BenchResult], slos: SLOs | None = None, attainment_pct: float = 90.0,
                    rate_axis: str = "configured") -> list[SustainedRate]:
    """Per label, the sustained rate at `attainment_pct` (see `SustainedRate`) on `rate_axis` (`rate_of`), in
    first-seen label order."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        targets = slos if slos is not None else r.slos
        if not targets.active:
            raise ValueError(f"result {r.label or 'run'!r} at rate {rate_of(r):g} has no SLOs; pass --goodput")
        m = metrics_under(r, slos)
        series.setdefault(r.label or "run", []).append((rate_of(r, rate_axis), float(m.slo_attainment_pct or 0.0)))
    out = []
    for label, points in series.items():
        points.sort()
        passing, crossing = None, None
        for i, (rate, att) in enumerate(points):
            if att < attainment_pct:
                if passing is not None:
                    lo_rate, lo_att = points[i - 1]
                    crossing = lo_rate + (rate - lo_rate) * (lo_att - attainment_pct) / (lo_att - att)
                break
            passing = crossing = rate
        out.append(SustainedRate(label, attainment_pct, passing, crossing, tuple(points)))
    return out


def format_sustained_rates(rates: Sequence[SustainedRate]) -> str:
    """A markdown table: label, sustained rate, and attainment at each swept rate."""
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    pct = f"{rates[0].attainment_pct:g}" if rates else "90"
    lines = [f"| run | highest passing rate (req/s) | rate at {pct}% (interpolated) | attainment % by rate |",
             "|---|---|---|---|"]
    for s in rates:
        by_rate = ", ".join(f"{rate:.4g}: {att:.0f}" for rate, att in s.points)
        lines.append(f"| {s.label} | {num(s.last_passing)} | {num(s.crossing)} | {by_rate} |")
    return "\n".join(lines)


__all__ = ["RATE_AXES", "SustainedRate", "format_sustained_rates", "metrics_under", "rate_of", "sustained_rates"]

"""Aggregates of a benchmark run, as `vllm bench serve` computes them, plus SLO attainment.

- TTFT: first output chunk after the request was sent; E2EL: send to the last output chunk (vLLM's
  latency: the usage chunk and [DONE] after it do not count).
- TPOT per request: (E2EL - TTFT) / (output_tokens - 1), only for outputs of 2+ tokens.
- ITL: every gap between consecutive output chunks, pooled over requests.
- Peaks (vLLM's): output chunks per whole second counted from the first completed request's send, and the
  most completed requests in flight at once over their [send, last output chunk) intervals.
- Goodput: successful requests meeting every given SLO (`--goodput ttft:MS tpot:MS
  e2el:MS`, TPOT counts as 0 for one-token outputs), per second of the run.
- SLO attainment: the percentage of *all* sent requests meeting every SLO (failed
  requests count as misses).
- Correct rate (structured outputs, vLLM's correct_rate): the percentage of completed requests whose
  output ended with "stop" and matches what was asked; outputs cut at max_tokens are counted apart.
Percentiles are numpy's (linear interpolation); a metric without samples reads 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.bench.client import RequestRecord

METRICS: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
SLO_KEYS: tuple[str, ...] = ("ttft", "tpot", "e2el")


class MetricsError(ValueError):
    """An invalid metric or SLO setting (CLI exit 2)."""


@dataclass(frozen=True)
class SLOs:
    """Latency targets in milliseconds; None means not part of the goodput definition."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def __post_init__(self) -> None:
        for key, value in self.as_dict().items():
            if not (math.isfinite(value) and value > 0):
                raise MetricsError(f"goodput SLO {key} must be a positive number of ms, got {value}")

    @classmethod
    def parse(cls, items: Sequence[str]) -> SLOs:
        """['ttft:500', 'tpot:50'] -> SLOs (keys ttft, tpot, e2el; values in ms)."""
        values: dict[str, float] = {}
        for item in items:
            key, sep, value = item.partition(":")
            key = key.strip().lower()
            if not sep or key not in SLO_KEYS:
                raise MetricsError(f"goodput item {item!r} must be KEY:MS with KEY in {', '.join(SLO_KEYS)}")
            if key in values:
                raise MetricsError(f"goodput SLO {key} given twice")
            try:
                values[key] = float(value)
            except ValueError:
                raise MetricsError(f"goodput item {item!r}: {value!r} is not a number") from None
        return cls(**{f"{k}_ms": v for k, v in values.items()})

    @classmethod
    def from_dict(cls, data: dict[str, float] | None) -> SLOs:
        return cls(**{f"{k}_ms": float(v) for k, v in (data or {}).items() if k in SLO_KEYS})

    def as_dict(self) -> dict[str, float]:
        """{'ttft': ms, ...} for the targets that are set."""
        pairs = {"ttft": self.ttft_ms, "tpot": self.tpot_ms, "e2el": self.e2el_ms}
        return {k: v for k, v in pairs.items() if v is not None}

    @property
    def active(self) -> bool:
        return bool(self.as_dict())

    def met(self, record: RequestRecord) -> bool:
        """Whether a request succeeded and met every target that is set."""
        return record.success and not self.missed(record)

    def missed(self, record: RequestRecord) -> set[str]:
        """The targets that are set and that `record` missed ("ttft", "tpot", "e2el"); a latency the record
        lacks (one token: no TPOT) misses none."""
        observed = {"ttft": record.ttft_s or 0.0, "tpot": record.tpot_s or 0.0, "e2el": record.e2el_s or 0.0}
        return {k for k, slo in self.as_dict().items() if observed[k] * 1000.0 > slo}


def parse_percentiles(text: str) -> tuple[float, ...]:
    """'90,99' -> (90.0, 99.0); each in (0, 100]."""
    out: list[float] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            p = float(item)
        except ValueError:
            raise MetricsError(f"percentile {item!r} is not a number") from None
        if not (0 < p <= 100):
            raise MetricsError(f"percentiles must be in (0, 100], got {item}")
        out.append(p)
    if not out:
        raise MetricsError("give at least one percentile")
    return tuple(out)


def parse_metric_names(text: str) -> tuple[str, ...]:
    """'ttft,tpot,itl' -> names; each one of METRICS."""
    names = tuple(s.strip().lower() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise MetricsError(f"percentile metrics must be a comma list of {', '.join(METRICS)}, got {text!r}")
    return names


def percentile_key(p: float) -> str:
    """90 -> '90', 99.9 -> '99.9' (vLLM's naming: P99 TTFT, p99_ttft_ms)."""
    return str(int(p)) if int(p) == p else str(p)


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency metric, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, values_ms: Sequence[float], percentiles: Sequence[float]) -> Distribution:
        arr = np.asarray(values_ms, dtype=float)
        if arr.size == 0:
            return cls(0.0, 0.0, 0.0, tuple((float(p), 0.0) for p in percentiles))
        return cls(float(arr.mean()), float(np.median(arr)), float(arr.std()),
                   tuple((float(p), float(np.percentile(arr, p))) for p in percentiles))

    def percentile(self, p: float) -> float:
        for q, v in self.percentiles:
            if q == p:
                return v
        raise KeyError(f"percentile {p} was not computed")


@dataclass(frozen=True)
class BenchMetrics:
    """Aggregates of one run (one request rate)."""

    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input: int
    total_output: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    peak_output_throughput: float
    peak_concurrency: int
    request_goodput: float | None
    slo_attainment_pct: float | None
    distributions: dict[str, Distribution] = field(default_factory=dict)

    def to_flat(self) -> dict[str, Any]:
        """vLLM's result-JSON keys: completed, request_throughput, mean_ttft_ms, p99_ttft_ms, ..."""
        out: dict[str, Any] = {
            "duration": self.duration_s,
            "num_requests": self.num_requests,
            "completed": self.completed,
            "failed": self.failed,
            "total_input_tokens": self.total_input,
            "total_output_tokens": self.total_output,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "slo_attainment_pct": self.slo_attainment_pct,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_output_tokens_per_s": self.peak_output_throughput,
            "max_concurrent_requests": self.peak_concurrency,
        }
        for name, dist in self.distributions.items():
            out[f"mean_{name}_ms"] = dist.mean
            out[f"median_{name}_ms"] = dist.median
            out[f"std_{name}_ms"] = dist.std
            for p, v in dist.percentiles:
                out[f"p{percentile_key(p)}_{name}_ms"] = v
        return out

    @classmethod
    def from_flat(cls, data: dict[str, Any], percentiles: Sequence[float]) -> BenchMetrics:
        """The inverse of `to_flat` (a result saved without its per-request records)."""
        return cls(
            num_requests=int(data["num_requests"]), completed=int(data["completed"]), failed=int(data["failed"]),
            duration_s=float(data["duration"]), total_input=int(data["total_input_tokens"]),
            total_output=int(data["total_output_tokens"]), request_throughput=float(data["request_throughput"]),
            output_throughput=float(data["output_throughput"]),
            total_token_throughput=float(data["total_token_throughput"]),
            peak_output_throughput=float(data["max_output_tokens_per_s"]),
            peak_concurrency=int(data["max_concurrent_requests"]), request_goodput=data.get("request_goodput"),
            slo_attainment_pct=data.get("slo_attainment_pct"),
            distributions={
                name: Distribution(float(data[f"mean_{name}_ms"]), float(data[f"median_{name}_ms"]),
                                   float(data[f"std_{name}_ms"]),
                                   tuple((float(p), float(data[f"p{percentile_key(p)}_{name}_ms"])) for p in percentiles))
                for name in METRICS if f"mean_{name}_ms" in data
            },
        )


@dataclass(frozen=True)
class Conformance:
    """The completed outputs of a structured-output run: conforming (ended with "stop" and match), cut at
    max_tokens (finish "length": never conforming), and invalid (the rest)."""

    completed: int
    conforming: int
    length_cut: int

    def __post_init__(self) -> None:
        if not 0 <= self.conforming + self.length_cut <= self.completed:
            raise MetricsError(f"conforming {self.conforming} + length-cut {self.length_cut} outputs exceed the "
                               f"{self.completed} completed")

    @property
    def invalid(self) -> int:
        return self.completed - self.conforming - self.length_cut

    @property
    def correct_rate(self) -> float:
        """Conforming / completed, in percent (0 when none completed)."""
        return 100.0 * self.conforming / self.completed if self.completed else 0.0

    @classmethod
    def of(cls, records: Sequence[RequestRecord]) -> Conformance:
        ok = [r for r in records if r.success]
        return cls(completed=len(ok), conforming=sum(1 for r in ok if r.conforms),
                   length_cut=sum(1 for r in ok if not r.conforms and r.finish_reason == "length"))

    def to_dict(self) -> dict[str, int]:
        return {"conforming": self.conforming, "invalid": self.invalid, "length_cut": self.length_cut}

    @classmethod
    def from_dict(cls, data: dict[str, int], completed: int) -> Conformance:
        return cls(completed, int(data["conforming"]), int(data["length_cut"]))


def _peak_output_rate(ok: Sequence[RequestRecord]) -> float:
    """Most output chunks of the completed requests `ok` in any whole second counted from the first one's send
    (vLLM's peak output throughput)."""
    times: list[float] = []
    for r in ok:
        if r.ttft_s is not None:
            first = r.start_s + r.ttft_s
            times.append(first)
            times.extend((first + np.cumsum(r.itl_s)).tolist())
    if not times:
        return 0.0
    origin = min(r.start_s for r in ok)
    return float(np.bincount(np.floor(np.asarray(times) - origin).astype(np.int64)).max())


def _peak_concurrency(ok: Sequence[RequestRecord]) -> int:
    """Most of the completed requests `ok` in flight at once over [send, last output chunk), a departure before
    an arrival at the same instant (vLLM's peak concurrent requests)."""
    spans = [(r.start_s, r.start_s + r.e2el_s) for r in ok if r.e2el_s is not None]
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def compute_metrics(records: Sequence[RequestRecord], duration_s: float, slos: SLOs = SLOs(),
                    percentiles: Sequence[float] = (90.0, 99.0)) -> BenchMetrics:
    """Aggregate `records` of a run that lasted `duration_s` seconds."""
    if duration_s <= 0:
        raise MetricsError(f"duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    total_input = sum(r.input_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    good = sum(1 for r in records if slos.met(r)) if slos.active else None
    samples = {
        "ttft": [r.ttft_s * 1000 for r in ok if r.ttft_s is not None],
        "tpot": [t * 1000 for r in ok if (t := r.tpot_s) is not None],
        "itl": [g * 1000 for r in ok for g in r.itl_s],
        "e2el": [r.e2el_s * 1000 for r in ok if r.e2el_s is not None],
    }
    return BenchMetrics(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input=total_input,
        total_output=total_output,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        peak_output_throughput=_peak_output_rate(ok),
        peak_concurrency=_peak_concurrency(ok),
        request_goodput=None if good is None else good / duration_s,
        slo_attainment_pct=None if good is None else 100.0 * good / max(len(records), 1),
        distributions={name: Distribution.of(samples[name], percentiles) for name in METRICS},
    )


__all__ = [
    "BenchMetrics", "Conformance", "Distribution", "METRICS", "METRIC_LABELS", "MetricsError", "SLOs",
    "compute_metrics", "parse_metric_names", "parse_percentiles", "percentile_key",
]

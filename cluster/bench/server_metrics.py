"""What the server's own metrics say about a run: the change of its Prometheus series over the run
(`BenchResult.server_metrics["delta"]`) summed up per engine worker (`worker_iterations`: iterations, their wall
and host time, tokens), per engine (`cuda_allocator_counts`: CUDA allocator calls; `kv_handoffs`: a disagg
engine's requests moved from prefill to decode, their KV bytes and times) and over the server
(`prefix_cache_counts`: prompt tokens queried and hit in the prefix cache). Each is empty or None for a
server that does not export the series.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from cluster.bench.result import BenchResult


def _series_labels(series: str) -> dict[str, str]:
    """The labels of a Prometheus series key such as 'name{engine="g0",worker="decode"}'."""
    return dict(re.findall(r'(\w+)="([^"]*)"', series))


@dataclass(frozen=True)
class WorkerIterations:
    """One engine worker's iterations during a run, from the server's counters."""

    count: float
    mean_ms: float  # wall time per iteration, host work included
    launch_ms: float  # of which host time queueing the iteration on the device
    tokens: float  # tokens computed per iteration
    launch_parts_ms: dict[str, float] = field(default_factory=dict)  # host time by part, per iteration
    quantiles_ms: dict[int, float] = field(default_factory=dict)  # P50, P90: the histogram bucket bound at or above
    paced_ms: float = 0.0  # time waiting for the worker's pace, per iteration
    over_100ms: float = 0.0  # iterations longer than 100 ms: for decode, stalls (run 30: up to 280 ms on the H100)


def iterations_over(buckets: Mapping[float, float], bound_s: float) -> float:
    """From cumulative histogram counts (upper bound in s -> count), how many are past `bound_s`, one of the
    bounds (0: no counts, or no such bound)."""
    if bound_s not in buckets:
        return 0.0
    return buckets[max(buckets)] - buckets[bound_s]


def iteration_quantiles(buckets: Mapping[float, float], qs: Sequence[int] = (50, 90),
                        scale: float = 1e3) -> dict[int, float]:
    """From cumulative histogram counts (upper bound in s -> count), the bound (ms; times `scale` for bounds in
    another unit) that each percentile of `qs` falls at or under (inf: past the last finite bound); {} without
    counts."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return {}
    return {q: scale * next(b for b in bounds if buckets[b] >= total * q / 100) for q in qs}


def worker_iterations(result: BenchResult) -> dict[tuple[str, str], WorkerIterations]:
    """(engine, worker) -> its iterations during the run, from the server's `semipd:worker_iteration_seconds`
    histogram (or summary) and `semipd:worker_{tokens,launch_seconds,launch_part_seconds,paced_seconds}_total` counters
    (empty for servers without them)."""
    delta = (result.server_metrics or {}).get("delta") or {}
    parts: dict[tuple[str, str], dict[str, float]] = {}
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for series, value in delta.items():
        key = _series_labels(series)
        worker = (key.get("engine", "?"), key.get("worker", "?"))
        if series.startswith("semipd:worker_launch_part_seconds_total{") and value > 0:
            parts.setdefault(worker, {})[key.get("part", "?")] = value
        elif series.startswith("semipd:worker_iteration_seconds_bucket{"):
            buckets.setdefault(worker, {})[float(key["le"])] = value
    out: dict[tuple[str, str], WorkerIterations] = {}
    for series, count in delta.items():
        if not series.startswith("semipd:worker_iteration_seconds_count{") or count <= 0:
            continue
        labels = series[series.index("{"):]
        per_iteration = {name: delta.get(f"semipd:worker_{name}{labels}", 0.0) / count
                         for name in ("iteration_seconds_sum", "launch_seconds_total", "tokens_total",
                                      "paced_seconds_total")}
        key = _series_labels(labels)
        worker = (key.get("engine", "?"), key.get("worker", "?"))
        out[worker] = WorkerIterations(
            count, 1e3 * per_iteration["iteration_seconds_sum"], 1e3 * per_iteration["launch_seconds_total"],
            per_iteration["tokens_total"],
            {part: 1e3 * seconds / count for part, seconds in sorted(parts.get(worker, {}).items())},
            iteration_quantiles(buckets.get(worker, {})), 1e3 * per_iteration["paced_seconds_total"],
            iterations_over(buckets.get(worker, {}), 0.1))
    return out


class AllocatorCounts(NamedTuple):
    """CUDA allocator calls of one engine's process during a run."""

    mallocs: float
    retries: float  # of the mallocs, those retried after freeing torch's cache
    frees: float
    host_allocs: float | None  # cudaHostAlloc (None: a server from before this counter)


def cuda_allocator_counts(result: BenchResult) -> dict[str, AllocatorCounts]:
    """engine -> its allocator calls during the run, from the server's `semipd:cuda_*` counters (empty for servers
    without them)."""
    delta = (result.server_metrics or {}).get("delta") or {}
    out: dict[str, AllocatorCounts] = {}
    for series, retries in delta.items():
        if series.startswith("semipd:cuda_alloc_retries_total{"):
            engine = _series_labels(series).get("engine", "?")
            mallocs, frees, host = (delta.get(series.replace("semipd:cuda_alloc_retries_total{",
                                                             f"semipd:{name}_total{{", 1))
                                    for name in ("cuda_mallocs", "cuda_frees", "cuda_host_allocs"))
            out[engine] = AllocatorCounts(mallocs or 0.0, retries, frees or 0.0, host)
    return out


@dataclass(frozen=True)
class KVHandoffs:
    """One disagg engine's handoffs (prefill -> decode) during a run, from the server's histograms."""

    count: float  # requests handed over
    kv_bytes: float  # KV bytes moved
    transfer_ms: float  # mean time from the first token until the KV was on the decode device
    handoff_ms: float  # mean time from the first token until the request joined the decode batch
    transfer_quantiles_ms: dict[int, float] = field(default_factory=dict)  # P50, P90: bucket bound at or above
    handoff_quantiles_ms: dict[int, float] = field(default_factory=dict)


def kv_handoffs(result: BenchResult) -> dict[str, KVHandoffs]:
    """engine -> its handoffs during the run, from `semipd:kv_{transfer,handoff}_seconds` and
    `semipd:kv_transfer_bytes_total` (empty for servers without them: semi-PD, unified, vLLM)."""
    delta = (result.server_metrics or {}).get("delta") or {}
    transfer = _buckets_by_engine(delta, "semipd:kv_transfer_seconds")
    handoff = _buckets_by_engine(delta, "semipd:kv_handoff_seconds")
    return {engine: KVHandoffs(count, delta.get(f"semipd:kv_transfer_bytes_total{labels}", 0.0),
                               1e3 * delta.get(f"semipd:kv_transfer_seconds_sum{labels}", 0.0) / count,
                               1e3 * delta.get(f"semipd:kv_handoff_seconds_sum{labels}", 0.0) / count,
                               iteration_quantiles(transfer.get(engine, {})),
                               iteration_quantiles(handoff.get(engine, {})))
            for labels, engine, count in _observed(delta, "semipd:kv_handoff_seconds")}


@dataclass(frozen=True)
class AdmissionRatios:
    """One engine's admitted requests during a run, by their TTFT over the TTFT admission predicted for them."""

    count: float  # requests admitted at their own priority that had their first token
    mean: float  # mean ratio
    over_one: float  # share of them later than predicted (ratio past 1)
    quantiles: dict[int, float] = field(default_factory=dict)  # P50, P90: bucket bound at or above


def admission_ratios(result: BenchResult) -> dict[str, AdmissionRatios]:
    """engine -> its admission predictions during the run, from `semipd:admission_ttft_ratio` (empty for
    servers without admission control)."""
    delta = (result.server_metrics or {}).get("delta") or {}
    buckets = _buckets_by_engine(delta, "semipd:admission_ttft_ratio")
    return {engine: AdmissionRatios(count, delta.get(f"semipd:admission_ttft_ratio_sum{labels}", 0.0) / count,
                                    1 - buckets.get(engine, {}).get(1.0, 0.0) / count,
                                    iteration_quantiles(buckets.get(engine, {}), scale=1.0))
            for labels, engine, count in _observed(delta, "semipd:admission_ttft_ratio")}


def _observed(delta: Mapping[str, float], histogram: str) -> Iterator[tuple[str, str, float]]:
    """(labels, engine, count) of each series of `histogram` with observations during the run."""
    for series, count in delta.items():
        if series.startswith(f"{histogram}_count{{") and count > 0:
            labels = series[series.index("{"):]
            yield labels, _series_labels(labels).get("engine", "?"), count


def _buckets_by_engine(delta: Mapping[str, float], histogram: str) -> dict[str, dict[float, float]]:
    """engine -> `histogram`'s cumulative counts during the run, by upper bound."""
    out: dict[str, dict[float, float]] = {}
    for series, value in delta.items():
        if series.startswith(f"{histogram}_bucket{{"):
            key = _series_labels(series)
            out.setdefault(key.get("engine", "?"), {})[float(key["le"])] = value
    return out


def prefix_cache_counts(result: BenchResult) -> tuple[float, float] | None:
    """(prompt tokens queried, of which hit) in the server's prefix cache during the run, over all its engines,
    from the `vllm:prefix_cache_{queries,hits}_total` counters that semipd and vLLM export (None without them)."""
    delta = (result.server_metrics or {}).get("delta") or {}
    sums: dict[str, float] = {}
    for series, value in delta.items():
        name = series.split("{", 1)[0]
        if name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            sums[name] = sums.get(name, 0.0) + value
    if "vllm:prefix_cache_queries_total" not in sums:
        return None
    return sums["vllm:prefix_cache_queries_total"], sums.get("vllm:prefix_cache_hits_total", 0.0)


__all__ = [
    "AdmissionRatios", "AllocatorCounts", "KVHandoffs", "WorkerIterations", "admission_ratios", "cuda_allocator_counts",
    "iteration_quantiles", "iterations_over", "kv_handoffs", "prefix_cache_counts", "worker_iterations",
]

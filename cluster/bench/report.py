"""Results of a benchmark run: the printed block (vLLM's), the JSON file, and plots.

`BenchResult` is one run at one request rate. Its JSON carries vLLM's flat keys at the
top level (completed, request_throughput, mean_ttft_ms, p99_ttft_ms, ...) so existing
scripts read it, plus the config, the goodput SLOs, the per-request records, server-side
metrics and a label; `BenchResult.from_json` rebuilds it (aggregates recomputed from the
records). `plot_results` draws SLO attainment and P90 TTFT/TPOT against request rate,
one line per label (bars per label for one window of several configurations).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from cluster.bench.client import RequestRecord
from cluster.bench.metrics import METRIC_LABELS, METRICS, BenchMetrics, SLOs, compute_metrics, percentile_key
from cluster.bench.workloads import Phase, time_shares

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCHEMA = "semipd-bench-serve/1"
WIDTH = 50


@dataclass
class BenchResult:
    """One run at one request rate."""

    label: str
    date: str
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    slos: SLOs
    percentile_metrics: tuple[str, ...]
    metric_percentiles: tuple[float, ...]
    records: list[RequestRecord]
    metrics: BenchMetrics
    config: dict[str, Any] = field(default_factory=dict)
    server_metrics: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    split_changes: list[dict[str, Any]] | None = None  # semipd servers: SM split changes during the run

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "label": self.label,
            "date": self.date,
            "request_rate": _num(self.request_rate),
            "burstiness": self.burstiness,
            "max_concurrency": self.max_concurrency,
            "goodput": self.slos.as_dict(),
            "percentile_metrics": list(self.percentile_metrics),
            "metric_percentiles": list(self.metric_percentiles),
            **self.metrics.to_flat(),
            "by_profile": profile_breakdown(self),
            "config": _jsonable(self.config),
            "metadata": dict(self.metadata),
            "server_metrics": self.server_metrics,
            "split_changes": self.split_changes,
            "requests": [r.to_dict() for r in self.records],
        }
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        """Rebuild a result written by `to_json` (ValueError when it is not one). Without its
        "requests" (records left out to keep a file small) the saved aggregates are used."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a semipd bench serve result (schema {data.get('schema')!r})")
        records = [RequestRecord.from_dict(r) for r in data.get("requests", ())]
        slos = SLOs.from_dict(data.get("goodput"))
        percentiles = tuple(float(p) for p in data["metric_percentiles"])
        metrics = (compute_metrics(records, float(data["duration"]), slos, percentiles) if "requests" in data
                   else BenchMetrics.from_flat(data, percentiles))
        return cls(
            label=data.get("label", ""),
            date=data.get("date", ""),
            request_rate=float(data["request_rate"]),
            burstiness=float(data.get("burstiness", 1.0)),
            max_concurrency=data.get("max_concurrency"),
            slos=slos,
            percentile_metrics=tuple(data["percentile_metrics"]),
            metric_percentiles=percentiles,
            records=records,
            metrics=metrics,
            config=data.get("config", {}),
            server_metrics=data.get("server_metrics"),
            metadata=data.get("metadata", {}),
            split_changes=data.get("split_changes"),
        )


def _num(x: float) -> float | str:
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _num(obj)
    return obj


def write_result(result: BenchResult, path: Path) -> Path:
    """Write the result JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
    return path


def load_result(path: str | Path) -> BenchResult:
    """Read a result JSON written by `write_result`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"result file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON: {e}") from None
    try:
        return BenchResult.from_json(data)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{p}: malformed result ({e})") from None


# ---------------------------------------------------------------- text


def _line(name: str, value: float | int | None, fmt: str = ".2f") -> str:
    text = "None" if value is None else format(value, fmt)
    return "{:<40} {:<10}".format(name, text)


def format_preamble(request_rate: float, burstiness: float, max_concurrency: int | None,
                    phases: Sequence[Phase] = ()) -> str:
    """The lines vLLM prints before sending: rate, burstiness, concurrency; and the rate of each phase of a
    shifting workload whose phases arrive at different rates."""
    kind = "Poisson process" if burstiness == 1.0 else "Gamma distribution"
    lines = [
        f"Traffic request rate: {request_rate}",
        f"Burstiness factor: {burstiness} ({kind})",
        f"Maximum request concurrency: {max_concurrency}",
    ]
    if any(p.rate_scale != 1.0 for p in phases):
        lines.append("Phase rates: " + ", ".join(
            f"{p.name} {request_rate * p.rate_scale:g} req/s for {share:.0%} of the time"
            for share, p in zip(time_shares(phases), phases)))
    return "\n".join(lines)


def format_result_block(result: BenchResult) -> str:
    """The `vllm bench serve` result block, line for line, plus SLO attainment."""
    m = result.metrics
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=WIDTH, c="=")]
    lines.append(_line("Successful requests:", m.completed, "d"))
    lines.append(_line("Failed requests:", m.failed, "d"))
    if result.max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", result.max_concurrency, "d"))
    if not math.isinf(result.request_rate):
        lines.append(_line("Request rate configured (RPS):", result.request_rate))
    lines.append(_line("Benchmark duration (s):", m.duration_s))
    lines.append(_line("Total input tokens:", m.total_input, "d"))
    lines.append(_line("Total generated tokens:", m.total_output, "d"))
    lines.append(_line("Request throughput (req/s):", m.request_throughput))
    if m.request_goodput is not None:
        lines.append(_line("Request goodput (req/s):", m.request_goodput))
        lines.append(_line("SLO attainment (%):", m.slo_attainment_pct))
    lines.append(_line("Output token throughput (tok/s):", m.output_throughput))
    lines.append(_line("Peak output token throughput (tok/s):", m.peak_output_throughput))
    lines.append(_line("Peak concurrent requests:", m.peak_concurrency, "d"))
    lines.append(_line("Total Token throughput (tok/s):", m.total_token_throughput))
    for name in METRICS:
        if name not in result.percentile_metrics:
            continue
        short, title = METRIC_LABELS[name]
        dist = m.distributions[name]
        lines.append("{s:{c}^{n}}".format(s=title, n=WIDTH, c="-"))
        lines.append(_line(f"Mean {short} (ms):", dist.mean))
        lines.append(_line(f"Median {short} (ms):", dist.median))
        for p, v in dist.percentiles:
            lines.append(_line(f"P{percentile_key(p)} {short} (ms):", v))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def profile_breakdown(result: BenchResult) -> dict[str, dict[str, Any]]:
    """Per workload profile (the phases of `shifting`, the parts of `mixed`): counts,
    latency summaries and SLO attainment; empty for a single-profile workload."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in result.records:
        groups.setdefault(r.profile, []).append(r)
    if len(groups) < 2:
        return {}
    keep = ("num_requests", "completed", "failed", "slo_attainment_pct")
    out: dict[str, dict[str, Any]] = {}
    for name, recs in groups.items():
        flat = compute_metrics(recs, result.metrics.duration_s, result.slos, result.metric_percentiles).to_flat()
        out[name] = {k: v for k, v in flat.items()
                     if k in keep or (k.endswith("_ms") and not k.startswith("std_") and "_itl_" not in k)}
    return out


def format_profile_breakdown(result: BenchResult) -> str:
    """One line per workload profile when there are several ('' otherwise)."""
    table = profile_breakdown(result)
    if not table:
        return ""
    p = percentile_key(max(result.metric_percentiles))
    lines = ["{s:{c}^{n}}".format(s="Per workload profile", n=WIDTH, c="-")]
    for name, row in table.items():
        slo = row["slo_attainment_pct"]
        lines.append(
            f"{name}: {row['completed']} ok, {row['failed']} failed; mean/P{p} TTFT "
            f"{row['mean_ttft_ms']:.2f}/{row[f'p{p}_ttft_ms']:.2f} ms; mean/P{p} TPOT "
            f"{row['mean_tpot_ms']:.2f}/{row[f'p{p}_tpot_ms']:.2f} ms"
            + ("" if slo is None else f"; SLO attainment {slo:.2f}%")
        )
    return "\n".join(lines)


class StreamedChunk(NamedTuple):
    """One streamed chunk of a request after its first (`token_times`)."""

    time_s: float  # from the run's start, when the chunk reached the client
    tokens: float  # the chunk's share of its request's output tokens after the first
    gap_s: float  # since the request's previous chunk


def token_times(records: Sequence[RequestRecord]) -> list[StreamedChunk]:
    """Every streamed chunk after each successful request's first."""
    out = []
    for r in records:
        if not r.success or r.ttft_s is None or not r.itl_s:
            continue
        t, per_chunk = r.start_s + r.ttft_s, max(r.output_tokens - 1, 0) / len(r.itl_s)
        for gap in r.itl_s:
            t += gap
            out.append(StreamedChunk(t, per_chunk, gap))
    return out


def streaming_around(chunks: Sequence[StreamedChunk], at_s: float, span_s: float = 1.0, bin_s: float = 0.5
                     ) -> tuple[float, float]:
    """Tokens per second streamed to all clients (`token_times`) in the `span_s` before `at_s`, and in the slowest
    `bin_s` of the `span_s` after it: what a split switch cost decode (a stall shows as a slow half second; H200,
    2026-12-04, run 20: 64 -> 72 prefill SMs, ~3,800 tokens/s before, ~2,000 in the half second after)."""
    before = sum(c.tokens for c in chunks if at_s - span_s <= c.time_s < at_s) / span_s
    bins = [sum(c.tokens for c in chunks if at_s + k * bin_s <= c.time_s < at_s + (k + 1) * bin_s) / bin_s
            for k in range(max(1, round(span_s / bin_s)))]
    return before, min(bins)


def format_split_changes(result: BenchResult, limit: int = 20) -> str:
    """The run's SM split changes, one line each (empty for servers without them)."""
    changes = result.split_changes
    if changes is None:
        return ""
    lost = [c["engine_id"] for c in changes if c.get("log_lost")]
    counted = sum(c.get("omitted", 1) for c in changes if not c.get("log_lost"))
    times = token_times(result.records)
    lines = [f"SM split changes during the run: {counted}" + (f" and those of {len(lost)} engine(s) whose log was lost"
                                                              if lost else "")]
    for c in changes[:limit]:
        if c.get("log_lost"):
            lines.append(f"  {c['engine_id']}: switch log lost (the engine was gone or had started again after the run)")
        elif "omitted" in c:
            lines.append(f"  {c['engine_id']}: {c['omitted']} more not listed by the server")
        else:
            before, after = streaming_around(times, c["time_s"])
            lines.append(f"  t={c['time_s']:7.2f}s {c['engine_id']}: {c['from_sms']} -> {c['to_sms']} prefill SMs"
                         f" (streamed {before:,.0f} tokens/s in the second before, {after:,.0f} in the slowest half"
                         f" second of the one after; {c['reason']})")
    if len(changes) > limit:
        lines.append(f"  ... {len(changes) - limit} more in the result JSON")
    return "\n".join(lines)


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


def iteration_quantiles(buckets: Mapping[float, float], qs: Sequence[int] = (50, 90)) -> dict[int, float]:
    """From cumulative histogram counts (upper bound in s -> count), the bound (ms) that each percentile of
    `qs` falls at or under (inf: past the last finite bound); {} without counts."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return {}
    return {q: 1e3 * next(b for b in bounds if buckets[b] >= total * q / 100) for q in qs}


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
            iteration_quantiles(buckets.get(worker, {})), 1e3 * per_iteration["paced_seconds_total"])
    return out


def format_worker_iterations(result: BenchResult) -> str:
    """One line per engine worker: its iterations during the run, their mean wall time, the host part of it,
    the time it waited for its pace (if paced) and the tokens per iteration ('' without any)."""
    rows = worker_iterations(result)
    if not rows:
        return ""
    def host(w: WorkerIterations) -> str:
        split = " + ".join(f"{part} {ms:.2f}" for part, ms in w.launch_parts_ms.items())
        return f"host {w.launch_ms:.2f} ms" + (f" = {split}" if split else "")

    def quantiles(w: WorkerIterations) -> str:
        return "".join(f", P{q} <= {ms:g} ms" for q, ms in w.quantiles_ms.items())

    def paced(w: WorkerIterations) -> str:
        return f", paced {w.paced_ms:.2f} ms" if w.paced_ms > 0 else ""

    def rate(w: WorkerIterations) -> str:
        return f" = {1e3 * w.tokens / w.mean_ms:,.0f} tok/s" if w.mean_ms > 0 else ""

    parts = [f"{engine} {worker}: {w.count:.0f} x {w.mean_ms:.2f} ms ({host(w)}{paced(w)}, {w.tokens:.0f} tokens"
             f"{rate(w)}{quantiles(w)})"
             for (engine, worker), w in sorted(rows.items())]
    return "Worker iterations during the run (mean wall time): " + "; ".join(parts)


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


def format_cuda_allocator(result: BenchResult) -> str:
    """One line: each engine's CUDA allocator calls during the run ('' when the server has none)."""
    rows = cuda_allocator_counts(result)
    if not rows:
        return ""
    parts = [f"{engine}: {c.mallocs:.0f} cudaMalloc calls, {c.retries:.0f} cudaMalloc retries, {c.frees:.0f} cudaFree "
             f"calls" + ("" if c.host_allocs is None else f", {c.host_allocs:.0f} cudaHostAlloc calls")
             for engine, c in sorted(rows.items())]
    return "CUDA allocator during the run: " + "; ".join(parts)


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


def offered_load(records: Sequence[RequestRecord]) -> tuple[float, float, float] | None:
    """(requests/s, prompt tokens/s, seconds) the load generator sent over the span of its arrivals (from the
    first request's send to the last one's); None with fewer than two requests or a single instant."""
    if len(records) < 2:
        return None
    times = [r.scheduled_s for r in records]
    span = max(times) - min(times)
    if span <= 0:
        return None
    n = len(records) - 1  # arrivals after the first, within the span
    return n / span, sum(r.prompt_len for r in records) * n / len(records) / span, span


def format_offered_load(records: Sequence[RequestRecord]) -> str:
    """One line: the load offered while requests arrived ('' when it cannot say). A server sustains a rate only
    if it computes prompts faster than they arrive: compare the prompt tokens/s here with the prefill worker's
    tokens/s in the worker line."""
    load = offered_load(records)
    if load is None:
        return ""
    rate, tokens, span = load
    return f"Offered load while requests arrived ({span:.1f} s): {rate:.2f} req/s, {tokens:,.0f} prompt tokens/s"


def format_prefix_cache(result: BenchResult) -> str:
    """One line: how much of the run's prompts the server's prefix cache served ('' when it does not say)."""
    counts = prefix_cache_counts(result)
    if counts is None:
        return ""
    queried, hit = counts
    share = f" ({100 * hit / queried:.1f}%)" if queried else ""
    return f"Prefix cache during the run: {hit:,.0f} of {queried:,.0f} prompt tokens hit{share}"


def format_failures(records: Sequence[RequestRecord], limit: int = 5) -> str:
    """The errors of failed requests, grouped by message with numbers ignored ('' when none)."""
    groups: dict[str, tuple[int, str]] = {}
    for r in records:
        if not r.success:
            message = r.error or "unknown error"
            key = re.sub(r"\d+(\.\d+)?", "N", message)
            count, example = groups.get(key, (0, message))
            groups[key] = (count + 1, example)
    if not groups:
        return ""
    top = sorted(groups.values(), key=lambda g: -g[0])[:limit]
    return "\n".join(["Errors (count: example message):", *(f"  {n}: {msg[:300]}" for n, msg in top)])


# ---------------------------------------------------------------- plot


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


__all__ = [
    "BenchResult", "SCHEMA", "SustainedRate", "format_failures", "format_preamble", "format_profile_breakdown",
    "format_result_block", "format_split_changes", "format_sustained_rates", "format_worker_iterations", "iteration_quantiles",
    "streaming_around", "StreamedChunk", "token_times",
    "AllocatorCounts", "cuda_allocator_counts", "format_cuda_allocator", "prefix_cache_counts", "format_prefix_cache",
    "load_result",
    "offered_load", "format_offered_load", "RATE_AXES", "rate_of",
    "plot_results", "profile_breakdown", "results_figure", "sustained_rates", "worker_iterations", "write_result",
]

"""The text printed around a `semipd bench serve` run: vLLM's lines before it (`format_preamble`) and its
result block after it (`format_result_block`), then what semipd adds, one block or line each, '' when there
is nothing to say: the per-workload-profile breakdown, the SM split changes with the streaming around each,
the engine workers' iterations, the CUDA allocator calls, a disagg server's KV handoffs, the offered load, the
prefix cache hits, and the errors of failed requests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from cluster.bench.arrivals import RampUp
from cluster.bench.client import RequestRecord
from cluster.bench.metrics import METRIC_LABELS, METRICS, Conformance, percentile_key
from cluster.bench.result import BenchResult, profile_breakdown
from cluster.bench.server_metrics import (
    WorkerIterations, admission_ratios, cuda_allocator_counts, kv_handoffs, prefix_cache_counts, worker_iterations,
)
from cluster.bench.traffic import offered_load, streaming_around, token_times
from cluster.bench.workloads import Phase, time_shares

WIDTH = 50


def _line(name: str, value: float | int | None, fmt: str = ".2f") -> str:
    text = "None" if value is None else format(value, fmt)
    return "{:<40} {:<10}".format(name, text)


def format_preamble(request_rate: float, burstiness: float, max_concurrency: int | None,
                    phases: Sequence[Phase] = (), ramp: RampUp | None = None) -> str:
    """The lines vLLM prints before sending: rate (or ramp), burstiness, concurrency; and the rate of each phase of
    a shifting workload whose phases arrive at different rates."""
    kind = "Poisson process" if burstiness == 1.0 else "Gamma distribution"
    traffic = [f"Traffic request rate: {request_rate}"] if ramp is None else [
        f"Traffic ramp-up strategy: {ramp.strategy}.",
        f"Will increase RPS from {ramp.start_rps:g} to {ramp.end_rps:g} RPS over the duration of the benchmark."]
    lines = [
        *traffic,
        f"Burstiness factor: {burstiness} ({kind})",
        f"Maximum request concurrency: {max_concurrency}",
    ]
    if any(p.rate_scale != 1.0 for p in phases):
        lines.append("Phase rates: " + ", ".join(
            f"{p.name} {request_rate * p.rate_scale:g} req/s for {share:.0%} of the time"
            for share, p in zip(time_shares(phases), phases)))
    return "\n".join(lines)


def format_result_block(result: BenchResult) -> str:
    """The `vllm bench serve` result block, line for line, plus SLO attainment, and for a structured-output run
    the correct rate (vLLM's benchmark_serving_structured_output) and the outputs cut at max_tokens."""
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
    lines.append(_line("Peak concurrent requests:", m.peak_concurrency))  # vLLM prints it as .2f too
    lines.append(_line("Total token throughput (tok/s):", m.total_token_throughput))
    if result.structured_output is not None:
        conformance = result.conformance or Conformance.of(result.records)
        lines.append(_line("Correct rate (%):", conformance.correct_rate))
        lines.append(_line("Outputs cut at max_tokens:", conformance.length_cut, "d"))
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
        over = f", {w.over_100ms:.0f} over 100 ms" if w.over_100ms > 0 else ""
        return "".join(f", P{q} <= {ms:g} ms" for q, ms in w.quantiles_ms.items()) + over

    def paced(w: WorkerIterations) -> str:
        return f", paced {w.paced_ms:.2f} ms" if w.paced_ms > 0 else ""

    def rate(w: WorkerIterations) -> str:
        return f" = {1e3 * w.tokens / w.mean_ms:,.0f} tok/s" if w.mean_ms > 0 else ""

    parts = [f"{engine} {worker}: {w.count:.0f} x {w.mean_ms:.2f} ms ({host(w)}{paced(w)}, {w.tokens:.0f} tokens"
             f"{rate(w)}{quantiles(w)})"
             for (engine, worker), w in sorted(rows.items())]
    return "Worker iterations during the run (mean wall time): " + "; ".join(parts)


def format_cuda_allocator(result: BenchResult) -> str:
    """One line: each engine's CUDA allocator calls during the run ('' when the server has none)."""
    rows = cuda_allocator_counts(result)
    if not rows:
        return ""
    parts = [f"{engine}: {c.mallocs:.0f} cudaMalloc calls, {c.retries:.0f} cudaMalloc retries, {c.frees:.0f} cudaFree "
             f"calls" + ("" if c.host_allocs is None else f", {c.host_allocs:.0f} cudaHostAlloc calls")
             for engine, c in sorted(rows.items())]
    return "CUDA allocator during the run: " + "; ".join(parts)


def format_kv_handoffs(result: BenchResult) -> str:
    """One line: each disagg engine's handoffs during the run, KV moved and how long they took ('' without any)."""
    rows = kv_handoffs(result)
    if not rows:
        return ""

    def p90(quantiles: dict[int, float]) -> str:
        return f" (P90 <= {quantiles[90]:g} ms)" if 90 in quantiles else ""

    parts = [f"{engine}: {h.count:.0f} requests, {h.kv_bytes / 2**20:,.1f} MiB of KV "
             f"({h.kv_bytes / h.count / 2**20:,.2f} MiB each), on the decode device after {h.transfer_ms:.2f} ms"
             f"{p90(h.transfer_quantiles_ms)}, decoding after {h.handoff_ms:.2f} ms{p90(h.handoff_quantiles_ms)}"
             for engine, h in sorted(rows.items())]
    return "KV handoffs during the run (mean, from the first token): " + "; ".join(parts)


def format_admission_ratios(result: BenchResult) -> str:
    """One line: how each engine's admission predictions turned out for the requests it admitted during the run
    ('' without admission control)."""
    rows = admission_ratios(result)
    if not rows:
        return ""
    parts = [f"{engine}: {a.count:.0f} requests, mean x{a.mean:.2f}, "
             + "".join(f"P{q} <= x{bound:g}, " for q, bound in sorted(a.quantiles.items()))
             + f"{100 * a.over_one:.1f}% later than predicted" for engine, a in sorted(rows.items())]
    return "Admitted requests' TTFT over admission's prediction during the run: " + "; ".join(parts)


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


__all__ = [
    "format_cuda_allocator", "format_failures", "format_offered_load", "format_preamble", "format_prefix_cache",
    "format_profile_breakdown", "format_result_block", "format_split_changes", "format_worker_iterations",
]

"""`semipd bench serve` reports what `vllm bench serve` reports, by vLLM's own definitions
(vllm/benchmarks/serve.py: get_request, calculate_metrics, benchmark; vllm/benchmarks/lib/endpoint_request_func.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest

from cluster.bench.arrivals import ArrivalConfig, arrival_offsets
from cluster.bench.client import EndpointConfig, RequestRecord, send_request
from cluster.bench.metrics import SLOs, compute_metrics
from cluster.bench.report import format_result_block
from cluster.bench.result import BenchResult, profile_breakdown
from cluster.bench.serve_bench import run_rate
from cluster.bench.workloads import BenchRequest

from support import stub_http


def _event(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _paced(parts: Sequence[tuple[float, bytes]], hang: bool = False) -> AsyncIterator[bytes]:
    """Each part after its delay in seconds; then, with `hang`, nothing ever again."""
    for delay, part in parts:
        if delay:
            await asyncio.sleep(delay)
        yield part
    if hang:
        await asyncio.Event().wait()


def _token(chat: bool, text: str = "x", finish: str | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    choice.update({"delta": {"content": text}} if chat else {"text": text})
    return {"choices": [choice]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def _rec(i: int, start: float, ttft: float, e2el: float, out: int = 2, ok: bool = True,
         end: float | None = None) -> RequestRecord:
    return RequestRecord(index=i, profile="t", prompt_len=10, max_tokens=out, start_s=start,
                         end_s=start + e2el if end is None else end, success=ok, output_tokens=out if ok else 0,
                         ttft_s=ttft, e2el_s=e2el if ok else None, itl_s=[(e2el - ttft) / (out - 1)] * (out - 1),
                         num_chunks=out, error=None if ok else "timed out after 1 s")


# ---------------------------------------------------------------- client: E2EL


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_e2el_ends_at_the_last_token_chunk_not_at_the_usage_chunk_or_done(endpoint: str) -> None:
    """vLLM's latency is `most_recent_timestamp - st`, advanced by token chunks only ("the trailing usage chunk
    carries no token", endpoint_request_func.py): a server slow to send usage and [DONE] lengthens neither E2EL
    nor TPOT (= (E2EL - TTFT) / (tokens - 1))."""
    chat = endpoint.endswith("chat/completions")

    def parts(body: dict[str, Any]) -> AsyncIterator[bytes]:
        return _paced([(0.05, _event(_token(chat))), (0.05, _event(_token(chat, finish="length"))),
                       (0.4, _event(USAGE)), (0.0, _event("[DONE]"))])

    async def go() -> RequestRecord:
        async with stub_http(parts) as (client, url):
            return await send_request(client, EndpointConfig(url, "m", endpoint),
                                      BenchRequest(0, "p", 3, 2, "t"), 0.0)

    rec = asyncio.run(go())
    assert rec.success and rec.output_tokens == 2 and rec.ttft_s is not None and rec.e2el_s is not None
    assert rec.end_s - rec.start_s >= 0.4  # the stream itself lasted until [DONE]
    assert rec.e2el_s == pytest.approx(rec.ttft_s + sum(rec.itl_s))  # ... but the request ended at its last token
    assert rec.e2el_s < 0.3 and rec.tpot_s is not None and rec.tpot_s < 0.2


# ---------------------------------------------------------------- metrics: peaks


def test_peak_concurrency_is_vllms_sweep_over_completed_requests_send_to_last_token() -> None:
    """vLLM sweeps [start_time, start_time + latency) of the successful outputs only (a departure before an
    arrival at the same instant): a failed request, and the tail of a stream after its last token, add none."""
    records = [
        _rec(0, start=0.0, ttft=0.1, e2el=1.0, end=1.5),  # last token at 1.0; usage and [DONE] at 1.5
        _rec(1, start=1.2, ttft=0.1, e2el=0.5),
        _rec(2, start=0.0, ttft=0.1, e2el=3.0, ok=False, end=3.0),  # timed out at 3.0 after streaming
    ]
    assert compute_metrics(records, 3.0).peak_concurrency == 1
    assert compute_metrics(records[:2] + [_rec(3, start=1.0, ttft=0.1, e2el=0.5)], 3.0).peak_concurrency == 2


def test_peak_output_rate_counts_whole_seconds_from_the_first_completed_send() -> None:
    """vLLM buckets each token chunk by int(t - min start_time over the successful outputs), not by whole seconds
    of the run's clock: here both chunks fall in the first second after the first completed send."""
    first_failed = _rec(0, start=0.0, ttft=0.1, e2el=0.2, ok=False)
    ok = _rec(1, start=0.5, ttft=0.1, e2el=0.9)  # chunks at 0.6 and 1.4
    assert compute_metrics([first_failed, ok], 2.0).peak_output_throughput == 2.0


# ---------------------------------------------------------------- a timed-out request


def test_a_timed_out_request_counts_as_failed_in_every_metric() -> None:
    """A request that streamed two tokens and then hung past the request timeout: failed, a miss for SLO
    attainment, and absent from every latency, token total, goodput and peak, as in vLLM's calculate_metrics."""
    def parts(body: dict[str, Any]) -> AsyncIterator[bytes]:
        tokens = [(0.0, _event(_token(False))), (0.01, _event(_token(False, finish="length")))]
        if body["prompt"] == "slow":
            return _paced(tokens, hang=True)
        return _paced(tokens + [(0.0, _event(USAGE)), (0.0, _event("[DONE]"))])

    requests = [BenchRequest(i, p, 3, 2, "t") for i, p in enumerate(("slow", "ok", "ok"))]

    async def go() -> tuple[list[RequestRecord], float]:
        async with stub_http(parts) as (client, url):
            return await run_rate(client, EndpointConfig(url, "m", timeout_s=0.6), requests,
                                  [0.0, 0.15, 0.3], None, disable_tqdm=True)

    records, duration = asyncio.run(go())
    slow, ok = records[0], records[1:]
    assert not slow.success and slow.error == "timed out after 0.6 s" and slow.ttft_s is not None  # it did stream
    assert all(r.success for r in ok)
    slos = SLOs(ttft_ms=60_000, tpot_ms=60_000)
    m = compute_metrics(records, duration, slos)
    assert (m.completed, m.failed, m.total_input, m.total_output) == (2, 1, 6, 4)
    assert m.request_goodput == pytest.approx(2 / duration) and m.slo_attainment_pct == pytest.approx(200 / 3)
    assert m.distributions["ttft"].mean == pytest.approx(1000 * np.mean([r.ttft_s for r in ok]))
    assert m.distributions["e2el"].mean == pytest.approx(1000 * np.mean([r.e2el_s for r in ok]))
    assert m.distributions["itl"].mean == pytest.approx(1000 * np.mean([g for r in ok for g in r.itl_s]))
    assert m.peak_output_throughput == 4.0 and m.peak_concurrency == 1
    for r in ok:
        r.profile = "other"
    result = BenchResult("a", "d", 10.0, 1.0, None, slos, ("ttft",), (90.0,), records, m)
    assert profile_breakdown(result)["t"]["completed"] == 0 and profile_breakdown(result)["t"]["failed"] == 1


# ---------------------------------------------------------------- arrivals


def test_arrivals_keep_the_configured_rate_as_vllm_rescales_them() -> None:
    """vLLM's get_request draws one gamma(burstiness, 1 / (rate * burstiness)) gap per request, accumulates them and
    rescales the sum to N / rate, so a window of N requests is sent over N / rate seconds whatever the seed (the
    first request after its own gap). Without it a 100-request window drifts by ~10% (1/sqrt(N))."""
    n, rate = 100, 10.0
    spans = np.array([arrival_offsets(ArrivalConfig(rate, 1.0, seed), n)[-1] for seed in range(20)])
    assert np.all(spans <= n / rate + 1e-9) and np.all(spans >= 0.9 * n / rate)
    gaps = np.diff(np.concatenate([arrival_offsets(ArrivalConfig(rate, 1.0, seed), n) for seed in range(20)]))
    gaps = gaps[gaps > 0]
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # still exponential gaps
    scales = np.repeat([10.0, 1.0], [50, 50])  # phases: rescaled to the time their rates give
    span = arrival_offsets(ArrivalConfig(rate, 1.0, 3), n, scales)[-1]
    assert 0.9 * (50 / 100 + 50 / 10) <= span <= 50 / 100 + 50 / 10 + 1e-9


# ---------------------------------------------------------------- report


def test_peak_concurrent_requests_line_is_printed_like_vllms() -> None:
    """vLLM prints every throughput line, "Peak concurrent requests:" included, as {:<10.2f}."""
    records = [_rec(0, start=0.0, ttft=0.1, e2el=1.0), _rec(1, start=0.5, ttft=0.1, e2el=1.0)]
    result = BenchResult("a", "d", 4.0, 1.0, None, SLOs(), ("ttft",), (99.0,), records, compute_metrics(records, 2.0))
    assert "{:<40} {:<10.2f}".format("Peak concurrent requests:", 2) in format_result_block(result).splitlines()

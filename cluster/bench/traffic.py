"""A run's traffic over time, from its per-request records: the load the generator offered while requests
arrived (`offered_load`), when each of a request's chunks reached the client (`chunk_times`), and every chunk
streamed back after each request's first (`token_times`), with the tokens per second streamed around a moment
(`streaming_around`), e.g. an SM split change.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import NamedTuple

from cluster.bench.client import RequestRecord


class StreamedChunk(NamedTuple):
    """One streamed chunk of a request after its first (`token_times`)."""

    time_s: float  # from the run's start, when the chunk reached the client
    tokens: float  # the chunk's share of its request's output tokens after the first
    gap_s: float  # since the request's previous chunk


def chunk_times(r: RequestRecord) -> list[float]:
    """When each chunk of `r` reached the client, its first included, from the run's start ([] for a request that
    failed or streamed a single chunk)."""
    if not r.success or r.ttft_s is None or not r.itl_s:
        return []
    return list(accumulate(r.itl_s, initial=r.start_s + r.ttft_s))


def tokens_per_chunk(r: RequestRecord) -> float:
    """The output tokens after its first that each chunk of `r` after its first carried, on average (`r` must
    have streamed more than one chunk)."""
    return max(r.output_tokens - 1, 0) / len(r.itl_s)


def token_times(records: Sequence[RequestRecord]) -> list[StreamedChunk]:
    """Every streamed chunk after each successful request's first."""
    out = []
    for r in records:
        times = chunk_times(r)
        if times:
            per_chunk = tokens_per_chunk(r)
            out.extend(StreamedChunk(t, per_chunk, gap) for t, gap in zip(times[1:], r.itl_s))
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


__all__ = ["StreamedChunk", "chunk_times", "offered_load", "streaming_around", "token_times", "tokens_per_chunk"]

"""A serving run second by second: what arrived, what streamed, which requests missed their targets, and the
SM split changes, so a window's misses can be placed in time (`semipd bench timeline RESULT.json`).

Misses are counted by the bin a request arrived in; streaming (tokens per second, mean inter-token latency, and
the chunks that came `LONG_GAP_S` or more a token after their request's previous one: decode standing still,
which on the H100 in run 30 put 386 such gaps in one 15 s window) by the bin its chunks reached the client in.
Times are seconds from the run's start, as in the result JSON. `tpot_misses` says how many of the requests past
TPOT's target their long gaps put there, and `gap_sources` whether the other streams went on during those gaps.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.bench.client import RequestRecord
from cluster.bench.metrics import SLOs
from cluster.bench.result import BenchResult
from cluster.bench.traffic import chunk_times, token_times, tokens_per_chunk

LONG_GAP_S = 0.05
BUNCHED_S = 0.001  # a chunk this soon after its request's previous one came with it


@dataclass(frozen=True)
class TimelineBin:
    """One bin of `bin_s` seconds from `start_s`."""

    start_s: float
    arrived: int
    prompt_tokens: int  # of the requests that arrived in the bin
    streamed_tokens: float  # after each request's first, by when its chunk arrived
    itl_s: float | None  # streamed gaps / streamed tokens (None: nothing streamed)
    long_gaps: int  # chunks LONG_GAP_S or more a token after their request's previous one
    ttft_missed: int  # of the requests that arrived in the bin
    tpot_missed: int
    failed: int
    split_changes: tuple[str, ...]  # "engine from->to"


@dataclass
class _Tally:
    arrived: int = 0
    prompt_tokens: int = 0
    streamed_tokens: float = 0.0
    gaps_s: float = 0.0
    long_gaps: int = 0
    ttft_missed: int = 0
    tpot_missed: int = 0
    failed: int = 0


def timeline(result: BenchResult, slos: SLOs | None = None, bin_s: float = 1.0) -> list[TimelineBin]:
    """`result` in bins of `bin_s` seconds, from 0 to the last chunk; `slos` default to the result's own."""
    if not bin_s > 0:
        raise ValueError(f"bin_s must be > 0, got {bin_s}")
    slos = result.slos if slos is None else slos
    tallies: dict[int, _Tally] = {}

    def index(t: float) -> int:
        return max(0, math.floor(t / bin_s))

    def at(t: float) -> _Tally:
        return tallies.setdefault(index(t), _Tally())

    for r in result.records:
        arrival = at(r.start_s)
        arrival.arrived += 1
        arrival.prompt_tokens += r.input_tokens
        if not r.success:
            arrival.failed += 1
            continue
        missed = slos.missed(r)
        arrival.ttft_missed += "ttft" in missed
        arrival.tpot_missed += "tpot" in missed
    for chunk in token_times(result.records):
        tally = at(chunk.time_s)
        tally.streamed_tokens += chunk.tokens
        tally.gaps_s += chunk.gap_s
        tally.long_gaps += chunk.gap_s >= LONG_GAP_S * max(chunk.tokens, 1.0)
    changes: dict[int, list[str]] = {}
    for c in result.split_changes or ():
        if "time_s" in c:
            changes.setdefault(index(c["time_s"]), []).append(
                f"{c['engine_id']} {c['from_sms']}->{c['to_sms']}")
    last = max([*tallies, *changes], default=-1)
    return [_bin(k * bin_s, tallies.get(k, _Tally()), tuple(changes.get(k, ()))) for k in range(last + 1)]


def _bin(start_s: float, t: _Tally, split_changes: tuple[str, ...]) -> TimelineBin:
    itl = t.gaps_s / t.streamed_tokens if t.streamed_tokens > 0 else None
    return TimelineBin(start_s, t.arrived, t.prompt_tokens, t.streamed_tokens, itl, t.long_gaps, t.ttft_missed,
                       t.tpot_missed, t.failed, split_changes)


@dataclass(frozen=True)
class TpotMisses:
    """The successful requests past TPOT's target (`missed`), their median output length, and how many of them
    (`explained`) would be within it had each of their gaps of `gap_s` or more a token been as long as their
    median one."""

    missed: int
    median_output_tokens: float
    explained: int
    gap_s: float


def tpot_misses(result: BenchResult, slos: SLOs, gap_s: float) -> TpotMisses | None:
    """How far `result`'s TPOT misses come from long gaps in their streams (None: no TPOT target). On the H100
    (serving's run 39, chat at 37 req/s, TPOT <= 12 ms, 64 prefill SMs) 43 of the 59 misses were requests of ~20
    tokens that 30-100 ms gaps put past the target. Those gaps were not decode standing still: tokens reached the
    client in bunches (run 40), and during 44-80% of such gaps at least half the other streams got tokens (run 41,
    `gap_sources`)."""
    if slos.tpot_ms is None:
        return None
    missed = [r for r in result.records if r.success and "tpot" in slos.missed(r)]
    explained = sum(_within_without_gaps(r, slos.tpot_ms, gap_s) for r in missed)
    median_output = statistics.median(r.output_tokens for r in missed) if missed else 0.0
    return TpotMisses(len(missed), median_output, explained, gap_s)


def _within_without_gaps(r: RequestRecord, tpot_ms: float, gap_s: float) -> bool:
    """Whether `r`'s TPOT is within `tpot_ms` with each chunk gap of `gap_s` or more a token cut to its median."""
    if r.ttft_s is None or r.e2el_s is None or not r.itl_s or r.output_tokens < 2:
        return False
    per_chunk = tokens_per_chunk(r)
    median = statistics.median(r.itl_s)
    cut = sum(g - median for g in r.itl_s if g >= gap_s * per_chunk)
    return 1000.0 * (r.e2el_s - r.ttft_s - cut) / (r.output_tokens - 1) <= tpot_ms


def format_tpot_misses(m: TpotMisses) -> str:
    return (f"TPOT misses: {m.missed} (median output {m.median_output_tokens:g} tokens); {m.explained} of them within "
            f"the target with their gaps of {1000 * m.gap_s:g} ms or more a token cut to their median")


@dataclass(frozen=True)
class GapSources:
    """A run's gaps of `gap_s` or more a token (`gaps`), by what the other streams did meanwhile.

    The other streams in flight (with chunks before the gap began and after it ended) either got chunks in its
    middle half, so the engine went on and the stream's own path held its tokens (Serve's proxy, the ingress,
    the client), or got none, so every stream stood still (the engine, or a process all of them pass: vLLM's
    decode steps that carry a prefill chunk, all of its long gaps in serving's run 41). A gap with no other
    stream in flight counts in neither. With several engines behind the server, streams of another engine going
    on say nothing of this one's. `bunched`: the share of all chunk gaps under `BUNCHED_S`, tokens that reached
    the client together (vLLM 0.00-0.04% on the H100, runs 40 and 41)."""

    gaps: int
    others_streamed: int  # while at least half the other streams in flight got a chunk
    all_still: int  # while none of them did
    bunched: float
    gap_s: float


def gap_sources(result: BenchResult, gap_s: float) -> GapSources:
    """`result`'s long gaps (`gap_s` or more a token) and what the other streams did during each."""
    streams = [(r, chunk_times(r)) for r in result.records]
    streams = [(r, times) for r, times in streams if times]
    gaps = others_streamed = all_still = bunched = chunks = 0
    for i, (r, times) in enumerate(streams):
        per_chunk = tokens_per_chunk(r)
        chunks += len(r.itl_s)
        bunched += sum(g < BUNCHED_S for g in r.itl_s)
        for begin, end, gap in zip(times, times[1:], r.itl_s):
            if gap < gap_s * max(per_chunk, 1.0):
                continue
            gaps += 1
            got = [_streamed_between(other, begin, end) for j, (_, other) in enumerate(streams)
                   if j != i and other[0] < begin and other[-1] > end]
            if got:
                others_streamed += 2 * sum(got) >= len(got)
                all_still += not any(got)
    return GapSources(gaps, others_streamed, all_still, bunched / chunks if chunks else 0.0, gap_s)


def _streamed_between(times: list[float], begin: float, end: float) -> bool:
    """Whether a chunk in `times` came in the middle half of (`begin`, `end`): the chunks of one engine step reach
    the clients over a few ms, so another stream's chunks of the steps that began and ended the gap do not count."""
    quarter = (end - begin) / 4
    k = bisect.bisect_right(times, begin + quarter)
    return k < len(times) and times[k] < end - quarter


def format_gap_sources(g: GapSources) -> str:
    return (f"Gaps of {1000 * g.gap_s:g} ms or more a token: {g.gaps}; during {g.others_streamed} of them at least "
            f"half the other streams in flight got a chunk (the stream's own path held it), during {g.all_still} "
            f"none did (every stream stood still); {100 * g.bunched:.2f}% of all chunks came under "
            f"{1000 * BUNCHED_S:g} ms after their request's previous one (bunched)")


def format_unplaced_changes(result: BenchResult) -> str:
    """One line on the split changes `timeline` cannot place: those the server did not list and the engines
    whose switch log was lost ('' when none)."""
    parts = [f"{c['engine_id']} ({c['omitted']} not listed by the server)" if "omitted" in c
             else f"{c['engine_id']} (switch log lost)"
             for c in result.split_changes or () if "time_s" not in c]
    return "Split changes not in the table: " + ", ".join(parts) if parts else ""


def format_timeline(bins: Sequence[TimelineBin], bin_s: float, slos: SLOs) -> str:
    """A text table of `bins`, rates per second."""
    ttft = f"TTFT>{slos.ttft_ms:g}ms" if slos.ttft_ms is not None else "TTFT (no target)"
    tpot = f"TPOT>{slos.tpot_ms:g}ms" if slos.tpot_ms is not None else "TPOT (no target)"
    gaps = f"gaps>{1000 * LONG_GAP_S:g}ms"
    header = (f"{'t (s)':>11} {'arrived/s':>9} {'prompt tok/s':>12} {'streamed tok/s':>14} {'ITL ms':>7} {gaps:>10} "
              f"{ttft:>13} {tpot:>13} {'failed':>6}  split changes")
    lines = [header, "-" * len(header)]
    for b in bins:
        itl = "-" if b.itl_s is None else f"{1000.0 * b.itl_s:.1f}"
        span = f"{b.start_s:g}-{b.start_s + bin_s:g}"
        lines.append(f"{span:>11} {b.arrived / bin_s:9.1f} "
                     f"{b.prompt_tokens / bin_s:12,.0f} {b.streamed_tokens / bin_s:14,.0f} {itl:>7} {b.long_gaps:10d} "
                     f"{b.ttft_missed:13d} {b.tpot_missed:13d} {b.failed:6d}  {', '.join(b.split_changes)}")
    return "\n".join(lines)

"""The contract between engines, the SLO controller and split policies (plain data)."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SLOTargets:
    """Latency targets: time to first token and time per output token, at `attainment`."""

    ttft_ms: float = 1000.0
    tpot_ms: float = 50.0
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.tpot_ms <= 0:
            raise ValueError("SLO targets must be positive")
        if not 0.0 < self.attainment <= 1.0:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")


@dataclass(frozen=True)
class EngineView:
    """What a policy knows of one engine: its split, its queues, recent latencies.

    `ttft_ms` / `tpot_ms` are recent samples (a window the publisher chose), oldest first.
    `num_prefill_requests` counts requests waiting for or in prefill (0: unknown; the
    model policy then assumes prompts of a typical length). `arrival_tokens_per_s` is the
    rate at which prompt tokens arrive, the highest over a short and a longer recent span (a GPU
    actor's `RateWindow`), so a burst shows at once and a lull keeps the last burst's load (0: unknown or idle);
    `mean_prompt_tokens` the mean prompt length of the latest arrivals (0: unknown), `mean_output_tokens` the
    mean output length of recently finished requests (0: unknown), `mean_max_tokens` the mean `max_tokens` of the
    latest arrivals (0: unknown), a bound on what they will make. `decode_step_ms` is the mean decode step of
    the last seconds as the engine measured it (0: unknown or idle): the TPOT the requests decoding now see,
    before any of them finishes and becomes a TPOT sample. `decode_pace_ms` is the engine's decode pace while
    prefill has work (0: none): its steps take at least that long then, whatever the split.
    `prefill_iteration_ms` and `prefill_iteration_tokens` are the mean prefill iteration of the last seconds on
    the current split and its mean tokens, as the engine measured them (0: too few iterations there): the
    prefill speed the split actually runs at, against which the model's is checked.
    `live_tpot_ms` is the TPOT so far of each request decoding now that had its first token on the current split
    (after the last switch) and has made a few tokens since (the publisher's choice): what its TPOT sample
    would be if it ended now, seconds before it does. `live_tpot_without_stalls_ms` is the same for the same
    requests, in the same order, less the time the engine's decode stalled while they decoded (empty: unknown):
    more decode SMs shorten a step, not a stall (on the H100, run 30, decode stood still for 100-280 ms at times
    under chat at 32 and 37 req/s, on 48, 56 and 64 prefill SMs alike). `tpot_without_stalls_ms` is the same for
    the TPOT samples (`tpot_ms`, in their order) of the requests that ended (empty: unknown).
    `refuses_late` is true when the engine's admission control refuses a request predicted past its TTFT target
    (`--admission reject`): arrivals beyond a split's prefill capacity are then refused there, not queued, so a
    TTFT predicted past target costs the refused share of the arrivals rather than every request's first token.
    """

    engine_id: str
    prefill_sms: int
    total_sms: int
    splits: tuple[int, ...]
    waiting_prefill_tokens: int = 0
    num_decoding: int = 0
    decode_context_tokens: int = 0
    ttft_ms: tuple[float, ...] = ()
    tpot_ms: tuple[float, ...] = ()
    time: float = 0.0
    num_prefill_requests: int = 0
    arrival_tokens_per_s: float = 0.0
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    mean_max_tokens: float = 0.0
    decode_step_ms: float = 0.0
    decode_pace_ms: float = 0.0
    prefill_iteration_ms: float = 0.0
    prefill_iteration_tokens: float = 0.0
    live_tpot_ms: tuple[float, ...] = ()
    live_tpot_without_stalls_ms: tuple[float, ...] = ()
    tpot_without_stalls_ms: tuple[float, ...] = ()
    refuses_late: bool = False


@dataclass(frozen=True)
class SplitDecision:
    """The split an engine should run next and why. `urgent`: the current split is predicted and observed to
    miss a target (by more than the policy's `urgent_slack`; for TTFT, the arrivals having changed may stand in
    for the observation) and the new one is predicted within that slack of both or better by the policy's
    `urgent_gain`, so a caller may shorten its dwell and skip its warm-up."""

    prefill_sms: int
    reason: str
    predicted: dict[str, float] = field(default_factory=dict)
    urgent: bool = False


class SplitPolicy(Protocol):
    def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
        """The split `view`'s engine should run next (may equal the current one)."""
        ...


def nearest_split(splits: tuple[int, ...], prefill_sms: int) -> int:
    """The split in `splits` nearest `prefill_sms` prefill SMs (the smaller one on a tie)."""
    return min(splits, key=lambda n: (abs(n - prefill_sms), n))


def percentile(samples: tuple[float, ...] | list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]; NaN for no samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[min(len(ordered), max(rank, 1)) - 1]


class FixedPolicy:
    """Never moves the split: the baseline a dynamic policy is measured against."""

    def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
        return SplitDecision(view.prefill_sms, "fixed split")


class ReactivePolicy:
    """semi-PD paper's rule: compare P90 TTFT/TPOT with the targets, move one step.

    TTFT over target (relatively worse than TPOT) -> one split step more to prefill;
    TPOT over target -> one step more to decode; both fine -> stay.
    """

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
        ttft = percentile(view.ttft_ms, 90)
        tpot = percentile(view.tpot_ms, 90)
        ttft_ratio = ttft / targets.ttft_ms if ttft == ttft else 0.0
        tpot_ratio = tpot / targets.tpot_ms if tpot == tpot else 0.0
        i = view.splits.index(nearest_split(view.splits, view.prefill_sms))  # off the set (bounds): from the nearest
        if ttft_ratio > 1.0 and ttft_ratio >= tpot_ratio:
            i, why = min(len(view.splits) - 1, i + self.step), f"P90 TTFT {ttft:.0f} ms over {targets.ttft_ms:.0f}"
        elif tpot_ratio > 1.0:
            i, why = max(0, i - self.step), f"P90 TPOT {tpot:.1f} ms over {targets.tpot_ms:.1f}"
        else:
            why = "within SLO"
        return SplitDecision(view.splits[i], why, {"p90_ttft_ms": ttft, "p90_tpot_ms": tpot})

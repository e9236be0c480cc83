"""Split policies: `ModelPolicy` (latency model + observed correction + hysteresis + dwell)
and the paper's `ReactivePolicy`, built by name with `make_policy`.

`ModelPolicy.decide` predicts, for every available split of an engine:
- TTFT of a request arriving within the next `dwell_s`: the time to drain the queued prefill
  tokens, the backlog that arrivals beyond the split's prefill capacity add over `dwell_s`,
  and one typical prompt (the mean of recent arrivals), at that split's prefill speed (slowed by
  contention while decode runs), plus the M/D/1 queueing wait at the split's prefill utilization
  (arrival rate / capacity). Without the arrival term an idle moment makes the smallest prefill split look
  best, and the next burst swings it back (seen on the H200: 16 <-> 112 every 10 s);
- TPOT: one decode step on the remaining SMs (slowed by contention while prefill has work) of
  the batch decode settles at there (`settled_step_ms`: Little's law, for the demand the engine
  serves now or the arrivals bring, whichever is more).
Every prefill time takes the ratio of the engine's observed prefill iteration to the model's on the current
split (`prefill_speed_factor`), so that each split's capacity, and with it the backlog and the queueing wait,
is that of the speed the engine actually runs at. Both are then multiplied by a correction from observed
latencies: (observed / predicted at
the current split) ** `observed_weight`, clamped, when enough samples are in the view. An engine
whose decode is paced (`EngineView.decode_pace_ms`) is expected to show TPOT no lower than its pace
while prompts arrive: observed TPOT is compared with the larger of the two, so that the pace does not
read as a slow model; the splits' slack is that of their unpaced steps (the pace is the same on every
split and no target at risk). A split's
TPOT takes instead the ratio observed while that split itself last ran, if within
`tpot_memory_s` and under the arrivals of now (a split never seen, the largest of those seen on splits with
as many decode SMs or more): a ratio measured on a wide decode partition says little about a narrow one, where
the step is most sensitive to the model's errors, and one measured under another load (`load_changed`) says
little about this one (on the H200, 2026-12-04, run 18: 72 prefill SMs read 2.25 times the modelled TPOT in a
burst of chat, and a minute later documents waited on 64 for whole windows (P90 TTFT 1.5-2.5 s), every
split with more prefill SMs predicted past TPOT's target by that ratio).
Each split scores its normalized min slack, min(1 - TTFT / target, 1 - TPOT / target).
The current split is kept while no target is at risk (`at_risk`: predicted slack under
`comfort_slack`, or observed latency past its target); otherwise, on the side that relieves
the target at risk (more prefill SMs for TTFT, fewer for TPOT), the best split wins (toward
decode: the nearest one predicted comfortable, if any), if its score beats the current
split's by more than `margin` (hysteresis) and at least `dwell_s` passed since this engine's
split last changed. A move that only the prediction asks for (no target observed past, no new
load), from a split predicted within `margin` of its targets or better, goes one split step at a time
(unless `comfort_slack` is 1 or more, which chases the best), and so does one toward decode that only TTFT's
evidence backs, or toward prefill that only TPOT's does (`_max_steps`): far from the current split the model's
errors grow, and a snapshot early in a load's ramp reads its arrival rate low (in simulation, chat at
40 req/s and TPOT <= 12 ms: two seconds in, TPOT predicted at 9.0 of 12 ms on 64 prefill SMs sent the
split to 24 with the rate read at 8.9K of ~20K prompt tokens/s, and 47% of the requests met both targets;
every fixed split from 56 to 80 kept 100%). A move toward prefill waits for evidence (TTFT observed past its
target, or a new load) unless the current split is predicted past a target by more than a quarter
(`urgent_slack`), or `comfort_slack` is 1 or more: a move toward prefill slows decode beyond its settled pace
for a moment (on the H200, runs 20-21, decode streamed about half its tokens in the half second after such
moves), and a TTFT risk that is only predicted often passes (run 20: 64 -> 72 under chat at 40.6 req/s, TTFT
predicted at 1,174 ms on 64 and observed at 496; the move back came 3 s later, and a fixed 64 kept 95.0% of the
window's requests where the policy kept 78.5%; in simulation with that transient, 6 seeds, 79.92% -> 80.36%
over the suite, 82.35% -> 82.57% without it). So does a move toward decode (TPOT observed past its target, or
the decode step past it): the TTFT a snapshot predicts, with an empty queue, can sit far under the one observed
(H200, run 22, documents at 4.4-6.7 req/s, TTFT <= 1.5 s, TPOT <= 15 ms: 88 -> 80 five times with TTFT
predicted at 345-828 ms on 88, its correction at or near the clamp, observed at 1,132-1,869 ms, and TPOT observed
within its target; 80 -> 72 with P90 TTFT observed at 1,194 ms, and 72 -> 88 urgently 5 s later; a fixed 88 kept
100% at 4.4 and 5.5 req/s, the policy 83.3-100%). In simulation, 6 seeds: 82.57% -> 82.70% over the suite, 80.36% -> 80.72% with the
switch transient, 85.05% on the fresh profile either way. A switch is urgent when the current split is
predicted past a target by more than a quarter of it (slack under `urgent_slack`), observed past
it too (for TTFT: or the arrivals changed since the split was last chosen or held as fine, `load_changed`: their
prompt length or prompt-token rate moved by `load_change_ratio` or more), and the new split
is predicted within a quarter of both targets: then `urgent_dwell_s` is enough (on the H200
a wrong split held for a whole dwell queued a burst's prompts for seconds, and, with the
threshold at twice the target, another kept TPOT past its target for 10 s). So is a move that
goes on toward prefill after a move toward prefill, from a split still predicted past a target
(slack under 0) to one predicted within both: a first move that fell short leaves the prompts
queueing (H200, 2026-12-03, run 12: a step from 2 to 53 req/s of chat found a server on 64
prefill SMs; it moved to 72 and held that for the 10 s dwell, and 44% of the window's requests
met both targets; in simulation, 90.6% on average without this rule, 97.1% with it). Such
moves only add prefill SMs, up to the largest split, so they cannot flap. So is a move toward decode from a
split whose TPOT is observed past its target and predicted past it by any amount: a decode step past the target
fails nearly every request decoding (in simulation, documents at 4 req/s moved 64 -> 96, where TPOT stayed past
12 ms, short of urgent, for the whole 10 s dwell: 48% of the window's requests met both targets, 58% with this
rule), to the nearest split predicted within TPOT's target and by `margin` above the current split's slack
(`nearest_tpot_relief`), not the split of the most slack far toward decode; for `dwell_s` after such a move,
no urgent move goes back to that split or beyond (`tpot_ceiling`), so the two do not alternate. Otherwise at most
60 / urgent_dwell_s + 1 switches in any minute, and 60 / dwell_s + 1 while no split is
predicted within a quarter of both targets (an overload cannot flap fast). The policy sees changes in the views: one it
proposed counts from its proposal, any other from when it is first seen; a proposal the caller
does not apply is simply made again next time.

A policy instance may serve many engines (the controller calls it per GPU); its
state is kept per `engine_id`. Time comes from `view.time` (seconds on any clock the
caller keeps consistent; when 0, the policy reads `time.monotonic()`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from actors.slo.latency_model import LatencyModel
from actors.slo.types import (
    EngineView, FixedPolicy, ReactivePolicy, SLOTargets, SplitDecision, SplitPolicy, nearest_split, percentile,
)

POLICIES: tuple[str, ...] = ("reactive", "model", "fixed")


@dataclass(frozen=True)
class ModelPolicyConfig:
    """Knobs of `ModelPolicy`.

    margin: gain in normalized min slack a new split must bring (hysteresis band).
    comfort_slack: a split predicted to keep at least this min slack, and observed to meet both targets
        (given `min_observed` samples), is kept, however much better another looks: the policy moves
        only when the current split is at risk (`at_risk`), toward the side that relieves the target
        at risk, so it does not chase the optimum of a moment (an empty queue would hand decode
        nearly every SM just before the next burst arrives). 1 or more: always chase the best.
    dwell_s: minimum seconds between two switches of one engine, and so the horizon over which
        arrivals beyond a split's prefill capacity are predicted to build a backlog.
    observed_weight: 0 ignores observed latencies, 1 trusts their ratio to the model fully.
    min_observed: samples needed before observed latencies count (warm-up filter).
    max_correction: the observed/predicted ratio is clamped to [1/x, x].
    chunk_tokens: prefill tokens per iteration (the engine's max_prefill_tokens).
    typical_prompt_tokens: prompt length assumed for a new arrival and for a queue whose request count
        is unknown, when the view does not report the mean prompt length of recent arrivals.
    typical_context_tokens: context per sequence assumed when nothing decodes.
    max_step: at most this many split steps per decision (0: jump to the best).
    urgent_slack: a current split predicted under this slack (-0.25: a target missed by a quarter), and observed
        past that target, may switch after `urgent_dwell_s` instead of `dwell_s`, to a split predicted at
        this slack or above.
    urgent_dwell_s: the dwell of an urgent switch (at most `dwell_s`).
    load_change_ratio: arrivals whose mean prompt length or prompt-token rate is this many times (or this
        fraction of) what they were when the current split was chosen, or last held as comfortable or best,
        count as a new load: a TTFT predicted past target under it is evidence enough for an urgent switch,
        before any is observed (on the H200, chat giving way to 5,900-token documents waited out a 10 s
        dwell, 2026-12-03). Prompts queue at once; not so TPOT, whose batch builds over seconds from
        lengths a load change mixes (in simulation, a 2-request batch of documents' 6,000-token contexts
        at the chat's request rate predicted 54 ms), so TPOT still needs an observation.
    tpot_memory_s: how long the TPOT ratio (observed / predicted) seen on a split corrects that split's
        predictions after the engine left it, while the arrivals stay what they were then (`load_changed`)
        (0: never; every split takes the current split's ratio).
    """

    margin: float = 0.1
    comfort_slack: float = 0.3
    dwell_s: float = 10.0
    observed_weight: float = 0.5
    min_observed: int = 8
    max_correction: float = 4.0
    chunk_tokens: int = 4096
    typical_prompt_tokens: int = 512
    typical_context_tokens: int = 1024
    max_step: int = 0
    urgent_slack: float = -0.25
    urgent_dwell_s: float = 2.0
    load_change_ratio: float = 2.0
    tpot_memory_s: float = 300.0

    def __post_init__(self) -> None:
        if self.margin < 0 or self.dwell_s < 0:
            raise ValueError("margin and dwell_s must be >= 0")
        if not 0.0 < self.comfort_slack:
            raise ValueError(f"comfort_slack must be > 0, got {self.comfort_slack}")
        if not 0.0 <= self.observed_weight <= 1.0:
            raise ValueError(f"observed_weight must be in [0, 1], got {self.observed_weight}")
        if self.max_correction < 1.0:
            raise ValueError(f"max_correction must be >= 1, got {self.max_correction}")
        if min(self.chunk_tokens, self.typical_prompt_tokens, self.typical_context_tokens) < 1:
            raise ValueError("chunk_tokens and the typical lengths must be >= 1")
        if self.min_observed < 1 or self.max_step < 0:
            raise ValueError("min_observed must be >= 1 and max_step >= 0")
        if self.tpot_memory_s < 0:
            raise ValueError(f"tpot_memory_s must be >= 0, got {self.tpot_memory_s}")
        if not self.load_change_ratio > 1.0:
            raise ValueError(f"load_change_ratio must be > 1, got {self.load_change_ratio}")
        if self.urgent_slack >= 0 or self.urgent_dwell_s < 0:
            raise ValueError(f"urgent_slack must be < 0 and urgent_dwell_s >= 0, got "
                             f"{self.urgent_slack} and {self.urgent_dwell_s}")


@dataclass(frozen=True)
class SplitPrediction:
    """Predicted latencies of one split (corrections applied), its normalized slack, and the factor its TPOT
    took from observations (`tpot_factors`)."""

    prefill_sms: int
    ttft_ms: float
    tpot_ms: float
    slack: float
    tpot_correction: float = 1.0


@dataclass
class _EngineState:
    """What the policy remembers of one engine: the split it last saw, when that split
    last changed, and the switch it last proposed (which the caller may not apply)."""

    seen_sms: int | None = None
    last_change: float | None = None
    last_side: int = 0  # +1: the last change gave prefill SMs, -1: decode, 0: none yet
    proposed: tuple[int, float, Load] | None = None  # (prefill SMs, time, the arrivals it was chosen for)
    change_times: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    tpot_ratios: dict[int, TpotRatio] = field(default_factory=dict)  # split -> its last observed TPOT ratio
    load: Load | None = None  # the arrivals when the current split was last chosen or held as fine
    tpot_ceiling: tuple[int, float] | None = None  # (split, time) the engine last left urgently for TPOT

    def observe(self, sms: int, now: float, load: Load) -> None:
        """Note the engine's current split and arrivals; a change counts from when it was proposed
        (if this policy proposed it) or from now (the caller switched on its own)."""
        if self.seen_sms is not None and sms != self.seen_sms:
            mine = self.proposed is not None and self.proposed[0] == sms
            when, self.load = (self.proposed[1], self.proposed[2]) if mine else (now, load)  # type: ignore[index]
            self.last_change = when
            self.last_side = 1 if sms > self.seen_sms else -1
            self.change_times.append(when)
            self.proposed = None
        self.seen_sms = sms


class Load(NamedTuple):
    """The arrivals a split was chosen for: prompt tokens per second and the mean prompt length."""

    tokens_per_s: float
    prompt_tokens: float

    @classmethod
    def of(cls, view: EngineView, cfg: ModelPolicyConfig) -> Load:
        return cls(view.arrival_tokens_per_s, float(typical_prompt_tokens(view, cfg)))


class TpotRatio(NamedTuple):
    """Observed / modelled TPOT on one split, when, and under which arrivals."""

    ratio: float
    time: float
    load: Load


def load_changed(before: Load, now: Load, ratio: float) -> bool:
    """Whether the prompt-token rate or the mean prompt length moved by a factor of `ratio` or more (arrivals
    starting or stopping count as a change)."""
    def moved(a: float, b: float) -> bool:
        if a <= 0 or b <= 0:
            return (a > 0) != (b > 0)
        return max(a / b, b / a) >= ratio

    return moved(before.tokens_per_s, now.tokens_per_s) or moved(before.prompt_tokens, now.prompt_tokens)


def min_slack(ttft_ms: float, tpot_ms: float, targets: SLOTargets) -> float:
    """min(1 - TTFT / target, 1 - TPOT / target): 1 is idle, 0 on target, < 0 missing."""
    return min(1.0 - ttft_ms / targets.ttft_ms, 1.0 - tpot_ms / targets.tpot_ms)


MAX_UTILIZATION = 0.95  # queueing (a prefill wait, a settled decode batch) is evaluated at most at this utilization


@dataclass(frozen=True)
class PrefillLoad:
    """Prompt arrivals against one split's prefill capacity (see `prefill_load`)."""

    utilization: float  # arrival rate / capacity; > 1: the queue grows
    backlog_tokens: float  # tokens the queue grows by over the horizon
    wait_ms: float  # mean queueing wait of a typical prompt


def prefill_load(model: LatencyModel, arrival_tokens_per_s: float, p_sms: int, concurrent: bool,
                 cfg: ModelPolicyConfig, typical: int | None = None, speed: float = 1.0) -> PrefillLoad:
    """Prompt tokens arriving at `arrival_tokens_per_s` in prompts of `typical` tokens (default
    `cfg.typical_prompt_tokens`) on `p_sms` prefill SMs (model SMs), the model's prefill times multiplied by
    `speed` (`prefill_speed_factor`).

    Capacity is full `chunk_tokens` iterations of typical prompts. Over the horizon `dwell_s`
    (a new split is held at least that long) the backlog grows by what exceeds capacity; the
    wait is M/D/1's rho S / (2 (1 - rho)), S one typical prompt's prefill, rho capped at
    `MAX_UTILIZATION`.
    """
    if arrival_tokens_per_s <= 0:
        return PrefillLoad(0.0, 0.0, 0.0)
    chunk, typical = cfg.chunk_tokens, typical or cfg.typical_prompt_tokens
    chunk_ms = speed * model.prefill_queue_ms(chunk, max(1, round(chunk / typical)), p_sms, concurrent, chunk)
    capacity = 1000.0 * chunk / chunk_ms  # tokens/s
    rho = arrival_tokens_per_s / capacity
    service_ms = speed * model.prefill_queue_ms(typical, 1, p_sms, concurrent, chunk)
    r = min(rho, MAX_UTILIZATION)
    return PrefillLoad(rho, max(0.0, arrival_tokens_per_s - capacity) * cfg.dwell_s, service_ms * r / (2 * (1 - r)))


def predict_raw(model: LatencyModel, view: EngineView, prefill_sms: int, cfg: ModelPolicyConfig,
                speed: float = 1.0) -> tuple[float, float]:
    """(TTFT ms, TPOT ms) of `view`'s load under `prefill_sms` prefill SMs, before the corrections from observed
    latencies; the model's prefill times multiplied by `speed` (`prefill_speed_factor`)."""
    scale = model.total_sms / max(1, view.total_sms)  # a view of another SM count maps onto the model's
    p_sms = model_sms(model, view, prefill_sms)
    d_sms = max(1, model.total_sms - p_sms)
    queued = max(0, view.waiting_prefill_tokens)
    typical = typical_prompt_tokens(view, cfg)
    n_queued = view.num_prefill_requests or math.ceil(queued / typical)
    busy = view.num_decoding > 0
    load = prefill_load(model, view.arrival_tokens_per_s, p_sms, busy, cfg, typical, speed)
    n_backlog = math.ceil(load.backlog_tokens / typical)
    ttft = speed * model.prefill_queue_ms(round(queued + load.backlog_tokens) + typical,
                                          n_queued + n_backlog + 1, p_sms, concurrent=busy,
                                          chunk_tokens=cfg.chunk_tokens) + load.wait_ms
    batch = max(1, view.num_decoding)
    context = view.decode_context_tokens if view.num_decoding > 0 else cfg.typical_context_tokens
    current_d_sms = max(1, model.total_sms - round(view.prefill_sms * scale))
    tpot = settled_step_ms(model, batch, max(1, context), current_d_sms, d_sms, queued > 0 or load.utilization > 0,
                           arrival_decode(view))
    return ttft, tpot


def prefill_speed_factor(model: LatencyModel, view: EngineView, cfg: ModelPolicyConfig) -> float:
    """How much longer than the model says the engine's prefill iterations take on its current split (observed /
    predicted mean iteration, clamped to `max_correction`), from iterations of at least a quarter of
    `chunk_tokens` on average (1.0 otherwise: small iterations are mostly fixed costs, which say little about
    a full queue's pace).

    This is a speed, so it scales every split's prefill times, and with them each split's capacity and so the
    backlog and queueing terms, where an error counts most near saturation. On the H200 (2026-12-03, run 13)
    the committed profile put prefill at 27-29K tokens/s on 80-88 SMs beside decode, where the serving
    engine ran at 25K at the power cap: 26.7K prompt tokens/s of chat looked within 80 SMs' capacity, the
    policy gave decode SMs back, and the prompts queued for seconds. A TTFT correction alone cannot tell
    this apart, since it scales each split's TTFT by the same factor."""
    return model.observed_prefill_speed(view.prefill_iteration_ms, view.prefill_iteration_tokens,
                                        typical_prompt_tokens(view, cfg), model_sms(model, view),
                                        view.num_decoding > 0, cfg.chunk_tokens, cfg.max_correction)


def model_sms(model: LatencyModel, view: EngineView, sms: int | None = None) -> int:
    """`sms` of `view`'s engine (default: its prefill SMs) as SMs of `model`'s device, which may have another count."""
    return max(1, round((view.prefill_sms if sms is None else sms) * model.total_sms / max(1, view.total_sms)))


class ArrivalDecode(NamedTuple):
    """The decode demand the arrivals bring (`arrival_decode`)."""

    demand: float  # sequences per ms of step: requests per ms x output tokens each
    context: float  # tokens per sequence while it decodes: its prompt and half its output


def arrival_decode(view: EngineView) -> ArrivalDecode:
    """What the decode batch settles at once every queued prompt has been prefilled, from the arrivals' rate
    and lengths (zeros when either is unknown).

    A request's output is taken as the mean of recently finished ones, or the latest arrivals' mean `max_tokens`
    if less: finished requests are the previous load's for a while after the load changes. On the H200 a chat
    window after a documents window (run 13) began with the documents' 204-token outputs applied to the chat's
    arrival rate (92-token outputs), the settled batch looked too slow on the current split, and the policy gave
    decode SMs the prompts then needed (the same in simulation)."""
    if view.arrival_tokens_per_s <= 0 or view.mean_prompt_tokens < 1 or view.mean_output_tokens <= 0:
        return ArrivalDecode(0.0, 0.0)
    output = min(view.mean_output_tokens, view.mean_max_tokens) if view.mean_max_tokens > 0 else view.mean_output_tokens
    demand = view.arrival_tokens_per_s / view.mean_prompt_tokens / 1000.0 * output
    return ArrivalDecode(demand, view.mean_prompt_tokens + output / 2)


def settled_step_ms(model: LatencyModel, batch: int, context: int, current_sms: int, sms: int, concurrent: bool,
                    arrivals: ArrivalDecode = ArrivalDecode(0.0, 0.0)) -> float:
    """The decode step on `sms` decode SMs once the batch has settled there, for the decode demand the engine
    serves now: `batch` sequences (holding `context` tokens) in steps of `current_sms` SMs, or the `arrivals`'
    (with their own context per sequence) if they bring more.

    Little's law: a sequence stays for as many steps as it has tokens to produce, so the batch is demand x step
    (demand = batch / step now). With the model's step alpha + beta * batch on `sms`, it settles at
    alpha / (1 - demand * beta), evaluated at most at `MAX_UTILIZATION`. Fewer decode SMs make each request stay
    longer and the batch grow (on the H200, TPOT at 28 decode SMs went past 25 ms within 7 s of a switch chosen
    for a step of 17 ms predicted at the batch of the moment). The arrivals' demand comes with their own lengths:
    as chat gave way to documents, two documents (6,000 tokens of context each) decoding at the chat's request
    rate predicted 54 ms at a split that served both loads (in simulation).
    """
    per_seq = context / batch

    def step(b: float, on: int) -> float:
        return model.decode_step_ms(round(b), round(per_seq * b), on, concurrent)

    demand = batch / step(batch, current_sms)
    if arrivals.demand > demand:
        demand, per_seq = arrivals.demand, arrivals.context
    beta = (step(2 * batch, sms) - step(batch, sms)) / batch  # the step is linear in the batch
    alpha = step(batch, sms) - beta * batch
    return alpha / (1.0 - min(demand * beta, MAX_UTILIZATION))


def typical_prompt_tokens(view: EngineView, cfg: ModelPolicyConfig) -> int:
    """The mean prompt length of `view`'s recent arrivals, else `cfg.typical_prompt_tokens`. A fixed 512 made
    arxiv-like prompts (about 4,000 tokens) look eight times cheaper to queue behind than they are."""
    return round(view.mean_prompt_tokens) if view.mean_prompt_tokens >= 1 else cfg.typical_prompt_tokens


def paced_tpot_ms(view: EngineView) -> float:
    """The TPOT an engine's decode pace holds its requests to while prompts arrive or wait (0: none)."""
    busy = view.waiting_prefill_tokens > 0 or view.arrival_tokens_per_s > 0
    return view.decode_pace_ms if busy else 0.0


def observed_correction(observed: tuple[float, ...], predicted: float, q: float, cfg: ModelPolicyConfig) -> float:
    """(P_q of observed / predicted) ** weight, clamped; 1.0 with too few samples."""
    if len(observed) < cfg.min_observed or predicted <= 0:
        return 1.0
    return correction_factor(percentile(observed, q) / predicted, cfg)


def tpot_factors(splits: tuple[int, ...], current: int, current_factor: float, remembered: Mapping[int, float]
                 ) -> dict[int, float]:
    """Each split's TPOT correction: the current split's and the remembered ones for themselves; any other
    split takes the largest of those on splits with no more prefill SMs than it (the model's decode error is
    taken to grow as the decode partition shrinks), or the current split's if there are none."""
    known = {**remembered, current: current_factor}
    factors = {}
    for s in splits:
        wider = [f for k, f in known.items() if k <= s]
        factors[s] = known.get(s, max(wider, default=current_factor))
    return factors


def correction_factor(ratio: float, cfg: ModelPolicyConfig) -> float:
    """An observed / predicted ratio as a factor on predictions: clamped to `max_correction`, ** `observed_weight`."""
    return clamped_ratio(ratio, cfg) ** cfg.observed_weight


def clamped_ratio(ratio: float, cfg: ModelPolicyConfig) -> float:
    """`ratio` within [1 / `max_correction`, `max_correction`]."""
    return min(cfg.max_correction, max(1.0 / cfg.max_correction, ratio))


class ModelPolicy:
    """Model-based split choice; see the module docstring. Implements `SplitPolicy`.

    `model` is one `LatencyModel`, or a mapping engine_id -> model (with an optional
    "*" entry as the default) when engines run on different devices.
    """

    def __init__(self, model: LatencyModel | Mapping[str, LatencyModel], config: ModelPolicyConfig | None = None) -> None:
        self.models: Mapping[str, LatencyModel] = {"*": model} if isinstance(model, LatencyModel) else dict(model)
        self.config = config or ModelPolicyConfig()
        self._states: dict[str, _EngineState] = {}

    def model_for(self, engine_id: str) -> LatencyModel:
        m = self.models.get(engine_id) or self.models.get("*")
        if m is None:
            raise KeyError(f"no latency model for engine {engine_id!r}")
        return m

    def predict(self, view: EngineView, targets: SLOTargets) -> tuple[list[SplitPrediction], dict[str, float]]:
        """Corrected predictions for every split of `view`, and the correction details."""
        cfg, model = self.config, self.model_for(view.engine_id)
        current = nearest_split(view.splits, view.prefill_sms)
        speed = prefill_speed_factor(model, view, cfg)
        raw = {s: predict_raw(model, view, s, cfg, speed) for s in view.splits}
        q = 100.0 * targets.attainment
        expected_tpot = max(raw[current][1], paced_tpot_ms(view))
        c_ttft = observed_correction(view.ttft_ms, raw[current][0], q, cfg)
        c_tpot = observed_correction(view.tpot_ms, expected_tpot, q, cfg)
        f_tpot = tpot_factors(view.splits, current, c_tpot, self._remembered_tpot(view, current))
        preds = [SplitPrediction(s, t * c_ttft, p * f_tpot[s], min_slack(t * c_ttft, p * f_tpot[s], targets), f_tpot[s])
                 for s, (t, p) in raw.items()]
        info = {"ttft_correction": c_ttft, "tpot_correction": c_tpot, "prefill_speed_correction": speed,
                "arrival_tokens_per_s": view.arrival_tokens_per_s,
                "typical_prompt_tokens": float(typical_prompt_tokens(view, cfg)), "model_tpot_ms": expected_tpot}
        if view.ttft_ms:
            info["observed_ttft_ms"] = percentile(view.ttft_ms, q)
        if view.tpot_ms:
            info["observed_tpot_ms"] = percentile(view.tpot_ms, q)
        return preds, info

    def _remembered_tpot(self, view: EngineView, current: int) -> dict[int, float]:
        """The TPOT corrections of the splits other than `current` seen within `tpot_memory_s` under the arrivals
        of now (split -> factor, as `observed_correction` makes it)."""
        state, cfg = self._states.get(view.engine_id), self.config
        if state is None or cfg.tpot_memory_s <= 0:
            return {}
        now, load = _now(view), Load.of(view, cfg)
        return {s: correction_factor(r.ratio, cfg) for s, r in state.tpot_ratios.items()
                if s != current and now - r.time <= cfg.tpot_memory_s
                and not load_changed(r.load, load, cfg.load_change_ratio)}

    def _remember_tpot(self, state: _EngineState, view: EngineView, current: int, info: Mapping[str, float],
                       now: float, load: Load) -> None:
        """Note the current split's observed / modelled TPOT under `load`, given `min_observed` samples in the view."""
        if len(view.tpot_ms) >= self.config.min_observed and info["model_tpot_ms"] > 0:
            state.tpot_ratios[current] = TpotRatio(info["observed_tpot_ms"] / info["model_tpot_ms"], now, load)

    def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
        if not view.splits:
            raise ValueError(f"engine {view.engine_id!r} reports no splits")
        cfg = self.config
        now = _now(view)
        state = self._states.setdefault(view.engine_id, _EngineState())
        current = nearest_split(view.splits, view.prefill_sms)
        load = Load.of(view, cfg)
        state.observe(current, now, load)
        preds, info = self.predict(view, targets)
        self._remember_tpot(state, view, current, info, now, load)
        by_sms = {p.prefill_sms: p for p in preds}
        cur = by_sms[current]
        needs = at_risk(cur, view, targets, cfg)
        side = 1 if needs == {"ttft"} else -1 if needs == {"tpot"} else 0
        new_load = "ttft" in needs and state.load is not None and load_changed(state.load, load, cfg.load_change_ratio)
        evident = (observed_past(view, targets, cfg) & needs) | ({"ttft"} if new_load else set())
        best = self._best(view.splits, current, preds, targets, side, self._max_steps(cur, evident, targets))
        tpot_missed = ("tpot" in evident and targets.tpot_ms < cur.tpot_ms and cur.slack >= cfg.urgent_slack
                       and best.prefill_sms < current)  # a small miss: relieved by the nearest split that does
        if tpot_missed:
            best = nearest_tpot_relief(preds, current, targets, cur.slack + cfg.margin) or best
        gain = best.slack - cur.slack
        recent = sum(1 for t in state.change_times if now - t < 60.0)
        predicted = {
            **info,
            "ttft_ms": cur.ttft_ms, "tpot_ms": cur.tpot_ms, "slack": cur.slack,
            "best_sms": float(best.prefill_sms), "best_ttft_ms": best.ttft_ms, "best_tpot_ms": best.tpot_ms,
            "best_slack": best.slack, "gain": gain, "switches_last_minute": float(recent),
        }
        at = f"{_describe(cur, targets)} at {current}"
        if best.prefill_sms == current or not needs:
            state.load = load
            if best.prefill_sms == current:
                return SplitDecision(current, f"hold: best split; {at}", predicted)
            return SplitDecision(current, f"hold: comfortable (slack {cur.slack:+.2f} >= {cfg.comfort_slack:.2f}); "
                                          f"{at}", predicted)
        if gain <= cfg.margin:
            return SplitDecision(current, f"hold: within hysteresis band (gain {gain:+.2f} <= {cfg.margin:.2f} "
                                          f"for {best.prefill_sms}); {at}", predicted)
        relieved = "ttft" if best.prefill_sms > current else "tpot"
        if relieved not in evident and cur.slack >= cfg.urgent_slack and cfg.comfort_slack < 1.0:
            unseen = "not observed nor a new load" if relieved == "ttft" else "not observed"
            return SplitDecision(current, f"hold: a {relieved.upper()} risk predicted only, {unseen} (slack "
                                          f"{cur.slack:+.2f} >= {cfg.urgent_slack:.2f}); {at}", predicted)
        ceiling = state.tpot_ceiling
        back_up = (ceiling is not None and best.prefill_sms >= ceiling[0] > current
                   and now - ceiling[1] < cfg.dwell_s)
        urgent = ((cur.slack < cfg.urgent_slack or tpot_missed) and best.slack >= cfg.urgent_slack and bool(evident)
                  and not back_up)
        onward = best.prefill_sms > current and state.last_side > 0 and cur.slack < 0 <= best.slack
        dwell = min(cfg.urgent_dwell_s, cfg.dwell_s) if urgent or onward else cfg.dwell_s
        last = state.last_change
        if last is not None and now - last < dwell:
            wait = dwell - (now - last)
            return SplitDecision(current, f"hold: dwell ({wait:.1f} s left) before {best.prefill_sms}; {at}", predicted)
        state.proposed = (best.prefill_sms, now, load)
        if urgent and tpot_missed:
            state.tpot_ceiling = (current, now)
        predicted.update(ttft_ms=best.ttft_ms, tpot_ms=best.tpot_ms, slack=best.slack)
        side = "prefill" if best.prefill_sms > current else "decode"
        why = (f"{'urgent ' if urgent else ''}switch {current}->{best.prefill_sms} (more SMs to {side}): {at}; "
               f"{_describe(best, targets)} at {best.prefill_sms} (gain {gain:+.2f} > {cfg.margin:.2f}); "
               f"arrivals {load.tokens_per_s:.0f} prompt tokens/s in {load.prompt_tokens:.0f}-token prompts")
        if new_load and state.load is not None:
            why += f" (at the last switch: {state.load.tokens_per_s:.0f} in {state.load.prompt_tokens:.0f}-token)"
        why += f"; queued {view.waiting_prefill_tokens} prompt tokens"
        if "observed_ttft_ms" in info:
            why += f", P{100 * targets.attainment:.0f} TTFT observed {info['observed_ttft_ms']:.0f} ms"
        why += (f"; corrections: TTFT x{info['ttft_correction']:.2f}, TPOT x{cur.tpot_correction:.2f} "
                f"(at {best.prefill_sms}: x{best.tpot_correction:.2f}), "
                f"prefill time x{info['prefill_speed_correction']:.2f}")
        return SplitDecision(best.prefill_sms, why, predicted, urgent=urgent)

    def _max_steps(self, cur: SplitPrediction, evident: set[str], targets: SLOTargets) -> tuple[int, int]:
        """(toward decode, toward prefill): the split steps one decision may take each way (0: any). One, unless
        that side's target is observed past or under a new load (`evident`: TTFT moves toward prefill, TPOT
        toward decode), or the current split is predicted past its binding target by more than `margin`, or
        `comfort_slack` >= 1 (chase the best). Evidence for one target frees only the moves that relieve it: a
        burst's queued prompts still in the view (P90 TTFT 1.8 s observed) sent 64 prefill SMs to 16, the far
        decode end, once the queue had drained and TPOT sat just under `comfort_slack`; the next burst found
        16 (H200, 2026-12-04, run 19)."""
        cfg = self.config
        if cfg.comfort_slack >= 1.0:
            return cfg.max_step, cfg.max_step
        free = set(evident)
        if cur.slack < -cfg.margin:
            free.add("ttft" if cur.ttft_ms / targets.ttft_ms >= cur.tpot_ms / targets.tpot_ms else "tpot")
        return (cfg.max_step if "tpot" in free else 1), (cfg.max_step if "ttft" in free else 1)

    def _best(self, splits: tuple[int, ...], current: int, preds: list[SplitPrediction], targets: SLOTargets,
              side: int = 0, max_steps: tuple[int, int] = (0, 0)) -> SplitPrediction:
        """Within `max_steps` (toward decode, toward prefill; 0: any), on the `side` of the current split (+1:
        more prefill SMs, -1: fewer, 0: either; the current split is always a candidate): toward decode, the
        nearest split predicted comfortable (slack >= `comfort_slack`) by more than `margin` over the current
        one; toward prefill, when the split of the highest slack is predicted past its targets and past TPOT's,
        the highest slack of those predicted within TPOT's, if any; otherwise the highest slack (ties to the
        nearest split).

        Within TPOT's target first when no split meets both: a decode step past the target fails every request
        decoding, a prefill short of its queue those that wait in it (in simulation, chat at 45 req/s and TPOT
        <= 12 ms on an engine whose prefill ran 15% slower than the profile: the most slack, 88 prefill SMs,
        predicted TTFT 1,152 ms and TPOT 13.5 ms, and 27% of the requests met both targets; the policy now stops
        at 80 and keeps 40%; 72 held throughout kept 91%). When no split toward prefill keeps TPOT's target, one
        is taken only if it brings TTFT within its own, else the current split stays: TPOT given up for a TTFT
        still missed fails both (in simulation, documents at 5 req/s, TTFT <= 1.5 s, TPOT <= 15 ms: a burst sent
        96 -> 112, TPOT 30 ms predicted there; 85.3% -> 90.4% of the requests within both with the hold).

        Toward decode the nearest comfortable one, not the most slack: a snapshot with an empty queue makes
        the far end look best (in simulation, TPOT at risk one second into chat after documents sent 104
        prefill SMs to 64, on an arrival rate still read from the documents; the chat's prompts then queued
        for the whole dwell). Toward prefill the most slack: a queue left to build under a timid move has to
        be drained afterwards (on the H200 an arxiv burst moved 64 -> 88 -> 104 in two urgent steps and kept
        P90 TTFT past target, 2026-12-03)."""
        def most_slack(candidates: list[SplitPrediction]) -> SplitPrediction:
            return max(candidates, key=lambda p: (round(p.slack, 9), -abs(p.prefill_sms - current)))

        i = splits.index(current)
        toward_decode, toward_prefill = (n or len(splits) for n in max_steps)
        allowed = [p for j, p in enumerate(preds) if -toward_decode <= j - i <= toward_prefill and (j - i) * side >= 0]
        if side < 0:
            enough = max(self.config.comfort_slack, preds[i].slack + self.config.margin)
            comfortable = [p for p in allowed if p.slack >= enough and p.prefill_sms != current]
            if comfortable:
                return min(comfortable, key=lambda p: abs(p.prefill_sms - current))
        best = most_slack(allowed)
        if best.prefill_sms > current and best.slack < 0 and best.tpot_ms > targets.tpot_ms:
            decode_within = [p for p in allowed if p.tpot_ms <= targets.tpot_ms and p.prefill_sms >= current]
            if decode_within:
                return most_slack(decode_within)
            return best if best.ttft_ms <= targets.ttft_ms else preds[i]
        return best


def nearest_tpot_relief(preds: list[SplitPrediction], current: int, targets: SLOTargets, min_slack: float
                        ) -> SplitPrediction | None:
    """The split with the most prefill SMs below `current` predicted within TPOT's target at a slack above
    `min_slack` (None: none)."""
    relief = [p for p in preds if p.prefill_sms < current and p.tpot_ms <= targets.tpot_ms and p.slack > min_slack]
    return max(relief, key=lambda p: p.prefill_sms, default=None)


def _now(view: EngineView) -> float:
    """The view's time, or `time.monotonic()` where the caller keeps none."""
    return view.time if view.time > 0 else time.monotonic()


def observed_past(view: EngineView, targets: SLOTargets, cfg: ModelPolicyConfig) -> set[str]:
    """The targets ("ttft", "tpot") observed past target at the target percentile, given `min_observed` samples;
    TPOT also when the engine's recent decode step is past it (a TPOT sample comes only when a request ends:
    in simulation, chat's batch after documents pushed the step past 40 ms seconds before the first one)."""
    q = 100.0 * targets.attainment
    past = {name for name, seen, target in (("ttft", view.ttft_ms, targets.ttft_ms), ("tpot", view.tpot_ms, targets.tpot_ms))
            if len(seen) >= cfg.min_observed and percentile(seen, q) > target}
    if view.decode_step_ms > targets.tpot_ms:
        past.add("tpot")
    return past


def at_risk(cur: SplitPrediction, view: EngineView, targets: SLOTargets, cfg: ModelPolicyConfig) -> set[str]:
    """The targets ("ttft", "tpot") at risk on the current split: observed past target (`observed_past`),
    or the binding one of a prediction whose slack is under `comfort_slack`. The policy moves only for
    these, and only to the side that helps."""
    risky = observed_past(view, targets, cfg)
    if cur.slack < cfg.comfort_slack:
        risky.add("ttft" if cur.ttft_ms / targets.ttft_ms >= cur.tpot_ms / targets.tpot_ms else "tpot")
    return risky


def _describe(p: SplitPrediction, targets: SLOTargets) -> str:
    return (f"TTFT {p.ttft_ms:.0f}/{targets.ttft_ms:.0f} ms, TPOT {p.tpot_ms:.1f}/{targets.tpot_ms:.1f} ms, "
            f"slack {p.slack:+.2f}")


def make_policy(name: str, model: LatencyModel | Mapping[str, LatencyModel] | None = None,
                config: ModelPolicyConfig | None = None, step: int = 1) -> SplitPolicy:
    """`reactive`: the semi-PD paper's P90 rule moving `step` splits at a time (no model);
    `model`: `ModelPolicy` over `model` with `config`; `fixed`: keep the split the engine has.
    """
    if name == "fixed":
        return FixedPolicy()
    if name == "reactive":
        return ReactivePolicy(step=step)
    if name == "model":
        if model is None:
            raise ValueError("the model policy needs a latency model (see actors.slo.latency_model.load_or_profile)")
        return ModelPolicy(model, config)
    raise ValueError(f"unknown split policy {name!r}; choose from {', '.join(POLICIES)}")


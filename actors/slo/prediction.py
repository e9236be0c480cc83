"""What a split would give: the latency model applied to an engine's live load, before any correction from
observed latencies (`ModelPolicy` applies those).

`predict_raw(model, view, split, cfg)` is (TTFT ms, TPOT ms) of `view`'s load on `split` prefill SMs: TTFT of a
prompt arriving within the next `cfg.dwell_s` (the queued prompts, the backlog of arrivals beyond the split's
prefill capacity over that horizon, one typical prompt, and the M/D/1 queueing wait: `prefill_load`), and TPOT
of the decode batch once it settles on the split (`settled_step_ms`). Prefill times scale by the engine's
observed prefill speed (`prefill_speed_factor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from actors.slo.latency_model import LatencyModel
from actors.slo.types import EngineView

if TYPE_CHECKING:
    from actors.slo.policy import ModelPolicyConfig

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

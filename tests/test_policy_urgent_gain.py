"""Urgent moves from a split far past its target to one still past it, but much better (`urgent_gain`), and the
bound on switching they keep (`UrgentMove`: no urgent move goes back over a split an urgent one left within
`dwell_s`)."""

from __future__ import annotations

import math

import pytest

from actors.slo.policy import ModelPolicy, ModelPolicyConfig
from actors.slo.types import EngineView, SLOTargets, SplitDecision

from support import H100, committed_model
from test_slo import TARGETS, h100_llama8b, view

RUN28_TARGETS = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)


def documents_on(prefill_sms: int, t: float, queued: int, ttft_ms: float, tokens_per_s: float,
                 prompt_tokens: float, tpot_ms: float = 10.0) -> EngineView:
    """An H100 engine serving ~6,000-token documents (run 28): 8 requests decoding, `queued` prompt tokens
    waiting, P90 TTFT observed at `ttft_ms`, TPOT at `tpot_ms`."""
    model = committed_model(H100)
    return EngineView("gpu0", prefill_sms, model.total_sms, model.splits, waiting_prefill_tokens=queued,
                      num_decoding=8, decode_context_tokens=8 * 6_000, ttft_ms=(ttft_ms,) * 20, tpot_ms=(tpot_ms,) * 20,
                      time=t, num_prefill_requests=max(1, queued // 6_000), arrival_tokens_per_s=tokens_per_s,
                      mean_prompt_tokens=prompt_tokens, mean_output_tokens=180.0, mean_max_tokens=180.0,
                      decode_step_ms=tpot_ms)


def burst_after_a_move_to_64(t: float, config: ModelPolicyConfig | None = None) -> tuple[ModelPolicy, SplitDecision]:
    """Run 28, 15:33:42.9: the engine moved 80 -> 64 prefill SMs (at 100.5 s here) with 3,835 prompt tokens queued;
    a burst of documents then queued 40,000 (56,135 ten seconds later) at 19,685 prompt tokens/s. The policy's
    decision on the view at `t`."""
    policy = ModelPolicy(committed_model(H100), config)
    policy.decide(documents_on(80, 100.0, 3_835, 475.0, 15_614.0, 6_245.0, 8.0), RUN28_TARGETS)  # x0.76 there
    policy.decide(documents_on(64, 100.5, 3_835, 475.0, 15_614.0, 6_245.0), RUN28_TARGETS)
    return policy, policy.decide(documents_on(64, t, 40_000, 3_355.0, 19_685.0, 5_753.0), RUN28_TARGETS)


def test_a_queue_no_split_drains_in_time_moves_to_the_best_split_after_the_urgent_dwell() -> None:
    """H100, run 28: 0.7 s after a move 80 -> 64 for TPOT, documents queued; TTFT was predicted at 8.0 s on 64 and
    80 was better, itself still past the target, and the policy waited out the whole 10 s dwell ("not urgent")
    while the queue grew to 56,000 tokens; the documents kept 8% of their SLO. A move that takes at least a quarter
    of the target off the binding latency (`urgent_gain`) from a split past it by a quarter, with evidence, waits
    only `urgent_dwell_s` (2 s)."""
    policy, soon = burst_after_a_move_to_64(101.2)
    assert soon.prefill_sms == 64 and "dwell (1.3 s left) before 80" in soon.reason, soon
    _, moved = burst_after_a_move_to_64(102.6)
    assert moved.urgent and moved.reason.startswith("urgent switch 64->80"), moved
    cfg = policy.config
    assert moved.predicted["slack"] < cfg.urgent_slack  # 80 is itself past the target by more than a quarter ...
    assert moved.predicted["gain"] >= cfg.urgent_gain  # ... and much better than 64
    _, without = burst_after_a_move_to_64(102.6, ModelPolicyConfig(urgent_gain=math.inf))
    assert without.prefill_sms == 64 and "dwell (7.9 s left) before 80" in without.reason, without


def test_urgent_gain_must_be_positive() -> None:
    with pytest.raises(ValueError, match="urgent_gain"):
        ModelPolicyConfig(urgent_gain=0.0)
    assert ModelPolicyConfig(urgent_gain=math.inf).urgent_gain == math.inf


# Overloads on both sides: prompts queued far past TTFT's target, and a decode batch far past TPOT's
PROMPTS_PILED = dict(queued=200_000, requests=400, decoding=64, context=64 * 2000, ttft=(20_000.0,) * 10)
DECODE_PILED = dict(queued=30_000, requests=60, decoding=400, context=400 * 3000, tpot=(200.0,) * 10)


def test_an_overload_that_punishes_every_move_does_not_make_the_split_flap() -> None:
    """An adversary shows, after every move toward prefill, a decode batch far past TPOT's target, and after every
    move toward decode, prompts queued far past TTFT's: no split is ever predicted within a quarter of both targets,
    and each move back looks a large gain. Moves urgent for their gain alone may not go back over a split an urgent
    move left within `dwell_s`, so of two successive switches between two splits one waits the dwell: at most
    120 / (dwell_s + urgent_dwell_s) + 2 switches a minute (12), not one every `urgent_dwell_s` (30)."""
    cfg = ModelPolicyConfig()
    policy, sms, toward_prefill, switches = ModelPolicy(h100_llama8b(), cfg), 64, False, []
    for i in range(1200):  # a decision every 0.5 s for 10 minutes
        t = 1000.0 + 0.5 * i
        v = view(sms, t=t, **(DECODE_PILED if toward_prefill else PROMPTS_PILED))
        assert max(p.slack for p in policy.predict(v, TARGETS)[0]) < cfg.urgent_slack
        d = policy.decide(v, TARGETS)
        if d.prefill_sms != sms:
            switches.append((t, d.urgent))
            toward_prefill, sms = d.prefill_sms > sms, d.prefill_sms
    times = [t for t, _ in switches]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(switches) >= 20 and any(gap < cfg.dwell_s for gap in gaps)  # it adapts, urgently at times
    assert all(gap >= cfg.urgent_dwell_s for gap in gaps)
    assert all(max(a, b) >= cfg.dwell_s for a, b in zip(gaps, gaps[1:]))  # no two quick switches in a row
    worst = max(sum(1 for s in times if t <= s < t + 60.0) for t in times)
    assert worst <= 120.0 / (cfg.dwell_s + cfg.urgent_dwell_s) + 2

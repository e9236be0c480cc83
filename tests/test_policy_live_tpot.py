"""The TPOT so far of the requests decoding now as evidence for the split policy (`EngineView.live_tpot_ms`):
published by the engine actor (`LiveDecodes`), read by the controller (`view_from_dict`), counted by
`ModelPolicy` as TPOT observed past its target when its percentile at the target's attainment is."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from actors.request import SamplingParams
from actors.slo.policy import ModelPolicy
from actors.slo.types import SLOTargets, SplitDecision
from cluster.bootstrap import EngineOptions
from cluster.controller import view_from_dict
from cluster.engine_client import GenerateRequest

from support import H100, H200, actor_stream, committed_model

RUN27_TARGETS = SLOTargets(ttft_ms=1500.0, tpot_ms=15.0)


def published(device: str, prefill_sms: int, t: float, finished: tuple[int, float, float],
              live_tpot_ms: tuple[float, ...], without_stalls_ms: tuple[float, ...] | None, **stats: float
              ) -> dict[str, Any]:
    """A view as an engine actor on `device` publishes it, `t` s in: its finished requests (`finished`: how many,
    their TTFT and TPOT in ms), the TPOT so far of the requests decoding (without stalls only if given), and the
    `stats` beside its split's."""
    model = committed_model(device)
    without = {} if without_stalls_ms is None else {"live_tpot_without_stalls_ms": list(without_stalls_ms)}
    n, ttft, tpot = finished
    return {"engine_id": "gpu0", "time": t, "ttft_ms": [ttft] * n, "tpot_ms": [tpot] * n,
            "live_tpot_ms": list(live_tpot_ms), **without,
            "stats": {"prefill_sms": prefill_sms, "total_sms": model.total_sms, "splits": list(model.splits),
                      **stats}}


def documents_on(prefill_sms: int, t: float, live_tpot_ms: tuple[float, ...] = (),
                 without_stalls_ms: tuple[float, ...] | None = None) -> dict[str, Any]:
    """What an engine serving arxiv documents at 5.5 req/s publishes (run 27): 18 requests decoding, the finished
    ones within both targets, the engine's mean decode step of the last 2 s under TPOT's target."""
    return published(H200, prefill_sms, t, (20, 600.0, 14.0), live_tpot_ms, without_stalls_ms,
                     waiting_prefill_tokens=4_000, num_waiting=1, num_decoding=18, decode_context_tokens=18 * 4_000,
                     arrival_tokens_per_s=21_000.0, arrival_mean_prompt_tokens=3_900.0, mean_output_tokens=210.0,
                     arrival_mean_max_tokens=210.0, recent_decode_step_ms=14.2, recent_prefill_ms=165.0,
                     recent_prefill_tokens=4_096.0)


def four_seconds_after_a_move_to_88(live_tpot_ms: tuple[float, ...],
                                    without_stalls_ms: tuple[float, ...] | None = None) -> SplitDecision:
    """The policy's decision on the view published 4 s after the engine moved 80 -> 88: past the urgent dwell
    (2 s), within the normal one (10 s)."""
    policy = ModelPolicy(committed_model(H200))
    policy.decide(view_from_dict(documents_on(80, 90.0)), RUN27_TARGETS)
    policy.decide(view_from_dict(documents_on(88, 100.0)), RUN27_TARGETS)
    return policy.decide(view_from_dict(documents_on(88, 104.0, live_tpot_ms, without_stalls_ms)), RUN27_TARGETS)


def test_requests_decoding_past_the_tpot_target_move_the_split_urgently_before_any_of_them_ends() -> None:
    """H200, run 27: documents at 5.5 req/s on 88 prefill SMs decoded at 14-16.5 ms against 15 for 7 s, while the
    finished requests were within the target (a TPOT sample comes only at a request's end, ~200 tokens later) and
    the engine's mean decode step stayed under it; the policy held 88 (predicted slack +0.05, 80 only 0.08-0.12
    better) and moved only after the arrivals ended, with 10 requests past TPOT's target. The TPOT so far of the
    requests decoding is observed, not predicted: past the target at P90 it moves the split toward decode
    urgently, to the nearest split predicted within TPOT's target."""
    held = four_seconds_after_a_move_to_88(())
    assert held.prefill_sms == 88 and "hysteresis" in held.reason, held  # run 27's state: nothing observed
    moved = four_seconds_after_a_move_to_88((15.5,) * 12)
    assert moved.urgent and moved.prefill_sms == 80 and moved.reason.startswith("urgent switch 88->80"), moved
    assert moved.predicted["tpot_ms"] <= RUN27_TARGETS.tpot_ms and moved.predicted["live_tpot_ms"] == 15.5
    assert "TPOT so far of the 12 requests decoding 15.5 ms" in moved.reason
    within = four_seconds_after_a_move_to_88((14.0,) * 12)
    assert within.prefill_sms == 88, within


def test_documents_decoding_slowly_under_prefill_move_the_split_though_the_median_step_is_lower() -> None:
    """H100, run 31: documents at 5.5 req/s on 88 prefill SMs; the TPOT so far of the requests decoding passed 15
    ms for 8 s and 14 requests missed TPOT (82.9%; 80 pinned: 100%), while the policy, which then took the TPOT so
    far over the median step for stalls, held 88 within the hysteresis band. A step under a long prompt's prefill
    is slower than one without, so the median step is below the TPOT so far with no stall at all: the requests'
    TPOT so far without stalls is what tells the two apart. Where they did decode through stalls, the split
    holds."""
    slow_at_times = four_seconds_after_a_move_to_88((15.5,) * 12, (15.5,) * 12)
    assert slow_at_times.urgent and slow_at_times.prefill_sms == 80, slow_at_times
    assert "live_stall_ms" not in slow_at_times.predicted and "stalls)" not in slow_at_times.reason
    stalled = four_seconds_after_a_move_to_88((15.5,) * 12, (13.0,) * 12)
    assert stalled.prefill_sms == 88 and stalled.predicted["live_stall_ms"] == pytest.approx(2.5), stalled
    assert "TPOT 15.3/15.0 ms, slack -0.02 at 80" in stalled.reason  # a hold's reason gives what it held against
    assert "(2.5 of it stalls)" in stalled.reason


def test_the_requests_decoding_count_at_the_targets_percentile_given_enough_of_them() -> None:
    """Noise is not evidence: fewer requests decoding than `min_observed` (8) count for nothing, and one slow
    request of ten is under P90; two of ten are past it."""
    assert four_seconds_after_a_move_to_88((15.5,) * 5).prefill_sms == 88
    assert four_seconds_after_a_move_to_88((14.0,) * 9 + (17.0,)).prefill_sms == 88
    assert four_seconds_after_a_move_to_88((14.0,) * 8 + (15.6,) * 2).prefill_sms == 80


def test_the_controller_reads_the_live_tpot_samples_without_the_non_finite_ones() -> None:
    published = documents_on(88, 1.0, (15.0, 16.0))
    assert view_from_dict(published).live_tpot_ms == (15.0, 16.0)
    assert view_from_dict({**published, "live_tpot_ms": [math.nan, 15.0, math.inf]}).live_tpot_ms == (15.0,)
    assert view_from_dict({k: v for k, v in published.items() if k != "live_tpot_ms"}).live_tpot_ms == ()


def test_live_decodes_give_the_tpot_so_far_of_requests_with_enough_tokens_since_the_switch() -> None:
    from actors.gpu_actor import LIVE_TPOT_MIN_TOKENS, LiveDecodes

    live = LiveDecodes()
    live.update("a", first_wall=100.0, first=10.0, last=10.3, tokens=21)  # 20 tokens in 300 ms
    live.update("b", first_wall=105.0, first=15.0, last=15.5, tokens=LIVE_TPOT_MIN_TOKENS + 1)
    live.update("c", first_wall=106.0, first=16.0, last=16.1, tokens=LIVE_TPOT_MIN_TOKENS)  # too few so far
    assert sorted(live.tpot_ms()) == pytest.approx([15.0, 500.0 / LIVE_TPOT_MIN_TOKENS])
    assert live.tpot_ms(first_after=101.0) == pytest.approx([500.0 / LIVE_TPOT_MIN_TOKENS])  # a's began before
    live.update("a", first_wall=100.0, first=10.0, last=10.9, tokens=31)
    live.end("b")
    assert live.tpot_ms() == pytest.approx([30.0])


def test_live_decodes_give_the_tpot_so_far_without_the_stalls_decoded_through() -> None:
    """The engine's decode stall time at a request's first token and at its latest: what stalled in between is
    left out of its TPOT so far without stalls (a stall before its first token is not)."""
    from actors.gpu_actor import LiveDecodes

    live = LiveDecodes()
    live.update("a", first_wall=100.0, first=10.0, last=10.0, tokens=1, stalled_s=0.5)
    live.update("a", first_wall=100.0, first=10.0, last=10.6, tokens=21, stalled_s=0.7)  # 600 ms, 200 stalled
    live.update("b", first_wall=100.0, first=10.4, last=10.6, tokens=21, stalled_s=0.7)  # first seen here
    assert live.tpot_ms(min_tokens=1) == pytest.approx([30.0, 10.0])
    assert live.tpot_ms(min_tokens=1, without_stalls=True) == pytest.approx([20.0, 10.0])
    assert live.end("a") == pytest.approx(0.2)  # what its TPOT sample is told without
    assert live.end("a") == 0.0 and live.end("b") == 0.0


@pytest.mark.timeout(60)
def test_engine_actor_publishes_the_tpot_so_far_of_requests_decoding_since_the_switch(tiny_llama: Path) -> None:
    from actors.gpu_actor import LIVE_TPOT_MIN_TOKENS, EngineActor

    actor = EngineActor("local-live", EngineOptions(num_pages=256).engine_config(str(tiny_llama), "semi-pd"))
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def decoded_enough(stream: Any) -> None:
        async for chunk in stream:
            if chunk.num_output_tokens > LIVE_TPOT_MIN_TOKENS:
                return
        raise AssertionError("the request ended before it made enough tokens")

    async def main() -> None:
        info = await actor.ready()
        before = actor_stream(actor, GenerateRequest("before", [256, 1, 2], params))
        await decoded_enough(before)
        (tpot,) = actor.view()["live_tpot_ms"]
        assert tpot > 0
        (unstalled,) = actor.view()["live_tpot_without_stalls_ms"]  # what tells a stall from a slow step
        assert 0 < unstalled <= tpot
        target = next(s for s in info["splits"] if s != actor.llm.core.partitioner.current)
        assert (await actor.apply_split(target, "test"))["changed"]
        assert actor.view()["live_tpot_ms"] == []  # its first token came on the split before
        after = actor_stream(actor, GenerateRequest("after", [256, 3], params))
        await decoded_enough(after)
        assert len(actor.view()["live_tpot_ms"]) == 1
        for stream in (before, after):
            assert [c async for c in stream][-1].finish_reason == "length"
        assert actor.view()["live_tpot_ms"] == []  # ended: a TPOT sample now
        (sample,) = actor.view()["tpot_ms"]
        (unstalled,) = actor.view()["tpot_without_stalls_ms"]
        assert 0 < unstalled <= sample
        await actor.shutdown()

    asyncio.run(main())


RUN30_TARGETS = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)


def chat_on_64(t: float, live_tpot_ms: tuple[float, ...], without_stalls_ms: tuple[float, ...] | None
               ) -> dict[str, Any]:
    """What the engine serving chat at 32 req/s on 64 prefill SMs published 2.5 s into run 30's window (H100):
    29 requests past 16 tokens, most having decoded through two stalls of ~280 ms; the finished ones within
    both targets; a decode step of 9 ms when none stalls (the TPOT so far without stalls published if given)."""
    return published(H100, 64, t, (40, 150.0, 9.5), live_tpot_ms, without_stalls_ms,
                     waiting_prefill_tokens=3_313, num_waiting=6, num_decoding=45, decode_context_tokens=45 * 600,
                     arrival_tokens_per_s=20_692.0, arrival_mean_prompt_tokens=511.0, mean_output_tokens=200.0,
                     arrival_mean_max_tokens=200.0, recent_decode_step_ms=11.8, recent_prefill_ms=30.0,
                     recent_prefill_tokens=500.0)


def decision_after(first: dict[str, Any], then: dict[str, Any]) -> SplitDecision:
    """A fresh policy's decision on the H100 view `then`, after it saw `first` (60 s before: past every dwell)."""
    policy = ModelPolicy(committed_model(H100))
    policy.decide(view_from_dict(first), RUN30_TARGETS)
    return policy.decide(view_from_dict(then), RUN30_TARGETS)


def decision_on_64(live_tpot_ms: tuple[float, ...], without_stalls_ms: tuple[float, ...] | None) -> SplitDecision:
    """The policy's decision 60 s after the engine's last switch (to 64), given the view of `chat_on_64`."""
    return decision_after(chat_on_64(40.0, (), None), chat_on_64(100.0, live_tpot_ms, without_stalls_ms))


STALLED = (9.5,) * 2 + (29.7,) * 27  # P90 29.7 ms
WITHOUT_THE_STALLS = (9.5,) * 29


def test_decode_stalls_that_more_decode_sms_would_not_shorten_move_no_split() -> None:
    """H100, run 30: chat at 32 req/s on 64 prefill SMs, where a pinned 64 kept 97.9% of the same requests. Two
    stalls of ~280 ms put the P90 TPOT so far at 29.7 ms over a 9 ms step; the policy moved to 56 urgently for its
    predicted 10.3 ms, stalls went on there, it moved on to 48, and TTFT missed (74.8%), and 13.7% of the next
    window at 37 req/s (64 pinned: 96.9%). The stall is in every split's prediction: none gains enough."""
    unexplained = decision_on_64(STALLED, None)  # no TPOT so far without stalls published: all of it is the step's
    assert unexplained.urgent and unexplained.prefill_sms < 64, unexplained
    held = decision_on_64(STALLED, WITHOUT_THE_STALLS)
    assert held.prefill_sms == 64, held
    assert held.predicted["live_stall_ms"] == pytest.approx(29.7 - 9.5)


def test_a_slow_decode_step_still_moves_the_split_toward_decode() -> None:
    """When the requests decode as slowly without the stalls as with them, no stall explains it: more decode SMs
    do, and the move is urgent as before."""
    moved = decision_on_64((14.0,) * 29, (13.8,) * 29)
    assert moved.urgent and moved.prefill_sms < 64, moved
    assert "(0.2 of it stalls)" in moved.reason, moved.reason


def draining_on_64(t: float, without_stalls_ms: float | None, num_decoding: int = 6,
                   live_tpot_ms: tuple[float, ...] = ()) -> dict[str, Any]:
    """What the engine published at the end of chat's window at 37 req/s on 64 prefill SMs (H100, run 33): no
    prompt queued, `num_decoding` requests left decoding (run 33: a few), the window's arrivals still in the rate (read
    at half of them), and its finished requests at a P90 TPOT of 12.4 ms against 12 (decode stalled through the
    window), 11 ms less the stalls if given."""
    view = published(H100, 64, t, (60, 500.0, 12.4), live_tpot_ms, None, waiting_prefill_tokens=0,
                     num_decoding=num_decoding, decode_context_tokens=num_decoding * 700,
                     arrival_tokens_per_s=10_848.0, arrival_mean_prompt_tokens=407.0, mean_output_tokens=200.0,
                     arrival_mean_max_tokens=200.0, recent_decode_step_ms=7.0)
    if without_stalls_ms is not None:
        view["tpot_without_stalls_ms"] = [without_stalls_ms] * 60
    return view


def decide_on_64(without_stalls_ms: float | None, num_decoding: int = 6,
                 live_tpot_ms: tuple[float, ...] = ()) -> SplitDecision:
    """The policy's decision on `draining_on_64`'s view 60 s after its first (past every dwell)."""
    return decision_after(draining_on_64(40.0, None, num_decoding, live_tpot_ms),
                          draining_on_64(100.0, without_stalls_ms, num_decoding, live_tpot_ms))


def test_a_tpot_past_target_by_the_stalls_in_it_moves_no_split_toward_decode() -> None:
    """Run 33 (H100, 2026-12-06): with the window's TPOT samples past target, the policy moved the engine 64 -> 40
    (here, with a batch still decoding, urgently, to 48); the next window at 42 req/s came 15 s later, its prompts
    queued on 40 SMs, and it took four moves and 20 s to be back on 64 (8.4% within both targets).
    Less the decode stalls in them the samples are within target: more decode SMs would not shorten a stall, so
    no target is observed past and the split holds."""
    moved = decide_on_64(None, num_decoding=20)  # no TPOT samples without stalls published: all of the TPOT counts
    assert moved.urgent and moved.prefill_sms < 64, moved
    held = decide_on_64(11.0, num_decoding=20)
    assert held.prefill_sms == 64 and not held.urgent, held


def test_tpot_samples_of_requests_that_ended_are_no_evidence_once_their_batch_is_gone() -> None:
    """Run 36 (H100, 2026-12-06, no decode stall): chat's window at 34.5 req/s ended at a P90 TPOT of 12.8 ms
    against 12; on its finished requests' samples the policy moved the draining engine 64 -> 40, and the next
    window, at the same rate, began on 40 and kept 13.9% within both targets. A TPOT sample tells how the batch it
    decoded in went: with fewer than `min_observed` requests decoding, or with the TPOT so far of those decoding
    known (the batch of now), the finished requests' samples are no evidence, and the split holds."""
    assert decide_on_64(None, num_decoding=6).prefill_sms == 64
    assert decide_on_64(None, num_decoding=20, live_tpot_ms=(9.8,) * 12).prefill_sms == 64
    moved = decide_on_64(None, num_decoding=20, live_tpot_ms=(12.9,) * 12)
    assert moved.prefill_sms < 64 and "TPOT so far of the 12 requests decoding 12.9 ms" in moved.reason, moved


def warm_up_end_on_88(t: float) -> dict[str, Any]:
    """What the engine published as run 33's documents warm-up ended on 88 prefill SMs (H100): its queue drained,
    30 requests decoding 4,000-token contexts on 44 SMs at a TPOT of about 20 ms against 15, without stalls too."""
    return published(H100, 88, t, (40, 900.0, 19.5), (19.8,) * 20, (19.6,) * 20, waiting_prefill_tokens=0,
                     num_decoding=30, decode_context_tokens=30 * 4_000, arrival_tokens_per_s=12_000.0,
                     arrival_mean_prompt_tokens=4_000.0, mean_output_tokens=180.0, arrival_mean_max_tokens=180.0,
                     recent_decode_step_ms=19.0)


def test_a_move_toward_decode_takes_at_most_max_decode_steps() -> None:
    """Run 33: the warm-up's last seconds moved 88 -> 56 urgently on that TPOT (the nearest split predicted
    comfortable), and the first window's prompts queued on 56. A move toward decode, urgent or not, now takes at
    most `max_decode_steps` split steps (3: 24 SMs); the next decision may go on after the urgent dwell."""
    from actors.slo.policy import ModelPolicyConfig

    def decide(config: ModelPolicyConfig) -> SplitDecision:
        policy = ModelPolicy(committed_model(H100), config)
        policy.decide(view_from_dict(warm_up_end_on_88(40.0)), RUN27_TARGETS)
        return policy.decide(view_from_dict(warm_up_end_on_88(100.0)), RUN27_TARGETS)

    uncapped = decide(ModelPolicyConfig(max_decode_steps=0))
    assert uncapped.urgent and uncapped.prefill_sms == 56, uncapped
    capped = decide(ModelPolicyConfig())
    assert capped.urgent and capped.prefill_sms == 88 - 3 * 8, capped
    with pytest.raises(ValueError, match="max_decode_steps >= 0"):
        ModelPolicyConfig(max_decode_steps=-1)

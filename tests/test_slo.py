"""SLO controller logic: latency model fit and files, model/reactive policies, EDF order,
admission control, CPU profiling of the tiny model, and the engine wire-in."""

from __future__ import annotations

import json
import math
import pickle
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from actors.config import CacheConfig, EngineConfig, SLOConfig
from actors.engine.core import EngineCore
from actors.engine.partitioner import split_choices
from actors.kv.allocator import BlockAllocator
from actors.kv.manager import KVManager
from actors.request import Request, SamplingParams
from actors.scheduler.prefill import PrefillScheduler
from actors.slo.admission import (
    QUEUE_PRIORITY,
    TTFT_RATIO_BOUNDS,
    AdmissionConfig,
    AdmissionController,
    AdmissionRejected,
    QueueSnapshot,
)
from actors.slo.latency_model import (
    LatencyModel,
    PhaseModel,
    Sample,
    fit,
    load_model,
    load_models,
    load_or_profile,
    save_models,
)
from actors.slo.ordering import EDFOrder, FCFSOrder, make_order
from actors.slo.policy import (Load, ModelPolicy, ModelPolicyConfig, SplitPrediction, load_changed, make_policy,
                               new_prompt_load, tpot_factors)
from actors.slo.prediction import (
    ArrivalDecode, PrefillLoad, arrival_decode, paced_tpot_ms, predict_raw, prefill_load, prefill_speed_factor,
    settled_step_ms, typical_prompt_tokens,
)
from actors.slo.profiler import ProfileConfig, Profiler, engine_profile_key
from actors.slo.types import EngineView, ReactivePolicy, SLOTargets, SplitDecision

from support import H100, H200, committed_model, step_until

if TYPE_CHECKING:
    from engine_sim import SimResult

SPLITS = tuple(range(8, 128, 8))  # 8..120 prefill SMs of 132, fixed here (the partitioner may choose fewer)
TARGETS = SLOTargets(ttft_ms=1000.0, tpot_ms=50.0)


def h100_llama8b() -> LatencyModel:
    """Numbers of the shape DESIGN 3 gives: Llama-3-8B on an H100 (ms, full-GPU base)."""
    return LatencyModel(
        device="NVIDIA H100 80GB HBM3", model="LlamaForCausalLM:h4096", total_sms=132, splits=SPLITS,
        prefill=PhaseModel("compute", (0.03, 9e-7, 1.0), scale=1.0, contention=0.1),
        decode=PhaseModel("bandwidth", (0.02, 4.4e-5, 5.5), scale=26.6, contention=0.55),
    )


# The H200 latency profile (llama3-8b preset, 13 splits) the simulated scenarios below were worked out on: the one
# served with from 2026-12-03 to 2026-12-04 (its figures in their docstrings are this profile's, not a newer one's).
H200_PROFILE = Path(__file__).parent / "data/h200-profile-2026-12-03.json"
H200_SPLITS = tuple(range(16, 120, 8))  # every split of the H200's 132 SMs in steps of 8


def h200_view(prefill_sms: int, **fields: Any) -> EngineView:
    """A view of one H200 engine on `prefill_sms` (time 100 s unless given)."""
    return EngineView("gpu0", prefill_sms, 132, H200_SPLITS, **{"time": 100.0, **fields})


def view(prefill_sms: int = 64, queued: int = 0, requests: int = 0, decoding: int = 0, context: int = 0,
         ttft: tuple[float, ...] = (), tpot: tuple[float, ...] = (), t: float = 100.0) -> EngineView:
    return EngineView("gpu0", prefill_sms, 132, SPLITS, waiting_prefill_tokens=queued, num_decoding=decoding,
                      decode_context_tokens=context, ttft_ms=ttft, tpot_ms=tpot, time=t,
                      num_prefill_requests=requests)


PREFILL_HEAVY = dict(queued=20_000, requests=40, decoding=32, context=32 * 1500)
DECODE_HEAVY = dict(queued=0, requests=0, decoding=256, context=256 * 2000)
# TPOT observed past its target (evidence for a move toward decode), predicted short of comfortable, not past it:
# a move that is not urgent
DECODE_AT_RISK = dict(queued=0, requests=0, decoding=128, context=128 * 2000, tpot=(55.0,) * 10)


# -- latency model ------------------------------------------------------------------------


def synthetic_samples(truth: LatencyModel, noise: float = 0.0, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for sms in (16, 40, 64, 96, 120):
        dsms = truth.total_sms - sms
        for conc in (False, True):
            for tokens in (128, 512, 2048, 4096):
                for cached in (0, 2048):
                    ms = truth.prefill_ms(tokens, cached, sms, conc) * (1 + noise * rng.standard_normal())
                    out.append(Sample.prefill(tokens, cached, sms, ms, conc))
            for batch in (1, 16, 64, 256):
                for ctx in (256, 2048):
                    ms = truth.decode_step_ms(batch, batch * ctx, dsms, conc) * (1 + noise * rng.standard_normal())
                    out.append(Sample.decode(batch, batch * ctx, dsms, ms, conc))
    return out


def test_fit_recovers_known_parameters() -> None:
    truth = h100_llama8b()
    got = fit(synthetic_samples(truth), truth.device, truth.model, 132, SPLITS)
    for phase in ("prefill", "decode"):
        want, have = getattr(truth, phase), getattr(got, phase)
        np.testing.assert_allclose(have.coef, want.coef, rtol=1e-3, atol=1e-9)
        assert have.scale == pytest.approx(want.scale, rel=1e-3)
        assert have.contention == pytest.approx(want.contention, rel=1e-3)
        assert have.fit_error < 1e-6
    # the decode bandwidth curve saturates early: 32 of 132 SMs give ~0.7x (DESIGN 3)
    assert 1 / got.decode.slowdown(32, 132) == pytest.approx(0.70, abs=0.02)
    assert got.prefill.slowdown(66, 132) == pytest.approx(2.0, rel=1e-3)


def test_fit_recovers_contention_that_grows_with_the_other_phases_share() -> None:
    base = h100_llama8b()
    truth = replace(base, decode=replace(base.decode, contention=0.2, contention_slope=0.6))
    got = fit(synthetic_samples(truth), truth.device, truth.model, 132, SPLITS)
    assert (got.decode.contention, got.decode.contention_slope) == pytest.approx((0.2, 0.6), rel=1e-3)
    assert got.prefill.contention_slope == pytest.approx(0.0, abs=1e-6)
    # beside a wider prefill, decode slows by more than its fewer SMs say
    def ratio(concurrent: bool) -> float:
        return got.decode_step_ms(32, 32 * 700, 60, concurrent) / got.decode_step_ms(32, 32 * 700, 68, concurrent)

    wider = (1 + truth.decode.contention_at(60, 132)) / (1 + truth.decode.contention_at(68, 132))  # 72 vs 64 beside
    assert ratio(True) == pytest.approx(ratio(False) * wider, rel=1e-3) and wider > 1.02
    assert LatencyModel.from_dict(got.to_dict()) == got
    old = got.to_dict()
    del old["decode"]["contention_slope"]  # a profile saved before the slope existed
    assert LatencyModel.from_dict(old).decode.contention_slope == 0.0


def test_fit_with_noise_stays_close() -> None:
    truth = h100_llama8b()
    got = fit(synthetic_samples(truth, noise=0.03, seed=1), truth.device, truth.model, 132, SPLITS)
    for args in [(512, 0, 64), (4096, 2048, 120), (128, 0, 16)]:
        assert got.prefill_ms(*args) == pytest.approx(truth.prefill_ms(*args), rel=0.05)
    for args in [(64, 64 * 1024, 68), (1, 256, 24), (256, 256 * 2048, 116)]:
        assert got.decode_step_ms(*args) == pytest.approx(truth.decode_step_ms(*args), rel=0.05)
    assert got.decode.contention == pytest.approx(0.55, abs=0.05)


def test_fit_flat_when_sms_do_not_matter() -> None:
    """A CPU profile: the split changes nothing, so both curves come out flat."""
    samples = [Sample.prefill(n, 0, sms, 0.01 * n + 0.5) for n in (16, 64, 256) for sms in (8, 120)]
    samples += [Sample.decode(b, b * 64, 128 - sms, 0.1 * b + 0.4) for b in (1, 4, 16) for sms in (8, 120)]
    m = fit(samples, "cpu", "tiny", 128, split_choices(128))
    for sms in (8, 64, 120):
        assert m.prefill.slowdown(sms, 128) == pytest.approx(1.0, abs=1e-3)
        assert m.decode.slowdown(sms, 128) == pytest.approx(1.0, abs=1e-3)
    assert m.prefill.contention == 0.0


def test_fit_needs_samples() -> None:
    with pytest.raises(ValueError, match="at least 3 solo samples"):
        fit([Sample.prefill(16, 0, 8, 1.0)], "cpu", "tiny", 128, (8,))
    with pytest.raises(ValueError, match="ms must be positive"):
        Sample.decode(1, 16, 8, 0.0)


def test_prefill_queue_counts_iterations_and_attention() -> None:
    m = h100_llama8b()
    one = m.prefill_queue_ms(4096, 1, 132, chunk_tokens=4096)
    assert one == pytest.approx(m.prefill_ms(4096, 0, 132))
    # the same tokens as 8 short prompts: less attention work, same single iteration
    assert m.prefill_queue_ms(4096, 8, 132, chunk_tokens=4096) < one
    # twice the iterations adds one constant
    assert m.prefill_queue_ms(4096, 8, 132, chunk_tokens=2048) == pytest.approx(
        m.prefill_queue_ms(4096, 8, 132, chunk_tokens=4096) + m.prefill.coef[2])
    assert m.prefill_queue_ms(0, 0, 64) == 0.0


def test_json_round_trip_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "profiles.json"
    a = h100_llama8b()
    b = LatencyModel(device="cpu-x86_64-2t", model="tiny", total_sms=128, splits=(8, 64, 120),
                     prefill=PhaseModel("compute", (0.01, 0.0, 0.7), 0.0), decode=PhaseModel("bandwidth", (0.1, 0.0, 0.5), 0.0),
                     num_samples=12, meta={"seconds": 0.8})
    save_models(path, [a])
    save_models(path, [b])  # adds, keeps a
    doc = json.loads(path.read_text())
    assert doc["format"] == "semipd-latency-model" and set(doc["profiles"]) == {a.key, b.key}
    assert a.key.startswith("NVIDIA H100 80GB HBM3|LlamaForCausalLM:h4096|8,16,")
    loaded = load_models(path)
    assert loaded[a.key] == a and loaded[b.key] == b
    assert load_model(path, "nope") is None
    assert load_models(tmp_path / "missing.json") == {}

    def must_not_profile() -> LatencyModel:
        raise AssertionError("profiled although a saved profile exists")

    assert load_or_profile(path, a.key, must_not_profile) == a
    other = LatencyModel(device="other", model="tiny", total_sms=128, splits=(8, 64, 120), prefill=b.prefill, decode=b.decode)
    assert load_or_profile(path, other.key, lambda: other) == other
    assert load_model(path, other.key) == other  # saved
    path.write_text(json.dumps({"format": "semipd-latency-model", "version": 99, "profiles": {}}))
    with pytest.raises(ValueError, match="version 99"):
        load_models(path)


# -- model policy -------------------------------------------------------------------------


def test_model_policy_moves_to_prefill_when_queue_grows() -> None:
    policy = ModelPolicy(h100_llama8b())
    quiet = policy.decide(view(64, decoding=32, context=32 * 1500), TARGETS)
    assert quiet.prefill_sms == 64 and quiet.reason.startswith("hold")
    d = ModelPolicy(h100_llama8b()).decide(view(64, **PREFILL_HEAVY), TARGETS)
    assert d.prefill_sms > 64
    assert "more SMs to prefill" in d.reason and "switch 64->" in d.reason
    assert "; queued 20000 prompt tokens;" in d.reason  # what the queue was, beside what the model made of it
    seen = ModelPolicy(h100_llama8b()).decide(replace(view(64, **PREFILL_HEAVY), ttft_ms=(1500.0,) * 10), TARGETS)
    assert "; queued 20000 prompt tokens, P90 TTFT observed 1500 ms;" in seen.reason
    # nothing observed yet: the model as it is, and the reason says so (the benchmark's JSON keeps it)
    assert d.reason.endswith(f"corrections: TTFT x1.00, TPOT x1.00 (at {d.prefill_sms}: x1.00), prefill time x1.00")
    p = d.predicted
    assert p["ttft_ms"] < TARGETS.ttft_ms and p["tpot_ms"] < TARGETS.tpot_ms and p["slack"] > 0  # meets both
    assert p["best_sms"] == d.prefill_sms
    json.dumps(p)  # the benchmark logs it


def test_model_policy_moves_to_decode_when_tpot_at_risk() -> None:
    d = ModelPolicy(h100_llama8b()).decide(view(104, **DECODE_AT_RISK), TARGETS)
    assert d.prefill_sms < 104 and "more SMs to decode" in d.reason
    assert d.predicted["tpot_ms"] < TARGETS.tpot_ms


def test_a_move_toward_decode_waits_for_evidence_unless_the_prediction_is_dire() -> None:
    """TPOT predicted short of comfortable, nothing observed past its target, TTFT observed past its own: the split
    stays (H200 run 22, documents at TTFT <= 1.5 s: 88 -> 80 with TTFT predicted at 345 ms on 88, its correction at
    the clamp, and observed at 1,869 ms). TPOT observed past its target, it moves; predicted past it by more than a
    quarter (`urgent_slack`), it moves without waiting."""
    m = h100_llama8b()
    seen_ttft = (1200.0,) * 10
    unseen = ModelPolicy(m).decide(view(104, **DECODE_HEAVY), TARGETS)  # nothing observed at all
    assert unseen.prefill_sms == 104 and "TPOT risk predicted only" in unseen.reason
    waiting = ModelPolicy(m).decide(view(104, ttft=seen_ttft, **DECODE_HEAVY), TARGETS)
    assert waiting.prefill_sms == 104 and "TPOT risk predicted only" in waiting.reason
    assert ModelPolicyConfig().urgent_slack <= waiting.predicted["slack"] < ModelPolicyConfig().comfort_slack
    observed = ModelPolicy(m).decide(view(104, **dict(DECODE_AT_RISK, ttft=seen_ttft)), TARGETS)
    assert observed.prefill_sms < 104, observed.reason
    dire = dict(DECODE_HEAVY, decoding=384, context=384 * 2000)
    preds, _ = ModelPolicy(m).predict(view(104, **dire), TARGETS)
    assert next(p.slack for p in preds if p.prefill_sms == 104) < ModelPolicyConfig().urgent_slack
    assert ModelPolicy(m).decide(view(104, **dire), TARGETS).prefill_sms < 104


def test_model_policy_balances_slack() -> None:
    """The chosen split is the best min slack over all splits."""
    policy = ModelPolicy(h100_llama8b(), ModelPolicyConfig(margin=0.0))
    preds, _ = policy.predict(view(64, **PREFILL_HEAVY), TARGETS)
    best = max(preds, key=lambda p: p.slack)
    assert policy.decide(view(64, **PREFILL_HEAVY), TARGETS).prefill_sms == best.prefill_sms
    # more prefill SMs: faster TTFT, slower TPOT
    by = {p.prefill_sms: p for p in preds}
    assert by[120].ttft_ms < by[64].ttft_ms < by[8].ttft_ms
    assert by[120].tpot_ms > by[64].tpot_ms > by[8].tpot_ms


def test_model_policy_keeps_prefill_capacity_for_the_arrival_rate() -> None:
    """An empty queue between bursts must not hand prefill's SMs to decode when prompts keep
    arriving faster than the smaller split could prefill them (the H200 run swung 16 <-> 112)."""
    cfg = ModelPolicyConfig(margin=0.0, comfort_slack=1.0, max_decode_steps=0)  # chase the best split, any distance
    idle = view(96, decoding=128, context=128 * 1000)
    assert ModelPolicy(h100_llama8b(), cfg).decide(idle, TARGETS).prefill_sms <= 16  # nothing says load comes
    for rate in (10_000.0, 20_000.0):
        loaded = replace(idle, arrival_tokens_per_s=rate)
        d = ModelPolicy(h100_llama8b(), cfg).decide(loaded, TARGETS)
        assert prefill_load(h100_llama8b(), rate, d.prefill_sms, True, cfg).utilization < 1.05
        assert d.predicted["arrival_tokens_per_s"] == rate
        small = {p.prefill_sms: p for p in ModelPolicy(h100_llama8b(), cfg).predict(loaded, TARGETS)[0]}[16]
        assert small.ttft_ms > TARGETS.ttft_ms  # the backlog 16 SMs would build over the dwell time


def test_model_policy_keeps_a_comfortable_split_until_it_is_at_risk() -> None:
    idle = view(96, decoding=128, context=128 * 1000)
    held = ModelPolicy(h100_llama8b(), ModelPolicyConfig(margin=0.0)).decide(idle, TARGETS)
    assert held.prefill_sms == 96 and held.reason.startswith("hold: comfortable")
    assert held.predicted["best_slack"] > held.predicted["slack"] >= ModelPolicyConfig().comfort_slack
    # observed latencies past a target end the comfort, whatever the model predicts
    missing = replace(idle, tpot_ms=(60.0,) * 10)
    assert ModelPolicy(h100_llama8b(), ModelPolicyConfig(margin=0.0)).decide(missing, TARGETS).prefill_sms < 96
    # ... and the move is to the side that relieves that target, though the model likes the other side
    # better (the H200 run went 112 -> 24 while the TTFTs it had just seen were past target)
    late = replace(idle, ttft_ms=(1500.0,) * 10)
    assert ModelPolicy(h100_llama8b(), ModelPolicyConfig(margin=0.0)).decide(late, TARGETS).prefill_sms >= 96
    with pytest.raises(ValueError, match="comfort_slack"):
        ModelPolicyConfig(comfort_slack=0.0)


def test_model_policy_holds_a_steady_load() -> None:
    """Chasing the best split and blind to the arrival rate, the simulated engine reproduces the H200 swing
    (to few prefill SMs whenever the queue is empty, back when it has grown) and misses TTFT. Seeing the rate,
    or keeping a comfortable split (the default), the policy settles and meets both targets."""
    from engine_sim import Phase, simulate

    m, steady = h100_llama8b(), [Phase(120.0, 20_000 / 512, 512, 80)]

    def run(cfg: ModelPolicyConfig, hide: frozenset[str] = frozenset()) -> Any:
        return simulate(m, steady, TARGETS, 64, ModelPolicy(m, cfg), dt=0.01, hide=hide)

    blind = run(ModelPolicyConfig(comfort_slack=1.0, max_decode_steps=0), frozenset({"arrivals"}))
    assert len(blind.switches) >= 8 and min(to for _, _, to in blind.switches) <= 64 and blind.attainment < 0.9
    for settled in (run(ModelPolicyConfig(comfort_slack=1.0)), run(ModelPolicyConfig(), frozenset({"arrivals"}))):
        assert settled.attainment >= 0.98 and len(settled.switches) <= 3  # the first move waits for TTFT observed


def test_model_policy_plans_for_the_prompt_lengths_it_sees() -> None:
    """Poisson arrivals of 4,096-token prompts (arxiv-like) at TPOT <= 25 ms: told the arrivals' mean length, the
    policy meets both targets for 98% of them (seed 0: 98.6%) and never switches within a dwell. Assuming
    512-token prompts it underrated the queueing wait behind long prompts and kept too few prefill SMs (seed 0:
    93.9%) until moves that only the prediction asks for went one step at a time; since then the blind policy
    keeps 98.8% in this draw (seeds 1-3: 89.6 / 95.2 / 98.9% blind, 89.1 / 97.0 / 98.9% told), so the lengths'
    use is checked on the predictions (`test_model_policy_uses_the_mean_prompt_length_of_the_view`)."""
    from engine_sim import Phase, simulate

    m, tight = h100_llama8b(), SLOTargets(ttft_ms=1000.0, tpot_ms=25.0)
    arxiv = [Phase(120.0, 15_000 / 4096, 4096, 200)]
    told = simulate(m, arxiv, tight, 64, ModelPolicy(m), dt=0.01, hide=frozenset({"speed"}))
    assert told.attainment >= 0.98
    times = [t for t, _, _ in told.switches]
    assert all(b - a >= ModelPolicyConfig().dwell_s for a, b in zip(times, times[1:]))


def test_prompts_that_vary_in_length_wait_longer_than_alike_ones() -> None:
    """The simulation's prompts can vary (lognormal, `prompt_cv`) as real ones do: in 15 s of arxiv's 7 req/s on
    the H200 profile of 2026-12-03, a fixed 104 keeps 98.1-100% of the requests with alike prompts (seeds 0-3) and
    85.4% on average (65.7-97.2%) when their lengths vary by 0.8 of their mean, because a long prompt holds up
    the ones behind it (the H200 kept 89.5% there, run 9); the mean prompt stays the same."""
    from engine_sim import Phase, arrivals, simulate

    (h200,) = load_models(H200_PROFILE).values()
    tight = SLOTargets(ttft_ms=1000.0, tpot_ms=25.0)
    alike, varied = ([Phase(15.0, 7.0, 3400, 200, prompt_cv=cv)] for cv in (0.0, 0.8))
    lengths = [r.prompt for seed in range(4) for r in arrivals(varied, seed)]
    assert 0.9 < sum(lengths) / len(lengths) / 3400 < 1.1 and len(set(lengths)) > len(lengths) // 2
    kept = {name: [simulate(h200, phases, tight, 104, seed=seed).attainment for seed in range(4)]
            for name, phases in (("alike", alike), ("varied", varied))}
    assert min(kept["alike"]) >= 0.95 and sum(kept["varied"]) / 4 < sum(kept["alike"]) / 4 - 0.1, kept


def chat_on_64(model: LatencyModel, rate: float, seed: int, dynamic: bool = True, **sim: Any) -> SimResult:
    """15 s of simulated chat at `rate` req/s under TTFT <= 1 s, TPOT <= 12 ms, from 64 prefill SMs, moved by the
    model policy if `dynamic`; `sim`: more of `simulate`'s options."""
    from engine_sim import Phase, simulate

    chat = [Phase(15.0, rate, 495, 92, prompt_cv=1.0)]
    return simulate(model, chat, SLOTargets(ttft_ms=1000.0, tpot_ms=12.0), 64,
                    ModelPolicy(model) if dynamic else None, seed=seed, dt=0.01, **sim)


def test_the_simulated_switch_transient_costs_the_requests_decoding_through_it() -> None:
    """`switch_transient`: decode's steps twice slower for 0.5 s after a move toward prefill, as the H200
    streamed after such moves (runs 20-21). Chat at 45 req/s, TPOT <= 12 ms: the policy's one move 64 -> 72
    costs nothing without it and several points of attainment with it, where a split that never moves loses
    nothing; so a move must gain more than it costs (on the H200 a fixed 64 beat the dynamic policy at chat
    40.6, run 20)."""
    m = committed_model(H200)
    for seed in (0, 1):
        smooth = chat_on_64(m, 45.0, seed)
        slowed = chat_on_64(m, 45.0, seed, switch_transient=(0.5, 2.0))
        fixed = chat_on_64(m, 45.0, seed, dynamic=False, switch_transient=(0.5, 2.0))
        assert any(b > a for _, a, b in slowed.switches), slowed.switches
        assert smooth.attainment == fixed.attainment == 1.0
        assert slowed.attainment < fixed.attainment - 0.03, (slowed.attainment, slowed.switches)


def test_simulated_decode_stalls_move_no_split_where_the_policy_reads_the_tpot_without_them() -> None:
    """`stalls`: decode stands still for 200 ms, 0.3 times a second while prompts wait (the H100's first windows at
    a new load, run 30). Chat at 15 req/s under TPOT <= 12 ms on the H100 profile: without stalls the policy holds
    64 throughout and keeps every request; with them, a policy that cannot tell a stall from a slow step (no TPOT so
    far without stalls in the view) moves toward decode, where the one that reads it holds."""
    m = committed_model(H100)
    for seed in (0, 1):
        smooth = chat_on_64(m, 15.0, seed)
        stalled = chat_on_64(m, 15.0, seed, stalls=(0.3, 0.2))
        unread = chat_on_64(m, 15.0, seed, stalls=(0.3, 0.2), hide=frozenset({"stalls"}))
        assert smooth.switches == () and smooth.attainment == 1.0
        assert stalled.switches == (), stalled.switches
        assert unread.switches and all(b < a for _, a, b in unread.switches), unread.switches


def test_a_first_move_toward_prefill_that_falls_short_is_followed_without_a_full_dwell() -> None:
    """A step from light load (2 req/s) to 53 req/s of chat finds the engine on 64 prefill SMs, too few (as the
    warm-ups left the H200 servers, run 12). The first move comes while the arrival rate still reads low and
    may fall short (64 -> 72); with TTFT still predicted past its target there, the policy goes on toward
    prefill after `urgent_dwell_s`, not a whole dwell: nearly every request within both targets, as on a
    split held at 80-96 from the start (the whole dwell kept 87.7% on average here)."""
    from engine_sim import Phase, simulate

    (h200,) = load_models(H200_PROFILE).values()
    tight = SLOTargets(ttft_ms=1000.0, tpot_ms=25.0)
    step = [Phase(8.0, 2.0, 500, 92, prompt_cv=1.0), Phase(5.0, 0.01, 500, 92), Phase(15.0, 53.0, 500, 92, prompt_cv=1.0)]
    runs = [simulate(h200, step, tight, 64, ModelPolicy(h200), seed=seed, dt=0.01, hide=frozenset({"speed"}))
            for seed in range(4)]  # the rule alone: a prefill speed seen later may move it on after a full dwell
    assert sum(r.attainment for r in runs) / len(runs) >= 0.93, [(r.attainment, r.switches) for r in runs]
    onward = [(a, b) for r in runs for a, b in zip(r.switches, r.switches[1:]) if a[2] < b[2] and a[1] < a[2]]
    assert onward and all(b[0] - a[0] < ModelPolicyConfig().dwell_s for a, b in onward)


def test_prefill_speed_factor_compares_the_observed_iteration_with_the_model() -> None:
    """The engine's mean prefill iteration on its split against the model's for as many tokens: 1.0 when they
    agree or the iterations are too small to tell (under a quarter chunk), clamped to `max_correction`."""
    m, cfg = h100_llama8b(), ModelPolicyConfig()
    view = EngineView("e", 64, 132, SPLITS, num_decoding=8, decode_context_tokens=8 * 1000, mean_prompt_tokens=512.0)
    modelled = m.prefill_queue_ms(4096, 8, 64, concurrent=True, chunk_tokens=cfg.chunk_tokens)
    assert prefill_speed_factor(m, view, cfg) == 1.0  # nothing observed
    at = (lambda ms, tokens=4096.0: prefill_speed_factor(
        m, replace(view, prefill_iteration_ms=ms, prefill_iteration_tokens=tokens), cfg))
    assert at(modelled) == pytest.approx(1.0)
    assert at(1.15 * modelled) == pytest.approx(1.15)
    assert at(100 * modelled) == cfg.max_correction
    assert at(3 * modelled, tokens=cfg.chunk_tokens / 4 - 1) == 1.0
    loaded = replace(view, waiting_prefill_tokens=8000, arrival_tokens_per_s=15_000.0)
    slow = replace(loaded, prefill_iteration_ms=1.15 * modelled, prefill_iteration_tokens=4096.0)
    for sms in (64, 96):  # every split's prefill is slower, and TTFT with it
        assert predict_raw(m, loaded, sms, cfg, 1.15)[0] > predict_raw(m, loaded, sms, cfg)[0]
    (as_seen, *_), info = ModelPolicy(m).predict(slow, TARGETS)
    (as_modelled, *_), _ = ModelPolicy(m).predict(loaded, TARGETS)
    assert as_seen.ttft_ms > as_modelled.ttft_ms and info["prefill_speed_correction"] == pytest.approx(1.15)


def test_a_profile_that_overrates_prefill_is_corrected_by_the_observed_iterations() -> None:
    """The engine's prefill runs 15% slower than the H200 profile of 2026-12-03 says (on the H200 the serving engine
    prefilled at ~25K tokens/s where the profile said 27-29K, run 13). At 45 req/s of chat, a policy that sees
    only latencies gives decode SMs back too early and the prompts queue; one that sees the prefill iterations
    scales every split's prefill by what it observes and keeps nearly every request within both targets
    (seeds 0-3: 90-98% without, 97-100% with)."""
    from engine_sim import Phase, simulate, with_prefill_factor

    (h200,) = load_models(H200_PROFILE).values()
    tight, engine = SLOTargets(ttft_ms=1000.0, tpot_ms=25.0), with_prefill_factor(h200, 1.15)
    chat = [Phase(8.0, 2.0, 500, 92, prompt_cv=1.0), Phase(25.0, 45.0, 500, 92, prompt_cv=1.0)]

    def mean_attainment(hide: frozenset[str]) -> float:
        runs = [simulate(engine, chat, tight, 64, ModelPolicy(h200), seed=seed, dt=0.01, hide=hide)
                for seed in range(4)]
        return sum(r.attainment for r in runs) / len(runs)

    blind, seeing = mean_attainment(frozenset({"speed"})), mean_attainment(frozenset())
    assert seeing >= 0.97 and seeing > blind + 0.02, (blind, seeing)


def test_a_chat_after_documents_is_planned_with_the_chats_output_budget() -> None:
    """Documents (3,700-token prompts, 200 output tokens) at 7.5 req/s, a pause, then chat at 50 req/s (92 output
    tokens), on an engine whose prefill runs 15% slower than the profile says. For a while the finished requests
    are the documents': with their output lengths on the chat's arrival rate, the settled decode batch looks too
    slow and the policy gives decode SMs the chat's prompts need. The arrivals' max_tokens bound the output
    (TPOT <= 20 ms, seeds 0-5: 86.7% on average without them, 88.5% with them; 85.6% without them before a queue
    that cannot drain within the TTFT target counted as TTFT evidence, which brings the chat's SMs back sooner, and
    87.5% without them since a move that gains a quarter of the target is urgent where no split is within a quarter,
    `urgent_gain`, which does so sooner still; the H200 showed the move, run 13). At 25 ms the one-step limit on
    moves toward decode that no TPOT evidence backs (run 19) already keeps the chat's SMs: 87.4% without them, 87.6%
    with them (before `urgent_gain`)."""
    from engine_sim import Phase, simulate, with_prefill_factor

    (h200,) = load_models(H200_PROFILE).values()
    tight, engine = SLOTargets(ttft_ms=1000.0, tpot_ms=20.0), with_prefill_factor(h200, 1.15)
    shift = [Phase(15.0, 7.5, 3700, 200, prompt_cv=0.8), Phase(10.0, 0.01, 500, 92),
             Phase(15.0, 50.0, 500, 92, prompt_cv=1.0)]

    def mean_attainment(hide: frozenset[str]) -> float:
        runs = [simulate(engine, shift, tight, 96, ModelPolicy(h200), seed=seed, dt=0.01, hide=hide)
                for seed in range(6)]
        return sum(r.attainment for r in runs) / len(runs)

    without, bounded = mean_attainment(frozenset({"budgets"})), mean_attainment(frozenset())
    assert bounded > without + 0.005, (without, bounded)


def test_model_policy_uses_the_mean_prompt_length_of_the_view() -> None:
    m, cfg = h100_llama8b(), ModelPolicyConfig()
    short = EngineView("e", 64, 132, SPLITS, num_decoding=8, decode_context_tokens=8 * 1000,
                       arrival_tokens_per_s=12_000.0)
    long = replace(short, mean_prompt_tokens=4096.0)
    assert typical_prompt_tokens(short, cfg) == cfg.typical_prompt_tokens and typical_prompt_tokens(long, cfg) == 4096
    # the same token rate in long prompts: a longer own prefill and a longer wait behind each prompt
    assert predict_raw(m, long, 64, cfg)[0] > predict_raw(m, short, 64, cfg)[0]
    assert predict_raw(m, long, 64, cfg)[1] == predict_raw(m, short, 64, cfg)[1]
    assert prefill_load(m, 12_000.0, 64, True, cfg, 4096).wait_ms > prefill_load(m, 12_000.0, 64, True, cfg).wait_ms


def test_prefill_load_grows_with_rate_and_shrinks_with_sms() -> None:
    m, cfg = h100_llama8b(), ModelPolicyConfig()
    assert prefill_load(m, 0.0, 64, True, cfg) == PrefillLoad(0.0, 0.0, 0.0)
    low, high = prefill_load(m, 5_000.0, 64, True, cfg), prefill_load(m, 20_000.0, 64, True, cfg)
    assert 0 < low.utilization < high.utilization and low.wait_ms < high.wait_ms
    assert low.backlog_tokens == 0 and high.backlog_tokens > 0  # past capacity the queue grows over dwell_s
    assert prefill_load(m, 20_000.0, 120, True, cfg).utilization < high.utilization


def test_model_policy_stays_inside_hysteresis_band() -> None:
    v0 = view(64, **PREFILL_HEAVY)
    preds, _ = ModelPolicy(h100_llama8b()).predict(v0, TARGETS)
    by = {p.prefill_sms: p for p in preds}
    best = max(preds, key=lambda p: p.slack).prefill_sms
    neighbour = best - 8
    gain = by[best].slack - by[neighbour].slack
    assert 0 < gain < 0.2
    v = view(neighbour, **PREFILL_HEAVY)
    held = ModelPolicy(h100_llama8b(), ModelPolicyConfig(margin=gain + 0.01)).decide(v, TARGETS)
    assert held.prefill_sms == neighbour and "hysteresis" in held.reason
    chase = ModelPolicyConfig(margin=gain / 2, comfort_slack=1.0)  # a move on the prediction alone (see below)
    moved = ModelPolicy(h100_llama8b(), chase).decide(v, TARGETS)
    assert moved.prefill_sms == best


def test_a_move_toward_prefill_waits_for_evidence_unless_the_prediction_is_dire() -> None:
    """TTFT predicted past its target by less than a quarter, nothing observed: the split stays (a move toward
    prefill costs decode a transient; H200 run 20: 64 -> 72 on a predicted TTFT risk, back 3 s later, 78.5% of
    the window's requests within both targets where a fixed 64 kept 95.0%). Observed past its target, it moves;
    predicted past it by more than a quarter (`urgent_slack`), it moves without waiting."""
    cfg = ModelPolicyConfig(margin=0.01)
    m = h100_llama8b()
    waiting = ModelPolicy(m, cfg).decide(view(88, **PREFILL_HEAVY), TARGETS)
    assert waiting.prefill_sms == 88 and "TTFT risk predicted only" in waiting.reason
    assert cfg.urgent_slack <= waiting.predicted["slack"] < 0.0  # predicted past its target, by less than a quarter
    observed = ModelPolicy(m, cfg).decide(view(88, ttft=(1200.0,) * 10, **PREFILL_HEAVY), TARGETS)
    assert observed.prefill_sms > 88, observed.reason
    preds, _ = ModelPolicy(m, cfg).predict(view(64, **PREFILL_HEAVY), TARGETS)
    assert next(p.slack for p in preds if p.prefill_sms == 64) < cfg.urgent_slack
    assert ModelPolicy(m, cfg).decide(view(64, **PREFILL_HEAVY), TARGETS).prefill_sms > 64


def test_an_engine_with_no_prompt_queued_holds_a_move_toward_prefill_that_nothing_but_the_prediction_asks_for(
) -> None:
    """H100, run 31: 2 s after the last request of a documents window ended, the policy moved 72 -> 88 on an idle
    engine. The arrival rate it read (kept from the window, a third of the one at the last switch) counted as a new
    load, and the prefill speed of the window's last iterations (x3.30 the model's) put TTFT at 72 far past its
    target; the P90 TTFT observed was 884 ms against 1,500. The next window began on 88, and its requests missed
    TPOT for 9 s. With no prompt queued, a TTFT risk that is neither observed nor brought by a new load (prompts
    arriving twice as fast, or of another length) holds the split, however far past target it is predicted;
    arrivals growing past the rate the split was kept for still move it."""
    m = committed_model(H100)
    targets = SLOTargets(ttft_ms=1500.0, tpot_ms=15.0)
    iteration_ms = 3.3 * m.prefill_queue_ms(2_500, 1, 72, True, ModelPolicyConfig().chunk_tokens)

    def at_72(t: float, arrivals: float, decoding: int, ttft_ms: float, slow_prefill: bool = False) -> EngineView:
        speed = dict(prefill_iteration_ms=iteration_ms, prefill_iteration_tokens=2_500.0) if slow_prefill else {}
        return replace(view(72, decoding=decoding, context=decoding * 4_000, ttft=(ttft_ms,) * 10, t=t),
                       arrival_tokens_per_s=arrivals, mean_prompt_tokens=3_800.0, mean_output_tokens=170.0,
                       mean_max_tokens=170.0, **speed)

    def after(before: EngineView) -> SplitDecision:
        """The decision on the idle engine, its split last chosen (held as best or comfortable) under `before`."""
        policy = ModelPolicy(m)
        kept = policy.decide(before, targets)
        assert kept.reason.startswith(("hold: best split", "hold: comfortable")), kept
        return policy.decide(at_72(140.0, 8_514.0, 0, 884.0, slow_prefill=True), targets)

    idle = after(at_72(100.0, 26_240.0, 10, 700.0))
    assert idle.prefill_sms == 72 and "TTFT risk predicted only, with no prompt queued" in idle.reason, idle
    cfg = ModelPolicyConfig()
    assert idle.predicted["slack"] < cfg.urgent_slack and idle.predicted["gain"] > cfg.margin  # once a move
    faster = after(at_72(100.0, 2_000.0, 2, 300.0))
    assert faster.prefill_sms > 72 and faster.urgent, faster


def test_a_move_only_the_prediction_asks_for_goes_one_step_at_a_time() -> None:
    """Chat at 40 req/s and TPOT <= 12 ms, from 64 prefill SMs, on the H200 profile of 2026-12-03. Two seconds in, the
    arrival rate read from the first arrivals (8.9K of ~20K prompt tokens/s) made 24 prefill SMs look best while
    TPOT was only predicted short of comfortable, nothing observed past target: the policy jumped there, the
    prompts queued for seconds, and 47% of the requests met both targets (every fixed split from 56 to 80: 100%).
    One step at a time, it holds 64 and keeps them all (seeds 0-3)."""
    from engine_sim import Phase, simulate

    (h200,) = load_models(H200_PROFILE).values()
    chat = [Phase(15.0, 40.0, 495, 92, prompt_cv=1.0)]
    for seed in (0, 1):
        run = simulate(h200, chat, SLOTargets(ttft_ms=1000.0, tpot_ms=12.0), 64, ModelPolicy(h200), seed=seed, dt=0.01)
        assert run.attainment >= 0.99 and all(to >= 56 for _, _, to in run.switches), run


def test_a_move_toward_prefill_keeps_tpot_within_target_when_no_split_meets_both() -> None:
    """Chat at 45 req/s and TPOT <= 12 ms on an engine whose prefill runs 15% slower than the H200 profile of
    2026-12-03 says: prompts queue past TTFT's target and no split is predicted within both. The split of the most
    slack (seed 0: 88 prefill SMs, TTFT 1,152 ms and TPOT 13.5 ms predicted) put decode past its target for every
    request; the policy now stops at the best split predicted within TPOT's target (seed 0: 80, 40.3% of the
    requests within both targets against 27.2%; seed 2: 100% against 82.6%)."""
    from engine_sim import Phase, simulate, with_prefill_factor

    (h200,) = load_models(H200_PROFILE).values()
    chat, engine = [Phase(15.0, 45.0, 495, 92, prompt_cv=1.0)], with_prefill_factor(h200, 1.15)
    for seed, least in ((0, 0.4), (2, 0.99)):
        run = simulate(engine, chat, SLOTargets(ttft_ms=1000.0, tpot_ms=12.0), 64, ModelPolicy(h200), seed=seed, dt=0.01)
        assert run.attainment >= least and run.switches[0][2] <= 80, run


def test_an_engine_that_refuses_late_prompts_is_not_moved_past_tpot_for_ttft() -> None:
    """Chat at 37 req/s on the H100, `--admission reject` (serving's run 39, the second prompt set): 9,645 prompt
    tokens queued, 21.8k prompt tokens/s arriving in a burst. On 64 prefill SMs TTFT is predicted past target; on
    72, TTFT within and TPOT past it (13.1 ms against 12), as no split with more prefill SMs keeps TPOT. An engine
    that queues late prompts is moved to 72: else every prompt of the burst is late. One that refuses them holds
    64: there the burst costs the share refused, where 72 costs the TPOT of every request decoding (run 39: the
    dynamic server moved to 72 and kept 74.2%, 128 of its 540 admitted requests past TPOT; pinned 64 kept 82.3%).
    In simulation (`bench/policy_suite.py --admission reject`, H100 profile, 6 seeds) 70.83% -> 77.26%."""
    h100 = committed_model(H100)
    targets = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)
    burst = EngineView("gpu0", 64, 132, h100.splits, waiting_prefill_tokens=9645, num_decoding=30,
                       decode_context_tokens=30 * 620, ttft_ms=(1100.0,) * 10, time=100.0, num_prefill_requests=19,
                       arrival_tokens_per_s=21_800.0, mean_prompt_tokens=525.0, mean_output_tokens=92.0)
    queues = ModelPolicy(h100).decide(burst, targets)
    assert queues.prefill_sms == 72 and "TPOT 13.1/12.0 ms, slack -0.09 at 72" in queues.reason
    refuses = ModelPolicy(h100).decide(replace(burst, refuses_late=True), targets)
    assert refuses.prefill_sms == 64 and refuses.reason.startswith("hold: best split")
    assert "; not 72: TTFT" in refuses.reason and "TPOT 13.1/12.0 ms" in refuses.reason  # why 72 was not taken
    # a split that keeps TPOT is still taken: the engine refuses what it must, not what another split serves
    relaxed = ModelPolicy(h100).decide(replace(burst, refuses_late=True), SLOTargets(ttft_ms=1000.0, tpot_ms=15.0))
    assert relaxed.prefill_sms > 64 and relaxed.predicted["best_tpot_ms"] <= 15.0


def test_an_engine_that_refuses_late_prompts_gives_decode_sms_for_tpot_missed_by_more_than_it_would_refuse() -> None:
    """Chat at 24k prompt tokens/s on the H100's 64 prefill SMs, TPOT observed past its 12 ms target, TTFT within
    (the engine refuses what would be late). Every split within TPOT's target has less slack, its TTFT predicted
    past target: an engine that queues late prompts is moved toward prefill, one that refuses them toward decode,
    to the nearest split within TPOT's target where prefill turns away a share of the arrivals smaller, by the
    policy's margin (0.1), than the share of requests that missed TPOT, and stays while fewer missed it."""
    h100 = committed_model(H100)
    targets = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)
    missing = EngineView("gpu0", 64, 132, h100.splits, waiting_prefill_tokens=5000, num_decoding=40,
                         decode_context_tokens=40 * 620, ttft_ms=(700.0,) * 10, tpot_ms=(12.6,) * 10, time=100.0,
                         num_prefill_requests=9, arrival_tokens_per_s=24_000.0, mean_prompt_tokens=525.0,
                         mean_output_tokens=92.0)
    assert ModelPolicy(h100).decide(missing, targets).prefill_sms == 72
    refuses = ModelPolicy(h100).decide(replace(missing, refuses_late=True), targets)
    assert refuses.prefill_sms == 56 and refuses.predicted["gain"] < -0.5
    assert "TPOT missed by 100% of requests, 24% of arrivals refused there" in refuses.reason
    some = replace(missing, refuses_late=True, tpot_ms=(11.0,) * 7 + (12.3,) * 3)  # 30% against 56's 24% refused
    assert ModelPolicy(h100).decide(some, targets).prefill_sms == 64


def test_model_policy_bounds_switches_under_oscillating_load() -> None:
    """Load flips between prefill- and decode-heavy every 2 s for 10 minutes."""

    def simulate(cfg: ModelPolicyConfig, seen: bool = False) -> list[float]:
        """`seen`: the views also hold observed latencies far past the target the load strains (without it the
        decode-heavy half still holds TPOT samples just past its target: the evidence a move toward decode needs)."""
        policy, sms, switches = ModelPolicy(h100_llama8b(), cfg), 64, []
        for i in range(1200):  # a decision every 0.5 s
            t = 1000.0 + 0.5 * i
            load: dict[str, Any] = dict(PREFILL_HEAVY if int(t / 2) % 2 == 0 else DECODE_AT_RISK)
            if seen and load["queued"]:
                load["ttft"] = (5000.0,) * 10
            elif seen:
                load["tpot"] = (200.0,) * 10
            d = policy.decide(view(sms, t=t, **load), TARGETS)
            if d.prefill_sms != sms:
                switches.append(t)
                sms = d.prefill_sms
        return switches

    free = simulate(ModelPolicyConfig(dwell_s=0.0))
    assert len(free) > 250  # without dwell it follows every flip
    dwell = 10.0
    bounded = simulate(ModelPolicyConfig(dwell_s=dwell))
    assert len(bounded) >= 10  # still adapts
    worst = max(sum(1 for s in bounded if t <= s < t + 60) for t in bounded)
    assert worst <= 60 / dwell + 1
    assert all(b - a >= dwell for a, b in zip(bounded, bounded[1:]))
    urgent = simulate(ModelPolicyConfig(dwell_s=dwell, urgent_dwell_s=2.0), seen=True)
    assert len(urgent) > len(bounded)  # each flip leaves the last split far past a target, observed
    worst = max(sum(1 for s in urgent if t <= s < t + 60) for t in urgent)
    assert worst <= 60 / 2.0 + 1
    assert all(b - a >= 2.0 for a, b in zip(urgent, urgent[1:]))


def test_model_policy_state_is_per_engine() -> None:
    policy = ModelPolicy(h100_llama8b(), ModelPolicyConfig(dwell_s=30.0))
    assert policy.decide(view(64, t=10.0, **PREFILL_HEAVY), TARGETS).prefill_sms > 64
    v = EngineView("gpu1", 64, 132, SPLITS, waiting_prefill_tokens=20_000, num_decoding=32,
                   decode_context_tokens=48_000, time=11.0, num_prefill_requests=40)
    assert policy.decide(v, TARGETS).prefill_sms > 64  # gpu1 has its own dwell timer
    d = policy.decide(view(104, t=12.0, **DECODE_AT_RISK), TARGETS)
    assert d.prefill_sms == 104 and "dwell" in d.reason


def test_model_policy_leaves_a_split_far_past_its_target_after_the_urgent_dwell() -> None:
    """A burst lands on a split with little prefill (as after a lull): urgent once predicted past the TTFT
    target by more than a quarter, observed past it, and another split is predicted within a quarter of both
    targets. TPOT counts as observed past target when the engine's recent decode step is, before any request
    has finished to give a TPOT sample."""
    burst = dict(queued=10_000, requests=20, decoding=32, context=32 * 1500)

    def decide_after_a_change(seen_ttft: float, t: float, **load: int) -> SplitDecision:
        policy = ModelPolicy(h100_llama8b(), ModelPolicyConfig(dwell_s=30.0, urgent_dwell_s=2.0))
        policy.decide(view(64, t=10.0), TARGETS)
        policy.decide(view(16, t=11.0), TARGETS)  # the split changed to 16 at t = 11
        return policy.decide(view(16, ttft=(seen_ttft,) * 10, t=t, **load), TARGETS)

    urgent = decide_after_a_change(2500.0, 14.0, **burst)
    assert urgent.urgent and urgent.prefill_sms > 16 and urgent.reason.startswith("urgent switch 16->")
    assert urgent.predicted["slack"] >= 0  # the new split's
    too_soon = decide_after_a_change(2500.0, 12.5, **burst)
    assert too_soon.prefill_sms == 16 and "dwell (0.5 s left)" in too_soon.reason
    unconfirmed = decide_after_a_change(300.0, 14.0, **burst)  # observed TTFT within target: the full dwell
    assert unconfirmed.prefill_sms == 16 and "dwell (27.0 s left)" in unconfirmed.reason
    overload = decide_after_a_change(5000.0, 14.0, queued=200_000, requests=400, decoding=256, context=256 * 2000)
    assert overload.prefill_sms == 16 and not overload.urgent  # none reaches TTFT without giving up TPOT (`_best`)

    def decode_heavy_after_a_change(step_ms: float) -> SplitDecision:
        policy = ModelPolicy(h100_llama8b(), ModelPolicyConfig(dwell_s=30.0, urgent_dwell_s=2.0))
        policy.decide(view(64, t=10.0), TARGETS)
        policy.decide(view(112, t=11.0), TARGETS)
        return policy.decide(replace(view(112, t=14.0, decoding=320, context=320 * 2000), decode_step_ms=step_ms),
                             TARGETS)

    stepping_slowly = decode_heavy_after_a_change(80.0)
    assert stepping_slowly.urgent and stepping_slowly.prefill_sms < 112
    assert stepping_slowly.reason.startswith("urgent switch 112->")
    assert not decode_heavy_after_a_change(30.0).urgent  # steps within target: the full dwell
    with pytest.raises(ValueError):
        ModelPolicyConfig(urgent_slack=0.0)


def test_a_queue_the_engine_cannot_drain_within_the_ttft_target_is_evidence_before_any_first_token() -> None:
    """A TTFT sample comes only with a first token, seconds after a burst queued up: on the H100 (run 26) a queue
    of 56,000 prompt tokens, 4.5 s of work at the measured prefill speed, waited 10 s (the whole dwell) for 8 of
    them. The queued tokens at the speed the engine measured on its split are observed, not predicted: a request
    arriving now waits that long, so a queue that cannot drain within the target makes the move urgent."""
    burst = dict(queued=10_000, requests=20, decoding=32, context=32 * 1500)

    def decide_with_prefill_speed(tokens_per_ms: float) -> SplitDecision:
        policy = ModelPolicy(h100_llama8b(), ModelPolicyConfig(dwell_s=30.0, urgent_dwell_s=2.0))
        policy.decide(view(64, t=10.0), TARGETS)
        policy.decide(view(16, t=11.0), TARGETS)  # the split changed to 16 at t = 11
        measured = replace(view(16, t=14.0, **burst), prefill_iteration_ms=1000.0,
                           prefill_iteration_tokens=1000.0 * tokens_per_ms)
        return policy.decide(measured, TARGETS)

    backlog = decide_with_prefill_speed(2.0)  # 10,000 tokens: 5 s of work
    assert backlog.urgent and backlog.prefill_sms > 16 and backlog.reason.startswith("urgent switch 16->")
    draining = decide_with_prefill_speed(40.0)  # 0.25 s of work: a risk predicted, none observed yet
    assert draining.prefill_sms == 16 and not draining.urgent and "not observed" in draining.reason


def test_settled_decode_step_follows_littles_law() -> None:
    """The batch a decode demand settles at on each split: the current one's step on the current split, a
    growing batch (and a slower step than the current batch's) on fewer decode SMs, a shrinking one on more."""
    m = h100_llama8b()
    batch, context = 64, 64 * 600

    def now(sms: int) -> float:
        return m.decode_step_ms(batch, context, sms, True)

    def settled(sms: int) -> float:
        return settled_step_ms(m, batch, context, 68, sms, True)

    assert settled(68) == pytest.approx(now(68))
    assert settled(20) > now(20) and settled(116) < now(116)
    demand = batch / now(68)  # sequences per step-ms, as the step of the settled batch has it
    for sms in (20, 36, 116):
        settled_batch = demand * settled(sms)
        assert m.decode_step_ms(round(settled_batch), round(settled_batch * 600), sms, True) == pytest.approx(
            settled(sms), rel=0.01)
    # a prefill-starved moment: the arrivals (chat at 50 req/s, 97 output tokens each) bring more than the batch
    chat = EngineView("e", 68, 132, SPLITS, num_decoding=batch, decode_context_tokens=context,
                      arrival_tokens_per_s=50 * 496.0, mean_prompt_tokens=496.0, mean_output_tokens=97.0)
    floor = arrival_decode(chat)
    assert floor == pytest.approx((0.05 * 97, 496 + 97 / 2))
    assert arrival_decode(replace(chat, mean_output_tokens=0.0)) == (0.0, 0.0)
    # the arrivals' max_tokens bound the output when less (finished requests are an earlier load's for a while)
    assert arrival_decode(replace(chat, mean_output_tokens=204.0, mean_max_tokens=97.0)) == floor
    assert arrival_decode(replace(chat, mean_max_tokens=4096.0)) == floor  # a generous default bounds nothing
    assert floor.demand > demand and settled_step_ms(m, batch, context, 68, 36, True, floor) > settled(36)
    assert floor.demand * settled_step_ms(m, batch, context, 68, 36, True, floor) > batch  # the batch will grow
    # the arrivals' demand comes with their lengths, not the batch of the moment's (two documents of 6,000)
    docs_now = settled_step_ms(m, 2, 12_000, 68, 36, True, floor)
    assert docs_now == pytest.approx(settled_step_ms(m, 2, 2 * 545, 68, 36, True, floor), rel=0.01)
    assert docs_now < settled_step_ms(m, 2, 12_000, 68, 36, True, ArrivalDecode(floor.demand, 6000.0))


def test_model_policy_remembers_the_tpot_error_of_a_split_it_left() -> None:
    """On the H200 the model's decode step was about half the observed one on the smallest decode partitions,
    and each time TTFT pressed, a ratio measured on a wider one sent the policy back there. The ratio seen
    on a split corrects that split (and those with fewer decode SMs) for `tpot_memory_s`."""
    tight, m = SLOTargets(ttft_ms=1000.0, tpot_ms=25.0), h100_llama8b()
    load = dict(decoding=64, context=64 * 600)

    def after_visiting_104(memory_s: float, t: float) -> SplitDecision:
        policy = ModelPolicy(m, ModelPolicyConfig(tpot_memory_s=memory_s))
        slow = 2 * predict_raw(m, view(104, **load), 104, policy.config)[1]
        policy.decide(view(104, t=100.0, tpot=(slow,) * 10, **load), tight)  # twice the model's TPOT at 104
        policy.decide(view(80, t=130.0, **load), tight)  # the engine moved to 80
        as_modelled = (predict_raw(m, view(80, **load), 80, policy.config)[1],) * 10
        return policy.decide(view(80, t=t, queued=24_000, requests=48, tpot=as_modelled, **load), tight)

    assert after_visiting_104(0.0, 141.0).prefill_sms == 104  # without memory: back to 104
    remembered = after_visiting_104(300.0, 141.0)
    assert remembered.prefill_sms == 96 and remembered.predicted["best_tpot_ms"] < tight.tpot_ms
    assert after_visiting_104(300.0, 401.0).prefill_sms == 104  # the memory is gone after 300 s
    factors = tpot_factors((64, 72, 80, 88, 96, 104, 112), 80, 1.0, {104: 1.4})
    assert factors == {64: 1.0, 72: 1.0, 80: 1.0, 88: 1.0, 96: 1.0, 104: 1.4, 112: 1.4}
    with pytest.raises(ValueError, match="tpot_memory_s"):
        ModelPolicyConfig(tpot_memory_s=-1.0)


def test_a_tpot_error_remembered_under_one_load_does_not_correct_another() -> None:
    """H200, 2026-12-04, run 18 (TPOT <= 12 ms): in a burst of chat 72 prefill SMs read 2.25 times the modelled
    TPOT and the policy went back to 64; a minute later documents waited on 64 for whole windows (P90 TTFT 1.5-2.5 s),
    every split with more prefill SMs predicted past TPOT's target by that ratio, applied to a batch of five
    4,000-token documents it was never seen with. The remembered ratio still holds the chat off 72."""
    (h200,) = load_models(H200_PROFILE).values()
    targets, policy = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0), ModelPolicy(h200)

    def at(sms: int, t: float, **load: Any) -> EngineView:
        return h200_view(sms, time=t, **load)

    chat = dict(arrival_tokens_per_s=21_000.0, mean_prompt_tokens=500.0, mean_output_tokens=96.0, num_decoding=30,
                decode_context_tokens=30 * 550)
    modelled = predict_raw(h200, at(72, 0.0, **chat), 72, policy.config)[1]
    policy.decide(at(72, 100.0, tpot_ms=(2.25 * modelled,) * 10, **chat), targets)  # 72 read 2.25x: back to 64
    policy.decide(at(64, 102.0, **chat), targets)
    queued = dict(waiting_prefill_tokens=9_000, num_prefill_requests=18, ttft_ms=(1_400.0,) * 10)
    assert policy.decide(at(64, 130.0, **chat, **queued), targets).prefill_sms == 64
    documents = dict(arrival_tokens_per_s=18_000.0, mean_prompt_tokens=4_234.0, mean_output_tokens=185.0,
                     num_decoding=5, decode_context_tokens=5 * 4_300, waiting_prefill_tokens=8_000,
                     num_prefill_requests=2, ttft_ms=(1_500.0,) * 10, tpot_ms=(8.0,) * 10)
    moved = policy.decide(at(64, 160.0, **documents), targets)
    assert moved.prefill_sms > 72 and moved.predicted["tpot_ms"] < targets.tpot_ms, moved


def test_a_drained_bursts_ttft_does_not_send_the_split_to_the_decode_end() -> None:
    """H200, 2026-12-04, run 19 (TPOT <= 12 ms): after a chat burst the queue drained, but the view still held the
    burst's TTFTs (P90 1.8 s) and TPOT sat just under the comfort slack on 64 prefill SMs; that TTFT evidence let
    the policy jump 64 -> 16 toward decode, and the next burst found 16 (P90 TTFT 12 s). Evidence for TTFT frees
    only moves toward prefill: toward decode one step at a time unless TPOT is observed past its target (then up
    to `max_decode_steps`; at 14 ms observed, 40 is within the margin of 64 and the split holds)."""
    (h200,) = load_models(H200_PROFILE).values()
    targets = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)

    def drained(tpot_ms: float) -> SplitDecision:
        return ModelPolicy(h200).decide(h200_view(
            64, num_decoding=30, decode_context_tokens=30 * 700, ttft_ms=(1_800.0,) * 10, tpot_ms=(tpot_ms,) * 10,
            arrival_tokens_per_s=8_000.0, mean_prompt_tokens=650.0, mean_output_tokens=92.0, decode_step_ms=8.5),
            targets)

    within = drained(tpot_ms=9.0)
    assert within.prefill_sms >= 56 and within.predicted["slack"] > 0, within
    past = drained(tpot_ms=14.5)
    assert past.prefill_sms < 56, past


def test_a_tpot_missed_after_a_move_to_prefill_is_undone_at_once_and_not_redone_within_the_dwell() -> None:
    """Documents queue on 64 prefill SMs and the policy moves to 88; there TPOT is observed at 13 ms against 12: a
    miss of 8%, short of the quarter that makes a switch urgent, but one that fails nearly every decoding request.
    The policy goes back toward decode after `urgent_dwell_s`, not the whole dwell, and then, with the prompts
    queueing again, does not go back up to 88 before the dwell is over (no flapping between the two). In
    simulation (chat 35-50, documents 3-5, a shift and two lulls at TPOT 12 and 15 ms, prefill as profiled and 15%
    slower, 3 seeds each) the undo raised the mean attainment from 86.6% to 88.4%."""
    (h200,) = load_models(H200_PROFILE).values()
    targets, policy = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0), ModelPolicy(h200)
    documents = dict(arrival_tokens_per_s=17_000.0, mean_prompt_tokens=4_200.0, mean_output_tokens=180.0)

    def view(sms: int, t: float, decoding: int, queued: int, ttft_ms: float, tpot_ms: float) -> EngineView:
        return h200_view(sms, time=t, num_decoding=decoding, decode_context_tokens=decoding * 4_300,
                         waiting_prefill_tokens=queued, num_prefill_requests=queued // 4_200,
                         ttft_ms=(ttft_ms,) * 10, tpot_ms=(tpot_ms,) * 10, decode_step_ms=tpot_ms, **documents)

    up = policy.decide(view(64, 100.0, 6, 12_000, 1_500.0, 8.0), targets)
    assert up.prefill_sms == 88
    undo = policy.decide(view(88, 103.0, 12, 0, 600.0, 13.0), targets)
    assert undo.urgent and undo.prefill_sms < 88 and -0.25 < policy.predict(
        view(88, 103.0, 12, 0, 600.0, 13.0), targets)[0][H200_SPLITS.index(88)].slack < 0, undo
    again = policy.decide(view(undo.prefill_sms, 105.5, 6, 14_000, 1_500.0, 8.0), targets)
    assert again.prefill_sms < 88, again


def test_a_small_tpot_miss_moves_to_the_nearest_split_that_relieves_it() -> None:
    """Chat on 80 prefill SMs, its batch grown to 66: TPOT observed at 12.6 ms against 12. The policy leaves
    80 after the urgent dwell, but for 64, the nearest split predicted within TPOT's target by the hysteresis
    margin, not 48, the split of the most slack, where the next prompts would queue (in simulation, chat at
    50 req/s then documents at 4: 80 -> 56 and back up within 5 s; that load 70.7% -> 79.9%, and
    `bench/policy_suite.py` 82.31% -> 82.35%)."""
    (h200,) = load_models(H200_PROFILE).values()
    targets = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)
    chat = h200_view(80, num_decoding=66, decode_context_tokens=66 * 500, waiting_prefill_tokens=2_964,
                     num_prefill_requests=7, ttft_ms=(500.0,) * 10, tpot_ms=(12.6,) * 10, decode_step_ms=12.4,
                     arrival_tokens_per_s=19_500.0, mean_prompt_tokens=420.0, mean_output_tokens=92.0)
    preds = {p.prefill_sms: p for p in ModelPolicy(h200).predict(chat, targets)[0]}
    assert max(preds.values(), key=lambda p: p.slack).prefill_sms < 64
    moved = ModelPolicy(h200).decide(chat, targets)
    assert moved.urgent and moved.prefill_sms == 64 and moved.predicted["tpot_ms"] <= targets.tpot_ms, moved


def test_a_split_past_both_targets_does_not_give_up_tpot_for_a_ttft_it_cannot_reach() -> None:
    """A burst of documents (60,000 prompt tokens queued) on 96 prefill SMs, TPOT observed just past its target:
    no split brings TTFT within 1.5 s, and every one with more prefill SMs puts TPOT further past (32 ms on 112).
    The policy holds 96 rather than fail every decoding request for a TTFT still missed (in simulation, documents
    at 5 req/s with TTFT <= 1.5 s and TPOT <= 15 ms: 85.3% -> 90.4% with prefill 15% slower than the profile, the
    best fixed split 92.2%)."""
    (h200,) = load_models(H200_PROFILE).values()
    targets = SLOTargets(ttft_ms=1500.0, tpot_ms=15.0)
    burst = h200_view(96, num_decoding=16, decode_context_tokens=16 * 4_500, waiting_prefill_tokens=60_000,
                      num_prefill_requests=12, ttft_ms=(5_000.0,) * 10, tpot_ms=(15.5,) * 10, decode_step_ms=15.5,
                      arrival_tokens_per_s=22_000.0, mean_prompt_tokens=5_000.0, mean_output_tokens=180.0)
    preds = {p.prefill_sms: p for p in ModelPolicy(h200).predict(burst, targets)[0]}
    assert all(p.ttft_ms > targets.ttft_ms and p.tpot_ms > targets.tpot_ms for s, p in preds.items() if s > 96)
    assert preds[112].slack > preds[96].slack  # the most slack alone would move
    assert ModelPolicy(h200).decide(burst, targets).prefill_sms == 96


def test_model_policy_switches_at_once_when_the_prompts_change() -> None:
    """Within the dwell of its last switch, a split predicted far past TTFT is left after `urgent_dwell_s`
    only on evidence: TTFTs observed past target, or arrivals unlike those the split was chosen for (chat
    giving way to 5,900-token documents at the same prompt tokens per second). Without either it waits."""
    chat = dict(decoding=64, context=64 * 600)
    arrivals = dict(arrival_tokens_per_s=10_000.0, mean_output_tokens=97.0)
    SPLIT = 48

    def after_a_switch(prompt: float) -> SplitDecision:
        policy = ModelPolicy(h100_llama8b(), ModelPolicyConfig(dwell_s=10.0, urgent_dwell_s=2.0))
        chat_now = replace(view(64, t=100.0, **chat), mean_prompt_tokens=496.0, **arrivals)
        policy.decide(chat_now, TARGETS)
        policy.decide(replace(chat_now, prefill_sms=SPLIT, time=101.0), TARGETS)  # the split changed at t = 101
        backlog = dict(queued=17_700, requests=round(17_700 / prompt))  # three documents' worth of prompt tokens
        return policy.decide(replace(view(SPLIT, t=104.0, **chat, **backlog), mean_prompt_tokens=prompt, **arrivals),
                             TARGETS)

    documents, more_chat = after_a_switch(5900.0), after_a_switch(620.0)
    assert documents.urgent and documents.reason.startswith("urgent switch")
    assert "at the last switch: 10000 in 496-token" in documents.reason
    assert not more_chat.urgent and more_chat.reason.startswith("hold: dwell")
    assert more_chat.predicted["slack"] < -0.25 <= more_chat.predicted["best_slack"]  # as urgent, but for evidence
    assert new_prompt_load(Load(25_000.0, 496.0), Load(25_000.0, 5900.0), 2.0)
    assert not new_prompt_load(Load(25_000.0, 496.0), Load(14_000.0, 900.0), 2.0)
    assert new_prompt_load(Load(0.0, 512.0), Load(1_000.0, 512.0), 2.0)  # arrivals starting
    assert not new_prompt_load(Load(26_240.0, 3749.0), Load(8_514.0, 3838.0), 2.0)  # a load ending brings no prompts
    assert new_prompt_load(Load(25_000.0, 5900.0), Load(25_000.0, 496.0), 2.0)  # another kind of prompt
    assert load_changed(Load(26_240.0, 3749.0), Load(8_514.0, 3838.0), 2.0)  # TPOT ratios remembered under it lapse
    assert not load_changed(Load(25_000.0, 496.0), Load(14_000.0, 900.0), 2.0)
    with pytest.raises(ValueError, match="load_change_ratio"):
        ModelPolicyConfig(load_change_ratio=1.0)


def test_model_policy_gives_decode_the_nearest_comfortable_split_and_prefill_the_best() -> None:
    """TPOT at risk: the nearest split with fewer prefill SMs predicted comfortable, not the far end that a
    snapshot of an empty queue makes look best (the next prompts would queue behind it for a whole dwell).
    TTFT at risk: the best split, since a queue left to build under a timid move has to be drained after."""
    def chosen(v: EngineView) -> tuple[int, list[SplitPrediction]]:
        policy = ModelPolicy(h100_llama8b())
        return policy.decide(v, TARGETS).prefill_sms, policy.predict(v, TARGETS)[0]

    comfort = ModelPolicyConfig().comfort_slack
    to_decode, preds = chosen(view(112, decoding=320, context=320 * 2000))
    nearest = max(p.prefill_sms for p in preds if p.slack >= comfort and p.prefill_sms < 112)
    assert to_decode == nearest > max(preds, key=lambda p: p.slack).prefill_sms
    to_prefill, preds = chosen(view(24, queued=10_000, requests=20, decoding=32, context=32 * 1500))
    assert to_prefill == max(preds, key=lambda p: p.slack).prefill_sms
    assert to_prefill > min(p.prefill_sms for p in preds if p.slack >= comfort and p.prefill_sms > 24)


def test_model_policy_dwell_counts_applied_switches() -> None:
    policy = ModelPolicy(h100_llama8b(), ModelPolicyConfig(dwell_s=30.0))
    first = policy.decide(view(64, t=10.0, **PREFILL_HEAVY), TARGETS)
    assert first.prefill_sms > 64
    again = policy.decide(view(64, t=11.0, **PREFILL_HEAVY), TARGETS)  # the caller did not apply it
    assert again.prefill_sms == first.prefill_sms and again.reason.startswith("switch")
    applied = view(first.prefill_sms, t=12.0, **DECODE_AT_RISK)  # applied; now decode is at risk
    held = policy.decide(applied, TARGETS)
    assert held.prefill_sms == first.prefill_sms and "dwell (29.0 s left)" in held.reason  # counted from the proposal at t=11
    assert held.predicted["switches_last_minute"] == 1.0
    later = policy.decide(view(first.prefill_sms, t=41.5, **DECODE_AT_RISK), TARGETS)
    assert later.prefill_sms < first.prefill_sms and "more SMs to decode" in later.reason


def test_model_policy_corrects_with_observed_latency() -> None:
    """The model thinks a small queue is fine; observed TTFTs say otherwise."""
    small = dict(queued=2_000, requests=4, decoding=32, context=32 * 1500)
    calm = ModelPolicy(h100_llama8b()).decide(view(48, **small), TARGETS)
    assert calm.prefill_sms == 48 and calm.predicted["ttft_correction"] == 1.0
    slow = tuple([2500.0] * 20)
    d = ModelPolicy(h100_llama8b()).decide(view(48, ttft=slow, **small), TARGETS)
    assert d.predicted["ttft_correction"] > 1.5
    assert d.predicted["observed_ttft_ms"] == 2500.0
    assert d.prefill_sms > 48
    few = ModelPolicy(h100_llama8b()).decide(view(48, ttft=slow[:3], **small), TARGETS)
    assert few.predicted["ttft_correction"] == 1.0  # warm-up filter: too few samples


def test_model_policy_reads_a_paced_decode_as_paced_not_slow() -> None:
    """An engine whose decode is paced at 30 ms shows TPOTs of about 30 ms while prompts come in. Against a model
    step of ~12 ms that would read as a slow decode and move SMs to it; with the pace in the view the TPOT
    correction stays at 1 and the split stays. Without prompts coming in there is no pace to expect."""
    load = dict(queued=2_000, requests=4, decoding=32, context=32 * 1500)
    paced_tpots = tuple([30.0] * 20)
    policy, cfg = ModelPolicy(h100_llama8b()), ModelPolicyConfig()
    unaware = policy.decide(view(64, tpot=paced_tpots, **load), TARGETS)
    assert unaware.predicted["model_tpot_ms"] < 20 and unaware.predicted["tpot_correction"] > 1.2
    aware = ModelPolicy(h100_llama8b()).decide(replace(view(64, tpot=paced_tpots, **load), decode_pace_ms=30.0), TARGETS)
    assert aware.predicted["model_tpot_ms"] == 30.0 and aware.predicted["tpot_correction"] == pytest.approx(1.0)
    assert aware.predicted["tpot_ms"] == pytest.approx(unaware.predicted["tpot_ms"] / unaware.predicted["tpot_correction"])
    idle = replace(view(64, tpot=paced_tpots, decoding=32, context=32 * 1500), decode_pace_ms=30.0)
    assert paced_tpot_ms(idle) == 0.0 and paced_tpot_ms(replace(idle, arrival_tokens_per_s=5_000.0)) == 30.0
    assert cfg.comfort_slack < 1 - 30.0 / TARGETS.tpot_ms  # the pace itself puts no target at risk here


def test_model_policy_with_cpu_profile_stays_put() -> None:
    """Flat curves (CPU): no split is better than another, so nothing moves."""
    flat = LatencyModel(device="cpu", model="tiny", total_sms=128, splits=split_choices(128),
                        prefill=PhaseModel("compute", (0.01, 0.0, 0.7), 0.0), decode=PhaseModel("bandwidth", (0.1, 0.0, 0.5), 0.0))
    v = EngineView("cpu0", 64, 128, split_choices(128), waiting_prefill_tokens=5000, num_decoding=8,
                   decode_context_tokens=800, time=5.0)
    d = ModelPolicy(flat).decide(v, TARGETS)
    assert d.prefill_sms == 64 and d.reason.startswith("hold")


def test_fixed_policy_never_moves() -> None:
    """The baseline for split comparisons: the engine's split stays whatever the latencies say."""
    over_ttft = view(prefill_sms=48, queued=50_000, requests=40, ttft=(9000.0,) * 20, tpot=(10.0,) * 20)
    over_tpot = view(prefill_sms=96, decoding=200, context=400_000, ttft=(100.0,) * 20, tpot=(400.0,) * 20)
    assert make_policy("fixed").decide(over_ttft, TARGETS).prefill_sms == 48
    assert make_policy("fixed").decide(over_tpot, TARGETS).prefill_sms == 96
    assert ReactivePolicy().decide(over_ttft, TARGETS).prefill_sms > 48  # the same views do move a dynamic policy


def test_make_policy() -> None:
    assert isinstance(make_policy("reactive", step=2), ReactivePolicy)
    assert isinstance(make_policy("model", model=h100_llama8b()), ModelPolicy)
    with pytest.raises(ValueError, match="needs a latency model"):
        make_policy("model")
    with pytest.raises(ValueError, match="unknown split policy"):
        make_policy("magic")
    with pytest.raises(ValueError):
        ModelPolicyConfig(observed_weight=2.0)


def test_reactive_policy_steps() -> None:
    over_ttft, ok_ttft = tuple([1500.0] * 10), tuple([100.0] * 10)
    over_tpot, ok_tpot = tuple([80.0] * 10), tuple([10.0] * 10)
    p = make_policy("reactive")
    assert p.decide(view(64, ttft=over_ttft, tpot=ok_tpot), TARGETS).prefill_sms == 72
    d = p.decide(view(64, ttft=ok_ttft, tpot=over_tpot), TARGETS)
    assert d.prefill_sms == 56 and "TPOT" in d.reason
    assert p.decide(view(64, ttft=ok_ttft, tpot=ok_tpot), TARGETS).prefill_sms == 64
    assert p.decide(view(120, ttft=over_ttft, tpot=ok_tpot), TARGETS).prefill_sms == 120  # clamped at the top
    # both over: the relatively worse one wins (TTFT 1.5x vs TPOT 1.6x -> decode)
    assert p.decide(view(64, ttft=over_ttft, tpot=over_tpot), TARGETS).prefill_sms == 56
    assert make_policy("reactive", step=2).decide(view(64, ttft=over_ttft), TARGETS).prefill_sms == 80


# -- prefill order ------------------------------------------------------------------------


def req(rid: str, arrival: float, deadline: float | None = None, priority: int = 0, n: int = 20) -> Request:
    return Request(rid, list(range(1, n + 1)), n, SamplingParams(max_tokens=4), arrival_time=arrival,
                   deadline=deadline, priority=priority)


def test_edf_order_with_priorities_and_aging() -> None:
    now = [0.25]
    order = EDFOrder(ttft_ms=1000.0, aging_s=2.0, clock=lambda: now[0])
    r1, r2, r3 = req("r1", 0.0), req("r2", 0.1, deadline=0.3), req("r3", 0.2)
    r4 = req("r4", 0.21, priority=-1)
    ids = lambda rs: [r.request_id for r in sorted(rs, key=order)]  # noqa: E731
    assert ids([r3, r1, r2]) == ["r2", "r1", "r3"]  # deadlines 0.3 (own), 1.0, 1.2
    assert ids([r3, r1, r2, r4]) == ["r4", "r2", "r1", "r3"]  # priority class first
    now[0] = 2.05  # r1 has waited 2.05 s >= aging 2 s: promoted above everything
    assert ids([r3, r4, r2, r1]) == ["r1", "r4", "r2", "r3"]
    now[0] = 2.5  # all aged: first come, first served
    assert ids([r4, r3, r2, r1]) == ["r1", "r2", "r3", "r4"]


def test_edf_order_drives_the_prefill_scheduler() -> None:
    now = [1.0]
    sched = PrefillScheduler(KVManager(BlockAllocator(64), 16), max_tokens=20,
                             order=EDFOrder(ttft_ms=1000.0, clock=lambda: now[0]))
    sched.add(req("late", 0.0))
    sched.add(req("urgent", 0.5, deadline=0.6))
    _, reqs = sched.schedule()
    assert [r.request_id for r in reqs] == ["urgent"]
    fifo = PrefillScheduler(KVManager(BlockAllocator(64), 16), max_tokens=20)
    fifo.add(req("late", 0.0))
    fifo.add(req("urgent", 0.5, deadline=0.6))
    assert [r.request_id for r in fifo.schedule()[1]] == ["late"]


def test_make_order() -> None:
    assert make_order("fcfs") == FCFSOrder(ttft_ms=1000.0)
    o = make_order("edf", ttft_ms=500.0)
    assert isinstance(o, EDFOrder) and o.effective_aging_s == 1.0
    with pytest.raises(ValueError, match="unknown prefill order"):
        make_order("lifo")


# -- admission ----------------------------------------------------------------------------


def queue(tokens: int = 0, requests: int = 0, decoding: int = 16, sms: int = 64) -> QueueSnapshot:
    return QueueSnapshot(tokens, requests, decoding, sms)


def test_admission_rejects_impossible_and_accepts_feasible() -> None:
    ac = AdmissionController(h100_llama8b(), AdmissionConfig(ttft_ms=1000.0))
    assert ac.admit(512, queue(), priority=3, now=0.0) == 3
    assert ac.check(512, queue(), 1000.0) < 100.0
    with pytest.raises(AdmissionRejected) as err:
        ac.admit(512, queue(100_000, 200), now=0.0)
    e = err.value
    assert isinstance(e, ValueError) and e.predicted_ttft_ms > e.target_ms == 1000.0
    assert "admission control" in str(e) and "100000 prompt tokens queued" in str(e)


def test_admission_rejection_survives_pickling_as_ray_sends_it_to_the_caller() -> None:
    """Ray pickles an actor's exception to raise it in the front end; an exception class whose constructor
    takes more than the message must say how to rebuild itself, or the caller gets an
    UnserializableException (HTTP 500) instead of the refusal (HTTP 429)."""
    sent = AdmissionRejected("request rejected by admission control", 1234.5, 1000.0)
    got = pickle.loads(pickle.dumps(sent))
    assert type(got) is AdmissionRejected
    assert (str(got), got.predicted_ttft_ms, got.target_ms) == (str(sent), 1234.5, 1000.0)


def test_admission_uses_deadline_and_slack() -> None:
    m = h100_llama8b()
    ac = AdmissionController(m, AdmissionConfig(ttft_ms=1000.0))
    with pytest.raises(AdmissionRejected):
        ac.admit(2048, queue(), deadline=10.005, now=10.0)  # 5 ms left
    assert ac.admit(2048, queue(), deadline=15.0, now=10.0) == 0
    q = queue(8_000, 16)
    predicted = ac.check(512, q, 1000.0)
    assert 500.0 < predicted < 1000.0
    with pytest.raises(AdmissionRejected):
        AdmissionController(m, AdmissionConfig(ttft_ms=1000.0, slack=0.5)).admit(512, q, now=0.0)
    # more prefill SMs: the same queue fits
    assert AdmissionController(m, AdmissionConfig(ttft_ms=600.0)).check(512, queue(8_000, 16, sms=120), 600.0) < 600.0


def test_admission_decides_the_priority_and_keeps_the_prediction() -> None:
    ac = AdmissionController(h100_llama8b(), AdmissionConfig(ttft_ms=1000.0, action="queue"))
    assert ac.decide(512, queue(), priority=2, now=0.0) == (2, ac.check(512, queue(), 1000.0), False)
    held = ac.decide(512, queue(100_000, 200), priority=2, now=0.0)
    assert held.priority == QUEUE_PRIORITY and held.held_back and held.predicted_ttft_ms > 1000.0


def test_admission_queue_mode_deprioritizes() -> None:
    ac = AdmissionController(h100_llama8b(), AdmissionConfig(ttft_ms=1000.0, action="queue"))
    assert ac.admit(512, queue(100_000, 200), priority=0, now=0.0) == QUEUE_PRIORITY
    assert ac.admit(512, queue(), priority=0, now=0.0) == 0
    with pytest.raises(ValueError):
        AdmissionConfig(action="drop")  # type: ignore[arg-type]


# -- CPU profiling and the engine wire-in ---------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread while timing: on a small shared CPU box (2 cores, other jobs)
    OpenMP barrier stalls otherwise make single timings vary 10-50x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cpu_engine(tiny_llama: Path) -> EngineCore:
    cfg = EngineConfig(model=str(tiny_llama), mode="semi-pd", cache=CacheConfig(num_pages=512))
    return EngineCore(cfg, emit=lambda deltas: None)


def test_cpu_profile_predicts_measured_times(cpu_engine: EngineCore, one_thread: None) -> None:
    core = cpu_engine
    free, split = core.allocator.num_free, core.partitioner.current
    t0 = time.perf_counter()
    model = Profiler.for_engine(core, ProfileConfig.quick()).run()
    assert time.perf_counter() - t0 < 15.0
    assert core.allocator.num_free == free and core.partitioner.current == split  # pages and split restored
    core.allocator.check_integrity()
    assert model.key == engine_profile_key(core) and model.device.startswith("cpu-")
    assert model.prefill.fit_error < 0.5 and model.decode.fit_error < 0.5
    # no SM partitions on CPU: one split is measured and the curves are flat
    assert model.meta["profiled_splits"] == [split]
    assert model.prefill.slowdown(8, 128) == 1.0 and model.decode.slowdown(8, 128) == 1.0
    # held-out points, measured now, predicted within a factor of 3
    held = Profiler.for_engine(core, ProfileConfig(
        prefill_tokens=(96,), prefill_cached=(32,), decode_batches=(8,), decode_context=(96,),
        splits=(64,), repeats=3, contention=False)).measure()
    assert {s.phase for s in held} == {"prefill", "decode"}
    for s in held:
        if s.phase == "prefill":
            pred = model.prefill_ms(96, 32, s.sms)
        else:
            pred = model.decode_step_ms(8, 8 * 96, s.sms)
        assert 1 / 3 < pred / s.ms < 3, (s, pred)


def test_engine_wire_in_order_and_admission(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            one_thread: None) -> None:
    profile = tmp_path / "latency.json"
    slo = SLOConfig(order="edf", admission=True, ttft_ms=60_000.0, latency_profile=str(profile))
    cfg = EngineConfig(model=str(tiny_llama), mode="semi-pd", cache=CacheConfig(num_pages=256), slo=slo)
    core = EngineCore(cfg, emit=lambda deltas: None)
    assert isinstance(core.prefill.order, EDFOrder) and core.prefill.order.ttft_ms == 60_000.0
    assert core.admission is not None and engine_profile_key(core) in load_models(profile)
    params = SamplingParams(max_tokens=4)
    core.add_request("ok", list(range(1, 65)), params)
    assert core.prefill.num_waiting == 1
    with pytest.raises(AdmissionRejected, match="admission control"):
        core.add_request("late", list(range(1, 65)), params, deadline=time.monotonic() + 1e-6)
    assert core.prefill.num_waiting == 1  # the rejected request was not queued

    import actors.slo.profiler as profiler

    def no_profiling(*args: object, **kwargs: object) -> LatencyModel:
        raise AssertionError("profiled although the profile file has this engine's model")

    monkeypatch.setattr(profiler, "profile_engine", no_profiling)
    again = EngineCore(cfg, emit=lambda deltas: None)
    assert again.admission is not None
    assert again.admission.controller.model == load_models(profile)[engine_profile_key(core)]
    # default config: FCFS, no admission
    plain = EngineCore(EngineConfig(model=str(tiny_llama), cache=CacheConfig(num_pages=64)), emit=lambda deltas: None)
    assert plain.prefill.order == FCFSOrder(ttft_ms=1000.0) and plain.admission is None


def test_an_engine_counts_each_admitted_requests_ttft_over_its_prediction(tiny_llama: Path, tmp_path: Path,
                                                                         one_thread: None) -> None:
    """`EngineStats.admission_ttft_ratio`: each request admitted at its own priority counts once it ends, by its TTFT
    in the engine (from `add_request` to its first token) over the TTFT admission predicted for it; one held back
    (queue mode, predicted past its deadline) does not count, for it waits behind the others by design."""
    slo = SLOConfig(order="edf", admission=True, admission_action="queue", ttft_ms=60_000.0,
                    latency_profile=str(tmp_path / "latency.json"))
    core = EngineCore(EngineConfig(model=str(tiny_llama), mode="semi-pd", cache=CacheConfig(num_pages=256), slo=slo),
                      emit=lambda deltas: None)
    assert core.stats().admission_ttft_ratio == {"counts": [0] * (len(TTFT_RATIO_BOUNDS) + 1), "sum": 0.0}
    for i in range(3):
        core.add_request(f"r{i}", list(range(1 + i, 65 + i)), SamplingParams(max_tokens=4))
    core.add_request("held", list(range(1, 65)), SamplingParams(max_tokens=4), deadline=time.monotonic() + 1e-6)
    reqs = dict(core._requests)
    assert reqs["held"].priority == QUEUE_PRIORITY and reqs["held"].admission_ttft_ms is None
    assert all(reqs[f"r{i}"].admission_ttft_ms > 0 for i in range(3))
    step_until(core, lambda: core.num_unfinished == 0)
    ratios = [1e3 * (r.first_token_time - r.arrival_time) / r.admission_ttft_ms for r in reqs.values()
              if r.admission_ttft_ms is not None]
    counted = core.stats().admission_ttft_ratio
    assert sum(counted["counts"]) == 3 and counted["sum"] == pytest.approx(sum(ratios)) and counted["sum"] > 0
    plain = EngineCore(EngineConfig(model=str(tiny_llama), cache=CacheConfig(num_pages=64)), emit=lambda deltas: None)
    assert plain.stats().admission_ttft_ratio == {}


def test_slo_config_validation(tiny_llama: Path) -> None:
    from actors.config import ConfigError

    with pytest.raises(ConfigError, match="order"):
        SLOConfig(order="random")
    with pytest.raises(ConfigError, match="admission_action"):
        SLOConfig(admission_action="drop")
    with pytest.raises(ConfigError, match="positive"):
        SLOConfig(ttft_ms=0)
    assert math.isclose(SLOConfig().ttft_ms, 1000.0)


def test_partitioner_creates_only_the_splits_asked_for(tiny_llama: Path) -> None:
    """A fixed or bounded deployment pre-creates (and captures graphs for) fewer splits; asks round to allowed ones."""
    from actors.config import EngineConfig
    from actors.engine.core import EngineCore
    from actors.engine.partitioner import CpuPartitioner, restrict_splits

    assert restrict_splits(132, None) == split_choices(132)
    assert restrict_splits(132, (50, 47, 100)) == (48, 96)  # 100 is as near 96 as 104: the smaller wins
    part = CpuPartitioner(128, initial=64, splits=(62, 90))
    assert part.splits == (64, 88) and part.current == 64
    assert part.switch(120, "out of the set") and part.current == 88  # the nearest created split
    core = EngineCore(EngineConfig(model=str(tiny_llama), mode="semi-pd", prefill_sms=40, splits=(40,)),
                      emit=lambda deltas: None)
    try:
        assert core.partitioner.splits == (40,) and core.stats().prefill_sms == 40
    finally:
        core.shutdown()
    with pytest.raises(ValueError, match="splits must be positive"):
        EngineConfig(model=str(tiny_llama), splits=())


def test_profile_grid_too_big_for_the_model_is_a_clear_error(cpu_engine: EngineCore) -> None:
    """The full grid's prefill points mostly exceed the tiny model's 2048-token context: say so before measuring."""
    with pytest.raises(ValueError, match=r"grid points fit this engine .* --profile-grid quick"):
        Profiler.for_engine(cpu_engine, ProfileConfig()).run()


def test_model_policy_follows_a_shift_better_than_any_fixed_split() -> None:
    """Run 7's shifting load (chat at 50.4 req/s for 20 s, then documents at 4.2 req/s) on a simulated engine
    whose latencies are the H200 profile of 2026-12-03: chat wants decode SMs, documents prefill SMs, and the
    policy, starting on chat's split, keeps more requests within both targets than any fixed split, in a
    few switches. This holds for this draw (seed 0: 99.5% against 99.1% for 96), not in general: with seeds
    1-3 the policy kept 94.7, 98.8 and 97.3% against the best fixed split's 94.7, 98.8 and 99.0% (in hindsight:
    each draw's best; 93.0, 95.9 and 99.1% before a move toward prefill kept TPOT within target when no split
    met both), so this is a regression check of one draw. (Profile of 2026-12-03 10:03 UTC, 7 splits.) (On the
    H200 itself the profile was optimistic for both halves: pinned 96 kept 45.6%, not the simulation's 98.8%;
    see docs/perf/serve-h200.md, run 7.)"""
    from engine_sim import Phase, simulate

    (h200,) = load_models(H200_PROFILE).values()
    tight = SLOTargets(ttft_ms=1000.0, tpot_ms=25.0)
    shift = [Phase(20.0, 50.4, 496, 97), Phase(20.0, 4.2, 5905, 180)]
    fixed = {sms: simulate(h200, shift, tight, sms).attainment for sms in range(72, 113, 8)}
    dynamic = simulate(h200, shift, tight, 88, ModelPolicy(h200))
    assert dynamic.attainment > max(fixed.values()), (dynamic, fixed)
    assert fixed[112] < 0.5 and fixed[104] < 0.9  # prefill-heavy splits starve the chat's decode
    assert len(dynamic.switches) <= 4 and any(to >= 104 for _, _, to in dynamic.switches)  # prefill for documents


@pytest.mark.parametrize("prefill_factor", [1.0, 1.15])
def test_model_policy_beats_every_fixed_split_when_documents_give_way_to_reasoning(prefill_factor: float) -> None:
    """Long documents (5,905 prompt tokens, 180 out, 3 req/s for 20 s), then reasoning (110 in, 2,500 out, 4.5 req/s
    for 20 s) at TTFT <= 1 s and TPOT <= 12 ms: the documents want prefill SMs, the reasoning's long decodes want
    decode SMs, and no split held throughout serves both (a small prefill split queues the documents, and the
    reasoning behind them; a large one slows the decode of a 100-sequence batch past TPOT's target). Over three
    draws the policy, starting on 64, keeps 78.1% of the requests within both targets against the best fixed
    split's 42.5% (56); on an engine whose prefill runs 15% slower than the profile, 61.9% against 31.4% (72).
    It moves toward prefill for the documents and to 32 or fewer prefill SMs for the reasoning. The shifting load
    for issue 4's claim on a GPU (docs/perf/serve-h200.md, 2026-12-04 evening)."""
    from engine_sim import Phase, SimResult, simulate, with_prefill_factor

    (h200,) = load_models(H200_PROFILE).values()
    engine = with_prefill_factor(h200, prefill_factor)
    targets = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)
    shift = [Phase(20.0, 3.0, 5905, 180, prompt_cv=0.35), Phase(20.0, 4.5, 110, 2500, prompt_cv=0.5)]
    seeds = range(3)

    def mean_attainment(runs: list[SimResult]) -> float:
        return sum(r.attainment for r in runs) / len(runs)

    fixed = {sms: mean_attainment([simulate(engine, shift, targets, sms, seed=s, dt=0.02) for s in seeds])
             for sms in h200.splits}
    dynamic = [simulate(engine, shift, targets, 64, ModelPolicy(h200), seed=s, dt=0.02) for s in seeds]
    assert mean_attainment(dynamic) > 1.5 * max(fixed.values()), fixed
    switches = dynamic[0].switches
    assert any(to > 64 for t, _, to in switches if t < 20.0)  # prefill SMs for the documents
    assert any(to <= 32 for t, _, to in switches if t >= 20.0)  # decode SMs for the reasoning
    assert len(switches) <= 6


def test_admission_keeps_an_overload_within_its_targets_and_refuses_nothing_below_it() -> None:
    """Chat at 65 req/s (past what any split serves at TPOT <= 12 ms) and documents at 6 req/s, with the dynamic
    policy: refusing the requests predicted past their TTFT target (HTTP 429 in the engine; counted here as
    misses) keeps far more of all requests within both targets than queueing them all (this profile: 16.9% ->
    47.8%, 43.1% -> 85.0%), on an engine whose prefill runs 15% slower than the profile too, by the speed its
    iterations show (chat: 11.5% -> 65.7%; by the profile's speed 16.4%); at 40 req/s of chat it refuses none."""
    from engine_sim import Phase, simulate, with_prefill_factor

    (h200,) = load_models(H200_PROFILE).values()
    targets = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)
    refuse = AdmissionController(h200, AdmissionConfig(ttft_ms=targets.ttft_ms, action="reject"))

    def attainment(phase: Phase, admission: AdmissionController | None, prefill_factor: float = 1.0) -> float:
        engine = with_prefill_factor(h200, prefill_factor)
        runs = [simulate(engine, [phase], targets, 64, ModelPolicy(h200), seed=s, dt=0.01, admission=admission)
                for s in range(3)]
        return sum(r.attainment for r in runs) / len(runs)

    chat = Phase(15.0, 65.0, 495, 92, prompt_cv=1.0)
    for overload in (chat, Phase(15.0, 6.0, 4236, 180, prompt_cv=0.8)):
        assert attainment(overload, refuse) > attainment(overload, None) + 0.3
    assert attainment(chat, refuse, 1.15) > attainment(chat, None, 1.15) + 0.3
    within = Phase(15.0, 40.0, 495, 92, prompt_cv=1.0)
    assert attainment(within, refuse) == attainment(within, None) == 1.0


def test_admission_queue_keeps_more_of_an_overload_within_targets_than_fcfs_and_less_than_refusing() -> None:
    """Documents at 6 req/s (TTFT <= 1 s, TPOT <= 12 ms), the dynamic policy: holding back the requests predicted
    past their TTFT target (`queue`: served when nothing else waits, or once they have waited twice the target)
    keeps more of them within both targets than first come, first served (this profile: 51.3% -> 70.0%), and less
    than refusing them (85.0%): what is held back still takes prefill and decode time when it runs. Under the
    load the policy serves (chat at 40 req/s) none is held back."""
    from engine_sim import Phase, simulate

    (h200,) = load_models(H200_PROFILE).values()
    targets = SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)

    def attainment(phase: Phase, action: str | None) -> float:
        config = AdmissionConfig(ttft_ms=targets.ttft_ms, action=action) if action else None
        admission = AdmissionController(h200, config) if config else None
        runs = [simulate(h200, [phase], targets, 64, ModelPolicy(h200), seed=s, dt=0.01, admission=admission)
                for s in range(3)]
        return sum(r.attainment for r in runs) / len(runs)

    documents = Phase(15.0, 6.0, 4236, 180, prompt_cv=0.8)
    fcfs, held_back, refused = (attainment(documents, action) for action in (None, "queue", "reject"))
    assert fcfs + 0.1 < held_back < refused - 0.1
    assert attainment(Phase(15.0, 40.0, 495, 92, prompt_cv=1.0), "queue") == 1.0


def test_admission_predicts_at_the_prefill_speed_the_engine_shows() -> None:
    """Iterations 1.5x as long as the model's make every predicted TTFT 1.5x as long (within the clamp); small
    iterations (under a quarter of a chunk) or none leave the model's speed."""
    m = h100_llama8b()
    ac = AdmissionController(m, AdmissionConfig(ttft_ms=1000.0, chunk_tokens=4096))
    queue = QueueSnapshot(8_000, 16, 32, 64)
    modelled = ac.predict_ttft_ms(500, queue)
    iteration = m.prefill_queue_ms(4096, 8, 64, concurrent=True, chunk_tokens=4096)
    slow = replace(queue, prefill_iteration_ms=1.5 * iteration, prefill_iteration_tokens=4096.0)
    assert ac.predict_ttft_ms(500, slow) == pytest.approx(1.5 * modelled, rel=0.02)
    tiny = replace(queue, prefill_iteration_ms=10 * iteration, prefill_iteration_tokens=512.0)
    assert ac.predict_ttft_ms(500, tiny) == modelled
    far = replace(queue, prefill_iteration_ms=100 * iteration, prefill_iteration_tokens=4096.0)
    assert ac.predict_ttft_ms(500, far) == pytest.approx(4.0 * modelled, rel=0.02)


@pytest.mark.parametrize("policy", ["model", "reactive"])
def test_the_policy_suite_prints_every_case_and_the_mean(policy: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench/policy_suite.py` (the simulation figures of docs/perf/serve-h200.md, run 19) runs on a saved profile,
    with our policy or the paper's reactive rule: one line per case and prefill speed, then the means."""
    import runpy

    suite = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "policy_suite.py"))
    assert suite["main"]([str(H200_PROFILE), "--seeds", "1", "--policy", policy]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if "prefill x" in line]) == 2 * len(suite["cases"]())
    mean = float(lines[-1].rsplit(" ", 1)[1].rstrip("%"))
    assert 0.0 < mean <= 100.0 and lines[-1].startswith(f"mean of {2 * len(suite['cases']())} cases x 1 seeds")


def test_the_policy_suite_times_the_engine_apart_from_the_profile_the_policy_holds() -> None:
    """`bench/policy_suite.py --decode-factor F`: the simulated engine decodes at F times the profile's step while
    the policy and admission hold the profile (serving's documents on the H100 decoded at about 0.8 of it, run 42).
    Documents at 5.4 req/s on 88 prefill SMs miss TPOT at the profile's decode speed and keep it at 0.8 of it; a
    factor that is not positive is refused."""
    import runpy

    from engine_sim import Phase, simulate, with_decode_factor

    h100 = committed_model(H100)
    targets, documents = SLOTargets(ttft_ms=1500.0, tpot_ms=15.0), [Phase(15.0, 5.4, 4236, 180, prompt_cv=0.8)]
    kept = [simulate(engine, documents, targets, 88, seed=0, dt=0.01).attainment
            for engine in (h100, with_decode_factor(h100, 0.8))]
    assert kept[0] < 0.7 < 0.9 < kept[1], kept
    suite = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "policy_suite.py"))
    with pytest.raises(SystemExit):
        suite["main"]([str(H200_PROFILE), "--decode-factor", "0"])


def test_the_split_probe_sets_each_decode_row_beside_the_profile() -> None:
    """`bench/split_probe.py` (serving's run 39, H100): a row with decode steps gets the profile's step for its batch
    and context on the SMs its split leaves decode, beside prefill, and measured / predicted; prefill-only rows stay
    as they are; a device with no profile in the file is an error, not another device's profile."""
    import runpy

    probe = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "split_probe.py"))
    model = probe["device_profile"](str(H200_PROFILE), "NVIDIA H200")
    row = dict(prefill_sms=72, decode="back to back", decode_batch=28, decode_context_tokens=17_698,
               decode_step_ms=12.0)
    got = probe["with_prediction"](row, model)
    predicted = model.decode_step_ms(28, 17_698, model.total_sms - 72, concurrent=True)
    assert got["predicted_ms"] == predicted > model.decode_step_ms(28, 17_698, model.total_sms - 64, concurrent=True)
    assert got["ratio"] == pytest.approx(12.0 / predicted)
    idle = dict(row, decode="idle", decode_batch=0, decode_context_tokens=0, decode_step_ms=None)
    assert probe["with_prediction"](idle, model) == idle
    with pytest.raises(SystemExit, match="no profile for"):
        probe["device_profile"](str(H200_PROFILE), "NVIDIA B200")

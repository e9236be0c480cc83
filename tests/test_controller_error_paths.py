"""SLO controller error paths: bad data in Redis, skewed clocks, models that break the policy, splits off the set.

Each test failed before its fix (see the module's commit message); a real redis-server where Redis is involved.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from actors.slo.latency_model import LatencyModel
from actors.slo.policy import ModelPolicy, ModelPolicyConfig
from actors.slo.types import EngineView, ReactivePolicy, SLOTargets, SplitDecision
from cluster.controller import Controller, ControllerConfig, bounded_view, models_from_published, view_from_dict
from cluster.redis_store import RedisStore

from support import async_wait_until
from test_controller import SPLITS, _decoding, _Flip, _latency_model, _loaded, _published

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
TARGETS = SLOTargets(ttft_ms=100.0, tpot_ms=50.0)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _cfg(url: str, cluster: str, **kw: Any) -> ControllerConfig:
    return ControllerConfig(url, cluster, **{"min_dwell_s": 0.0, "min_samples": 4, "interval_s": 0.1,
                                             "lease_s": 1.0, **kw})


# -- bad data in Redis ----------------------------------------------------------------------------


def test_malformed_views_do_not_stop_the_other_engines_decisions(redis_server: Any) -> None:
    """A view key holding invalid JSON, a JSON list, a view without stats or with an infinite SM count: those
    engines are skipped, the others still get their decisions (every tick raised, for every engine)."""

    async def main() -> None:
        store = RedisStore(redis_server.url, "badview")
        await store.publish_view("e-0", _published("e-0", 64, 10), 5000)
        raw = {"e-json": "{not json", "e-list": "[1, 2]", "e-nostats": json.dumps({"engine_id": "e-nostats"}),
               "e-inf": json.dumps({"engine_id": "e-inf", "stats": {"prefill_sms": math.inf, "total_sms": 128}})}
        for eid, value in raw.items():
            await store.client.set(store.keys.view(eid), value, px=5000)
        assert list(await store.read_views()) == ["e-0", "e-inf", "e-nostats"]  # not JSON objects: skipped
        ctl = Controller(_cfg(redis_server.url, "badview"), _Flip(), leader_id="ctl-v")
        assert [(d["engine_id"], d["to"]) for d in await ctl.tick()] == [("e-0", 72)]
        await ctl.stop()
        await store.aclose()

    run(main())


def test_non_finite_samples_and_stats_are_not_read_as_signals() -> None:
    """NaN / inf latency samples are dropped and non-finite counters read as unknown (0): a NaN TTFT sample made
    the model policy halve its TTFT predictions (the clamped ratio of NaN is the lowest), an infinite counter
    raised OverflowError, and `"splits": null` a TypeError."""
    d = _loaded("e-0", 64)
    d["ttft_ms"] = [math.nan, math.inf, -math.inf] + d["ttft_ms"]
    d["tpot_ms"] = [math.nan] * 3
    d["stats"].update(num_decoding=math.inf, arrival_tokens_per_s=math.nan, decode_pace_ms=-math.inf)
    v = view_from_dict(json.loads(json.dumps(d)))  # the JSON as the engine would publish it
    assert v.ttft_ms == (400.0,) * 10 and v.tpot_ms == ()
    assert (v.num_decoding, v.arrival_tokens_per_s, v.decode_pace_ms) == (0, 0.0, 0.0)
    assert view_from_dict({**d, "stats": {**d["stats"], "splits": None}}).splits == (64,)

    parsed = view_from_dict({"engine_id": "e-0", "ttft_ms": [math.nan] * 10, "time": 1.0,
                             "stats": {"prefill_sms": 64, "total_sms": 128, "splits": list(SPLITS),
                                       "waiting_prefill_tokens": 20000, "num_waiting": 20}})
    decision = ModelPolicy(_latency_model()).decide(parsed, TARGETS)
    assert decision.predicted["ttft_correction"] == 1.0  # no samples, no correction (was 0.5)


def test_unreadable_published_models_fall_back_per_engine(redis_server: Any) -> None:
    """A model key holding invalid JSON or `Infinity` where an integer goes: that engine gets the reactive rule
    with the reason saying so, the others the model policy (the tick raised JSONDecodeError / OverflowError)."""

    async def main() -> None:
        store = RedisStore(redis_server.url, "badmodel")
        good = _latency_model().to_dict()
        await store.publish_view_and_model("e-0", _loaded("e-0", 64), good, 5000)
        await store.publish_view_and_model("e-1", _loaded("e-1", 64), None, 5000)
        await store.client.set(store.keys.model("e-1"), "{not json", px=5000)
        await store.publish_view_and_model("e-2", _loaded("e-2", 64), {**good, "total_sms": math.inf}, 5000)
        ctl = Controller(_cfg(redis_server.url, "badmodel", targets=TARGETS, policy="model"), leader_id="ctl-m")
        written = {d["engine_id"]: d for d in await ctl.tick()}
        assert sorted(written) == ["e-0", "e-1", "e-2"] and ctl.engines_with_model == ["e-0"]
        assert written["e-0"]["reason"].startswith("urgent switch 64->")
        assert written["e-1"]["reason"].startswith("reactive fallback, latency model unreadable (invalid JSON")
        assert written["e-2"]["reason"].startswith("reactive fallback, latency model unreadable (OverflowError")
        await ctl.stop()
        await store.aclose()

    run(main())


@pytest.mark.parametrize("phase,field,value", [
    ("decode", "scale", math.nan), ("decode", "scale", math.inf), ("decode", "contention", math.nan),
    ("prefill", "contention", math.inf),
])
def test_latency_model_with_non_finite_parameters_is_refused(phase: str, field: str, value: float) -> None:
    """A phase model whose SM scaling or contention is not finite predicts NaN or infinite times (a NaN decode
    scale gave NaN TPOT for every split, which `min_slack` then ignored; an infinite prefill contention made
    admission refuse every request while decode ran, and the policy divide by zero): refused on construction,
    so a published one is reported unreadable."""
    d = _latency_model().to_dict()
    d[phase][field] = value
    with pytest.raises(ValueError, match=field):
        LatencyModel.from_dict(d)
    models, bad = models_from_published({"e-0": d})
    assert models == {} and "ValueError" in bad["e-0"]


def test_policy_failing_on_one_engine_does_not_stop_the_others(redis_server: Any) -> None:
    """A published model the policy cannot evaluate (all-zero prefill coefficients: ZeroDivisionError) gets that
    engine the reactive rule; a `decide` policy that raises for one engine holds that one only (the tick raised
    for every engine, tick after tick)."""

    class FailsOnBad:
        def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
            if view.engine_id == "e-bad":
                raise RuntimeError("policy bug")
            return _Flip().decide(view, targets)

    async def main() -> None:
        store = RedisStore(redis_server.url, "polfail")
        zero = _latency_model().to_dict()
        zero["prefill"]["coef"] = [0.0, 0.0, 0.0]
        bad = _loaded("e-bad", 64)
        bad["stats"]["arrival_tokens_per_s"] = 5000.0  # the capacity term divides by the prefill time
        await store.publish_view_and_model("e-bad", bad, zero, 5000)
        await store.publish_view_and_model("e-0", _loaded("e-0", 64), _latency_model().to_dict(), 5000)
        ctl = Controller(_cfg(redis_server.url, "polfail", targets=TARGETS, policy="model"), leader_id="ctl-z")
        written = {d["engine_id"]: d for d in await ctl.tick()}
        assert written["e-0"]["reason"].startswith("urgent switch 64->")
        assert written["e-bad"]["reason"].startswith("reactive fallback, model policy failed (ZeroDivisionError")
        await ctl.stop()

        await store.aclose()

        store = RedisStore(redis_server.url, "polfail2")
        for eid in ("e-bad", "e-0"):
            await store.publish_view(eid, _published(eid, 64, 10), 5000)
        ctl = Controller(_cfg(redis_server.url, "polfail2"), FailsOnBad(), leader_id="ctl-f")
        assert [(d["engine_id"], d["to"]) for d in await ctl.tick()] == [("e-0", 72)]
        await ctl.stop()
        await store.aclose()

    run(main())


def test_unparseable_pin_is_skipped_not_fatal(redis_server: Any) -> None:
    """A pin that is not an SM count (written by hand with redis-cli) is ignored; the others still apply and the
    policy decides for the rest (`pins()` raised ValueError in every tick)."""

    async def main() -> None:
        store = RedisStore(redis_server.url, "badpin")
        await store.publish_view("e-0", _published("e-0", 64, 10), 5000)
        await store.publish_view("e-1", _published("e-1", 64, 10), 5000)
        await store.client.hset(store.keys.pins, mapping={"e-0": "lots", "e-1": "32"})
        assert await store.pins() == {"e-1": 32}
        ctl = Controller(_cfg(redis_server.url, "badpin"), _Flip(), leader_id="ctl-p")
        assert {d["engine_id"]: d["to"] for d in await ctl.tick()} == {"e-0": 72, "e-1": 32}
        await ctl.stop()
        await store.aclose()

    run(main())


# -- skewed clocks -------------------------------------------------------------------------------


def test_view_clock_stepping_back_does_not_hold_the_model_policy(redis_server: Any) -> None:
    """An engine that comes back (restarted elsewhere, or its clock stepped) with its clock an hour behind: the
    model policy timed its dwell on the views' clocks, so it held the engine "dwell (3600 s left)" for an hour."""
    policy_cfg = ModelPolicyConfig(dwell_s=0.0, urgent_dwell_s=0.0)

    async def main() -> None:
        store = RedisStore(redis_server.url, "skew")
        ctl = Controller(_cfg(redis_server.url, "skew", targets=TARGETS, policy="model"),
                         ModelPolicy(_latency_model(), policy_cfg), leader_id="ctl-s")
        await store.publish_view("e-0", _loaded("e-0", 64), 5000)
        (first,) = await ctl.tick()
        behind = _decoding("e-0", first["to"])
        behind["time"] = time.time() - 3600.0
        await store.publish_view("e-0", behind, 5000)
        moved = await ctl.tick()
        assert [(d["from"], d["to"] < first["to"]) for d in moved] == [(first["to"], True)]
        await ctl.stop()
        await store.aclose()

    run(main())


def test_future_dated_split_record_holds_at_most_the_dwell(redis_server: Any) -> None:
    """A split record dated an hour ahead (a former leader whose clock ran ahead): the new leader held the
    engine for the dwell, or "waiting for the engine to apply" for the apply timeout, counted from that date,
    so for an hour. It now counts them from when it first read the record."""
    cfg = _cfg(redis_server.url, "future", min_dwell_s=0.2, apply_timeout_s=0.2)

    async def main() -> None:
        store = RedisStore(redis_server.url, "future")
        assert await store.acquire_or_renew("ctl-old", 5000)
        ahead = time.time() + 3600.0
        for eid, sms in (("e-0", 64), ("e-1", 80)):  # e-0 took its split, e-1 did not
            split = dict(id=f"old-{eid}", prefill_sms=sms, reason="old", leader="ctl-old", time=ahead)
            assert await store.write_decision("ctl-old", eid, split, {"leader": "ctl-old"})
            await store.publish_view(eid, _published(eid, 64, 10), 60_000)
        assert await store.release("ctl-old")
        ctl = Controller(cfg, _Flip(), leader_id="ctl-new")
        assert await ctl.tick() == []  # the dwell and the apply timeout, from now
        decided: dict[str, int] = {}

        async def both_decided() -> bool:
            decided.update({d["engine_id"]: d["to"] for d in await ctl.tick()})
            return len(decided) == 2

        await async_wait_until(both_decided, 10.0, "decisions once the dwell / apply timeout passed", interval=0.05)
        assert decided == {"e-0": 72, "e-1": 72}
        await ctl.stop()
        await store.aclose()

    run(main())


# -- splits off the set ----------------------------------------------------------------------------


def test_reactive_policy_moves_from_off_the_set_to_the_nearest_split() -> None:
    """An engine on a split outside the allowed set (the prefill share bounds lowered under it) moves to the
    nearest allowed split, then steps from there; it jumped to the middle of the set (72 -> 40 within SLO)."""
    view = bounded_view(EngineView("e-0", 72, 128, SPLITS, ttft_ms=(50.0,) * 10, tpot_ms=(5.0,) * 10), (0.0, 0.5))
    assert view.splits == tuple(range(8, 65, 8))
    assert ReactivePolicy().decide(view, SLOTargets()).prefill_sms == 64
    over_tpot = EngineView("e-0", 72, 128, view.splits, ttft_ms=(50.0,) * 10, tpot_ms=(500.0,) * 10)
    assert ReactivePolicy().decide(over_tpot, SLOTargets()).prefill_sms == 56


def test_pin_wait_counts_an_engine_with_a_malformed_view_as_not_settled() -> None:
    """`semipd pin --wait` asks which pinned engines are off their pin. The controller skips an engine whose view is
    malformed, so that engine never settles: it is off (the wait names it), not an error that ends the command."""
    from cluster.commands.pin import engines_off_pin

    views = {"e-0": _published("e-0", 64, 4), "e-1": {"engine_id": "e-1", "stats": {"prefill_sms": "many"}}}
    assert engines_off_pin(views, {"*": 64}, {}) == ["e-1"]

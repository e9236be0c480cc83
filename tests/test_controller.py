"""Router choice, controller hysteresis and leader lease: pure functions and a real Redis, no Ray."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from actors.slo.latency_model import LatencyModel, ModelSource, PhaseModel
from actors.slo.policy import ModelPolicy
from actors.slo.types import EngineView, ReactivePolicy, SLOTargets, SplitDecision
from cluster.bootstrap import ClusterConfig, EngineOptions
from cluster.controller import (HOLD_LOG_REPEAT_S, NO_MODEL, Controller, ControllerConfig, bounded_view,
                                decide_with_models, hold_kind, hold_reason, models_from_published, policy_by_name,
                                register_policy, view_from_dict)
from cluster.engine_client import EngineLoad, NoCapacityError
from cluster.redis_store import Backoff, RedisStore
from cluster.serve_app import ServeArgs
from cluster.serve_app import cluster_config as app_cluster_config
from cluster.routing import ActorView, RouterPolicy, RouterState, choose, predicted_ttft_s, rendezvous

from support import async_wait_until

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
POLICY = RouterPolicy()
SPLITS = tuple(range(8, 121, 8))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# -- router choice ------------------------------------------------------------------------


def test_choice_is_deterministic_on_ties() -> None:
    views = [ActorView("e-b"), ActorView("e-a"), ActorView("e-c")]
    assert {choose(views, 100, POLICY) for _ in range(5)} == {"e-a"}
    assert choose(list(reversed(views)), 100, POLICY) == "e-a"


def test_choice_prefers_lower_predicted_ttft() -> None:
    busy = ActorView("e-a", waiting_prefill_tokens=8000, prefill_tokens_per_s=4000)
    idle = ActorView("e-b", waiting_prefill_tokens=100, prefill_tokens_per_s=4000)
    assert choose([busy, idle], 100, POLICY) == "e-b"
    # a faster engine can take more queued work
    fast = ActorView("e-a", waiting_prefill_tokens=8000, prefill_tokens_per_s=400000)
    assert predicted_ttft_s(fast, 100, POLICY) < predicted_ttft_s(idle, 100, POLICY)
    assert choose([fast, idle], 100, POLICY) == "e-a"


def test_unmeasured_engine_is_assumed_as_fast_as_the_others() -> None:
    measured = ActorView("e-a", in_flight=10, prefill_tokens_per_s=100_000)
    fresh = ActorView("e-b")  # no rate yet: the median of the others, not the (low) default
    # 1600 tokens at 100k tok/s (16 ms) beat 10 in-flight requests (21 ms); at the default rate they would not
    fresh_queued = ActorView("e-b", waiting_prefill_tokens=1500)
    assert choose([measured, fresh_queued], 100, POLICY) == "e-b"
    assert predicted_ttft_s(fresh, 100, POLICY) == 100 / POLICY.default_prefill_tokens_per_s


def test_choice_avoids_full_kv_and_heavy_decode() -> None:
    full = ActorView("e-a", kv_usage=0.99)
    empty = ActorView("e-b", kv_usage=0.10, waiting_prefill_tokens=200)
    assert choose([full, empty], 10, POLICY) == "e-b"
    decoding = ActorView("e-a", in_flight=200)
    assert choose([decoding, ActorView("e-b", in_flight=10)], 10, POLICY) == "e-b"


def test_choice_skips_draining_dead_and_unhealthy() -> None:
    views = [ActorView("e-a", draining=True), ActorView("e-b", alive=False), ActorView("e-c", healthy=False),
             ActorView("e-d", waiting_prefill_tokens=10**6)]
    assert choose(views, 10, POLICY) == "e-d"
    with pytest.raises(NoCapacityError, match="e-a: draining.*e-b: dead.*e-c: unhealthy"):
        choose(views[:3], 10, POLICY)
    with pytest.raises(NoCapacityError):
        choose(views, 10, POLICY, exclude=["e-d"])


def test_load_is_counted_at_dispatch() -> None:
    state = RouterState(["e-a", "e-b"])
    picks = []
    for i in range(10):
        eid = choose(state.views(), 500, POLICY)
        state.dispatch(eid, f"r{i}", 500, now=float(i))
        picks.append(eid)
    assert picks == ["e-a", "e-b"] * 5  # no report came back, yet the load spread
    assert state.view("e-a").unacked_prefill_tokens == 2500
    assert state.view("e-a").in_flight == 5
    # a first token acknowledges the prompt: its tokens leave the queue estimate (the request stays in flight)
    state.ack("e-a", "r0")
    assert state.view("e-a").unacked_prefill_tokens == 2000 and state.view("e-a").in_flight == 5
    # a report counts the requests it lists; the others (not arrived yet) are still counted here
    state.report(EngineLoad("e-a", in_flight=7, stats={"waiting_prefill_tokens": 1234,
                                                       "in_flight_ids": ["r0", "r2", "r4", "x", "y"]}))
    v = state.view("e-a")
    assert (v.waiting_prefill_tokens, v.unacked_prefill_tokens, v.in_flight) == (1234, 1000, 9)
    state.dispatch("e-a", "r10", 100, now=101.0)
    assert state.view("e-a").unacked_prefill_tokens == 1100 and state.view("e-a").in_flight == 10
    state.done("e-a", "r10")
    assert state.view("e-a").unacked_prefill_tokens == 1000
    assert state.dispatch_counts == {"e-a": 6, "e-b": 5}


def test_report_marks_draining_and_dead() -> None:
    state = RouterState(["e-a", "e-b"])
    state.report(EngineLoad("e-a", draining=True))
    assert choose(state.views(), 10, POLICY) == "e-b"
    state.mark_dead("e-b", "ActorDiedError")
    with pytest.raises(NoCapacityError):
        choose(state.views(), 10, POLICY)


def test_session_affinity_is_rendezvous_hashing() -> None:
    views = [ActorView(f"e-{i}") for i in range(4)]
    # the same session always lands on the same engine, regardless of load
    first = {s: choose(views, 10, POLICY, session_id=s) for s in map(str, range(200))}
    loaded = [ActorView(v.engine_id, waiting_prefill_tokens=10**5 * i) for i, v in enumerate(views)]
    assert {s: choose(loaded, 10, POLICY, session_id=s) for s in first} == first
    assert len(set(first.values())) == 4  # sessions spread over all engines
    # removing one engine moves only the sessions that were on it
    without = [v for v in views if v.engine_id != "e-2"]
    moved = {s for s in first if choose(without, 10, POLICY, session_id=s) != first[s]}
    assert moved == {s for s, e in first.items() if e == "e-2"}
    assert rendezvous("x", ["e-1", "e-0"]) == rendezvous("x", ["e-0", "e-1"])
    # affinity off: plain load-based choice
    assert choose(views, 10, RouterPolicy(session_affinity=False), session_id="7") == "e-0"


def test_router_policy_validation() -> None:
    with pytest.raises(ValueError):
        RouterPolicy(kv_soft_limit=1.0)
    with pytest.raises(ValueError):
        RouterPolicy(stall_timeout_s=0)


# -- controller: pure parts --------------------------------------------------------------


def _view(prefill: int = 64, n: int = 10, ttft: float = 100.0, tpot: float = 10.0) -> EngineView:
    return EngineView("e-0", prefill, 128, SPLITS, ttft_ms=(ttft,) * n, tpot_ms=(tpot,) * n)


CFG = ControllerConfig("redis://127.0.0.1:1/0", min_dwell_s=5.0, min_samples=8, apply_timeout_s=10.0)


def test_hold_reason_hysteresis() -> None:
    now = 1000.0
    assert hold_reason(_view(), 72, now, None, None, CFG) is None
    assert hold_reason(_view(), 64, now, None, None, CFG) == "no change"
    assert "not an available split" in hold_reason(_view(), 70, now, None, None, CFG)
    assert "dwell" in hold_reason(_view(), 72, now, now - 2.0, None, CFG)
    assert hold_reason(_view(), 72, now, now - 6.0, None, CFG) is None
    assert "warming up" in hold_reason(_view(n=3), 72, now, None, None, CFG)
    pending = {"prefill_sms": 72, "time": now - 1.0}
    assert "waiting for the engine" in hold_reason(_view(), 80, now, None, pending, CFG)
    applied = {"prefill_sms": 64, "time": now - 1.0}
    assert hold_reason(_view(), 72, now, None, applied, CFG) is None
    stale = {"prefill_sms": 72, "time": now - 20.0}
    assert hold_reason(_view(), 80, now, None, stale, CFG) is None


def test_hold_reason_urgent_decision_waits_the_short_dwell_and_no_warm_up() -> None:
    now = 1000.0
    assert CFG.urgent_dwell_s == 2.0
    assert hold_reason(_view(n=0), 72, now, now - 2.5, None, CFG, urgent=True) is None
    assert "dwell" in hold_reason(_view(n=0), 72, now, now - 1.0, None, CFG, urgent=True)
    assert "dwell" in hold_reason(_view(n=0), 72, now, now - 2.5, None, CFG)  # not urgent: the full dwell
    with pytest.raises(ValueError):
        ControllerConfig("redis://127.0.0.1:1/0", urgent_dwell_s=-1.0)


def test_policy_registry() -> None:
    assert isinstance(policy_by_name("reactive"), ReactivePolicy)
    assert isinstance(policy_by_name("actors.slo.types:ReactivePolicy"), ReactivePolicy)
    with pytest.raises(ValueError, match="unknown split policy"):
        policy_by_name("nope")

    class Fixed:
        def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
            return SplitDecision(8, "fixed")

    register_policy("test-fixed", Fixed)
    assert policy_by_name("test-fixed").decide(_view(), SLOTargets()).prefill_sms == 8
    # "model" starts without models (the controller fills in the published ones), a fresh one per call
    model_policy = policy_by_name("model")
    assert isinstance(model_policy, ModelPolicy) and dict(model_policy.models) == {}
    assert policy_by_name("model") is not model_policy


def test_model_policy_flows_to_the_actors(tiny_llama: Path) -> None:
    """The actors profile and publish only when the cluster's policy uses models and Redis is there."""
    model = ClusterConfig(str(tiny_llama), redis_url="redis://h:1/0", policy="model", latency_profile="/p.json")
    assert model.model_source() == ModelSource("/p.json", "quick")
    assert model.controller_config().policy == "model"
    assert ClusterConfig.from_dict(model.to_dict()) == model
    assert ClusterConfig(str(tiny_llama), redis_url="redis://h:1/0").model_source() is None
    assert ClusterConfig(str(tiny_llama), policy="model").model_source() is None  # no Redis: nothing to publish to
    with pytest.raises(ValueError, match="grid"):
        ClusterConfig(str(tiny_llama), policy="model", profile_grid="huge")

    import argparse

    from cluster.commands import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(tiny_llama), "--policy", "model", "--profile-grid", "full"])
    cfg = serve.cluster_config(args, "redis://h:1/0")
    assert cfg.policy == "model" and cfg.model_source() == ModelSource(None, "full")
    app_args = serve.serve_app_args(args, "redis://h:1/0", None)
    assert (app_args["controller_policy"], app_args["profile_grid"]) == ("model", "full")
    assert cfg.engine_config().overlap_decode and cfg.engine_config().overlap_prefill
    assert cfg.prefill_sm_fraction == (0.0, 1.0)
    assert cfg.engine_config().switch_interval_ms is None  # Python's own unless asked
    assert cfg.engine_config().decode_pace_ms is None  # decode steps back to back unless asked
    assert cfg.engine_config().prefill_layers_ahead == 8  # prefill held to 8 layers queued unless asked
    args = parser.parse_args(["serve", "--model", str(tiny_llama), "--policy", "fixed", "--prefill-sms", "48",
                              "--no-overlap-decode", "--no-overlap-prefill", "--prefill-sm-max", "0.75", "--switch-interval-ms", "0.5",
                              "--decode-pace-ms", "18", "--prefill-layers-ahead", "0"])
    cfg = serve.cluster_config(args, "redis://h:1/0")
    assert (cfg.policy, cfg.engine_config().prefill_sms, cfg.engine_config().overlap_decode) == ("fixed", 48, False)
    assert not cfg.engine_config().overlap_prefill
    assert cfg.engine_config().splits == (48,)  # a fixed split: the engine creates only that one
    assert cfg.controller_config().prefill_sm_fraction == (0.0, 0.75)
    app_cfg = app_cluster_config(ServeArgs(**serve.serve_app_args(args, "redis://h:1/0", None)), "redis://h:1/0")
    assert (app_cfg.policy, app_cfg.engine.prefill_sms, app_cfg.engine.overlap_decode) == ("fixed", 48, False)
    assert not app_cfg.engine.overlap_prefill
    assert app_cfg.prefill_sm_fraction == (0.0, 0.75)
    assert cfg.engine_config().switch_interval_ms == app_cfg.engine.switch_interval_ms == 0.5
    assert cfg.engine_config().decode_pace_ms == app_cfg.engine.decode_pace_ms == 18
    assert cfg.engine_config().prefill_layers_ahead == app_cfg.engine.prefill_layers_ahead == 0
    assert cfg.stream_interval == app_cfg.stream_interval == 1
    args = parser.parse_args(["serve", "--model", str(tiny_llama), "--stream-interval", "4"])
    assert serve.cluster_config(args, None).stream_interval == 4
    assert app_cluster_config(ServeArgs(**serve.serve_app_args(args, None, None)), None).stream_interval == 4
    args = parser.parse_args(["serve", "--model", str(tiny_llama), "--num-replicas", "3"])
    assert ServeArgs(**serve.serve_app_args(args, None, None)).num_replicas == 3


def test_serve_gives_every_engine_the_deployments_targets_prefill_order_and_admission(tiny_llama: Path) -> None:
    """`semipd serve --prefill-order/--admission/--admission-slack` and the Serve app's arguments reach each
    engine's `SLOConfig`, with the deployment's TTFT and TPOT targets; off and FCFS unless asked."""
    import argparse

    from actors.config import ConfigError, SLOConfig
    from cluster.commands import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(tiny_llama), "--ttft-slo-ms", "800", "--tpot-slo-ms", "20"])
    assert serve.cluster_config(args, None).engine_config().slo == SLOConfig(ttft_ms=800, tpot_ms=20)
    args = parser.parse_args(["serve", "--model", str(tiny_llama), "--ttft-slo-ms", "800", "--prefill-order", "edf",
                              "--admission", "queue", "--admission-slack", "1.5", "--latency-profile", "p.json"])
    expected = SLOConfig(ttft_ms=800, tpot_ms=50, order="edf", admission=True, admission_slack=1.5,
                         admission_action="queue", latency_profile="p.json")
    assert serve.cluster_config(args, None).engine_config().slo == expected
    app_args = ServeArgs(**serve.serve_app_args(args, None, None))
    assert app_cluster_config(app_args, None).engine_config().slo == expected
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["serve", "--model", str(tiny_llama), "--admission", "maybe"])
    assert e.value.code == 2
    with pytest.raises(ConfigError, match="admission"):
        ServeArgs.parse({"model": str(tiny_llama), "admission": "maybe"})
    with pytest.raises(ConfigError, match="admission_slack"):
        EngineOptions(admission="reject", admission_slack=0.0)


def test_view_from_published_dict() -> None:
    d = {"engine_id": "e-1", "time": 5.0, "ttft_ms": [1, 2], "tpot_ms": [3],
         "stats": {"prefill_sms": 64, "total_sms": 128, "splits": [8, 64, 120], "waiting_prefill_tokens": 7,
                   "num_decoding": 2, "decode_context_tokens": 100, "arrival_tokens_per_s": 250.0,
                   "arrival_mean_prompt_tokens": 125.0, "mean_output_tokens": 30.0, "recent_decode_step_ms": 12.5,
                   "decode_pace_ms": 18.0, "recent_prefill_ms": 140.0, "recent_prefill_tokens": 3500.0,
                   "arrival_mean_max_tokens": 64.0, "refuses_late": True}}
    v = view_from_dict(d)
    assert (v.engine_id, v.prefill_sms, v.splits, v.ttft_ms, v.waiting_prefill_tokens) == ("e-1", 64, (8, 64, 120),
                                                                                           (1.0, 2.0), 7)
    assert v.arrival_tokens_per_s == 250.0 and v.mean_prompt_tokens == 125.0 and v.mean_output_tokens == 30.0
    assert v.decode_step_ms == 12.5 and v.decode_pace_ms == 18.0
    assert v.prefill_iteration_ms == 140.0 and v.prefill_iteration_tokens == 3500.0 and v.mean_max_tokens == 64.0
    assert v.refuses_late
    older = view_from_dict({**d, "stats": {"prefill_sms": 64, "total_sms": 128}})
    assert older.decode_pace_ms == 0.0 and not older.refuses_late
    assert not view_from_dict({**d, "stats": {**d["stats"], "refuses_late": "yes"}}).refuses_late  # only a JSON true


def test_configs_validate(tiny_llama: Path) -> None:
    with pytest.raises(ValueError):
        ControllerConfig("http://x")
    with pytest.raises(ValueError):
        ControllerConfig("redis://x", interval_s=1.0, lease_s=1.5)
    with pytest.raises(ValueError):
        ClusterConfig(str(tiny_llama), num_actors=0)
    with pytest.raises(ValueError):
        ClusterConfig(str(tiny_llama), num_actors=2, actor_resources=({"a": 1},))
    with pytest.raises(ValueError):
        ClusterConfig(str(tiny_llama), policy="nope")
    with pytest.raises(ValueError):
        ClusterConfig("/nonexistent")
    with pytest.raises(ValueError):
        EngineOptions(page_size=3)
    cfg = ClusterConfig(str(tiny_llama), num_actors=2, actor_resources=({"a": 1}, {"b": 2}),
                        redis_url="redis://h:1/0", slo=SLOTargets(200, 20))
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.resources_for(1) == {"b": 2.0} and cfg.actor_names == ["semipd-engine-0", "semipd-engine-1"]
    with pytest.raises(ValueError, match="unknown cluster config keys"):
        ClusterConfig.from_dict({"model": str(tiny_llama), "bogus": 1})


def test_backoff() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next_delay() == 0.5


# -- lease and controller against a real Redis ----------------------------------------------


def test_lease_one_holder_and_takeover(redis_server: Any) -> None:
    async def main() -> None:
        store = RedisStore(redis_server.url, "lease")
        assert await store.acquire_or_renew("a", 400)
        assert not await store.acquire_or_renew("b", 400)
        assert await store.acquire_or_renew("a", 400)  # renewal by the holder
        # a non-holder cannot write a decision (fenced)
        assert not await store.write_decision("b", "e-0", {"prefill_sms": 8}, {"leader": "b"})
        assert await store.write_decision("a", "e-0", {"prefill_sms": 8}, {"leader": "a"})
        # b takes over only when a stops renewing and the lease expires
        await async_wait_until(lambda: store.acquire_or_renew("b", 400), 5, "a's lease to expire (b takes over)",
                               interval=0.05)
        assert await store.leader() == "b"
        assert not await store.acquire_or_renew("a", 400)
        assert not await store.release("a")  # a cannot release b's lease
        assert await store.release("b")
        assert await store.leader() is None
        assert [d["leader"] for d in await store.decisions()] == ["a"]
        await store.aclose()

    run(main())


class _Flip:
    """Test policy: always one step away from the current split."""

    def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
        i = view.splits.index(view.prefill_sms)
        return SplitDecision(view.splits[i + 1] if i + 1 < len(view.splits) else view.splits[i - 1], "flip")


def _published(engine_id: str, prefill: int, n: int) -> dict[str, Any]:
    return {"engine_id": engine_id, "time": time.time(), "ttft_ms": [50.0] * n, "tpot_ms": [5.0] * n,
            "stats": {"prefill_sms": prefill, "total_sms": 128, "splits": list(SPLITS)}}


def test_controller_tick_decides_records_and_respects_dwell(redis_server: Any, caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    cfg = ControllerConfig(redis_server.url, "tick", min_dwell_s=30.0, min_samples=4, interval_s=0.1, lease_s=1.0)
    caplog.set_level(logging.INFO, logger="cluster.controller")

    def holds() -> list[str]:
        return [r.getMessage().split(": ", 1)[1] for r in caplog.records if "stays at" in r.getMessage()]

    async def main() -> None:
        store = RedisStore(redis_server.url, "tick")
        await store.publish_view("e-0", _published("e-0", 64, 10), 5000)
        await store.publish_view("e-1", _published("e-1", 64, 2), 5000)  # warming up
        ctl = Controller(cfg, _Flip(), leader_id="ctl-1")
        written = await ctl.tick()
        assert [(d["engine_id"], d["from"], d["to"], d["leader"]) for d in written] == [("e-0", 64, 72, "ctl-1")]
        split = await store.get_split("e-0")
        assert split["prefill_sms"] == 72 and split["leader"] == "ctl-1" and split["id"] == written[0]["id"]
        assert await store.get_split("e-1") is None
        assert holds() == ["e-1 stays at 64 SMs, not yet 72: warming up: 2 samples of requests that arrived after "
                           "the last switch (< 4) (flip)"]
        # the engine applied it; dwell time holds the next change, logged once while it lasts
        await store.publish_view("e-0", _published("e-0", 72, 10), 5000)
        assert await ctl.tick() == [] and await ctl.tick() == []
        assert len(holds()) == 2 and holds()[1].startswith("e-0 stays at 72 SMs, not yet 80: dwell: last change")
        status = await store.controller_status()
        assert status["leader"] == "ctl-1" and status["policy"] == "reactive"
        # a second controller is a follower: it decides nothing
        other = Controller(cfg, _Flip(), leader_id="ctl-2")
        assert await other.tick() == [] and not other.is_leader
        assert [d["leader"] for d in await store.decisions()] == ["ctl-1"]
        await ctl.stop()
        await other.stop()
        await store.aclose()

    run(main())


class _Holds:
    """Test policy: holds the current split, with the reason and predicted slack it is given."""

    def __init__(self) -> None:
        self.reason, self.slack = "hold: best split; TTFT 900/1000 ms", -0.05

    def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
        return SplitDecision(view.prefill_sms, self.reason, {"slack": self.slack})


def test_a_hold_is_logged_per_kind_and_again_while_its_split_is_predicted_past_a_target(
        redis_server: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ControllerConfig(redis_server.url, "holds", interval_s=0.1, lease_s=5.0)
    caplog.set_level(logging.INFO, logger="cluster.controller")
    clock = [time.time()]
    monkeypatch.setattr("cluster.controller.time.time", lambda: clock[0])
    policy = _Holds()
    ctl = Controller(cfg, policy, leader_id="ctl-1")

    async def logged_at(*offsets: float) -> int:
        """Tick once at each offset (s) of the controller's clock; how many hold lines they logged."""
        before = sum("stays at" in r.getMessage() for r in caplog.records)
        for offset in offsets:
            clock[0] += offset
            await ctl.tick()
        return sum("stays at" in r.getMessage() for r in caplog.records) - before

    async def main() -> None:
        store = RedisStore(redis_server.url, "holds")
        await store.publish_view("e-0", _published("e-0", 64, 10), 60000)
        assert await logged_at(0.0, 0.5, 1.0) == 1  # past a target: once, then again only HOLD_LOG_REPEAT_S later
        assert await logged_at(HOLD_LOG_REPEAT_S) == 1
        policy.reason = "hold: within hysteresis band (gain +0.05 <= 0.10 for 56); TTFT 900/1000 ms"
        assert await logged_at(0.1) == 1  # a new kind of hold on the same split
        assert "stays at 64 SMs (hold: within hysteresis band (gain +0.05" in caplog.records[-1].getMessage()
        policy.slack = 0.2
        assert await logged_at(HOLD_LOG_REPEAT_S, HOLD_LOG_REPEAT_S) == 0  # within its targets: not again
        await ctl.stop()
        await store.aclose()

    run(main())


def test_hold_kind_is_the_reason_up_to_its_details() -> None:
    assert hold_kind("hold: within hysteresis band (gain +0.00 <= 0.10 for 80); TTFT 148/1500 ms") == \
        "hold: within hysteresis band"
    assert hold_kind("hold: best split; TTFT 791/1500 ms") == "hold: best split"
    assert hold_kind("flip") == "flip"


def test_bounded_view_keeps_the_splits_inside_the_prefill_share() -> None:
    v = _view(prefill=64)  # 128 SMs, splits 8..120
    assert bounded_view(v, (0.0, 1.0)) is v
    assert bounded_view(v, (0.25, 0.5)).splits == (32, 40, 48, 56, 64)
    assert bounded_view(v, (0.51, 0.52)).splits == (64,)  # none inside: the nearest one
    over_ttft = _view(prefill=64, ttft=5000.0)
    assert ReactivePolicy().decide(bounded_view(over_ttft, (0.2, 0.5)), SLOTargets()).prefill_sms == 64
    assert ReactivePolicy().decide(bounded_view(over_ttft, (0.2, 0.6)), SLOTargets()).prefill_sms == 72
    with pytest.raises(ValueError, match="prefill_sm_fraction"):
        ControllerConfig("redis://h:1/0", prefill_sm_fraction=(0.6, 0.4))


def test_controller_tick_respects_prefill_sm_bounds(redis_server: Any) -> None:
    """_Flip always moves one split up; with the prefill share capped at half it moves down instead."""
    cfg = ControllerConfig(redis_server.url, "bounds", min_dwell_s=0.0, min_samples=4, interval_s=0.1, lease_s=1.0,
                           prefill_sm_fraction=(0.0, 0.5))

    async def main() -> None:
        store = RedisStore(redis_server.url, "bounds")
        await store.publish_view("e-0", _published("e-0", 64, 10), 5000)
        ctl = Controller(cfg, _Flip(), leader_id="ctl-b")
        written = await ctl.tick()
        assert [(d["from"], d["to"]) for d in written] == [(64, 56)]
        await ctl.stop()
        await store.aclose()

    run(main())


def test_operator_pin_overrides_the_policy_and_its_dwell(redis_server: Any, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """`semipd pin`: a pinned engine moves to the split nearest its pin at the next tick, dwell and warm-up
    notwithstanding, an engine's own pin beats "*", and `--clear` hands it back to the policy."""
    from cluster.cli import main as cli_main

    cfg = ControllerConfig(redis_server.url, "pin", min_dwell_s=60.0, min_samples=4, interval_s=0.1, lease_s=1.0)
    pin = ["pin", "--redis", redis_server.url, "--cluster-name", "pin"]

    async def main() -> None:
        store = RedisStore(redis_server.url, "pin")
        await store.publish_view("e-0", _published("e-0", 64, 10), 5000)
        await store.publish_view("e-1", _published("e-1", 64, 1), 5000)  # warming up: the policy would wait
        ctl = Controller(cfg, _Flip(), leader_id="ctl-p")
        assert [(d["engine_id"], d["to"]) for d in await ctl.tick()] == [("e-0", 72)]
        await store.publish_view("e-0", _published("e-0", 72, 10), 5000)

        assert await asyncio.to_thread(cli_main, [*pin, "--prefill-sms", "102"]) == 0
        assert await asyncio.to_thread(cli_main, [*pin, "--engine", "e-1", "--prefill-sms", "30"]) == 0
        assert "pins: *=102, e-1=30" in capsys.readouterr().out
        written = {d["engine_id"]: d for d in await ctl.tick()}  # e-0 inside its 60 s dwell, e-1 warming up
        assert {e: d["to"] for e, d in written.items()} == {"e-0": 104, "e-1": 32}  # nearest splits (step 8)
        assert written["e-0"]["reason"] == "pinned to 102 prefill SMs by the operator"
        await store.publish_view("e-0", _published("e-0", 104, 10), 5000)
        await store.publish_view("e-1", _published("e-1", 32, 10), 5000)
        assert await ctl.tick() == []  # pinned where they are: no change, and _Flip is not asked
        capsys.readouterr()
        assert await asyncio.to_thread(cli_main, ["status", "--redis", redis_server.url, "--cluster-name", "pin",
                                                  "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["pins"] == {"*": 102, "e-1": 30}

        assert await asyncio.to_thread(cli_main, [*pin, "--clear"]) == 0
        assert await asyncio.to_thread(cli_main, [*pin, "--engine", "e-1", "--clear"]) == 0
        assert await store.pins() == {}
        assert await ctl.tick() == []  # back to the policy, which waits out the dwell of the pinned moves
        await ctl.stop()
        await store.aclose()

    run(main())
    assert cli_main([*pin, "--prefill-sms", "0"]) == 2
    assert "--prefill-sms must be a positive SM count" in capsys.readouterr().err


def test_pin_wait_returns_once_every_pinned_engine_runs_its_split(redis_server: Any,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`semipd pin --wait S`: exit 0 once a controller tick has read the pin and the engine runs the split
    nearest it, a pin to the split it already runs included (no decision is written for that); exit 1, naming
    why, with no controller ticking or with the engine still on another split after S seconds."""
    from cluster.cli import main as cli_main

    cfg = ControllerConfig(redis_server.url, "pinwait", min_dwell_s=60.0, min_samples=4, interval_s=0.05,
                           lease_s=5.0)
    pin = ["pin", "--redis", redis_server.url, "--cluster-name", "pinwait"]

    async def pin_and_wait(prefill_sms: int, wait_s: float) -> int:
        return await asyncio.to_thread(cli_main, [*pin, "--prefill-sms", str(prefill_sms), "--wait", str(wait_s)])

    async def main() -> None:
        store = RedisStore(redis_server.url, "pinwait")
        await store.publish_view("e-0", _published("e-0", 64, 10), 60_000)
        assert await pin_and_wait(64, 0.5) == 1
        assert "no controller tick within 0.5 s" in capsys.readouterr().err

        ctl = Controller(cfg, _Flip(), leader_id="ctl-w")
        await ctl.start()
        assert await pin_and_wait(64, 10) == 0  # already there
        assert await store.decisions() == []
        assert await pin_and_wait(80, 1) == 1  # decided, but the engine has not taken it
        assert "not on their pinned split after 1 s: e-0" in capsys.readouterr().err
        assert (await store.get_split("e-0") or {}).get("prefill_sms") == 80
        await store.publish_view("e-0", _published("e-0", 80, 10), 60_000)
        assert await pin_and_wait(80, 10) == 0
        await ctl.stop()
        await store.aclose()

    run(main())
    assert cli_main([*pin, "--prefill-sms", "64", "--wait", "-1"]) == 2
    assert "--wait must be >= 0 seconds" in capsys.readouterr().err


def test_pin_names_engines_without_the_pinned_split_and_exact_sets_none(redis_server: Any,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """An engine with no split of the pinned count (a fixed-split deployment has only its own) is named with the
    split it gets instead; `--exact` then sets no pin (exit 1), so nothing is measured as a split it is not. A pin
    for an engine that publishes no view (a mistyped id) is not set either."""
    from cluster.cli import main as cli_main

    pin = ["pin", "--redis", redis_server.url, "--cluster-name", "exact"]
    fixed = {**_published("e-0", 56, 10), "stats": {"prefill_sms": 56, "total_sms": 132, "splits": [56]}}

    async def main() -> None:
        store = RedisStore(redis_server.url, "exact")
        await store.publish_view("e-0", fixed, 60_000)
        await store.publish_view("e-1", _published("e-1", 64, 10), 60_000)
        capsys.readouterr()
        assert await asyncio.to_thread(cli_main, [*pin, "--prefill-sms", "48", "--exact"]) == 1
        err = capsys.readouterr().err
        assert "e-0 has no split of 48 prefill SMs: it runs the nearest, 56" in err
        assert "e-1" not in err and "--exact: pins left as they were" in err
        assert await store.pins() == {}
        assert await asyncio.to_thread(cli_main, [*pin, "--engine", "e-1", "--prefill-sms", "48", "--exact"]) == 0
        assert capsys.readouterr().err == ""  # e-1 has a split of 48; e-0 is not pinned
        assert await asyncio.to_thread(cli_main, [*pin, "--prefill-sms", "40"]) == 0  # the nearest, as before
        out = capsys.readouterr()
        assert "pins: *=40, e-1=48" in out.out
        assert out.err == "semipd pin: e-0 has no split of 40 prefill SMs: it runs the nearest, 56\n"
        assert await asyncio.to_thread(cli_main, [*pin, "--engine", "e-9", "--prefill-sms", "48"]) == 1
        assert "no engine 'e-9' publishes a view in cluster 'exact' (engines: e-0, e-1)" in capsys.readouterr().err
        assert await store.pins() == {"*": 40, "e-1": 48}
        assert await asyncio.to_thread(cli_main, [*pin, "--engine", "e-9", "--clear"]) == 0  # clearing goes ahead
        await store.aclose()

    run(main())
    assert cli_main([*pin, "--clear", "--exact"]) == 2
    assert "--exact goes with --prefill-sms" in capsys.readouterr().err


def test_engines_off_pin_judges_the_split_the_controller_may_set() -> None:
    """The split a pin waits for is the nearest one within the controller's `prefill_sm_fraction` (as
    `bounded_view` gives it); a draining engine, which the controller leaves alone, is not waited for; a
    last decision for another split still to take counts as off."""
    from cluster.commands.pin import engines_off_pin

    views = {"e-0": _published("e-0", 64, 0), "e-1": {**_published("e-1", 32, 0), "draining": True}}
    assert engines_off_pin(views, {"*": 120}, {}, (0.0, 0.5)) == []  # 64: the nearest 120 of the splits <= 64
    assert engines_off_pin(views, {"*": 120}, {}) == ["e-0"]  # unbounded: 120
    assert engines_off_pin(views, {"*": 64}, {}) == []
    assert engines_off_pin(views, {"*": 64}, {"e-0": {"prefill_sms": 72}}) == ["e-0"]
    assert engines_off_pin(views, {"e-1": 64}, {}) == []


def test_controller_survives_redis_outage(redis_server: Any) -> None:
    cfg = ControllerConfig(redis_server.url, "outage", min_dwell_s=0.0, min_samples=1, interval_s=0.1, lease_s=1.0,
                           max_backoff_s=0.3)

    async def main() -> None:
        ctl = Controller(cfg, _Flip(), leader_id="ctl-x")
        await ctl.start()
        await async_wait_until(lambda: ctl.is_leader, 10.0, "leadership", interval=0.05)
        redis_server.stop()
        await async_wait_until(lambda: ctl.errors > 0 and not ctl.redis_ok, 10.0, "the outage to be noticed",
                               interval=0.05)
        redis_server.start()
        await async_wait_until(lambda: ctl.redis_ok and ctl.is_leader, 10.0, "recovery", interval=0.05)
        store = RedisStore(redis_server.url, "outage")
        await store.publish_view("e-0", _published("e-0", 64, 3), 5000)
        await async_wait_until(lambda: ctl.decisions_written > 0, 10.0, "a decision after the outage", interval=0.05)
        assert (await store.get_split("e-0"))["leader"] == "ctl-x"
        await ctl.stop()
        assert await store.leader() is None  # released on stop
        await store.aclose()

    run(main())


# -- the model policy over published latency models ------------------------------------------


def _latency_model() -> LatencyModel:
    """A 128-SM device whose prefill scales with its SMs and whose decode saturates early."""
    return LatencyModel("test-gpu", "test-model", 128, SPLITS,
                        prefill=PhaseModel("compute", (0.03, 9e-7, 1.0), scale=1.0, contention=0.1),
                        decode=PhaseModel("bandwidth", (0.02, 4.4e-5, 5.5), scale=26.6, contention=0.55))


def _loaded(engine_id: str, prefill: int, n: int = 10) -> dict[str, Any]:
    """A published view with a long prefill queue and a light decode batch, TTFT over a 100 ms target."""
    d = _published(engine_id, prefill, n)
    d["ttft_ms"] = [400.0] * n
    d["stats"].update(waiting_prefill_tokens=20000, num_waiting=20, num_decoding=4, decode_context_tokens=2000)
    return d


def test_decide_with_models_falls_back_per_engine() -> None:
    policy = ModelPolicy({"e-0": _latency_model()})
    targets = SLOTargets(ttft_ms=100.0, tpot_ms=50.0)
    views = [view_from_dict(_loaded(e, 64)) for e in ("e-0", "e-1", "e-2")]
    got = decide_with_models(policy, ReactivePolicy(), views, targets, unreadable={"e-2": "KeyError: 'device'"})
    reactive = ReactivePolicy().decide(views[1], targets)
    assert got["e-1"].prefill_sms == reactive.prefill_sms == 72
    assert got["e-1"].reason == f"reactive fallback, {NO_MODEL}: {reactive.reason}"
    assert got["e-2"].reason.startswith("reactive fallback, latency model unreadable (KeyError")
    assert "model_fallback" not in got["e-0"].predicted and got["e-0"].predicted["best_sms"] > 64
    assert got["e-0"].prefill_sms > 72  # jumps, not one step
    # urgent: past its target by far, observed past it, and the new split far better (`urgent_gain`)
    assert got["e-0"].urgent and got["e-0"].reason.startswith("urgent switch 64->")
    # a "*" default covers every engine
    star = decide_with_models(ModelPolicy(_latency_model()), ReactivePolicy(), views, targets)
    assert all(not d.reason.startswith("reactive") for d in star.values())


def test_models_from_published_skips_bad_json() -> None:
    good = _latency_model().to_dict()
    models, bad = models_from_published({"e-0": good, "e-1": {"device": "x"}, "e-2": {**good, "total_sms": 0}})
    assert models == {"e-0": _latency_model()}
    assert sorted(bad) == ["e-1", "e-2"] and "KeyError" in bad["e-1"] and "total_sms" in bad["e-2"]


def test_controller_model_policy_reads_published_models(redis_server: Any) -> None:
    cfg = ControllerConfig(redis_server.url, "model", SLOTargets(ttft_ms=100.0, tpot_ms=50.0), policy="model",
                           min_dwell_s=0.0, min_samples=4, interval_s=0.1, lease_s=1.0)

    async def main() -> None:
        store = RedisStore(redis_server.url, "model")
        await store.publish_view_and_model("e-0", _loaded("e-0", 64), _latency_model().to_dict(), 5000)
        await store.publish_view_and_model("e-1", _loaded("e-1", 64), None, 5000)  # no model (yet)
        assert sorted(await store.read_models(["e-0", "e-1"])) == ["e-0"]
        ctl = Controller(cfg, leader_id="ctl-m")
        written = {d["engine_id"]: d for d in await ctl.tick()}
        assert sorted(written) == ["e-0", "e-1"] and ctl.engines_with_model == ["e-0"]
        by_model, fallback = written["e-0"], written["e-1"]
        assert by_model["policy"] == "model" and by_model["reason"].startswith("urgent switch 64->")
        assert by_model["to"] == by_model["predicted"]["best_sms"] > 72 and "slack" in by_model["predicted"]
        assert fallback["reason"].startswith(f"reactive fallback, {NO_MODEL}: P90 TTFT 400 ms over 100")
        assert fallback["to"] == 72 and fallback["predicted"]["model_fallback"] == 1.0
        # once e-1 publishes a model, the model policy decides for it too
        await store.publish_view_and_model("e-1", _loaded("e-1", 72), _latency_model().to_dict(), 5000)
        await store.publish_view("e-0", _loaded("e-0", by_model["to"]), 5000)
        again = {d["engine_id"]: d for d in await ctl.tick()}
        assert ctl.engines_with_model == ["e-0", "e-1"]
        assert again["e-1"]["reason"].startswith("urgent switch 72->") and again["e-1"]["to"] == by_model["to"]
        assert (await ctl.status())["engines_with_model"] == ["e-0", "e-1"]
        await ctl.stop()
        await store.aclose()

    run(main())


def _decoding(engine_id: str, prefill: int, n: int = 10) -> dict[str, Any]:
    """A published view with no prefill queue and a large decode batch, TPOT over a 50 ms target."""
    d = _published(engine_id, prefill, n)
    d["tpot_ms"] = [120.0] * n
    d["stats"].update(waiting_prefill_tokens=0, num_waiting=0, num_decoding=256, decode_context_tokens=256 * 2000)
    return d


def test_controller_sets_different_splits_on_engines_that_see_different_loads(redis_server: Any) -> None:
    """Two GPUs of one model, one behind on prompts and one on decodes: one tick moves SMs to prefill on the first
    and to decode on the second, each through its own split key."""
    cfg = ControllerConfig(redis_server.url, "mixed", SLOTargets(ttft_ms=100.0, tpot_ms=50.0), policy="model",
                           min_dwell_s=0.0, min_samples=4, interval_s=0.1, lease_s=1.0)

    async def main() -> None:
        store = RedisStore(redis_server.url, "mixed")
        model = _latency_model().to_dict()
        await store.publish_view_and_model("prompts", _loaded("prompts", 64), model, 5000)
        await store.publish_view_and_model("decodes", _decoding("decodes", 64), model, 5000)
        ctl = Controller(cfg, leader_id="ctl-d")
        written = {d["engine_id"]: d for d in await ctl.tick()}
        assert written["prompts"]["to"] > 64 > written["decodes"]["to"]
        assert "more SMs to prefill" in written["prompts"]["reason"]
        assert "more SMs to decode" in written["decodes"]["reason"]
        for engine, decision in written.items():
            assert (await store.get_split(engine))["prefill_sms"] == decision["to"]
        await ctl.stop()
        await store.aclose()

    run(main())


@pytest.mark.timeout(90)
def test_engine_actor_publishes_its_latency_model(redis_server: Any, tiny_llama: Path, tmp_path: Path) -> None:
    """An actor of a "model" cluster profiles itself at start (the quick CPU profile), saves the profile,
    publishes it next to its view; the JSON round-trips and the controller decides with it."""
    from actors.gpu_actor import EngineActor
    from actors.slo.latency_model import load_models
    from cluster.redis_store import PublisherConfig

    profile = tmp_path / "profiles.json"
    engine = EngineOptions(num_pages=256).engine_config(str(tiny_llama), "semi-pd")
    publisher = PublisherConfig(redis_server.url, "actor-model", interval_s=0.1, view_ttl_s=2.0)
    actor = EngineActor("m-0", engine, publisher, model_source=ModelSource(str(profile)))
    model = actor.latency_model
    assert model is not None and model.num_samples > 0
    assert load_models(profile) == {model.key: model}  # saved for the next start

    async def main() -> None:
        info = await actor.ready()
        assert info["latency_model"] == model.key
        store = RedisStore(redis_server.url, "actor-model")
        published = await async_wait_until(lambda: store.read_models(["m-0"]), 10.0, "the published model",
                                           interval=0.05)
        assert LatencyModel.from_dict(published["m-0"]) == model
        assert 0 < await store.client.pttl(store.keys.model("m-0")) <= 2000  # expires like the view
        ctl = Controller(ControllerConfig(redis_server.url, "actor-model", policy="model", interval_s=0.1,
                                          lease_s=1.0), leader_id="ctl-a")
        await ctl.tick()
        assert ctl.engines_with_model == ["m-0"] and ctl.policy.models["m-0"] == model  # type: ignore[attr-defined]
        await ctl.stop()
        await actor.shutdown()
        await store.aclose()

    asyncio.run(main())

"""Faults on a real multi-node cluster: Redis outage, a second controller, an engine killed mid-run.

The controllers here run in the test process (real `Controller`s over the real Redis) with
a policy that always wants a change, so every healthy tick produces a decision.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.config import CacheConfig
from actors.engine.frontend import LLM
from actors.request import SamplingParams
from actors.slo.types import EngineView, SLOTargets, SplitDecision
from cluster.bootstrap import ClusterConfig, EngineOptions, ensure_cluster, teardown_cluster
from cluster.controller import Controller
from cluster.engine_client import GenerateRequest
from cluster.redis_store import RedisStore
from cluster.router import Router
from cluster.routing import RouterPolicy

from support import async_wait_until

NODES = ("semipd_node_a", "semipd_node_b")
# waits on the cluster: up to 30 s, polling every 0.1 s; `cond` may be async
apoll = functools.partial(async_wait_until, timeout=30.0, interval=0.1)


class Flip:
    """Always one split step away from the current one."""

    def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
        i = view.splits.index(view.prefill_sms)
        return SplitDecision(view.splits[i + 1] if i + 1 < len(view.splits) else view.splits[i - 1], "flip")


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[256] + [rng.randrange(0, 256) for _ in range(rng.randrange(2, 30))] for _ in range(n)]


async def collect(router: Router, req: GenerateRequest, progress: dict[str, int] | None = None
                  ) -> tuple[list[int], str | None, str | None]:
    ids: list[int] = []
    finish = error = None
    async for chunk in router.generate(req):
        ids.extend(chunk.token_ids)
        finish, error = chunk.finish_reason or finish, chunk.error or error
        if progress is not None:
            progress[req.request_id] = len(ids)
    return ids, finish, error


@pytest.fixture(scope="module")
def cluster(ray_multinode: Any, redis_module: Any, tiny_llama: Path) -> Iterator[ClusterConfig]:
    cfg = ClusterConfig(
        model=str(tiny_llama), num_actors=2, mode="semi-pd", redis_url=redis_module.url,
        actor_resources=tuple({n: 1} for n in NODES), engine=EngineOptions(num_pages=1024),
        cluster_name="test-faults", publish_interval_s=0.2, controller_interval_s=0.2, lease_s=2.0,
        min_dwell_s=0.5, min_samples=0, start_controller=False, ready_timeout_s=120,
    )
    ensure_cluster(cfg)
    try:
        yield cfg
    finally:
        teardown_cluster(cfg)


async def _loads(router: Router) -> dict[str, Any]:
    return {l.engine_id: l for l in await router.loads()}


async def _decisions(store: RedisStore) -> list[dict[str, Any]]:
    try:
        return await store.decisions(500)
    except Exception:
        return []


@pytest.mark.timeout(150)
def test_redis_outage_serving_continues_and_controller_resumes(cluster: ClusterConfig, redis_module: Any,
                                                               tiny_llama: Path, check_greedy: Callable[..., None]
                                                               ) -> None:
    ps = prompts(20, seed=3)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(str(tiny_llama), cache=CacheConfig(num_pages=512)) as llm:
        expected = llm.generate(ps, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1))
    engine0 = cluster.actor_name(0)

    async def main() -> None:
        router = Router.connect(names=cluster.actor_names, namespace=cluster.namespace)
        store = RedisStore(redis_module.url, cluster.cluster_name)
        ctl = Controller(cluster.controller_config(), Flip(), leader_id="ctl-outage")
        await ctl.start()

        async def switches_by_ctl(after: float) -> list[dict[str, Any]]:
            s = (await _loads(router))[engine0].stats["switches"]
            return [w for w in s if "ctl-outage" in w["reason"] and w["time"] > after]

        await apoll(lambda: switches_by_ctl(0.0), what="a controller decision applied before the outage")
        redis_module.stop()
        await apoll(lambda: not ctl.redis_ok and ctl.errors > 0, what="the controller to notice the outage")

        async def all_publishers_down() -> bool:
            return all(not l.stats["redis"]["redis_ok"] for l in (await _loads(router)).values())

        await apoll(all_publishers_down, what="the engines to notice the outage")
        splits = {e: l.stats["prefill_sms"] for e, l in (await _loads(router)).items()}
        # serving goes on without Redis, with the same outputs
        reqs = [GenerateRequest(f"outage-{i}", p, params) for i, p in enumerate(ps)]
        results = await asyncio.wait_for(asyncio.gather(*(collect(router, r) for r in reqs)), timeout=60)
        check_greedy([r[0] for r in results], expected)
        assert {r[1] for r in results} == {"length"}
        loads = await _loads(router)
        assert {e: l.stats["prefill_sms"] for e, l in loads.items()} == splits  # last split kept
        assert all(l.healthy and l.stats["redis"]["errors"] > 0 for l in loads.values())

        redis_module.start()
        back = time.time()
        await apoll(lambda: ctl.redis_ok and ctl.is_leader, what="the controller to lead again")
        fresh = await apoll(lambda: switches_by_ctl(back), what="a new decision applied after the outage")
        assert fresh[-1]["from_sms"] != fresh[-1]["to_sms"]
        recorded = [d for d in await _decisions(store) if d["time"] >= back]
        assert recorded and {d["leader"] for d in recorded} == {"ctl-outage"}
        await apoll(lambda: _loads_ok(router), what="the engines to publish again")
        await ctl.stop()
        await store.aclose()

    asyncio.run(main())


async def _loads_ok(router: Router) -> bool:
    return all(l.stats["redis"]["redis_ok"] for l in (await router.loads()))


@pytest.mark.timeout(120)
def test_second_controller_only_one_acts(cluster: ClusterConfig, redis_module: Any) -> None:
    cfg = cluster.controller_config()

    async def main() -> None:
        store = RedisStore(redis_module.url, cluster.cluster_name)
        first = Controller(cfg, Flip(), leader_id="ctl-first")
        second = Controller(cfg, Flip(), leader_id="ctl-second")
        await first.start()
        await apoll(lambda: first.is_leader, what="the first controller to lead")
        await second.start()
        start = time.time()

        async def since(t: float) -> list[dict[str, Any]]:
            return [d for d in await _decisions(store) if d["time"] >= t]

        await apoll(lambda: _at_least(since(start), 4), what="decisions with two controllers running")
        assert {d["leader"] for d in await since(start)} == {"ctl-first"}
        assert second.ticks > 3 and not second.is_leader and second.decisions_written == 0
        # the leader dies without releasing its lease: the second takes over once it expires
        await first.stop(release=False)
        crashed = time.monotonic()
        await apoll(lambda: second.is_leader, what="the second controller to take over")
        assert time.monotonic() - crashed >= cfg.lease_s - 2 * cfg.interval_s - 0.1
        after = time.time()
        await apoll(lambda: _at_least(since(after), 1), what="a decision by the new leader")
        leaders = [d["leader"] for d in await since(start)]  # newest first
        assert set(leaders) == {"ctl-first", "ctl-second"}
        cut = leaders.index("ctl-first")
        assert set(leaders[:cut]) == {"ctl-second"} and set(leaders[cut:]) == {"ctl-first"}  # never interleaved
        await second.stop()
        await store.aclose()

    asyncio.run(main())


async def _at_least(items: Any, n: int) -> bool:
    return len(await items) >= n


@pytest.mark.timeout(150)
def test_engine_whose_process_dies_is_started_again(cluster: ClusterConfig) -> None:
    """An engine's process that dies (as of a CUDA error, which poisons its context) is started again by Ray
    (`engine_restarts`), and a router serves with it once it answers, with no operator."""
    import ray

    victim = cluster.actor_name(0)

    async def main() -> None:
        router = Router.connect(names=cluster.actor_names, namespace=cluster.namespace,
                                policy=RouterPolicy(stall_timeout_s=5.0, ping_timeout_s=2.0))
        handle = router.state.actors[victim].handle
        before = (await handle.ready.remote())["pid"]
        ray.kill(handle, no_restart=False)
        await _started_again(router, victim, before)
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        before_counts = dict(router.dispatch_counts)
        done = await asyncio.wait_for(asyncio.gather(*(collect(router, GenerateRequest(f"again-{i}", p, params))
                                                       for i, p in enumerate(prompts(8, seed=6)))), timeout=60)
        assert all(f == "length" and len(ids) == 3 for ids, f, _ in done)
        assert router.dispatch_counts[victim] > before_counts.get(victim, 0)  # the restarted engine serves

    asyncio.run(main())


@pytest.mark.timeout(150)
def test_engine_that_loses_its_gpu_ends_its_requests_and_is_started_again(cluster: ClusterConfig) -> None:
    """An engine whose GPU fails for good (a sticky CUDA error; injected here into the actor, since a CPU
    has none) ends its requests with an error at once instead of leaving them hanging, then its process
    exits and Ray starts it again, and it serves."""
    victim = cluster.actor_name(1)

    def lose_the_gpu(actor: Any) -> None:
        actor.llm.core._device_lost(RuntimeError("CUDA error: an illegal memory access was encountered"))

    async def main() -> None:
        router = Router.connect(names=[victim], namespace=cluster.namespace,
                                policy=RouterPolicy(stall_timeout_s=5.0, ping_timeout_s=2.0))
        handle = router.state.actors[victim].handle
        before = (await handle.ready.remote())["pid"]
        progress: dict[str, int] = {}
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        doomed = asyncio.ensure_future(collect(router, GenerateRequest("doomed", [1, 2, 3, 4], params), progress))
        await apoll(lambda: progress.get("doomed", 0) > 0, what="the request to stream")
        await handle.__ray_call__.remote(lose_the_gpu)
        ids, finish, error = await asyncio.wait_for(doomed, timeout=20)
        assert finish == "error" and "the GPU failed" in (error or "") and 0 < len(ids) < 400
        await _started_again(router, victim, before)
        again = await asyncio.wait_for(collect(router, GenerateRequest("again", [1, 2, 3], SamplingParams(
            max_tokens=3, temperature=0, ignore_eos=True))), timeout=60)
        assert again[1] == "length" and len(again[0]) == 3

    asyncio.run(main())


async def _started_again(router: Router, engine_id: str, old_pid: int) -> None:
    """Wait until Ray has started the engine's actor again (another process) and `router` took it back."""
    handle = router.state.actors[engine_id].handle

    async def restarted() -> bool:
        try:
            return (await asyncio.wait_for(handle.ready.remote(), timeout=5.0))["pid"] != old_pid
        except Exception:  # still down, exiting, or starting
            return False

    await async_wait_until(restarted, timeout=90.0, interval=0.5, what="the engine actor to start again")
    await apoll(lambda: _alive_after_refresh(router, engine_id), what="the router to take the engine back")


async def _alive_after_refresh(router: Router, engine_id: str) -> bool:
    await router.refresh()
    return router.state.actors[engine_id].alive


@pytest.mark.timeout(150)
def test_actor_killed_mid_run(cluster: ClusterConfig) -> None:
    import ray

    victim, survivor = cluster.actor_name(0), cluster.actor_name(1)
    policy = RouterPolicy(stall_timeout_s=5.0, ping_timeout_s=2.0)
    params = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)

    async def main() -> None:
        router = Router.connect(names=cluster.actor_names, namespace=cluster.namespace, policy=policy)
        old_handle = router.state.actors[victim].handle
        reqs = [GenerateRequest(f"kill-{i}", p, params) for i, p in enumerate(prompts(12, seed=4))]
        progress = {r.request_id: 0 for r in reqs}
        tasks = [asyncio.ensure_future(collect(router, r, progress)) for r in reqs]
        await apoll(lambda: all(n > 0 for n in progress.values()), what="every request to stream")
        on_victim = {r.request_id for r in reqs if router.engine_of(r.request_id) == victim}
        assert 0 < len(on_victim) < len(reqs)
        ray.kill(old_handle, no_restart=True)
        killed = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
        assert time.monotonic() - killed < 30
        for req, res in zip(reqs, results):
            assert not isinstance(res, BaseException), f"{req.request_id} raised {res!r}"
            ids, finish, error = res
            if req.request_id in on_victim:
                assert finish == "error" and victim in error and "failed after" in error, (finish, error)
                assert 0 < len(ids) < 600
            else:
                assert (finish, error, len(ids)) == ("length", None, 600)
        # new requests avoid the dead engine
        before = router.dispatch_counts
        more = [GenerateRequest(f"after-{i}", p, SamplingParams(max_tokens=4, temperature=0))
                for i, p in enumerate(prompts(10, seed=5))]
        done = await asyncio.wait_for(asyncio.gather(*(collect(router, r) for r in more)), timeout=60)
        assert all(f in ("length", "stop") for _, f, _ in done)
        assert router.dispatch_counts[victim] == before[victim]
        assert router.dispatch_counts[survivor] == before[survivor] + 10
        assert not (await _loads(router))[victim].healthy
        # a router that still believes in the dead engine retries a request that had no token yet
        stale = Router({victim: old_handle, survivor: router.state.actors[survivor].handle}, router.model_info())
        retry = GenerateRequest("stale-0", more[0].prompt_token_ids, more[0].params)
        ids, finish, error = await asyncio.wait_for(collect(stale, retry), timeout=30)
        assert finish in ("length", "stop") and error is None and ids
        assert stale.dispatch_counts == {victim: 1, survivor: 1} and not stale.state.actors[victim].alive
        # a router built now (another process) serves with the engines that are left
        late = await asyncio.to_thread(Router.connect, cluster.actor_names, cluster.namespace, policy)
        assert not late.state.actors[victim].alive and late.state.actors[survivor].alive
        assert (await collect(late, GenerateRequest("late-0", [256, 3], more[0].params)))[1] in ("length", "stop")
        # the engine is started again (ensure_cluster), and both routers pick the new actor up
        handles = await asyncio.to_thread(ensure_cluster, cluster)
        assert handles.created == [victim]
        await router.refresh()
        await late.refresh()
        assert router.state.actors[victim].alive and late.state.actors[victim].alive
        again = await collect(router, GenerateRequest("back-0", [256, 1, 2], SamplingParams(max_tokens=3, ignore_eos=True)))
        assert again[1] == "length"

    asyncio.run(main())

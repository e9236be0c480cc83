"""The router between the front ends and the engine actors when an engine fails, hangs or restarts, or a client
leaves or reuses a request id: no request is lost or left hanging, none gets another's chunks, and no caller waits
on an engine that does not answer.

The first tests run the router over in-process `EngineActor`s behind `InProcessHandle`s (test_serving_error_paths),
where a method of an actor can be made to hang; then two over a scripted engine whose output batches the test sends
(chunks that wait for a busy consumer, a failure behind them); the last ones over the engine actors of a real Ray
cluster, which they kill or Ray restarts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.engine.frontend import StreamChunk, Tokenizer
from actors.request import SamplingParams
from cluster.bootstrap import ClusterConfig, EngineOptions, ensure_cluster, teardown_cluster
from cluster.engine_client import LOADS_TIMEOUT_SECONDS, EngineLoad, GenerateRequest, ModelInfo, NoCapacityError
from cluster.openai_api import create_app
from cluster.router import Router
from cluster.routing import RouterPolicy

from support import async_wait_until, collect
from test_serving_error_paths import InProcessHandle, _Method, _session_on

FAST_CHECKS = RouterPolicy(stall_timeout_s=0.3, ping_timeout_s=0.3)
ON_A, ON_B = _session_on("a", ["a", "b"]), _session_on("b", ["a", "b"])  # sessions the router sends to "a", "b"


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture
def engines(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Two in-process EngineActors over the tiny model, "a" and "b" (see `engine_actor` in test_serving_error_paths)."""
    from actors.gpu_actor import EngineActor

    monkeypatch.setattr("cluster.router._cancel_quietly", lambda stream: None)
    actors = [EngineActor(name, EngineOptions(num_pages=256).engine_config(str(tiny_llama), "semi-pd"))
              for name in ("a", "b")]
    try:
        yield actors
    finally:
        for a in actors:
            a.llm.shutdown()


def _router(actors: list[Any], policy: RouterPolicy | None = None) -> tuple[Router, dict[str, InProcessHandle]]:
    """A router over `actors` and the handles it calls them through."""
    info = actors[0].info()
    model = ModelInfo(name="tiny", model_dir=info["model_dir"], architecture=info["architecture"],
                      max_model_len=info["max_model_len"], vocab_size=info["vocab_size"], mode=info["mode"])
    handles = {a.engine_id: InProcessHandle(a) for a in actors}
    return Router(handles, model, policy or RouterPolicy()), handles


class Hang:
    """An actor method that does not answer until `release()` (a hung actor's event loop)."""

    def __init__(self) -> None:
        self.released = asyncio.Event()

    def method(self) -> _Method:
        async def hang(*args: Any) -> None:
            await self.released.wait()
        return _Method(hang)

    def release(self) -> None:
        self.released.set()


async def _in_flight(actor: Any) -> int:
    return (await actor.load()).in_flight


async def _finish_reasons(actor: Any) -> dict[str, int]:
    return dict((await actor.load()).stats["finish_reasons"])


async def _idle(actor: Any) -> bool:
    return await _in_flight(actor) == 0


@pytest.mark.timeout(120)
def test_an_engine_whose_load_hangs_is_reported_unhealthy_within_the_front_ends_wait(engines: list[Any],
                                                                                     tiny_llama: Path) -> None:
    """An engine whose actor does not answer `load()` (hung): `/health` and gRPC health, which wait
    LOADS_TIMEOUT_SECONDS for the loads, still answer with the other engine serving, and requests go there. The
    router waited as long as they do for the hung engine (5 s), so every health check failed and the front end was
    taken out of service for one hung engine; also once a stalled request had it marked dead (its revival ping
    waited 5 s more)."""
    router, handles = _router(engines)
    hang = Hang()
    handles["b"].load = handles["b"].ping = hang.method()
    app = create_app(router, Tokenizer(tiny_llama))

    async def main() -> None:
        for a in engines:
            await a.ready()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            for dead in (False, True):
                if dead:  # as a request that stalled on it leaves it
                    router.state.mark_dead("b", "did not answer a ping while a request stalled")
                loads = {l.engine_id: l.healthy for l in await asyncio.wait_for(router.loads(),
                                                                                 LOADS_TIMEOUT_SECONDS)}
                assert loads == {"a": True, "b": False}
                assert (await http.get("/health")).status_code == 200
        before = router.dispatch_counts.get("b", 0)
        done = await asyncio.wait_for(asyncio.gather(*(collect(router, GenerateRequest(f"r{i}", [256, i], _greedy(3)))
                                                       for i in range(6))), timeout=60)
        assert [d[1] for d in done] == ["length"] * 6
        assert router.dispatch_counts.get("b", 0) == before and router.dispatch_counts["a"] == 6
        del handles["b"].load, handles["b"].ping  # it answers again
        hang.release()
        await async_wait_until(lambda: _alive_after_refresh(router, "b"), 10, "b to be taken back once it answers")
        for a in engines:
            await a.shutdown()

    asyncio.run(main())


async def _alive_after_refresh(router: Router, engine_id: str) -> bool:
    await router.refresh()
    return router.state.actors[engine_id].alive and router.state.actors[engine_id].healthy


def test_a_load_timeout_the_front_ends_would_not_wait_for_is_refused() -> None:
    with pytest.raises(ValueError, match="load_timeout_s"):
        RouterPolicy(load_timeout_s=LOADS_TIMEOUT_SECONDS)


@pytest.mark.timeout(120)
def test_drain_ends_by_its_deadline_when_an_engine_does_not_answer(engines: list[Any]) -> None:
    """`drain(timeout_s)` with an engine that does not answer (hung): it returns soon after its deadline, counting
    this router's requests on that engine as remaining; it waited for good, and `semipd serve`'s shutdown with it."""
    router, handles = _router(engines, FAST_CHECKS)
    hang = Hang()
    handles["b"].drain = hang.method()

    async def main() -> None:
        for a in engines:
            await a.ready()
        on_b = router.generate(GenerateRequest("on-b", [256, 1, 2], _greedy(400), session_id=ON_B))
        assert (await on_b.__anext__()).token_ids and router.engine_of("on-b") == "b"
        started = time.monotonic()
        assert await asyncio.wait_for(router.drain(timeout_s=0.5), timeout=20) == 1
        assert time.monotonic() - started < 0.5 + FAST_CHECKS.ping_timeout_s + 2
        await on_b.aclose()
        hang.release()
        for a in engines:
            await a.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_abort_by_id_answers_when_the_engine_does_not(engines: list[Any]) -> None:
    """`Router.abort` (gRPC's Abort) of a request on an engine whose actor does not answer: False (not known to be
    aborted) after `ping_timeout_s`, not a call that waits as long as the engine hangs."""
    router, handles = _router(engines[:1], FAST_CHECKS)
    hang = Hang()

    async def main() -> None:
        await engines[0].ready()
        stream = router.generate(GenerateRequest("held", [256, 1, 2], _greedy(400)))
        assert (await stream.__anext__()).token_ids
        handles["a"].abort = hang.method()
        assert await asyncio.wait_for(router.abort("held"), timeout=20) is False
        await stream.aclose()
        hang.release()
        await engines[0].shutdown()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_request_cancelled_during_its_submit_leaves_its_id_to_the_next_request_whole(engines: list[Any]) -> None:
    """A client leaves while the router waits for the engine's answer to its submit, and the next request reuses its
    id (a retry with the same x-request-id): while the answer is out the id is still in use (the engine may run it);
    after it, the new request gets its own chunks, not the end ("abort") of the old one that was on its way, while
    the engine ran the new one for nobody."""
    actor = engines[0]
    router, handles = _router([actor])
    handle = handles["a"]
    admitted, answered = asyncio.Event(), asyncio.Event()

    async def first_answer_late(request: GenerateRequest, subscriber: str) -> None:
        await actor.submit(request, subscriber)
        if not admitted.is_set():
            admitted.set()
            await answered.wait()  # the answer is still on its way to the router

    handle.submit = _Method(first_answer_late)

    async def main() -> None:
        await actor.ready()
        client = asyncio.ensure_future(collect(router, GenerateRequest("reused", [256, 1, 2, 3], _greedy(400))))
        await admitted.wait()
        handle.outputs.flowing.clear()  # what the engine sends from now on is on its way
        client.cancel()
        await asyncio.gather(client, return_exceptions=True)
        with pytest.raises(ValueError, match="already in use"):
            await collect(router, GenerateRequest("reused", [256, 4, 5], _greedy(8)))
        answered.set()
        await async_wait_until(lambda: _idle(actor), 30, "the left request to be aborted on the engine")
        retry = asyncio.ensure_future(collect(router, GenerateRequest("reused", [256, 4, 5], _greedy(8))))
        await async_wait_until(lambda: _in_flight(actor), 30, "the retry to be admitted")
        handle.outputs.flowing.set()
        ids, finish, error = await asyncio.wait_for(retry, timeout=30)
        assert (finish, error, len(ids)) == ("length", None, 8)
        await async_wait_until(lambda: _idle(actor), 30, "the retry to end on the engine")
        assert await _finish_reasons(actor) == {"abort": 1, "length": 1}
        await actor.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_request_id_in_flight_on_another_engine_is_refused(engines: list[Any]) -> None:
    """Two requests with one id at once are refused as on one engine, wherever the first one runs: both ran when the
    second went to another engine, and an abort by that id (`Router.abort`, gRPC's Abort) then stopped whichever the
    router found first, the other client's request."""
    router, _ = _router(engines)

    async def main() -> None:
        for a in engines:
            await a.ready()
        holder = router.generate(GenerateRequest("dup", [256, 1, 2], _greedy(30), session_id=ON_A))
        first = await holder.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await collect(router, GenerateRequest("dup", [256, 3], _greedy(30), session_id=ON_B))
        rest = [c async for c in holder]
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 30 and rest[-1].finish_reason == "length"
        assert router.dispatch_counts == {"a": 1} and await _finish_reasons(engines[1]) == {}
        assert (await collect(router, GenerateRequest("dup", [256, 3], _greedy(3))))[1] == "length"  # free again
        for a in engines:
            await a.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_request_on_an_engine_taken_for_dead_is_aborted_there(engines: list[Any]) -> None:
    """A request whose engine stalls and does not answer a ping ends with an error, and the router takes the engine
    for dead; but an engine that is only slow (or restarted) must not go on computing the request for nobody. The
    router sent no abort to an engine it took for dead, so it ran to its last token once it went on."""
    actor = engines[0]
    router, handles = _router([actor], FAST_CHECKS)
    hang = Hang()

    async def main() -> None:
        await actor.ready()
        stream = router.generate(GenerateRequest("stalls", [256, 1, 2], _greedy(400)))
        assert (await stream.__anext__()).token_ids
        handles["a"].outputs.flowing.clear()
        handles["a"].ping = hang.method()
        rest = [c async for c in stream]
        assert rest[-1].finish_reason == "error" and "failed after" in (rest[-1].error or "")
        assert not router.state.actors["a"].alive
        handles["a"].outputs.flowing.set()
        await async_wait_until(lambda: _idle(actor), 60, "the request to end on the engine")
        assert await _finish_reasons(actor) == {"abort": 1}
        hang.release()
        await actor.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_stream_that_stalls_on_an_engine_that_answers_its_ping_goes_on_whole(engines: list[Any]) -> None:
    """An engine that is only slow answers the ping a stall brings: its request is not ended, and every token it
    computed meanwhile reaches the client once its output flows again, in order, none lost to the wait the stall
    check cut short."""
    actor = engines[0]
    router, handles = _router([actor], FAST_CHECKS)
    answer = handles["a"].ping

    async def main() -> None:
        await actor.ready()
        pinged = asyncio.Event()

        async def ping(*args: Any) -> Any:
            pinged.set()
            return await answer.remote(*args)

        expected = [c async for c in router.generate(GenerateRequest("whole", [256, 1, 2], _greedy(200)))]
        stream = router.generate(GenerateRequest("slow", [256, 1, 2], _greedy(200)))  # far from done at the stall
        chunks = [await stream.__anext__()]
        handles["a"].outputs.flowing.clear()
        handles["a"].ping = _Method(ping)
        next_chunk = asyncio.ensure_future(stream.__anext__())
        await pinged.wait()
        handles["a"].outputs.flowing.set()
        chunks.append(await next_chunk)
        chunks += [c async for c in stream]
        assert [t for c in chunks for t in c.token_ids] == [t for c in expected for t in c.token_ids]
        assert chunks[-1].finish_reason == "length" and router.state.actors["a"].alive
        await actor.shutdown()

    asyncio.run(main())


# -- a request whose chunks wait for the router ---------------------------------------------------------------------


class ScriptedEngine:
    """An engine actor (behind an `InProcessHandle`) whose output batches the test sends: `send` returns once the
    router has put each chunk of the batch in its request's queue, so the test knows what waits for the consumer."""

    engine_id = "s"

    def __init__(self) -> None:
        self.submitted = asyncio.Event()
        self._batches: asyncio.Queue[list[StreamChunk] | None] = asyncio.Queue()
        self._asking = asyncio.Event()  # the router asks for the next batch: it queued the last one's chunks
        self._ended = asyncio.Event()

    async def outputs(self, subscriber: str) -> AsyncIterator[list[StreamChunk]]:
        while True:
            self._asking.set()
            batch = await self._batches.get()
            self._asking.clear()
            if batch is None:
                self._ended.set()
                return
            yield batch

    async def send(self, *chunks: StreamChunk) -> None:
        self._asking.clear()
        self._batches.put_nowait(list(chunks))
        await self._asking.wait()

    async def end(self) -> None:
        """End the output stream; once this returns, the router has queued its failure for every open request (it
        does so in the step that sees the stream end)."""
        self._batches.put_nowait(None)
        await self._ended.wait()

    async def submit(self, request: GenerateRequest, subscriber: str) -> None:
        self.submitted.set()

    async def load(self) -> EngineLoad:
        return EngineLoad(self.engine_id)

    async def abort(self, request_id: str) -> bool:
        return True

    async def ping(self) -> None:
        return None


def _scripted_router(monkeypatch: pytest.MonkeyPatch) -> tuple[Router, ScriptedEngine]:
    monkeypatch.setattr("cluster.router._cancel_quietly", lambda stream: None)
    engine = ScriptedEngine()
    model = ModelInfo(name="scripted", model_dir="", architecture="", max_model_len=64, vocab_size=300, mode="semi-pd")
    return Router({engine.engine_id: InProcessHandle(engine)}, model, RouterPolicy()), engine


def _token(request_id: str, n: int, finish_reason: str | None = None) -> StreamChunk:
    """The chunk of `request_id`'s `n`-th output token (id `n`, text `<n>`)."""
    return StreamChunk(request_id, f"<{n}>", (n,), finish_reason=finish_reason, num_prompt_tokens=3,
                       num_output_tokens=n)


def _seen(chunk: StreamChunk) -> tuple[str, tuple[int, ...], str | None, int]:
    return chunk.text, chunk.token_ids, chunk.finish_reason, chunk.num_output_tokens


@pytest.mark.timeout(30)
def test_the_chunks_of_a_request_that_wait_for_the_router_go_on_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of one request that came while its consumer was busy (the router's event loop fell behind) go on as
    one, up to its last chunk: one trip through the front end and Serve's proxy for every token that waits, not one
    each. A chunk the consumer waits for goes on at once, not held back for any that comes later."""
    router, engine = _scripted_router(monkeypatch)

    async def main() -> None:
        stream = router.generate(GenerateRequest("r", [256, 1, 2], _greedy(7)))
        waited = asyncio.ensure_future(stream.__anext__())
        await engine.submitted.wait()
        await engine.send(_token("r", 1))
        seen = [_seen(await asyncio.wait_for(waited, timeout=5))]
        await engine.send(_token("r", 2), _token("r", 3))
        await engine.send(_token("r", 4))
        seen.append(_seen(await stream.__anext__()))
        waited = asyncio.ensure_future(stream.__anext__())
        await engine.send(_token("r", 5))
        seen.append(_seen(await asyncio.wait_for(waited, timeout=5)))
        await engine.send(_token("r", 6), _token("r", 7, "length"), _token("r", 8))  # none comes after the last
        seen += map(_seen, await asyncio.wait_for(_all(stream), timeout=5))
        assert seen == [("<1>", (1,), None, 1), ("<2><3><4>", (2, 3, 4), None, 4), ("<5>", (5,), None, 5),
                        ("<6><7>", (6, 7), "length", 7)]
        assert router.state.actors["s"].dispatches == {} and router.state.actors["s"].alive

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_chunks_queued_ahead_of_their_engines_failure_are_delivered_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine whose output stream ends (it died) right after chunks of a request that wait for the router: they
    go on (as one), and then the request ends as it did when they went one by one, with an error naming the engine
    and the tokens sent, and the engine taken for dead."""
    router, engine = _scripted_router(monkeypatch)

    async def main() -> None:
        stream = router.generate(GenerateRequest("r", [256, 1, 2], _greedy(10)))
        waited = asyncio.ensure_future(stream.__anext__())
        await engine.submitted.wait()
        await engine.send(_token("r", 1))
        seen = [_seen(await asyncio.wait_for(waited, timeout=5))]
        await engine.send(_token("r", 2), _token("r", 3))
        await engine.end()
        seen.append(_seen(await stream.__anext__()))
        rest = await asyncio.wait_for(_all(stream), timeout=5)
        assert seen == [("<1>", (1,), None, 1), ("<2><3>", (2, 3), None, 3)]
        assert [(c.token_ids, c.finish_reason, c.error) for c in rest] == [
            ((), "error", "engine s failed after 3 tokens: its output stream ended")]
        assert not router.state.actors["s"].alive and router.state.actors["s"].dispatches == {}

    asyncio.run(main())


# -- engine actors of a real Ray cluster ---------------------------------------------------------------------------

NODES = ("semipd_node_a", "semipd_node_b")


@pytest.fixture(scope="module")
def cluster(ray_multinode: Any, tiny_llama: Path) -> Iterator[ClusterConfig]:
    cfg = ClusterConfig(model=str(tiny_llama), num_actors=2, mode="semi-pd", namespace="semipd-router-failures",
                        actor_resources=tuple({n: 1} for n in NODES), engine=EngineOptions(num_pages=512),
                        ready_timeout_s=120)
    ensure_cluster(cfg)
    try:
        yield cfg
    finally:
        teardown_cluster(cfg)


def _connect(cfg: ClusterConfig) -> Router:
    return Router.connect(names=cfg.actor_names, namespace=cfg.namespace,
                          policy=RouterPolicy(stall_timeout_s=5.0, ping_timeout_s=2.0))


@pytest.mark.timeout(240)
def test_requests_on_an_engine_ray_restarts_end_and_the_engine_serves_again(cluster: ClusterConfig) -> None:
    """An engine actor whose process dies and that Ray starts again (`engine_restarts`): the request streaming on
    the old process ends at once with an error naming the engine, and the router sends requests to the new one."""
    import ray

    victim = cluster.actor_name(0)
    on_victim = _session_on(victim, cluster.actor_names)

    async def main() -> None:
        router = _connect(cluster)
        handle = router.state.actors[victim].handle
        old_pid = (await handle.ready.remote())["pid"]
        stream = router.generate(GenerateRequest("old-process", [256, 1, 2], _greedy(2000), session_id=on_victim))
        assert (await stream.__anext__()).token_ids and router.engine_of("old-process") == victim
        ray.kill(handle, no_restart=False)
        rest = await asyncio.wait_for(_all(stream), timeout=30)
        assert rest[-1].finish_reason == "error" and victim in (rest[-1].error or "")

        async def restarted() -> bool:
            try:
                return (await asyncio.wait_for(handle.ready.remote(), timeout=5.0))["pid"] != old_pid
            except Exception:  # still down, or starting
                return False

        await async_wait_until(restarted, 120, "Ray to start the engine again", interval=0.5)
        await async_wait_until(lambda: _alive_after_refresh(router, victim), 30, "the router to take it back")
        ids, finish, error = await asyncio.wait_for(
            collect(router, GenerateRequest("new-process", [256, 3], _greedy(4), session_id=on_victim)), timeout=60)
        assert (finish, error, len(ids)) == ("length", None, 4)
        assert router.dispatch_counts[victim] == 2

    asyncio.run(main())


async def _all(stream: Any) -> list[Any]:
    return [c async for c in stream]


@pytest.mark.timeout(240)
def test_a_request_waiting_on_a_killed_engine_is_retried_and_with_every_engine_dead_requests_fail_at_once(
        cluster: ClusterConfig) -> None:
    """An engine actor killed while a request waits there for its first token: the request is served by the other
    engine. With every engine killed, a request is refused at once (NoCapacityError: HTTP 503), not left waiting.
    The engines are started again at the end."""
    import ray

    victim, survivor = cluster.actor_names

    def hold_outputs(actor: Any) -> None:  # the engine runs its requests, and none of their chunks leaves the actor
        async def held(*args: Any) -> None:
            await asyncio.Event().wait()
        actor._forward = held

    async def main() -> None:
        router = _connect(cluster)
        victim_handle = router.state.actors[victim].handle
        await victim_handle.__ray_call__.remote(hold_outputs)
        waiting = asyncio.ensure_future(collect(router, GenerateRequest(
            "waits", [256, 5, 6], _greedy(5), session_id=_session_on(victim, cluster.actor_names))))

        async def admitted_on_victim() -> bool:
            return (await victim_handle.load.remote()).in_flight == 1

        await async_wait_until(admitted_on_victim, 30, "the request to be admitted on the victim", interval=0.1)
        ray.kill(victim_handle, no_restart=True)
        ids, finish, error = await asyncio.wait_for(waiting, timeout=30)
        assert (finish, error, len(ids)) == ("length", None, 5)
        assert router.dispatch_counts == {victim: 1, survivor: 1}

        ray.kill(router.state.actors[survivor].handle, no_restart=True)
        started = time.monotonic()
        with pytest.raises(NoCapacityError):
            await asyncio.wait_for(collect(router, GenerateRequest("none-left", [256, 7], _greedy(3))), timeout=30)
        assert time.monotonic() - started < 10
        with pytest.raises(NoCapacityError, match="no engine can take the request"):
            await asyncio.wait_for(collect(router, GenerateRequest("none-left", [256, 7], _greedy(3))), timeout=1)

    try:
        asyncio.run(main())
    finally:
        ensure_cluster(cluster)

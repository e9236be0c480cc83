"""Error paths between a client and an engine: no request is lost or left hanging, and no engine keeps computing
for a client that left.

The router runs here over in-process `EngineActor`s behind a stand-in for a Ray actor handle (`InProcessHandle`:
every call runs whether or not its reply is awaited, as a Ray call does); the HTTP app is driven through ASGI as
uvicorn drives it.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.engine.frontend import StreamChunk, Tokenizer
from actors.request import SamplingParams
from cluster.bootstrap import EngineOptions
from cluster.engine_client import EngineLoad, GenerateRequest, ModelInfo
from cluster.openai_api import create_app
from cluster.router import Router
from cluster.routing import RouterPolicy

from support import async_wait_until, collect


class _Ref:
    """A Ray ObjectRef as the router uses it: the call runs at once, whether its reply is awaited or not, and the
    reply can be awaited more than once; cancelling a wait for it does not cancel the call."""

    def __init__(self, call: Coroutine[Any, Any, Any]) -> None:
        self._task = asyncio.ensure_future(call)

    def __await__(self) -> Any:
        return asyncio.shield(self._task).__await__()


class _Method:
    def __init__(self, fn: Callable[..., Coroutine[Any, Any, Any]]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> _Ref:
        return _Ref(self.fn(*args))


class _StreamingMethod:
    """`handle.outputs.options(num_returns="streaming").remote(...)`: refs of the actor's batches, in order; while
    `flowing` is clear they are held on the way (the actor goes on)."""

    def __init__(self, fn: Callable[..., AsyncIterator[Any]]) -> None:
        self.fn = fn
        self.flowing = asyncio.Event()
        self.flowing.set()

    def options(self, **_: Any) -> _StreamingMethod:
        return self

    async def remote(self, *args: Any) -> AsyncIterator[Any]:
        async for item in self.fn(*args):
            await self.flowing.wait()
            done = asyncio.get_running_loop().create_future()
            done.set_result(item)
            yield done


class InProcessHandle:
    """An in-process EngineActor behind the calls the router makes on its Ray actor handle; `submit` may be
    replaced by a test (the actor's own is `actor.submit`)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.outputs = _StreamingMethod(actor.outputs)
        self.submit = _Method(actor.submit)

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.actor, name))


@pytest.fixture
def engine_actor(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An in-process EngineActor over the tiny model (its background work starts on the test's loop). A router's
    output stream of it closes with the router's task that reads it: no `ray.cancel` (which would start Ray)."""
    from actors.gpu_actor import EngineActor

    monkeypatch.setattr("cluster.router._cancel_quietly", lambda stream: None)
    actor = EngineActor("e0", EngineOptions(num_pages=256).engine_config(str(tiny_llama), "semi-pd"))
    try:
        yield actor
    finally:
        actor.llm.shutdown()


def _router(actor: Any, handle: InProcessHandle | None = None) -> Router:
    info = actor.info()
    model = ModelInfo(name="tiny", model_dir=info["model_dir"], architecture=info["architecture"],
                      max_model_len=info["max_model_len"], vocab_size=info["vocab_size"], mode=info["mode"])
    return Router({actor.engine_id: handle or InProcessHandle(actor)}, model, RouterPolicy())


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.mark.timeout(120)
def test_a_duplicate_request_id_is_refused_without_cutting_off_the_request_that_holds_it(engine_actor: Any) -> None:
    """A request whose id is in flight on the engine it is routed to is refused with a ValueError (HTTP 400, gRPC
    INVALID_ARGUMENT), and the request that holds the id still gets every chunk: the refusal must not take over
    or drop its stream (it did: the holder then waited forever on an engine that answers pings)."""
    router = _router(engine_actor)

    async def main() -> None:
        await engine_actor.ready()
        holder = router.generate(GenerateRequest("dup", [256, 1, 2, 3], _greedy(40)))
        first = await holder.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await collect(router, GenerateRequest("dup", [256, 4, 5], _greedy(4)))

        async def rest() -> list[StreamChunk]:
            return [c async for c in holder]

        chunks = [first, *await asyncio.wait_for(rest(), timeout=30)]
        assert sum(len(c.token_ids) for c in chunks) == 40 and chunks[-1].finish_reason == "length"
        assert router.state.actors["e0"].dispatches == {}
        load = await engine_actor.load()
        assert load.in_flight == 0 and load.stats["finish_reasons"] == {"length": 1}
        await engine_actor.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_request_cancelled_while_its_submit_is_in_flight_is_aborted_on_the_engine(engine_actor: Any) -> None:
    """A client that leaves (its task cancelled) after the engine admitted its request but before the router had
    the submit's reply: the engine must not go on computing it for nobody, and the router counts nothing for it."""
    handle = InProcessHandle(engine_actor)
    admitted, replied = asyncio.Event(), asyncio.Event()

    async def slow_reply(request: GenerateRequest, subscriber: str) -> None:
        await engine_actor.submit(request, subscriber)
        admitted.set()
        await replied.wait()  # the reply is still on its way to the router

    handle.submit = _Method(slow_reply)
    router = _router(engine_actor, handle)

    async def main() -> None:
        await engine_actor.ready()
        client = asyncio.ensure_future(collect(router, GenerateRequest("left", [256, 1, 2, 3], _greedy(400))))
        await admitted.wait()
        client.cancel()
        await asyncio.gather(client, return_exceptions=True)
        replied.set()

        async def idle() -> bool:
            return (await engine_actor.load()).in_flight == 0

        await async_wait_until(idle, 60, "the request to end on the engine")
        assert (await engine_actor.load()).stats["finish_reasons"] == {"abort": 1}
        assert router.state.actors["e0"].dispatches == {}
        await engine_actor.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_request_that_takes_the_id_of_one_just_aborted_gets_its_own_chunks(engine_actor: Any) -> None:
    """A client leaves and the next request reuses its id (a retry with the same x-request-id): the chunks of the
    aborted request still on their way from the engine (its end, "abort") are not the new request's. The new one
    must get its own tokens, not end at once with the old one's abort while the engine runs it for nobody."""
    handle = InProcessHandle(engine_actor)
    router = _router(engine_actor, handle)

    async def in_flight() -> int:
        return (await engine_actor.load()).in_flight

    async def main() -> None:
        await engine_actor.ready()
        left = router.generate(GenerateRequest("again", [256, 1, 2, 3], _greedy(400)))
        assert (await left.__anext__()).token_ids
        handle.outputs.flowing.clear()  # what the engine sends from now on is on its way
        await left.aclose()
        await async_wait_until(lambda: _is(in_flight(), 0), 30, "the left request to end on the engine")
        retry = asyncio.ensure_future(collect(router, GenerateRequest("again", [256, 4, 5], _greedy(8))))
        await async_wait_until(lambda: _is(in_flight(), 1), 30, "the retry to be admitted")
        handle.outputs.flowing.set()
        ids, finish, error = await asyncio.wait_for(retry, timeout=30)
        assert (finish, error, len(ids)) == ("length", None, 8)
        await async_wait_until(lambda: _is(in_flight(), 0), 30, "the retry to end on the engine")
        assert (await engine_actor.load()).stats["finish_reasons"] == {"abort": 1, "length": 1}
        await engine_actor.shutdown()

    asyncio.run(main())


async def _is(value: Coroutine[Any, Any, Any], expected: Any) -> bool:
    return await value == expected


class EndlessClient:
    """An EngineClient whose requests never finish; records the requests whose streams were closed."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def model_info(self) -> ModelInfo:
        return ModelInfo("tiny", "/models/tiny", "LlamaForCausalLM", 512, 512, "semi-pd")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        try:
            n = 0
            while True:
                n += 1
                yield StreamChunk(request.request_id, "x", (1,), num_prompt_tokens=3, num_output_tokens=n)
                await asyncio.sleep(0)
        finally:
            self.closed.append(request.request_id)

    async def abort(self, request_id: str) -> bool:
        return False

    async def loads(self) -> list[EngineLoad]:
        return []


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 100}),
], ids=["completions", "chat", "responses"])
def test_a_stream_cut_off_while_a_write_is_blocked_closes_its_engine_requests(tiny_llama: Path, path: str,
                                                                              body: dict[str, Any]) -> None:
    """A client that stops reading and then leaves: the server cancels the response while it waits to write a
    chunk. The engine requests of the stream end with the response, not whenever the garbage collector finds
    the stream (it is in a reference cycle: the request ran on until a full collection)."""
    client = EndlessClient()
    app = create_app(client, Tokenizer(tiny_llama))  # type: ignore[arg-type]
    data = json.dumps({"model": "tiny", "stream": True, **body}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                         (b"x-request-id", b"cut-off")]}

    async def main() -> None:
        gone = asyncio.Event()
        requested = False
        bodies = 0

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": data, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal bodies
            if message["type"] == "http.response.body":
                bodies += 1
                if bodies == 3:  # the client stopped reading: this write waits until the client leaves
                    gone.set()
                    await asyncio.Event().wait()

        await asyncio.wait_for(app(scope, receive, send), timeout=30)
        assert bodies == 3 and client.closed == ["cut-off"]

    gc.disable()  # what must hold must not depend on when a collection runs
    try:
        asyncio.run(main())
    finally:
        gc.enable()


class OneChoiceFails:
    """An EngineClient for calls with n=2: choice 0 fails after a token; choice 1 runs for `long` chunks unless
    its stream is closed first. Records how each request's stream ended."""

    def __init__(self, long: int = 200) -> None:
        self.long = long
        self.endings: dict[str, str] = {}  # request id -> finish reason, or "closed-early"

    def model_info(self) -> ModelInfo:
        return ModelInfo("tiny", "/models/tiny", "LlamaForCausalLM", 512, 512, "semi-pd")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        rid, ending = request.request_id, "closed-early"
        try:
            if rid.endswith("-0"):
                yield StreamChunk(rid, "a", (1,), num_prompt_tokens=3, num_output_tokens=1)
                yield StreamChunk(rid, "", (), "error", num_prompt_tokens=3, num_output_tokens=1,
                                  error="engine e0 failed after 1 tokens: ActorDiedError")
                ending = "error"
                return
            for k in range(1, self.long + 1):
                yield StreamChunk(rid, "b", (1,), "length" if k == self.long else None, num_prompt_tokens=3,
                                  num_output_tokens=k)
                await asyncio.sleep(0)  # another step of the engine
            ending = "length"
        finally:
            self.endings[rid] = ending

    async def abort(self, request_id: str) -> bool:
        return False

    async def loads(self) -> list[EngineLoad]:
        return []


def test_a_whole_response_whose_choice_failed_stops_its_other_choices(tiny_llama: Path) -> None:
    """n=2, not streamed: once one choice fails, the response is an error (500, OpenAI's body), so the other choice
    is aborted there and then instead of running to its end for an answer nobody gets."""
    import httpx

    client = OneChoiceFails()
    app = create_app(client, Tokenizer(tiny_llama))  # type: ignore[arg-type]

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            return await http.post("/v1/completions", headers={"x-request-id": "two"},
                                   json={"model": "tiny", "prompt": "hi", "n": 2, "max_tokens": 300})

    r = asyncio.run(main())
    assert r.status_code == 500 and "failed after 1 tokens" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "InternalServerError"
    assert client.endings == {"two-0": "error", "two-1": "closed-early"}


def _two_engine_router(tiny_llama: Path, admissions: tuple[str, str]) -> tuple[Router, list[Any]]:
    """A router over two in-process engine actors, "a" and "b", with the given admission modes."""
    from actors.gpu_actor import EngineActor

    actors = [EngineActor(name, EngineOptions(num_pages=256, admission=admission).engine_config(str(tiny_llama),
                                                                                               "semi-pd"))
              for name, admission in zip("ab", admissions)]
    info = actors[0].info()
    model = ModelInfo(name="tiny", model_dir=info["model_dir"], architecture=info["architecture"],
                      max_model_len=info["max_model_len"], vocab_size=info["vocab_size"], mode=info["mode"])
    return Router({a.engine_id: InProcessHandle(a) for a in actors}, model, RouterPolicy()), actors


def _session_on(engine_id: str, engine_ids: list[str]) -> str:
    """A session id that the router's affinity sends to `engine_id` first."""
    from cluster.routing import rendezvous

    return next(s for s in (f"s{i}" for i in range(1000)) if rendezvous(s, engine_ids) == engine_id)


@pytest.mark.timeout(120)
def test_a_request_one_engine_refuses_is_served_by_another(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Admission control refuses a request on the engine it was routed to (a session pinned there, its TTFT target
    out of reach): the router offers it to the other engine, which serves it, instead of answering the client with
    a 429 while that engine had room. When every engine refuses, the first refusal reaches the caller whole."""
    from actors.slo.admission import AdmissionRejected

    monkeypatch.setattr("cluster.router._cancel_quietly", lambda stream: None)
    router, actors = _two_engine_router(tiny_llama, ("reject", "off"))
    strict, both_strict = None, None
    try:
        async def main() -> None:
            for a in actors:
                await a.ready()
            urgent = GenerateRequest("urgent", [256, 7, 7], _greedy(3), session_id=_session_on("a", ["a", "b"]),
                                     ttft_slo_ms=0.001)
            ids, finish, _ = await collect(router, urgent)
            assert finish == "length" and len(ids) == 3
            assert router.dispatch_counts == {"a": 1, "b": 1}
            assert (await actors[1].load()).stats["finish_reasons"] == {"length": 1}

        asyncio.run(main())
        strict, strict_actors = _two_engine_router(tiny_llama, ("reject", "reject"))
        both_strict = strict_actors

        async def refused_everywhere() -> None:
            for a in strict_actors:
                await a.ready()
            with pytest.raises(AdmissionRejected, match="admission control"):
                await collect(strict, GenerateRequest("late", [256, 7, 7], _greedy(3), ttft_slo_ms=0.001))
            assert strict.dispatch_counts == {"a": 1, "b": 1}
            assert (await collect(strict, GenerateRequest("fine", [256, 8, 8], _greedy(3))))[1] == "length"

        asyncio.run(refused_everywhere())
    finally:
        for a in actors + (both_strict or []):
            a.llm.shutdown()


class RaisingClient(EndlessClient):
    """An EngineClient whose requests raise, before any chunk or after `chunks_first` of them."""

    def __init__(self, chunks_first: int) -> None:
        super().__init__()
        self.chunks_first = chunks_first

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        for n in range(1, self.chunks_first + 1):
            yield StreamChunk(request.request_id, "x", (1,), num_prompt_tokens=3, num_output_tokens=n)
        raise RuntimeError("the engine actor died")


@pytest.mark.parametrize("chunks_first", [0, 2], ids=["before-any-chunk", "mid-stream"])
def test_a_request_whose_engine_raises_is_counted_as_an_error(tiny_llama: Path, chunks_first: int) -> None:
    """`vllm:request_success_total{finished_reason="error"}` counts a request whose engine raised, as it counts one
    that ended with an error chunk: it was neither left out nor counted as aborted by its client."""
    import httpx

    from support import metric, parse_metrics

    app = create_app(RaisingClient(chunks_first), Tokenizer(tiny_llama))  # type: ignore[arg-type]

    async def main() -> tuple[httpx.Response, str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 8})
            return r, (await http.get("/metrics")).text

    r, text = asyncio.run(main())
    assert r.status_code == 500 and "the engine actor died" in r.json()["error"]["message"]
    samples = parse_metrics(text)
    reasons = {reason: metric(samples, "vllm:request_success_total", model_name="tiny", finished_reason=reason)
               for reason in ("error", "abort")}
    assert reasons == {"error": 1, "abort": 0}
    assert metric(samples, "vllm:e2e_request_latency_seconds_count", model_name="tiny") == 1

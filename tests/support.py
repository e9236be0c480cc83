"""Helpers shared by the test modules: polling with a deadline, free ports, an asyncio loop
in a thread, a FastAPI app served by uvicorn in a background thread, a scripted aiohttp server with a session to it
(`stub_http`, for the `bench serve` client), and what a Ray Serve
deployment of semipd runs (its engine actors, its replicas).

`semipd serve` in a process of its own (`ServeProcess`).

Plain functions and classes (no fixtures; shared fixtures live in conftest.py). Test modules
import them as `from support import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import queue
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

if TYPE_CHECKING:
    from actors.config import EngineConfig
    from actors.engine.core import EngineCore
    from actors.engine.frontend import StreamChunk
    from actors.slo.latency_model import LatencyModel
    from cluster.engine_client import GenerateRequest, LocalEngineClient
    from cluster.router import Router

T = TypeVar("T")
COMMITTED_PROFILE = Path(__file__).parents[1] / "bench/profiles/semipd-profile.json"
H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # Prometheus samples: (name, sorted labels) -> value


def committed_model(device: str) -> LatencyModel:
    """The latency profile of `device` committed in bench/profiles/, the one the GPU servers load."""
    from actors.slo.latency_model import load_models

    (model,) = (m for m in load_models(COMMITTED_PROFILE).values() if m.device == device)
    return model


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): float(s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The value of sample `name` with exactly `labels`."""
    return samples[(name, tuple(sorted(labels.items())))]

POLL_INTERVAL_S = 0.01


# Below the kernel's ephemeral ports (32768 and up on Linux), from which every bind to port 0 draws, Ray's
# processes' included, and above Ray's worker ports (10002-19999): a port chosen here for a server that binds
# it seconds later, after Ray started, is not taken meanwhile (a CI run, 2026-12-04, found the ephemeral port
# drawn for `semipd serve`'s gRPC server taken by the time it bound it, after starting a Ray instance).
FREE_PORT_RANGE = (20000, 32767)
_given_ports: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port in `FREE_PORT_RANGE` that was free on `host` and on all interfaces a moment ago, and that
    this process has not been given before."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(*FREE_PORT_RANGE)
        if port not in _given_ports and all(_bindable(h, port) for h in {host, "0.0.0.0"}):
            _given_ports.add(port)
            return port
    raise RuntimeError(f"no free port in {FREE_PORT_RANGE} after 200 tries")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _timeout_message(timeout: float, what: str) -> str:
    return f"timed out after {timeout}s waiting for {what}"


def wait_until(cond: Callable[[], T], timeout: float = 15.0, what: str = "condition", *,
               interval: float = POLL_INTERVAL_S) -> T:
    """Poll `cond()` every `interval` seconds until it returns something truthy, and return that.

    Raises AssertionError naming `what` once `timeout` seconds have passed without success.
    `cond` is always called at least once, and once more after the deadline has passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timeout_message(timeout, what))
        time.sleep(interval)


async def async_wait_until(cond: Callable[[], T | Awaitable[T]], timeout: float = 15.0, what: str = "condition", *,
                           interval: float = POLL_INTERVAL_S) -> T:
    """`wait_until` for coroutines: `cond()` may return a value or an awaitable of one; waits
    with `asyncio.sleep`, so the event loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(_timeout_message(timeout, what))
        await asyncio.sleep(interval)


ROOT = Path(__file__).resolve().parents[1]


def env_without_redis_url() -> dict[str, str]:
    """This environment less SEMIPD_REDIS_URL: a `semipd serve` started in it starts its own redis-server."""
    return {k: v for k, v in os.environ.items() if k != "SEMIPD_REDIS_URL"}


def stop_stray_redis(port: int) -> None:
    """End a redis-server a failed test left behind (its owner is gone)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"SHUTDOWN NOSAVE\r\n")
    except OSError:
        pass


class ServeProcess:
    """`semipd serve ARGS` in a process of its own (its own redis-server), its output lines collected as they
    come. `new_session`: in a session and process group of its own (as a container's or a service's main
    process), which the local Ray instance it starts joins: its pid is both groups' id."""

    def __init__(self, args: Sequence[str], new_session: bool = False) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env_without_redis_url(),
                                     start_new_session=new_session)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout or ()], daemon=True).start()

    def read_until(self, text: str, timeout_s: float) -> str:
        """The first output line holding `text`, waiting up to `timeout_s` for it (the test fails without)."""
        deadline = time.monotonic() + timeout_s
        while True:
            hit = next((x for x in self.seen if text in x), None)
            if hit is not None:
                return hit
            if time.monotonic() > deadline or self.proc.poll() is not None and self.lines.empty():
                pytest.fail(f"no {text!r} from semipd serve; output:\n" + "".join(self.seen[-60:]))
            try:
                self.seen.append(self.lines.get(timeout=0.5))
            except queue.Empty:
                pass

    @property
    def redis_port(self) -> int | None:
        """The port of the redis-server it started, once it printed it."""
        found = re.search(r"redis://127\.0\.0\.1:(\d+)/0", "".join(self.seen))
        return int(found.group(1)) if found else None

    def stop(self) -> None:
        """End it if a failed test left it running: SIGTERM (its shutdown stops what it started), then SIGKILL, and
        the redis-server it started, which a SIGKILL leaves behind."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.redis_port is not None:
            stop_stray_redis(self.redis_port)


class LoopThread:
    """An asyncio event loop running in a daemon thread; `run(coro)` waits for its result."""

    def __init__(self, name: str = "test-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coro` on the loop and return its result (raises TimeoutError after `timeout`)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and wait for its thread to end."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class LiveServer:
    """An ASGI app (FastAPI) under uvicorn in a background thread, on a free loopback port.

    The listening socket is bound before the thread starts, so `port` and `url` are known at
    once and the port cannot be taken in between; `start()` then waits (up to `start_timeout`)
    for uvicorn to report it has started. Use as a context manager, or `start()` / `stop()`.
    """

    def __init__(self, app: Any, name: str = "uvicorn-test", start_timeout: float = 30.0) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)  # clients queue in the backlog until uvicorn accepts
        self.port = int(self.sock.getsockname()[1])
        self.start_timeout = start_timeout
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name=name,
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        """Start serving; returns once uvicorn has started (AssertionError if it does not)."""
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), self.start_timeout,
                   "uvicorn to start")
        assert self.server.started, "uvicorn exited during start-up"
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit, wait for its thread (up to 30 s), and close the socket."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


StubReply = web.StreamResponse | bytes | AsyncIterable[bytes]


async def _stream_reply(request: web.Request, parts: AsyncIterable[bytes]) -> web.StreamResponse:
    """`parts` as a 200 SSE body, each written as it comes; where `parts` raises, the connection is cut there."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        async for part in parts:
            await resp.write(part)
    except Exception:
        assert request.transport is not None
        request.transport.close()  # a disconnect mid-stream: the chunked body never ends
        return resp
    await resp.write_eof()
    return resp


@asynccontextmanager
async def stub_http(reply: Callable[[Any], StubReply]) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A local aiohttp server on a free loopback port that answers every request with `reply(its JSON body, or None
    without one)`, and a client session: (session, base URL). A reply is a response as is; bytes, or an async
    iterable of bytes sent part by part as it yields them (cut where it raises, held open while it waits), are a
    200 `text/event-stream` body. Both are closed on exit, the session first (which ends a handler left waiting)."""
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        answer = reply(json.loads(raw) if raw else None)
        if isinstance(answer, web.StreamResponse):
            return answer
        if isinstance(answer, bytes):
            return web.Response(body=answer, content_type="text/event-stream")
        return await _stream_reply(request, answer)

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield session, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@contextmanager
def openai_server(config: EngineConfig, served_name: str) -> Iterator[tuple[LocalEngineClient, str]]:
    """Our OpenAI HTTP app over an in-process engine of `config` (the model's own tokenizer), served by a
    `LiveServer`: (the engine client, the server's URL); the engine is shut down on exit."""
    from actors.engine.frontend import Tokenizer
    from cluster.engine_client import LocalEngineClient
    from cluster.openai_api import create_app

    client = LocalEngineClient(config, served_name=served_name)
    try:
        with LiveServer(create_app(client, Tokenizer(config.model))) as server:
            yield client, server.url
    finally:
        client.shutdown()


ENGINE_NAMESPACE = "semipd"  # where the Serve app's engine actors run (cluster.router.NAMESPACE, ACTOR_PREFIX)
ENGINE_PREFIX = "semipd-engine-"


def engine_names() -> list[str]:
    """The names of the live engine actors (`semipd-engine-<i>`, namespace `semipd`), sorted."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == ENGINE_NAMESPACE and a["name"].removeprefix(ENGINE_PREFIX).isdigit())


def engine_actor_id(name: str = f"{ENGINE_PREFIX}0") -> str | None:
    """The Ray actor id (hex) of the live engine actor `name`; None when there is none."""
    import ray

    try:
        return str(ray.get_actor(name, namespace=ENGINE_NAMESPACE)._actor_id.hex())
    except ValueError:
        return None


def running_replicas(app_name: str) -> int:
    """How many replicas of Serve application `app_name` run (0 unless the app is RUNNING)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or app.status != "RUNNING":
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def cpu_app_args(model: Path, **kw: Any) -> dict[str, Any]:
    """`build_app` arguments of a small CPU deployment of `model`: one unified engine actor, one replica, and
    `kw` on top."""
    return {"model": str(model), "mode": "unified", "device": "cpu", "num_pages": 256, "num_actors": 1,
            "replica_num_cpus": 0.25, **kw}


def sse_events(text: str) -> list[Any]:
    """The JSON events of a streamed (server-sent events) response body, in order; `[DONE]` is left out."""
    from cluster.bench.client import DONE, parse_sse_line

    return [e for e in map(parse_sse_line, text.splitlines()) if e is not None and e is not DONE]


async def collect(router: Router, req: GenerateRequest) -> tuple[list[int], str | None, str | None]:
    """A request's token ids through `router`, with its finish reason and error (the last chunk's)."""
    ids: list[int] = []
    finish = error = None
    async for chunk in router.generate(req):
        ids.extend(chunk.token_ids)
        finish, error = chunk.finish_reason or finish, chunk.error or error
    return ids, finish, error


async def actor_stream(actor: Any, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
    """One request's chunks from an in-process EngineActor, through its own subscriber's batches."""
    subscriber = f"test-{request.request_id}"
    outputs = actor.outputs(subscriber)
    await actor.submit(request, subscriber)
    try:
        async for batch in outputs:
            for chunk in batch:
                yield chunk
                if chunk.finished:
                    return
    finally:
        await outputs.aclose()


def record_prefills(core: EngineCore) -> list[list[tuple[str, int, int]]]:
    """Each forward pass's prompt chunks, (request id, start, tokens), as the engine's runners are asked to queue
    them; the list fills as the engine runs."""
    log: list[list[tuple[str, int, int]]] = []
    for w in core.workers:
        forward = w.runner.forward

        def recording(plan: Any, carry: object = None, before_kernels: Callable[[], None] | None = None,
                      _forward: Callable[..., Any] = forward) -> Any:
            if plan.prefills:
                log.append([(c.request_id, c.start, c.num_tokens) for c in plan.prefills])
            return _forward(plan, carry, before_kernels)

        w.runner.forward = recording  # type: ignore[method-assign]
    return log


def step_until(core: EngineCore, done: Callable[[], bool], what: str = "the requests' ends",
               max_steps: int = 200) -> None:
    """Step each worker of an engine that this thread drives (no worker loop running) until `done()`."""
    for _ in range(max_steps):
        if done():
            return
        for w in core.workers:
            w.step()
    assert done(), f"{what}: not within {max_steps} steps of each worker"

"""Router: an `EngineClient` over the engine actors of a Ray cluster.

Where each request goes: `cluster.routing` (a pure function of the engines' loads, `choose`).

Streaming: each actor sends this router one batched output stream per event loop
(`EngineActor.outputs`, opened on first use, one Ray item per engine step), and the
router hands the chunks to the requests waiting for them; a request itself is one
short `submit` call. Chunks of a request that wait for it (this event loop fell behind) go on as one
(`_merge_waiting`).

Failures: an actor that dies (Ray actor errors) is marked dead and skipped. A request
that had not received a token yet is retried on another actor (up to `max_retries`);
one that had gets a final chunk with `finish_reason="error"` and a message naming the
engine. A request that an engine's admission control refuses (predicted to miss its TTFT target there) is
offered to the next engine, up to `max_retries`; when every engine it was offered refuses it, the first
refusal is raised. A stream that stalls longer than `stall_timeout_s` is checked with a ping: an
actor that does not answer within `ping_timeout_s` is treated as dead. No request
waits forever on a dead actor. An actor that does not answer `load()` within `load_timeout_s` is
reported unhealthy and gets no requests until it answers; no call of a caller's (`loads`, `abort`,
`drain`) waits on it for longer.

Request ids: one in flight here is refused to another request (ValueError). A request that ends (its client
left, its actor stalled) before its engine answered its submit keeps its id in use on that actor until the
answer comes, and is aborted there if it was admitted; so is any request left unfinished, also on an actor
taken for dead (it may only be slow, or restarted).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import replace
from typing import Any, NoReturn, TypeVar

from actors.engine.frontend import StreamChunk
from actors.slo.admission import AdmissionRejected
from cluster.engine_client import EngineLoad, GenerateRequest, ModelInfo, NoCapacityError
from cluster.routing import RouterPolicy, RouterState, TrackedActor, choose

log = logging.getLogger(__name__)

NAMESPACE = "semipd"
ACTOR_PREFIX = "semipd-engine"
T = TypeVar("T")


class EngineDiedError(NoCapacityError):
    """The engine serving a request died before it sent a token, and no other engine could take it."""


_ACTOR_ERRORS: tuple[type[BaseException], ...] = ()


def _actor_errors() -> tuple[type[BaseException], ...]:
    global _ACTOR_ERRORS
    if not _ACTOR_ERRORS:
        from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError

        _ACTOR_ERRORS = (RayActorError, WorkerCrashedError, ObjectLostError)
    return _ACTOR_ERRORS


def _unwrap(e: BaseException) -> BaseException:
    """The user-level exception inside a RayTaskError (ValueError, NoCapacityError...), else `e`."""
    from ray.exceptions import RayTaskError

    if isinstance(e, RayTaskError) and isinstance(e.cause, Exception):
        return e.cause
    return e


class Router:
    """`EngineClient` over engine actor handles (see the module docstring)."""

    def __init__(self, handles: dict[str, Any], info: ModelInfo, policy: RouterPolicy | None = None,
                 names: dict[str, str] | None = None, namespace: str = NAMESPACE) -> None:
        if not handles:
            raise ValueError("a Router needs at least one engine actor")
        self.policy = policy or RouterPolicy()
        self.namespace = namespace
        self.state = RouterState(sorted(handles))
        for eid, h in handles.items():
            self.state.actors[eid].handle = h
            self.state.actors[eid].name = (names or {}).get(eid)
        self._info = info
        self._last_refresh = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_loop: asyncio.AbstractEventLoop | None = None
        self._pumps: dict[tuple[str, asyncio.AbstractEventLoop], _OutputPump] = {}
        self._background: set[asyncio.Task[None]] = set()  # aborts waiting for a submit's reply (kept referenced)
        self.draining = False

    # -- construction -------------------------------------------------------------

    @classmethod
    def connect(cls, names: Sequence[str] | None = None, namespace: str = NAMESPACE,
                policy: RouterPolicy | None = None, prefix: str = ACTOR_PREFIX,
                served_name: str | None = None, timeout_s: float = 60.0) -> Router:
        """A Router over named actors (default: every `<prefix>-<i>` in `namespace`).

        Needs `ray.init(...)` done (any namespace). Waits for the actors to be ready.
        """
        import ray

        if names is None:
            listed = ray.util.list_named_actors(all_namespaces=True)
            pattern = re.compile(rf"{re.escape(prefix)}-(\d+)")
            found = [a["name"] for a in listed if a["namespace"] == namespace and pattern.fullmatch(a["name"])]
            names = sorted(found, key=lambda n: int(n.rsplit("-", 1)[1]))
            if not names:
                raise NoCapacityError(f"no engine actors named {prefix}-* in namespace {namespace!r}")
        handles: dict[str, Any] = {}
        for n in names:
            try:
                handles[n] = ray.get_actor(n, namespace=namespace)
            except ValueError:
                log.warning("engine actor %s not found in namespace %s; will look again", n, namespace)
        refs = {n: h.ready.remote() for n, h in handles.items()}
        infos: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        for n, ref in refs.items():
            try:
                infos[n] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as e:
                log.warning("engine actor %s is not ready: %s", n, _first_line(e))
        if not infos:
            raise NoCapacityError(f"none of the engine actors {', '.join(names)} is ready")
        by_id = {infos[n]["engine_id"] if n in infos else n: handles.get(n) for n in names}
        names_by_id = {infos[n]["engine_id"] if n in infos else n: n for n in names}
        first = next(iter(infos.values()))
        info = ModelInfo(
            name=served_name or first["model_dir"].rstrip("/").split("/")[-1], model_dir=first["model_dir"],
            architecture=first["architecture"], max_model_len=first["max_model_len"],
            vocab_size=first["vocab_size"], mode=first["mode"],
        )
        router = cls(by_id, info, policy, names=names_by_id, namespace=namespace)
        for n in names:
            if n not in infos:
                router.state.mark_dead(names_by_id[n], "not ready at connect")
        return router

    # -- EngineClient ----------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def dispatch_counts(self) -> dict[str, int]:
        """Requests dispatched per engine id since this router started."""
        return dict(self.state.dispatch_counts)

    def engine_of(self, request_id: str) -> str | None:
        for a in self.state.actors.values():
            if request_id in a.dispatches:
                return a.engine_id
        return None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """The request's chunks; ValueError (before anything runs) if its id is in flight on any engine here
        (`abort` finds a request by its id)."""
        if self.draining:
            raise NoCapacityError("the router is draining")
        if self.engine_of(request.request_id) is not None:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._maybe_refresh()
        tried: list[str] = []
        refused: AdmissionRejected | None = None
        while True:
            try:
                engine_id = choose(self.state.views(), len(request.prompt_token_ids), self.policy,
                                   request.session_id, exclude=tried)
            except NoCapacityError:
                if refused is not None:  # no other engine to offer it to
                    raise refused from None
                raise
            tried.append(engine_id)
            sent = 0
            try:
                async for chunk in self._stream(engine_id, request):
                    sent += len(chunk.token_ids)
                    yield chunk
                return
            except NoCapacityError as e:  # the actor refused (draining): try another
                if isinstance(e, EngineDiedError):
                    raise
                self.state.actors[engine_id].draining = True
                log.info("engine %s refused %s: %s", engine_id, request.request_id, e)
                if len(tried) > self.policy.max_retries:
                    raise
            except AdmissionRejected as e:  # nothing was sent: another engine may meet its target
                log.info("engine %s refused %s: %s", engine_id, request.request_id, e)
                refused = refused or e
                if len(tried) > self.policy.max_retries:
                    raise refused from None
            except _EngineLost as e:
                if sent:
                    yield StreamChunk(request.request_id, "", (), finish_reason="error",
                                      num_prompt_tokens=len(request.prompt_token_ids),
                                      error=f"engine {engine_id} failed after {sent} tokens: {e.reason}")
                    return
                if len(tried) > self.policy.max_retries:
                    raise EngineDiedError(f"engine {engine_id} failed before the first token of "
                                          f"{request.request_id}: {e.reason}") from None
                log.warning("retrying %s on another engine: %s failed (%s)", request.request_id, engine_id, e.reason)

    async def _stream(self, engine_id: str, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """One attempt on one actor; raises _EngineLost if the actor is gone, ValueError (before anything is sent)
        if the request's id is in flight on it already."""
        pump = self._pump(self.state.actors[engine_id])
        chunks = pump.open(request.request_id)
        self.state.dispatch(engine_id, request.request_id, len(request.prompt_token_ids), time.monotonic())
        finished = submitted = False
        unanswered: Awaitable[Any] | None = None  # a submit left unanswered (cancelled, stalled): it may still admit
        try:
            submit = pump.handle.submit.remote(request, pump.subscriber)
            try:
                await self._watched(engine_id, submit)
            except (asyncio.CancelledError, _EngineLost):
                unanswered = submit
                raise
            submitted = True
            held: _EngineLost | None = None  # taken from the queue behind the chunks merged into the last yield
            while not finished:
                if held is not None:
                    self._lost(engine_id, held)
                chunk, held = _merge_waiting(await self._next_chunk(engine_id, chunks), chunks)
                if chunk.token_ids:
                    self.state.ack(engine_id, request.request_id)
                finished = chunk.finished
                yield chunk
        except _EngineLost:
            raise
        except _actor_errors() as e:
            self.state.mark_dead(engine_id, f"{type(e).__name__}")
            raise _EngineLost(f"{type(e).__name__}: {_first_line(e)}") from None
        except Exception as e:
            raise _unwrap(e) from None
        finally:
            self.state.done(engine_id, request.request_id)
            if unanswered is not None:
                self._close_once_answered(pump, unanswered, request.request_id)
            else:
                pump.close(request.request_id, admitted=submitted)
                if submitted and not finished:  # also on an actor taken for dead: it may be slow, or restarted
                    self._abort_quietly(pump.handle, request.request_id)

    def _pump(self, actor: TrackedActor) -> _OutputPump:
        """The output stream of `actor` on this event loop; a new one if the last ended or the actor changed."""
        for closed in [k for k in self._pumps if k[1].is_closed()]:
            del self._pumps[closed]
        key = (actor.engine_id, asyncio.get_running_loop())
        pump = self._pumps.get(key)
        if pump is None or pump.failure is not None or pump.handle is not actor.handle:
            if pump is not None:
                pump.stop()
            pump = self._pumps[key] = _OutputPump(actor.handle)
        return pump

    async def _next_chunk(self, engine_id: str, chunks: asyncio.Queue[StreamChunk | _EngineLost]) -> StreamChunk:
        """The request's next chunk, under `_watched`'s stall watch but without its task per wait: one chunk a token
        goes through here (thousands a second at chat's rates). A chunk already queued is taken at once (~0.2 us);
        a timed wait costs about half of what a task with `asyncio.wait` did (~10 us against ~21, CPU machine)."""
        item = chunks.get_nowait() if not chunks.empty() else await self._wait_chunk(engine_id, chunks)
        if isinstance(item, _EngineLost):
            self._lost(engine_id, item)
        return item

    async def _wait_chunk(self, engine_id: str, chunks: asyncio.Queue[T]) -> T:
        while True:
            try:
                async with asyncio.timeout(self.policy.stall_timeout_s):
                    return await chunks.get()
            except TimeoutError:  # the get was cancelled with nothing taken: a chunk put since stays queued
                await self._check_stalled(engine_id)

    def _lost(self, engine_id: str, lost: _EngineLost) -> NoReturn:
        """Raise `lost`, which a request's queue held, marking its actor dead if it died."""
        if lost.actor_died:
            self.state.mark_dead(engine_id, lost.reason)
        raise lost

    async def _watched(self, engine_id: str, waited: Awaitable[T]) -> T:
        """The result of `waited`; each time it takes `stall_timeout_s` more, the actor is pinged,
        and one that does not answer is marked dead (`_EngineLost`)."""
        future = asyncio.ensure_future(waited)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=self.policy.stall_timeout_s)
                if done:
                    return future.result()
                await self._check_stalled(engine_id)
        finally:
            if not future.done():
                future.cancel()

    async def _check_stalled(self, engine_id: str) -> None:
        """After `stall_timeout_s` without an answer: ping the actor; one that does not answer is marked dead
        (`_EngineLost`)."""
        if not await self._alive(engine_id):
            self.state.mark_dead(engine_id, "did not answer a ping while a request stalled")
            raise _EngineLost(f"no output for {self.policy.stall_timeout_s:.0f} s and no answer to a ping")

    async def _alive(self, engine_id: str) -> bool:
        try:
            await asyncio.wait_for(self.state.actors[engine_id].handle.ping.remote(), self.policy.ping_timeout_s)
            return True
        except Exception:
            return False

    def _close_once_answered(self, pump: _OutputPump, submit: Awaitable[Any], request_id: str) -> None:
        """Close `request_id` on `pump` once its `submit` call, whose reply its caller did not wait for, is
        answered, and abort it if the engine admitted it (an abort sent at once could reach the actor first).
        Until then the id stays in use on `pump`: a request that took it would get this one's chunks."""
        async def close() -> None:
            try:
                await submit
            except Exception:  # refused, or the actor is gone: nothing runs
                pump.close(request_id)
                return
            pump.close(request_id, admitted=True)
            self._abort_quietly(pump.handle, request_id)

        task = asyncio.get_running_loop().create_task(close())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _abort_quietly(handle: Any, request_id: str) -> None:
        try:
            handle.abort.remote(request_id)
        except Exception as e:  # the actor may be gone; nothing to abort then
            log.debug("abort of %s failed: %s", request_id, e)

    async def abort(self, request_id: str) -> bool:
        """Whether the engine running `request_id` aborted it; False also when it does not answer within
        `ping_timeout_s`."""
        engine_id = self.engine_of(request_id)
        if engine_id is None:
            return False
        try:  # an actor that does not answer (hung) must not hold the caller
            return bool(await asyncio.wait_for(self.state.actors[engine_id].handle.abort.remote(request_id),
                                               self.policy.ping_timeout_s))
        except Exception as e:
            log.warning("abort of %s on %s failed: %s", request_id, engine_id, e)
            return False

    async def reset_prefix_cache(self) -> dict[str, int]:
        """Every live engine forgets its cached pages no request holds: engine id -> pages (those that answered)."""
        live = [a for a in self.state.actors.values() if a.alive]
        answers = await asyncio.gather(*(a.handle.reset_prefix_cache.remote() for a in live), return_exceptions=True)
        out = {}
        for a, answer in zip(live, answers):
            if isinstance(answer, BaseException):
                log.warning("prefix cache reset on %s failed: %s", a.engine_id, _first_line(answer))
            else:
                out[a.engine_id] = int(answer)
        return out

    async def loads(self) -> list[EngineLoad]:
        """Fresh loads of every engine (dead ones reported unhealthy)."""
        await self.refresh()
        out = []
        for eid in sorted(self.state.actors):
            a = self.state.actors[eid]
            if a.alive and a.load is not None:
                out.append(replace(a.load, healthy=a.load.healthy and a.healthy))
            else:
                out.append(EngineLoad(eid, healthy=False, draining=a.draining,
                                      stats={"error": a.dead_reason or "no report"}))
        return out

    # -- reports -------------------------------------------------------------------

    async def refresh(self) -> None:
        """Ask every live actor for its load now (dead ones are re-looked-up by name)."""
        await asyncio.gather(*(self._refresh_one(eid) for eid in sorted(self.state.actors)))
        self._last_refresh = time.monotonic()

    async def _refresh_one(self, engine_id: str) -> None:
        """One actor's load, within `load_timeout_s` (one call: `loads()` must answer within the front ends' wait
        while an actor hangs). A dead one that answers again (after ActorUnavailableError, a restart) is alive."""
        a = self.state.actors[engine_id]
        if not a.alive:
            self._relookup(a)
        if a.handle is None:
            return
        try:
            load = await asyncio.wait_for(a.handle.load.remote(), self.policy.load_timeout_s)
        except _actor_errors() as e:
            self.state.mark_dead(engine_id, type(e).__name__)
            return
        except Exception as e:  # TimeoutError too
            if a.alive:
                log.warning("load of %s failed: %s", engine_id, _first_line(e))
                a.healthy = False
            return
        if not a.alive:
            log.info("engine %s answers again", engine_id)
            a.alive, a.dead_reason = True, ""
        self.state.report(load)

    def _relookup(self, a: TrackedActor) -> bool:
        """A dead named actor may have been started again (ensure_cluster): take the new one."""
        if a.name is None:
            return False
        try:
            import ray

            handle = ray.get_actor(a.name, namespace=self.namespace)
        except ValueError:
            return False
        if a.handle is not None and handle._actor_id == a.handle._actor_id:
            return False
        log.info("engine %s is back (new actor)", a.engine_id)
        a.handle, a.alive, a.healthy, a.draining, a.dead_reason, a.load = handle, True, True, False, "", None
        return True

    def _maybe_refresh(self) -> None:
        loop = asyncio.get_running_loop()
        stale = time.monotonic() - self._last_refresh > self.policy.refresh_interval_s
        busy = self._refreshing is not None and not self._refreshing.done() and self._refresh_loop is loop
        if stale and not busy:
            self._refresh_loop = loop
            self._refreshing = loop.create_task(self.refresh())

    async def run_refresh_loop(self) -> None:
        """Refresh loads every `refresh_interval_s` until cancelled (for long-lived servers)."""
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("load refresh failed")
            await asyncio.sleep(self.policy.refresh_interval_s)

    # -- shutdown --------------------------------------------------------------------

    async def drain(self, timeout_s: float = 30.0) -> int:
        """Stop accepting here and on every actor; wait up to `timeout_s` for in-flight work. Returns what remains
        (of an actor that does not answer in time: this router's requests on it)."""
        self.draining = True
        live = [a for a in self.state.actors.values() if a.alive]
        results = await asyncio.gather(*(asyncio.wait_for(a.handle.drain.remote(timeout_s),
                                                          timeout_s + self.policy.ping_timeout_s) for a in live),
                                       return_exceptions=True)
        for a, r in zip(live, results):
            if not isinstance(r, int):
                log.warning("drain of %s failed: %s", a.engine_id, _first_line(r))
        return sum(r if isinstance(r, int) else len(a.dispatches) for a, r in zip(live, results))


class _EngineLost(Exception):
    """The actor serving a request went away (`actor_died`) or its output stream was closed here."""

    def __init__(self, reason: str, actor_died: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.actor_died = actor_died


class _OutputPump:
    """One actor's batched output stream to this router on the running event loop: each chunk
    goes to the queue of its request. When the stream breaks, every open queue gets `_EngineLost`."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.subscriber = f"router-{uuid.uuid4().hex[:12]}"
        self.failure: _EngineLost | None = None
        self._queues: dict[str, asyncio.Queue[StreamChunk | _EngineLost]] = {}
        self._ended: set[str] = set()  # open requests whose last chunk came
        self._ending: set[str] = set()  # closed before their last chunk came: what comes of them until it is dropped
        self._stream = handle.outputs.options(num_returns="streaming").remote(self.subscriber)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def open(self, request_id: str) -> asyncio.Queue[StreamChunk | _EngineLost]:
        """The queue `request_id`'s chunks will arrive in (open it before submitting); ValueError if that id is
        in flight here already (the engine refuses it too, and its chunks are the other request's)."""
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        q: asyncio.Queue[StreamChunk | _EngineLost] = asyncio.Queue()
        if self.failure is not None:
            q.put_nowait(self.failure)
        self._queues[request_id] = q
        return q

    def close(self, request_id: str, admitted: bool = False) -> None:
        """Stop taking `request_id`'s chunks. `admitted`: the engine took the request, so its last chunk comes
        through here; until it has, what comes of it is dropped, not given to a request that takes its id next."""
        self._queues.pop(request_id, None)
        if admitted and request_id not in self._ended:
            self._ending.add(request_id)
        self._ended.discard(request_id)

    def stop(self) -> None:
        """Close the stream (the actor aborts this subscriber's unfinished requests)."""
        self._task.cancel()

    async def _run(self) -> None:
        try:
            async for ref in self._stream:
                for chunk in await ref:
                    rid = chunk.request_id
                    if rid in self._ending:
                        if chunk.finished:
                            self._ending.discard(rid)
                        continue
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait(chunk)
                        if chunk.finished:
                            self._ended.add(rid)
            self._fail("its output stream ended")
        except asyncio.CancelledError:
            self._fail("the router closed the output stream", actor_died=False)
            _cancel_quietly(self._stream)
            raise
        except _actor_errors() as e:
            self._fail(f"{type(e).__name__}: {_first_line(e)}")
        except Exception as e:
            log.exception("output stream of an engine failed")
            self._fail(f"output stream failed: {_first_line(e)}")

    def _fail(self, reason: str, actor_died: bool = True) -> None:
        self.failure = _EngineLost(reason, actor_died)
        for q in self._queues.values():
            q.put_nowait(self.failure)


def _merge_waiting(first: StreamChunk,
                   chunks: asyncio.Queue[StreamChunk | _EngineLost]) -> tuple[StreamChunk, _EngineLost | None]:
    """`first` followed by every chunk of its request already waiting in `chunks`, as one chunk (up to and with a
    finished one), and the failure taken from the queue behind them, if any (the caller handles it after yielding
    the chunk, so that what came before it is delivered).

    The chunks wait when this event loop fell behind the engine's (many streams): merged, they make one trip through
    the front end and Serve's proxy instead of one per token (vLLM V1's RequestOutputCollector merges them alike).
    Nothing is awaited: no token is held back for the ones after it, the first one included."""
    merged = first
    while not merged.finished:
        try:
            item = chunks.get_nowait()
        except asyncio.QueueEmpty:
            break
        if not isinstance(item, StreamChunk):
            return merged, item
        merged = merged.followed_by(item)
    return merged, None


def _cancel_quietly(stream: Any) -> None:
    try:
        import ray

        ray.cancel(stream)
    except Exception as e:  # the actor or the Ray connection may be gone
        log.debug("cancel of an output stream failed: %s", e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

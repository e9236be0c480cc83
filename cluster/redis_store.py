"""What engines and the SLO controller share through Redis, and how they reach it.

Key layout (prefix `semipd:<cluster>`):

- `view:<engine_id>`  JSON of an engine's published view (split, queues, recent TTFT /
  TPOT samples); written by the engine every publish interval with a PX expiry, so an
  engine that stops publishing vanishes.
- `model:<engine_id>` JSON of the engine's latency model (`LatencyModel.to_dict`), for the
  "model" split policy; written with its view, with the same expiry, by engines that have one.
- `split:<engine_id>` JSON of the desired split the leader decided last
  (`id`, `prefill_sms`, `reason`, `leader`, `time`); engines poll it and apply new ones.
- `decisions`         list of decision records, newest first (trimmed).
- `leader`            the controller lease: the leader id, SET NX PX, renewed by the
  holder only (compare-and-expire script). Split writes are fenced by it: a script
  writes a decision only while the writer still holds the lease.
- `controller`        the leader's status (targets, policy, time), with expiry.

Everything is async (`redis.asyncio`); every call may raise `redis.RedisError` /
`OSError` when Redis is away, and callers (publisher, controller) back off and retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


@contextmanager
def redis_reachable() -> Iterator[None]:
    """For the CLI: a Redis it cannot reach is a usage error (ValueError, exit 2) naming where the URL came from."""
    try:
        yield
    except REDIS_ERRORS as e:  # a wrong --redis / SEMIPD_REDIS_URL, or Redis is down
        raise ValueError(f"cannot reach Redis ({type(e).__name__}: {e}); check --redis or SEMIPD_REDIS_URL") from None

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_FENCED_DECISION = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
return 1
"""


@dataclass(frozen=True)
class Keys:
    """Redis key names of one semipd cluster."""

    cluster: str = "default"

    @property
    def prefix(self) -> str:
        return f"semipd:{self.cluster}"

    def view(self, engine_id: str) -> str:
        return f"{self.prefix}:view:{engine_id}"

    @property
    def view_pattern(self) -> str:
        return f"{self.prefix}:view:*"

    def model(self, engine_id: str) -> str:
        return f"{self.prefix}:model:{engine_id}"

    def split(self, engine_id: str) -> str:
        return f"{self.prefix}:split:{engine_id}"

    @property
    def leader(self) -> str:
        return f"{self.prefix}:leader"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}:decisions"

    @property
    def controller(self) -> str:
        return f"{self.prefix}:controller"

    @property
    def pins(self) -> str:
        return f"{self.prefix}:pins"


class RedisStore:
    """Typed access to the semipd keys of one cluster. Connects lazily, per event loop."""

    def __init__(self, url: str, cluster: str = "default", timeout_s: float = 1.0) -> None:
        self.url = url
        self.keys = Keys(cluster)
        self.timeout_s = timeout_s
        self._client: aioredis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned: dict[str, str] = {}  # Redis key -> the last problem logged for it

    def _warn_once(self, key: str, problem: str) -> None:
        """Log `problem` with `key` unless it is what was logged for that key last (callers poll every tick)."""
        if self._warned.get(key) != problem:
            self._warned[key] = problem
            log.warning("%s: %s; skipped", key, problem)

    @property
    def client(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                decode_responses=True,
            )
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    # -- engine views --------------------------------------------------------------

    async def publish_view(self, engine_id: str, view: dict[str, Any], ttl_ms: int) -> None:
        await self.client.set(self.keys.view(engine_id), json.dumps(view), px=ttl_ms)

    async def read_views(self) -> dict[str, dict[str, Any]]:
        """All live engine views, by engine id. A value that is not a JSON object with a string `engine_id` is
        skipped (and logged), so that one bad key cannot hide every other engine."""
        names = sorted([k async for k in self.client.scan_iter(match=self.keys.view_pattern, count=200)])
        if not names:
            return {}
        values = await self.client.mget(names)
        out = {}
        for name, v in zip(names, values):
            if v is None:
                continue
            d, problem = _json_object(v)
            if d is not None and not isinstance(d.get("engine_id"), str):
                d, problem = None, "no engine_id"
            if d is None:
                self._warn_once(name, f"not an engine view ({problem})")
                continue
            out[d["engine_id"]] = d
        return out

    async def publish_view_and_model(self, engine_id: str, view: dict[str, Any], model: dict[str, Any] | None,
                                     ttl_ms: int) -> None:
        """Write an engine's view and (when given) its latency model, both expiring after `ttl_ms`."""
        if model is None:
            await self.publish_view(engine_id, view, ttl_ms)
            return
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.view(engine_id), json.dumps(view), px=ttl_ms)
            pipe.set(self.keys.model(engine_id), json.dumps(model), px=ttl_ms)
            await pipe.execute()

    async def read_models(self, engine_ids: list[str], unreadable: dict[str, str] | None = None
                          ) -> dict[str, dict[str, Any]]:
        """The latency models (JSON dicts) published by `engine_ids`; engines without one are absent, and so are
        those whose value is not a JSON object (the reason goes into `unreadable`, by engine id, when given)."""
        if not engine_ids:
            return {}
        values = await self.client.mget([self.keys.model(e) for e in engine_ids])
        out = {}
        for e, v in zip(engine_ids, values):
            if v is None:
                continue
            d, problem = _json_object(v)
            if d is None:
                if unreadable is not None:
                    unreadable[e] = problem
                continue
            out[e] = d
        return out

    # -- desired splits and decisions ------------------------------------------------

    async def get_split(self, engine_id: str) -> dict[str, Any] | None:
        v = await self.client.get(self.keys.split(engine_id))
        return json.loads(v) if v else None

    async def write_decision(self, leader_id: str, engine_id: str, split: dict[str, Any],
                             record: dict[str, Any], max_decisions: int = 500) -> bool:
        """Write `split` and append `record`, only while `leader_id` holds the lease."""
        script = self.client.register_script(_FENCED_DECISION)
        keys = [self.keys.leader, self.keys.split(engine_id), self.keys.decisions]
        done = await script(keys=keys, args=[leader_id, json.dumps(split), json.dumps(record), max_decisions])
        return bool(done)

    async def decisions(self, n: int = 20) -> list[dict[str, Any]]:
        """The last `n` decisions, newest first."""
        return [json.loads(v) for v in await self.client.lrange(self.keys.decisions, 0, n - 1)]

    # -- operator pins ---------------------------------------------------------------

    async def pins(self) -> dict[str, int]:
        """Prefill SM counts pinned by the operator, by engine id ("*": every engine); a value that is not an
        integer (written by hand) is skipped and logged."""
        out = {}
        for k, v in (await self.client.hgetall(self.keys.pins)).items():
            try:
                out[k] = int(v)
            except ValueError:
                self._warn_once(f"{self.keys.pins}[{k}]", f"pin {v!r} is not an SM count")
        return out

    async def set_pin(self, target: str, prefill_sms: int | None) -> None:
        """Pin `target` (an engine id or "*") to `prefill_sms`; None removes the pin."""
        if prefill_sms is None:
            await self.client.hdel(self.keys.pins, target)
        else:
            await self.client.hset(self.keys.pins, target, prefill_sms)

    # -- leader lease ------------------------------------------------------------------

    async def acquire_or_renew(self, leader_id: str, lease_ms: int) -> bool:
        """True if `leader_id` holds the lease after this call (taken now or renewed)."""
        if await self.client.set(self.keys.leader, leader_id, nx=True, px=lease_ms):
            return True
        renew = self.client.register_script(_RENEW)
        return bool(await renew(keys=[self.keys.leader], args=[leader_id, lease_ms]))

    async def release(self, leader_id: str) -> bool:
        release = self.client.register_script(_RELEASE)
        return bool(await release(keys=[self.keys.leader], args=[leader_id]))

    async def leader(self) -> str | None:
        return await self.client.get(self.keys.leader)

    # -- controller status ---------------------------------------------------------------

    async def set_controller_status(self, status: dict[str, Any], ttl_ms: int) -> None:
        await self.client.set(self.keys.controller, json.dumps(status), px=ttl_ms)

    async def controller_status(self) -> dict[str, Any] | None:
        v = await self.client.get(self.keys.controller)
        return json.loads(v) if v else None


def _json_object(text: str) -> tuple[dict[str, Any] | None, str]:
    """(`text` parsed as a JSON object, "") or (None, why it is not one)."""
    try:
        d = json.loads(text)
    except ValueError as e:
        return None, f"invalid JSON: {e}"
    if not isinstance(d, dict):
        return None, f"JSON {type(d).__name__}, not an object"
    return d, ""


class Backoff:
    """Exponential retry delay: `initial_s`, doubling up to `max_s`; `reset()` on success."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError("need 0 < initial_s <= max_s")
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return min(self.max_s, self.initial_s * 2 ** (self.failures - 1))


@dataclass(frozen=True)
class PublisherConfig:
    """How an engine talks to Redis: where, how often, how long its view lives."""

    redis_url: str
    cluster: str = "default"
    interval_s: float = 0.5
    view_ttl_s: float = 5.0
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must be a redis:// URL, got {self.redis_url!r}")
        if self.interval_s <= 0 or self.view_ttl_s <= self.interval_s:
            raise ValueError("need 0 < interval_s < view_ttl_s")


@dataclass
class PublisherState:
    """What the engine reports about its Redis link (in its load)."""

    redis_ok: bool = False
    errors: int = 0
    last_error: str = ""
    last_publish: float = 0.0
    last_decision_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(redis_ok=self.redis_ok, errors=self.errors, last_error=self.last_error,
                    last_publish=self.last_publish, last_decision_id=self.last_decision_id)


class EnginePublisher:
    """An engine's Redis loop: publish its view, pick up new desired splits.

    `snapshot()` returns the view dict; `apply(prefill_sms, reason)` switches the split
    (the partitioner adopts it at the workers' next iteration boundary). `model`: the
    engine's latency model as JSON (`LatencyModel.to_dict`), published with every view. When Redis is
    away the engine keeps its split and keeps serving; the loop logs and retries with
    backoff, and resumes when Redis returns.
    """

    def __init__(self, cfg: PublisherConfig, engine_id: str, snapshot: Callable[[], dict[str, Any]],
                 apply: Callable[[int, str], Any], model: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.engine_id = engine_id
        self.snapshot = snapshot
        self.apply = apply
        self.store = RedisStore(cfg.redis_url, cfg.cluster)
        self.state = PublisherState()
        self._backoff = Backoff(cfg.interval_s, cfg.max_backoff_s)
        self._stop = asyncio.Event()

    async def step(self) -> None:
        """Publish once and apply a new desired split if there is one (raises on Redis errors)."""
        await self.store.publish_view_and_model(self.engine_id, self.snapshot(), self.model,
                                                int(self.cfg.view_ttl_s * 1000))
        desired = await self.store.get_split(self.engine_id)
        if desired and desired.get("id") != self.state.last_decision_id:
            self.state.last_decision_id = str(desired.get("id"))
            reason = f"controller {desired.get('leader', '?')}: {desired.get('reason', '')}"
            self.apply(int(desired["prefill_sms"]), reason)
        self.state.last_publish = time.time()

    async def run(self) -> None:
        while not self._stop.is_set():
            delay = self.cfg.interval_s
            try:
                await self.step()
                if not self.state.redis_ok and self.state.errors:
                    log.warning("%s: Redis is back; publishing again", self.engine_id)
                self.state.redis_ok = True
                self._backoff.reset()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as e:
                if self.state.redis_ok or self.state.errors == 0:
                    log.warning("%s: Redis unreachable (%s); keeping the current split and serving", self.engine_id, e)
                self.state.redis_ok = False
                self.state.errors += 1
                self.state.last_error = f"{type(e).__name__}: {e}"
                delay = self._backoff.next_delay()
            except Exception:  # a bad record must not stop the loop
                log.exception("%s: publisher step failed", self.engine_id)
                delay = self._backoff.next_delay()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()


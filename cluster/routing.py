"""Where a request goes: the router's choice among engines, and the bookkeeping it is made from. No Ray, no I/O.

`choose`: among actors that are alive, healthy and not draining, the lowest score, where

    score = predicted TTFT                                  (seconds)
          + decode_penalty_s * in-flight requests
          + kv_penalty_s * (KV usage above kv_soft_limit, scaled to 0..1)

    predicted TTFT = (queued prefill tokens + this prompt) / prefill tokens per second

and queued prefill tokens = the actor's last reported `waiting_prefill_tokens` plus the prompts this router
dispatched to it that the report does not include yet (the report lists the requests it counts) and that have
not had a first token. Load is counted at dispatch (`RouterState`, local counters), so a burst of requests
spreads out before any report comes back; reports are refreshed every `refresh_interval_s`. Ties go to the
smallest engine id. With a `session_id`, the actor is picked by rendezvous hashing among the eligible ones
(stable while the set of actors is stable).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.engine_client import LOADS_TIMEOUT_SECONDS, EngineLoad, NoCapacityError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterPolicy:
    """Weights and timings of the router."""

    default_prefill_tokens_per_s: float = 4000.0
    decode_penalty_s: float = 0.002
    kv_soft_limit: float = 0.85
    kv_penalty_s: float = 10.0
    session_affinity: bool = True
    refresh_interval_s: float = 0.5
    load_timeout_s: float = 4.0  # < LOADS_TIMEOUT_SECONDS: a hung actor shows unhealthy within the front ends' wait
    stall_timeout_s: float = 60.0
    ping_timeout_s: float = 5.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.default_prefill_tokens_per_s <= 0:
            raise ValueError("default_prefill_tokens_per_s must be positive")
        if self.decode_penalty_s < 0 or self.kv_penalty_s < 0:
            raise ValueError("penalties must be >= 0")
        if not 0.0 <= self.kv_soft_limit < 1.0:
            raise ValueError("kv_soft_limit must be in [0, 1)")
        for name in ("refresh_interval_s", "load_timeout_s", "stall_timeout_s", "ping_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.load_timeout_s >= LOADS_TIMEOUT_SECONDS:
            raise ValueError(f"load_timeout_s must be below the front ends' wait for loads ({LOADS_TIMEOUT_SECONDS} s)")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")


@dataclass(frozen=True)
class ActorView:
    """What the scorer knows of one actor (last report + this router's local counters)."""

    engine_id: str
    alive: bool = True
    healthy: bool = True
    draining: bool = False
    waiting_prefill_tokens: int = 0  # from the last report
    unacked_prefill_tokens: int = 0  # dispatched since that report, no first token yet
    prefill_tokens_per_s: float = 0.0  # 0: unknown (policy default)
    kv_usage: float = 0.0
    in_flight: int = 0  # last report's in-flight + dispatched since

    @property
    def eligible(self) -> bool:
        return self.alive and self.healthy and not self.draining


def fallback_rate(views: Sequence[ActorView], policy: RouterPolicy) -> float:
    """Prefill rate assumed for an engine that has not measured one: the median of the others'
    (engines of a cluster are alike), else the policy's default."""
    known = sorted(v.prefill_tokens_per_s for v in views if v.prefill_tokens_per_s > 0)
    return known[len(known) // 2] if known else policy.default_prefill_tokens_per_s


def predicted_ttft_s(view: ActorView, prompt_tokens: int, policy: RouterPolicy, fallback: float | None = None) -> float:
    rate = view.prefill_tokens_per_s if view.prefill_tokens_per_s > 0 else (
        fallback or policy.default_prefill_tokens_per_s)
    return (view.waiting_prefill_tokens + view.unacked_prefill_tokens + prompt_tokens) / rate


def score(view: ActorView, prompt_tokens: int, policy: RouterPolicy, fallback: float | None = None) -> float:
    """Lower is better (seconds-like)."""
    kv_over = max(0.0, view.kv_usage - policy.kv_soft_limit) / (1.0 - policy.kv_soft_limit)
    return (predicted_ttft_s(view, prompt_tokens, policy, fallback) + policy.decode_penalty_s * view.in_flight
            + policy.kv_penalty_s * kv_over)


def rendezvous(session_id: str, engine_ids: Iterable[str]) -> str:
    """Highest-random-weight hashing: the engine a session sticks to."""
    def weight(eid: str) -> bytes:
        return hashlib.blake2b(f"{session_id}\0{eid}".encode(), digest_size=8).digest()

    return max(sorted(engine_ids), key=weight)


def choose(views: Sequence[ActorView], prompt_tokens: int, policy: RouterPolicy,
           session_id: str | None = None, exclude: Iterable[str] = ()) -> str:
    """The engine id to send a request to; raises NoCapacityError if none is eligible."""
    skip = set(exclude)
    eligible = [v for v in views if v.eligible and v.engine_id not in skip]
    if not eligible:
        states = ", ".join(f"{v.engine_id}: {_state(v)}" for v in sorted(views, key=lambda v: v.engine_id)) or "none"
        raise NoCapacityError(f"no engine can take the request (engines: {states})")
    if session_id and policy.session_affinity:
        return rendezvous(session_id, [v.engine_id for v in eligible])
    fallback = fallback_rate(views, policy)
    return min(eligible, key=lambda v: (score(v, prompt_tokens, policy, fallback), v.engine_id)).engine_id


def _state(v: ActorView) -> str:
    if not v.alive:
        return "dead"
    if v.draining:
        return "draining"
    if not v.healthy:
        return "unhealthy"
    return "tried"


@dataclass
class Dispatch:
    """A request this router sent to an engine, until it ends."""

    engine_id: str
    prompt_tokens: int
    time: float
    first_token: bool = False


@dataclass
class TrackedActor:
    """What this router knows of one engine actor: its handle, last report, health and the requests it sent."""

    engine_id: str
    handle: Any
    name: str | None = None
    load: EngineLoad | None = None
    reported_ids: frozenset[str] = frozenset()  # requests in flight on the actor at its last report
    alive: bool = True
    healthy: bool = True
    draining: bool = False
    dead_reason: str = ""
    dispatches: dict[str, Dispatch] = field(default_factory=dict)


class RouterState:
    """Bookkeeping of dispatched requests and reports per actor; no Ray, no I/O.

    A dispatched request counts in this router's estimate of an actor's load until the
    actor acknowledges it: by a report that lists it (then the report's own counters
    include it) or, for its prompt tokens, by its first token.
    """

    def __init__(self, engine_ids: Sequence[str]) -> None:
        self.actors: dict[str, TrackedActor] = {e: TrackedActor(e, None) for e in engine_ids}
        self.dispatch_counts: Counter[str] = Counter()

    def dispatch(self, engine_id: str, request_id: str, prompt_tokens: int, now: float) -> None:
        self.actors[engine_id].dispatches[request_id] = Dispatch(engine_id, prompt_tokens, now)
        self.dispatch_counts[engine_id] += 1

    def ack(self, engine_id: str, request_id: str) -> None:
        """The request's first token arrived: its prompt is no longer queued."""
        d = self.actors[engine_id].dispatches.get(request_id)
        if d is not None:
            d.first_token = True

    def done(self, engine_id: str, request_id: str) -> None:
        self.actors[engine_id].dispatches.pop(request_id, None)

    def report(self, load: EngineLoad) -> None:
        """A load report; `stats["in_flight_ids"]` lists the requests it includes."""
        a = self.actors[load.engine_id]
        a.load, a.reported_ids = load, frozenset(load.stats.get("in_flight_ids", ()))
        a.healthy, a.draining = load.healthy, load.draining

    def mark_dead(self, engine_id: str, reason: str) -> None:
        a = self.actors[engine_id]
        if a.alive:
            log.warning("engine %s marked dead: %s", engine_id, reason)
        a.alive, a.dead_reason = False, reason

    def view(self, engine_id: str) -> ActorView:
        a = self.actors[engine_id]
        stats = a.load.stats if a.load else {}
        unseen = [d for rid, d in a.dispatches.items() if rid not in a.reported_ids]  # not in the report
        return ActorView(
            engine_id=engine_id, alive=a.alive, healthy=a.healthy, draining=a.draining,
            waiting_prefill_tokens=int(stats.get("waiting_prefill_tokens", 0)),
            unacked_prefill_tokens=sum(d.prompt_tokens for d in unseen if not d.first_token),
            prefill_tokens_per_s=float(stats.get("prefill_tokens_per_s", 0.0)),
            kv_usage=float(stats.get("kv_usage", 0.0)),
            in_flight=(a.load.in_flight if a.load else 0) + len(unseen),
        )

    def views(self) -> list[ActorView]:
        return [self.view(e) for e in sorted(self.actors)]

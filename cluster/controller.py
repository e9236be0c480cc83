"""The SLO controller: one leader per cluster decides every engine's SM split.

Loop (every `interval_s`):
1. take or renew the Redis lease (`RedisStore.acquire_or_renew`); a follower waits and
   takes over only when the lease expires;
2. read all live engine views (engines publish them with an expiry; a malformed one is skipped and logged),
   timed by this controller's own monotonic clock for the policy (an engine's clock may be skewed, or step
   back when it restarts elsewhere);
3. ask the split policy for each engine (a `SplitPolicy` picked by name; a policy
   with `decide_all(views, targets)` sees the whole cluster at once). The "model"
   policy (`ModelPolicy`) decides with the latency model each engine published next to
   its view (`model:<engine_id>`); an engine without one (not yet published, or
   unreadable) gets the reactive rule, and the decision's reason says so;
4. filter through `hold_reason` (warm-up: enough samples of requests that arrived after the
   last switch; a minimum dwell time per engine; the last decision applied first), and write the
   changes to Redis, fenced by the lease, each with a decision record
   (time, engine, from, to, why, leader).

An operator can pin engines to a split (`semipd pin`): a pinned engine gets the split
nearest its pin, without waiting for dwell or warm-up, until the pin is removed.

Engines poll their desired split and switch at an iteration boundary. When Redis is
away the controller logs, backs off and resumes when it returns; the engines keep
their last split meanwhile.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from actors.slo.latency_model import LatencyModel
from actors.slo.policy import ModelPolicy, make_policy
from actors.slo.types import EngineView, SLOTargets, SplitDecision, SplitPolicy, nearest_split
from cluster.redis_store import REDIS_ERRORS, Backoff, RedisStore

log = logging.getLogger(__name__)

# built-in names come from actors.slo.policy.make_policy; "model" starts with no latency models:
# the controller gives it the ones the engines publish (see `models_from_published`)
POLICIES: dict[str, Callable[[], SplitPolicy]] = {
    "fixed": lambda: make_policy("fixed"),
    "reactive": lambda: make_policy("reactive"),
    "model": lambda: make_policy("model", model={}),
}
NO_MODEL = "no latency model published"
HOLD_LOG_REPEAT_S = 2.0  # a hold on a split predicted past a target is logged again after this long


def register_policy(name: str, factory: Callable[[], SplitPolicy]) -> None:
    """Make a policy available to `policy_by_name(name)` (and `--policy name`)."""
    POLICIES[name] = factory


def policy_by_name(name: str) -> SplitPolicy:
    """The controller's policy: a registered name, or an import path `package.module:Attr`."""
    if name in POLICIES:
        return POLICIES[name]()
    if ":" in name:
        module, attr = name.split(":", 1)
        obj = getattr(importlib.import_module(module), attr)
        policy = obj() if isinstance(obj, type) else obj
        if not callable(getattr(policy, "decide", None)):
            raise ValueError(f"{name} has no decide(view, targets) method")
        return policy
    raise ValueError(f"unknown split policy {name!r}; known: {', '.join(sorted(POLICIES))} (or module:Class)")


def policy_needs_models(name: str) -> bool:
    """Whether the policy `name` decides with the latency models the engines publish."""
    return isinstance(policy_by_name(name), ModelPolicy)


@dataclass(frozen=True)
class ControllerConfig:
    """Where the controller reads and writes, what it aims for and how cautiously it moves."""

    redis_url: str
    cluster: str = "default"
    targets: SLOTargets = field(default_factory=SLOTargets)
    policy: str = "reactive"
    interval_s: float = 0.5
    lease_s: float = 3.0
    min_dwell_s: float = 5.0
    urgent_dwell_s: float = 2.0  # the dwell (at most min_dwell_s) of a decision the policy marks urgent
    min_samples: int = 8
    apply_timeout_s: float = 10.0
    max_decisions: int = 500
    max_backoff_s: float = 5.0
    prefill_sm_fraction: tuple[float, float] = (0.0, 1.0)  # bounds on the prefill share of each engine's SMs

    def __post_init__(self) -> None:
        check_prefill_sm_fraction(self.prefill_sm_fraction)
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must be a redis:// URL, got {self.redis_url!r}")
        if self.interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if self.lease_s <= 2 * self.interval_s:
            raise ValueError(f"lease_s ({self.lease_s}) must exceed two intervals ({2 * self.interval_s})")
        if self.min_dwell_s < 0 or self.min_samples < 0 or self.apply_timeout_s <= 0:
            raise ValueError("min_dwell_s and min_samples must be >= 0, apply_timeout_s > 0")
        if self.urgent_dwell_s < 0:
            raise ValueError(f"urgent_dwell_s must be >= 0, got {self.urgent_dwell_s}")
        if self.max_decisions < 1 or self.max_backoff_s < self.interval_s:
            raise ValueError("max_decisions must be >= 1 and max_backoff_s >= interval_s")


def view_from_dict(d: Mapping[str, Any]) -> EngineView:
    """The policy's view of an engine from what the engine published.

    Non-finite latency samples are dropped and a non-finite (or null) optional number reads as 0, its "unknown",
    so that no NaN reaches a policy as a signal. ValueError when the view is malformed (no engine id, split or
    SM count, or one that is not a finite number)."""
    try:
        s = d.get("stats") or {}
        prefill_sms, total_sms = int(s["prefill_sms"]), int(s["total_sms"])
        return EngineView(
            engine_id=str(d["engine_id"]), prefill_sms=prefill_sms, total_sms=total_sms,
            splits=tuple(int(x) for x in s.get("splits") or ()) or (prefill_sms,),
            waiting_prefill_tokens=_count(s, "waiting_prefill_tokens"), num_decoding=_count(s, "num_decoding"),
            decode_context_tokens=_count(s, "decode_context_tokens"),
            ttft_ms=_samples(d.get("ttft_ms")), tpot_ms=_samples(d.get("tpot_ms")),
            time=_number(d, "time"),
            num_prefill_requests=_count(s, "num_waiting") + _count(s, "num_prefilling"),
            arrival_tokens_per_s=_number(s, "arrival_tokens_per_s"),
            mean_prompt_tokens=_number(s, "arrival_mean_prompt_tokens"),
            mean_output_tokens=_number(s, "mean_output_tokens"),
            mean_max_tokens=_number(s, "arrival_mean_max_tokens"),
            decode_step_ms=_number(s, "recent_decode_step_ms"),
            decode_pace_ms=_number(s, "decode_pace_ms"),
            prefill_iteration_ms=_number(s, "recent_prefill_ms"),
            prefill_iteration_tokens=_number(s, "recent_prefill_tokens"),
            live_tpot_ms=_samples(d.get("live_tpot_ms")),
            live_tpot_without_stalls_ms=_samples(d.get("live_tpot_without_stalls_ms")),
            tpot_without_stalls_ms=_samples(d.get("tpot_without_stalls_ms")),
            refuses_late=s.get("refuses_late") is True,
        )
    except (KeyError, TypeError, AttributeError, ArithmeticError) as e:
        raise ValueError(f"malformed view: {type(e).__name__}: {e}") from e


def _number(d: Mapping[str, Any], key: str) -> float:
    """`d[key]` as a float; 0.0 (unknown) when absent, null or not finite."""
    x = float(d.get(key) or 0.0)
    return x if math.isfinite(x) else 0.0


def _count(d: Mapping[str, Any], key: str) -> int:
    return int(_number(d, key))


def _samples(xs: Any) -> tuple[float, ...]:
    """Latency samples as floats, without the non-finite ones."""
    return tuple(x for x in (float(v) for v in xs or ()) if math.isfinite(x))


def check_prefill_sm_fraction(fraction: tuple[float, float]) -> None:
    """ValueError unless `fraction` is (min, max) with 0 <= min <= max <= 1."""
    lo, hi = fraction
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"prefill_sm_fraction must satisfy 0 <= min <= max <= 1, got ({lo}, {hi})")


def bounded_view(view: EngineView, fraction: tuple[float, float]) -> EngineView:
    """`view` with only the splits whose prefill share lies in `fraction` (the one nearest the bounds
    when none does), so no policy can choose outside them."""
    lo, hi = fraction[0] * view.total_sms, fraction[1] * view.total_sms
    allowed = tuple(n for n in view.splits if lo <= n <= hi)
    if not allowed:
        allowed = (min(view.splits, key=lambda n: (max(lo - n, n - hi), n)),)
    return view if allowed == view.splits else replace(view, splits=allowed)


def pinned_decisions(views: list[EngineView], pins: Mapping[str, int]) -> dict[str, SplitDecision]:
    """The split of each pinned engine: the available one nearest its pin (its own, else "*")."""
    out = {}
    for v in views:
        pin = pins.get(v.engine_id, pins.get("*"))
        if pin is not None:
            out[v.engine_id] = SplitDecision(nearest_split(v.splits, pin), f"pinned to {pin} prefill SMs by the operator")
    return out


def hold_kind(reason: str) -> str:
    """A hold's kind, its reason up to the details: "hold: within hysteresis band (gain ...); TTFT ..." ->
    "hold: within hysteresis band"."""
    return reason.split(";", 1)[0].split(" (", 1)[0]


def hold_reason(view: EngineView, proposed: int, now: float, last_change: float | None,
                pending: Mapping[str, Any] | None, cfg: ControllerConfig, pinned: bool = False,
                urgent: bool = False) -> str | None:
    """Why the controller should not switch `view`'s engine to `proposed` now (None: switch).

    `last_change`: when this engine's split was last decided; `pending`: the last desired
    split written for it (None if none). A `pinned` engine skips the dwell and warm-up; an `urgent`
    decision (see `SplitDecision`) skips the warm-up and waits `urgent_dwell_s` (at most `min_dwell_s`).
    """
    if proposed == view.prefill_sms:
        return "no change"
    if proposed not in view.splits:
        return f"{proposed} SMs is not an available split"
    if pending is not None and int(pending["prefill_sms"]) != view.prefill_sms \
            and now - float(pending.get("time", 0.0)) < cfg.apply_timeout_s:
        return "waiting for the engine to apply the last decision"
    if pinned:
        return None
    dwell = min(cfg.urgent_dwell_s, cfg.min_dwell_s) if urgent else cfg.min_dwell_s
    if last_change is not None and now - last_change < dwell:
        return f"dwell: last change {now - last_change:.1f} s ago (< {dwell:.1f} s)"
    if not urgent and len(view.ttft_ms) < cfg.min_samples:
        return (f"warming up: {len(view.ttft_ms)} samples of requests that arrived after the last switch "
                f"(< {cfg.min_samples})")
    return None


def decide_all(policy: SplitPolicy, views: list[EngineView], targets: SLOTargets) -> dict[str, SplitDecision]:
    """Each engine's decision: the policy's `decide_all` if it has one, else `decide` per engine; an engine
    whose `decide` raises keeps its split (the reason says why), so it cannot stop the others' decisions."""
    whole = getattr(policy, "decide_all", None)
    if callable(whole):
        return dict(whole(views, targets))
    out = {}
    for v in views:
        try:
            out[v.engine_id] = policy.decide(v, targets)
        except Exception as e:  # a policy bug or bad data for one engine
            out[v.engine_id] = SplitDecision(v.prefill_sms, f"policy failed ({type(e).__name__}: {e})")
    return out


def models_from_published(published: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, LatencyModel], dict[str, str]]:
    """Latency models by engine id from their published JSON, and why each unreadable one was skipped."""
    models: dict[str, LatencyModel] = {}
    bad: dict[str, str] = {}
    for eid, d in published.items():
        try:
            models[eid] = LatencyModel.from_dict(dict(d))
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # ArithmeticError: int(Infinity)
            bad[eid] = f"{type(e).__name__}: {e}"
    return models, bad


def decide_with_models(policy: ModelPolicy, fallback: SplitPolicy, views: list[EngineView], targets: SLOTargets,
                       unreadable: Mapping[str, str] | None = None) -> dict[str, SplitDecision]:
    """Each engine's decision: `policy` where it has a model for the engine (its own or a "*"
    default), else `fallback` with the reason saying why (`unreadable`: engine -> error); `fallback` too
    where `policy` raises for the engine (a model it cannot evaluate must not stop the other engines)."""
    out: dict[str, SplitDecision] = {}
    for v in views:
        failed = None
        if v.engine_id in policy.models or "*" in policy.models:
            try:
                out[v.engine_id] = policy.decide(v, targets)
                continue
            except Exception as e:
                failed = f"model policy failed ({type(e).__name__}: {e})"
        d = fallback.decide(v, targets)
        why = failed or (f"latency model unreadable ({unreadable[v.engine_id]})"
                         if unreadable and v.engine_id in unreadable else NO_MODEL)
        out[v.engine_id] = SplitDecision(d.prefill_sms, f"reactive fallback, {why}: {d.reason}",
                                         {**d.predicted, "model_fallback": 1.0})
    return out


def new_leader_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Controller:
    """One SLO controller instance (leader or follower). Plain class; `controller_actor_cls` wraps it."""

    def __init__(self, cfg: ControllerConfig, policy: SplitPolicy | None = None, leader_id: str | None = None,
                 autostart: bool = False) -> None:
        """`autostart`: begin the loop now if constructed on a running event loop (the Ray actor,
        so that a restarted controller actor resumes by itself)."""
        self.cfg = cfg
        self.policy = policy or policy_by_name(cfg.policy)
        self.id = leader_id or new_leader_id()
        self.store = RedisStore(cfg.redis_url, cfg.cluster)
        self.is_leader = False
        self.redis_ok = False
        self.errors = 0
        self.last_error = ""
        self.ticks = 0
        self.decisions_written = 0
        self._last_change: dict[str, float] = {}
        # engine -> ((split the policy wants, why it waits), when that was last logged)
        self._last_hold: dict[str, tuple[tuple[int, str], float]] = {}
        self._pending_seen: dict[str, tuple[str, float]] = {}  # engine -> (its split record's id, first read at)
        self._bad_views: dict[str, str] = {}  # engine -> why its view was last skipped
        # the model policy: the models it was built with (e.g. a "*" default) under the published ones
        self._base_models = dict(self.policy.models) if isinstance(self.policy, ModelPolicy) else {}
        self._fallback = make_policy("reactive")
        self.engines_with_model: list[str] = []
        self._backoff = Backoff(cfg.interval_s, cfg.max_backoff_s)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if autostart:
            try:
                self._task = asyncio.get_running_loop().create_task(self.run())
            except RuntimeError:  # no loop here: start() later
                pass

    async def tick(self) -> list[dict[str, Any]]:
        """One round: lease, views, decisions. Returns the decision records written."""
        self.ticks += 1
        leader = await self.store.acquire_or_renew(self.id, int(self.cfg.lease_s * 1000))
        if leader != self.is_leader:
            log.warning("controller %s %s", self.id, "is now the leader" if leader else "lost the lease")
        self.is_leader = leader
        if not leader:
            return []
        now = time.time()
        await self.store.set_controller_status(self._status_record(now), int(self.cfg.lease_s * 1000))
        views = self._views(await self.store.read_views(), time.monotonic())
        pinned = pinned_decisions(views, await self.store.pins())
        decisions = {**(await self._decide([v for v in views if v.engine_id not in pinned])), **pinned}
        written = []
        for eid, decision in sorted(decisions.items()):
            view = next(v for v in views if v.engine_id == eid)
            pending = self._trusted_time(eid, await self.store.get_split(eid), now)
            last = max(self._last_change.get(eid, 0.0), float(pending["time"]) if pending else 0.0) or None
            why_not = hold_reason(view, decision.prefill_sms, now, last, pending, self.cfg, eid in pinned,
                                  decision.urgent)
            if why_not is not None:
                self._log_hold(view, decision, why_not, now)
                continue
            self._last_hold.pop(eid, None)
            record = self._record(view, decision, now)
            split = dict(id=record["id"], prefill_sms=decision.prefill_sms, reason=decision.reason,
                         leader=self.id, time=now)
            if not await self.store.write_decision(self.id, eid, split, record, self.cfg.max_decisions):
                log.warning("controller %s: lease lost before writing the decision for %s", self.id, eid)
                self.is_leader = False
                break
            self._last_change[eid] = now
            self.decisions_written += 1
            written.append(record)
            log.info("controller %s: %s %d -> %d SMs (%s)", self.id, eid, view.prefill_sms,
                     decision.prefill_sms, decision.reason)
        return written

    def _views(self, raw: Mapping[str, Mapping[str, Any]], clock: float) -> list[EngineView]:
        """The views of the engines not draining, within the prefill bounds, timed at `clock` (this controller's
        monotonic time: the policy's state about an engine spans its views, which another clock may have stamped);
        a malformed one is skipped, and logged once per problem."""
        views = []
        for eid, d in raw.items():
            if d.get("draining"):
                continue
            try:
                view = view_from_dict(d)
            except ValueError as e:
                if self._bad_views.get(eid) != str(e):
                    log.warning("controller %s: view of %s skipped: %s", self.id, eid, e)
                self._bad_views[eid] = str(e)
                continue
            self._bad_views.pop(eid, None)
            views.append(replace(bounded_view(view, self.cfg.prefill_sm_fraction), time=clock))
        return views

    def _trusted_time(self, eid: str, pending: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
        """`pending` (`eid`'s split record) dated no later than when this controller first read it: a former
        leader whose clock ran ahead would otherwise hold the engine (dwell, apply timeout) for the skew."""
        if pending is None:
            return None
        rid = str(pending.get("id"))
        seen = self._pending_seen.get(eid)
        if seen is None or seen[0] != rid:
            seen = self._pending_seen[eid] = (rid, now)
        return {**pending, "time": min(float(pending.get("time", 0.0)), seen[1])}

    def _log_hold(self, view: EngineView, decision: SplitDecision, why_not: str, now: float) -> None:
        """Log a decision held back, once per change of the split wanted or of the kind of hold or wait, and
        again every `HOLD_LOG_REPEAT_S` while the current split is predicted past a target (its numbers then
        say why the policy did not move: in run 31 one line covered a whole window of TPOT misses)."""
        if decision.prefill_sms == view.prefill_sms:
            key = (view.prefill_sms, hold_kind(decision.reason))
        else:
            key = (decision.prefill_sms, why_not.split(":", 1)[0])
        last = self._last_hold.get(view.engine_id)
        if last is not None and last[0] == key and not (
                decision.predicted.get("slack", 0.0) < 0 and now - last[1] >= HOLD_LOG_REPEAT_S):
            return
        self._last_hold[view.engine_id] = (key, now)
        if decision.prefill_sms == view.prefill_sms:
            log.info("controller %s: %s stays at %d SMs (%s)", self.id, view.engine_id, view.prefill_sms,
                     decision.reason)
        else:
            log.info("controller %s: %s stays at %d SMs, not yet %d: %s (%s)", self.id, view.engine_id,
                     view.prefill_sms, decision.prefill_sms, why_not, decision.reason)

    async def _decide(self, views: list[EngineView]) -> dict[str, SplitDecision]:
        """The policy's decisions; the model policy first gets the models the engines published."""
        if not views:
            return {}
        if not isinstance(self.policy, ModelPolicy):
            return decide_all(self.policy, views, self.cfg.targets)
        unreadable: dict[str, str] = {}
        published = await self.store.read_models([v.engine_id for v in views], unreadable)
        models, bad = models_from_published(published)
        bad.update(unreadable)
        for eid, err in bad.items():
            log.warning("controller %s: latency model of %s unreadable (%s); reactive rule for it", self.id, eid, err)
        self.policy.models = {**self._base_models, **models}
        self.engines_with_model = sorted(models)
        return decide_with_models(self.policy, self._fallback, views, self.cfg.targets, bad)

    def _record(self, view: EngineView, decision: SplitDecision, now: float) -> dict[str, Any]:
        return dict(id=uuid.uuid4().hex[:12], time=now, engine_id=view.engine_id, leader=self.id,
                    policy=self.cfg.policy, reason=decision.reason, predicted=dict(decision.predicted),
                    num_ttft_samples=len(view.ttft_ms), total_sms=view.total_sms,
                    **{"from": view.prefill_sms, "to": decision.prefill_sms})

    def _status_record(self, now: float) -> dict[str, Any]:
        return dict(leader=self.id, time=now, policy=self.cfg.policy, targets=asdict(self.cfg.targets),
                    min_dwell_s=self.cfg.min_dwell_s, interval_s=self.cfg.interval_s,
                    prefill_sm_fraction=list(self.cfg.prefill_sm_fraction))

    async def run(self) -> None:
        """Tick until stop(); Redis errors are logged and retried with backoff."""
        while not self._stop.is_set():
            delay = self.cfg.interval_s
            try:
                await self.tick()
                if not self.redis_ok and self.errors:
                    log.warning("controller %s: Redis is back", self.id)
                self.redis_ok = True
                self._backoff.reset()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as e:
                if self.redis_ok or self.errors == 0:
                    log.warning("controller %s: Redis unreachable (%s); retrying", self.id, e)
                self.redis_ok = self.is_leader = False
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                delay = self._backoff.next_delay()
            except Exception as e:  # a policy bug must not stop the controller
                log.exception("controller %s: tick failed", self.id)
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                delay = self._backoff.next_delay()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    async def start(self) -> str:
        """Run the loop in the background (idempotent); returns this instance's id."""
        if self._task is None or self._task.done():
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(self.run())
        return self.id

    async def stop(self, release: bool = True) -> None:
        """Stop the loop; with `release`, give up the lease so a follower takes over at once."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if release and self.is_leader:
            try:
                await self.store.release(self.id)
            except REDIS_ERRORS as e:
                log.warning("controller %s: could not release the lease: %s", self.id, e)
        self.is_leader = False
        await self.store.aclose()

    async def status(self) -> dict[str, Any]:
        return dict(id=self.id, is_leader=self.is_leader, redis_ok=self.redis_ok, errors=self.errors,
                    last_error=self.last_error, ticks=self.ticks, decisions_written=self.decisions_written,
                    policy=self.cfg.policy, targets=asdict(self.cfg.targets),
                    engines_with_model=list(self.engines_with_model))


def controller_actor_cls(num_cpus: float = 0, resources: dict[str, float] | None = None) -> Any:
    """`Controller` as a Ray actor class (imports Ray)."""
    import ray

    return ray.remote(num_cpus=num_cpus, resources=resources or None, max_concurrency=16)(Controller)

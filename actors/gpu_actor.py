"""EngineActor: one GPU's engine (an `AsyncLLM`) as an async Ray actor.

A plain class, wrapped with `ray.remote` where it is used (`engine_actor_cls(...)`), so
it also runs in-process for tests. The engine underneath knows nothing of Ray; this
module imports Ray only lazily (node id, the remote wrapper).

Methods (all async on the actor's event loop):
- `outputs(subscriber)`: a streaming generator (call it with `.options(num_returns="streaming")`)
  of `list[StreamChunk]`: every chunk of the subscriber's requests, batched as they come
  (about one batch per engine step), so the cost of a Ray item is paid once per step, not
  once per token of every request.
- `submit(request, subscriber)`: admit a request whose chunks go to `subscriber`'s outputs;
  raises `NoCapacityError` while draining, and the engine's own errors for bad requests.
- `abort(request_id)`, `load() -> EngineLoad`, `apply_split(prefill_sms, reason)`,
  `drain(timeout_s)`, `resume()`, `ready()` / `info()`, `ping()`, `shutdown()`.

In `disagg` mode the engine is a `DisaggPair` (a prefill-only and a decode-only engine, one
device each): one engine to the router, no SM split, and its stats carry what moving requests between the two
cost (`DisaggPair.transfer_stats`: KV bytes, transfer and handoff times).

The actor keeps a window of recent TTFT / TPOT samples (measured here, from the call
to the last token), the TPOT so far of the requests decoding (`LiveDecodes`) and, when
given a `PublisherConfig`, publishes its view to Redis and applies the desired splits
the SLO controller writes there. Given a `ModelSource` (the cluster runs the "model"
split policy), it gets its latency model at start, before its workers run (loaded, or
profiled: `actors.slo.profiler.engine_latency_model`), and publishes it with its view.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from actors.config import EngineConfig
from actors.engine.frontend import AsyncLLM, StreamChunk
from actors.slo.latency_model import LatencyModel, ModelSource
from cluster.engine_client import EngineLoad, GenerateRequest, NoCapacityError
from cluster.redis_store import EnginePublisher, PublisherConfig

log = logging.getLogger(__name__)
EXIT_DELAY_S = 2.0  # after a lost GPU: time for the failed requests' errors to reach the routers
EXIT_CODE_DEVICE_LOST = 70
LIVE_TPOT_MIN_TOKENS = 16  # tokens after its first a request decoding has made before its TPOT so far is published


@dataclass(frozen=True)
class LatencySample:
    """One latency of one request, with the wall times it was taken and the request arrived: its TTFT, taken at
    its first token, or its TPOT and output tokens, taken when it finished with two tokens or more (the other
    one None). `tpot_without_stalls_ms`: the TPOT less the engine's decode stall time between the request's first
    token and its last (`LiveDecodes`; None: not known, the TPOT then stands for it).

    TTFT at the first token, not at the finish: a split that queues prompts shows in the samples a request's
    decoding time sooner (on the H200 a shift to 5,900-token prompts was observed past target too late
    for an urgent switch, 2026-12-03)."""

    time: float
    arrival: float
    ttft_ms: float | None
    tpot_ms: float | None
    output_tokens: int = 0
    tpot_without_stalls_ms: float | None = None


class SampleWindow:
    """The last `max_samples` latency samples no older than `max_age_s`."""

    def __init__(self, max_samples: int = 512, max_age_s: float = 120.0) -> None:
        if max_samples < 1 or max_age_s <= 0:
            raise ValueError("need max_samples >= 1 and max_age_s > 0")
        self.max_age_s = max_age_s
        self._samples: deque[LatencySample] = deque(maxlen=max_samples)

    def add(self, sample: LatencySample) -> None:
        self._samples.append(sample)

    def samples(self, arrived_after: float = 0.0, now: float | None = None) -> list[LatencySample]:
        """Samples of requests that arrived after `arrived_after`, within the age limit, oldest first."""
        oldest = (now if now is not None else time.time()) - self.max_age_s
        return [s for s in self._samples if s.time > oldest and s.arrival > arrived_after]

    def series(self, arrived_after: float = 0.0) -> tuple[list[float], list[float]]:
        """(TTFT ms, TPOT ms) lists of the samples of requests that arrived after `arrived_after`."""
        picked = self.samples(arrived_after)
        return ([s.ttft_ms for s in picked if s.ttft_ms is not None],
                [s.tpot_ms for s in picked if s.tpot_ms is not None])

    def tpot_without_stalls(self, arrived_after: float = 0.0) -> list[float]:
        """The TPOT samples of `series` (the same requests, in the same order) less the decode stalls in them."""
        return [s.tpot_ms if s.tpot_without_stalls_ms is None else s.tpot_without_stalls_ms
                for s in self.samples(arrived_after) if s.tpot_ms is not None]

    def mean_output_tokens(self) -> float:
        """Mean output length of the finished requests in the window (0: none)."""
        lengths = [s.output_tokens for s in self.samples() if s.output_tokens > 0]
        return sum(lengths) / len(lengths) if lengths else 0.0


class _Progress(NamedTuple):
    """A decoding request's progress, as `LiveDecodes` keeps it."""

    first_wall: float
    first: float
    last: float
    tokens: int
    stalled_at_first: float
    stalled_at_last: float


class LiveDecodes:
    """The requests decoding now: when each had its first token and its latest, and how many tokens it has made.

    A TPOT sample comes only when its request ends, 200 tokens of documents (2.5 s) after its first token: on the
    H200 (run 27) documents streamed at 13.3-16.5 ms a token against a 15 ms target for 7 s before their samples
    told the split policy. The TPOT so far of those decoding is the same measure, seconds sooner.

    Each also keeps the engine's decode stall time (`EngineCore.decode_stalled_seconds`) at its first token and
    at its latest, so that its TPOT so far can be told without the stalls it decoded through."""

    def __init__(self) -> None:
        self._progress: dict[str, _Progress] = {}

    def update(self, request_id: str, first_wall: float, first: float, last: float, tokens: int,
               stalled_s: float = 0.0) -> None:
        """Note `request_id`'s progress: its first token at `first_wall` (`time.time()`) and `first`
        (`time.monotonic()`), its latest at `last`, `tokens` made; `stalled_s`: the engine's decode stall time
        now (the first update's counts as at the first token)."""
        seen = self._progress.get(request_id)
        stalled_at_first = stalled_s if seen is None else seen.stalled_at_first
        self._progress[request_id] = _Progress(first_wall, first, last, tokens, stalled_at_first, stalled_s)

    def end(self, request_id: str) -> float:
        """Forget `request_id`; the engine's decode stall time between its first token and its latest (0: none
        noted)."""
        p = self._progress.pop(request_id, None)
        return 0.0 if p is None else p.stalled_at_last - p.stalled_at_first

    def tpot_ms(self, first_after: float = 0.0, min_tokens: int = LIVE_TPOT_MIN_TOKENS,
                without_stalls: bool = False) -> list[float]:
        """The TPOT so far (ms between their first token and their latest, per token since) of the requests
        whose first token came after `first_after` (`time.time()`) and which made `min_tokens` or more since;
        `without_stalls`: less the engine's decode stall time in between (the same requests, in the same order)."""
        return [(p.last - p.first - (p.stalled_at_last - p.stalled_at_first if without_stalls else 0.0))
                / (p.tokens - 1) * 1000 for p in self._progress.values()
                if p.first_wall > first_after and p.tokens - 1 >= max(1, min_tokens)]


class RateWindow:
    """Amounts recorded over time (prompt tokens as requests arrive): their rate, the highest of their rates
    over the last `spans_s` seconds each (of `time.monotonic()`), and the mean amount of the latest events.

    The short span sees a burst within a second or two of its start; the long one remembers it for a
    while after it ends, so a lull inside a load does not read as idle. With one 10 s span, the split
    policy on the H200 gave decode 112 of 132 SMs in the lull between two bursts and held that split
    for its dwell while the next burst's prompts queued for seconds (2026-12-03).
    """

    def __init__(self, spans_s: tuple[float, ...] = (2.0, 10.0, 30.0), min_events: int = 4) -> None:
        if not spans_s or min(spans_s) <= 0:
            raise ValueError(f"spans_s must be positive, got {spans_s}")
        if min_events < 1:
            raise ValueError(f"min_events must be >= 1, got {min_events}")
        self.spans_s = tuple(sorted(spans_s))
        self.min_events = min_events
        self._events: deque[tuple[float, int]] = deque()

    def add(self, amount: int, now: float | None = None) -> None:
        self._events.append((time.monotonic() if now is None else now, amount))

    def rate(self, now: float | None = None) -> float:
        """Amount per second, the highest over the spans (an engine up for less counts as idle before)."""
        totals, _ = self._spans(now)
        return max(total / span for total, span in zip(totals, self.spans_s))

    def mean_amount(self, now: float | None = None) -> float:
        """Mean amount per event (the prompt length of the latest arrivals): over the shortest span if it holds
        at least `min_events` events, else over the latest `min_events` events within the longest span; 0 when
        nothing arrived.

        The latest, not the busiest span's: when chat at 50 req/s gave way to documents at 4 req/s (the same
        prompt tokens per second), the busiest span mixed the two and read the documents' 5,900-token prompts
        as 730 tokens, so the policy kept too few prefill SMs for 12 s (H200, 2026-12-03). And not a longer
        span's when the shortest holds too few: at 4 documents a second, a 2 s span with three of them sent
        the reading back to the 10 s span's mix of both loads (in simulation).
        """
        totals, counts = self._spans(now)
        if counts[0] >= self.min_events:
            return totals[0] / counts[0]
        latest = [amount for _, amount in itertools.islice(reversed(self._events), self.min_events)]
        return sum(latest) / len(latest) if latest else 0.0

    def _spans(self, now: float | None) -> tuple[list[int], list[int]]:
        """(total amount, events) of each span, shortest first."""
        now = time.monotonic() if now is None else now
        while self._events and self._events[0][0] <= now - self.spans_s[-1]:
            self._events.popleft()
        totals = [0] * len(self.spans_s)
        counts = [0] * len(self.spans_s)
        for t, amount in self._events:
            for i, span in enumerate(self.spans_s):
                if t > now - span:
                    totals[i] += amount
                    counts[i] += 1
        return totals, counts


class Subscriber:
    """The chunks waiting for one subscriber (a router on one event loop) and its unfinished requests."""

    def __init__(self) -> None:
        self.requests: set[str] = set()
        self._pending: list[StreamChunk] = []
        self._ready = asyncio.Event()

    def put(self, chunk: StreamChunk) -> None:
        self._pending.append(chunk)
        self._ready.set()

    def wake(self) -> None:
        """Let a waiting `take` return (at shutdown), possibly with nothing."""
        self._ready.set()

    async def take(self) -> list[StreamChunk]:
        """Everything put since the last take; waits for at least one chunk (or a `wake`)."""
        await self._ready.wait()
        self._ready.clear()
        batch, self._pending = self._pending, []
        return batch


async def coalesced(chunks: AsyncGenerator[StreamChunk, None], interval: int) -> AsyncIterator[StreamChunk]:
    """`chunks` of one request merged so that each carries at least `interval` tokens, except the first
    one with tokens (time to first token) and the last (finish reason, error), which go at once.
    Closing this stream closes `chunks` (which aborts the request) at once."""
    pending: StreamChunk | None = None
    first_sent = False
    try:
        async for chunk in chunks:
            pending = chunk if pending is None else pending.followed_by(chunk)
            if pending.finished or len(pending.token_ids) >= interval or (pending.token_ids and not first_sent):
                first_sent = first_sent or bool(pending.token_ids)
                yield pending
                pending = None
        if pending is not None:
            yield pending
    finally:
        await chunks.aclose()


def _has_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except Exception:  # not in a Ray worker
        pass
    return socket.gethostname()


class EngineActor:
    """One engine behind Ray: streaming generation, load, SM split, drain."""

    def __init__(self, engine_id: str, config: EngineConfig, publisher: PublisherConfig | None = None,
                 window_samples: int = 1024, window_s: float = 120.0, stall_after_s: float = 30.0,
                 model_source: ModelSource | None = None, stream_interval: int = 1) -> None:
        """`model_source`: get a latency model at start (and publish it, with a publisher).
        `stream_interval`: tokens per chunk after the first (see `coalesced`): fewer chunks to pickle
        and to send as SSE events, and coarser streaming."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.engine_id = engine_id
        self.stream_interval = stream_interval
        self.config = config
        self.stall_after_s = stall_after_s
        self.llm = AsyncLLM(config)
        self.latency_model = self._latency_model(model_source)
        self.llm.start()
        self.window = SampleWindow(window_samples, window_s)
        self.decoding = LiveDecodes()
        self.arrivals = RateWindow()  # prompt tokens, for the split policy's view of offered load ...
        self.arrival_budgets = RateWindow()  # ... and the output tokens those requests may make (max_tokens)
        self.node_id = _node_id()
        self._in_flight = 0
        self._in_flight_ids: set[str] = set()  # routers use it to tell which of their requests a load includes
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._closed = False
        self._prefilled_tokens = 0
        self._requests_total = 0
        self._finished: Counter[str] = Counter()  # finish reason -> requests
        self._subscribers: dict[str, Subscriber] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # one per request in flight (kept referenced)
        self._publisher = (
            EnginePublisher(publisher, engine_id, self.view, self._apply_from_controller,
                            model=self.latency_model.to_dict() if self.latency_model else None)
            if publisher else None
        )
        self._publisher_task: asyncio.Task[None] | None = None
        self.llm.core.on_device_lost = self._exit_for_restart
        if _has_running_loop():  # inside the Ray actor, __init__ runs on its event loop: publish from now on
            self._start_background()  # (in-process use: ready() starts it)

    def _latency_model(self, source: ModelSource | None) -> LatencyModel | None:
        """This engine's latency model from `source` (None: none wanted); call before the workers start."""
        if source is None:
            return None
        from actors.slo.profiler import engine_latency_model

        model = engine_latency_model(self.llm.core, source)
        log.info("%s: latency model %s (%d samples, %s; contention beside the other phase at an even split, and "
                 "its slope over the other's share of the SMs: prefill %.3f %+.3f, decode %.3f %+.3f)", self.engine_id,
                 model.key, model.num_samples, source.path or "not saved", model.prefill.contention,
                 model.prefill.contention_slope, model.decode.contention, model.decode.contention_slope)
        return model

    def _start_background(self) -> None:
        if self._publisher is not None and self._publisher_task is None:
            self._publisher_task = asyncio.get_running_loop().create_task(self._publisher.run())

    def _exit_for_restart(self, error: BaseException) -> None:
        """The GPU is lost for this process (the engine failed its requests and stopped). In a Ray actor,
        end the process once those errors had time to reach the routers: Ray starts the actor again
        (`serve --engine-restarts`) with a fresh CUDA context, and routers take it back by name.
        Elsewhere (in-process use) the engine stays down and reports itself unhealthy."""
        import ray

        if not (ray.is_initialized() and ray.get_runtime_context().get_actor_id()):
            return
        log.critical("%s: exiting in %.0f s to be started again: %s", self.engine_id, EXIT_DELAY_S, error)
        timer = threading.Timer(EXIT_DELAY_S, os._exit, args=(EXIT_CODE_DEVICE_LOST,))
        timer.daemon = True
        timer.start()

    # -- lifecycle ------------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        """Start background work (Redis publisher) if not yet; returns `info()`."""
        self._start_background()
        return self.info()

    def info(self) -> dict[str, Any]:
        core = self.llm.core
        return dict(
            engine_id=self.engine_id, node_id=self.node_id, model_dir=self.config.model,
            architecture=core.arch.architecture, max_model_len=core.max_model_len,
            vocab_size=core.arch.vocab_size, mode=self.config.mode,
            total_sms=core.partitioner.total_sms, splits=list(core.partitioner.splits),
            latency_model=self.latency_model.key if self.latency_model else None, pid=os.getpid(),
            prefill_order=self.config.slo.order,
            admission=self.config.slo.admission_action if self.config.slo.admission else "off",
        )

    async def ping(self) -> str:
        return self.engine_id

    async def reset_prefix_cache(self) -> int:
        """Forget the cached pages no request holds (a benchmark's windows then start alike); returns how many."""
        return self.llm.core.allocator.reset_prefix_cache()

    async def drain(self, timeout_s: float = 30.0) -> int:
        """Stop accepting requests, wait up to `timeout_s` for in-flight ones; returns how many remain."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s: drain deadline passed with %d requests in flight", self.engine_id, self._in_flight)
        return self._in_flight

    async def resume(self) -> None:
        """Accept requests again after `drain()`."""
        self._draining = False

    async def shutdown(self) -> None:
        """Stop publishing and stop the engine's workers."""
        self._draining = True
        self._closed = True
        for sub in self._subscribers.values():
            sub.wake()
        if self._publisher is not None:
            self._publisher.stop()
        if self._publisher_task is not None:
            self._publisher_task.cancel()
        self.llm.shutdown()

    # -- requests -----------------------------------------------------------------------

    async def submit(self, request: GenerateRequest, subscriber: str) -> None:
        """Admit `request`; its chunks go to `outputs(subscriber)`, the last with `finish_reason`.

        Raises when the request is refused (nothing ran): `NoCapacityError` while draining, the
        engine's own error for an invalid request.
        """
        self._requests_total += 1
        try:
            if self._closed:  # `resume` after `shutdown` too: its stopped engine would never answer the request
                raise NoCapacityError(f"engine {self.engine_id} is shut down")
            if self._draining:
                raise NoCapacityError(f"engine {self.engine_id} is draining")
            if self.llm.core.device_error is not None:
                raise NoCapacityError(f"engine {self.engine_id} lost its GPU ({self.llm.core.device_error})")
            chunks = self.llm.generate(request.prompt_token_ids, request.params, request_id=request.request_id,
                                       priority=request.priority, deadline=request.deadline())
        except Exception:
            self._finished["rejected"] += 1
            raise
        sub = self._subscribers.setdefault(subscriber, Subscriber())
        sub.requests.add(request.request_id)
        self._in_flight += 1
        self._in_flight_ids.add(request.request_id)
        self._idle.clear()
        self.arrivals.add(len(request.prompt_token_ids))
        self.arrival_budgets.add(request.params.max_tokens)
        task = asyncio.get_running_loop().create_task(self._forward(request, chunks, sub))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def outputs(self, subscriber: str) -> AsyncIterator[list[StreamChunk]]:
        """Batches of the chunks of `subscriber`'s requests until the actor shuts down.

        Open it before submitting (chunks that come first wait for it). Closing it aborts the
        subscriber's unfinished requests.
        """
        sub = self._subscribers.setdefault(subscriber, Subscriber())
        try:
            while not self._closed:
                batch = await sub.take()
                if batch:
                    yield batch
        finally:
            if self._subscribers.get(subscriber) is sub:
                del self._subscribers[subscriber]
            for rid in list(sub.requests):
                self.llm.abort(rid)

    async def _forward(self, request: GenerateRequest, chunks: AsyncGenerator[StreamChunk, None],
                       sub: Subscriber) -> None:
        """Move one admitted request's chunks to its subscriber; keep the engine's books on it."""
        rid = request.request_id
        start, arrival = time.monotonic(), time.time()
        first: float | None = None
        first_wall = 0.0
        last: float | None = None
        finish: str | None = None
        num_tokens = 0
        try:
            async for chunk in coalesced(chunks, self.stream_interval):
                if chunk.token_ids:
                    last = time.monotonic()
                    if first is None:
                        first, first_wall = last, time.time()
                        self._prefilled_tokens += max(0, len(request.prompt_token_ids) - chunk.num_cached_tokens)
                        self.window.add(LatencySample(first_wall, arrival, (first - start) * 1000, None))
                    self.decoding.update(rid, first_wall, first, last, chunk.num_output_tokens,
                                         self.llm.core.decode_stalled_seconds)
                num_tokens = chunk.num_output_tokens
                finish = chunk.finish_reason
                sub.put(chunk)
        except Exception as e:  # the engine failed this request: the subscriber still gets its end
            log.exception("%s: request %s failed", self.engine_id, rid)
            finish = "error"
            sub.put(StreamChunk(rid, "", (), finish_reason="error", num_prompt_tokens=len(request.prompt_token_ids),
                                num_output_tokens=num_tokens, error=f"{type(e).__name__}: {e}"))
        finally:
            stalled_s = self.decoding.end(rid)
            sub.requests.discard(rid)
            self._in_flight -= 1
            self._in_flight_ids.discard(rid)
            if self._in_flight == 0:
                self._idle.set()
            self._finished[finish or "abort"] += 1
            if first is not None and last is not None and finish in ("stop", "length") and num_tokens > 1:
                tpot = (last - first) / (num_tokens - 1) * 1000
                unstalled = max(0.0, last - first - stalled_s) / (num_tokens - 1) * 1000
                self.window.add(LatencySample(time.time(), arrival, None, tpot, num_tokens, unstalled))

    async def abort(self, request_id: str) -> bool:
        return self.llm.abort(request_id)

    # -- split ----------------------------------------------------------------------------

    async def apply_split(self, prefill_sms: int, reason: str = "manual") -> dict[str, Any]:
        """Switch to the split nearest `prefill_sms` (adopted at the next iteration boundary); ValueError
        in disagg mode (prefill and decode have a device each: there is no split)."""
        if self.config.mode == "disagg":
            raise ValueError(f"engine {self.engine_id} runs in disagg mode: it has no SM split to change")
        changed = self.llm.core.partitioner.switch(prefill_sms, reason)
        return dict(changed=changed, prefill_sms=self.llm.core.partitioner.current)

    def _apply_from_controller(self, prefill_sms: int, reason: str) -> bool:
        changed = self.llm.core.partitioner.switch(prefill_sms, reason)
        if changed:
            log.info("%s: split -> %d prefill SMs (%s)", self.engine_id, prefill_sms, reason)
        return changed

    # -- load -------------------------------------------------------------------------------

    def _stats(self) -> dict[str, Any]:
        core = self.llm.core
        stats = asdict(core.stats())
        part = core.partitioner
        busy = stats["busy_seconds"].get("prefill", stats["busy_seconds"].get("unified", 0.0))
        ttft, tpot = self.window.series()
        stats.update(
            mode=self.config.mode,
            splits=list(part.splits),
            prefill_tokens_per_s=self._prefilled_tokens / busy if busy > 0 and self._prefilled_tokens else 0.0,
            arrival_tokens_per_s=self.arrivals.rate(),
            arrival_mean_prompt_tokens=self.arrivals.mean_amount(),
            mean_output_tokens=self.window.mean_output_tokens(),
            arrival_mean_max_tokens=self.arrival_budgets.mean_amount(),
            refuses_late=self.config.slo.admission and self.config.slo.admission_action == "reject",
            requests_total=self._requests_total,
            finish_reasons=dict(self._finished),
            in_flight_ids=sorted(self._in_flight_ids),
            ttft_ms=ttft,
            tpot_ms=tpot,
            redis=self._publisher.state.to_dict() if self._publisher else None,
            metrics={
                "vllm:num_requests_running": stats["num_prefilling"] + stats["num_decoding"],
                "vllm:num_requests_waiting": stats["num_waiting"],
                "vllm:kv_cache_usage_perc": stats["kv_usage"],
                "semipd:prefill_sm_fraction": part.prefill_fraction,
                "semipd:prefill_sms": part.current,
                "semipd:repartitions_total": len(part.switches),
                "semipd:prefill_queue_tokens": stats["waiting_prefill_tokens"],
                "semipd:decode_running": stats["num_decoding"],
            },
            time=time.time(),
        )
        if self.config.mode == "disagg":
            stats.update(core.transfer_stats())
        return stats

    def _healthy(self, stats: dict[str, Any]) -> bool:
        return (not self._closed and self.llm.core.device_error is None
                and stats["seconds_since_progress"] < self.stall_after_s)

    async def load(self) -> EngineLoad:
        """Stats, in-flight count and the latency window, for the router and `semipd status`."""
        stats = self._stats()
        return EngineLoad(self.engine_id, node_id=self.node_id, healthy=self._healthy(stats),
                          draining=self._draining, in_flight=self._in_flight, stats=stats)

    def view(self) -> dict[str, Any]:
        """What the Redis publisher writes: the load plus the samples of the requests that arrived after the
        last switch (one that waited through the switch would blame the new split for the old one's queue), and
        the TPOT so far of those decoding that had their first token after it, with and without the decode stalls
        they went through (`LiveDecodes`)."""
        stats = self._stats()
        del stats["in_flight_ids"]  # for routers only
        switches = self.llm.core.partitioner.switches
        since = switches[-1].time if switches else 0.0
        ttft, tpot = self.window.series(arrived_after=since)
        return dict(engine_id=self.engine_id, node_id=self.node_id, time=stats["time"],
                    healthy=self._healthy(stats), draining=self._draining, in_flight=self._in_flight,
                    stats=stats, ttft_ms=ttft, tpot_ms=tpot,
                    tpot_without_stalls_ms=self.window.tpot_without_stalls(arrived_after=since),
                    live_tpot_ms=self.decoding.tpot_ms(first_after=since),
                    live_tpot_without_stalls_ms=self.decoding.tpot_ms(first_after=since, without_stalls=True))


def engine_actor_cls(num_gpus: float = 0, num_cpus: float = 0, resources: dict[str, float] | None = None,
                     max_concurrency: int = 1000) -> Any:
    """`EngineActor` as a Ray actor class with these resources (imports Ray)."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, resources=resources or None,
                      max_concurrency=max_concurrency)(EngineActor)

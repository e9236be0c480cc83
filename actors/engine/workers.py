"""Workers: the engine loops. Each iteration is schedule -> execute -> account.

`PrefillWorker` and `DecodeWorker` run concurrently in semi-PD mode, each in its own
thread on its own SM partition's stream; `UnifiedWorker` runs both phases in one
batch (decodes piggybacked on a chunked prefill) on the whole device.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from actors.engine.durations import Durations
from actors.engine.pacing import StepPacer
from actors.engine.partitioner import Partitioner, Phase
from actors.request import PENDING_TOKEN, FinishReason, Request, TokenDelta
from actors.runner.device_errors import device_lost
from actors.runner.model_runner import Carry, Forwarded, ModelRunner
from actors.runner.sampler import Drawn, SampleResult, TokenLogprobs
from actors.scheduler.decode import DecodeScheduler
from actors.scheduler.plan import BatchPlan, SeqChunk
from actors.scheduler.prefill import PrefillScheduler

log = logging.getLogger(__name__)
# upper bounds (s) of the iteration-time histogram: decode steps of 5-50 ms against TPOT targets of 25-50 ms,
# prefill iterations up to seconds
ITERATION_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                                          0.2, 0.3, 0.5, 1.0, 2.0)
# an iteration this many times the median of the last STALL_MEDIAN_ITERATIONS or longer is a stall
# (`Worker._note_stall`)
STALL_STEP_FACTOR = 4.0
STALL_MEDIAN_ITERATIONS = 64
Emit = Callable[[list[TokenDelta]], None]
Handoff = Callable[[Request], None]  # takes over a request (prefill -> decode, or a preempted one back)


def discard(_: object) -> None:
    """The callback of a stopped worker or a shut-down engine, in place of its engine's or front end's."""


class Wakeup:
    """A level-triggered signal: `set` from any thread, `wait` clears it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> None:
        self._event.wait(timeout)
        self._event.clear()


class RecentIterations(NamedTuple):
    """A worker's recent iterations (`Worker.recent_iterations`)."""

    count: int
    mean_ms: float
    mean_tokens: float


class Iteration(NamedTuple):
    """One worker iteration, as `Worker.iteration_log` keeps it."""

    start: float  # time.monotonic()
    seconds: float
    split_version: int  # the partitioner's version it ran under
    tokens: int  # tokens it queued: prefill chunk tokens plus one per decode (overlapped: the next step's)


def start_entered_thread(name: str, enter: Callable[[], None], run: Callable[[], None], what: str) -> threading.Thread:
    """Start a daemon thread `name` that calls `enter()` (its set-up: the current device, its staging ring), then
    `run()`; return it once `enter` has returned. If `enter` raised, the thread has ended and this raises
    RuntimeError("`what` could not start") from it: a thread that cannot run must not count as started."""
    entered = threading.Event()
    failed: list[BaseException] = []

    def main() -> None:
        try:
            enter()
        except BaseException as e:
            failed.append(e)
            return
        finally:
            entered.set()
        run()

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    entered.wait()
    if failed:
        thread.join()
        raise RuntimeError(f"{what} could not start") from failed[0]
    return thread


class Worker:
    """Shared loop and accounting; subclasses plan and run one iteration in `step`.

    Overlapped decode (`overlap`, for workers that run decode-only steps): the next
    decode step is planned and queued while the current one runs; its input ids come
    from the current step's draw on the device, so the host work of a step (planning,
    attention plan, emitting tokens) hides behind the GPU. A request that ends at step n
    was already queued in step n + 1: that result is dropped, and its pages are freed
    only once step n + 1 has finished. A step with a grammar (structured outputs) is queued ahead too, but its
    draw waits for step n's tokens, which the grammar's mask needs (the GPU meanwhile runs its forward pass); so is
    one with penalties, which need them too. Logprobs are reduced on the device with the draw. Steps that would
    need a preemption run one at a time.
    """

    phase: Phase
    name: str
    overlap = False
    steps_queued_ahead = 0  # iterations queued (prefill: planned) while the previous one's tokens were on their way
    _inflight: _Launched | None = None
    unwaited: Drawn | None = None  # the last iteration, if it sampled nothing and was not waited for
    on_device_lost: Callable[[BaseException], None] | None = None  # the engine's, told when the GPU is gone

    def __init__(
        self,
        prefill: PrefillScheduler,
        decode: DecodeScheduler,
        runner: ModelRunner,
        partitioner: Partitioner,
        emit: Emit,
        wakeups: dict[str, Wakeup],
        handoff: Handoff | None = None,
        requeue: Handoff | None = None,
        overlap: bool | None = None,
    ) -> None:
        """`handoff` gets each finished prefill (default: `decode.add`), `requeue` each
        preempted decode (default: `prefill.add`); disaggregated engines inject others.
        `overlap`: overlapped decode on or off (default: the worker class's `overlap`)."""
        if overlap is not None:
            self.overlap = overlap
        self.prefill = prefill
        self.decode = decode
        self.runner = runner
        self.partitioner = partitioner
        self.emit = emit
        self.wakeups = wakeups
        self.handoff: Handoff = handoff or decode.add
        self.requeue: Handoff = requeue or prefill.add
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.iterations = 0
        self.last_progress = time.monotonic()
        self.iteration_times = Durations(ITERATION_BUCKETS_S)  # wall time of the iterations that worked
        self.tokens = 0  # tokens computed (prefill chunk tokens plus one per decode)
        self.adopt_seconds: list[float] = []  # time spent adopting each new SM split
        self.iteration_log: deque[Iteration] = deque(maxlen=4096)
        self.stalled_seconds = 0.0  # what stalled iterations took over the median one, so far (`_note_stall`)
        self._recent_seconds: deque[float] = deque(maxlen=STALL_MEDIAN_ITERATIONS)
        self._version = -1

    def start(self) -> None:
        """Start the loop's thread; returns once the thread has entered the runner (`ModelRunner.enter_thread`),
        so that what that makes (a pinned staging ring) is made before serving. Raises what entering raised
        (the thread has then ended): a worker that cannot run must not count as started."""
        self.thread = start_entered_thread(f"semipd-{self.name}", self.runner.enter_thread, self._loop,
                                           f"{self.name} worker")

    def stop(self, timeout: float = 30.0) -> bool:
        """End the loop after its current iteration; False if the thread is still running after `timeout` s.

        A stopped worker drops its callbacks (bound methods of its engine, which holds the worker:
        reference cycles), so that the engine goes with its last reference.
        """
        self.stop_event.set()
        self.wakeups[self.name].set()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                return False
            self.thread = None
        self.emit = self.handoff = self.requeue = discard
        return True

    def _loop(self) -> None:
        try:
            self._iterate()
            self.finish()
        finally:
            self.runner.leave_thread()

    def _iterate(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._adopt_split()
            except Exception as e:  # stay on the current partition until the next split (or end: GPU lost)
                log.exception("%s could not move to the new SM split", self.name)
                self._check_device(e)
                continue
            t0, tokens, host = time.monotonic(), self.tokens, dict(self.runner.host_seconds)
            try:
                worked = self.step()
            except Exception as e:  # keep serving: the failing batch was already failed in step()
                log.exception("%s iteration failed", self.name)
                self._check_device(e)
                worked = True
            now = time.monotonic()
            self.last_progress = now
            if worked:
                self.iterations += 1
                self.iteration_times.observe(now - t0)
                self.iteration_log.append(Iteration(t0, now - t0, self._version, self.tokens - tokens))
                median = self._note_stall(now - t0)
                if median is not None:
                    self._log_stall(now - t0, median, host)
            else:
                self.wakeups[self.name].wait(0.05)

    def _note_stall(self, seconds: float) -> float | None:
        """Count an iteration of `STALL_STEP_FACTOR` times the median of the last `STALL_MEDIAN_ITERATIONS` or
        longer as a stall: what it took over the median goes into `stalled_seconds`. A stall is time that more
        SMs would not have shortened (on the H100, run 30, decode stood still for 100-280 ms at once in a fresh
        server's first windows); a step slow throughout (under a long prompt's prefill) is not one. Returns
        the median it was a stall against (None: no stall)."""
        recent = self._recent_seconds
        stalled_against = None
        if len(recent) == recent.maxlen:
            median = statistics.median(recent)
            if seconds >= STALL_STEP_FACTOR * median:
                self.stalled_seconds += seconds - median
                stalled_against = median
        recent.append(seconds)
        return stalled_against

    def _log_stall(self, seconds: float, median: float, host_before: dict[str, float]) -> None:
        """Log a stalled iteration (`median`: the one it stalled against) with its host time by part (the runner's
        `host_seconds` since `host_before`): host time that fills the stall points at the interpreter (another
        thread holding it) or the launches; a stall mostly outside them, at the wait for the device."""
        spent = {part: 1e3 * (t - host_before.get(part, 0.0)) for part, t in self.runner.host_seconds.items()}
        host_ms = sum(spent.values())
        parts = ", ".join(f"{part} {ms:.1f}" for part, ms in spent.items() if ms >= 0.05)
        log.info("%s stalled: an iteration of %.0f ms (median %.1f ms); host %.1f ms (%s), the rest %.0f ms",
                 self.name, 1e3 * seconds, 1e3 * median, host_ms, parts or "none",
                 1e3 * seconds - host_ms)

    def recent_iterations(self, span_s: float = 2.0, now: float | None = None,
                          this_split: bool = False) -> RecentIterations:
        """The iterations that started within the last `span_s` seconds (with `this_split`, only those run on
        the current SM split): how many, their mean time and mean tokens (zeros: none)."""
        since = (time.monotonic() if now is None else now) - span_s
        version = self.partitioner.version if this_split else None
        seconds, tokens, count = 0.0, 0, 0
        for it in reversed(list(self.iteration_log)):  # a copy: the worker's thread appends to the log
            if it.start <= since:
                break
            if version is not None and it.split_version != version:
                continue
            seconds, tokens, count = seconds + it.seconds, tokens + it.tokens, count + 1
        if not count:
            return RecentIterations(0, 0.0, 0.0)
        return RecentIterations(count, 1000.0 * seconds / count, tokens / count)

    def _adopt_split(self) -> None:
        """At an iteration boundary: move to the stream of the current split. A move that raised is not tried
        again: the runner stays on its partition until the next split."""
        if self.partitioner.version == self._version:
            return
        t0 = time.perf_counter()
        self._version = self.partitioner.version
        self.runner.set_partition(self.partitioner.partition_for(self.phase))
        self.adopt_seconds.append(time.perf_counter() - t0)

    def step(self) -> bool:
        """Run one iteration; False when there was nothing to do."""
        raise NotImplementedError

    def finish(self) -> None:
        """Settle what the last iteration left queued, when the loop ends (default: nothing)."""

    # -- shared accounting -------------------------------------------------------

    def _run(self, plan: BatchPlan, sample_reqs: list[Request], d_reqs: list[Request],
             p_reqs: list[Request]) -> SampleResult | None:
        """Execute `plan`; if it fails, fail its requests (decode- and prefill-owned) and go on.

        A plan that samples nothing (prompt chunks that are not a prompt's last) is queued, not
        waited for, so the next one is prepared while it runs; its draw stays in `unwaited` until
        an iteration that samples has been waited for (which comes after it on the stream).
        """
        try:
            drawn = self._queue(plan, sample_reqs, None, p_reqs)
            if not sample_reqs:
                self.unwaited = drawn
                return SampleResult([], [])
            result = drawn.result()
            self.unwaited = None
            return result
        except Exception as e:
            log.exception("forward pass failed; failing its %d requests", len(d_reqs) + len(p_reqs))
            self._fail(d_reqs, p_reqs, e)
            return None

    def _fail(self, d_reqs: list[Request], p_reqs: list[Request], error: Exception) -> None:
        """End decode- and prefill-owned requests with an engine error (their pages freed).

        The device is checked first: when the error lost the GPU, the engine ends these requests with every
        other one and refuses new requests before any caller sees an error (a caller that retried at once
        would otherwise be admitted into an engine about to end)."""
        for r in d_reqs:
            self.decode.remove(r)
        for r in p_reqs:
            self.prefill.drop(r)
        self._check_device(error)
        failed = [r for r in d_reqs + p_reqs if not r.finished]
        for r in failed:
            r.finish_reason = FinishReason.ERROR
        self.emit([TokenDelta(r.request_id, (), FinishReason.ERROR, error=f"engine error: {error}") for r in failed])

    def _check_device(self, error: Exception) -> None:
        """Tell the engine if `error` left the GPU unusable (it then ends every request and stops): also when
        the error escaped an iteration, which would otherwise fail the same way every iteration after."""
        if self.on_device_lost is not None and device_lost(error, self.runner.device):
            self.on_device_lost(error)

    def _emit_aborted(self, reqs: list[Request]) -> None:
        for r in reqs:
            r.finish_reason = r.abort_requested or FinishReason.ABORT
        if reqs:
            self.emit([TokenDelta(r.request_id, (), r.finish_reason, num_prompt_tokens=r.num_prompt_tokens) for r in reqs])

    def _accept_tokens(self, reqs: list[Request], result: SampleResult, from_prefill: list[bool]) -> None:
        """Append sampled tokens; finish requests that end, hand new ones to decode.

        Deltas are emitted before the handoff: once decode owns a request it may emit the
        next token at once, and a request's tokens must reach the front end in order.
        A request that already ended (an engine error failed it while this iteration was queued:
        `_fail_prefills`) takes no token; what it holds is freed. One whose constraints left no token to draw
        (`SampleResult.conflicts`) ends with an error, its void token not taken.
        """
        deltas = []
        handoffs = []
        for req, tok, lp, conflict, fresh in zip(reqs, result.token_ids, result.logprobs, result.conflicts,
                                                 from_prefill):
            if req.finished:
                if fresh:
                    self.prefill.drop(req)
                elif req in self.decode.running:
                    self.decode.remove(req)
                continue
            reason = FinishReason.ERROR if conflict is not None else req.append_token(tok) or req.abort_requested
            if reason is not None:
                if fresh:
                    self.prefill.drop(req)
                else:
                    self.decode.remove(req)
                req.finish_reason = reason
            elif fresh:
                handoffs.append(req)
            deltas.append(_token_delta(req, tok, lp, reason) if conflict is None else _conflict_delta(req, conflict))
        self.emit(deltas)
        for req in handoffs:
            self.handoff(req)
        if handoffs:
            self.wakeups["decode"].set()

    def _fail_in_flight(self, steps: list[_Launched], error: Exception) -> None:
        """A queued step failed on the device: end every request of the queued steps."""
        log.exception("decode step failed; failing its requests")
        for step in steps[1:]:
            if step.drawn is None:  # its forward pass only
                self.runner.wait_for_stream()
            else:
                step.drawn.wait()
        self._inflight = None
        retired = {r for step in steps for r in step.retired}
        live = list(dict.fromkeys(r for step in steps for r in step.reqs if r not in retired))
        prefilling = list(dict.fromkeys(r for step in steps for r in step.prefill_reqs if not r.finished))
        for r in retired:
            self.decode.kv.release(r)
        self._fail(live, prefilling, error)

    def _queue(self, plan: BatchPlan, sample_reqs: list[Request], carry: Carry | None,
               prefill_reqs: list[Request], before_kernels: Callable[[], None] | None = None) -> Drawn:
        """`runner.launch`, counted (`_count`)."""
        drawn = self.runner.launch(plan, sample_reqs, carry, before_kernels)
        self._count(plan, prefill_reqs, drawn.prompt_logprobs)
        return drawn

    def _forward(self, plan: BatchPlan, carry: Carry | None, prefill_reqs: list[Request]) -> Forwarded:
        """`runner.forward` (the draw deferred), counted (`_count`)."""
        forwarded = self.runner.forward(plan, carry)
        self._count(plan, prefill_reqs, forwarded.prompt_logprobs)
        return forwarded

    def _count(self, plan: BatchPlan, prefill_reqs: list[Request], scores: list[list[TokenLogprobs]]) -> None:
        """Count a queued iteration's tokens (the runner counts its host time); the prompt logprobs it computed go to
        their requests (`prefill_reqs`, one per prefill chunk of `plan`) at once."""
        self.tokens += plan.num_tokens
        for req, scored in zip(prefill_reqs, scores):
            req.prompt_logprobs.extend(scored)

    def _launch(self, chunks: list[SeqChunk], reqs: list[Request], carry: Carry | None,
                p_chunks: list[SeqChunk] | None = None, p_reqs: list[Request] | None = None,
                defer_draw: bool = False) -> _Launched:
        """Queue a step of decodes (and prompt chunks, `p_chunks` of `p_reqs`) and account for it at once: the
        next step is planned from where this one ends. `defer_draw`: queue its forward pass only; `_draw_deferred`
        queues the draw once the step before it has its tokens (a grammar's mask needs them)."""
        p_chunks, p_reqs = p_chunks or [], p_reqs or []
        p_sample = _sampled(p_chunks, p_reqs)
        plan = BatchPlan(decodes=tuple(chunks), prefills=tuple(p_chunks))
        forwarded, drawn = None, None
        if defer_draw:
            forwarded = self._forward(plan, carry, p_reqs)
        else:
            drawn = self._queue(plan, reqs + p_sample, carry, p_reqs)
        slots = []
        for r in reqs:
            self.decode.advance(r)
            if drawn is not None:  # a deferred draw's places come after it: it sees the tokens as a step alone would
                slots.append(r.append_pending())
        for c, r in zip(p_chunks, p_reqs):
            self.prefill.finish_chunk(r, c.num_tokens)
        return _Launched(reqs, slots, drawn, prefill_reqs=p_reqs, prefill_sample=p_sample, forwarded=forwarded)

    def _draw_deferred(self) -> None:
        """Queue the draw of the step in flight if it was deferred (its forward pass queued ahead of it); a failure
        ends its requests once the device has finished the forward pass (its pages may be reused at once)."""
        step = self._inflight
        if step is None or step.forwarded is None:
            return
        try:
            step.drawn = self.runner.draw(step.forwarded, step.reqs + step.prefill_sample)
        except Exception as e:
            self.runner.wait_for_stream()
            self._fail_in_flight([step], e)
            return
        step.forwarded = None
        step.slots = [r.append_pending() for r in step.reqs]

    def _start(self, chunks: list[SeqChunk], reqs: list[Request],
               p_chunks: list[SeqChunk] | None = None, p_reqs: list[Request] | None = None) -> None:
        """Queue a step (nothing running) as the one in flight."""
        try:
            self._inflight = self._launch(chunks, reqs, None, p_chunks, p_reqs)
        except Exception as e:
            log.exception("forward pass failed; failing its %d requests", len(reqs) + len(p_reqs or []))
            self._fail(reqs, p_reqs or [], e)

    def _step_ahead(self, queue_next: bool = True, with_prefill: bool = False) -> bool:
        """A step is running: queue the next one (unless not `queue_next`; with prompt chunks in the budget its
        decodes leave if `with_prefill`), then take the running one's tokens."""
        running = self._inflight
        assert running is not None
        self._inflight = None
        if not queue_next:
            self._collect(running)
            return True
        ends = {r for r, slot in zip(running.reqs, running.slots) if r.ends_by_length_at(slot + 1) or r.abort_requested}
        ahead = self.decode.schedule_ahead(ends)
        if ahead is not None:
            chunks, reqs = ahead
            p_chunks, p_reqs = (self.prefill.schedule(self.prefill.max_tokens - len(chunks), preempt=False)
                                if with_prefill else ([], []))
            if chunks or p_chunks:
                row = {r: i for i, r in enumerate(running.reqs)}
                src = [row[r] if c.token_ids[0] == PENDING_TOKEN else -1 for c, r in zip(chunks, reqs)]
                carry = Carry(running.drawn, src) if any(i >= 0 for i in src) else None  # None: nothing to take
                try:  # a grammar's mask and penalties need the running step's tokens: the draw waits for them
                    self._inflight = self._launch(chunks, reqs, carry, p_chunks, p_reqs, defer_draw=any(
                        r.grammar is not None or r.params.needs_penalties for r in reqs))
                    self.steps_queued_ahead += 1
                except Exception as e:  # take the running step's tokens first; its decodes retry one step at a
                    try:  # time, and its prompt chunks' requests end (`PrefillScheduler.schedule`)
                        self._collect(running)
                    finally:
                        self._fail([], p_reqs, e)
                    raise
        try:
            self._collect(running)
        finally:
            self._draw_deferred()
        return True

    def _collect(self, launched: _Launched) -> None:
        """Wait for `launched`, put its tokens in place and emit them; free what has ended."""
        following = self._inflight
        try:
            assert launched.drawn is not None, "a step is collected after its draw was queued"
            result = launched.drawn.result()
        except Exception as e:
            self._fail_in_flight([launched] + ([following] if following is not None else []), e)
            return
        for r in launched.retired:
            r.drop_pending()
            self.decode.kv.release(r)
        still_queued = set(following.reqs) if following is not None else set()
        deltas = []
        for req, slot, tok, lp, conflict in zip(launched.reqs, launched.slots, result.token_ids, result.logprobs,
                                                result.conflicts):
            if req in launched.retired:
                continue
            # a void token (`SampleResult.conflicts`) leaves its place pending, dropped with the request's pages
            reason = (FinishReason.ERROR if conflict is not None
                      else req.resolve_pending(slot, tok) or req.abort_requested)
            if reason is None:
                self.decode.kv.publish(req, slot)  # the KV this step wrote; the step queued after it still writes
            else:
                req.finish_reason = reason
                if req in still_queued:
                    self.decode.retire(req)
                    following.retired.add(req)  # type: ignore[union-attr]
                else:
                    req.drop_pending()
                    self.decode.remove(req)
            deltas.append(_token_delta(req, tok, lp, reason) if conflict is None else _conflict_delta(req, conflict))
        self.emit(deltas)
        if launched.prefill_sample:
            first = result.tail(len(launched.reqs))
            self._accept_tokens(launched.prefill_sample, first, [True] * len(launched.prefill_sample))

    def _requeue(self, preempted: list[Request]) -> None:
        for r in preempted:
            self.requeue(r)
        if preempted:
            self.wakeups["prefill"].set()


def _sampled(chunks: list[SeqChunk], reqs: list[Request]) -> list[Request]:
    return [r for c, r in zip(chunks, reqs) if c.sample]


def _token_delta(req: Request, tok: int, lp: TokenLogprobs | None, reason: FinishReason | None) -> TokenDelta:
    """The delta of one new token; the first of a request carries its prompt logprobs, when asked."""
    first = req.num_output_tokens == 1 and req.params.prompt_logprobs is not None
    return TokenDelta(req.request_id, (tok,), reason, (lp,) if lp is not None else (),
                      prompt_logprobs=tuple(req.prompt_logprobs) if first else (),
                      num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens,
                      ends_with_stop_token=reason == FinishReason.STOP and req.is_stop_token(tok))


def _conflict_delta(req: Request, conflict: str) -> TokenDelta:
    """The end of a request whose constraints left no token to draw: an error, no token."""
    return TokenDelta(req.request_id, (), FinishReason.ERROR, error=conflict, num_prompt_tokens=req.num_prompt_tokens,
                      num_cached_tokens=req.num_cached_tokens)


@dataclass
class _Launched:
    """A step queued on the device whose tokens have not reached the host yet: decodes, and in unified mode
    prompt chunks; the draw has the decodes' tokens, then the first tokens of the prompts it ends."""

    reqs: list[Request]  # the decodes
    slots: list[int]  # index of each decode's pending token in its token_ids (placed once its draw is queued)
    drawn: Drawn | None  # None while its draw is deferred (`forwarded` holds the forward pass)
    retired: set[Request] = field(default_factory=set)  # finished before this step ends: results dropped
    prefill_reqs: list[Request] = field(default_factory=list)  # every request it has a prompt chunk of
    prefill_sample: list[Request] = field(default_factory=list)  # those whose prompt it ends, in draw order
    forwarded: Forwarded | None = None


class PrefillWorker(Worker):
    """Prefills prompt chunks, oldest partial prompts first, then new ones.

    Overlapped (`overlap`): each iteration is scheduled, and its inputs and attention plan made, while the
    previous one runs, so the host's work between two iterations (scheduling, planning: the partition sat idle
    through it) hides behind the GPU. Its kernels are queued only once the previous iteration has ended and
    its first tokens are taken: at most one iteration is queued on the partition. Queueing a whole iteration
    ahead (hundreds of kernels) filled CUDA's launch queue: a launch then waited, inside the driver, for the
    GPU to drain, and the decode worker's launches waited with it (on the H200, 2026-12-06: 14 decode steps
    over 100 ms in the stall probe's offline arm, 1 with iterations one at a time). One iteration at most
    waits for its tokens (`_queued`); one that samples nothing is left in `unwaited`.
    """

    phase: Phase = "prefill"
    name = "prefill"
    overlap = True
    _queued: _QueuedPrefill | None = None  # the last iteration that samples, its first tokens not yet taken
    _on_device: tuple[Drawn, int] | None = None  # the last iteration queued, and its prompt tokens
    _unwaited_reqs: tuple[Request, ...] = ()  # the requests with a chunk in `unwaited`

    def step(self) -> bool:
        if self.unwaited is not None and self.prefill.may_release_pages() and not self._wait_unwaited():
            return True
        settled = self.unwaited is None  # nothing queued writes pages: this step may give them back (an abort or
        # a page shortage that came after the check waits for the next step)
        self._emit_aborted(self.prefill.take_aborted(running=settled))
        chunks, reqs = self.prefill.schedule(preempt=settled)
        previous, self._queued = self._queued, None
        untaken = [previous] if previous is not None else []
        if chunks:
            self._queued = self._start(chunks, reqs, untaken)
            if previous is not None and self._queued is not None:
                self.steps_queued_ahead += 1
        for queued in untaken:  # not taken before new kernels: no chunks, it failed, or the launch failed first
            self._take_first_tokens(queued)
        if not self.overlap:
            self.finish()
        return bool(chunks) or previous is not None

    def tokens_on_device(self) -> int:
        """Prompt tokens of the iteration queued on the device that has not ended there (0: none). The scheduler
        accounts for an iteration's chunks when it is queued (`PrefillScheduler.finish_chunk`), so a new prompt
        waits for these on top of what the scheduler counts ahead of it. Any thread may ask."""
        on_device = self._on_device
        return 0 if on_device is None or on_device[0].finished() else on_device[1]

    def finish(self) -> None:
        """Take the first tokens of the iteration still queued (the loop's end calls this too)."""
        queued, self._queued = self._queued, None
        if queued is not None:
            self._take_first_tokens(queued)

    def _start(self, chunks: list[SeqChunk], reqs: list[Request],
               untaken: list[_QueuedPrefill]) -> _QueuedPrefill | None:
        """Queue one iteration and account for its chunks at once (the next `schedule` plans from where they
        end); its kernels follow the end of the one before, whose first tokens (`untaken`) are taken then if it
        succeeded (`_settle`). None when it samples nothing (it stays in `unwaited`) or could not be queued (its
        requests end with an engine error)."""
        sample_reqs = _sampled(chunks, reqs)
        try:
            drawn = self._queue(BatchPlan(prefills=tuple(chunks)), sample_reqs, None, reqs,
                                lambda: self._settle(untaken))
        except Exception as e:
            self._fail_prefills(reqs, e)
            return None
        self.unwaited, self._unwaited_reqs = drawn, tuple(reqs)
        self._on_device = (drawn, sum(c.num_tokens for c in chunks))
        for c, r in zip(chunks, reqs):
            self.prefill.finish_chunk(r, c.num_tokens)
        return _QueuedPrefill(drawn, sample_reqs, reqs) if sample_reqs else None

    def _settle(self, untaken: list[_QueuedPrefill]) -> None:
        """Before an iteration's kernels: wait for the last queued iteration to end on the device, then take the
        first tokens of the one in `untaken` if it succeeded. A failed one stays in `untaken`: its requests end
        once the new iteration, which may compute the rest of one of them, is queued and accounted for."""
        if self.unwaited is not None:
            self.unwaited.wait()
        if not untaken:
            return
        try:
            result = untaken[0].drawn.result()
        except Exception:
            return
        self._accept_first_tokens(untaken.pop(), result)

    def _wait_unwaited(self) -> bool:
        """Wait for the last queued iteration: its chunks may still write pages that this step gives back (to
        decode). False if it failed on the device; its requests, and those of the iteration whose first tokens
        are still to be taken, then end with an engine error."""
        drawn, self.unwaited = self.unwaited, None
        assert drawn is not None
        try:
            drawn.result()
        except Exception as e:
            queued, self._queued = self._queued, None
            reqs = [*self._unwaited_reqs, *(queued.reqs if queued is not None else [])]
            self._fail_prefills([r for r in dict.fromkeys(reqs) if not r.finished], e)
            return False
        return True

    def _take_first_tokens(self, queued: _QueuedPrefill) -> None:
        """Wait for `queued`'s draw; hand its prompts' first tokens over (or fail its requests)."""
        try:
            result = queued.drawn.result()
        except Exception as e:
            self._fail_prefills([r for r in queued.reqs if not r.finished], e)
            return
        self._accept_first_tokens(queued, result)

    def _accept_first_tokens(self, queued: _QueuedPrefill, result: SampleResult) -> None:
        if self.unwaited is queued.drawn:
            self.unwaited = None
        self._accept_tokens(queued.sample_reqs, result, [True] * len(queued.sample_reqs))

    def _fail_prefills(self, reqs: list[Request], error: Exception) -> None:
        """End `reqs` with an engine error once the queued iterations, which may still write their pages, ran."""
        log.exception("forward pass failed; failing its %d requests", len(reqs))
        if self.unwaited is not None:
            self.unwaited.wait()
            self.unwaited = None
        self._fail([], reqs, error)


@dataclass
class _QueuedPrefill:
    """A prefill iteration queued on the device whose first tokens have not reached the host yet."""

    drawn: Drawn
    sample_reqs: list[Request]  # the requests whose prompt it ends, in draw order
    reqs: list[Request]  # every request it has a chunk of


class DecodeWorker(Worker):
    """Decodes one token per running request per iteration (overlapped: see `Worker`). With a `pacer`, each
    step starts only when the pacer lets it (`StepPacer`: while prefill has work, at most one per pace)."""

    phase: Phase = "decode"
    name = "decode"
    overlap = True
    pacer: StepPacer | None = None

    def pace(self, ms: float | None) -> None:
        """Start at most one step per `ms` while prefill has work (None: steps back to back). Between iterations
        or before the loop starts."""
        self.pacer = StepPacer(ms / 1000, self.prefill.has_work, self.stop_event.wait) if ms else None

    def step(self) -> bool:
        if self.pacer is not None and (self._inflight is not None or self.decode.num_running):
            self.pacer.wait()
        if self._inflight is not None:
            return self._step_ahead()
        self._emit_aborted(self.decode.take_aborted())
        chunks, reqs, preempted = self.decode.schedule()
        self._requeue(preempted)
        if not chunks:
            return bool(preempted)
        if self.overlap:
            self._start(chunks, reqs)
            return True
        result = self._run(BatchPlan(decodes=tuple(chunks)), reqs, reqs, [])
        if result is None:
            return True
        for r in reqs:
            self.decode.finish_step(r)
        self._accept_tokens(reqs, result, [False] * len(reqs))
        return True


class UnifiedWorker(Worker):
    """One batch per iteration: every running decode plus prefill chunks in the leftover budget.

    Overlapped (`overlap`), mixed batches too: the next batch is queued while the current one runs (see `Worker`);
    a prompt that the current batch ends joins the decodes in the batch after the next. A step that may give pages
    back (an aborted prefill, or too few free pages: scheduling could preempt) waits for the running one first.
    All steps run on one stream, in order.
    """

    phase: Phase = "prefill"
    name = "unified"
    overlap = True

    def step(self) -> bool:
        if self._inflight is not None:
            if self.prefill.may_release_pages():
                return self._step_ahead(queue_next=False)
            # only waiting requests are taken here (none has pages): a running one aborted since the check waits
            self._emit_aborted(self.prefill.take_aborted(running=False))
            return self._step_ahead(with_prefill=True)
        self._emit_aborted(self.prefill.take_aborted() + self.decode.take_aborted())
        d_chunks, d_reqs, preempted = self.decode.schedule()
        self._requeue(preempted)
        p_chunks, p_reqs = self.prefill.schedule(self.prefill.max_tokens - len(d_chunks))
        if not d_chunks and not p_chunks:
            return bool(preempted)
        if self.overlap:
            self._start(d_chunks, d_reqs, p_chunks, p_reqs)
            return True
        p_sample = _sampled(p_chunks, p_reqs)
        plan = BatchPlan(decodes=tuple(d_chunks), prefills=tuple(p_chunks))
        result = self._run(plan, d_reqs + p_sample, d_reqs, p_reqs)
        if result is None:
            return True
        for r in d_reqs:
            self.decode.finish_step(r)
        for c, r in zip(p_chunks, p_reqs):
            self.prefill.finish_chunk(r, c.num_tokens)
        self._accept_tokens(d_reqs + p_sample, result, [False] * len(d_reqs) + [True] * len(p_sample))
        return True

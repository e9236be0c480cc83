"""Randomized workloads through a real engine (the tiny model on CPU), stepped by hand.

Hypothesis draws an engine (unified or semi-PD, overlapped decode and prefill on or off, a small KV pool so that
requests are preempted, a small token budget so that prompts are chunked, now and then steps that fail) and a
handful of requests: prompts that share prefixes or continue an earlier request's output (prefix-cache hits), some
with a `cache_salt`, varied `max_tokens`, `n` > 1, priorities, greedy and seeded sampling, penalties, logprobs,
prompt logprobs, logit bias, allowed tokens and structured outputs, stop token ids and stop strings (the front end's
`OutputStream` finds those and aborts, as `LLM` does), arrivals, aborts and prefix-cache resets at random steps.

The workers' `step` is called by hand from this thread, in a drawn order, so every run is deterministic (no threads,
no sleeps). What other threads do lands between steps or at `Harness.hook` points inside them (allocator calls,
reads of a request's abort flag, emits): an abort, a reset, or, in semi-PD, the other worker's whole step.

After every step: the allocator's integrity holds, each page's refcount is the number of requests that hold it, and
no step touches a page that another worker's queued step still writes (on a GPU the workers run on streams of their
own: `StreamModel`). At the end every request has ended once with a valid reason, every page is free (or cached and
evictable), and each request's output is what it is alone on a roomy engine (cut short where it was aborted or a
step of it failed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.config import CacheConfig, EngineConfig, SchedulerConfig
from actors.engine.core import EngineCore
from actors.engine.frontend import CompletionOutput, OutputStream, Tokenizer
from actors.engine.workers import Worker, _token_delta
from actors.kv.manager import pages_for
from actors.request import FinishReason, Request, SamplingParams, StructuredOutputsParams, TokenDelta
from actors.runner.model_runner import ModelRunner
from actors.scheduler.plan import BatchPlan

PAGE = 4
MAX_TOKENS = 10  # the most any request asks for; the reference runs generate this many
MAX_TICKS = 400  # a workload that has not ended by then hangs
SETTLE_TICKS = 20  # steps after the last request ended for the workers to give back what their queued steps hold

pytestmark = pytest.mark.timeout(300)


# -- the workload ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload (`n` children, as the OpenAI server makes them: seeds offset by the index)."""

    prompt: tuple[int, ...]
    max_tokens: int
    follows: tuple[int, int] | None = None  # (i, k): the prompt starts with request i's and its first k output tokens
    n: int = 1
    priority: int = 0
    temperature: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = True
    stop_token_picks: tuple[int, ...] = ()  # positions in the free-running output whose tokens become stop ids
    stop_string_pick: tuple[int, int] | None = None  # (start, length) in the free-running output's text
    cache_salt: str | None = None
    penalties: bool = False  # repetition, presence and frequency penalties (overlapped steps draw once known)
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # its prompt is computed whole (no prefix-cache hits), scored once
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    structured: str | None = None  # a regex the output must match (with allowed_token_ids it may conflict: error)
    arrive_at: int = 0  # tick at which it is added, unless ...
    arrive_after: tuple[int, int] | None = None  # ... (i, j): once request i's first child has j tokens out, or ended
    abort_after: int | None = None  # ticks after its arrival at which an abort lands ...
    abort_within: int | None = None  # ... between steps, or inside that tick's steps at this `Harness.hook` call


@dataclass(frozen=True)
class EngineSpec:
    mode: str
    overlap_decode: bool
    overlap_prefill: bool
    pool_share: float  # the pool holds this share of the pages all requests need at once (at least the largest's)
    max_prefill_tokens: int
    max_decode_seqs: int
    decode_reserve_pages: int = 0
    prefix_caching: bool = True
    faults: tuple[tuple[int, str], ...] = ()  # (launch number, how): that step fails (`StreamModel`)


@dataclass(frozen=True)
class Workload:
    engine: EngineSpec
    requests: tuple[RequestSpec, ...]
    interleaving: tuple[str, ...]  # semi-PD: which workers step at each tick ("P", "D", "PD", "DP"), cycled
    eager_frontend: bool  # stop strings found (and their aborts sent) inside the step that emitted the token
    resets: tuple[tuple[int, int | None], ...] = ()  # (tick, hook call or None) of `reset_prefix_cache` calls
    # semi-PD: (tick, hook call) at which the other worker runs a whole step inside the one being stepped (its thread
    # took the interpreter lock there), where no scheduler lock is held
    nested: tuple[tuple[int, int], ...] = ()


REGEXES = ("[a-z]{1,6}", "(yes|no)", "[0-9a-f ]+")
FAULTS = ("sample", "forward", "draw", "launch")  # `StreamModel`


def tokens(max_size: int, min_size: int = 0) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(0, 255), min_size=min_size, max_size=max_size).map(tuple)


def token_set(max_size: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(0, 255), min_size=1, max_size=max_size, unique=True).map(tuple)


@st.composite
def request_specs(draw: Any, prefixes: tuple[tuple[int, ...], ...]) -> RequestSpec:
    prefix = draw(st.sampled_from(prefixes))
    prompt = prefix[: draw(st.integers(0, len(prefix)))] + draw(tokens(draw(st.sampled_from((8, 16, 40))), min_size=1))
    seeded = draw(st.booleans())
    stops = draw(st.lists(st.integers(0, MAX_TOKENS - 1), max_size=2).map(tuple))
    extras = draw(st.sampled_from((False, False, True)))  # the sampler's other options, now and then
    return RequestSpec(
        prompt=prompt,
        max_tokens=draw(st.sampled_from((1, 3, 6, MAX_TOKENS, MAX_TOKENS))),
        n=draw(st.sampled_from((1, 1, 2, 3))),
        priority=draw(st.integers(0, 2)),
        temperature=0.8 if seeded else 0.0,
        seed=draw(st.integers(0, 1000)) if seeded else None,
        min_tokens=0 if seeded or stops else draw(st.sampled_from((0, 0, 2))),
        ignore_eos=draw(st.booleans()),
        stop_token_picks=stops,
        stop_string_pick=draw(st.none() | st.tuples(st.integers(0, 12), st.integers(1, 3))),
        cache_salt=draw(st.sampled_from((None, None, "a", "b"))),
        penalties=extras and draw(st.booleans()),
        logprobs=draw(st.sampled_from((None, 0, 2))) if extras else None,
        prompt_logprobs=draw(st.sampled_from((None, 0, 1))) if extras else None,
        logit_bias=draw(st.lists(st.tuples(st.integers(0, 255), st.sampled_from((-100.0, 3.0, 100.0))), max_size=2,
                                 unique_by=lambda pair: pair[0]).map(tuple)) if extras else (),
        allowed_token_ids=draw(st.none() | token_set(4)) if extras else None,
        structured=draw(st.none() | st.sampled_from(REGEXES)) if extras else None,
        arrive_at=draw(st.sampled_from((0, 0, 0, 1, 3, 8))),
        abort_after=draw(st.none() | st.none() | st.integers(0, 12)),
        abort_within=draw(st.none() | st.integers(0, 40)),
    )


@st.composite
def workloads(draw: Any) -> Workload:
    prefixes = tuple(draw(st.lists(tokens(12, min_size=4), min_size=1, max_size=2)))
    mode = draw(st.sampled_from(("semi-pd", "unified")))
    engine = EngineSpec(
        mode=mode,
        overlap_decode=draw(st.booleans()),
        overlap_prefill=draw(st.booleans()),
        pool_share=draw(st.sampled_from((0.0, 0.3, 0.3, 0.5, 0.7, 1.0, 2.0))),
        max_prefill_tokens=draw(st.sampled_from((2, 3, 5, 8, 13, 24))),
        max_decode_seqs=draw(st.integers(1, 4)),
        decode_reserve_pages=draw(st.sampled_from((0, 0, 1))),
        prefix_caching=draw(st.sampled_from((True, True, True, False))),
        faults=draw(st.one_of(st.just(()), st.lists(
            st.tuples(st.integers(1, 20), st.sampled_from(FAULTS)), min_size=1, max_size=3).map(tuple))),
    )
    requests = draw(st.lists(request_specs(prefixes), min_size=2, max_size=6))
    for i in range(1, len(requests)):  # a follow-up turn: hits on the pages its predecessor's decode published
        if draw(st.booleans()):
            first, k = draw(st.integers(0, i - 1)), draw(st.integers(1, MAX_TOKENS))
            arrival = (first, max(0, k + draw(st.integers(-2, 1)))) if draw(st.integers(0, 3)) else None
            requests[i] = replace(requests[i], follows=(first, k), arrive_after=arrival)
    return Workload(
        engine=engine,
        requests=tuple(requests),
        interleaving=tuple(draw(st.lists(st.sampled_from(("PD", "DP", "P", "D")), min_size=1, max_size=4).filter(
            lambda order: {"P", "D"} <= set("".join(order))))) if mode == "semi-pd" else ("U",),
        eager_frontend=draw(st.booleans()),
        resets=tuple(draw(st.lists(st.tuples(st.integers(0, 30), st.none() | st.integers(0, 40)), max_size=2))),
        nested=tuple(draw(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30)), max_size=8)))
        if mode == "semi-pd" else (),
    )


# -- the reference: each request alone on a roomy engine -------------------------------------------------------------


@dataclass(frozen=True)
class FreeRun:
    """A request's output alone, with no stop condition but EOS: its tokens (each token's logprobs where asked), its
    prompt's logprobs where asked, and the error that ended it, if its constraints left no token to draw."""

    token_ids: tuple[int, ...]
    logprobs: tuple[Any, ...]
    prompt_logprobs: tuple[Any, ...]
    error: str | None


class Reference:
    """Requests run one at a time on a unified engine without prefix caching or overlap, with room for all: what a
    request generates alone on a fresh engine."""

    def __init__(self, model: Path, tokenizer: Tokenizer) -> None:
        config = EngineConfig(model=str(model), mode="unified", overlap_decode=False,
                              cache=CacheConfig(page_size=PAGE, num_pages=64, enable_prefix_caching=False),
                              scheduler=SchedulerConfig(max_prefill_tokens=64),
                              tokenizer_eos_token_id=tokenizer.eos_token_id)
        self.deltas: list[TokenDelta] = []
        self.core = EngineCore(config, emit=self.deltas.extend)
        self.tokenizer = tokenizer
        self._runs: dict[tuple[tuple[int, ...], SamplingParams], FreeRun] = {}

    def free_run(self, prompt: tuple[int, ...], params: SamplingParams) -> FreeRun:
        """`prompt` alone under `params` without its stop strings, stop ids (unless `min_tokens` masks them) and
        length limit: MAX_TOKENS tokens, or fewer when EOS or an error ended it."""
        free = replace(params, max_tokens=MAX_TOKENS, stop=(), cache_salt=None,
                       stop_token_ids=params.stop_token_ids if params.min_tokens else ())
        key = (prompt, free)
        if key not in self._runs:
            self.deltas.clear()
            self.core.add_request("alone", list(prompt), free)
            for _ in range(4 * MAX_TOKENS + len(prompt)):
                if self.core.num_unfinished == 0:
                    break
                self.core.workers[0].step()
            assert self.core.num_unfinished == 0, "the reference run did not end"
            self._runs[key] = FreeRun(tuple(t for d in self.deltas for t in d.new_token_ids),
                                      tuple(lp for d in self.deltas for lp in d.logprobs),
                                      tuple(lp for d in self.deltas for lp in d.prompt_logprobs),
                                      next((d.error for d in self.deltas if d.error), None))
        return self._runs[key]

    def expected(self, prompt: tuple[int, ...], params: SamplingParams) -> CompletionOutput:
        """What the front end shows for the request alone: its free run, ended as the engine and the front end end
        it (EOS, stop ids, max_tokens, stop strings, a conflict of its constraints)."""
        req = Request("alone", list(prompt), len(prompt), params, eos_token_ids=self.core.arch.eos_token_ids,
                      grammar=self.grammar(params))
        stream = OutputStream("alone", prompt, params, self.tokenizer)
        out = CompletionOutput("alone", list(prompt))
        run = self.free_run(prompt, params)
        for tok in run.token_ids:
            reason = req.append_token(tok)
            chunk, _ = stream.process(_token_delta(req, tok, None, reason))
            out.add(chunk)
            if stream.done:
                return out
        assert run.error is not None, f"the free run of {prompt} ended without a finish reason"
        out.add(stream.process(TokenDelta("alone", (), FinishReason.ERROR, error=run.error))[0])
        return out

    def grammar(self, params: SamplingParams) -> Any:
        spec = params.structured_outputs
        return None if spec is None else self.core.grammars.compile(spec)

    def resolve(self, specs: tuple[RequestSpec, ...]) -> list[RequestSpec]:
        """`specs` with the prompts of follow-up turns in full: their predecessor's prompt, the first tokens of its
        (first child's) output alone, then their own."""
        resolved: list[RequestSpec] = []
        for spec in specs:
            if spec.follows is not None:
                first, k = resolved[spec.follows[0]], spec.follows[1]
                before = first.prompt + self.free_run(first.prompt, self.params_of(first, 0)).token_ids[:k]
                spec = replace(spec, prompt=before + spec.prompt, follows=None)
            resolved.append(spec)
        return resolved

    def params_of(self, spec: RequestSpec, child: int) -> SamplingParams:
        """The request's sampling parameters: stop ids and the stop string picked from its free run."""
        seed = None if spec.seed is None else spec.seed + child
        base = SamplingParams(
            max_tokens=spec.max_tokens, temperature=spec.temperature, seed=seed,
            min_tokens=min(spec.min_tokens, spec.max_tokens), ignore_eos=spec.ignore_eos, cache_salt=spec.cache_salt,
            repetition_penalty=1.3 if spec.penalties else 1.0, presence_penalty=0.5 if spec.penalties else 0.0,
            frequency_penalty=0.4 if spec.penalties else 0.0, logprobs=spec.logprobs,
            prompt_logprobs=spec.prompt_logprobs, logit_bias=spec.logit_bias,
            allowed_token_ids=spec.allowed_token_ids,
            structured_outputs=None if spec.structured is None else StructuredOutputsParams(regex=spec.structured))
        free = self.free_run(spec.prompt, base).token_ids
        stop_ids = tuple(dict.fromkeys(free[i] for i in spec.stop_token_picks if i < len(free)))
        stop: tuple[str, ...] = ()
        if spec.stop_string_pick is not None:
            text = self.tokenizer.decode(free)
            start, length = spec.stop_string_pick
            if text[start : start + length]:
                stop = (text[start : start + length],)
        return replace(base, stop_token_ids=stop_ids, stop=stop)


# -- a model of the workers' streams ---------------------------------------------------------------------------------


@dataclass
class QueuedStep:
    seq: int  # launch number
    reads: set[int]  # pages
    writes: set[int]


class InjectedFault(RuntimeError):
    """A step's failure made by the test (not a CUDA error: the device stays usable)."""


class StreamModel:
    """What each runner has queued and not yet waited for, as on a GPU, where every runner has a stream of its own.

    On CPU a step runs at launch; on a GPU it runs later, in its stream's order, and is known to have run once a draw
    queued at or after it is waited for (`Drawn.result`, `Drawn.wait`) or the stream is synchronized
    (`wait_for_stream`). Until then no other stream may read or write a page it writes, nor write a page it reads
    (checked at each launch); and with more than one stream, no page it writes may go back to the allocator (the
    other worker could take it at once: checked at each free).

    `faults` make steps fail, by launch number from 1: "launch" before anything is queued, "forward" inside its
    forward pass, "sample" inside its draw once the forward pass is queued (the sampler ran out of memory, say),
    "draw" at every wait for its tokens (a failure on the device that leaves it usable)."""

    def __init__(self, core: EngineCore, faults: tuple[tuple[int, str], ...] = ()) -> None:
        self.runners: list[ModelRunner] = [w.runner for w in core.workers]
        self.queued: dict[int, list[QueuedStep]] = {i: [] for i in range(len(self.runners))}
        self.seq = 0
        self.faults = dict(faults)
        self.failed = 0  # injected failures that happened
        self.violations: list[str] = []
        for i, runner in enumerate(self.runners):
            self._wrap(i, runner)
        self._wrap_allocator(core)

    def _fail(self, what: str) -> None:
        self.failed += 1
        raise InjectedFault(f"injected failure: {what}")

    def _wrap(self, index: int, runner: ModelRunner) -> None:
        forward, draw, wait = runner.forward, runner.draw, runner.wait_for_stream
        steps: dict[int, QueuedStep] = {}

        def queued_forward(plan: BatchPlan, carry: Any = None, before_kernels: Any = None) -> Any:
            if self.faults.get(self.seq + 1) == "launch":
                self.seq += 1
                self._fail(f"launch {self.seq}")
            step = self._queue(index, plan)
            with failing_inside(runner.attention, "plan", self.faults.get(step.seq) == "forward",
                                lambda *_: self._fail(f"forward pass of step {step.seq}")):
                forwarded = forward(plan, carry, before_kernels)
            steps[id(forwarded)] = step
            return forwarded

        def queued_draw(forwarded: Any, sample_reqs: list[Request]) -> Any:
            step = steps.pop(id(forwarded))
            with failing_inside(runner.sampler, "draw", self.faults.get(step.seq) == "sample",
                                lambda *_: self._fail(f"draw of step {step.seq}")):
                drawn = draw(forwarded, sample_reqs)
            result, end = drawn.result, drawn.wait

            def waited() -> Any:
                self._ran(index, step.seq)
                if self.faults.get(step.seq) == "draw":
                    self._fail(f"step {step.seq} on the device")
                return result()

            def ended() -> None:
                self._ran(index, step.seq)
                end()

            drawn.result, drawn.wait = waited, ended
            return drawn

        def synchronized() -> None:
            self._ran(index, self.seq)
            wait()

        runner.forward = queued_forward  # type: ignore[method-assign]
        runner.draw = queued_draw  # type: ignore[method-assign]
        runner.wait_for_stream = synchronized  # type: ignore[method-assign]

    def _wrap_allocator(self, core: EngineCore) -> None:
        alloc = core.allocator
        free, cache = alloc.free, alloc.cache
        matching = next(i for i, w in enumerate(core.workers) if w.phase == "prefill")  # the one that matches prefixes

        def checked_free(blocks: Any) -> None:
            blocks = list(blocks)
            if len(self.runners) > 1:
                drops = Counter(blocks)
                released = {b for b, k in drops.items() if alloc.refcount(b) == k}
                if released & self.written():
                    self.violations.append(f"pages {sorted(released & self.written())} freed while a queued step "
                                           "writes them")
            free(blocks)

        def checked_cache(block: int, h: int, pending: bool = False) -> None:
            if block in self.written(but=matching):
                self.violations.append(f"page {block} offered to the prefix cache while another stream's queued step "
                                       "writes it")
            cache(block, h, pending)

        alloc.free = checked_free  # type: ignore[method-assign]
        alloc.cache = checked_cache  # type: ignore[method-assign]

    def written(self, but: int | None = None) -> set[int]:
        """The pages that queued steps write (of runners other than `but`)."""
        return {b for i, steps in self.queued.items() if i != but for s in steps for b in s.writes}

    def _queue(self, index: int, plan: BatchPlan) -> QueuedStep:
        reads: set[int] = set()
        writes: set[int] = set()
        for c in plan.chunks:
            reads.update(c.block_ids[: pages_for(c.context_len, PAGE)])
            writes.update(c.block_ids[p // PAGE] for p in range(c.start, c.context_len))
        for other, steps in self.queued.items():
            if other == index:
                continue
            for s in steps:
                if (reads | writes) & s.writes or writes & s.reads:
                    self.violations.append(
                        f"runner {index} launched a step on pages {sorted((reads | writes) & s.writes)} written and "
                        f"{sorted(writes & s.reads)} read by runner {other}'s queued step")
        self.seq += 1
        step = QueuedStep(self.seq, reads, writes)
        self.queued[index].append(step)
        return step

    def _ran(self, index: int, seq: int) -> None:
        self.queued[index] = [s for s in self.queued[index] if s.seq > seq]

    @property
    def idle(self) -> bool:
        return not any(self.queued.values())


# -- driving an engine -----------------------------------------------------------------------------------------------


@dataclass
class Child:
    """One engine request of a workload, and what the front end made of its deltas."""

    rid: str
    spec: RequestSpec
    params: SamplingParams
    stream: OutputStream
    output: CompletionOutput
    request: Request | None = None
    deltas: list[TokenDelta] = field(default_factory=list)
    aborted: bool = False
    arrived_at: int | None = None  # the tick


class Harness:
    """An engine of a workload's `EngineSpec`, its requests, and the checks run after every step."""

    def __init__(self, model: Path, reference: Reference, workload: Workload) -> None:
        spec = workload.engine
        self.workload = workload
        self.reference = reference
        self.children: dict[str, Child] = {}
        self.requests = reference.resolve(workload.requests)
        for i, r in enumerate(self.requests):
            for j in range(r.n):
                rid = f"r{i}-{j}"
                params = reference.params_of(r, j)
                self.children[rid] = Child(rid, r, params, OutputStream(rid, r.prompt, params, reference.tokenizer),
                                           CompletionOutput(rid, list(r.prompt)))
        needs = [pages_for(len(r.prompt) + r.max_tokens - 1, PAGE) for r in self.requests for _ in range(r.n)]
        config = EngineConfig(
            model=str(model), mode=spec.mode, overlap_decode=spec.overlap_decode,
            overlap_prefill=spec.overlap_prefill, tokenizer_eos_token_id=reference.tokenizer.eos_token_id,
            cache=CacheConfig(page_size=PAGE, num_pages=max(2, *needs, int(spec.pool_share * sum(needs))),
                              enable_prefix_caching=spec.prefix_caching),
            scheduler=SchedulerConfig(max_prefill_tokens=spec.max_prefill_tokens,
                                      max_decode_seqs=spec.max_decode_seqs,
                                      decode_reserve_pages=spec.decode_reserve_pages))
        self.pending: list[TokenDelta] = []
        self.core = EngineCore(config, emit=self._emit)
        self.streams = StreamModel(self.core, spec.faults)
        self.tick = 0
        # (hook call, action) of the tick being stepped; an action that cannot run yet returns False
        self._due: list[tuple[int, Callable[[], bool | None]]] = []
        self._calls = 0
        self._stepping_worker: Worker | None = None
        self.nested_steps = 0
        self._stepping = False
        self._hook_allocator()

    # -- the front end

    def _emit(self, deltas: list[TokenDelta]) -> None:
        self.hook()
        self.pending.extend(deltas)
        if self.workload.eager_frontend:
            self._deliver()

    def _deliver(self) -> None:
        """What `LLM` does with the engine's deltas: one stream per request; a stop string aborts the request."""
        pending, self.pending = self.pending, []
        for d in pending:
            child = self.children[d.request_id]
            assert not any(prev.finished for prev in child.deltas), f"{d.request_id}: a delta after its final one"
            child.deltas.append(d)
            if child.stream.done:
                continue
            chunk, stopped = child.stream.process(d)
            child.output.add(chunk)
            if stopped:
                self.core.abort(d.request_id, FinishReason.STOP)
        self._arrivals_after_output()

    # -- stepping

    def _arrivals(self) -> None:
        for child in self.children.values():
            if child.request is None and child.spec.arrive_after is None and child.spec.arrive_at == self.tick:
                self._add(child)

    def _arrivals_after_output(self) -> None:
        for child in self.children.values():
            after = child.spec.arrive_after
            if child.request is None and after is not None:
                first = self.children[f"r{after[0]}-0"]
                if len(first.output.token_ids) >= after[1] or first.stream.done:
                    self._add(child)

    def _add(self, child: Child) -> None:
        self.core.add_request(child.rid, list(child.spec.prompt), child.params, priority=child.spec.priority)
        child.request = self.core._requests[child.rid]
        child.arrived_at = self.tick + self._stepping  # one that arrives inside a step counts from the next tick

    def _abort(self, child: Child) -> None:
        child.aborted = self.core.abort(child.rid) or child.aborted

    def _events(self) -> list[tuple[int | None, Callable[[], bool | None]]]:
        """This tick's aborts, prefix-cache resets and nested steps: (the hook call inside its steps at which each
        lands, or None for before them, action)."""
        events: list[tuple[int | None, Callable[[], bool | None]]] = []
        for child in self.children.values():
            spec = child.spec
            if spec.abort_after is not None and child.arrived_at is not None and \
                    child.arrived_at + spec.abort_after == self.tick:
                events.append((spec.abort_within, lambda child=child: self._abort(child)))
        reset = self.core.allocator.reset_prefix_cache
        events += [(within, reset) for tick, within in self.workload.resets if tick == self.tick]
        events += [(within, self._nested_step) for tick, within in self.workload.nested if tick == self.tick]
        return events

    def _nested_step(self) -> bool:
        """The other worker's step, inside the one being stepped; False (not now) while a scheduler lock is held (the
        other thread would wait for it) or outside a worker's step."""
        current, core = self._stepping_worker, self.core
        if current is None or core.prefill._lock.locked() or core.decode._inbox_lock.locked():
            return False
        (other,) = [w for w in core.workers if w is not current]
        self._stepping_worker = None  # no step inside this one
        self.nested_steps += 1
        try:
            self._step_worker(other)
        finally:
            self._stepping_worker = current
        return True

    def hook(self) -> None:
        """A point inside a step where another thread (the front end's, a server's, the other worker's) may act: the
        events due by then land here."""
        if not self._due:
            return
        self._calls += 1
        due = [(at, action) for at, action in self._due if at < self._calls]
        self._due = [(at, action) for at, action in self._due if at >= self._calls]
        for at, action in due:
            if action() is False:
                self._due.append((at, action))

    def _hook_allocator(self) -> None:
        alloc = self.core.allocator
        for name in ("allocate", "free", "share", "match_prefix", "cache", "settle", "withdraw"):
            method = getattr(alloc, name)

            def hooked(*args: Any, _method: Callable[..., Any] = method) -> Any:
                self.hook()
                try:
                    return _method(*args)
                finally:
                    self.hook()

            setattr(alloc, name, hooked)

    def step(self) -> None:
        self._arrivals()
        self._arrivals_after_output()
        events = self._events()
        for _, action in (e for e in events if e[0] is None):
            action()
        self._due, self._calls = [(at, action) for at, action in events if at is not None], 0
        order = self.workload.interleaving[self.tick % len(self.workload.interleaving)]
        workers: dict[str, Worker] = {w.name[0].upper(): w for w in self.core.workers}
        self._stepping = True
        for name in order:
            self._stepping_worker = workers[name]
            self._step_worker(workers[name])
            self._stepping_worker = None
            self._deliver()
            self.check()
        self._stepping = False
        due, self._due = self._due, []
        for _, action in due:  # fewer hook calls than asked for: after the steps (a nested step then does not run)
            action()
        self.tick += 1

    def _step_worker(self, worker: Worker) -> None:
        try:
            worker.step()
        except InjectedFault as e:  # what escapes an iteration: the worker's loop logs it and goes on
            worker._check_device(e)

    def run(self) -> None:
        with abort_flags_hooked(self.hook):
            last_event = max([c.spec.arrive_at for c in self.children.values()]
                             + [tick for tick, _ in self.workload.resets])
            while self.tick <= last_event or not self._all_ended() or self._aborts_to_come():
                assert self.tick < MAX_TICKS, f"not done after {MAX_TICKS} ticks: {self._unfinished()}"
                self.step()
            for _ in range(SETTLE_TICKS):
                if self.streams.idle:
                    break
                self.step()

    def _aborts_to_come(self) -> bool:
        return any(c.spec.abort_after is not None and c.arrived_at is not None
                   and c.arrived_at + c.spec.abort_after >= self.tick for c in self.children.values())

    def _all_ended(self) -> bool:
        return all(any(d.finished for d in c.deltas) for c in self.children.values())

    def _unfinished(self) -> list[str]:
        return [c.rid for c in self.children.values() if not any(d.finished for d in c.deltas)]

    # -- checks

    def check(self) -> None:
        """After every worker step: no stream hazard, the allocator whole, each page held by as many requests as its
        refcount says."""
        assert not self.streams.violations, self.streams.violations
        alloc = self.core.allocator
        alloc.check_integrity()
        holders: Counter[int] = Counter()
        for child in self.children.values():
            if child.request is not None:
                blocks = child.request.block_ids
                assert len(set(blocks)) == len(blocks), f"{child.rid} holds a page twice: {blocks}"
                holders.update(blocks)
        wrong = {b: (alloc.refcount(b), holders[b]) for b in range(alloc.num_blocks) if alloc.refcount(b) != holders[b]}
        assert not wrong, f"page: (refcount, requests holding it): {wrong}"

    def check_end(self) -> None:
        core, alloc = self.core, self.core.allocator
        # one stream runs its steps in order: a chunk of an aborted prompt may stay queued there, unwaited for
        assert self.streams.idle or len(self.streams.runners) == 1, "a queued step was never waited for"
        assert core.num_unfinished == 0 and not core.prefill.has_work() and not core.decode.has_work()
        alloc.check_integrity()
        assert alloc.num_free == alloc.num_blocks, f"{alloc.num_blocks - alloc.num_free} pages never came back"
        for child in self.children.values():
            self._check_child(child)

    def _check_child(self, child: Child) -> None:
        finals = [d for d in child.deltas if d.finished]
        assert len(finals) == 1 and finals[0] is child.deltas[-1], f"{child.rid}: final deltas {finals}"
        assert child.stream.done and child.request is not None and not child.request.block_ids
        expected = self.reference.expected(child.spec.prompt, child.params)
        got = child.output
        shown = (got.token_ids, got.text, got.finish_reason, got.stop_reason, got.error)
        want = (expected.token_ids, expected.text, expected.finish_reason, expected.stop_reason, expected.error)
        if got.finish_reason == FinishReason.ABORT.value:
            assert child.aborted, f"{child.rid} ended with abort, never asked"
        # an abort may also end it at a stop string: the text held back (an incomplete character) is shown at the end
        cut_short = child.aborted or "injected" in (got.error or "")
        if cut_short and shown != want:
            assert got.token_ids == expected.token_ids[: len(got.token_ids)], f"{child.rid}: {shown} vs {want}"
            assert len(got.token_ids) < len(expected.token_ids) or expected.finish_reason == "error", \
                f"{child.rid}: cut short after its last token: {shown} vs {want}"
        else:
            assert shown == want, f"{child.rid} differs from the request alone: {shown} vs {want}"
        self._check_logprobs(child)
        self._check_cached(child)

    def _check_logprobs(self, child: Child) -> None:
        """Each token's logprobs, and the prompt's with the first token, as the request's alone."""
        got, params = child.output, child.params
        run = self.reference.free_run(child.spec.prompt, params)
        if params.logprobs is not None:
            assert [lp.token_id for lp in got.logprobs] == got.token_ids
            assert [lp.logprob for lp in got.logprobs] == pytest.approx(
                [lp.logprob for lp in run.logprobs[: len(got.token_ids)]], abs=1e-3)
        if params.prompt_logprobs is not None and got.token_ids:
            assert [lp.token_id for lp in got.prompt_logprobs] == list(child.spec.prompt[1:])
            assert [lp.logprob for lp in got.prompt_logprobs] == pytest.approx(
                [lp.logprob for lp in run.prompt_logprobs], abs=1e-3)

    def _check_cached(self, child: Child) -> None:
        """Prefix-cache hits are whole pages of prompt (never its last token), only with caching on, and only of
        tokens that a request of the same salt had."""
        cached = max(d.num_cached_tokens for d in child.deltas)
        prompt = child.spec.prompt
        assert cached % PAGE == 0 and cached < len(prompt)
        if not self.workload.engine.prefix_caching:
            assert cached == 0
            return
        known = [list(c.spec.prompt) + c.output.token_ids for c in self.children.values()
                 if c is not child and c.spec.cache_salt == child.spec.cache_salt]
        assert cached <= max((common_prefix(prompt, k) for k in known), default=0), \
            f"{child.rid}: {cached} cached tokens that no request of its salt had"


@contextmanager
def failing_inside(obj: object, name: str, fail: bool, failure: Callable[..., Any]) -> Iterator[None]:
    """With `fail`, `obj.name` is `failure` for the duration."""
    if not fail:
        yield
        return
    setattr(obj, name, failure)
    try:
        yield
    finally:
        delattr(obj, name)


@contextmanager
def abort_flags_hooked(hook: Callable[[], None]) -> Iterator[None]:
    """Every read of a request's abort flag is a `hook` point, right after the read (another thread's abort may land
    between the read and the engine's next bytecode)."""
    original = Request.abort_requested

    def looked_at(req: Request) -> FinishReason | None:
        seen = req._abort_reason
        hook()
        return seen

    Request.abort_requested = property(looked_at)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        Request.abort_requested = original  # type: ignore[method-assign]


def common_prefix(a: tuple[int, ...] | list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- tests -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Tokenizer:
    return Tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, tokenizer: Tokenizer) -> Reference:
    return Reference(tiny_llama, tokenizer)


def run_workload(model: Path, reference: Reference, workload: Workload) -> Harness:
    harness = Harness(model, reference, workload)
    harness.run()
    harness.check_end()
    return harness


@settings(max_examples=40, deadline=None, derandomize=True)
@given(workload=workloads())
def test_random_workloads_end_whole_and_match_each_request_alone(
    tiny_llama: Path, reference: Reference, workload: Workload
) -> None:
    run_workload(tiny_llama, reference, workload)


# -- what the property found, as plain cases -------------------------------------------------------------------------


def one_request(overlap: bool, fault: tuple[int, str]) -> Workload:
    """A semi-PD engine serving one request, whose `fault` (launch 1: its prefill, 2: its first decode step) fails."""
    engine = EngineSpec("semi-pd", overlap_decode=overlap, overlap_prefill=overlap, pool_share=2.0,
                        max_prefill_tokens=16, max_decode_seqs=4, faults=(fault,))
    return Workload(engine, (RequestSpec((1, 2, 3, 4, 5, 6), max_tokens=6),), interleaving=("PD",),
                    eager_frontend=False)


@pytest.mark.parametrize(("overlap", "fault"), [
    (True, (1, "sample")),  # the prefill worker's iteration (`PrefillWorker._start`)
    (False, (1, "forward")),
    (False, (2, "sample")),  # a decode step run one at a time (`Worker._run`)
    (True, (2, "forward")),  # the first of overlapped decode steps (`Worker._start`)
])
def test_a_step_that_fails_after_queuing_work_gives_its_pages_back_once_that_work_ran(
    tiny_llama: Path, reference: Reference, overlap: bool, fault: tuple[int, str]
) -> None:
    """A step whose launch raises after it queued part of its work (its draw failed to queue once its forward pass
    was, say the sampler ran out of memory; or a layer of its forward pass failed after the earlier ones were queued)
    ends its requests with an engine error and gives their pages back. On a GPU the queued work still writes those
    pages, and semi-PD's other worker may take them at once: the runner waits for its stream before the error goes
    on, as it does when a deferred draw fails."""
    harness = run_workload(tiny_llama, reference, one_request(overlap, fault))
    (child,) = harness.children.values()
    assert harness.streams.failed == 1
    assert child.output.finish_reason == "error" and "injected failure" in (child.output.error or "")

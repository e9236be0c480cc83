"""Prefill and decode schedulers: token budget, batch bound, preemption, abort.

The unit tests drive the schedulers over a real allocator with no model; the engine
tests build an `EngineCore` without starting its threads and call the workers' `step`
by hand, so every schedule is deterministic.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.config import CacheConfig, EngineConfig, SchedulerConfig
from actors.engine.core import EngineCore
from actors.engine.workers import Iteration, Worker
from actors.kv.allocator import BlockAllocator
from actors.kv.manager import KVManager
from actors.request import FinishReason, Request, SamplingParams, TokenDelta
from actors.scheduler.decode import DecodeScheduler
from actors.scheduler.plan import BatchPlan, PromptScoring, SeqChunk, prompt_scoring
from actors.scheduler.prefill import PrefillScheduler
from support import wait_until

PAGE = 4
MAX_TOKENS = 10

pytestmark = pytest.mark.timeout(120)


def make_kv(num_pages: int, prefix_caching: bool = True) -> KVManager:
    return KVManager(BlockAllocator(num_pages, prefix_caching), PAGE)


def prompt_request(rid: str, n: int, arrival: float = 0.0) -> Request:
    return Request(rid, [(i * 5 + len(rid)) % 97 for i in range(n)], n, SamplingParams(), arrival_time=arrival)


def decoding_request(kv: KVManager, rid: str, n: int, arrival: float = 0.0) -> Request:
    """A request that finished prefill: n tokens, all but the last sampled one in KV."""
    req = prompt_request(rid, n - 1, arrival)
    req.token_ids.append(1)
    assert kv.grow(req, n - 1) == n - 1
    req.num_computed_tokens = n - 1
    return req


def assert_pool_full(kv: KVManager) -> None:
    kv.allocator.check_integrity()
    assert kv.num_free_pages == kv.allocator.num_blocks


# -- prefill ---------------------------------------------------------------------------


def account(sched: PrefillScheduler, chunks: list[SeqChunk], reqs: list[Request]) -> None:
    """What the worker does after the forward pass; sampled requests leave (as if to decode, and done)."""
    for c, r in zip(chunks, reqs):
        sched.finish_chunk(r, c.num_tokens)
        if c.sample:
            assert r.num_uncomputed == 0
            sched.drop(r)


def run_prefill(sched: PrefillScheduler, budget: int) -> list[list[SeqChunk]]:
    """Schedule until every prompt is computed."""
    iterations = []
    while sched.has_work():
        chunks, reqs = sched.schedule()
        assert chunks, "prefill made no progress with free pages"
        assert sum(c.num_tokens for c in chunks) <= budget
        iterations.append(chunks)
        account(sched, chunks, reqs)
        assert len(iterations) < 10_000
    return iterations


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 90), min_size=1, max_size=12), budget=st.integers(1, 70))
def test_prefill_chunks_fill_the_budget_and_cover_each_prompt(lengths: list[int], budget: int) -> None:
    kv = make_kv(num_pages=64, prefix_caching=False)
    sched = PrefillScheduler(kv, max_tokens=budget)
    reqs = [prompt_request(f"r{i}", n, arrival=i) for i, n in enumerate(lengths)]
    for r in reqs:
        sched.add(r)
    iterations = run_prefill(sched, budget)
    sizes = [sum(c.num_tokens for c in chunks) for chunks in iterations]
    assert sum(sizes) == sum(lengths)
    assert all(s == budget for s in sizes[:-1]), f"budget {budget} not filled: {sizes}"
    for r in reqs:
        own = [c for chunks in iterations for c in chunks if c.request_id == r.request_id]
        assert [c.start for c in own] == [sum(c.num_tokens for c in own[:i]) for i in range(len(own))]
        assert [c.sample for c in own] == [False] * (len(own) - 1) + [True]
        assert sum(c.num_tokens for c in own) == len(r.token_ids)
    assert_pool_full(kv)


def test_chunk_ending_one_token_short_still_samples() -> None:
    """65 tokens under a 64-token budget: the 65th is computed (and sampled) next iteration."""
    kv = make_kv(num_pages=32)
    sched = PrefillScheduler(kv, max_tokens=64)
    sched.add(prompt_request("r", 65))
    iterations = run_prefill(sched, 64)
    assert [[(c.start, c.num_tokens, c.sample) for c in chunks] for chunks in iterations] == [
        [(0, 64, False)], [(64, 1, True)]
    ]


def standoff(prefix_caching: bool) -> tuple[KVManager, PrefillScheduler, Request, Request]:
    """Two partial prefills, each with 8 of 12 tokens computed in 2 pages: the pool is full."""
    kv = make_kv(num_pages=4, prefix_caching=prefix_caching)
    sched = PrefillScheduler(kv, max_tokens=16)
    old, young = prompt_request("old", 12, arrival=0.0), prompt_request("young", 12, arrival=1.0)
    for r in (old, young):
        assert kv.grow(r, 8) == 8
        sched.finish_chunk(r, 8)
        sched.running.append(r)
    assert kv.num_free_pages == 0
    return kv, sched, old, young


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_partial_prefills_waiting_for_pages_preempt_the_youngest(prefix_caching: bool) -> None:
    kv, sched, old, young = standoff(prefix_caching)
    chunks, reqs = sched.schedule()
    assert young.num_preemptions == 1 and sched.num_preemptions == 1
    assert (chunks[0].request_id, chunks[0].start, chunks[0].num_tokens) == ("old", 8, 4)
    account(sched, chunks, reqs)
    rest = run_prefill(sched, budget=16)
    assert len(rest) <= 2, f"the standoff did not resolve: {rest}"
    assert old.num_preemptions == 0
    assert_pool_full(kv)


def test_no_budget_is_no_standoff() -> None:
    """Unified mode passes what decodes leave of the budget; none left must not preempt prefills."""
    _, sched, old, young = standoff(prefix_caching=False)
    assert sched.schedule(budget=0) == ([], [])
    assert sched.running == [old, young] and sched.num_preemptions == 0


def test_admission_that_loses_its_page_to_decode_retries_later() -> None:
    """Between admission's free-page check and its allocation, the decode thread took the page."""

    class RacingKV(KVManager):
        stolen: list[int] | None = None

        def grow(self, req: Request, num_tokens: int) -> int:
            if self.stolen is None:
                self.stolen = self.allocator.allocate(self.allocator.num_free)
            return super().grow(req, num_tokens)

    kv = RacingKV(BlockAllocator(4), PAGE)
    sched = PrefillScheduler(kv, max_tokens=8)
    sched.add(prompt_request("r", 6))
    assert sched.schedule() == ([], [])
    assert kv.stolen is not None
    kv.allocator.free(kv.stolen)
    chunks, _ = sched.schedule()
    assert [(c.request_id, c.num_tokens) for c in chunks] == [("r", 6)]


# -- decode ----------------------------------------------------------------------------


def test_decode_batch_is_bounded_by_max_decode_seqs() -> None:
    kv = make_kv(num_pages=64)
    sched = DecodeScheduler(kv, max_seqs=3)
    reqs = [decoding_request(kv, f"r{i}", 5 + i, arrival=i) for i in range(7)]
    for r in reqs:
        sched.add(r)
    # requests handed to decode count as decoding, admitted or not (load, metrics, the controller)
    assert sched.num_running == 7 and sched.context_tokens() == sum(r.num_tokens for r in reqs)
    batches = []
    while sched.has_work():
        chunks, scheduled, preempted = sched.schedule()
        assert not preempted
        assert len(chunks) <= 3
        batches.append([c.request_id for c in chunks])
        for r in scheduled:
            sched.finish_step(r)
            r.token_ids.append(2)
        sched.remove(scheduled[0])  # one request ends per step; a waiting one takes its seat
    assert batches[0] == ["r0", "r1", "r2"]
    assert max(len(b) for b in batches) == 3
    assert sorted(rid for b in batches for rid in b[:1]) == sorted(r.request_id for r in reqs)
    assert_pool_full(kv)


def test_decode_preempts_the_youngest_and_releases_its_pages() -> None:
    kv = make_kv(num_pages=6)
    sched = DecodeScheduler(kv, max_seqs=8)
    reqs = [decoding_request(kv, f"r{i}", 2 * PAGE + 1, arrival=i) for i in range(3)]  # 2 pages each, full
    for r in reqs:
        sched.add(r)
    assert kv.num_free_pages == 0
    chunks, scheduled, preempted = sched.schedule()
    assert preempted == [reqs[2]]
    assert scheduled == reqs[:2]
    assert reqs[2].block_ids == [] and reqs[2].num_computed_tokens == 0 and reqs[2].num_preemptions == 1
    assert sched.running == reqs[:2] and sched.num_preemptions == 1
    assert all(len(r.block_ids) == 3 for r in reqs[:2])
    kv.allocator.check_integrity()


def test_decode_preempts_the_request_of_the_lowest_priority_first() -> None:
    """As vLLM's priority scheduling: the victim is the running request with the largest priority value (then the
    youngest), not the last one handed over; the others keep their pages."""
    kv = make_kv(num_pages=6)
    sched = DecodeScheduler(kv, max_seqs=8)
    reqs = [decoding_request(kv, f"r{i}", 2 * PAGE + 1, arrival=i) for i in range(3)]
    reqs[0].priority = reqs[0].requested_priority = 5
    for r in reqs:
        sched.add(r)
    chunks, scheduled, preempted = sched.schedule()
    assert preempted == [reqs[0]] and scheduled == reqs[1:]
    assert reqs[0].block_ids == [] and all(len(r.block_ids) == 3 for r in reqs[1:])
    kv.allocator.check_integrity()


def test_decode_preempts_a_younger_request_already_planned_before_an_older_one() -> None:
    """The older request, handed over last, needs a page that none is free for: the younger one planned before it
    in the same step gives its pages back (its new page too; nothing was launched), not the older one."""
    kv = make_kv(num_pages=5)
    sched = DecodeScheduler(kv, max_seqs=8)
    young = decoding_request(kv, "young", 2 * PAGE, arrival=1.0)  # room left in its last page
    old = decoding_request(kv, "old", 2 * PAGE + 1, arrival=0.0)  # needs a third page
    kv.allocator.allocate(kv.num_free_pages)  # held elsewhere: no free page
    for r in (young, old):
        sched.add(r)
    chunks, scheduled, preempted = sched.schedule()
    assert (scheduled, preempted) == ([old], [young])
    assert young.block_ids == [] and young.num_computed_tokens == 0 and len(old.block_ids) == 3
    assert [c.request_id for c in chunks] == ["old"]
    kv.allocator.check_integrity()


def test_a_request_admission_held_back_decodes_at_its_own_priority() -> None:
    """`--admission queue` puts a request predicted late behind the others until its first token; once decode
    owns it, it is at the priority it asked for: a preemption must not send a started stream behind every
    request that is still on time."""
    from actors.slo.admission import QUEUE_PRIORITY

    kv = make_kv(num_pages=8)
    sched = DecodeScheduler(kv, max_seqs=8)
    req = decoding_request(kv, "held", PAGE + 1)
    req.priority, req.requested_priority = QUEUE_PRIORITY, 3
    sched.add(req)
    assert req.priority == 3


def test_lone_decode_without_a_page_preempts_itself() -> None:
    kv = make_kv(num_pages=2)
    sched = DecodeScheduler(kv, max_seqs=8)
    req = decoding_request(kv, "r", 2 * PAGE + 1)
    sched.add(req)
    chunks, scheduled, preempted = sched.schedule()
    assert (chunks, scheduled, preempted) == ([], [], [req])
    assert_pool_full(kv)


# -- engine: stepped by hand ---------------------------------------------------------------


@dataclass
class SteppedEngine:
    core: EngineCore
    deltas: list[TokenDelta] = field(default_factory=list)
    plans: list[BatchPlan] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)

    def add(self, rid: str, prompt: list[int], max_tokens: int = 8) -> None:
        self.core.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

    def finished(self) -> dict[str, FinishReason]:
        return {d.request_id: d.finish_reason for d in self.deltas if d.finish_reason is not None}

    def tokens(self, rid: str) -> list[int]:
        return [t for d in self.deltas if d.request_id == rid for t in d.new_token_ids]

    def step(self) -> None:
        for worker in self.core.workers:
            worker.step()

    def run_until(self, done: Callable[[], bool], max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if done():
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps")

    def run_to_completion(self, rids: list[str]) -> None:
        self.run_until(lambda: set(rids) <= set(self.finished()))

    def assert_pool_full(self) -> None:
        alloc = self.core.allocator
        alloc.check_integrity()
        assert alloc.num_free == alloc.num_blocks
        assert self.core.num_unfinished == 0


def stepped_engine(model_dir: Path, mode: str, num_pages: int | None = None, **sched: int) -> SteppedEngine:
    deltas: list[TokenDelta] = []
    config = EngineConfig(model=str(model_dir), mode=mode, cache=CacheConfig(page_size=PAGE, num_pages=num_pages),
                          scheduler=SchedulerConfig(**sched))
    engine = SteppedEngine(EngineCore(config, emit=deltas.extend), deltas)
    for worker in engine.core.workers:
        launch = worker.runner.launch

        def recording(plan: BatchPlan, sample_reqs: list[Request], carry=None,  # type: ignore[no-untyped-def]
                      before_kernels=None, _launch=launch):
            engine.plans.append(plan)
            return _launch(plan, sample_reqs, carry, before_kernels)

        worker.runner.launch = recording  # type: ignore[method-assign]
    schedule = engine.core.decode.schedule

    def recording_schedule():  # type: ignore[no-untyped-def]
        chunks, scheduled, preempted = schedule()
        engine.preempted.update(r.request_id for r in preempted)
        return chunks, scheduled, preempted

    engine.core.decode.schedule = recording_schedule  # type: ignore[method-assign]
    return engine


def prompts(n: int, length: Callable[[int], int]) -> dict[str, list[int]]:
    return {f"r{i}": [(i * 31 + j * 7) % 250 for j in range(length(i))] for i in range(n)}


@pytest.fixture(scope="module")
def unpreempted(tiny_llama: Path) -> dict[str, list[int]]:
    """Greedy tokens of the preemption workload with a pool big enough for all of it."""
    engine = stepped_engine(tiny_llama, "unified", max_prefill_tokens=32)
    for rid, p in PREEMPTION_PROMPTS.items():
        engine.add(rid, p, max_tokens=PREEMPTION_TOKENS)
    engine.run_to_completion(list(PREEMPTION_PROMPTS))
    assert engine.core.num_preemptions == 0
    return {rid: engine.tokens(rid) for rid in PREEMPTION_PROMPTS}


PREEMPTION_PROMPTS = prompts(6, lambda i: 9 + 5 * i)
PREEMPTION_TOKENS = 20


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_preempted_requests_finish_with_unpreempted_tokens(
    tiny_llama: Path, unpreempted: dict[str, list[int]], mode: str
) -> None:
    engine = stepped_engine(tiny_llama, mode, num_pages=24, max_prefill_tokens=32)
    for rid, p in PREEMPTION_PROMPTS.items():
        engine.add(rid, p, max_tokens=PREEMPTION_TOKENS)
    engine.run_to_completion(list(PREEMPTION_PROMPTS))
    assert engine.preempted, "the pool was meant to be too small for all requests at once"
    assert engine.core.num_preemptions >= len(engine.preempted)
    assert {rid: engine.tokens(rid) for rid in PREEMPTION_PROMPTS} == unpreempted
    assert set(engine.finished().values()) == {FinishReason.LENGTH}
    engine.assert_pool_full()


def test_unified_decode_batch_bounded_and_plans_within_budget(tiny_llama: Path) -> None:
    engine = stepped_engine(tiny_llama, "unified", max_decode_seqs=2, max_prefill_tokens=24)
    batch = prompts(5, lambda i: 3 + 4 * i)
    for rid, p in batch.items():
        engine.add(rid, p, max_tokens=6)
    engine.run_to_completion(list(batch))
    assert max(len(p.decodes) for p in engine.plans) == 2
    assert all(p.num_tokens <= 24 for p in engine.plans)
    engine.assert_pool_full()


# -- abort at any time ---------------------------------------------------------------------


def request_state(engine: SteppedEngine, rid: str) -> str:
    core = engine.core
    if any(r.request_id == rid for r in core.decode.running):
        return "decoding"
    if any(r.request_id == rid for r in core.prefill.running):
        return "prefilling"
    return "waiting" if rid not in engine.finished() else "finished"


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
@pytest.mark.parametrize("state", ["waiting", "prefilling", "decoding"])
def test_abort_frees_every_page(tiny_llama: Path, mode: str, state: str) -> None:
    engine = stepped_engine(tiny_llama, mode, max_prefill_tokens=8, max_decode_seqs=4)
    batch = prompts(4, lambda i: 14)
    for rid, p in batch.items():
        engine.add(rid, p, max_tokens=MAX_TOKENS)
    victim = "r3" if state == "waiting" else "r1"
    engine.run_until(lambda: request_state(engine, victim) == state)
    assert engine.core.abort(victim)
    engine.run_to_completion(list(batch))
    assert engine.finished()[victim] == FinishReason.ABORT
    assert all(engine.finished()[rid] == FinishReason.LENGTH for rid in batch if rid != victim)
    assert len(engine.tokens(victim)) < MAX_TOKENS
    engine.assert_pool_full()


class _WaitSpy:
    """Stands in for a queued iteration's draw and counts the waits for its result (`waits`) and for its end on
    the device alone (`ends`)."""

    def __init__(self) -> None:
        self.waits = 0
        self.ends = 0

    def wait(self) -> None:
        self.ends += 1

    def result(self) -> object:
        self.waits += 1
        return None


def test_prefill_waits_for_a_queued_chunk_before_giving_its_pages_back(tiny_llama: Path) -> None:
    """A prompt chunk that is not the prompt's last samples nothing and is queued, not waited for. Before the
    semi-PD prefill worker gives back pages such a chunk may still write (on a GPU the decode worker, on its
    own stream, could take them at once), it waits for it: after an abort, or when free pages run short of
    an iteration's budget; otherwise the next chunk's kernels follow once it has ended on the device (at most
    one iteration queued), its result not taken."""
    engine = stepped_engine(tiny_llama, "semi-pd", max_prefill_tokens=8)
    engine.add("long", list(range(1, 30)), max_tokens=4)
    prefill = engine.core.workers[0]
    prefill.step()
    assert prefill.unwaited is not None and request_state(engine, "long") == "prefilling"
    spy = _WaitSpy()
    prefill.unwaited = spy  # type: ignore[assignment]
    prefill.step()
    assert (spy.waits, spy.ends) == (0, 1) and prefill.unwaited is not spy
    spy = _WaitSpy()
    prefill.unwaited = spy  # type: ignore[assignment]
    assert engine.core.abort("long")
    prefill.step()
    assert spy.waits == 1 and prefill.unwaited is None and engine.finished()["long"] == FinishReason.ABORT
    engine.assert_pool_full()

    scheduler = engine.core.prefill
    engine.add("short", list(range(1, 4)), max_tokens=2)
    assert not scheduler.may_release_pages()
    held = engine.core.allocator.allocate(engine.core.allocator.num_free - 8 // PAGE + 1)
    assert held is not None and scheduler.may_release_pages()  # fewer free pages than one 8-token iteration
    engine.core.allocator.free(held)


def test_the_overlapped_prefill_queues_an_iterations_kernels_once_the_one_before_has_ended(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The semi-PD prefill worker schedules an iteration and makes its attention plan while the one before runs;
    then it waits for that one to end and takes its first tokens, and only then queues the new one's kernels:
    one iteration at most on the partition. (A whole iteration queued ahead filled CUDA's launch queue, and the
    decode worker's launches waited with the prefill's: on the H200, 2026-12-06, 14 decode steps over 100 ms
    in the stall probe's offline arm, 1 with iterations one at a time.)"""
    engine = stepped_engine(tiny_llama, "semi-pd", max_prefill_tokens=8)
    prefill = engine.core.workers[0]
    engine.add("a", list(range(1, 6)), max_tokens=4)
    prefill.step()
    assert engine.tokens("a") == []  # queued: its first token not taken yet
    seen: list[tuple[str, int]] = []
    plan, model = prefill.runner.attention.plan, prefill.runner.model.forward
    monkeypatch.setattr(prefill.runner.attention, "plan",
                        lambda *a, **k: seen.append(("plan", len(engine.tokens("a")))) or plan(*a, **k))
    monkeypatch.setattr(prefill.runner.model, "forward",
                        lambda *a, **k: seen.append(("kernels", len(engine.tokens("a")))) or model(*a, **k))
    engine.add("b", list(range(1, 6)), max_tokens=4)
    prefill.step()
    assert seen == [("plan", 0), ("kernels", 1)]
    assert engine.tokens("b") == [] and prefill.steps_queued_ahead == 1


class _FailedDraw:
    """Stands in for a queued iteration that failed on the device: a GPU reports a kernel's fault at the next
    wait, after the launch went through."""

    def result(self) -> object:
        raise RuntimeError("CUDA error: device-side assert triggered")


@pytest.mark.parametrize("lost", [False, True])
def test_a_queued_chunk_that_fails_on_the_device_ends_its_requests(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, lost: bool
) -> None:
    """The prefill worker's wait for a queued chunk (before it gives pages back) finds the chunk failed: the
    chunk's requests end with an engine error, once, and the worker goes on with the others; when the error
    left the GPU unusable, the engine ends every request and stops (tests/test_gpu.py makes the real error)."""
    import actors.engine.workers as workers

    monkeypatch.setattr(workers, "device_lost", lambda error, device: lost)
    engine = stepped_engine(tiny_llama, "semi-pd", max_prefill_tokens=8)
    told: list[BaseException] = []
    engine.core.on_device_lost = told.append
    engine.add("long", list(range(1, 30)), max_tokens=4)
    engine.add("queued", list(range(1, 12)), max_tokens=4)
    prefill = engine.core.workers[0]
    prefill.step()
    assert prefill.unwaited is not None and request_state(engine, "long") == "prefilling"
    prefill.unwaited = _FailedDraw()  # type: ignore[assignment]
    held = engine.core.allocator.allocate(engine.core.allocator.num_free - 8 // PAGE + 1)
    assert held is not None and engine.core.prefill.may_release_pages()
    assert prefill.step()
    engine.core.allocator.free(held)
    assert engine.finished()["long"] == FinishReason.ERROR and prefill.unwaited is None
    assert len(told) == int(lost)
    if lost:
        assert engine.finished()["queued"] == FinishReason.ERROR
        return
    engine.run_to_completion(["queued"])
    assert engine.finished()["queued"] == FinishReason.LENGTH
    assert [d.request_id for d in engine.deltas if d.finish_reason == FinishReason.ERROR] == ["long"]
    engine.assert_pool_full()


def test_a_lost_gpu_ends_every_request_and_refuses_new_ones(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed batch that leaves the device usable fails only that batch. One that leaves it unusable (a
    sticky CUDA error: every later call fails too) ends every unfinished request with an error, stops the
    workers, refuses new requests and tells the engine's owner once, who can only start a new process.
    (On CPU the device check is told the answer; tests/test_gpu.py makes a real sticky error.)"""
    import actors.engine.workers as workers
    from actors.engine.core import EngineDeadError

    engine = stepped_engine(tiny_llama, "semi-pd", max_prefill_tokens=8)
    prefill, decode = engine.core.workers
    decode.overlap = False  # a failed launch of an overlapped step is retried one step at a time first
    told: list[BaseException] = []
    engine.core.on_device_lost = told.append
    batch = prompts(4, lambda i: 10)
    for rid, p in batch.items():
        engine.add(rid, p, max_tokens=6)
    engine.run_until(lambda: len(engine.core.decode.running) >= 2)

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(workers, "device_lost", lambda error, device: False)
    decode.runner.launch = failing  # type: ignore[method-assign]
    failed = [r.request_id for r in engine.core.decode.running]
    decode.step()
    assert all(engine.finished().get(rid) == FinishReason.ERROR for rid in failed) and not told
    assert len(engine.finished()) < len(batch)  # the others go on

    monkeypatch.setattr(workers, "device_lost", lambda error, device: True)
    prefill.runner.launch = failing  # type: ignore[method-assign]
    engine.add("later", list(range(1, 12)))
    refusing_at_each_error: list[bool] = []
    emit = engine.core._emit

    def noting_emit(deltas: list[TokenDelta]) -> None:
        refusing_at_each_error.extend(engine.core.device_error is not None for d in deltas
                                      if d.finish_reason == FinishReason.ERROR)
        emit(deltas)

    engine.core._emit = noting_emit  # type: ignore[method-assign]
    prefill.step()
    assert refusing_at_each_error and all(refusing_at_each_error)  # a caller that sees its error cannot get in
    assert set(engine.finished()) == set(batch) | {"later"} and set(engine.finished().values()) == {FinishReason.ERROR}
    assert [str(e) for e in told] == ["CUDA error: an illegal memory access was encountered"]
    assert all(w.stop_event.is_set() for w in engine.core.workers)
    errors = {d.request_id: d.error for d in engine.deltas if d.finish_reason == FinishReason.ERROR}
    assert all("engine error" in (errors[rid] or "") for rid in batch)
    with pytest.raises(EngineDeadError, match="GPU failed"):
        engine.add("refused", [1, 2, 3])


def test_an_error_that_escapes_an_iteration_and_lost_the_gpu_ends_the_engine(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception out of a worker's iteration (no batch handler caught it) that left the GPU unusable ends the
    engine, as a failed batch's does: otherwise the worker meets the same failure in every iteration after, and
    its requests wait forever (the H200's sticky-error test hung that way, 2026-12-03)."""
    import actors.engine.workers as workers
    from actors.engine.core import EngineDeadError
    from actors.engine.frontend import LLM

    monkeypatch.setattr(workers, "device_lost", lambda error, device: "CUDA error" in str(error))

    def broken() -> bool:
        raise RuntimeError("CUDA error: device-side assert triggered")

    with LLM(str(tiny_llama), mode="semi-pd") as llm:
        told: list[BaseException] = []
        llm.core.on_device_lost = told.append
        llm.core.workers[0].step = broken  # type: ignore[method-assign]
        wait_until(lambda: told, timeout=10.0, what="the engine to hear that its GPU is gone")
        assert [str(e) for e in told] == ["CUDA error: device-side assert triggered"]
        assert all(w.stop_event.is_set() for w in llm.core.workers)
        with pytest.raises(EngineDeadError):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))


@pytest.fixture(scope="module")
def shared_engine(tiny_llama: Path) -> Iterator[SteppedEngine]:
    yield stepped_engine(tiny_llama, "unified", num_pages=24, max_prefill_tokens=16, max_decode_seqs=3)


@settings(max_examples=8, deadline=None)
@given(abort_steps=st.lists(st.integers(0, 12), min_size=3, max_size=3),
       lengths=st.lists(st.integers(1, 30), min_size=3, max_size=3))
def test_aborts_at_random_steps_leave_the_pool_whole(
    shared_engine: SteppedEngine, abort_steps: list[int], lengths: list[int]
) -> None:
    engine = shared_engine
    engine.deltas.clear()
    rids = [f"x{i}-{len(engine.plans)}" for i in range(len(lengths))]
    for rid, n in zip(rids, lengths):
        engine.add(rid, [(7 * j + n) % 200 for j in range(n)], max_tokens=MAX_TOKENS)
    for step in range(max(abort_steps) + 1):
        for rid, at in zip(rids, abort_steps):
            if at == step:
                engine.core.abort(rid)
        engine.step()
    engine.run_to_completion(rids)
    assert all(len(engine.tokens(rid)) <= MAX_TOKENS for rid in rids)
    engine.assert_pool_full()


def test_worker_recent_iterations() -> None:
    """The iterations that started within the span (what an engine publishes as its recent decode step and
    prefill speed), optionally only those of the current split."""
    worker = Worker.__new__(Worker)  # only the iteration log and the partitioner's version are read
    worker.partitioner = SimpleNamespace(version=1)
    worker.iteration_log = deque([Iteration(1.0, 0.010, 0, 8), Iteration(9.0, 0.020, 0, 100),
                                  Iteration(9.5, 0.040, 1, 300)])
    assert worker.recent_iterations(span_s=2.0, now=10.0) == pytest.approx((2, 30.0, 200.0))
    assert worker.recent_iterations(span_s=10.0, now=10.0) == pytest.approx((3, 70.0 / 3, 136.0))
    assert worker.recent_iterations(span_s=2.0, now=10.0, this_split=True) == pytest.approx((1, 40.0, 300.0))
    assert worker.recent_iterations(span_s=2.0, now=20.0) == (0, 0.0, 0.0)


def test_a_worker_counts_what_its_stalled_iterations_took_over_the_median(caplog: pytest.LogCaptureFixture) -> None:
    """An iteration of `STALL_STEP_FACTOR` medians (of the last `STALL_MEDIAN_ITERATIONS`) or longer is a stall:
    what it took over the median adds to `stalled_seconds`; a slower one short of that (a step under a long
    prompt's prefill) does not, nor does anything before the median has its iterations. A stall is logged with
    the host time the iteration spent by part, and the rest (the wait for the device)."""
    from types import SimpleNamespace

    from actors.engine.workers import STALL_MEDIAN_ITERATIONS, STALL_STEP_FACTOR

    worker = Worker.__new__(Worker)  # only the stall count and its recent iterations are used
    worker.stalled_seconds = 0.0
    worker._recent_seconds = deque(maxlen=STALL_MEDIAN_ITERATIONS)
    assert not worker._note_stall(0.500)  # no median yet
    for _ in range(STALL_MEDIAN_ITERATIONS - 1):
        assert not worker._note_stall(0.010)
    assert worker.stalled_seconds == 0.0
    assert not worker._note_stall(0.010 * STALL_STEP_FACTOR * 0.9)
    assert worker.stalled_seconds == 0.0
    assert worker._note_stall(0.280)
    assert worker.stalled_seconds == pytest.approx(0.270)

    worker.name = "decode"
    worker.runner = SimpleNamespace(host_seconds={"graph": 1.2, "sample": 0.5, "plan": 0.0})
    with caplog.at_level(logging.INFO, logger="actors.engine.workers"):
        worker._log_stall(0.280, 0.010, {"graph": 1.0, "sample": 0.5, "plan": 0.0})
    assert caplog.messages == ["decode stalled: an iteration of 280 ms (median 10.0 ms); host 200.0 ms (graph 200.0), "
                               "the rest 80 ms"]


def test_the_pause_watch_tells_a_garbage_collection_and_a_held_interpreter_lock(
        caplog: pytest.LogCaptureFixture) -> None:
    """A collection of a large heap holds the interpreter lock throughout: the watch logs it as a collection, and
    its heartbeat, kept waiting for the lock, as the process standing still; both add to the totals. Pure Python
    code of the same length is no pause: it gives the lock up every switch interval."""
    import gc

    from actors.engine.pauses import PauseWatch

    with pytest.raises(ValueError, match="heartbeat_ms < threshold_ms"):
        PauseWatch(threshold_ms=5.0, heartbeat_ms=5.0)
    heap = [[i] for i in range(400_000)]  # containers the collector walks: tens of ms a collection
    watch = PauseWatch(threshold_ms=4.0, heartbeat_ms=1.0, stacks=False)
    with caplog.at_level(logging.INFO, logger="actors.engine.pauses"):
        watch.start()
        for _ in range(50):  # until the heartbeat, started in its own thread, has been held up once
            gc.collect()
            if watch.held_pauses:
                break
        watch.stop()
    assert watch.gc_pauses >= 1 and watch.gc_seconds >= watch.gc_pauses * 0.004
    assert watch.held_pauses >= 1 and watch.held_seconds >= watch.held_pauses * 0.004
    assert any(m.startswith("paused: a generation-2 garbage collection took") for m in caplog.messages)
    assert any(m.startswith("paused: the process stood still") for m in caplog.messages)
    assert watch._on_gc not in gc.callbacks
    del heap


@pytest.mark.parametrize(("tokens", "max_len", "max_pages", "expected"), [
    (16384, 8191, 100_000, [8191, 8191, 2]),  # llama3-8b on a GPU: the budget, in prompts the model allows
    (17, 8191, 100_000, [17]),  # on CPU: a page and a token
    (4096, 8191, 63, [1008]),  # a small pool: 63 pages of 16
    (1024, 299, 256, [299, 299, 299, 127]),
    (100, 50, 3, [48]),  # three pages hold 48 tokens
])
def test_warm_up_lengths_fit_the_model_and_the_pool(tokens: int, max_len: int, max_pages: int,
                                                    expected: list[int]) -> None:
    from actors.engine.core import warm_up_lengths
    from actors.kv.manager import pages_for

    lens = warm_up_lengths(tokens, max_len, max_pages, 16)
    assert lens == expected
    assert sum(pages_for(n, 16) for n in lens) <= max_pages and all(n <= max_len for n in lens)


def test_warm_up_rows_cover_every_count_a_batch_may_sample() -> None:
    from actors.engine.core import warm_up_rows

    assert warm_up_rows(256) == tuple(range(1, 33)) + tuple(range(40, 257, 8))
    assert warm_up_rows(50) == tuple(range(1, 33)) + (40, 48, 50)
    assert warm_up_rows(20) == tuple(range(1, 21)) and warm_up_rows(1) == (1,)


def test_engine_warm_up_draws_through_every_worker_without_the_engines_generator(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode's runner too (its LM head and sampler run outside the CUDA graphs, one row per sequence); the draws
    take tokens with a generator of their own, so the engine's seeded sampling is where a fresh one's is."""
    from actors.engine.frontend import LLM
    from actors.models.llama import CausalLM
    from actors.runner.model_runner import ModelRunner

    calls: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
    draws: list[int] = []
    warm, compute = ModelRunner.warm_up_draws, CausalLM.compute_logits

    def spy(runner: ModelRunner, greedy: tuple[int, ...], sampled: tuple[int, ...]) -> None:
        calls.append((id(runner), tuple(greedy), tuple(sampled)))
        warm(runner, greedy, sampled)

    def counted(model: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
        draws.append(hidden.shape[0])
        return compute(model, hidden)

    monkeypatch.setattr(ModelRunner, "warm_up_draws", spy)
    monkeypatch.setattr(CausalLM, "compute_logits", counted)
    llm = LLM(tiny_llama, mode="semi-pd", seed=7)
    try:
        runners = {id(w.runner) for w in llm.core.workers}
        assert len(runners) == 2 and {c[0] for c in calls} == runners, calls
        assert all(greedy and sampled for _, greedy, sampled in calls)
        assert draws.count(1) >= 4  # each worker drew greedy and sampled rows
        for w in llm.core.workers:
            fresh = torch.Generator().manual_seed(7)
            assert torch.equal(w.runner.sampler.generator.get_state(), fresh.get_state())
    finally:
        llm.shutdown()


def test_prompt_scoring_covers_each_prompt_position_once_across_chunks_and_recomputation() -> None:
    """Position p scores token p + 1; the prompt's last position samples instead; positions already scored (a
    prompt computed again after its pages went back) are not scored twice."""
    ids = list(range(100, 110))  # a 10-token prompt
    assert prompt_scoring(ids, 10, 0, 0, 4, 2) == PromptScoring(0, (101, 102, 103, 104), 2)
    assert prompt_scoring(ids, 10, 4, 4, 6, 2) == PromptScoring(0, (105, 106, 107, 108, 109), 2)
    assert prompt_scoring(ids, 10, 9, 0, 6, 2) is None  # all scored: a recomputation scores nothing
    assert prompt_scoring(ids, 10, 3, 0, 6, 2) == PromptScoring(3, (104, 105, 106), 2)
    assert prompt_scoring(ids + [7, 8], 10, 9, 10, 2, 0) is None  # generated tokens computed again
    with pytest.raises(AssertionError):
        prompt_scoring(ids, 10, 2, 4, 4, 2)  # positions 2 and 3 would go unscored


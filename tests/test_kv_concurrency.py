"""Races between the semi-PD workers over the shared KV pool and the schedulers' queues.

Each test replays one interleaving that the real threads can produce, deterministically: the other thread's
action runs (as a real thread, joined) at the exact point inside the method under test where the GIL may switch,
or a fake device stands in for the decode stream so that "queued" and "finished" are distinct. No sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from actors.engine.workers import DecodeWorker, Wakeup
from actors.kv.allocator import BlockAllocator, page_hashes
from actors.kv.manager import KVManager
from actors.request import PENDING_TOKEN, FinishReason, Request, SamplingParams
from actors.runner.sampler import SampleResult
from actors.scheduler.decode import DecodeScheduler
from actors.scheduler.plan import BatchPlan
from actors.scheduler.prefill import PrefillScheduler

PAGE = 4

pytestmark = pytest.mark.timeout(60)


def make_kv(num_pages: int) -> KVManager:
    return KVManager(BlockAllocator(num_pages), PAGE)


def prompt_request(rid: str, n: int) -> Request:
    return Request(rid, [(i * 5 + len(rid)) % 97 for i in range(n)], n, SamplingParams(max_tokens=16))


def on_other_thread(action: Callable[[], object]) -> None:
    """Run `action` on another thread and wait for it: what that thread does while this one is switched out."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors, errors


def assert_pool_full(kv: KVManager) -> None:
    kv.allocator.check_integrity()
    assert kv.num_free_pages == kv.allocator.num_blocks


# -- an abort that lands while prefill sweeps its waiting queue ---------------------------------------------------


class AbortedWhileLookedAt(Request):
    """A request whose abort (the HTTP thread's `EngineCore.abort`) lands right after the scheduler's first look at
    its flag: the GIL may switch between reading `_abort_reason` and the next bytecode."""

    abort_on_first_look = True

    @property  # type: ignore[override]
    def abort_requested(self) -> FinishReason | None:
        seen = self._abort_reason
        if self.abort_on_first_look:
            self.abort_on_first_look = False
            on_other_thread(self.abort)
        return seen


def test_an_abort_during_the_waiting_sweep_is_reported_not_lost() -> None:
    """`take_aborted` must report every request it takes out of `waiting`: one it drops unreported is never
    finished (its client waits forever, the engine counts it unfinished for good)."""
    sched = PrefillScheduler(make_kv(8), max_tokens=16)
    req = AbortedWhileLookedAt("r", [1, 2, 3], 3, SamplingParams())
    sched.add(req)
    gone = sched.take_aborted()
    gone += sched.take_aborted()
    assert gone == [req]
    assert sched.num_waiting == 0 and not sched.has_work()


# -- overlapped decode publishing a page its queued step still writes ---------------------------------------------


class FakeStream:
    """The decode worker's stream: the KV slots (page, slot) each queued step writes, oldest step first. A step's
    writes land when its draw's result is taken, with those of every step queued before it (stream order); until
    then, another stream (the prefill worker's) that reads the page sees whatever the page held before."""

    def __init__(self) -> None:
        self.queued: list[tuple[int, set[int]]] = []  # (step number, pages it writes)
        self.launched = 0

    def launch(self, plan: BatchPlan) -> int:
        pages = {c.block_ids[c.start // PAGE] for c in plan.chunks}
        self.queued.append((self.launched, pages))
        self.launched += 1
        return self.launched - 1

    def finish(self, step: int) -> None:
        self.queued = [(s, p) for s, p in self.queued if s > step]

    def pages_being_written(self) -> set[int]:
        return {p for _, pages in self.queued for p in pages}


class FakeDrawn:
    def __init__(self, stream: FakeStream, step: int, n: int, token: int) -> None:
        self.stream, self.step, self.n, self.token = stream, step, n, token
        self.prompt_logprobs: list[list[object]] = []
        self.done = None

    def result(self) -> SampleResult:
        self.stream.finish(self.step)
        return SampleResult([self.token] * self.n, [None] * self.n)


class FakeRunner:
    """Queues steps on a `FakeStream` (nothing is computed); each samples token 3."""

    device = torch.device("cpu")
    stream = None

    def __init__(self) -> None:
        self.gpu = FakeStream()

    def launch(self, plan: BatchPlan, sample_reqs: list[Request], carry: object = None,
               before_kernels: Callable[[], None] | None = None) -> FakeDrawn:
        if before_kernels is not None:
            before_kernels()
        return FakeDrawn(self.gpu, self.gpu.launch(plan), len(sample_reqs), 3)


def known_tokens(req: Request) -> list[int]:
    tokens = list(req.token_ids)
    while tokens and tokens[-1] == PENDING_TOKEN:
        tokens.pop()
    return tokens


def test_overlapped_decode_publishes_no_page_its_queued_step_still_writes() -> None:
    """A prefix-cache page may be matched (and read, on the prefill stream) as soon as it is published; the decode
    step that writes its last slot must have finished by then."""
    kv = make_kv(16)
    prefill, decode = PrefillScheduler(kv, max_tokens=16), DecodeScheduler(kv, max_seqs=4)
    runner = FakeRunner()
    worker = DecodeWorker(prefill, decode, runner, None, lambda deltas: None,  # type: ignore[arg-type]
                          {"prefill": Wakeup(), "decode": Wakeup()}, overlap=True)
    req = prompt_request("a", 6)
    req.token_ids.append(1)  # its first token, from prefill: 6 tokens in KV, the 7th to decode
    assert kv.grow(req, 6) == 6
    req.num_computed_tokens = 6
    decode.add(req)
    for _ in range(8):
        worker.step()
        # another request whose prompt starts with what `req` has so far (a follow-up turn): its prefill reads the hits
        hit = kv.allocator.match_prefix(page_hashes(known_tokens(req), PAGE))
        kv.allocator.free(hit)
        unwritten = set(hit) & runner.gpu.pages_being_written()
        assert not unwritten, f"prefix hit on page(s) {unwritten} that the queued decode step still writes"
    assert req.num_published_pages >= 2


def test_publish_offers_only_the_pages_within_the_tokens_written() -> None:
    """What `Worker._collect` needs: publish up to the finished step's tokens while the next one still writes."""
    kv = make_kv(4)
    req = prompt_request("r", 2 * PAGE + 1)
    assert kv.grow(req, 2 * PAGE) == 2 * PAGE
    req.num_computed_tokens = 2 * PAGE  # the last position's step is queued, not finished
    kv.publish(req, 2 * PAGE - 1)
    assert req.num_published_pages == 1
    assert kv.allocator.match_prefix(page_hashes(req.token_ids, PAGE)) == req.block_ids[:1]
    kv.allocator.free(req.block_ids[:1])
    kv.publish(req)  # the step finished
    assert req.num_published_pages == 2
    kv.release(req)
    assert_pool_full(kv)


# -- admission that its own prefix-cache hits refuse -------------------------------------------------------------


def run_prefill(sched: PrefillScheduler) -> list[Request]:
    """Prefill every queued prompt (what the prefill worker does, its first tokens not sampled); the requests."""
    done: list[Request] = []
    for _ in range(100):
        chunks, reqs = sched.schedule()
        if not chunks:
            break
        for c, r in zip(chunks, reqs):
            sched.finish_chunk(r, c.num_tokens)
            if c.sample:
                done.append(r)
    assert not sched.has_work()
    return done


def test_a_prompt_whose_prefix_is_cached_is_admitted_like_one_whose_prefix_is_not() -> None:
    """With a decode reserve, admission leaves `reserve` pages free beyond the request's first. Its prefix-cache hits
    are no new pages (it would otherwise recompute them into fresh ones): counting them against the reserve refuses
    a request because its prefix is cached, and on an engine with nothing else to free pages it waits forever."""
    kv = make_kv(8)
    sched = PrefillScheduler(kv, max_tokens=64, decode_reserve_pages=1)
    first = prompt_request("first", 7 * PAGE)
    sched.add(first)
    assert run_prefill(sched) == [first]
    sched.drop(first)  # ended at its first token: its 7 pages stay cached
    assert_pool_full(kv)

    again = Request("again", first.token_ids[: 7 * PAGE] + [5], 7 * PAGE + 1, SamplingParams(max_tokens=1))
    sched.add(again)
    chunks, reqs = sched.schedule()
    assert reqs == [again], "a request whose prefix is cached was refused on an idle engine"
    assert (chunks[0].start, chunks[0].num_tokens) == (7 * PAGE, 1)  # the 7 cached pages served
    sched.finish_chunk(again, 1)
    sched.drop(again)
    assert_pool_full(kv)

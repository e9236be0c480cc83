"""Property tests of the KV block allocator: no double allocation, no leak, right prefix hits.

A single-threaded state machine checks every step against a ledger of who holds what
and what each page contains; the two-thread tests run random op lists at once (real
threads, a barrier, a tiny GIL switch interval) and check the same from inside and after.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from actors.kv.allocator import BlockAllocator, page_hashes
from actors.kv.manager import KVManager
from actors.request import Request, SamplingParams

PAGE = 4
NUM_BLOCKS = 10  # small, so cached pages get evicted and reused often
ROUNDS = 20  # each thread replays its op list this often, to give races a chance
STRESS_OPS = 50_000
DOCS = 3  # token sequences drawn as prefixes of a few documents, so hash chains collide often


def document(doc: int, n: int) -> list[int]:
    return [(doc * 7 + i * 3) % 11 for i in range(n)]


def full_pages(tokens: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + PAGE]) for i in range(0, len(tokens) - PAGE + 1, PAGE)]


@dataclass
class PageLedger:
    """What the test believes: holders per block and the tokens written into each block."""

    holders: Counter[int] = field(default_factory=Counter)
    content: dict[int, tuple[int, ...]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_fresh(self, blocks: Sequence[int]) -> None:
        with self.lock:
            held = [b for b in blocks if self.holders[b]]
            assert not held, f"blocks {held} handed out while still held"
            for b in blocks:
                self.holders[b] += 1
                self.content.pop(b, None)

    def take_shared(self, blocks: Sequence[int]) -> None:
        with self.lock:
            for b in blocks:
                self.holders[b] += 1

    def drop(self, blocks: Sequence[int]) -> None:
        """Called before the allocator's free, so the ledger never lags behind a reuse."""
        with self.lock:
            for b in blocks:
                assert self.holders[b] > 0
                self.holders[b] -= 1

    def write(self, blocks: Sequence[int], pages: Sequence[tuple[int, ...]]) -> None:
        with self.lock:
            for b, page in zip(blocks, pages):
                self.content[b] = page

    def forget(self, blocks: Sequence[int]) -> None:
        """Fresh pages about to be overwritten: whatever they held is gone."""
        with self.lock:
            for b in blocks:
                self.content.pop(b, None)

    def assert_holds(self, blocks: Sequence[int], pages: Sequence[tuple[int, ...]]) -> None:
        with self.lock:
            got = [self.content.get(b) for b in blocks]
        assert got == list(pages), f"prefix hit pages {list(blocks)} hold {got}, expected {list(pages)}"


def acquire_sequence(alloc: BlockAllocator, ledger: PageLedger, tokens: list[int], publish: bool) -> list[int] | None:
    """Prefix hits first, then fresh pages for the rest; publish its full pages if asked."""
    pages = full_pages(tokens)
    hashes = page_hashes(tokens, PAGE)
    hit = alloc.match_prefix(hashes)
    ledger.take_shared(hit)
    ledger.assert_holds(hit, pages[: len(hit)])
    fresh = alloc.allocate(-(-len(tokens) // PAGE) - len(hit))
    if fresh is None:
        ledger.drop(hit)
        alloc.free(hit)
        return None
    ledger.take_fresh(fresh)
    blocks = hit + fresh
    ledger.write(fresh, pages[len(hit) :])
    if publish:
        for b, h in zip(blocks, hashes):
            alloc.cache(b, h)
    return blocks


def release(alloc: BlockAllocator, ledger: PageLedger, blocks: list[int]) -> None:
    ledger.drop(blocks)
    alloc.free(blocks)


def assert_matches_ledger(alloc: BlockAllocator, ledger: PageLedger) -> None:
    alloc.check_integrity()
    with ledger.lock:
        wrong = {b: (alloc.refcount(b), ledger.holders[b]) for b in range(alloc.num_blocks)
                 if alloc.refcount(b) != ledger.holders[b]}
        held = sum(1 for b in range(alloc.num_blocks) if ledger.holders[b])
    assert not wrong, f"refcount != holders for {wrong}"
    assert alloc.num_free == alloc.num_blocks - held


tokens_st = st.tuples(st.integers(0, DOCS - 1), st.integers(1, 5 * PAGE)).map(lambda t: document(*t))


class AllocatorMachine(RuleBasedStateMachine):
    """Owners are page tables (lists of block ids, each held once), by id."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS)
        self.ledger = PageLedger()
        self.owners: dict[int, list[int]] = {}
        self.next_id = 0

    def _add(self, blocks: list[int]) -> None:
        self.owners[self.next_id] = blocks
        self.next_id += 1

    def _pick(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.owners)))

    @rule(n=st.integers(1, 6))
    def allocate(self, n: int) -> None:
        free_before = self.alloc.num_free
        blocks = self.alloc.allocate(n)
        if blocks is None:
            assert n > free_before and self.alloc.num_free == free_before
            return
        assert len(blocks) == n
        self.ledger.take_fresh(blocks)
        self._add(blocks)

    @rule(tokens=tokens_st, publish=st.booleans())
    def admit(self, tokens: list[int], publish: bool) -> None:
        blocks = acquire_sequence(self.alloc, self.ledger, tokens, publish)
        if blocks is not None:
            self._add(blocks)

    @rule(tokens=tokens_st)
    def abort_mid_prefill(self, tokens: list[int]) -> None:
        blocks = acquire_sequence(self.alloc, self.ledger, tokens, publish=False)
        if blocks is not None:
            release(self.alloc, self.ledger, blocks)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        source = self.owners[self._pick(data)]
        self.alloc.share(source)
        self.ledger.take_shared(source)
        self._add(list(source))

    @precondition(lambda self: self.owners)
    @rule(data=st.data(), n=st.integers(1, 3))
    def grow(self, data: st.DataObject, n: int) -> None:
        more = self.alloc.allocate(n)
        if more is not None:
            self.ledger.take_fresh(more)
            self.owners[self._pick(data)].extend(more)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        release(self.alloc, self.ledger, self.owners.pop(self._pick(data)))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def publish_owner(self, data: st.DataObject) -> None:
        """Cache an owner's leading written pages under the hash chain of their tokens."""
        owner = self.owners[self._pick(data)]
        with self.ledger.lock:
            pages = [self.ledger.content.get(b) for b in owner]
        written = pages[: next((i for i, p in enumerate(pages) if p is None), len(pages))]
        for b, h in zip(owner, page_hashes([t for p in written for t in p], PAGE)):
            self.alloc.cache(b, h)

    @rule()
    def reset_prefix_cache(self) -> None:
        self.alloc.reset_prefix_cache()

    @invariant()
    def consistent(self) -> None:
        assert_matches_ledger(self.alloc, self.ledger)

    def teardown(self) -> None:
        for blocks in self.owners.values():
            release(self.alloc, self.ledger, blocks)
        assert_matches_ledger(self.alloc, self.ledger)
        assert self.alloc.num_free == NUM_BLOCKS


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# -- two threads at once -----------------------------------------------------------------

OP = st.one_of(
    st.tuples(st.just("admit"), tokens_st, st.booleans()),
    st.tuples(st.just("abort"), tokens_st, st.just(False)),
    st.tuples(st.just("grow"), st.integers(1, 3), st.just(False)),
    st.tuples(st.just("share"), st.just(0), st.just(False)),
    st.tuples(st.just("free"), st.just(0), st.just(False)),
    st.tuples(st.just("reset"), st.just(0), st.just(False)),
)


@contextmanager
def fine_grained_switching() -> Iterator[None]:
    """Make the GIL switch threads every few bytecodes, so the two op lists interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_ops(alloc: BlockAllocator, ledger: PageLedger, ops: list[tuple[str, object, bool]], seed: int,
            barrier: threading.Barrier, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    owned: list[list[int]] = []
    try:
        barrier.wait(timeout=10)
        for kind, arg, publish in ops * ROUNDS:
            if kind == "admit":
                blocks = acquire_sequence(alloc, ledger, arg, publish)  # type: ignore[arg-type]
                if blocks is not None:
                    owned.append(blocks)
            elif kind == "abort":
                blocks = acquire_sequence(alloc, ledger, arg, publish=False)  # type: ignore[arg-type]
                if blocks is not None:
                    release(alloc, ledger, blocks)
            elif kind == "grow" and owned:
                more = alloc.allocate(arg)  # type: ignore[arg-type]
                if more is not None:
                    assert all(alloc.refcount(b) >= 1 for b in more)
                    ledger.take_fresh(more)
                    rng.choice(owned).extend(more)
            elif kind == "share" and owned:
                source = rng.choice(owned)
                alloc.share(source)
                ledger.take_shared(source)
                owned.append(list(source))
            elif kind == "free" and owned:
                release(alloc, ledger, owned.pop(rng.randrange(len(owned))))
            elif kind == "reset":
                alloc.reset_prefix_cache()
        for blocks in owned:
            release(alloc, ledger, blocks)
    except BaseException as e:  # surfaced by the main thread
        errors.append(e)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_a=st.lists(OP, max_size=30), ops_b=st.lists(OP, max_size=30), seed=st.integers(0, 2**16))
def test_two_threads_never_double_allocate_or_leak(
    ops_a: list[tuple[str, object, bool]], ops_b: list[tuple[str, object, bool]], seed: int
) -> None:
    alloc = BlockAllocator(NUM_BLOCKS)
    ledger = PageLedger()
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    threads = [threading.Thread(target=run_ops, args=(alloc, ledger, ops, seed + i, barrier, errors))
               for i, ops in enumerate((ops_a, ops_b))]
    with fine_grained_switching():
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    assert_matches_ledger(alloc, ledger)
    assert alloc.num_free == NUM_BLOCKS


def hammer(alloc: BlockAllocator, content: dict[int, tuple[int, ...]], seed: int, held: Counter[int],
           barrier: threading.Barrier, errors: list[BaseException]) -> None:
    """Many cheap random ops with thread-local bookkeeping only, so threads switch inside the allocator."""
    rng = random.Random(seed)
    owned: list[list[int]] = []
    try:
        barrier.wait(timeout=10)
        for _ in range(STRESS_OPS):
            roll = rng.random()
            if roll < 0.35:
                tokens = document(rng.randrange(DOCS), rng.randrange(1, 4 * PAGE))
                pages = full_pages(tokens)
                hit = alloc.match_prefix(page_hashes(tokens, PAGE))
                assert [content.get(b) for b in hit] == pages[: len(hit)], "prefix hit on foreign pages"
                fresh = alloc.allocate(-(-len(tokens) // PAGE) - len(hit))
                if fresh is None:
                    alloc.free(hit)
                    continue
                assert all(alloc.refcount(b) == 1 for b in fresh)
                for b, page in zip(fresh, pages[len(hit) :]):
                    content[b] = page
                for b, h in zip(hit + fresh, page_hashes(tokens, PAGE)):
                    alloc.cache(b, h)
                owned.append(hit + fresh)
            elif roll < 0.5 and owned:
                source = rng.choice(owned)
                alloc.share(source)
                owned.append(list(source))
            elif roll < 0.6:
                alloc.reset_prefix_cache()
            elif owned:
                alloc.free(owned.pop(rng.randrange(len(owned))))
        held.update(b for blocks in owned for b in blocks)
    except BaseException as e:  # surfaced by the main thread
        errors.append(e)


def test_two_threads_hammering_keep_refcounts_exact() -> None:
    alloc = BlockAllocator(NUM_BLOCKS)
    content: dict[int, tuple[int, ...]] = {}
    helds: list[Counter[int]] = [Counter(), Counter()]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=hammer, args=(alloc, content, seed, held, barrier, errors))
               for seed, held in enumerate(helds)]
    with fine_grained_switching():
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    alloc.check_integrity()
    held = helds[0] + helds[1]
    assert {b: alloc.refcount(b) for b in range(NUM_BLOCKS) if alloc.refcount(b)} == dict(held)
    for blocks in (list(h.elements()) for h in helds):
        alloc.free(blocks)
    alloc.check_integrity()
    assert alloc.num_free == NUM_BLOCKS


# -- KVManager over requests, two threads ---------------------------------------------------


def request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), len(tokens), SamplingParams())


def prefill_and_release(kv: KVManager, ledger: PageLedger, tokens_list: list[list[int]],
                        barrier: threading.Barrier, errors: list[BaseException]) -> None:
    """A prefill loop: admit (prefix hits), compute in 5-token chunks, publish, release."""
    try:
        barrier.wait(timeout=10)
        for i, tokens in enumerate(tokens_list):
            req = request(str(i), tokens)
            kv.match_prefix(req)
            hit = req.num_computed_tokens // PAGE
            assert req.num_computed_tokens < len(tokens)
            ledger.assert_holds(req.block_ids, full_pages(tokens)[:hit])
            while req.num_uncomputed:
                before = len(req.block_ids)
                n = kv.grow(req, min(5, req.num_uncomputed))
                if n == 0:
                    break
                assert len(req.block_ids) * PAGE >= req.num_computed_tokens + n
                ledger.forget(req.block_ids[before:])
                req.num_computed_tokens += n
                done = req.num_computed_tokens // PAGE
                ledger.write(req.block_ids[:done], full_pages(tokens[: done * PAGE]))
                kv.publish(req)
            kv.release(req)
            assert not req.block_ids and req.num_computed_tokens == 0
    except BaseException as e:  # surfaced by the main thread
        errors.append(e)


@settings(max_examples=30, deadline=None)
@given(a=st.lists(tokens_st, min_size=1, max_size=12), b=st.lists(tokens_st, min_size=1, max_size=12))
def test_kv_manager_two_workers_hit_right_pages_and_leave_pool_whole(a: list[list[int]], b: list[list[int]]) -> None:
    kv = KVManager(BlockAllocator(NUM_BLOCKS), PAGE)
    ledger = PageLedger()
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=prefill_and_release, args=(kv, ledger, toks, barrier, errors))
               for toks in (a, b)]
    with fine_grained_switching():
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    kv.allocator.check_integrity()
    assert kv.num_free_pages == NUM_BLOCKS


def test_prefix_hit_returns_the_cached_pages() -> None:
    alloc = BlockAllocator(NUM_BLOCKS)
    ledger = PageLedger()
    tokens = document(1, 3 * PAGE + 2)
    first = acquire_sequence(alloc, ledger, tokens, publish=True)
    assert first is not None
    release(alloc, ledger, first)
    again = acquire_sequence(alloc, ledger, tokens + [5, 5], publish=False)
    assert again is not None
    assert again[:3] == first[:3]
    assert alloc.prefix_hits == 3
    other = acquire_sequence(alloc, ledger, document(2, 3 * PAGE), publish=False)
    assert other is not None and not set(other) & set(again)
    release(alloc, ledger, again)
    release(alloc, ledger, other)
    assert_matches_ledger(alloc, ledger)


def test_cached_pages_are_evicted_lru_tail_first_and_forgotten() -> None:
    alloc = BlockAllocator(4)
    ledger = PageLedger()
    tokens = document(0, 4 * PAGE)
    blocks = acquire_sequence(alloc, ledger, tokens, publish=True)
    assert blocks is not None
    release(alloc, ledger, blocks)
    assert alloc.num_free == 4
    taken = alloc.allocate(1)
    assert taken == [blocks[-1]], "the chain's tail is evicted first"
    ledger.take_fresh(taken)
    assert alloc.match_prefix(page_hashes(tokens, PAGE)) == blocks[:3]
    ledger.take_shared(blocks[:3])
    release(alloc, ledger, taken)
    release(alloc, ledger, blocks[:3])
    assert_matches_ledger(alloc, ledger)


def test_allocate_is_all_or_nothing() -> None:
    alloc = BlockAllocator(5)
    assert alloc.allocate(6) is None
    assert alloc.num_free == 5
    held = alloc.allocate(5)
    assert held is not None and sorted(held) == list(range(5))
    assert alloc.allocate(1) is None
    alloc.free(held)
    alloc.check_integrity()
    assert alloc.num_free == 5


def test_a_salt_gives_a_chain_of_its_own_and_is_stable_across_processes() -> None:
    tokens = document(3, 2 * PAGE)
    plain, salted, other = page_hashes(tokens, PAGE), page_hashes(tokens, PAGE, salt="a"), page_hashes(tokens, PAGE, salt="b")
    assert not set(plain) & set(salted) and not set(salted) & set(other)
    assert page_hashes(tokens, PAGE, salted[:1], salt="a") == salted  # extends a known salted prefix
    code = f"from actors.kv.allocator import page_hashes; print(page_hashes({tokens!r}, {PAGE}, salt='a'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # str hashes differ between processes; the chain must not
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == str(salted)

"""Automatic prefix caching as vLLM's: page keys, salts, reported cached tokens, reset, LRU eviction, and hits on
the pages that an earlier request of the same iteration computes (n > 1, a burst sharing a system prompt).

Unit tests drive the allocator, `KVManager` and the prefill scheduler directly; engine tests run a tiny model on
CPU and check what a user sees (`num_cached_tokens`, tokens, logprobs) against an engine with the cache cold or off.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import actors.kv.allocator as allocator_module
from actors.config import CacheConfig, EngineConfig, SchedulerConfig
from actors.engine.core import EngineCore
from actors.engine.frontend import LLM, CompletionOutput
from actors.kv.allocator import BlockAllocator, page_hashes
from actors.kv.manager import KVManager
from actors.request import FinishReason, Request, SamplingParams, TokenDelta
from actors.scheduler.plan import BatchPlan
from actors.scheduler.prefill import PrefillScheduler
from support import record_prefills, step_until

PAGE = 4
ENGINE_PAGE = 16

pytestmark = pytest.mark.timeout(180)  # a lost request hangs generate(): fail instead


def document(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 200) for _ in range(n)]


def request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, list(tokens), len(tokens), SamplingParams(cache_salt=salt))


def compute_and_release(kv: KVManager, req: Request) -> None:
    """Admit `req` (prefix hits), compute its whole prompt, publish its pages, release them."""
    kv.match_prefix(req)
    assert kv.grow(req, req.num_uncomputed) == req.num_uncomputed
    req.num_computed_tokens = req.num_tokens
    kv.publish(req)
    kv.release(req)


# -- page keys -------------------------------------------------------------------------------


def test_pages_whose_python_hash_collides_are_not_served_as_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's 64-bit `hash` of a page is public and not collision resistant: a prompt crafted so that its first page
    hashes like a known prompt's (a meet-in-the-middle search, ~2^32 work) would be served that prompt's KV, and
    would poison it for every later user if it came first. Here such a collision is simulated by a `hash` that maps
    everything alike: the keys must not depend on it."""
    monkeypatch.setattr(allocator_module, "hash", lambda _: 7, raising=False)
    kv = KVManager(BlockAllocator(16), PAGE)
    victim, attacker = document(1, 3 * PAGE + 1), document(2, 3 * PAGE + 1)
    compute_and_release(kv, request("victim", victim))
    probe = request("attacker", attacker)
    kv.match_prefix(probe)
    assert probe.num_computed_tokens == 0 and not probe.block_ids, "another prompt's pages were served"
    kv.release(probe)
    again = request("victim-again", victim)
    kv.match_prefix(again)
    assert again.num_computed_tokens == 3 * PAGE
    kv.release(again)
    kv.allocator.check_integrity()


def test_a_page_key_depends_on_its_whole_prefix_and_its_position() -> None:
    a = document(3, 2 * PAGE)
    swapped = a[PAGE:] + a[:PAGE]
    assert page_hashes(a, PAGE)[1] != page_hashes(swapped, PAGE)[0], "a page's key ignores its prefix"
    assert page_hashes(a, PAGE)[0] != page_hashes(swapped, PAGE)[1]
    extended = page_hashes(a + document(4, PAGE), PAGE, page_hashes(a, PAGE)[:1])
    assert extended[:2] == page_hashes(a, PAGE) and len(extended) == 3


def test_a_salt_with_a_lone_surrogate_gets_a_chain_of_its_own() -> None:
    """`cache_salt` is any non-empty str; JSON may carry a lone surrogate ("\\ud800"), which utf-8 cannot encode."""
    tokens = document(5, 2 * PAGE)
    odd = page_hashes(tokens, PAGE, salt="\ud800")
    assert odd == page_hashes(tokens, PAGE, salt="\ud800")
    assert not set(odd) & set(page_hashes(tokens, PAGE)) and not set(odd) & set(page_hashes(tokens, PAGE, salt="\ud801"))


# -- allocator: eviction, reset, integrity -------------------------------------------------------


def test_eviction_is_least_recently_freed_first_and_a_hit_moves_a_page_to_the_back() -> None:
    kv = KVManager(BlockAllocator(4), PAGE)
    a, b = request("a", document(6, PAGE + 1)), request("b", document(7, PAGE + 1))
    compute_and_release(kv, a)
    compute_and_release(kv, b)  # cached, least recently freed first: a's page, b's page
    alloc = kv.allocator
    (ha,), (hb,) = a.page_hashes, b.page_hashes
    hit = alloc.match_prefix([ha])  # a's page is used again: now the most recently freed
    assert hit and alloc.num_free == 3
    alloc.free(hit)
    taken = alloc.allocate(3)  # the 2 never-cached pages, then one cached page: b's
    assert taken is not None and hit[0] not in taken
    assert alloc.match_prefix([hb]) == [], "an evicted page still answers to its key"
    assert alloc.match_prefix([ha]) == hit
    alloc.free(hit)
    alloc.free(taken)
    alloc.check_integrity()
    assert alloc.num_free == 4


def test_reset_forgets_unheld_pages_and_keeps_those_a_request_holds() -> None:
    kv = KVManager(BlockAllocator(8), PAGE)
    done, running = document(8, 2 * PAGE + 1), document(9, 2 * PAGE + 1)
    compute_and_release(kv, request("done", done))
    live = request("running", running)
    kv.match_prefix(live)
    kv.grow(live, live.num_uncomputed)
    live.num_computed_tokens = live.num_tokens
    kv.publish(live)
    assert kv.allocator.reset_prefix_cache() == 2
    kv.allocator.check_integrity()
    assert kv.allocator.match_prefix(page_hashes(done, PAGE)) == []
    assert kv.allocator.match_prefix(page_hashes(running, PAGE)) == live.block_ids[:2]
    kv.allocator.free(live.block_ids[:2])
    kv.release(live)
    kv.allocator.check_integrity()
    assert kv.num_free_pages == 8


def test_check_integrity_catches_a_hashed_free_page_and_a_held_evictable_one() -> None:
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    assert blocks is not None
    alloc.cache(blocks[0], 1)
    alloc.free(blocks)
    alloc.check_integrity()
    alloc._refcount[blocks[0]] = 1  # evictable yet held
    with pytest.raises(AssertionError):
        alloc.check_integrity()
    alloc._refcount[blocks[0]] = 0
    alloc._block_to_hash[blocks[1]] = 2  # a plain free page carrying a key
    alloc._hash_to_block[2] = blocks[1]
    with pytest.raises(AssertionError):
        alloc.check_integrity()


def test_check_integrity_catches_a_pending_page_cached_unheld() -> None:
    """A page published ahead of the iteration that writes it must not outlive its holders in the cache: nobody
    would write it, and a later request would read it."""
    alloc = BlockAllocator(2)
    blocks = alloc.allocate(1)
    assert blocks is not None
    alloc.cache(blocks[0], 1, pending=True)
    alloc.check_integrity()
    alloc.free(blocks)
    with pytest.raises(AssertionError, match="pending"):
        alloc.check_integrity()


# -- hits within one prefill iteration: the scheduler --------------------------------------------------------------


def planned(sched: PrefillScheduler) -> tuple[list[tuple[str, int, int]], list[Request]]:
    """One `schedule`: (request id, start, tokens) of each chunk, and the requests."""
    chunks, reqs = sched.schedule()
    return [(c.request_id, c.start, c.num_tokens) for c in chunks], reqs


def finish(sched: PrefillScheduler, reqs: list[Request], tokens: list[int]) -> None:
    for r, n in zip(reqs, tokens):
        sched.finish_chunk(r, n)
    sched.kv.allocator.check_integrity()


def test_a_request_admitted_after_another_into_one_iteration_hits_the_pages_that_one_computes() -> None:
    """n > 1: siblings of one prompt arrive together. The first computes the prompt; the others, admitted into the
    same iteration, hit its full pages (written in that forward pass before attention reads them) and compute only
    the rest."""
    kv = KVManager(BlockAllocator(16), PAGE)
    sched = PrefillScheduler(kv, max_tokens=64)
    prompt = document(20, 3 * PAGE + 1)
    siblings = [request(f"s{i}", prompt) for i in range(3)]
    for r in siblings:
        sched.add(r)
    chunks, reqs = planned(sched)
    assert reqs == siblings
    assert chunks == [("s0", 0, 3 * PAGE + 1), ("s1", 3 * PAGE, 1), ("s2", 3 * PAGE, 1)]
    assert siblings[1].block_ids[:3] == siblings[2].block_ids[:3] == siblings[0].block_ids[:3]
    assert [r.num_cached_tokens for r in siblings] == [0, 3 * PAGE, 3 * PAGE]
    assert (sched.prompt_tokens_admitted, sched.cached_tokens_admitted) == (3 * len(prompt), 6 * PAGE)
    finish(sched, reqs, [c[2] for c in chunks])
    for r in siblings:
        sched.drop(r)
    assert_kv_whole(kv)
    again = request("again", prompt)  # the pages stayed cached, written
    kv.match_prefix(again)
    assert again.num_computed_tokens == 3 * PAGE
    kv.release(again)


def test_a_hit_within_an_iteration_takes_only_the_full_pages_of_the_chunks_planned_before_it() -> None:
    """Chunked prefill: a request admitted next to a prompt's middle chunk hits the pages that chunk fills, besides
    those earlier chunks filled, but not the page the chunk leaves partial."""
    kv = KVManager(BlockAllocator(32), PAGE)
    sched = PrefillScheduler(kv, max_tokens=3 * PAGE)
    doc = document(21, 5 * PAGE + 1)
    first, second = request("first", doc), request("second", doc + document(22, 7))
    sched.add(first)
    chunks, reqs = planned(sched)
    assert chunks == [("first", 0, 3 * PAGE)]
    finish(sched, reqs, [3 * PAGE])
    sched.add(second)
    chunks, reqs = planned(sched)  # the rest of `first` (pages 3 and 4 full, page 5 holds 1 token), then `second`
    assert chunks == [("first", 3 * PAGE, 2 * PAGE + 1), ("second", 5 * PAGE, PAGE - 1)]
    assert second.block_ids[:5] == first.block_ids[:5] and second.block_ids[5] != first.block_ids[5]
    assert second.num_cached_tokens == 5 * PAGE
    finish(sched, reqs, [2 * PAGE + 1, PAGE - 1])
    for r in (first, second):
        sched.drop(r)
    assert_kv_whole(kv)


@pytest.mark.parametrize("publisher_first", [True, False])
def test_an_iteration_that_is_never_queued_takes_its_pages_out_of_the_cache(publisher_first: bool) -> None:
    """The pages published ahead for an iteration that could not be queued are never written: once its requests
    are dropped (those that hit them too, in either order), no later request may hit them."""
    kv = KVManager(BlockAllocator(16), PAGE)
    sched = PrefillScheduler(kv, max_tokens=64)
    prompt = document(23, 3 * PAGE + 1)
    publisher, hitter = request("publisher", prompt), request("hitter", prompt)
    sched.add(publisher)
    sched.add(hitter)
    chunks, reqs = planned(sched)
    assert reqs == [publisher, hitter] and hitter.num_computed_tokens == 3 * PAGE
    kv.allocator.check_integrity()
    for r in (reqs if publisher_first else reversed(reqs)):
        sched.drop(r)
        kv.allocator.check_integrity()
    later = request("later", prompt)
    kv.match_prefix(later)
    assert later.num_computed_tokens == 0 and not later.block_ids, "a page that was never written was served"
    assert_kv_whole(kv)


def assert_kv_whole(kv: KVManager) -> None:
    kv.allocator.check_integrity()
    assert kv.num_free_pages == kv.allocator.num_blocks


# -- the engine --------------------------------------------------------------------------------------


GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def model_dir(model_factory: Callable[[str], Path]) -> Path:
    return model_factory("tiny-llama")


@pytest.fixture(scope="module", params=["unified", "semi-pd"])
def llm(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[LLM]:
    engine = LLM(model_dir, mode=request.param, cache=CacheConfig(page_size=ENGINE_PAGE),
                 scheduler=SchedulerConfig(max_prefill_tokens=64))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def cold(model_dir: Path) -> Iterator[LLM]:
    engine = LLM(model_dir, mode="unified", cache=CacheConfig(page_size=ENGINE_PAGE, enable_prefix_caching=False))
    yield engine
    engine.shutdown()


def one(llm: LLM, prompt: list[int], params: SamplingParams = GREEDY) -> CompletionOutput:
    (out,) = llm.generate([prompt], params)
    assert out.error is None, out.error
    return out


def assert_pool_whole(llm: LLM) -> None:
    alloc = llm.core.allocator
    alloc.check_integrity()
    assert alloc.num_free == alloc.num_blocks


def test_cached_tokens_are_whole_pages_and_never_the_last_token(llm: LLM, cold: LLM) -> None:
    llm.core.allocator.reset_prefix_cache()
    exact = document(10, 3 * ENGINE_PAGE)
    ref = one(cold, exact)
    first, second = one(llm, exact), one(llm, exact)
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 2 * ENGINE_PAGE)
    assert first.token_ids == second.token_ids == ref.token_ids
    mid_page = exact[: 2 * ENGINE_PAGE + 5] + document(11, 7)  # shares 2 pages and 5 tokens of a third
    assert one(llm, mid_page).num_cached_tokens == 2 * ENGINE_PAGE
    short = exact[:ENGINE_PAGE - 3]
    assert [one(llm, short).num_cached_tokens for _ in range(2)] == [0, 0]
    assert_pool_whole(llm)


def test_only_requests_of_the_same_salt_share_pages(llm: LLM) -> None:
    llm.core.allocator.reset_prefix_cache()
    prompt = document(12, 2 * ENGINE_PAGE + 3)
    salted = [SamplingParams(max_tokens=2, temperature=0.0, cache_salt=s) for s in ("alice", "bob", "alice")]
    assert one(llm, prompt).num_cached_tokens == 0
    assert [one(llm, prompt, p).num_cached_tokens for p in salted] == [0, 0, 2 * ENGINE_PAGE]
    odd = SamplingParams(max_tokens=2, temperature=0.0, cache_salt="\ud800")
    results: list[list[CompletionOutput]] = []
    worker = threading.Thread(target=lambda: results.append([one(llm, prompt, odd) for _ in range(2)]), daemon=True)
    worker.start()
    worker.join(60)
    assert results, "a request with a lone-surrogate cache_salt never finished"
    assert [o.num_cached_tokens for o in results[0]] == [0, 2 * ENGINE_PAGE]
    assert one(llm, prompt).num_cached_tokens == 2 * ENGINE_PAGE, "the engine stopped serving after that salt"
    assert_pool_whole(llm)


def test_prompt_logprobs_requests_read_no_cached_page(llm: LLM, cold: LLM) -> None:
    llm.core.allocator.reset_prefix_cache()
    prompt = document(13, 3 * ENGINE_PAGE + 2)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    one(llm, prompt)
    got, ref = one(llm, prompt, params), one(cold, prompt, params)
    assert got.num_cached_tokens == 0
    assert len(got.prompt_logprobs) == len(prompt) - 1
    for g, r in zip(got.prompt_logprobs, ref.prompt_logprobs):
        assert g.token_id == r.token_id and g.logprob == pytest.approx(r.logprob, abs=1e-4)
    assert one(llm, prompt).num_cached_tokens == 3 * ENGINE_PAGE  # its pages were cached for others
    assert_pool_whole(llm)


def test_reset_prefix_cache_makes_the_next_prompt_computed_again(llm: LLM) -> None:
    llm.core.allocator.reset_prefix_cache()
    prompt = document(14, 2 * ENGINE_PAGE + 1)
    one(llm, prompt)
    assert llm.core.allocator.reset_prefix_cache() >= 2
    assert one(llm, prompt).num_cached_tokens == 0
    assert one(llm, prompt).num_cached_tokens == 2 * ENGINE_PAGE
    assert_pool_whole(llm)


# -- the engine: hits within one prefill iteration ---------------------------------------------------------------------

SYSTEM = document(30, 3 * ENGINE_PAGE + 5)  # a long shared system prompt: 3 full pages and 5 tokens of a fourth
BURSTS = {
    "n": [SYSTEM + document(31, 6)] * 3,  # the siblings of one prompt (n = 3)
    "system prompt": [SYSTEM + document(32 + i, 6 + i) for i in range(3)],  # chats sharing their system prompt
}


class InjectedFault(RuntimeError):
    """A step's failure made by the test (the device stays usable)."""


def by_hand(model_dir: Path, mode: str, deltas: list[TokenDelta], overlap: bool = True,
            prefix_caching: bool = True) -> EngineCore:
    """An engine whose workers this thread steps (nothing runs on its own), one iteration large enough for a burst."""
    config = EngineConfig(model=str(model_dir), mode=mode, overlap_decode=overlap, overlap_prefill=overlap,
                          cache=CacheConfig(page_size=ENGINE_PAGE, enable_prefix_caching=prefix_caching),
                          scheduler=SchedulerConfig(max_prefill_tokens=256))
    return EngineCore(config, emit=deltas.extend)


def step_until_done(core: EngineCore, rids: list[str], deltas: list[TokenDelta]) -> None:
    step_until(core, lambda: all(rid in ended(deltas) for rid in rids), f"the ends of {rids}")


def ended(deltas: list[TokenDelta]) -> dict[str, FinishReason]:
    return {d.request_id: d.finish_reason for d in deltas if d.finish_reason is not None}


def output(deltas: list[TokenDelta], rid: str) -> list[int]:
    return [t for d in deltas if d.request_id == rid for t in d.new_token_ids]


def cached(deltas: list[TokenDelta], rid: str) -> int:
    return max(d.num_cached_tokens for d in deltas if d.request_id == rid)


def alone(model_dir: Path, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each prompt's tokens run alone on an engine without prefix caching."""
    deltas: list[TokenDelta] = []
    core = by_hand(model_dir, "unified", deltas, overlap=False, prefix_caching=False)
    outs = []
    for i, prompt in enumerate(prompts):
        core.add_request(f"alone-{i}", prompt, params)
        step_until_done(core, [f"alone-{i}"], deltas)
        outs.append(output(deltas, f"alone-{i}"))
    return outs


def whole(core: EngineCore) -> None:
    core.allocator.check_integrity()
    assert core.allocator.num_free == core.allocator.num_blocks and core.num_unfinished == 0


BURST_PARAMS = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("burst", sorted(BURSTS))
@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_requests_arriving_together_compute_their_shared_prefix_once(model_dir: Path, mode: str, burst: str) -> None:
    """Requests sharing a prefix, admitted into one prefill iteration, compute its full pages once: the first
    request computes them, the others hit them in that same iteration (the prefix-cache hit counters, vLLM's
    `prefix_cache_hits`, count them; the iteration computes only the rest of their prompts), and each generates
    what it generates alone."""
    prompts = BURSTS[burst]
    deltas: list[TokenDelta] = []
    core = by_hand(model_dir, mode, deltas)
    prefills = record_prefills(core)
    rids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt in zip(rids, prompts):
        core.add_request(rid, prompt, BURST_PARAMS)
    step_until_done(core, rids, deltas)
    shared = 3 * ENGINE_PAGE
    assert prefills[0] == [("r0", 0, len(prompts[0]))] + [(rid, shared, len(p) - shared)
                                                         for rid, p in zip(rids[1:], prompts[1:])]
    assert len(prefills) == 1, "the burst took more than one prefill iteration"
    assert [cached(deltas, rid) for rid in rids] == [0] + [shared] * (len(prompts) - 1)
    stats = core.stats()
    assert (stats.prefix_queried_tokens, stats.prefix_hit_tokens) == (sum(map(len, prompts)), 2 * shared)
    assert set(ended(deltas).values()) == {FinishReason.LENGTH}
    assert [output(deltas, rid) for rid in rids] == alone(model_dir, prompts, BURST_PARAMS)
    whole(core)


def fail_the_burst(core: EngineCore, rids: set[str]) -> list[int]:
    """Make the forward pass with prompt chunks of all of `rids` raise, before it queues anything (once); the list
    counts the failures."""
    failures: list[int] = []
    for w in core.workers:
        forward = w.runner.forward

        def failing(plan: BatchPlan, carry: object = None, before_kernels=None,  # type: ignore[no-untyped-def]
                    _forward=forward):
            if not failures and rids <= {c.request_id for c in plan.prefills}:
                failures.append(1)
                raise InjectedFault("injected failure")
            return _forward(plan, carry, before_kernels)

        w.runner.forward = failing  # type: ignore[method-assign]
    return failures


PATHS = {  # mode, overlap, a decode running when the burst arrives (the step is queued behind it)
    "semi-pd prefill iteration": ("semi-pd", True, False),
    "unified step": ("unified", True, False),
    "unified step, one at a time": ("unified", False, False),
    "unified step queued behind a decode step": ("unified", True, True),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_pages_published_for_an_iteration_that_failed_are_not_served_later(model_dir: Path, path: str) -> None:
    """When the iteration in which one request hit pages that another computes cannot be queued, those pages are
    never written: both requests end with an engine error, and a later request with the same prompt computes it
    (no hit) and generates what it generates alone."""
    mode, overlap, behind_decode = PATHS[path]
    prompt = BURSTS["n"][0]
    deltas: list[TokenDelta] = []
    core = by_hand(model_dir, mode, deltas, overlap=overlap)
    worker = core.workers[0]
    if behind_decode:
        core.add_request("decoding", document(40, 5), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        while len(output(deltas, "decoding")) < 2:
            worker.step()
        assert worker._inflight is not None
    failures = fail_the_burst(core, {"a", "b"})
    core.add_request("a", prompt, BURST_PARAMS)
    core.add_request("b", prompt, BURST_PARAMS)
    escaped = []
    for _ in range(3):
        try:
            worker.step()
        except InjectedFault as e:  # a step queued behind a decode step lets it escape (the worker's loop logs it)
            escaped.append(e)
        core.allocator.check_integrity()
    assert failures == [1] and len(escaped) == int(behind_decode)
    assert {rid: ended(deltas).get(rid) for rid in ("a", "b")} == {"a": FinishReason.ERROR, "b": FinishReason.ERROR}
    core.add_request("c", prompt, BURST_PARAMS)
    step_until_done(core, ["c", "decoding"] if behind_decode else ["c"], deltas)
    assert cached(deltas, "c") == 0, "a page that was never written was served from the prefix cache"
    (expected,) = alone(model_dir, [prompt], BURST_PARAMS)
    assert ended(deltas)["c"] == FinishReason.LENGTH and output(deltas, "c") == expected
    if behind_decode:  # its step was queued again, alone
        (expected,) = alone(model_dir, [document(40, 5)], SamplingParams(max_tokens=12, temperature=0.0,
                                                                          ignore_eos=True))
        assert ended(deltas)["decoding"] == FinishReason.LENGTH and output(deltas, "decoding") == expected
    whole(core)

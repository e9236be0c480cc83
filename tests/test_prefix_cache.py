"""Automatic prefix caching as vLLM's: page keys, salts, reported cached tokens, reset, LRU eviction.

Unit tests drive the allocator and `KVManager` directly; engine tests run a tiny model on CPU and check what a
user sees (`num_cached_tokens`, tokens, logprobs) against an engine with the cache cold or off.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import actors.kv.allocator as allocator_module
from actors.config import CacheConfig, SchedulerConfig
from actors.engine.frontend import LLM, CompletionOutput
from actors.kv.allocator import BlockAllocator, page_hashes
from actors.kv.manager import KVManager
from actors.request import Request, SamplingParams

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

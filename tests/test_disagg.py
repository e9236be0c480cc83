"""Disaggregated baseline: a prefill-only and a decode-only engine over separate KV pools.

Greedy tokens equal the unified engine's, the transport moves exactly the KV of each
prompt's pages, and every page comes back on both sides, aborts included.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from actors.config import CacheConfig, EngineConfig, ModelArch, SchedulerConfig
from actors.disagg.frontend import DisaggLLM
from actors.disagg.pair import DisaggPair
from actors.disagg.transport import CpuTransport
from actors.engine.frontend import LLM
from actors.kv.manager import pages_for
from actors.request import FinishReason, SamplingParams, TokenDelta

from support import wait_until

CHUNK = 64  # prefill token budget: prompts above it take several iterations
PAGE = 16
P_PAGES, D_PAGES = 48, 160
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
LENGTHS = (3, 15, 16, 17, 40, 64, 65, 100, 150, 230)

pytestmark = pytest.mark.timeout(120)  # a lost request hangs generate(): fail instead


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in LENGTHS]


def kv_bytes_per_page(model_dir: Path) -> int:
    a = ModelArch.from_dir(model_dir)
    return a.num_layers * 2 * PAGE * a.num_kv_heads * a.head_dim * 4  # fp32


def assert_all_pages_back(pair: DisaggPair) -> None:
    for engine in (pair.prefill, pair.decode):
        wait_until(lambda e=engine: e.allocator.num_free == e.allocator.num_blocks, 10, "all pages freed")
        engine.allocator.check_integrity()


@pytest.fixture
def disagg_llm(tiny_llama: Path) -> Iterator[DisaggLLM]:
    llm = DisaggLLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
                    prefill_cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES),
                    decode_cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES))
    yield llm
    llm.shutdown()


def test_greedy_tokens_equal_unified_and_bytes_are_exact(
    tiny_llama: Path, disagg_llm: DisaggLLM, check_greedy: Callable[[list[list[int]], list[object]], None]
) -> None:
    prompts = make_prompts()
    with LLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
             cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES)) as unified:
        reference = unified.generate(prompts, GREEDY)
    outs = disagg_llm.generate(prompts, GREEDY)

    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    check_greedy([o.token_ids for o in outs], reference)
    pair = disagg_llm.pair
    assert pair.decode.num_preemptions == 0  # else some KV would have moved twice
    assert pair.decode.num_imported == len(prompts)
    expected = sum(pages_for(len(p), PAGE) for p in prompts) * kv_bytes_per_page(tiny_llama)
    assert disagg_llm.transport.bytes_moved == expected
    assert pair.num_unfinished == 0
    assert_all_pages_back(pair)


def test_decode_pool_smaller_than_the_load_queues_imports(tiny_llama: Path,
                                                          check_greedy: Callable[..., None]) -> None:
    """A decode pool that holds about two requests: imports wait for pages, decodes preempt and
    go back to prefill for recomputation, and the tokens are still the unified engine's."""
    prompts = make_prompts(1)[4:]  # 40..230 tokens
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    with LLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
             cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES)) as unified:
        reference = unified.generate(prompts, params)
    with DisaggLLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
                   prefill_cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES),
                   decode_cache=CacheConfig(page_size=PAGE, num_pages=17)) as llm:
        outs = llm.generate(prompts, params)
        check_greedy([o.token_ids for o in outs], reference)
        assert llm.transport.bytes_moved >= sum(pages_for(len(p), PAGE) for p in prompts) * kv_bytes_per_page(tiny_llama)
        assert_all_pages_back(llm.pair)


# -- aborts, stepped by hand (no worker threads) so each lands where the test says ------------

class Collected:
    def __init__(self) -> None:
        self.deltas: list[TokenDelta] = []

    def __call__(self, deltas: list[TokenDelta]) -> None:
        self.deltas.extend(deltas)

    def finish_of(self, rid: str) -> FinishReason | None:
        return next((d.finish_reason for d in self.deltas if d.request_id == rid and d.finished), None)


@pytest.fixture
def stepped_pair(tiny_llama: Path) -> Iterator[tuple[DisaggPair, Collected]]:
    # one iteration per step, its prompts exported by that step (the tests check each step's effect)
    base = EngineConfig(model=str(tiny_llama), device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
                        overlap_prefill=False)
    out = Collected()
    pair = DisaggPair(EngineConfig(**{**base.__dict__, "cache": CacheConfig(page_size=PAGE, num_pages=P_PAGES)}),
                      EngineConfig(**{**base.__dict__, "cache": CacheConfig(page_size=PAGE, num_pages=D_PAGES)}),
                      out, CpuTransport())
    yield pair, out  # never started: the tests step the workers themselves


LONG = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)


def test_abort_during_prefill_frees_prefill_pages(stepped_pair: tuple[DisaggPair, Collected]) -> None:
    pair, out = stepped_pair
    pair.add_request("a", make_prompts(2)[-1], LONG)  # 230 tokens: four chunks
    prefill = pair.prefill.workers[0]
    assert prefill.step()
    assert pair.prefill.allocator.num_free < P_PAGES  # holds pages for its first chunk
    assert pair.abort("a")
    prefill.step()
    assert out.finish_of("a") == FinishReason.ABORT
    assert pair.transport.bytes_moved == 0
    assert pair.num_unfinished == 0
    assert_all_pages_back(pair)


def test_abort_in_transit_and_on_decode(stepped_pair: tuple[DisaggPair, Collected]) -> None:
    pair, out = stepped_pair
    prompt = make_prompts(3)[-1][:30]  # two of them fit one chunk
    pair.add_request("transit", prompt, LONG)
    pair.add_request("decoding", prompt[::-1], LONG)
    assert pair.prefill.workers[0].step()  # both prefilled in one batch and exported
    assert pair.transport.num_sent == 2  # type: ignore[attr-defined]
    assert pair.prefill.allocator.num_free == P_PAGES  # exported pages are freed at once
    assert pair.abort("transit")  # in the queue: applied when the decode side receives it
    pair.decode.poll_imports(timeout=1.0)
    pair.decode.poll_imports(timeout=1.0)
    assert out.finish_of("transit") == FinishReason.ABORT
    assert pair.decode.num_imported == 1
    decode = pair.decode.workers[0]
    for _ in range(3):
        assert decode.step()
    held = D_PAGES - pair.decode.allocator.num_free
    assert held == pages_for(len(prompt) + 3, PAGE)
    assert pair.abort("decoding")
    decode.step()
    assert out.finish_of("decoding") == FinishReason.ABORT
    tokens = [t for d in out.deltas if d.request_id == "decoding" for t in d.new_token_ids]
    assert len(tokens) == 4  # the first from prefill, three from decode
    assert pair.num_unfinished == 0
    assert_all_pages_back(pair)

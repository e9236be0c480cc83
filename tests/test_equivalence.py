"""Greedy generation is token-for-token identical to transformers on the same weights.

All prompts run together through one engine, so the batches mix decodes with chunked
prefills, later prompts reuse the cached pages of a shared prefix, and (with a small
KV pool) requests are preempted and recomputed.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from actors.config import CacheConfig, SchedulerConfig
from actors.engine.frontend import LLM
from actors.request import SamplingParams
from actors.scheduler.plan import BatchPlan
from support import wait_until

PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3")
MAX_TOKENS = 12
CHUNK = 64  # prefill token budget per iteration: prompts above it take several steps
PAGE = 16
SHARED_PREFIX = 48  # three full pages
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

pytestmark = pytest.mark.timeout(120)  # a lost request hangs generate(): fail instead


@dataclass(frozen=True)
class Reference:
    model_dir: Path
    prompts: list[list[int]]
    expected: list[list[int]]


def make_prompts(seed: int = 0) -> list[list[int]]:
    """Lengths 3..300; four prompts share a 48-token prefix, with long prompts between them."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(256) for _ in range(n)]

    prefix = tokens(SHARED_PREFIX)
    lengths = [3, 4, 7, 12, 15, 16, 17, 31, 33, 48, 63, 64, 65, 90, 127, 129, 160, 200, 241, 256, 299, 300]
    prompts = [tokens(n) for n in lengths]
    for i, suffix in zip((2, 9, 15, 21), (1, 10, 40, 70)):
        prompts.insert(i, prefix + tokens(suffix))
    return prompts


def hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_TOKENS, eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module", params=PRESETS)
def reference(request: pytest.FixtureRequest, model_factory: Callable[[str], Path]) -> Reference:
    model_dir = model_factory(request.param)
    prompts = make_prompts()
    expected = hf_greedy(model_dir, prompts)
    assert all(len(e) == MAX_TOKENS for e in expected)
    return Reference(model_dir, prompts, expected)


@dataclass
class PlanLog:
    """Plans a worker executed (recorded by wrapping its runner)."""

    plans: list[BatchPlan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def mixed(self) -> bool:
        return any(p.decodes and p.prefills for p in self.plans)

    def chunked_requests(self) -> set[str]:
        """Requests whose prompt was split over two or more iterations."""
        seen: dict[str, int] = {}
        for p in self.plans:
            for c in p.prefills:
                seen[c.request_id] = seen.get(c.request_id, 0) + 1
        return {rid for rid, n in seen.items() if n > 1}


def record_plans(llm: LLM) -> PlanLog:
    log = PlanLog()
    for worker in llm.core.workers:
        launch = worker.runner.launch

        def recording(plan: BatchPlan, sample_reqs: list, carry=None,  # type: ignore[no-untyped-def]
                      before_kernels=None, _launch=launch):
            with log.lock:
                log.plans.append(plan)
            return _launch(plan, sample_reqs, carry, before_kernels)

        worker.runner.launch = recording  # type: ignore[method-assign]
    return log


@pytest.fixture
def engine_factory() -> Iterator[Callable[..., LLM]]:
    made: list[LLM] = []

    def make(model_dir: Path, **kwargs: object) -> LLM:
        llm = LLM(model_dir, scheduler=SchedulerConfig(max_prefill_tokens=CHUNK), **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.shutdown()


def generate_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, GREEDY)
    assert all(o.finish_reason == "length" for o in outs)
    return [o.token_ids for o in outs]


def assert_same_tokens(got: list[list[int]], ref: Reference, n: int | None = None) -> None:
    """The first `n` (default: all) prompts' tokens equal transformers'."""
    pairs = list(zip(ref.prompts, got, ref.expected))[:n]
    assert len(got) == len(pairs)
    mismatched = [(len(p), g, e) for p, g, e in pairs if g != e]
    assert not mismatched, f"{len(mismatched)} of {len(pairs)} prompts differ from transformers: {mismatched[:3]}"


def varied_params(i: int, seed: int, sampled_tokens: int, greedy_spread: int) -> SamplingParams:
    """Request i's parameters: every fifth ends at its first token, every fourth (from 1) samples with its own
    seed for `sampled_tokens`, the rest are greedy for 4 to 3 + `greedy_spread` tokens."""
    if i % 5 == 0:
        return SamplingParams(max_tokens=1, temperature=0.0)
    if i % 4 == 1:
        return SamplingParams(max_tokens=sampled_tokens, temperature=0.8, top_p=0.9, seed=seed + i, ignore_eos=True)
    return SamplingParams(max_tokens=4 + i % greedy_spread, temperature=0.0, ignore_eos=True)


def assert_pool_drained(llm: LLM) -> None:
    alloc = llm.core.allocator
    assert alloc.num_free == alloc.num_blocks
    alloc.check_integrity()


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_batched_chunked_prefix_cached_matches_hf(
    reference: Reference, engine_factory: Callable[..., LLM], mode: str
) -> None:
    llm = engine_factory(reference.model_dir, mode=mode, cache=CacheConfig(page_size=PAGE))
    log = record_plans(llm)
    assert_same_tokens(generate_tokens(llm, reference.prompts), reference)
    assert llm.core.allocator.prefix_hits > 0
    stats = llm.core.stats()
    assert stats.prefix_queried_tokens == sum(len(p) for p in reference.prompts)
    assert 0 < stats.prefix_hit_tokens < stats.prefix_queried_tokens and stats.prefix_hit_tokens % PAGE == 0
    assert len(log.chunked_requests()) >= sum(len(p) > CHUNK for p in reference.prompts)
    assert all(p.num_tokens <= CHUNK for p in log.plans)
    if mode == "unified":
        assert log.mixed, "no iteration mixed decodes with prefill chunks"
    else:  # the prefill iterations the engine publishes (as a speed, for the split policy) count every chunk
        (prefill,) = [w for w in llm.core.workers if w.name == "prefill"]
        recent = prefill.recent_iterations(span_s=float("inf"), this_split=True)
        computed = stats.prefix_queried_tokens - stats.prefix_hit_tokens
        assert recent.count >= len(log.chunked_requests()) and recent.count * recent.mean_tokens == pytest.approx(computed)
    assert_pool_drained(llm)


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_preempted_requests_match_hf(reference: Reference, engine_factory: Callable[..., LLM], mode: str) -> None:
    longest = max(len(p) for p in reference.prompts) + MAX_TOKENS
    num_pages = -(-longest // PAGE) + 4  # room for the longest request, far from room for all
    llm = engine_factory(reference.model_dir, mode=mode, cache=CacheConfig(page_size=PAGE, num_pages=num_pages))
    assert_same_tokens(generate_tokens(llm, reference.prompts), reference)
    if mode == "unified":  # deterministic schedule; in semi-pd mode preemption depends on thread timing
        assert llm.core.num_preemptions > 0
    assert_pool_drained(llm)


def test_prompt_logprobs_survive_preemption_and_chunking(reference: Reference, engine_factory: Callable[..., LLM]
                                                        ) -> None:
    """A pool far too small for the load (prompts preempted and computed again) and 64-token chunks: every prompt's
    logprobs arrive once, complete and in order, equal to those of a pool with room for all."""
    params = replace(GREEDY, prompt_logprobs=0)
    longest = max(len(p) for p in reference.prompts) + MAX_TOKENS
    tight = engine_factory(reference.model_dir, mode="unified",
                           cache=CacheConfig(page_size=PAGE, num_pages=-(-longest // PAGE) + 4))
    roomy = engine_factory(reference.model_dir, mode="unified", cache=CacheConfig(page_size=PAGE))
    got, want = tight.generate(reference.prompts, params), roomy.generate(reference.prompts, params)
    assert tight.core.num_preemptions > 0
    for p, g, w in zip(reference.prompts, got, want):
        assert [lp.token_id for lp in g.prompt_logprobs] == p[1:]
        assert [lp.logprob for lp in g.prompt_logprobs] == pytest.approx([lp.logprob for lp in w.prompt_logprobs],
                                                                          abs=1e-4)
    assert [o.token_ids for o in got] == reference.expected
    assert_pool_drained(tight)


def test_prefix_caching_off_matches_hf(reference: Reference, engine_factory: Callable[..., LLM]) -> None:
    llm = engine_factory(reference.model_dir, cache=CacheConfig(page_size=PAGE, enable_prefix_caching=False))
    assert_same_tokens(generate_tokens(llm, reference.prompts[:8]), reference, n=8)
    assert llm.core.allocator.prefix_hits == 0
    stats = llm.core.stats()
    assert stats.prefix_hit_tokens == 0 and stats.prefix_queried_tokens == sum(len(p) for p in reference.prompts[:8])


@pytest.mark.parametrize("fused", [True, False])
def test_kv_write_puts_k_and_v_in_their_slots(fused: bool) -> None:
    """One index_put writes both halves; k and v sliced from one QKV output are used in place, not copied."""
    from actors.attention.base import _kv_pair, kv_rows, write_kv
    from actors.config import ModelArch
    from actors.kv.pool import KVPool

    arch = ModelArch.from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
                                "vocab_size": 100, "head_dim": 16})
    pool = KVPool(arch, num_pages=6, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    slots = torch.tensor([0, 5, 22, 7, 13])  # page * 4 + offset
    q_size, kv_size = arch.q_size, arch.kv_size
    qkv = torch.randn(len(slots), q_size + 2 * kv_size)
    _, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    k, v = k.view(-1, 2, 16), v.view(-1, 2, 16)
    if not fused:
        k = k.clone()
    pair = _kv_pair(k, v)
    assert (pair.data_ptr() == k.data_ptr()) is fused and torch.equal(pair, torch.stack((k, v), dim=1))
    write_kv(pool, 1, kv_rows(slots, pool.page_size), k, v)
    cache = pool.layer(1)
    for t, slot in enumerate(slots.tolist()):
        page, off = divmod(slot, pool.page_size)
        assert torch.equal(cache[page, 0, off], k[t]) and torch.equal(cache[page, 1, off], v[t])
    written = sum(int(cache[p, h, o].abs().sum() > 0) for p in range(7) for h in range(2) for o in range(4))
    assert written == 2 * len(slots) and not pool.layer(0).any()


def test_page_table_for_flashinfer_is_checked_before_it_reaches_the_device() -> None:
    """A page table that would send the kernels outside a sequence's pages raises on the host instead."""
    from actors.attention.flashinfer_backend import _paged_indices

    indptr, indices, last = _paged_indices(((3, 1), (4,), (6,)), (5, 4, 1), page_size=4)
    assert (indptr, indices, last) == ([0, 2, 3, 4], [3, 1, 4, 6], [1, 4, 1])
    with pytest.raises(ValueError, match="sequence 1 of the batch has 1 pages for a context of 5"):
        _paged_indices(((3, 1), (4,)), (5, 5), page_size=4)
    with pytest.raises(ValueError, match="context of 0"):
        _paged_indices(((3,),), (0,), page_size=4)


def test_runner_on_a_new_split_orders_its_stream_after_the_old_one(tiny_llama: Path,
                                                                  engine_factory: Callable[..., LLM]) -> None:
    """The contract `set_partition` keeps with the streams (on the GPU: tests/test_gpu.py): moving to
    another split's stream makes that stream wait for the old one; staying, or having none, waits for nothing."""
    from actors.engine.partitioner import Partition

    class Stream:
        def __init__(self) -> None:
            self.waited_for: list[Stream] = []

        def wait_stream(self, other: Stream) -> None:
            self.waited_for.append(other)

    runner = engine_factory(tiny_llama, mode="semi-pd").core._make_runner(decodes=False)  # no worker moves it
    a, b = Stream(), Stream()
    for stream in (a, a, b, None):
        runner.set_partition(Partition(stream, 64))  # type: ignore[arg-type]
    assert a.waited_for == [] and b.waited_for == [a] and runner.stream is None


def test_overlapped_decode_matches_one_step_at_a_time(model_factory: Callable[[str], Path],
                                                      engine_factory: Callable[..., LLM]) -> None:
    """Queuing each decode step (semi-pd decode worker, unified decode-only steps) before the previous
    one's tokens are known changes no token, no finish reason and leaks no page: requests stop early
    (stop tokens), at varied max_tokens, seeded sampling keeps its draws, batches with penalties and
    min_tokens draw once the step before has its tokens, and logprobs (reduced on the device with the draw) are
    those of one step at a time."""
    from actors.request import PENDING_TOKEN

    model = model_factory("tiny-llama")
    prompts = make_prompts(seed=3)
    probe = engine_factory(model, mode="semi-pd", overlap_decode=False)
    free_run = [o.token_ids for o in probe.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0,
                                                                            ignore_eos=True))]

    def params(i: int) -> SamplingParams:
        stop = (free_run[i][2 + i % 9],) if i % 3 else ()  # ends early for two thirds of the prompts
        if i % 4 == 1:
            return SamplingParams(max_tokens=5 + i % 16, temperature=0.8, top_p=0.9, seed=100 + i, ignore_eos=True,
                                  stop_token_ids=stop)
        return SamplingParams(max_tokens=5 + i % 16, temperature=0.0, ignore_eos=True, stop_token_ids=stop)

    plain = [params(i) for i in range(len(prompts))]
    with_logprobs = [replace(p, logprobs=1) if i == 5 else p for i, p in enumerate(plain)]
    # penalties (and min_tokens) need the step before's tokens: those steps' draws wait for them, still queued ahead
    penalised = [replace(p, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4,
                         min_tokens=min(3, p.max_tokens)) if i % 2 else p for i, p in enumerate(plain)]
    unified_probe = engine_factory(model, mode="unified", overlap_decode=False)
    for mode, batch_params in (("semi-pd", plain), ("semi-pd", with_logprobs), ("unified", plain),
                               ("semi-pd", penalised), ("unified", penalised)):
        ref = (probe if mode == "semi-pd" else unified_probe).generate(prompts, batch_params)
        llm = engine_factory(model, mode=mode)
        got = llm.generate(prompts, batch_params)
        assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in ref]
        for o, r in zip(got, ref):  # the batches differ, so the logprobs within rounding
            assert [[t for t, _ in lp.top] for lp in o.logprobs] == [[t for t, _ in lp.top] for lp in r.logprobs]
            assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(o.logprobs, r.logprobs))
        assert sum(o.finish_reason == "stop" for o in got) >= len(prompts) // 3
        assert not any(PENDING_TOKEN in o.token_ids for o in got)
        decode = llm.core.workers[-1]
        assert decode.overlap and decode.steps_queued_ahead > 0
        alloc = llm.core.allocator
        wait_until(lambda: alloc.num_free == alloc.num_blocks, what="every page back (a dropped step frees its pages)")
        alloc.check_integrity()
        assert llm.core.decode.num_running == 0


def test_unified_mixed_batches_queued_ahead_change_no_token(model_factory: Callable[[str], Path],
                                                           engine_factory: Callable[..., LLM]) -> None:
    """Unified mode queues mixed batches (decodes that take their input from the running batch's draw, plus prompt
    chunks) before the running one's tokens are known. That changes no token and no finish reason and leaks no
    page, with chunked and prefix-shared prompts, prompts that end at their first token while the next batch is
    queued, and seeded sampling."""
    model = model_factory("tiny-llama")
    prompts = make_prompts(seed=7)
    batch = [varied_params(i, seed=300, sampled_tokens=9, greedy_spread=11) for i in range(len(prompts))]
    runs = {}
    for overlap in (False, True):
        llm = engine_factory(model, mode="unified", overlap_decode=overlap)
        worker = llm.core.workers[0]
        launch, mixed_ahead = worker.runner.launch, []

        def noting_launch(plan, sample_reqs, carry=None, before_kernels=None,  # type: ignore[no-untyped-def]
                          _launch=launch, _mixed=mixed_ahead):
            _mixed.append(bool(plan.prefills and plan.decodes and carry is not None))
            return _launch(plan, sample_reqs, carry, before_kernels)

        worker.runner.launch = noting_launch  # type: ignore[method-assign]
        runs[overlap] = [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, batch)]
        assert any(mixed_ahead) == overlap and (worker.steps_queued_ahead > 0) == overlap
        wait_until(lambda llm=llm: llm.core.allocator.num_free == llm.core.allocator.num_blocks,
                   what="every page back")
        assert_pool_drained(llm)
    assert runs[True] == runs[False]
    assert sum(len(t) == 1 for t, _ in runs[True]) >= len(prompts) // 5


def test_step_pacer_spaces_steps_only_while_asked() -> None:
    from actors.engine.pacing import StepPacer

    now, slept, busy = [0.0], [], [True]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = StepPacer(0.02, lambda: busy[0], sleep, clock=lambda: now[0])
    pacer.wait()  # the first step: nothing to space it from
    now[0] += 0.005
    pacer.wait()  # 5 ms after the last one started: waits the other 15
    assert slept == [pytest.approx(0.015)]
    now[0] += 0.03
    pacer.wait()  # the last step took longer than the pace: no wait
    busy[0] = False
    now[0] += 0.001
    pacer.wait()  # nothing asks for pacing (prefill idle): no wait
    assert len(slept) == 1 and pacer.waited_s == pytest.approx(0.015)
    with pytest.raises(ValueError, match="interval_s must be positive"):
        StepPacer(0.0, lambda: True, sleep)


def test_paced_decode_changes_no_token(model_factory: Callable[[str], Path],
                                       engine_factory: Callable[..., LLM]) -> None:
    """A semi-PD engine with `decode_pace_ms` gives its decode worker a pacer, which it asks before every step.
    Here the pacer is told that prefill always has work and its clock stands still, so every step but the first
    waits one whole pace (recorded, not slept): the tokens are those of back-to-back steps, and the engine's
    stats report the pace and the time waited."""
    model = model_factory("tiny-llama")
    prompts = make_prompts(seed=7)[:6]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    plain = engine_factory(model, mode="semi-pd")
    expected = [o.token_ids for o in plain.generate(prompts, params)]
    assert plain.core.workers[-1].pacer is None and plain.core.stats().paced_seconds == {}

    paced = engine_factory(model, mode="semi-pd", decode_pace_ms=20)
    pacer = paced.core.workers[-1].pacer
    assert pacer is not None and pacer.interval_s == pytest.approx(0.02)
    slept: list[float] = []
    pacer.when, pacer.clock, pacer.sleep = (lambda: True), (lambda: 100.0), slept.append
    assert [o.token_ids for o in paced.generate(prompts, params)] == expected
    assert len(slept) >= 3 and slept == [pytest.approx(0.02)] * len(slept)
    stats = paced.core.stats()
    assert stats.decode_pace_ms == 20 and stats.paced_seconds == {"decode": pytest.approx(0.02 * len(slept))}
    unified = engine_factory(model, mode="unified", decode_pace_ms=20)  # one loop, nothing to pace against
    assert unified.core.stats().decode_pace_ms == 0.0 and unified.core.stats().paced_seconds == {}


def test_overlapped_prefill_matches_one_iteration_at_a_time(model_factory: Callable[[str], Path],
                                                            engine_factory: Callable[..., LLM]) -> None:
    """The semi-PD prefill worker queues each iteration before taking the previous one's first tokens; that
    changes no token and no finish reason and leaks no page, with chunked and prefix-shared prompts, requests
    that end at their first token (their pages given back while the next iteration is queued) and seeded
    sampling. One iteration at a time queues nothing ahead."""
    model = model_factory("tiny-llama")
    prompts = make_prompts(seed=5)
    batch = [varied_params(i, seed=200, sampled_tokens=6, greedy_spread=7) for i in range(len(prompts))]
    runs = {}
    for overlap in (False, True):
        llm = engine_factory(model, mode="semi-pd", overlap_prefill=overlap)
        runs[overlap] = [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, batch)]
        prefill = llm.core.workers[0]
        assert prefill.overlap == overlap and (prefill.steps_queued_ahead > 0) == overlap
        assert_pool_drained(llm)
    assert runs[True] == runs[False]
    assert sum(len(t) == 1 for t, _ in runs[True]) >= len(prompts) // 5

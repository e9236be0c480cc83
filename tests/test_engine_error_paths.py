"""Error paths inside one engine: whatever raises, every request still gets its final delta, no worker thread
dies, and every KV page comes back.

The engines are built without starting their threads where the order of events matters (the workers' `step`
is called by hand, as in test_scheduler.py), and started where a worker thread's survival is the point.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from actors.config import CacheConfig, ConfigError, EngineConfig, ModelArch, SchedulerConfig
from actors.engine.core import EngineCore, EngineDeadError
from actors.engine.frontend import AsyncLLM, StreamChunk
from actors.kv.pool import KVPool
from actors.request import FinishReason, SamplingParams, TokenDelta
from support import step_until, wait_until

pytestmark = pytest.mark.timeout(120)

PAGE = 4


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def engine(model_dir: Path, mode: str, deltas: list[TokenDelta], **sched: int) -> EngineCore:
    config = EngineConfig(model=str(model_dir), mode=mode, cache=CacheConfig(page_size=PAGE),
                          scheduler=SchedulerConfig(**sched))
    return EngineCore(config, emit=deltas.extend)


def finished(deltas: list[TokenDelta]) -> dict[str, list[FinishReason]]:
    """Each request's final deltas' reasons, in order (one each, when all is well)."""
    out: dict[str, list[FinishReason]] = {}
    for d in deltas:
        if d.finish_reason is not None:
            out.setdefault(d.request_id, []).append(d.finish_reason)
    return out


def assert_pool_full(core: EngineCore) -> None:
    core.allocator.check_integrity()
    assert core.allocator.num_free == core.allocator.num_blocks
    assert core.num_unfinished == 0


class _FailedDraw:
    """A queued iteration that failed on the device without losing it: the failure shows at the wait."""

    def result(self) -> object:
        raise RuntimeError("the iteration failed")


@pytest.mark.parametrize("lost", [False, True])
def test_a_worker_whose_move_to_a_new_split_fails_keeps_serving_or_ends_the_engine(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, lost: bool
) -> None:
    """Moving to the current SM split (`_adopt_split`, at an iteration boundary) may raise like any CUDA call.
    The worker's thread must survive it: it stays on its partition and serves its requests, or, when the error
    left the GPU unusable, tells the engine, which ends every request. A thread that died instead left its
    requests waiting forever."""
    import actors.engine.workers as workers

    monkeypatch.setattr(workers, "device_lost", lambda error, device: lost)
    deltas: list[TokenDelta] = []
    core = engine(tiny_llama, "semi-pd", deltas)
    told: list[BaseException] = []
    core.on_device_lost = told.append
    prefill = core.workers[0]
    moves = 0

    def failing_once(partition: object) -> None:
        nonlocal moves
        moves += 1
        if moves == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    prefill.runner.set_partition = failing_once  # type: ignore[method-assign, assignment]
    core.add_request("r", list(range(1, 10)), greedy(4))
    core.start()
    try:
        wait_until(lambda: "r" in finished(deltas), timeout=20.0, what="the request to end")
        assert moves == 1 and (lost or (prefill.thread is not None and prefill.thread.is_alive()))
        assert finished(deltas) == {"r": [FinishReason.ERROR if lost else FinishReason.LENGTH]}
        assert len(told) == int(lost)
    finally:
        core.shutdown()
    if not lost:
        assert_pool_full(core)


def test_a_prefill_failed_while_its_last_chunk_was_queued_is_not_handed_to_decode(tiny_llama: Path) -> None:
    """The overlapped prefill worker queues iteration k+1 before it takes iteration k's first tokens. When k
    turns out to have failed, k's requests end with an engine error, among them one whose last chunk k+1
    computes. Taking k+1's first tokens must then skip that request (no token after its final delta, no handoff
    to decode with its pages already given back) and hand over the others: a handoff that raised there lost
    every request after it in the batch (never finished, their pages never freed)."""
    deltas: list[TokenDelta] = []
    core = engine(tiny_llama, "semi-pd", deltas, max_prefill_tokens=8)
    prefill, decode = core.workers
    core.add_request("a", [1, 2], greedy(4))  # k: all of a, 6 tokens of b
    core.add_request("b", list(range(1, 13)), greedy(4))  # k+1: the rest of b, all of c
    core.add_request("c", [3, 4], greedy(4))
    prefill.step()
    queued = prefill._queued
    assert queued is not None and [r.request_id for r in queued.reqs] == ["a", "b"]
    prefill._queued = dataclasses.replace(queued, drawn=_FailedDraw())  # type: ignore[arg-type]
    prefill.step()
    assert finished(deltas) == {"a": [FinishReason.ERROR], "b": [FinishReason.ERROR]}
    for _ in range(100):
        if "c" in finished(deltas):
            break
        prefill.step()
        decode.step()
    assert finished(deltas) == {"a": [FinishReason.ERROR], "b": [FinishReason.ERROR], "c": [FinishReason.LENGTH]}
    assert [d for d in deltas if d.request_id == "b"] == [d for d in deltas if d.request_id == "b" and d.error]
    assert sum(len(d.new_token_ids) for d in deltas if d.request_id == "c") == 4
    assert_pool_full(core)


def test_a_request_added_while_the_gpu_is_lost_is_refused_or_ended(tiny_llama: Path) -> None:
    """`add_request` checks that the engine is alive, then validates (and may compile a grammar) before it
    registers the request. If a worker finds the GPU lost in between (`_device_lost`, on its thread), the
    request must be refused with EngineDeadError or ended with the others: registered after the engine ended
    every request it knew, it would wait forever."""
    deltas: list[TokenDelta] = []
    core = engine(tiny_llama, "semi-pd", deltas)
    validate = core.validate

    def gpu_lost_meanwhile(num_prompt_tokens: int, params: SamplingParams) -> None:
        validate(num_prompt_tokens, params)
        core._device_lost(RuntimeError("CUDA error: an illegal memory access was encountered"))

    core.validate = gpu_lost_meanwhile  # type: ignore[method-assign]
    with pytest.raises(EngineDeadError):
        core.add_request("r", [1, 2, 3], greedy(4))
    assert core.num_unfinished == 0 and "r" not in finished(deltas)


def test_a_request_whose_event_loop_closed_unread_does_not_hold_up_the_others(tiny_llama: Path) -> None:
    """`AsyncLLM.generate` admits a request at once; if its caller's event loop closes before the stream is read,
    nobody can take its tokens. That request is stopped (its pages freed); the requests of other loops sharing its
    batches are served as usual: routing a delta to the closed loop must not raise into the engine's worker, which
    would leave the batch half accounted (first tokens never handed to decode, the request never finished)."""
    llm = AsyncLLM(EngineConfig(model=str(tiny_llama), mode="unified", cache=CacheConfig(page_size=PAGE)))
    core = llm.core  # not started: its worker is stepped here

    async def submit(prompt: list[int], params: SamplingParams) -> object:
        return llm.generate(prompt, params)

    async def read(stream: object) -> list[StreamChunk]:
        return [c async for c in stream]  # type: ignore[attr-defined]

    closed = asyncio.new_event_loop()
    closed.run_until_complete(submit([1, 2, 3], greedy(64)))
    closed.close()
    loop = asyncio.new_event_loop()
    try:
        stream = loop.run_until_complete(submit([4, 5, 6], greedy(8)))
        step_until(core, lambda: core.num_unfinished == 0)
        chunks = loop.run_until_complete(read(stream))
    finally:
        loop.close()
    assert chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 8
    assert not llm._sinks
    assert_pool_full(core)


@pytest.mark.parametrize("mode", ["semi-pd", "unified"])
def test_an_abort_just_after_the_page_check_frees_no_page_a_queued_iteration_writes(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A worker with an iteration still queued decides first whether this step may give pages back (an abort, or
    too few free pages), and waits for the queued iteration if so. An abort that arrives just after that check
    must wait for the next step: freeing its pages now would let another stream (semi-PD's decode) take pages the
    queued chunk still writes."""
    deltas: list[TokenDelta] = []
    core = engine(tiny_llama, mode, deltas, max_prefill_tokens=8)
    worker = core.workers[0]
    core.add_request("long", list(range(1, 40)), greedy(4))  # five chunks
    worker.step()
    queued = lambda: worker.unwaited is not None or worker._inflight is not None  # noqa: E731
    assert queued()
    check = core.prefill.may_release_pages
    raced = []

    def abort_right_after() -> bool:
        verdict = check()
        if not raced:
            raced.append(core.abort("long"))
        return verdict

    monkeypatch.setattr(core.prefill, "may_release_pages", abort_right_after)
    free = core.allocator.free
    freed_while_queued = []

    def watch(blocks: list[int]) -> None:
        if blocks and queued():
            freed_while_queued.append(list(blocks))
        free(blocks)

    monkeypatch.setattr(core.allocator, "free", watch)
    for _ in range(20):
        if "long" in finished(deltas):
            break
        for w in core.workers:
            w.step()
    assert raced == [True] and finished(deltas) == {"long": [FinishReason.ABORT]}
    assert freed_while_queued == []
    while queued():
        for w in core.workers:
            w.step()
    assert_pool_full(core)


def serve_one(model_dir: Path, cache: CacheConfig, decode_reserve_pages: int, max_tokens: int) -> list[FinishReason]:
    """Start an engine, run one 3-token prompt to its end and stop the engine: the request's final reasons. The
    wait is bounded, so an engine that never admits the request fails the test instead of hanging it."""
    deltas: list[TokenDelta] = []
    config = EngineConfig(model=str(model_dir), device="cpu", mode="unified", cache=cache,
                          scheduler=SchedulerConfig(decode_reserve_pages=decode_reserve_pages))
    core = EngineCore(config, emit=deltas.extend)
    core.start()
    try:
        core.add_request("r", [1, 2, 3], greedy(max_tokens))
        return wait_until(lambda: finished(deltas).get("r"), timeout=30, what="the request to finish")
    finally:
        core.shutdown()


@pytest.mark.parametrize("sized_by", ["num_pages", "cpu_kv_bytes"])
def test_an_engine_whose_decode_reserve_takes_the_whole_pool_refuses_to_start(tiny_llama: Path, sized_by: str) -> None:
    """Prefill admission leaves `decode_reserve_pages` free and takes a page more for a new request: with a
    reserve of the whole pool (its size given, or what the KV memory holds) nothing was ever admitted and every
    request waited forever. The engine refuses to start instead, naming both numbers. A reserve one page smaller
    serves a request that needs every page of the pool (the reserve holds back only a request's first page)."""
    pages = 8
    if sized_by == "num_pages":
        cache = CacheConfig(page_size=PAGE, num_pages=pages)
    else:
        arch = ModelArch.from_dir(tiny_llama)
        dtype = EngineConfig(model=str(tiny_llama), device="cpu").torch_dtype(arch)
        cache = CacheConfig(page_size=PAGE, cpu_kv_bytes=(pages + 1) * KVPool.bytes_per_page(arch, PAGE, dtype))
    with pytest.raises(ConfigError, match=rf"decode_reserve_pages \({pages}\) must be less than the KV cache's "
                                          rf"{pages} pages"):
        serve_one(tiny_llama, cache, pages, max_tokens=2)
    fills_the_pool = pages * PAGE - 3 + 1  # KV of the 3 prompt tokens and of every output token but the last
    assert serve_one(tiny_llama, cache, pages - 1, max_tokens=fills_the_pool) == [FinishReason.LENGTH]


def test_a_negative_decode_reserve_is_refused() -> None:
    with pytest.raises(ConfigError, match="decode_reserve_pages must be >= 0, got -1"):
        SchedulerConfig(decode_reserve_pages=-1)

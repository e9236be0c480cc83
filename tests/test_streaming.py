"""`LLM.stream` and `AsyncLLM.generate`: chunks that add up to the non-streaming result; leaving early aborts."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.config import EngineConfig
from actors.engine.frontend import LLM, AsyncLLM, StreamChunk
from actors.request import SamplingParams

from support import async_wait_until, wait_until

pytestmark = pytest.mark.timeout(120)

PROMPT = "Stream me"


@pytest.fixture(scope="module", params=["unified", "semi-pd"])
def llm(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[LLM]:
    engine = LLM(tiny_llama, mode=request.param)
    yield engine
    engine.shutdown()


def collect(chunks: Iterator[StreamChunk]) -> tuple[str, list[int], list[StreamChunk]]:
    got = list(chunks)
    return "".join(c.text for c in got), [t for c in got for t in c.token_ids], got


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=20),
    SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True, logprobs=2),
], ids=["greedy", "eos", "seeded"])
def test_stream_adds_up_to_generate(llm: LLM, params: SamplingParams) -> None:
    whole = llm.generate([PROMPT], params)[0]
    text, ids, chunks = collect(llm.stream(PROMPT, params))
    assert (text, ids) == (whole.text, whole.token_ids)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == whole.finish_reason
    assert chunks[-1].num_output_tokens == len(ids)
    assert len(chunks) >= len(ids)  # one chunk per token at least: it streams
    assert [lp.token_id for c in chunks for lp in c.logprobs] == (ids if params.logprobs is not None else [])


def test_stream_with_a_stop_string_adds_up_to_generate(llm: LLM) -> None:
    reference = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    i = next(i for i in range(len(reference.text) // 2, len(reference.text) - 2)
             if "\ufffd" not in reference.text[i : i + 2])
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[reference.text[i : i + 2]])
    whole = llm.generate([PROMPT], params)[0]
    text, ids, chunks = collect(llm.stream(PROMPT, params))
    assert whole.finish_reason == chunks[-1].finish_reason == "stop"
    assert (text, ids) == (whole.text, whole.token_ids)


def test_leaving_a_stream_early_aborts_the_request(llm: LLM) -> None:
    stream = llm.stream(PROMPT, SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True))
    first = next(stream)
    assert first.token_ids and first.finish_reason is None
    stream.close()
    wait_until(lambda: llm.core.num_unfinished == 0, timeout=5.0, what="the core to finish every request")
    alloc = llm.core.allocator
    wait_until(lambda: alloc.num_free == alloc.num_blocks, timeout=5.0, what="every KV block to be free")


def test_generate_takes_each_engine_iteration_in_one_batch(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The requests of one `generate` share a sink: an engine iteration's tokens for them arrive in one put, so
    the reading thread (which shares the interpreter lock with the engine's workers) wakes once per iteration,
    not once per token."""
    puts: list[int] = []
    put = queue.Queue.put

    def counting_put(self: queue.Queue, item: object, *args: object, **kwargs: object) -> None:
        puts.append(len(item) if isinstance(item, list) else 0)
        put(self, item, *args, **kwargs)

    monkeypatch.setattr(queue.Queue, "put", counting_put)
    outs = llm.generate([f"{PROMPT} {i}" for i in range(6)],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [8] * 6 and all(o.finish_reason == "length" for o in outs)
    assert sum(puts) >= 6 * 8 and max(puts) == 6 and len(puts) <= sum(puts) / 2, puts


def test_async_stream_coalesces_tokens_a_slow_consumer_has_not_read(llm: LLM, tiny_llama: Path) -> None:
    """The consumer takes the first chunk, then reads only once every other token waits in its queue:
    they come as one chunk, and the whole still adds up to `generate`."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)
    whole = llm.generate([PROMPT], params)[0]
    engine = AsyncLLM(EngineConfig(model=str(tiny_llama), mode=llm.config.mode))
    engine.start()

    async def consume() -> list[StreamChunk]:
        stream = engine.generate(PROMPT, params)
        first = await anext(stream)
        queued = lambda: sum(q.qsize() for _, q in engine._sinks.values())  # noqa: E731
        await async_wait_until(lambda: queued() == 20 - len(first.token_ids), what="the other tokens to be queued")
        return [first] + [c async for c in stream]

    try:
        chunks = asyncio.run(consume())
    finally:
        engine.shutdown()
    assert len(chunks) == 2  # two reads (one chunk per token without coalescing)
    assert ("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]) == (whole.text, whole.token_ids)
    assert chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 20
    assert [lp.token_id for c in chunks for lp in c.logprobs] == whole.token_ids

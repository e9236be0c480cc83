"""How many stream chunks per second one Ray actor can send, and the actor's CPU per chunk, in the
two ways an engine actor can stream tokens to a router:

- per request: one streaming generator per request, one Ray item per chunk (semipd before 9e361b6);
- batched: one streaming generator per router, one Ray item per engine step holding a chunk of
  every request (`EngineActor.outputs`).

    python3 bench/ray_stream_probe.py [REQUESTS ...]      (default: 1 16 64)

No engine and no GPU: the actor sends `StreamChunk`s as fast as the consumers take them, so the
figures are the ceiling of the transport alone on this host.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import ray

from actors.engine.frontend import StreamChunk

CHUNKS_PER_RUN = 16_000


def _chunk(request_id: str, i: int) -> StreamChunk:
    return StreamChunk(request_id, "tok", (i,), num_prompt_tokens=10, num_output_tokens=i + 1)


class ChunkSource:
    async def generate(self, request_id: str, n: int) -> AsyncIterator[StreamChunk]:
        """One request's `n` chunks, one item each."""
        for i in range(n):
            yield _chunk(request_id, i)
            if i % 8 == 0:
                await asyncio.sleep(0)  # let other streams' sends interleave, as engine steps do

    async def outputs(self, requests: int, steps: int) -> AsyncIterator[list[StreamChunk]]:
        """`steps` items, each with one chunk of every one of `requests` requests."""
        for i in range(steps):
            yield [_chunk(f"r{r}", i) for r in range(requests)]
            await asyncio.sleep(0)

    def cpu_seconds(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


async def consume_request(source: Any, request_id: str, n: int) -> int:
    received = 0
    async for ref in source.generate.options(num_returns="streaming").remote(request_id, n):
        await ref
        received += 1
    return received


async def consume_batches(source: Any, requests: int, steps: int) -> int:
    received = 0
    async for ref in source.outputs.options(num_returns="streaming").remote(requests, steps):
        received += len(await ref)
    return received


async def measure(source: Any, design: str, requests: int) -> str:
    n = CHUNKS_PER_RUN // requests
    cpu0, t0 = await source.cpu_seconds.remote(), time.perf_counter()
    if design == "per request":
        total = sum(await asyncio.gather(*(consume_request(source, f"r{i}", n) for i in range(requests))))
    else:
        total = await consume_batches(source, requests, n)
    seconds, cpu = time.perf_counter() - t0, await source.cpu_seconds.remote() - cpu0
    return f"| {design} | {requests} | {total / seconds:.0f} | {100 * cpu / seconds:.0f} | {1e6 * cpu / total:.0f} |"


async def main(request_counts: list[int]) -> None:
    ray.init(include_dashboard=False, log_to_driver=False)
    source = ray.remote(num_cpus=0)(ChunkSource).remote()
    await source.cpu_seconds.remote()
    print("| design | requests | chunks/s | actor CPU (% of a core) | actor CPU per chunk (us) |\n|---|---|---|---|---|")
    for design in ("per request", "batched"):
        for requests in request_counts:
            print(await measure(source, design, requests))
    ray.shutdown()


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [1, 16, 64]))

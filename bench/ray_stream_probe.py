"""How many stream chunks per second one Ray actor can send, one streaming generator per request
(the way `EngineActor.generate` streams tokens to the Serve replicas), and the actor's CPU per chunk.

    python3 bench/ray_stream_probe.py [STREAMS ...]      (default: 1 16 64)

No engine and no GPU: the actor yields `StreamChunk`s as fast as the consumers take them, so the
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


class ChunkSource:
    async def generate(self, request_id: str, n: int) -> AsyncIterator[StreamChunk]:
        for i in range(n):
            yield StreamChunk(request_id, "tok", (i,), num_prompt_tokens=10, num_output_tokens=i + 1)
            if i % 8 == 0:
                await asyncio.sleep(0)  # let other streams' sends interleave, as engine steps do

    def cpu_seconds(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


async def consume(source: Any, request_id: str, n: int) -> int:
    received = 0
    async for ref in source.generate.options(num_returns="streaming").remote(request_id, n):
        await ref
        received += 1
    return received


async def main(stream_counts: list[int]) -> None:
    ray.init(include_dashboard=False, log_to_driver=False)
    source = ray.remote(num_cpus=0)(ChunkSource).remote()
    await source.cpu_seconds.remote()
    print("| streams | chunks/s | actor CPU (% of a core) | actor CPU per chunk (us) |\n|---|---|---|---|")
    for streams in stream_counts:
        per_stream = CHUNKS_PER_RUN // streams
        cpu0, t0 = await source.cpu_seconds.remote(), time.perf_counter()
        counts = await asyncio.gather(*(consume(source, f"r{i}", per_stream) for i in range(streams)))
        seconds, cpu = time.perf_counter() - t0, await source.cpu_seconds.remote() - cpu0
        total = sum(counts)
        print(f"| {streams} | {total / seconds:.0f} | {100 * cpu / seconds:.0f} | {1e6 * cpu / total:.0f} |")
    ray.shutdown()


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [1, 16, 64]))

"""Async plumbing of a call: several engine streams merged into one, and the work cancelled when the client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from actors.engine.frontend import StreamChunk
from cluster.openai_api.errors import ClientDisconnected

T = TypeVar("T")


async def merge_streams(gens: Sequence[AsyncIterator[StreamChunk]]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """Interleave several chunk streams as (index, chunk); closing it closes them all."""
    if len(gens) == 1:
        gen = gens[0]
        try:
            async for chunk in gen:
                yield 0, chunk
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, StreamChunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[StreamChunk]) -> None:
        try:
            async for chunk in gen:
                await queue.put((i, chunk, None))
        except Exception as e:
            await queue.put((i, None, e))
            return
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, chunk, err = await queue.get()
            if err is not None:
                raise err
            if chunk is None:
                remaining -= 1
                continue
            yield i, chunk
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_disconnect(request: Request) -> None:
    """Return when the HTTP client has gone away (the body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.1)  # a server that answers receive() with empty bodies must not spin us


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (e.g. by Ray Serve): stop the work too
        await _cancel(task, watcher)
        raise
    if not task.done():
        await _cancel(task, watcher)
        raise ClientDisconnected()
    await _cancel(watcher)
    return task.result()


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

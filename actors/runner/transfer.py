"""Host values to the device, and device values to the host, without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory with a blocking copy, and
a blocking copy waits for everything queued on the stream: one in a decode step's launch
and the step after it can no longer be queued while this one runs. Copies go through pinned
memory instead, queued on the current stream.

That pinned memory comes from the calling thread's `StagingRing` (`staging_ring`), allocated once,
before serving: a page-locked host allocation is among the operations that the CUDA programming
guide says keep commands of two streams from running concurrently, so on a semi-PD engine one made
while serving would hold decode behind the prefill iteration in flight. (torch's caching host
allocator, which `pin_memory()` draws from, reuses a freed block only of the same power-of-two size
and only once the work queued on it ran: on an H200, serving windows still made 16-174
cudaHostAlloc calls each with that pool grown at start.)
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)

STAGING_RING_BYTES = 16 << 20  # per staging thread: a decode step takes a few KiB, a prefill one ~30 B a token
STAGING_ALIGN = 256  # region offsets: any dtype can view a region, and copies start on aligned addresses
MAX_PENDING_MARKS = 1024  # marks a ring keeps beyond this are dropped once their events have completed


class EventLike(Protocol):
    """What a ring needs of an event: `torch.cuda.Event`, or a test's fake."""

    def record(self, stream: Any = None) -> None: ...

    def synchronize(self) -> None: ...

    def query(self) -> bool: ...


E = TypeVar("E", bound=EventLike)


class _Mark(NamedTuple):
    start: int  # monotonic byte positions it covers: [start, end)
    end: int
    event: EventLike


def _pinned_bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class StagingRing(Generic[E]):
    """Host staging memory for queued copies: one buffer, handed out as regions by a bump pointer that wraps.

    Contract (one ring per thread; not thread-safe):
    - `take(shape, dtype)` returns a view of the next free region (offsets aligned to `STAGING_ALIGN`). Before
      handing out bytes again it waits (`event.synchronize()`) for each mark whose regions they held, so that
      the copies queued from or into those regions have run (a ring's lap is thousands of decode steps: they
      have). A take larger than `largest` gets a tensor of its own from `oversize` instead (`oversized` counts
      them).
    - `mark(stream)` records an event on `stream` (default: the current stream) that covers every region taken
      since the last mark. Mark right after queuing the copies from or into those regions, on the stream they
      were queued on (a worker's stream changes with the SM split: never mark later). Taking bytes still held
      by an unmarked region is a bug and raises `AssertionError`.
    - A device-to-host reader keeps `last_position` after its take and checks `intact(position)` after
      waiting for its mark and before reading: False once the ring may have handed the region out again.
    - Beyond `max_pending_marks` marks not waited for, `mark` drops the oldest once its event has completed
      (`query()`), so that a lap of small takes does not keep tens of thousands of events alive.

    Positions are monotonic byte counts: the region at position p lies at `p % capacity`. A take consumes the
    bytes from the head to its region's end, alignment padding and, where the region would not fit before the
    end of the buffer, the rest of the buffer included.
    """

    def __init__(self, buffer: torch.Tensor, new_event: Callable[[], E],
                 oversize: Callable[[int], torch.Tensor] = _pinned_bytes,
                 max_pending_marks: int = MAX_PENDING_MARKS) -> None:
        """`buffer`: contiguous uint8 [capacity], capacity a multiple of `STAGING_ALIGN` (pinned, for a GPU);
        `new_event`: makes the events `mark` records; `oversize(nbytes)`: a uint8 tensor of its own for a take
        larger than `largest` (a quarter of the capacity); `max_pending_marks`: see the contract above."""
        assert buffer.dtype == torch.uint8 and buffer.dim() == 1 and buffer.is_contiguous()
        assert buffer.numel() % STAGING_ALIGN == 0 and buffer.numel() >= 4 * STAGING_ALIGN
        self.buffer = buffer
        self.capacity = buffer.numel()
        self.largest = self.capacity // 4  # larger takes would wait on recent marks, or overrun unread regions
        self.oversized = 0
        self.last_position: int | None = None  # the last take's region (None: no region of the ring)
        self.max_pending_marks = max_pending_marks
        self._new_event = new_event
        self._oversize = oversize
        self._head = 0  # bytes consumed so far
        self._marked = 0  # the end of the last mark: regions in [_marked, _head) are unmarked
        self._marks: deque[_Mark] = deque()  # not yet waited for, oldest first; each ends past _head - capacity

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor of `shape` and `dtype` for one queued copy (its values are whatever was there)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            self.last_position = None
            return torch.empty(tuple(shape), dtype=dtype)
        if nbytes > self.largest:
            self.oversized += 1
            self.last_position = None
            log.debug("staging %d bytes outside the ring (largest %d)", nbytes, self.largest)
            return self._oversize(nbytes).view(dtype).view(tuple(shape))
        start = self._place(nbytes)
        self._reclaim(start + nbytes)
        self.last_position = start
        offset = start % self.capacity
        return self.buffer[offset:offset + nbytes].view(dtype).view(tuple(shape))

    def stage(self, host: torch.Tensor) -> torch.Tensor:
        """A region (`take`) holding a copy of the host tensor `host`."""
        staged = self.take(host.shape, host.dtype)
        staged.copy_(host)
        return staged

    def mark(self, stream: Any = None) -> E:
        """Record an event on `stream` (None: the current stream) covering the regions taken since the last mark;
        returns it (callers may wait for it, or make another stream wait for it)."""
        event = self._new_event()
        event.record(stream)
        if self._head > self._marked:
            self._marks.append(_Mark(self._marked, self._head, event))
            self._marked = self._head
        if len(self._marks) > self.max_pending_marks and self._marks[0].event.query():
            self._marks.popleft()
        return event

    def intact(self, position: int | None) -> bool:
        """Whether the region taken at `position` still holds what was copied into it (None: not a ring region,
        always intact)."""
        return position is None or self._head <= position + self.capacity

    def _place(self, nbytes: int) -> int:
        start = -(-self._head // STAGING_ALIGN) * STAGING_ALIGN
        if start % self.capacity + nbytes > self.capacity:
            start = -(-start // self.capacity) * self.capacity
        return start

    def _reclaim(self, end: int) -> None:
        """Consume the bytes up to `end`: wait for the marks whose regions held them one lap ago."""
        reused_below = end - self.capacity
        assert reused_below <= self._marked, (
            f"staging ring: a take would reuse bytes of regions not marked yet ({self._head - self._marked} "
            f"bytes unmarked of {self.capacity}): mark after queuing each copy")
        while self._marks and self._marks[0].start < reused_below:
            self._marks.popleft().event.synchronize()
        self._head = end


_local = threading.local()


def staging_ring() -> StagingRing[torch.cuda.Event]:
    """The calling thread's pinned staging ring, made on its first call (one cudaHostAlloc of
    `STAGING_RING_BYTES`): a thread that stages copies while serving calls this before."""
    ring = getattr(_local, "ring", None)
    if ring is None:
        ring = StagingRing(_pinned_bytes(STAGING_RING_BYTES), torch.cuda.Event)
        _local.ring = ring
    return ring


def copy_to_device(dst: torch.Tensor, host: torch.Tensor) -> None:
    """Queue copying `host` into `dst` (a CUDA tensor of its shape) on `dst`'s device's current stream, through the
    calling thread's staging ring; returns without waiting."""
    ring = staging_ring()
    dst.copy_(ring.stage(host), non_blocking=True)
    ring.mark(torch.cuda.current_stream(dst.device))


def to_device(values: Sequence[int] | Sequence[float] | Sequence[bool] | np.ndarray, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """`values` as a `dtype` tensor on `device`; on a GPU, copied through the thread's staging ring on the current
    stream without a host wait."""
    host = torch.as_tensor(np.ascontiguousarray(values) if isinstance(values, np.ndarray) else values, dtype=dtype)
    if device.type != "cuda":
        return host
    out = torch.empty(host.shape, dtype=dtype, device=device)
    copy_to_device(out, host)
    return out


def pinned_host_allocs() -> int:
    """cudaHostAlloc calls torch's pinned host allocator made in this process so far (0 where torch does not
    count them, or CUDA is not initialized)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_initialized():
        return 0
    return int(stats().get("num_host_alloc", 0))

"""Host values to the device without waiting for it.

`torch.tensor(values, device="cuda")` copies from pageable memory with a blocking copy, and
a blocking copy waits for everything queued on the stream: one in a decode step's launch
and the step after it can no longer be queued while this one runs. `to_device` goes
through pinned memory instead, queued on the current stream. `grow_pinned_pool` fills torch's
pinned allocator before serving, so that these copies do not call cudaHostAlloc then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def to_device(values: Sequence[int] | Sequence[float] | Sequence[bool] | np.ndarray, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """`values` as a `dtype` tensor on `device`; on a GPU, copied through pinned memory on the current
    stream without a host wait (the pinned buffer is kept until the copy has run)."""
    host = torch.as_tensor(np.ascontiguousarray(values) if isinstance(values, np.ndarray) else values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


# Pinned host blocks made free before serving, by size in bytes (torch's pinned allocator rounds a request up to a
# power of two and keeps a free list per size): several of each size a decode step's or a prefill iteration's
# inputs, plans and sampled tokens take while their copies are queued, about 31 MiB in all.
PINNED_POOL_BLOCKS: Mapping[int, int] = {
    **{1 << k: 32 for k in range(9, 17)},  # 512 B - 64 KiB: per-step ids, positions, slots, indptr, tokens
    **{1 << k: 8 for k in range(17, 21)},  # 128 KiB - 1 MiB: a prefill chunk's ids, a large batch's page indices
    **{1 << k: 2 for k in range(21, 23)},  # 2 - 4 MiB
}


def pinned_host_allocs() -> int:
    """cudaHostAlloc calls torch's pinned host allocator made in this process so far (0 where torch does not
    count them, or CUDA is not initialized)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_initialized():
        return 0
    return int(stats().get("num_host_alloc", 0))


def grow_pinned_pool(blocks: Mapping[int, int] = PINNED_POOL_BLOCKS) -> int:
    """Leave `blocks` (size in bytes -> count) free in torch's pinned host allocator, so that serving draws its
    pinned buffers from the pool instead of calling cudaHostAlloc. The CUDA programming guide counts a
    page-locked host allocation among the operations that keep commands of two streams from running
    concurrently: on a semi-PD engine, decode would wait for the prefill iteration in flight. Returns the
    cudaHostAlloc calls this made."""
    before = pinned_host_allocs()
    held = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for size, n in blocks.items() for _ in range(n)]
    del held  # back to the free lists: no stream used them
    return pinned_host_allocs() - before

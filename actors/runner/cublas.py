"""torch's cuBLAS workspaces, which it caches for the whole process per (cuBLAS handle, stream).

The first GEMM a thread runs on a stream allocates a workspace (32 MiB on Hopper) that
torch keeps until `torch._C._cuda_clearCublasWorkspaces()`, even after the stream is
gone. An engine runs on streams of its own (semi-PD: two per SM split, each probed with a
GEMM), so without a release each engine would leave about a gigabyte behind. Freeing them
is safe at any time for eager work (the next GEMM allocates a new one) and for graphs
captured inside `graph_workspaces()`, which take theirs from the graph's own pool.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.RLock()  # a release never lands inside another thread's capture


def release_workspaces() -> None:
    """Free every cuBLAS workspace torch has cached, for all streams of the process."""
    with _lock:
        torch._C._cuda_clearCublasWorkspaces()


@contextmanager
def graph_workspaces() -> Iterator[None]:
    """Around a CUDA-graph capture: its GEMMs get a workspace allocated during the capture (from
    the graph's pool, which goes with the graph), not a cached one that a later
    `release_workspaces()` would free while the graph still writes to it."""
    with _lock:
        release_workspaces()
        try:
            yield
        finally:
            release_workspaces()

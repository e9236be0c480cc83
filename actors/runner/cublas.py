"""torch's cuBLAS: the workspaces it caches, and the SM count its GEMMs are sized for.

Workspaces: torch caches one for the whole process per (cuBLAS handle, stream). The first
GEMM a thread runs on a stream allocates one (32 MiB on Hopper) that torch keeps until
`torch._C._cuda_clearCublasWorkspaces()`, even after the stream is gone. An engine runs on
streams of its own (semi-PD: two per SM split, each probed with a GEMM), so without a
release each engine would leave about a gigabyte behind. Freeing them is safe at any time
for eager work (the next GEMM allocates a new one) and for graphs captured inside
`graph_workspaces()`, which take theirs from the graph's own pool.

SM count: cuBLAS sizes a GEMM's grid for every SM of the device, also on a green-context
stream that has fewer. A persistent kernel of one block per SM then runs in two waves on a
partition (132 blocks on 112 SMs: the last 20 wait for a whole block's work), which is
how torch's own `_set_sm_carveout_experimental` describes GEMMs next to NCCL kernels.
`set_sm_count_target` tells the calling thread's cuBLAS handle (torch keeps one per
thread) how many SMs it has.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)
_lock = threading.RLock()  # a release never lands inside another thread's capture
_applied = threading.local()  # .sms: {device index: SM count last set on this thread's cuBLAS handle there}


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


def set_sm_count_target(sms: int, device: torch.device | None = None) -> None:
    """Size the calling thread's cuBLAS GEMMs (on `device`) for `sms` SMs; 0, or the whole device's
    count or more, restores cuBLAS's default. Where cuBLAS cannot, this logs a warning (once per thread
    and value) and changes nothing: the GEMMs stay correct either way."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    asked = _applied.__dict__.setdefault("sms", {})
    if asked.get(index) == sms:  # every launch asks: answer from the thread's own record
        return
    lib = _libcublas()
    if lib is None:
        return
    total = torch.cuda.get_device_properties(index).multi_processor_count
    target = 0 if sms <= 0 or sms >= total else sms
    with torch.cuda.device(index):
        handle = torch.cuda.current_blas_handle()
    status = lib.cublasSetSmCountTarget(ctypes.c_void_p(handle), ctypes.c_int(target))
    if status != 0:  # a sizing hint: GEMMs still run right without it, so warn and leave it
        log.warning("cublasSetSmCountTarget(%d) failed with cuBLAS status %d; GEMMs stay sized as before",
                    target, status)
    asked[index] = sms


def sm_count_target() -> int:
    """The calling thread's cuBLAS SM count target (0: the whole device; -1: no such setting)."""
    lib = _libcublas()
    if lib is None:
        return -1
    value = ctypes.c_int(-1)
    status = lib.cublasGetSmCountTarget(ctypes.c_void_p(torch.cuda.current_blas_handle()), ctypes.byref(value))
    if status != 0:
        raise RuntimeError(f"cublasGetSmCountTarget failed with cuBLAS status {status}")
    return value.value


@functools.cache
def _libcublas() -> ctypes.CDLL | None:
    """The cuBLAS library torch loaded, found in this process's memory map (None if absent)."""
    torch.cuda.current_blas_handle()  # loads cuBLAS
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    except OSError:
        paths = set()
    found = sorted(p for p in paths if re.fullmatch(r".*/libcublas\.so(\.\d+)*", p))
    if not found:
        log.warning("cuBLAS not found in the process map: GEMMs stay sized for the whole GPU")
        return None
    lib = ctypes.CDLL(found[0])
    try:
        lib.cublasSetSmCountTarget.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.cublasGetSmCountTarget.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    except AttributeError:
        log.warning("%s has no cublasSetSmCountTarget: GEMMs stay sized for the whole GPU", found[0])
        return None
    return lib

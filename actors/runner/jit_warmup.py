"""Build every flashinfer kernel an engine uses at once, before its first use of any.

flashinfer compiles each of its kernels (JIT: ninja and nvcc) the first time it is called, and an engine
starting on a machine without a kernel cache called them one after another: on a fresh H200 (2026-12-04,
serving run 17) a semi-PD engine started in 343 s, and its log shows five builds begun one after the other
over 2 min 46 s, the last one 2 min 19 s before it served. A build runs in a subprocess, so the first use
of each kernel called from a thread of its own builds them side by side; the engine then finds them built
(flashinfer keeps them in its cache directory, and the loaded modules in memory): on a fresh H200 (2026-12-04,
run 18, `bench/jit_build_probe.py`) all five were built 118 s after they began, the slowest (the sm90 prefill)
alone taking 115 s. With a warm cache each first use only loads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from actors.config import ModelArch


def flashinfer_first_uses(arch: ModelArch, dtype: torch.dtype, device: torch.device, decode_kernel: str
                          ) -> list[Callable[[], object]]:
    """One call of each flashinfer kernel an engine of `arch` uses (the fused elementwise ops, decode and
    prefill attention), as callables that each build one kernel module."""
    from actors.attention.flashinfer_backend import attention_first_uses
    from actors.models.ops import FlashInferOps

    uses = FlashInferOps().first_uses(arch, dtype, device) + attention_first_uses(arch, dtype, device, decode_kernel)
    return [on_device(device, u) for u in uses]


def on_device(device: torch.device, use: Callable[[], object]) -> Callable[[], object]:
    """`use` run with `device` current: a new thread's current device is the first GPU."""
    def run() -> object:
        with torch.cuda.device(device):
            return use()

    return run


def run_in_parallel(tasks: Sequence[Callable[[], object]]) -> list[float]:
    """Run each task on a thread of its own, all at once; the seconds each took, in order. Re-raises the first
    task's exception (in order) after all have ended."""
    def timed(task: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        task()
        return time.perf_counter() - t0

    if not tasks:
        return []
    with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="jit-warmup") as pool:
        futures = [pool.submit(timed, t) for t in tasks]
    return [f.result() for f in futures]

"""Where the GPU's time goes in the offline job (unified mode, whole GPU): kernel time by kind against the job's
wall time, and the kernels that take the most.

    python3 bench/offline_profile.py MODEL_DIR [MAX_PREFILL_TOKENS]

The job is the engine benchmark's (`cluster.bench.offline_job.JOB`), run once to warm up (timed: the first run
after start-up), once under torch's profiler (CUDA activity only), then unprofiled with Python's default thread
switch interval and with 1 ms.
Kernel time summed over one stream is the GPU's busy time; the rest of the wall time the GPU waited for the
host, in idle gaps split at the job's last prefill-attention kernel. Prints the tables last.
"""

from __future__ import annotations

import sys
import time
from typing import NamedTuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from actors.config import SchedulerConfig
from actors.engine.frontend import LLM
from actors.request import SamplingParams
from cluster.bench.kernel_time import Kernel, report
from cluster.bench.offline_job import JOB, offline_prompts
from cluster.bench.telemetry import GpuTelemetry, format_summary


class _Allocs(NamedTuple):
    device: int
    pinned_host: int

    def __sub__(self, other: tuple[int, ...]) -> _Allocs:  # type: ignore[override]
        return _Allocs(*(a - b for a, b in zip(self, other)))


def _allocations() -> _Allocs:
    """How many times torch's caching allocators have gone to the driver for memory so far."""
    return _Allocs(torch.cuda.memory_stats().get("num_device_alloc", 0),
                   torch.cuda.host_memory_stats().get("num_host_alloc", 0))


def main(model_dir: str, max_prefill_tokens: int) -> None:
    llm = LLM(model_dir, mode="unified", load_format="dummy",
              scheduler=SchedulerConfig(max_prefill_tokens=max_prefill_tokens))
    prompts = offline_prompts(llm.core.arch.vocab_size)
    params = SamplingParams(max_tokens=JOB.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    before = _allocations()
    with GpuTelemetry() as first_gpu:
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        first = time.perf_counter() - t0
    first_allocs = _allocations() - before
    llm.core.allocator.reset_prefix_cache()
    before = _allocations()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - t0
    profiled_allocs = _allocations() - before
    unprofiled: dict[float, float] = {}
    clocks: dict[float, dict[str, float]] = {}
    default_interval = sys.getswitchinterval()
    for interval_ms in (default_interval * 1e3, 1.0):
        sys.setswitchinterval(interval_ms / 1e3)
        llm.core.allocator.reset_prefix_cache()
        with GpuTelemetry() as gpu:
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            unprofiled[interval_ms] = time.perf_counter() - t0
        clocks[interval_ms] = gpu.summary()
    sys.setswitchinterval(default_interval)
    llm.shutdown()
    print(f"\ndevice and pinned host allocations (cudaMalloc, cudaHostAlloc): first run {first_allocs}, "
          f"profiled run {profiled_allocs}")
    print(f"first run after start-up: {first:.2f} s; "
          + "; ".join(f"unprofiled, thread switch interval {ms:g} ms: {s:.2f} s" for ms, s in unprofiled.items()))
    print(f"first run: {format_summary(first_gpu.summary())}")
    for ms, summary in clocks.items():
        print(f"switch interval {ms:g} ms: {format_summary(summary)}")
    kernels = [Kernel(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    print("\n" + report(kernels, wall, split_after="PrefillWithKVCacheKernel"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16384)

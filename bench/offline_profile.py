"""Where the GPU's time goes in the offline job (unified mode, whole GPU): kernel time by kind against the job's
wall time, and the kernels that take the most.

    python3 bench/offline_profile.py MODEL_DIR [MAX_PREFILL_TOKENS]

The job is the engine benchmark's (`cluster.bench.offline_job.JOB`), run from an empty prefix cache each time:
first right after start-up, then under torch's profiler (CUDA activity only), then unprofiled with Python's
default thread switch interval and with 1 ms. Each run's time, allocator calls and GPU clock are printed.
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


class _Run(NamedTuple):
    seconds: float
    gpu: dict[str, float]  # `GpuTelemetry.summary()` of the run
    allocations: tuple[int, int]  # times torch's caching allocators called cudaMalloc, cudaHostAlloc in the run


def _allocations() -> tuple[int, int]:
    """How many times torch's caching allocators have gone to the driver for memory so far (device, pinned host)."""
    return (torch.cuda.memory_stats().get("num_device_alloc", 0),
            torch.cuda.host_memory_stats().get("num_host_alloc", 0))


def _run_job(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> _Run:
    """The job once, from an empty prefix cache."""
    llm.core.allocator.reset_prefix_cache()
    before = _allocations()
    with GpuTelemetry() as gpu:
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        seconds = time.perf_counter() - t0
    device, host = (after - b for after, b in zip(_allocations(), before))
    return _Run(seconds, gpu.summary(), (device, host))


def _run_line(what: str, run: _Run) -> str:
    device, host = run.allocations
    return (f"{what}: {run.seconds:.2f} s, {device} cudaMalloc and {host} cudaHostAlloc calls; "
            f"{format_summary(run.gpu) or 'no GPU samples'}")


def main(model_dir: str, max_prefill_tokens: int) -> None:
    llm = LLM(model_dir, mode="unified", load_format="dummy",
              scheduler=SchedulerConfig(max_prefill_tokens=max_prefill_tokens))
    prompts = offline_prompts(llm.core.arch.vocab_size)
    params = SamplingParams(max_tokens=JOB.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    runs = {"first run after start-up": _run_job(llm, prompts, params)}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runs["profiled"] = _run_job(llm, prompts, params)
    default_interval = sys.getswitchinterval()
    for interval_ms in (default_interval * 1e3, 1.0):
        sys.setswitchinterval(interval_ms / 1e3)
        runs[f"unprofiled, thread switch interval {interval_ms:g} ms"] = _run_job(llm, prompts, params)
    sys.setswitchinterval(default_interval)
    llm.shutdown()
    print("\n" + "\n".join(_run_line(what, run) for what, run in runs.items()))
    kernels = [Kernel(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    print("\n" + report(kernels, runs["profiled"].seconds, split_after="PrefillWithKVCacheKernel"))

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16384)

"""Where the GPU's time goes in the offline job (unified mode, whole GPU): kernel time by kind against the job's
wall time, and the kernels that take the most.

    python3 bench/offline_profile.py MODEL_DIR [MAX_PREFILL_TOKENS]

The job is the engine benchmark's (`cluster.bench.offline_job.JOB`), run once to warm up, once under torch's
profiler (CUDA activity only), then unprofiled with Python's default thread switch interval and with 1 ms.
Kernel time summed over one stream is the GPU's busy time; the rest of the wall time the GPU waited for the
host, in idle gaps split at the job's last prefill-attention kernel. Prints the tables last.
"""

from __future__ import annotations

import re
import sys
import time
from collections import defaultdict

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from actors.config import SchedulerConfig
from actors.engine.frontend import LLM
from actors.request import SamplingParams
from cluster.bench.offline_job import JOB, offline_prompts

KINDS: tuple[tuple[str, str], ...] = (  # (kind, kernel-name pattern), first match wins
    ("attention", r"flashinfer::(Batch|Persistent|Merge|Variable)|PrefillWithKVCache|DecodeWithPagedKV"),
    ("gemm", r"nvjet|gemm|cutlass|splitKreduce|sm90_xmma"),
    ("norm", r"RMSNorm"),
    ("activation", r"act_and_mul|silu"),
    ("rope", r"Rotary|rope"),
    ("kv write", r"index_put|index_elementwise|scatter"),
    ("sampling", r"argmax|reduce_kernel|softmax|topk|sort"),
    ("copy", r"Memcpy|Memset|copy"),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def idle_gaps(kernels: list[tuple[float, float, str]], min_us: float = 20.0) -> list[tuple[float, float, str, str]]:
    """(start us, length us, kernel before, kernel after) of each stretch of at least `min_us` in which no kernel
    ran, from kernels as (start us, end us, name)."""
    gaps = []
    kernels = sorted(kernels)
    busy_until, last = kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start - busy_until >= min_us:
            gaps.append((busy_until, start - busy_until, last, name))
        if end > busy_until:
            busy_until, last = end, name
    return gaps


def print_gaps(kernels: list[tuple[float, float, str]]) -> None:
    """Idle time before and after the job's last prefill-attention kernel (mixed iterations; decode-only steps)."""
    prefill_ends = [end for _, end, name in kernels if "PrefillWithKVCacheKernel" in name]
    split = max(prefill_ends, default=kernels[-1][1])
    gaps = idle_gaps(kernels)
    for phase, inside in (("with prefill", lambda g: g[0] < split), ("decode-only", lambda g: g[0] >= split)):
        mine = [g for g in gaps if inside(g)]
        print(f"GPU idle {phase}: {sum(g[1] for g in mine) / 1e6:.3f} s in {len(mine)} gaps of >= 20 us")
    print("\n| longest idle gaps us | last kernel before | first kernel after |\n|---|---|---|")
    for _, us, before, after in sorted(gaps, key=lambda g: -g[1])[:12]:
        print(f"| {us:.0f} | {before[:60]} | {after[:60]} |")


def main(model_dir: str, max_prefill_tokens: int) -> None:
    llm = LLM(model_dir, mode="unified", load_format="dummy",
              scheduler=SchedulerConfig(max_prefill_tokens=max_prefill_tokens))
    prompts = offline_prompts(llm.core.arch.vocab_size)
    params = SamplingParams(max_tokens=JOB.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts, params)
    llm.core.allocator.reset_prefix_cache()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - t0
    unprofiled = {}
    default_interval = sys.getswitchinterval()
    for interval_ms in (default_interval * 1e3, 1.0):
        sys.setswitchinterval(interval_ms / 1e3)
        llm.core.allocator.reset_prefix_cache()
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        unprofiled[interval_ms] = time.perf_counter() - t0
    sys.setswitchinterval(default_interval)
    llm.shutdown()
    print("\n" + "; ".join(f"unprofiled, thread switch interval {ms:g} ms: {s:.2f} s" for ms, s in unprofiled.items()))
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us <= 0:
            continue
        by_kind[kind_of(e.key)] += us
        by_name[e.key] = (us, e.count)
    busy = sum(by_kind.values()) / 1e6
    print(f"\nwall {wall:.2f} s, GPU busy {busy:.2f} s ({busy / wall:.0%}), waiting for the host {wall - busy:.2f} s")
    print("\n| kind | s | share of wall |\n|---|---|---|")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 1e6:.3f} | {us / 1e6 / wall:.1%} |")
    print("\n| kernel | kind | calls | s | us per call |\n|---|---|---|---|---|")
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"| {name[:90]} | {kind_of(name)} | {n} | {us / 1e6:.3f} | {us / n:.1f} |")
    if kernels:
        print_gaps(kernels)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16384)

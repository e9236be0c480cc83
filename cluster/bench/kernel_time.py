"""Where a job's GPU time went, from the kernels a profiler recorded: time by kind, the costliest kernels, and
the stretches in which the GPU waited for the host.

Plain Python (no torch), so the vLLM environment reads its own traces with the same tables as ours
(`bench/offline_profile.py` for our engine, `bench/vllm_offline.py MODEL OUT PROFILE_DIR` for vLLM's).
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

KINDS: tuple[tuple[str, str], ...] = (  # (kind, kernel-name pattern), first match wins; ours and vLLM's kernels
    ("attention", r"flashinfer::(Batch|Persistent|Merge|Variable)|PrefillWithKVCache|DecodeWithPagedKV|flash_fwd"
                  r"|flash::|FlashAttn|fmha|paged_attention|combine"),
    ("gemm", r"nvjet|gemm|cutlass|splitKreduce|sm90_xmma|cublas"),
    ("norm", r"RMSNorm|rms_norm"),
    ("activation", r"act_and_mul|silu"),
    ("rope", r"Rotary|rope|rotary"),
    ("kv write", r"index_put|index_elementwise|scatter|reshape_and_cache"),
    ("sampling", r"argmax|reduce_kernel|softmax|topk|sort"),
    ("copy", r"Memcpy|Memset|copy"),
)
MIN_GAP_US = 20.0


class Kernel(NamedTuple):
    start_us: float
    end_us: float
    name: str


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def idle_gaps(kernels: list[Kernel], min_us: float = MIN_GAP_US) -> list[tuple[float, float, str, str]]:
    """(start us, length us, kernel before, kernel after) of each stretch of at least `min_us` in which no kernel
    ran."""
    gaps = []
    kernels = sorted(kernels)
    busy_until, last = kernels[0].end_us, kernels[0].name
    for start, end, name in kernels[1:]:
        if start - busy_until >= min_us:
            gaps.append((busy_until, start - busy_until, last, name))
        if end > busy_until:
            busy_until, last = end, name
    return gaps


def chrome_trace_kernels(path: str | Path) -> list[Kernel]:
    """The kernels, copies and fills of a Chrome trace (torch profiler's export, gzipped or not)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [Kernel(float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in events
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("dur", 0) > 0]


def report(kernels: list[Kernel], wall_s: float, split_after: str | None = None, top: int = 25) -> str:
    """Markdown tables: kernel time by kind against `wall_s`, the `top` kernels, and the GPU's idle time; with
    `split_after`, apart before and after the last kernel whose name contains it (for our engine, its prefill
    attention kernel: batches with prefill, then decode-only steps).

    Busy time is summed kernel time, which counts twice what ran concurrently on two streams: read it for one
    stream's work (unified mode, vLLM)."""
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for start, end, name in kernels:
        by_kind[kind_of(name)] += end - start
        by_name[name][0] += end - start
        by_name[name][1] += 1
    busy = sum(by_kind.values()) / 1e6
    lines = [f"wall {wall_s:.2f} s, GPU busy {busy:.2f} s ({busy / wall_s:.0%}), waiting for the host "
             f"{wall_s - busy:.2f} s", "", "| kind | s | share of wall |", "|---|---|---|"]
    lines += [f"| {kind} | {us / 1e6:.3f} | {us / 1e6 / wall_s:.1%} |"
              for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel | kind | calls | s | us per call |", "|---|---|---|---|---|"]
    lines += [f"| {name[:90]} | {kind_of(name)} | {n} | {us / 1e6:.3f} | {us / n:.1f} |"
              for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]
    if kernels:
        lines += ["", *_gap_lines(kernels, split_after)]
    return "\n".join(lines)


def _gap_lines(kernels: list[Kernel], split_after: str | None) -> list[str]:
    gaps = idle_gaps(kernels)
    phases: tuple[tuple[str, Callable[[tuple[float, float, str, str]], bool]], ...] = (("in all", lambda g: True),)
    if split_after is not None:
        split = max((k.end_us for k in kernels if split_after in k.name), default=max(k.end_us for k in kernels))
        phases = (("with prefill", lambda g: g[0] < split), ("decode-only", lambda g: g[0] >= split))
    lines = []
    for phase, inside in phases:
        mine = [g for g in gaps if inside(g)]
        lines.append(f"GPU idle {phase}: {sum(g[1] for g in mine) / 1e6:.3f} s in {len(mine)} gaps of "
                     f">= {MIN_GAP_US:g} us")
    lines += ["", "| longest idle gaps us | last kernel before | first kernel after |", "|---|---|---|"]
    lines += [f"| {us:.0f} | {before[:60]} | {after[:60]} |" for _, us, before, after in
              sorted(gaps, key=lambda g: -g[1])[:12]]
    return lines

"""Where a job's GPU time went, from the kernels a profiler recorded: time by kind, the costliest kernels, and
the stretches in which the GPU waited for the host; and the longest CUDA calls, with what ran beside them
(`long_calls`).

Plain Python (no torch), so the vLLM environment reads its own traces with the same tables as ours
(`bench/offline_profile.py` for our engine, `bench/vllm_offline.py MODEL OUT PROFILE_DIR` for vLLM's).
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

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


def chrome_trace_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of a Chrome trace (torch profiler's export, gzipped or not)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return list(json.load(f)["traceEvents"])


def chrome_trace_kernels(path: str | Path) -> list[Kernel]:
    """The kernels, copies and fills of a Chrome trace."""
    return [Kernel(float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in chrome_trace_events(path)
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


API_CATEGORIES = ("cuda_runtime", "cuda_driver")  # a chrome trace's categories of CUDA calls (torch's profiler)
LONG_CALL_MS = 50.0
LONG_CALLS_SHOWN = 12


class Span(NamedTuple):
    """One complete event of a chrome trace: who (a thread's name, or a stream), what, from when, for how long
    (microseconds)."""

    who: str
    name: str
    start_us: float
    dur_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us

    def overlap_us(self, other: Span) -> float:
        return max(0.0, min(self.end_us, other.end_us) - max(self.start_us, other.start_us))


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def long_calls(events: list[dict[str, Any]], threads: Mapping[int, str], min_ms: float = LONG_CALL_MS,
               shown: int = LONG_CALLS_SHOWN) -> list[str]:
    """The longest CUDA calls of a chrome trace's `events` (torch's profiler) that took `min_ms` or more, longest
    first, each with the thread that made it (`threads`: the trace's thread id -> name), the torch op of that thread it
    was in, the other threads' CUDA calls overlapping it, and the kernels running meanwhile (by stream)."""
    def span(e: dict[str, Any], who: str) -> Span:
        return Span(who, e["name"], float(e["ts"]), float(e["dur"]))

    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    by_thread = [(e, threads.get(e["tid"], f"thread {e['tid']}")) for e in complete]
    calls = [span(e, who) for e, who in by_thread if e.get("cat") in API_CATEGORIES]
    ops = [span(e, who) for e, who in by_thread if e.get("cat") == "cpu_op"]
    kernels = [span(e, f"stream {e.get('args', {}).get('stream', e['tid'])}") for e in complete
               if e.get("cat") == "kernel"]
    if not calls:
        return ["no CUDA calls in the trace"]
    t0 = min(c.start_us for c in calls)
    lines = []
    for c in sorted((c for c in calls if c.dur_us >= min_ms * 1000), key=lambda c: -c.dur_us)[:shown]:
        inside = [o for o in ops if o.who == c.who and o.start_us <= c.start_us and c.end_us <= o.end_us]
        op = min(inside, key=lambda o: o.dur_us).name if inside else "no torch op"
        others = sorted((o for o in calls if o.who != c.who and o.overlap_us(c) > 0), key=lambda o: -o.overlap_us(c))
        running = sorted((k for k in kernels if k.overlap_us(c) > 0), key=lambda k: -k.overlap_us(c))
        meanwhile = "; ".join(f"{o.who} {o.name} {o.dur_us / 1000:.1f} ms" for o in others[:3]) or "none"
        on_gpu = "; ".join(f"{k.who} {_short(k.name)} {k.overlap_us(c) / 1000:.1f} ms" for k in running[:3]) or "none"
        lines.append(f"{c.who} {c.name} {c.dur_us / 1000:.1f} ms at +{(c.start_us - t0) / 1e6:.3f} s in {_short(op)}"
                     f" | other threads' calls meanwhile: {meanwhile} | kernels meanwhile ({len(running)}): {on_gpu}")
    return lines or [f"no CUDA call of {min_ms:.0f} ms or more"]

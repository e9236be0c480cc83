"""Where threads stood during stalls: their Python stacks sampled on a timer (`StackSampler`), counted over the
stall windows (`stacks_in`).

torch's profiler shows CUDA calls; a thread between calls (waiting on a lock or an event, or in Python) shows
there as nothing. A sample taken late tells that the sampler itself waited: for the interpreter lock, or for a CPU.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

LATE_S = 0.02  # a sample this late or later is noted in `StackSampler.late`


@dataclass(frozen=True)
class StackSample:
    at: float  # time.monotonic()
    thread: str
    stack: str  # innermost frame first: "file.py:LINE function < file.py:LINE caller < ..."


def stack_text(frame: FrameType | None, depth: int) -> str:
    """The innermost `depth` frames from `frame` outward, as one line."""
    parts = []
    while frame is not None and len(parts) < depth:
        parts.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(parts)


class StackSampler:
    """Every `every_s`, while started, the stack of each thread of `threads` (thread ident -> name) into `samples`;
    a sample of `LATE_S` or more past its time into `late` as (time, seconds late)."""

    def __init__(self, threads: Mapping[int, str], every_s: float = 0.005, depth: int = 5) -> None:
        if every_s <= 0 or depth <= 0:
            raise ValueError(f"need every_s > 0 and depth > 0, got {every_s} and {depth}")
        self.threads = dict(threads)
        self.every_s = every_s
        self.depth = depth
        self.samples: list[StackSample] = []
        self.late: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StackSampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="stack-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _sample(self) -> None:
        due = time.monotonic()
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            now = time.monotonic()
            if now - due >= LATE_S:
                self.late.append((due, now - due))
            frames = sys._current_frames()
            self.samples += [StackSample(now, name, stack_text(frames[ident], self.depth))
                             for ident, name in self.threads.items() if ident in frames]
            due = max(due + self.every_s, now)


def stacks_in(samples: Sequence[StackSample], late: Sequence[tuple[float, float]],
              windows: Sequence[tuple[float, float]], shown: int = 3) -> list[str]:
    """Per thread, its most frequent stacks among the samples inside `windows` ((start, end) times), with their
    share; and the sampler's late samples that began inside them (the interpreter lock held, or no CPU)."""
    def inside(t: float) -> bool:
        return any(start <= t <= end for start, end in windows)

    if not windows:
        return ["no windows"]
    counts: dict[str, Counter[str]] = {}
    for s in samples:
        if inside(s.at):
            counts.setdefault(s.thread, Counter())[s.stack] += 1
    lines = []
    for thread, stacks in sorted(counts.items()):
        total = sum(stacks.values())
        lines.append(f"{thread}: {total} samples in {len(windows)} windows")
        lines += [f"  {100 * n / total:.0f}% {stack}" for stack, n in stacks.most_common(shown)]
    held = [seconds for at, seconds in late if inside(at)]
    lines.append(f"sampler late by {LATE_S * 1000:.0f} ms or more inside them: {len(held)} times"
                 + (f", longest {max(held) * 1000:.0f} ms" if held else ""))
    return lines

"""`Durations`: how long something took, as histogram counts an engine keeps and /metrics exports."""

from __future__ import annotations

import bisect
from typing import Any


class Durations:
    """Counts of durations per bucket (upper bounds `bounds_s`, seconds; one more bucket for longer ones, not
    cumulative) and their sum. One thread observes; others read a snapshot (`to_dict`). Other values (ratios)
    count the same way, with bounds in their own unit."""

    def __init__(self, bounds_s: tuple[float, ...]) -> None:
        assert list(bounds_s) == sorted(bounds_s) and len(set(bounds_s)) == len(bounds_s), "bounds increase"
        self.bounds_s = bounds_s
        self.counts = [0] * (len(bounds_s) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds_s, seconds)] += 1
        self.sum_s += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict[str, Any]:
        """{"counts": per bucket, "sum": seconds}: what an engine's stats carry."""
        return {"counts": list(self.counts), "sum": self.sum_s}

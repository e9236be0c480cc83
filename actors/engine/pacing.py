"""Spacing a worker's steps in time (paced decode, `EngineConfig.decode_pace_ms`)."""

from __future__ import annotations

import time
from collections.abc import Callable


class StepPacer:
    """Spaces a worker's steps: `wait()` returns once `interval_s` has passed since the previous `wait()`
    returned, while `when()` holds; at once otherwise. `sleep(seconds)` waits (a stop event's `wait`, so that
    stopping does not wait out the pace); `waited_s` adds up the time it waited.

    The semi-PD decode worker paces its steps while prefill has work: run back to back, decode steps take
    a fraction of the TPOT target and read all the weights each time, and prefill, on the other SMs, runs
    slower beside them (the latency profile's `contention`). Spaced to the pace, decode reads the weights
    less often and leaves that bandwidth and power to prefill.
    """

    def __init__(self, interval_s: float, when: Callable[[], bool], sleep: Callable[[float], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.when = when
        self.sleep = sleep
        self.clock = clock
        self.waited_s = 0.0
        self._last: float | None = None

    def wait(self) -> None:
        now = self.clock()
        if self._last is not None:
            remaining = self._last + self.interval_s - now
            if remaining > 0 and self.when():
                self.sleep(remaining)
                now = self.clock()
                self.waited_s += remaining
        self._last = now

"""`PauseWatch`: when the whole engine process stood still, which stalls both workers at once.

Both workers are threads of one Python process. Whatever keeps the interpreter lock, a garbage collection or a C
call that waits without releasing it, holds each worker as it comes back from its CUDA calls; a worker's stall log
then shows the time inside whichever call it was in (on the H100, run 32, decode's graph launch or its draw, and
prefill's attention plan, both at once, 130-220 ms). The watch tells that kind of stall from one on the device:
it times every garbage collection, and a heartbeat thread notes how late it wakes (the lock held by someone for
that long, or the process not scheduled). With `SEMIPD_PAUSE_STACKS=1` in the engine's environment the heartbeat
also has `faulthandler` write every thread's Python stack to stderr when it is held up past the threshold: the
thread in a C call that holds the lock is the one not waiting in a call that releases it.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

PAUSE_STACKS_ENV = "SEMIPD_PAUSE_STACKS"
PAUSE_THRESHOLD_MS = 30.0  # a pause this long or longer is logged (a decode step is 7-17 ms on an H100)
HEARTBEAT_MS = 10.0


class PauseWatch:
    """Times the process's garbage collections and any hold-up of a heartbeat thread; logs those of
    `threshold_ms` or more and keeps their totals (`gc_seconds`, `held_seconds`: time past the heartbeat's
    interval, so the threshold's slack is not counted as a pause)."""

    def __init__(self, threshold_ms: float = PAUSE_THRESHOLD_MS, heartbeat_ms: float = HEARTBEAT_MS,
                 stacks: bool | None = None) -> None:
        if threshold_ms <= heartbeat_ms or heartbeat_ms <= 0:
            raise ValueError(f"need 0 < heartbeat_ms < threshold_ms, got {heartbeat_ms} and {threshold_ms}")
        self.threshold_s = threshold_ms / 1000
        self.heartbeat_s = heartbeat_ms / 1000
        self.stacks = os.environ.get(PAUSE_STACKS_ENV) == "1" if stacks is None else stacks
        self.gc_seconds = 0.0
        self.gc_pauses = 0
        self.held_seconds = 0.0
        self.held_pauses = 0
        self._gc_started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        gc.callbacks.append(self._on_gc)
        self._thread = threading.Thread(target=self._beat, name="semipd-pause-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """`gc.callbacks`' hook: runs in the collecting thread, which holds the lock throughout."""
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._gc_started
        if seconds >= self.threshold_s:
            self.gc_seconds += seconds
            self.gc_pauses += 1
            log.info("paused: a generation-%d garbage collection took %.0f ms (%d collected)",
                     info.get("generation", -1), seconds * 1000, info.get("collected", 0))

    def _beat(self) -> None:
        before = time.perf_counter()
        while True:
            if self.stacks:
                faulthandler.dump_traceback_later(self.threshold_s + self.heartbeat_s, file=sys.stderr)
            stopped = self._stop.wait(self.heartbeat_s)  # gives up the lock; coming back needs it
            if self.stacks:
                faulthandler.cancel_dump_traceback_later()
            if stopped:
                return
            now = time.perf_counter()
            late = now - before - self.heartbeat_s
            before = now
            if late >= self.threshold_s:
                self.held_seconds += late
                self.held_pauses += 1
                log.info("paused: the process stood still %.0f ms (the interpreter lock held, or no CPU)", late * 1000)

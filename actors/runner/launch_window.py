"""How far a forward pass's kernel launches may run ahead of its GPU partition (`EngineConfig.prefill_layers_ahead`).

CUDA's launch queue is shared by the device's streams. A semi-PD prefill iteration queued whole is hundreds of
kernels on a share of the SMs: a launch into a full queue waits inside the driver until the GPU has drained some of
it, and a launch of the decode worker, on the other partition, waits with it (serving's run 34 on the H200 traced
such waits of 96-165 ms; an H100 chat server of run 39 logged 17 decode steps of 30-75 ms, nearly all host time in
the CUDA-graph step). A window keeps the prefill's share of that queue to a few layers.
"""

from __future__ import annotations

import time
from collections import deque

import torch


class LaunchWindow:
    """Lets at most `layers` decoder layers of one forward pass sit queued on the current stream: after a layer's
    kernels are queued (`after_layer`), the host waits for the end of the layer `layers` before it, the interpreter
    lock released. Call `start` before each forward pass. One window per worker thread (not thread-safe)."""

    def __init__(self, layers: int) -> None:
        if layers < 1:
            raise ValueError(f"a launch window holds at least one layer, got {layers}")
        self.layers = layers
        self.waited_s = 0.0  # host time spent waiting for the device, in all forward passes so far
        self._queued: deque[torch.cuda.Event] = deque()  # one per queued layer, oldest first
        self._spare: list[torch.cuda.Event] = []

    def start(self) -> None:
        """A new forward pass: what the last one queued no longer counts (its events are reused)."""
        self._spare.extend(self._queued)
        self._queued.clear()

    def after_layer(self) -> None:
        event = self._spare.pop() if self._spare else torch.cuda.Event()
        event.record()
        self._queued.append(event)
        if len(self._queued) > self.layers:
            oldest = self._queued.popleft()
            t = time.perf_counter()
            oldest.synchronize()
            self.waited_s += time.perf_counter() - t
            self._spare.append(oldest)

"""Prefill admission orders (`PrefillScheduler(order=...)` keys) that serve the TTFT SLO.

`EDFOrder` is earliest deadline first: a request's deadline is its own
(`Request.deadline`, monotonic seconds) or arrival + the deployment's TTFT target.
Within that, `priority` classes come first (lower value first, as in `fcfs`).
Starvation protection by aging: a request that has waited `aging_s` or more is
promoted above every younger one, and promoted requests go first come, first served.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.request import Request
from actors.scheduler.prefill import OrderKey, fcfs

ORDERS: tuple[str, ...] = ("fcfs", "edf")


def edf_key(req: Request, now: float, ttft_s: float, aging_s: float) -> tuple:
    """Sort key at time `now` (smaller first): (class, ...) with class 0 promoted by age, 1 the others."""
    if now - req.arrival_time >= aging_s:
        return (0, req.arrival_time, 0.0)
    deadline = req.deadline if req.deadline is not None else req.arrival_time + ttft_s
    return (1, req.priority, deadline)


@dataclass(frozen=True)
class EDFOrder:
    """Earliest deadline first with priority classes and aging; a `PrefillScheduler` key.

    ttft_ms: the deployment's TTFT target (deadline of requests without their own).
    aging_s: waiting this long promotes a request above all younger ones (default:
        twice the TTFT target).
    """

    ttft_ms: float = 1000.0
    aging_s: float | None = None
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0:
            raise ValueError(f"ttft_ms must be positive, got {self.ttft_ms}")
        if self.aging_s is not None and self.aging_s <= 0:
            raise ValueError(f"aging_s must be positive, got {self.aging_s}")

    @property
    def effective_aging_s(self) -> float:
        return self.aging_s if self.aging_s is not None else 2.0 * self.ttft_ms / 1000.0

    def __call__(self, req: Request) -> tuple:
        return edf_key(req, self.clock(), self.ttft_ms / 1000.0, self.effective_aging_s)


def make_order(name: str, ttft_ms: float = 1000.0, aging_s: float | None = None) -> OrderKey:
    """`fcfs` (priority, arrival) or `edf` (`EDFOrder`)."""
    if name == "fcfs":
        return fcfs
    if name == "edf":
        return EDFOrder(ttft_ms, aging_s)
    raise ValueError(f"unknown prefill order {name!r}; choose from {', '.join(ORDERS)}")

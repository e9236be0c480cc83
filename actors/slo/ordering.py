"""Prefill admission orders (`PrefillScheduler(order=...)` keys), and the bound on how long a waiting request is
kept behind younger ones.

`FCFSOrder`: priority classes first (lower value first), then first come, first served.
`EDFOrder`: earliest deadline first: a request's deadline is its own (`Request.deadline`, monotonic seconds) or
arrival + the deployment's TTFT target. Within that, `priority` classes come first (lower value first).

Both age requests by one bound, `aging_s` (`SLOConfig.aging_s`; default twice the deployment's TTFT target),
measured from `Request.arrival_time` on the order's clock:

- EDF's starvation protection: a request that has waited `aging_s` or more is promoted above every younger one,
  and promoted requests go first come, first served.
- Admission's hold-back ends there (`ordered_priority`): `--admission queue` admits a request predicted to miss its
  target at `QUEUE_PRIORITY` (`actors.slo.admission`; its `Request.priority` above its `requested_priority`), behind
  the requests that are on time. Once it has waited `aging_s` it is ordered at the priority it asked for, as though
  admission had let it in: under FCFS ahead of every on-time request of that class (they came later), under EDF
  among the promoted ones. A steady stream of on-time requests delays it by `aging_s` at most, not for ever; what
  it waits for from then on is what any request of its class waits for.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.request import Request

OrderKey = Callable[[Request], Any]  # a sort key: keys of two requests compare
ORDERS: tuple[str, ...] = ("fcfs", "edf")


def ordered_priority(req: Request, waited_s: float, aging_s: float) -> int:
    """The priority class `req` is ordered in after waiting `waited_s`: the one admission gave it
    (`Request.priority`), until it has waited `aging_s`; from then on the one it asked for."""
    return req.requested_priority if waited_s >= aging_s else req.priority


def fcfs_key(req: Request, now: float, aging_s: float) -> tuple:
    """Sort key at time `now` (smaller first): (priority class, arrival)."""
    return (ordered_priority(req, now - req.arrival_time, aging_s), req.arrival_time)


def edf_key(req: Request, now: float, ttft_s: float, aging_s: float) -> tuple:
    """Sort key at time `now` (smaller first): (class, ...) with class 0 promoted by age, 1 the others (an unaged
    request is at the priority admission gave it: `ordered_priority`)."""
    if now - req.arrival_time >= aging_s:
        return (0, req.arrival_time, 0.0)
    deadline = req.deadline if req.deadline is not None else req.arrival_time + ttft_s
    return (1, req.priority, deadline)


@dataclass(frozen=True)
class AgingOrder(ABC):
    """A `PrefillScheduler` key that reads `clock` to age requests (the module's rule).

    ttft_ms: the deployment's TTFT target.
    aging_s: the aging bound (default: twice the TTFT target).
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
        return self.key(req, self.clock())

    @abstractmethod
    def key(self, req: Request, now: float) -> tuple:
        """`req`'s sort key at time `now`."""


@dataclass(frozen=True)
class FCFSOrder(AgingOrder):
    """Priority classes, first come, first served (`fcfs_key`); admission's hold-back ends after `aging_s`."""

    def key(self, req: Request, now: float) -> tuple:
        return fcfs_key(req, now, self.effective_aging_s)


@dataclass(frozen=True)
class EDFOrder(AgingOrder):
    """Earliest deadline first with priority classes and aging (`edf_key`); `ttft_ms` is also the deadline of
    requests without their own."""

    def key(self, req: Request, now: float) -> tuple:
        return edf_key(req, now, self.ttft_ms / 1000.0, self.effective_aging_s)


def make_order(name: str, ttft_ms: float = 1000.0, aging_s: float | None = None) -> AgingOrder:
    """`fcfs` (`FCFSOrder`) or `edf` (`EDFOrder`)."""
    if name == "fcfs":
        return FCFSOrder(ttft_ms, aging_s)
    if name == "edf":
        return EDFOrder(ttft_ms, aging_s)
    raise ValueError(f"unknown prefill order {name!r}; choose from {', '.join(ORDERS)}")

"""Request arrival times: Poisson at a rate, or gamma with burstiness (vLLM semantics).

Inter-arrival gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate,
coefficient of variation 1/sqrt(burstiness). burstiness 1 is a Poisson process; below 1
is burstier, above 1 more regular. As vLLM's get_request does, one gap is drawn per request
and their running sum is rescaled to N/rate, so that N requests take N/rate seconds whatever
the seed; unlike vLLM the first request is sent at 0 (its first gap is not waited for). An
infinite rate sends everything at time 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class ArrivalError(ValueError):
    """An invalid arrival setting (CLI exit 2)."""


@dataclass(frozen=True)
class ArrivalConfig:
    """`rate` in requests/s (math.inf: all at once), `burstiness` > 0, and the seed."""

    rate: float
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if math.isnan(self.rate) or self.rate <= 0:
            raise ArrivalError(f"request rate must be positive (or inf), got {self.rate}")
        if not (math.isfinite(self.burstiness) and self.burstiness > 0):
            raise ArrivalError(f"burstiness must be a positive number, got {self.burstiness}")


def arrival_offsets(config: ArrivalConfig, n: int, rate_scales: np.ndarray | None = None) -> np.ndarray:
    """Seconds after the start at which each of `n` requests is sent; the first at 0.

    `rate_scales` (shape [n], positive) multiplies the rate request by request: the gap before
    request i is drawn at `config.rate * rate_scales[i]` (a workload whose phases arrive at
    different rates). The same seed draws the same unit gaps whatever the scales. The schedule is
    rescaled so that its gaps sum to the sum of their means (vLLM's rescaling to N/rate), then shifted
    so that the first request is sent at 0.
    """
    if n < 0:
        raise ArrivalError(f"number of requests must be non-negative, got {n}")
    if math.isinf(config.rate) or n == 0:
        return np.zeros(n)
    scales = np.ones(n) if rate_scales is None else np.asarray(rate_scales, dtype=float)
    if scales.shape != (n,) or not bool(np.all(scales > 0)):
        raise ArrivalError(f"rate scales must be {n} positive numbers")
    rng = np.random.default_rng([config.seed, 2])
    unit_gaps = rng.gamma(shape=config.burstiness, scale=1.0 / config.burstiness, size=n)  # mean 1
    delays = np.cumsum(unit_gaps / (config.rate * scales))
    if delays[-1] > 0:  # vLLM's rescaling: the last arrival at the time the rates give (n / rate at one rate)
        delays *= float(np.sum(1.0 / (config.rate * scales))) / delays[-1]
    return delays - delays[0]


def parse_rates(text: str) -> tuple[float, ...]:
    """'1,2,4,8' or 'inf' -> request rates, each positive (a sweep runs them in order)."""
    rates: list[float] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            rate = float(item)
        except ValueError:
            raise ArrivalError(f"request rate {item!r} is not a number") from None
        if math.isnan(rate) or rate <= 0:
            raise ArrivalError(f"request rate must be positive (or inf), got {item}")
        rates.append(rate)
    if not rates:
        raise ArrivalError("give at least one request rate")
    return tuple(rates)


__all__ = ["ArrivalConfig", "ArrivalError", "arrival_offsets", "parse_rates"]

"""Request arrival times: Poisson at a rate, or gamma with burstiness, or a ramp of rates (vLLM's get_request).

Inter-arrival gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate,
coefficient of variation 1/sqrt(burstiness). burstiness 1 is a Poisson process; below 1
is burstier, above 1 more regular; inf sends at constant gaps of 1/rate. As vLLM's get_request
does, one gap is drawn per request, the first one's included (request i is sent at the sum of
gaps 0..i), and their running sum is rescaled to N/rate, so that N requests take N/rate seconds
whatever the seed. An infinite rate sends everything at time 0. A ramp (`RampUp`) draws request
i's gap at its own rate, from the start rate to the end rate over the N requests, and does not
rescale them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np


RAMP_STRATEGIES = ("linear", "exponential")


class ArrivalError(ValueError):
    """An invalid arrival setting (CLI exit 2)."""


@dataclass(frozen=True)
class RampUp:
    """vLLM's `--ramp-up-strategy`: the request rate goes from `start_rps` to `end_rps` over the run's requests,
    linearly or exponentially in the request's index."""

    strategy: str
    start_rps: float
    end_rps: float

    def __post_init__(self) -> None:
        if self.strategy not in RAMP_STRATEGIES:
            raise ArrivalError(f"ramp-up strategy must be one of {', '.join(RAMP_STRATEGIES)}, got {self.strategy!r}")
        for name, rps in (("start", self.start_rps), ("end", self.end_rps)):
            if not (math.isfinite(rps) and rps > 0):
                raise ArrivalError(f"ramp-up {name} RPS must be a positive number, got {rps}")
        if self.start_rps > self.end_rps:
            raise ArrivalError(f"ramp-up start RPS {self.start_rps:g} is above its end RPS {self.end_rps:g}")

    def rates(self, n: int) -> np.ndarray:
        """The rate of each of `n` requests (vLLM's _get_current_request_rate)."""
        progress = np.arange(n) / max(n - 1, 1)
        if self.strategy == "linear":
            return self.start_rps + (self.end_rps - self.start_rps) * progress
        return self.start_rps * (self.end_rps / self.start_rps) ** progress

    def to_dict(self) -> dict[str, str | float]:
        return {"ramp_up_strategy": self.strategy, "ramp_up_start_rps": self.start_rps,
                "ramp_up_end_rps": self.end_rps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RampUp | None:
        """The ramp of a result JSON's keys (`to_dict`'s), None when it has none."""
        if data.get("ramp_up_strategy") is None:
            return None
        return cls(str(data["ramp_up_strategy"]), float(data["ramp_up_start_rps"]), float(data["ramp_up_end_rps"]))


@dataclass(frozen=True)
class ArrivalConfig:
    """`rate` in requests/s (math.inf: all at once), `burstiness` > 0 (math.inf: constant gaps), the seed, and a
    `ramp` of rates that replaces `rate` (which must then be math.inf, as vLLM asks)."""

    rate: float
    burstiness: float = 1.0
    seed: int = 0
    ramp: RampUp | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.rate) or self.rate <= 0:
            raise ArrivalError(f"request rate must be positive (or inf), got {self.rate}")
        if math.isnan(self.burstiness) or self.burstiness <= 0:
            raise ArrivalError(f"burstiness must be a positive number (or inf), got {self.burstiness}")
        if self.ramp is not None and not math.isinf(self.rate):
            raise ArrivalError("a ramp-up sets the request rate: do not give --request-rate with it")


def _unit_gaps(config: ArrivalConfig, n: int) -> np.ndarray:
    """`n` gaps of mean 1 and coefficient of variation 1/sqrt(burstiness) (all 1 at burstiness inf)."""
    if math.isinf(config.burstiness):
        return np.ones(n)
    rng = np.random.default_rng([config.seed, 2])
    return rng.gamma(shape=config.burstiness, scale=1.0 / config.burstiness, size=n)


def arrival_offsets(config: ArrivalConfig, n: int, rate_scales: np.ndarray | None = None) -> np.ndarray:
    """Seconds after the start at which each of `n` requests is sent: request i after the gaps of requests 0..i.

    `rate_scales` (shape [n], positive) multiplies the rate request by request: the gap before
    request i is drawn at `config.rate * rate_scales[i]` (a workload whose phases arrive at
    different rates). The same seed draws the same unit gaps whatever the scales. The schedule is
    rescaled so that its gaps sum to the sum of their means (vLLM's rescaling to N/rate). With a ramp, request
    i's gap is drawn at `ramp.rates(n)[i]`, not rescaled (vLLM's), and `rate_scales` must be None.
    """
    if n < 0:
        raise ArrivalError(f"number of requests must be non-negative, got {n}")
    if config.ramp is not None:
        if rate_scales is not None and not bool(np.all(np.asarray(rate_scales) == 1.0)):
            raise ArrivalError("a ramp-up cannot be combined with phases at their own rates")
        return np.cumsum(_unit_gaps(config, n) / config.ramp.rates(n))
    if math.isinf(config.rate) or n == 0:
        return np.zeros(n)
    scales = np.ones(n) if rate_scales is None else np.asarray(rate_scales, dtype=float)
    if scales.shape != (n,) or not bool(np.all(scales > 0)):
        raise ArrivalError(f"rate scales must be {n} positive numbers")
    rates = config.rate * scales
    delays = np.cumsum(_unit_gaps(config, n) / rates)
    if delays[-1] > 0:  # vLLM's rescaling: the last arrival at the time the rates give (n / rate at one rate)
        delays *= float(np.sum(1.0 / rates)) / delays[-1]
    return delays


def rps_change_events(ramp: RampUp, offsets: np.ndarray, started: float) -> list[dict[str, Any]]:
    """vLLM's `rps_change_events` of a ramp: the ramp's start RPS (as an integer) at `started` (wall-clock
    seconds), then each whole RPS the ramp reaches, at the send time of the first request that reaches it."""
    rates = ramp.rates(len(offsets))
    last = int(ramp.start_rps)
    events = [{"rps": last, "timestamp": datetime.fromtimestamp(started).isoformat()}]
    for rate, offset in zip(rates, offsets):
        if int(rate) > last:
            stamp = datetime.fromtimestamp(started + float(offset)).isoformat()
            events.extend({"rps": rps, "timestamp": stamp} for rps in range(last + 1, int(rate) + 1))
            last = int(rate)
    return events


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


__all__ = ["ArrivalConfig", "ArrivalError", "RAMP_STRATEGIES", "RampUp", "arrival_offsets", "parse_rates",
           "rps_change_events"]

"""Synthetic serving workloads from published length statistics (DESIGN.md section 5).

No dataset can be downloaded here, so a workload is a distribution of (input, output)
token counts plus token-count-controlled filler text:

- `sharegpt`: ~496 in / ~97 out; prompts <= 1024, prompt + output <= 2048 (semi-PD's
  harness filter).
- `arxiv`: arXiv summarization, ~3832 in / ~200 out; in + out <= 8192 (an 8K-context model).
- `long-doc`: long-document QA (LDC), ~5905 in / ~180 out; in + out <= 8192.
- `math`: MATH-500-like reasoning: short problems, long chains of thought
  (~110 in / ~2500 out; our assumption, no published mean was given); in + out <= 8192.
- `mixed`: 60% sharegpt + 40% long-doc, shuffled.
- `shifting`: phases in sequence (default: first half sharegpt, second half long-doc),
  so the prefill/decode balance changes mid-run; a phase may arrive faster or slower than
  the run's rate (`sharegpt:0.5@10,long-doc:0.5`: chat at ten times the rate of documents).
- `random`: vLLM's random dataset: uniform in [len*(1-r), len*(1+r)].

With a dataset file (`dataset_path`; `sharegpt`'s JSON or `custom` JSON Lines) the requests come from it
instead (`cluster.bench.datasets`).

Lengths are drawn from log-normals truncated to [low, high] whose *truncated* mean is
the published mean (mu solved numerically), so means hold and caps are respected.
Everything is seeded: the same config gives the same requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from statistics import NormalDist
from typing import Any, NamedTuple, Protocol

import numpy as np

_NORMAL = NormalDist()


class WorkloadError(ValueError):
    """An invalid workload setting (CLI exit 2)."""


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@dataclass(frozen=True)
class LogNormalLengths:
    """Token counts from a log-normal truncated to [low, high] with truncated mean `mean`."""

    mean: float
    sigma: float
    low: int
    high: int

    def __post_init__(self) -> None:
        if not (1 <= self.low < self.high):
            raise WorkloadError(f"length bounds must satisfy 1 <= low < high, got [{self.low}, {self.high}]")
        if not (self.low < self.mean < self.high):
            raise WorkloadError(f"mean {self.mean} must lie strictly inside [{self.low}, {self.high}]")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise WorkloadError(f"sigma must be positive, got {self.sigma}")
        _ = self.mu  # fail at construction when the mean is unreachable

    def _bounds(self, mu: float) -> tuple[float, float]:
        return (math.log(self.low) - mu) / self.sigma, (math.log(self.high) - mu) / self.sigma

    def truncated_mean(self, mu: float) -> float:
        """Mean of exp(N(mu, sigma^2)) conditioned on [low, high]."""
        a, b = self._bounds(mu)
        mass = _phi(b) - _phi(a)
        if mass < 1e-12:
            return float(self.low if a > 0 else self.high)
        s = self.sigma
        return math.exp(mu + s * s / 2) * (_phi(b - s) - _phi(a - s)) / mass

    @cached_property
    def mu(self) -> float:
        """The log-space location giving the requested truncated mean (bisection)."""
        lo = math.log(self.low) - 4 * self.sigma
        hi = math.log(self.high) + 4 * self.sigma
        if not (self.truncated_mean(lo) <= self.mean <= self.truncated_mean(hi)):
            raise WorkloadError(f"mean {self.mean} is not reachable with sigma {self.sigma} in [{self.low}, {self.high}]")
        for _ in range(200):
            mid = (lo + hi) / 2
            if self.truncated_mean(mid) < self.mean:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` integer lengths in [low, high] (inverse-CDF sampling of the truncated law)."""
        a, b = self._bounds(self.mu)
        u = rng.uniform(_phi(a), _phi(b), size=n)
        u = np.clip(u, 1e-15, 1 - 1e-15)
        z = np.array([_NORMAL.inv_cdf(float(x)) for x in u])
        x = np.rint(np.exp(self.mu + self.sigma * z)).astype(np.int64)
        return np.clip(x, self.low, self.high)


@dataclass(frozen=True)
class UniformLengths:
    """Integer lengths uniform in [low, high] (vLLM's random dataset)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not (1 <= self.low <= self.high):
            raise WorkloadError(f"length range must satisfy 1 <= low <= high, got [{self.low}, {self.high}]")

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)


LengthDist = LogNormalLengths | UniformLengths


@dataclass(frozen=True)
class LengthProfile:
    """Input and output length laws of one kind of traffic; `max_total` caps input + output."""

    name: str
    input: LengthDist
    output: LengthDist
    max_total: int | None = None

    def __post_init__(self) -> None:
        if self.max_total is not None and self.max_total < self.input.low + self.output.low:
            raise WorkloadError(f"{self.name}: max_total {self.max_total} is below the smallest request")

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Input and output lengths; outputs are clipped so input + output <= max_total."""
        ins = self.input.sample(rng, n)
        outs = self.output.sample(rng, n)
        if self.max_total is not None:
            outs = np.maximum(np.minimum(outs, self.max_total - ins), 1)
        return ins, outs


PROFILES: dict[str, LengthProfile] = {
    "sharegpt": LengthProfile(
        "sharegpt", LogNormalLengths(496, 1.0, 4, 1024), LogNormalLengths(97, 1.0, 1, 1024), max_total=2048
    ),
    # long inputs capped so every request fits an 8K-context model (Llama-3-8B): 7680 in + up to 512 out
    "arxiv": LengthProfile(
        "arxiv", LogNormalLengths(3832, 0.4, 512, 7680), LogNormalLengths(200, 0.4, 16, 512), max_total=8192
    ),
    "long-doc": LengthProfile(
        "long-doc", LogNormalLengths(5905, 0.35, 1024, 7680), LogNormalLengths(180, 0.4, 16, 512), max_total=8192
    ),
    # outputs capped so that every request fits an 8K-context model too: up to 1024 in + 7168 out
    "math": LengthProfile(
        "math", LogNormalLengths(110, 0.5, 16, 1024), LogNormalLengths(2500, 0.6, 128, 7168), max_total=8192
    ),
}
MIXES: dict[str, tuple[tuple[str, float], ...]] = {"mixed": (("sharegpt", 0.6), ("long-doc", 0.4))}


class Phase(NamedTuple):
    """One phase of `shifting`: a length profile for `fraction` of the run's time, its requests arriving at
    `rate_scale` times the run's request rate (so it holds fraction * rate_scale of the requests)."""

    name: str
    fraction: float
    rate_scale: float = 1.0


def time_shares(phases: Sequence[Phase]) -> tuple[float, ...]:
    """Each phase's share of the run's time: the fractions, normalized to sum to 1."""
    total = sum(p.fraction for p in phases)
    return tuple(p.fraction / total for p in phases)


def mean_rate_scale(phases: Sequence[Phase]) -> float:
    """The run's mean arrival rate over its request rate: a window of T seconds at rate R holds
    about R * T * mean_rate_scale(phases) requests."""
    return sum(share * p.rate_scale for share, p in zip(time_shares(phases), phases))


DEFAULT_PHASES: tuple[Phase, ...] = (Phase("sharegpt", 0.5), Phase("long-doc", 0.5))
WORKLOAD_NAMES: tuple[str, ...] = (*PROFILES, *MIXES, "shifting", "random", "custom")
DATASET_WORKLOADS: tuple[str, ...] = ("sharegpt", "custom")  # those that read `dataset_path`


def _phase_number(item: str, what: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise WorkloadError(f"phase {item!r}: {what} must be a number") from None


def parse_phases(text: str) -> tuple[Phase, ...]:
    """'sharegpt:0.5@10,long-doc:0.5' -> phases; the time fraction defaults to an equal share, the rate
    scale to 1."""
    phases: list[Phase] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        head, at, scale = item.partition("@")
        name, _, frac = head.partition(":")
        fraction = _phase_number(item, "fraction", frac) if frac else 1.0
        rate_scale = _phase_number(item, "rate scale", scale) if at else 1.0
        phases.append(Phase(name.strip(), fraction, rate_scale))
    if not phases:
        raise WorkloadError("phases must name at least one profile")
    return tuple(phases)


@dataclass(frozen=True)
class WorkloadConfig:
    """Which workload, how many requests, and its seed.

    `run` numbers the runs of a sweep: each draws its own lengths and prompts (from `seed`
    and `run`), so that no run finds an earlier one's prompts in the server's prefix cache.
    `phases` is used by `shifting` (profile names from PROFILES or `random`, each with a
    time fraction and a rate scale: `Phase`); `input_len`, `output_len`, `range_ratio` by `random` (vLLM semantics).
    `dataset_path`: a file to take the requests from (`sharegpt`, and `custom`, which needs one; `output_len`
    is then the output of a line that names none).
    """

    name: str = "sharegpt"
    num_prompts: int = 1000
    seed: int = 0
    run: int = 0
    phases: tuple[Phase, ...] = DEFAULT_PHASES
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    dataset_path: str | None = None

    def __post_init__(self) -> None:
        if self.name not in WORKLOAD_NAMES:
            raise WorkloadError(f"workload must be one of {', '.join(WORKLOAD_NAMES)}, got {self.name!r}")
        if self.dataset_path is not None and self.name not in DATASET_WORKLOADS:
            raise WorkloadError(f"a dataset path applies to the {' and '.join(DATASET_WORKLOADS)} workloads only")
        if self.name == "custom" and self.dataset_path is None:
            raise WorkloadError("the custom workload reads its requests from a dataset path")
        if self.dataset_path is not None and not Path(self.dataset_path).is_file():
            raise WorkloadError(f"dataset file not found: {self.dataset_path}")
        if self.num_prompts < 1:
            raise WorkloadError(f"num_prompts must be at least 1, got {self.num_prompts}")
        if self.seed < 0 or self.run < 0:
            raise WorkloadError(f"seed and run must be >= 0, got {self.seed} and {self.run}")
        if self.input_len < 1 or self.output_len < 1:
            raise WorkloadError("input_len and output_len must be at least 1")
        if not (0.0 <= self.range_ratio < 1.0):
            raise WorkloadError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        object.__setattr__(self, "phases", tuple(Phase(str(p[0]), *map(float, p[1:])) for p in self.phases))
        for name, fraction, rate_scale in self.phases:
            if name not in (*PROFILES, "random"):
                raise WorkloadError(f"phase {name!r} must be one of {', '.join((*PROFILES, 'random'))}")
            if not (math.isfinite(fraction) and fraction > 0):
                raise WorkloadError(f"phase {name!r}: fraction must be positive, got {fraction}")
            if not (math.isfinite(rate_scale) and rate_scale > 0):
                raise WorkloadError(f"phase {name!r}: rate scale must be positive, got {rate_scale}")

    def random_profile(self) -> LengthProfile:
        r = self.range_ratio
        return LengthProfile(
            "random",
            UniformLengths(max(1, int(self.input_len * (1 - r))), int(self.input_len * (1 + r))),
            UniformLengths(max(1, int(self.output_len * (1 - r))), int(self.output_len * (1 + r))),
        )

    def profile(self, name: str) -> LengthProfile:
        return self.random_profile() if name == "random" else PROFILES[name]

    def parts(self) -> tuple[tuple[LengthProfile, float], ...]:
        """The profiles this workload draws from, each with its share of the requests."""
        if self.dataset_path is not None:
            raise WorkloadError("a dataset workload's requests come from its file (cluster.bench.datasets)")
        if self.name in PROFILES or self.name == "random":
            return ((self.profile(self.name), 1.0),)
        if self.name in MIXES:
            return tuple((self.profile(n), w) for n, w in MIXES[self.name])
        return tuple((self.profile(p.name), p.fraction * p.rate_scale) for p in self.phases)

    def rate_scales(self) -> np.ndarray:
        """Each request's arrival-rate multiplier, in arrival order: its phase's for `shifting`, else 1."""
        if not self.ordered:
            return np.ones(self.num_prompts)
        counts = split_counts([w for _, w in self.parts()], self.num_prompts)
        return np.repeat([p.rate_scale for p in self.phases], counts)

    @property
    def ordered(self) -> bool:
        """True when parts run one after another (shifting), False when shuffled together."""
        return self.name == "shifting"


@dataclass(frozen=True)
class LengthSample:
    input_len: int
    output_len: int
    profile: str


def split_counts(weights: Sequence[float], n: int) -> list[int]:
    """Integer counts summing to n, proportional to weights (largest remainder)."""
    total = float(sum(weights))
    exact = [w / total * n for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def sample_lengths(config: WorkloadConfig) -> list[LengthSample]:
    """The workload's (input, output, profile) per request, in arrival order."""
    rng = np.random.default_rng([config.seed, config.run, 0])
    parts = config.parts()
    counts = split_counts([w for _, w in parts], config.num_prompts)
    samples: list[LengthSample] = []
    for (profile, _), count in zip(parts, counts):
        ins, outs = profile.sample(rng, count)
        samples.extend(LengthSample(int(i), int(o), profile.name) for i, o in zip(ins, outs))
    if not config.ordered:
        order = rng.permutation(len(samples))
        samples = [samples[i] for i in order]
    return samples


# ---------------------------------------------------------------- prompt text

WORDS: tuple[str, ...] = tuple(
    """the of and to in is was for that on with as by at from his an were are which this be or
    has had not first one their its new after but who they have her she two been other when there
    all during into school time may years more most only over city some world would where later up
    such used many can state about national out known university united then made team game part
    under film three series well work since while between both north south east west house water
    light river small large early until each because second music group began album same book place
    system number around family city court church member against following public people line""".split()
)


class PromptBuilder(Protocol):
    """Makes prompt text of a given token count (as the server will count it, specials included)."""

    exact: bool

    def build(self, num_tokens: int, rng: np.random.Generator) -> str: ...

    def count(self, text: str) -> int:
        """Tokens of `text` as a prompt (specials included)."""
        ...


def random_words(rng: np.random.Generator, n: int) -> str:
    idx = rng.integers(0, len(WORDS), size=max(n, 1))
    return " ".join(WORDS[i] for i in idx)


@dataclass(frozen=True)
class RatioPromptBuilder:
    """Approximate: random common words, `tokens_per_word` tokens each, plus `special_tokens`."""

    tokens_per_word: float = 1.0
    special_tokens: int = 0
    exact: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tokens_per_word) and self.tokens_per_word > 0):
            raise WorkloadError(f"tokens_per_word must be positive, got {self.tokens_per_word}")

    def build(self, num_tokens: int, rng: np.random.Generator) -> str:
        words = max(1, round((num_tokens - self.special_tokens) / self.tokens_per_word))
        return random_words(rng, words)

    def count(self, text: str) -> int:
        return round(len(text.split()) * self.tokens_per_word) + self.special_tokens


class TokenizerPromptBuilder:
    """Exact: slices a pool of token ids from random words, then decode/re-encode to fit."""

    exact = True

    def __init__(self, tokenizer: Any, pool_tokens: int = 8192, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = int(tokenizer.num_special_tokens_to_add())
        text = random_words(np.random.default_rng([seed, 7]), pool_tokens)
        self.pool: list[int] = list(tokenizer.encode(text, add_special_tokens=False))
        if not self.pool:
            raise WorkloadError("the tokenizer produced no tokens for the prompt pool")

    @classmethod
    def from_dir(cls, path: str | Path) -> TokenizerPromptBuilder:
        """Load a Hugging Face tokenizer (transformers AutoTokenizer) from a local directory."""
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        return cls(AutoTokenizer.from_pretrained(str(path)))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) + self.special_tokens

    def _take(self, start: int, n: int) -> list[int]:
        size = len(self.pool)
        return [self.pool[(start + i) % size] for i in range(n)]

    def build(self, num_tokens: int, rng: np.random.Generator) -> str:
        target = max(1, num_tokens - self.special_tokens)
        start = int(rng.integers(0, len(self.pool)))
        ids = self._take(start, target)
        text = ""
        for _ in range(10):
            text = self.tokenizer.decode(ids)
            got = len(self.tokenizer.encode(text, add_special_tokens=False))
            if got == target:
                break
            if got > target:
                ids = ids[: max(1, len(ids) - (got - target))]
            else:
                ids = ids + self._take(start + len(ids), target - got)
        return text


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: the prompt, its intended token count, and `max_tokens`."""

    index: int
    prompt: str
    prompt_len: int
    output_len: int
    profile: str


def build_requests(config: WorkloadConfig, builder: PromptBuilder) -> list[BenchRequest]:
    """The workload's requests, in arrival order (seeded: same config, same prompts)."""
    rng = np.random.default_rng([config.seed, config.run, 1])
    return [
        BenchRequest(i, builder.build(s.input_len, rng), s.input_len, s.output_len, s.profile)
        for i, s in enumerate(sample_lengths(config))
    ]


__all__ = [
    "BenchRequest", "LengthProfile", "LengthSample", "LogNormalLengths", "PROFILES", "Phase", "PromptBuilder",
    "RatioPromptBuilder", "TokenizerPromptBuilder", "UniformLengths", "WORKLOAD_NAMES", "WorkloadConfig",
    "WorkloadError", "build_requests", "parse_phases", "sample_lengths", "split_counts",
]

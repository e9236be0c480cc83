"""Latency model of one (device, model, split set): prefill and decode time per iteration.

Two small parametric forms, fitted by least squares from profile samples (numpy only):

    prefill_ms = (a * tokens + b * attn + c) * slow_compute(prefill_sms) * (1 + kp if decode runs)
    decode_ms  = (m * batch + k * context + w) * slow_bw(decode_sms)      * (1 + kd if prefill runs)

`attn` counts query-key pairs: a chunk of n new tokens after `cached` tokens already
in KV costs n * cached + n * (n + 1) / 2. The base terms are full-device times.

- Prefill is compute-bound, so its speed is ~linear in its SMs (DESIGN 3). Amdahl's
  form keeps room for a part that does not scale: slow_compute(s) = (1 - r) + r * T / s,
  with r = 1 for pure compute scaling and r = 0 for none (a CPU profile).
- Decode is bandwidth-bound and saturates early (32 of 132 SMs reach ~0.7x):
  speed_bw(s) = (1 - exp(-s / s0)) / (1 - exp(-T / s0)), slow_bw = 1 / speed_bw;
  s0 = 0 means flat (no dependence on SMs, the CPU case).
- Contention: memory bandwidth is shared, not split; each phase slows by a constant
  factor while the other one runs (decode ~55% on the H100, DESIGN 3).

Models are saved as JSON keyed by `profile_key(device, model, splits)`; see
`save_models`, `load_model` and `load_or_profile`. `ModelSource` says where an engine
gets its model at start (a profile file, or profiling it on a grid of a given size).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

FORMAT = "semipd-latency-model"
VERSION = 1
PhaseName = Literal["prefill", "decode"]
PHASES: tuple[PhaseName, ...] = ("prefill", "decode")
PROFILE_GRIDS: tuple[str, ...] = ("quick", "full")


@dataclass(frozen=True)
class ModelSource:
    """Where an engine gets its latency model at start (`actors.slo.profiler.engine_latency_model`).

    `path`: JSON profile file to load the engine's profile from, or to save a fresh one to
    (None: profile at every start, save nothing). `grid`: the profiling grid when profiling
    is needed, `quick` (a few points, seconds; the CPU profile) or `full` (the profiler's default).
    """

    path: str | None = None
    grid: str = "quick"

    def __post_init__(self) -> None:
        if self.grid not in PROFILE_GRIDS:
            raise ValueError(f"grid must be one of {PROFILE_GRIDS}, got {self.grid!r}")
        if self.path is not None and not self.path:
            raise ValueError("path must be None or a file path")
_R_GRID = np.linspace(0.0, 1.0, 101)


def attn_units(tokens: float, cached: float = 0) -> float:
    """Query-key pairs of a prefill chunk of `tokens` new tokens after `cached` ones."""
    return tokens * cached + tokens * (tokens + 1) / 2


@dataclass(frozen=True)
class Sample:
    """One measured iteration.

    prefill: x = (new tokens, attn units); decode: x = (batch size, total context tokens).
    `sms` are the SMs of the measured phase; `concurrent` is true when the other phase
    ran at the same time.
    """

    phase: PhaseName
    x: tuple[float, float]
    sms: int
    ms: float
    concurrent: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.sms < 1:
            raise ValueError(f"sms must be >= 1, got {self.sms}")
        if not (self.ms > 0 and math.isfinite(self.ms)):
            raise ValueError(f"ms must be positive and finite, got {self.ms}")

    @classmethod
    def prefill(cls, tokens: int, cached: int, sms: int, ms: float, concurrent: bool = False) -> Sample:
        return cls("prefill", (float(tokens), attn_units(tokens, cached)), sms, ms, concurrent)

    @classmethod
    def decode(cls, batch: int, context: int, sms: int, ms: float, concurrent: bool = False) -> Sample:
        return cls("decode", (float(batch), float(context)), sms, ms, concurrent)


@dataclass(frozen=True)
class PhaseModel:
    """time_ms = (coef . (x0, x1, 1)) * slowdown(sms) * (1 + contention_at(sms) if concurrent).

    `scale` is Amdahl's r for prefill ("compute") and the saturation constant s0 in SMs
    for decode ("bandwidth"). `fit_error` is the RMS relative error on the fit samples.
    `contention`: the slowdown the other phase running beside this one adds at an even split;
    `contention_slope`: how it grows with the other phase's share of the SMs (`contention_at`).
    """

    kind: Literal["compute", "bandwidth"]
    coef: tuple[float, float, float]
    scale: float
    contention: float = 0.0
    fit_error: float = 0.0
    contention_slope: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("compute", "bandwidth"):
            raise ValueError(f"kind must be compute or bandwidth, got {self.kind!r}")
        if len(self.coef) != 3 or any(c < 0 or not math.isfinite(c) for c in self.coef):
            raise ValueError(f"coef must be 3 non-negative finite numbers, got {self.coef}")
        if self.kind == "compute" and not 0.0 <= self.scale <= 1.0:
            raise ValueError(f"compute scale (Amdahl r) must be in [0, 1], got {self.scale}")
        if self.kind == "bandwidth" and not (0 <= self.scale < math.inf):
            raise ValueError(f"bandwidth scale s0 must be finite and >= 0, got {self.scale}")
        if not 0 <= self.contention < math.inf:
            raise ValueError(f"contention must be finite and >= 0, got {self.contention}")
        if not math.isfinite(self.contention_slope):
            raise ValueError(f"contention_slope must be finite, got {self.contention_slope}")

    def slowdown(self, sms: float, total_sms: int) -> float:
        """Time on `sms` SMs relative to the whole device (>= 1 for fewer SMs)."""
        return float(_slowdown(self.kind, self.scale, np.array([float(sms)]), total_sms)[0])

    def base_ms(self, x0: float, x1: float) -> float:
        a, b, c = self.coef
        return a * x0 + b * x1 + c

    def contention_at(self, sms: float, total_sms: int) -> float:
        """The slowdown (>= 0) the other phase adds while it runs on the SMs this phase's `sms` leave it:
        `contention + contention_slope * (its share - 1/2)`. A wider prefill reads more beside decode, and draws
        more power: on the H200 (2026-12-04, run 20, chat at 40.6 req/s) decode's steps on 60 SMs beside prefill
        on 72 took 1.20x those on 68 beside 64, where the model with one contention for every split (the fewer
        SMs and the larger batch, 30 against 25) said 1.09x."""
        return max(0.0, self.contention + self.contention_slope * other_share_past_even(sms, total_sms))

    def predict(self, x0: float, x1: float, sms: float, total_sms: int, concurrent: bool = False) -> float:
        t = self.base_ms(x0, x1) * self.slowdown(sms, total_sms)
        return t * (1.0 + self.contention_at(sms, total_sms)) if concurrent else t


def other_share_past_even(sms: float, total_sms: int) -> float:
    """The other phase's share of the SMs, minus 1/2, when this one runs on `sms` (what contention grows with)."""
    return 0.5 - sms / total_sms


def _slowdown(kind: str, scale: float, sms: np.ndarray, total: int) -> np.ndarray:
    s = np.clip(sms, 1e-9, None)
    if kind == "compute":
        return (1.0 - scale) + scale * total / s
    if scale <= 0:
        return np.ones_like(s)
    return (1.0 - math.exp(-total / scale)) / (1.0 - np.exp(-s / scale))


@dataclass(frozen=True)
class LatencyModel:
    """Prefill and decode latency of one model on one device type, over its SM splits."""

    device: str
    model: str
    total_sms: int
    splits: tuple[int, ...]
    prefill: PhaseModel
    decode: PhaseModel
    num_samples: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.total_sms < 1:
            raise ValueError(f"total_sms must be >= 1, got {self.total_sms}")
        object.__setattr__(self, "splits", tuple(int(s) for s in self.splits))
        if self.prefill.kind != "compute" or self.decode.kind != "bandwidth":
            raise ValueError("prefill must be a compute model and decode a bandwidth model")

    @property
    def key(self) -> str:
        return profile_key(self.device, self.model, self.splits)

    # -- predictions (milliseconds) ------------------------------------------------

    def prefill_ms(self, tokens: int, cached: int = 0, sms: int | None = None, concurrent: bool = False) -> float:
        """One prefill iteration of one chunk of `tokens` after `cached` tokens in KV."""
        return self.prefill.predict(tokens, attn_units(tokens, cached), self._sms(sms), self.total_sms, concurrent)

    def prefill_batch_ms(self, seqs: Iterable[tuple[int, int]], sms: int | None = None, concurrent: bool = False) -> float:
        """One prefill iteration over chunks given as (tokens, cached) pairs."""
        seqs = list(seqs)
        tokens = sum(n for n, _ in seqs)
        attn = sum(attn_units(n, c) for n, c in seqs)
        return self.prefill.predict(tokens, attn, self._sms(sms), self.total_sms, concurrent)

    def observed_prefill_speed(self, iteration_ms: float, iteration_tokens: float, prompt_tokens: float,
                               sms: int | None = None, concurrent: bool = False, chunk_tokens: int = 4096,
                               max_ratio: float = 4.0) -> float:
        """Observed / modelled time of an engine's mean prefill iteration of `iteration_tokens` tokens (prompts of
        about `prompt_tokens`) on `sms`, within [1 / `max_ratio`, `max_ratio`]: above 1, the engine prefills
        slower than this model says. 1.0 when nothing was observed, or when its iterations average under a
        quarter of `chunk_tokens` (mostly fixed costs, which say little about a full queue's pace)."""
        if iteration_ms <= 0 or iteration_tokens < chunk_tokens / 4:
            return 1.0
        requests = max(1, round(iteration_tokens / max(1.0, prompt_tokens)))
        predicted = self.prefill_queue_ms(round(iteration_tokens), requests, sms, concurrent, chunk_tokens)
        return min(max_ratio, max(1.0 / max_ratio, iteration_ms / predicted)) if predicted > 0 else 1.0

    def prefill_queue_ms(
        self,
        tokens: int,
        num_requests: int = 1,
        sms: int | None = None,
        concurrent: bool = False,
        chunk_tokens: int = 4096,
    ) -> float:
        """Time to prefill a queue of `tokens` prompt tokens over `num_requests` requests.

        The queue runs in iterations of at most `chunk_tokens`; the attention term
        assumes equal prompts with no cached prefix (all the queue's counters tell).
        """
        if tokens <= 0:
            return 0.0
        n = max(1, num_requests)
        per = tokens / n
        iterations = math.ceil(tokens / max(1, chunk_tokens))
        a, b, c = self.prefill.coef
        base = a * tokens + b * n * attn_units(per, 0) + c * iterations
        p_sms = self._sms(sms)
        t = base * self.prefill.slowdown(p_sms, self.total_sms)
        return t * (1.0 + self.prefill.contention_at(p_sms, self.total_sms)) if concurrent else t

    def decode_step_ms(self, batch: int, context_tokens: int, sms: int | None = None, concurrent: bool = False) -> float:
        """One decode step of `batch` sequences holding `context_tokens` tokens in all.

        `sms` are the decode partition's SMs (default: the rest of an even split).
        """
        dsms = self.total_sms - self.total_sms // 2 if sms is None else sms
        return self.decode.predict(batch, context_tokens, max(1, dsms), self.total_sms, concurrent)

    def _sms(self, sms: int | None) -> float:
        return float(self.total_sms // 2 if sms is None else max(1, sms))

    # -- serialization ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["splits"] = list(self.splits)
        for p in PHASES:
            d[p]["coef"] = list(d[p]["coef"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyModel:
        def phase(p: dict[str, Any]) -> PhaseModel:
            return PhaseModel(p["kind"], tuple(float(c) for c in p["coef"]), float(p["scale"]),  # type: ignore[arg-type]
                              float(p.get("contention", 0.0)), float(p.get("fit_error", 0.0)),
                              float(p.get("contention_slope", 0.0)))

        return cls(
            device=d["device"], model=d["model"], total_sms=int(d["total_sms"]), splits=tuple(d["splits"]),
            prefill=phase(d["prefill"]), decode=phase(d["decode"]), num_samples=int(d.get("num_samples", 0)),
            meta=dict(d.get("meta", {})),
        )


def profile_key(device: str, model: str, splits: Sequence[int]) -> str:
    """The JSON key of a profile: device name | model description | split set."""
    return f"{device}|{model}|{','.join(str(int(s)) for s in splits)}"


def model_signature(arch: Any, dtype: str) -> str:
    """Architecture and the dimensions that set the speed, e.g. `LlamaForCausalLM:h4096:...:bfloat16`."""
    return (f"{arch.architecture}:h{arch.hidden_size}:i{arch.intermediate_size}:l{arch.num_layers}"
            f":q{arch.num_heads}:kv{arch.num_kv_heads}:d{arch.head_dim}:v{arch.vocab_size}:{dtype}")


# -- fitting ---------------------------------------------------------------------------


def fit(
    samples: Sequence[Sample],
    device: str,
    model: str,
    total_sms: int,
    splits: Sequence[int],
    meta: dict[str, Any] | None = None,
) -> LatencyModel:
    """Least-squares fit of both phases (relative error), contention from concurrent samples."""
    return LatencyModel(
        device=device, model=model, total_sms=total_sms, splits=tuple(splits),
        prefill=fit_phase([s for s in samples if s.phase == "prefill"], "compute", total_sms),
        decode=fit_phase([s for s in samples if s.phase == "decode"], "bandwidth", total_sms),
        num_samples=len(samples), meta=dict(meta or {}),
    )


def fit_phase(samples: Sequence[Sample], kind: Literal["compute", "bandwidth"], total_sms: int) -> PhaseModel:
    """Fit one phase: a grid plus golden-section search over the SM-scaling parameter,
    with non-negative linear least squares for the coefficients at each candidate.
    """
    solo = [s for s in samples if not s.concurrent]
    if len(solo) < 3:
        raise ValueError(f"need at least 3 solo samples to fit a {kind} model, got {len(solo)}")
    X = np.array([[s.x[0], s.x[1], 1.0] for s in solo])
    y = np.array([s.ms for s in solo])
    sms = np.array([float(s.sms) for s in solo])

    coef, theta, err = _fit_solo(X, y, sms, kind, total_sms)
    keep = _inliers(X, y, sms, coef, theta, kind, total_sms)
    if keep is not None:
        coef, theta, err = _fit_solo(X[keep], y[keep], sms[keep], kind, total_sms)
    base = PhaseModel(kind, tuple(float(c) for c in coef), theta, 0.0, err)  # type: ignore[arg-type]
    contention, slope = _fit_contention(base, samples, total_sms)
    return PhaseModel(kind, base.coef, theta, contention, err, slope)


def _fit_solo(X: np.ndarray, y: np.ndarray, sms: np.ndarray, kind: str,
              total_sms: int) -> tuple[np.ndarray, float, float]:
    """(coefficients, scaling parameter, RMS relative error) of one least-squares fit."""

    def loss(theta: float) -> tuple[float, np.ndarray]:
        g = _slowdown(kind, theta, sms, total_sms)
        coef = _nnls_relative(X * g[:, None], y)
        pred = (X @ coef) * g
        return float(np.mean(((pred - y) / y) ** 2)), coef

    if np.ptp(sms) == 0:  # one SM count: the scaling is not observable, call it flat
        err, coef = loss(0.0)
        return coef, 0.0, math.sqrt(err)
    grid = _R_GRID if kind == "compute" else np.concatenate([[0.0], np.geomspace(0.25, 4.0 * total_sms, 100)])
    losses = [loss(float(t))[0] for t in grid]
    i = int(np.argmin(losses))
    lo, hi = float(grid[max(0, i - 1)]), float(grid[min(len(grid) - 1, i + 1)])
    if kind == "bandwidth" and i == 0:
        lo, hi = 0.0, float(grid[1])
    theta = _golden_min(lambda t: loss(t)[0], lo, hi) if hi > lo else float(grid[i])
    if loss(theta)[0] > losses[i]:
        theta = float(grid[i])
    err, coef = loss(theta)
    return coef, theta, math.sqrt(err)


def _inliers(X: np.ndarray, y: np.ndarray, sms: np.ndarray, coef: np.ndarray, theta: float, kind: str,
             total_sms: int) -> np.ndarray | None:
    """Samples to refit on without gross outliers (off the fit by over 2x and over 4 median
    deviations, as a stalled timing is); None when there is nothing, or too much, to drop."""
    pred = (X @ coef) * _slowdown(kind, theta, sms, total_sms)
    dev = np.abs(np.log(y / np.clip(pred, 1e-12, None)))
    mad = float(np.median(dev))
    keep = dev <= max(math.log(2.0), 4.0 * mad)
    if keep.all() or keep.sum() < max(3, 0.75 * len(y)):
        return None
    return keep


def _fit_contention(base: PhaseModel, samples: Sequence[Sample], total_sms: int) -> tuple[float, float]:
    """(contention, contention_slope): the concurrent samples' ratio to the solo prediction, minus one, as a
    line in the other phase's share of the SMs minus 1/2 (Theil-Sen: the median of the pairwise slopes across
    splits, then the median intercept), or flat (the median, slope 0) when they come from one split."""
    conc = [s for s in samples if s.concurrent]
    if not conc:
        return 0.0, 0.0
    pred = np.array([base.predict(s.x[0], s.x[1], s.sms, total_sms) for s in conc])
    excess = np.array([s.ms for s in conc]) / np.clip(pred, 1e-12, None) - 1.0
    other = np.array([other_share_past_even(s.sms, total_sms) for s in conc])
    i, j = np.triu_indices(len(conc), k=1)
    apart = np.abs(other[j] - other[i]) > 1e-9
    if not apart.any():
        return max(0.0, float(np.median(excess))), 0.0
    slope = float(np.median((excess[j] - excess[i])[apart] / (other[j] - other[i])[apart]))
    return max(0.0, float(np.median(excess - slope * other))), slope


def _nnls_relative(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||(A c - y) / y|| over c >= 0, by trying every support set (3 columns: 7 sets)."""
    W = A / y[:, None]
    ones = np.ones_like(y)
    norms = np.linalg.norm(W, axis=0)
    norms[norms == 0] = 1.0
    Wn = W / norms
    best, best_loss = np.zeros(A.shape[1]), float(np.sum(ones**2))
    n = A.shape[1]
    for mask in range(1, 1 << n):
        cols = [j for j in range(n) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(Wn[:, cols], ones, rcond=None)
        if np.any(sol < 0):
            continue
        c = np.zeros(n)
        c[cols] = sol
        res = float(np.sum((Wn @ c - ones) ** 2))
        if res < best_loss - 1e-15:
            best, best_loss = c, res
    return best / norms


def _golden_min(f: Callable[[float], float], lo: float, hi: float, iters: int = 40) -> float:
    phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = f(d)
    return (a + b) / 2


# -- files -----------------------------------------------------------------------------


def load_models(path: str | Path) -> dict[str, LatencyModel]:
    """Every profile in a JSON file, by key ({} if the file does not exist)."""
    p = Path(path)
    if not p.is_file():
        return {}
    doc = json.loads(p.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{p}: not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise ValueError(f"{p}: version {doc.get('version')} (this code reads {VERSION})")
    return {k: LatencyModel.from_dict(v) for k, v in doc.get("profiles", {}).items()}


def save_models(path: str | Path, models: Iterable[LatencyModel]) -> None:
    """Add (or replace) profiles in a JSON file, keeping the others; written atomically."""
    p = Path(path)
    existing = load_models(p)
    for m in models:
        existing[m.key] = m
    doc = {"format": FORMAT, "version": VERSION, "profiles": {k: m.to_dict() for k, m in sorted(existing.items())}}
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, p)


def load_model(path: str | Path, key: str) -> LatencyModel | None:
    return load_models(path).get(key)


def load_or_profile(path: str | Path | None, key: str, profile: Callable[[], LatencyModel]) -> LatencyModel:
    """The saved profile under `key` in `path`, or a fresh one from `profile()` (saved there)."""
    if path is not None:
        found = load_model(path, key)
        if found is not None:
            return found
    model = profile()
    if model.key != key:
        raise ValueError(f"profile produced key {model.key!r}, expected {key!r}")
    if path is not None:
        save_models(path, [model])
    return model

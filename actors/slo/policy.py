"""Split policies: `ModelPolicy` (latency model + observed correction + hysteresis + dwell)
and the paper's `ReactivePolicy`, built by name with `make_policy`.

`ModelPolicy.decide(view, targets)`, once per engine per controller tick:
1. Predict, for every split of the engine, the TTFT of a request arriving within the next `dwell_s` (queued
   prompts, the backlog of arrivals beyond the split's prefill capacity, M/D/1 wait) and the TPOT of the
   decode batch once it settles on that split (Little's law): `actors.slo.prediction`.
2. Correct the predictions by what the engine shows: prefill times by its observed prefill speed
   (`prefill_speed_factor`); TTFT and TPOT by (observed / predicted) ** `observed_weight`, clamped; a split's
   TPOT by the ratio last observed on that split under the same arrivals (`tpot_factors`); the current split's
   TPOT, and that of every split with fewer decode SMs, no lower than the TPOT so far of the requests decoding
   now (`live_tpot_ms`); that of a split with more, higher by what of it the engine's decode stalls explain
   (`live_stall_ms`).
3. Score each split by its normalized min slack, min(1 - TTFT / target, 1 - TPOT / target).
4. Hold the current split unless a target is at risk (`at_risk`: observed past target, or predicted slack
   under `comfort_slack`); then look only on the side that relieves it (`_best`: toward decode the nearest
   comfortable split, toward prefill the most slack, within TPOT's target first; for an engine that refuses
   late prompts, `EngineView.refuses_late`, only within it). Such an engine missing TPOT is moved toward
   decode, whatever the slack, to the nearest split within TPOT's target that would refuse a share of the
   arrivals smaller, by `margin`, than the share of requests missing TPOT (`_refusing_tpot_relief`).
5. Move only if the gain beats `margin` (but for that move), if the relieved target is observed past (or, for
   TTFT, the load is new) unless the current split is predicted past a target by a quarter (`urgent_slack`),
   one split step at a time without such evidence (`_max_steps`; toward decode never more than
   `max_decode_steps`), and once `dwell_s` has passed since the last change.
   Urgent moves wait only `urgent_dwell_s`: a target predicted and observed past by a quarter, to a split
   predicted within a quarter of both targets, or, short of that, better by a quarter (`urgent_gain`); a move
   on toward prefill after one that fell short; a TPOT observed past its target (to the nearest split that
   keeps it, `nearest_tpot_relief`). For `dwell_s` after an urgent move, no move urgent only by its gain goes
   back to the split it left or beyond, and after one for TPOT no urgent move at all does (`UrgentMove`).
So an engine switches at most 60 / urgent_dwell_s + 1 times a minute. While no split is predicted within a
quarter of both targets, every switch within `dwell_s` of the one before is urgent only by its gain, so of two
successive switches back and forth between two splits one waited `dwell_s`: at most 120 / (dwell_s +
urgent_dwell_s) + 2 such switches a minute (12 with the defaults). Why each rule is there, with the runs and
simulations that asked for it: `docs/split-policy.md`.

A policy instance may serve many engines (the controller calls it per GPU); its
state is kept per `engine_id`. Time comes from `view.time` (seconds on any clock the
caller keeps consistent; when 0, the policy reads `time.monotonic()`). A change of split the
policy proposed counts from its proposal, any other from when it is first seen; a proposal the
caller does not apply is simply made again next time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from actors.slo.latency_model import LatencyModel
from actors.slo.prediction import (
    model_sms, paced_tpot_ms, predict_raw, prefill_load, prefill_speed_factor, typical_prompt_tokens,
)
from actors.slo.types import (
    EngineView, FixedPolicy, ReactivePolicy, SLOTargets, SplitDecision, SplitPolicy, nearest_split, percentile,
)

POLICIES: tuple[str, ...] = ("reactive", "model", "fixed")


@dataclass(frozen=True)
class ModelPolicyConfig:
    """Knobs of `ModelPolicy`.

    margin: gain in normalized min slack a new split must bring (hysteresis band).
    comfort_slack: a split predicted to keep at least this min slack, and observed to meet both targets
        (given `min_observed` samples), is kept, however much better another looks: the policy moves
        only when the current split is at risk (`at_risk`), toward the side that relieves the target
        at risk, so it does not chase the optimum of a moment (an empty queue would hand decode
        nearly every SM just before the next burst arrives). 1 or more: always chase the best.
    dwell_s: minimum seconds between two switches of one engine, and so the horizon over which
        arrivals beyond a split's prefill capacity are predicted to build a backlog.
    observed_weight: 0 ignores observed latencies, 1 trusts their ratio to the model fully.
    min_observed: samples needed before observed latencies count (warm-up filter).
    max_correction: the observed/predicted ratio is clamped to [1/x, x].
    chunk_tokens: prefill tokens per iteration (the engine's max_prefill_tokens).
    typical_prompt_tokens: prompt length assumed for a new arrival and for a queue whose request count
        is unknown, when the view does not report the mean prompt length of recent arrivals.
    typical_context_tokens: context per sequence assumed when nothing decodes.
    max_step: at most this many split steps per decision (0: jump to the best).
    max_decode_steps: at most this many split steps toward decode per decision, evidence or not (0: as
        `max_step`): a prompt queue builds at once and drains slowly, a decode step is faster on the next iteration.
        On the H100 (run 33) the warm-up's last seconds moved 88 -> 56 urgently on a TPOT past target at 88, and
        the first window's prompts queued on 56 for 3 s. 3 (24 SMs on Hopper) in simulation: H200 profile 83.71%
        -> 83.76%, H100 51.98% (1: 82.83% and 51.39%; 2: 83.76% and 51.93%); with 0.7 stalls a second of 200 ms,
        67.61% -> 68.06% and 30.69% -> 31.60%.
    urgent_slack: a current split predicted under this slack (-0.25: a target missed by a quarter), and observed
        past that target, may switch after `urgent_dwell_s` instead of `dwell_s`, to a split predicted at
        this slack or above, or `urgent_gain` above the current one.
    urgent_gain: the gain in normalized slack that makes a move from a split past `urgent_slack` urgent when the
        new split is itself predicted past `urgent_slack` (math.inf: never; at or under `margin`: every such
        move): a queue built up so far that no split meets the target soon drains the sooner on the best split,
        not after a dwell. The default, 0.25, takes a quarter of its target off the binding latency: as much as
        the miss that makes a split urgent at `urgent_slack`'s default (H100, 2026-12-05, run 28: a burst of
        documents on 64 prefill SMs, TTFT predicted at 8.0 s there and 80 better by 2.4 of the target but past it
        itself, waited out a 10 s dwell while the queue grew to 56,000 prompt tokens).
    urgent_dwell_s: the dwell of an urgent switch (at most `dwell_s`).
    load_change_ratio: arrivals whose prompt-token rate is this many times, or whose mean prompt length this
        many times (or this fraction of), what they were when the current split was chosen, or last held as
        comfortable or best, count as a new load (`new_prompt_load`; for the TPOT memory below, a rate this
        fraction of it too): a TTFT predicted past target under it is evidence enough for an urgent switch,
        before any is observed (on the H200, chat giving way to 5,900-token documents waited out a 10 s
        dwell, 2026-12-03). Prompts queue at once; not so TPOT, whose batch builds over seconds from
        lengths a load change mixes (in simulation, a 2-request batch of documents' 6,000-token contexts
        at the chat's request rate predicted 54 ms), so TPOT still needs an observation.
    tpot_memory_s: how long the TPOT ratio (observed / predicted) seen on a split corrects that split's
        predictions after the engine left it, while the arrivals stay what they were then (`load_changed`)
        (0: never; every split takes the current split's ratio).
    """

    margin: float = 0.1
    comfort_slack: float = 0.3
    dwell_s: float = 10.0
    observed_weight: float = 0.5
    min_observed: int = 8
    max_correction: float = 4.0
    chunk_tokens: int = 4096
    typical_prompt_tokens: int = 512
    typical_context_tokens: int = 1024
    max_step: int = 0
    max_decode_steps: int = 3
    urgent_slack: float = -0.25
    urgent_dwell_s: float = 2.0
    urgent_gain: float = 0.25
    load_change_ratio: float = 2.0
    tpot_memory_s: float = 300.0

    def __post_init__(self) -> None:
        if self.margin < 0 or self.dwell_s < 0:
            raise ValueError("margin and dwell_s must be >= 0")
        if not 0.0 < self.comfort_slack:
            raise ValueError(f"comfort_slack must be > 0, got {self.comfort_slack}")
        if not 0.0 <= self.observed_weight <= 1.0:
            raise ValueError(f"observed_weight must be in [0, 1], got {self.observed_weight}")
        if self.max_correction < 1.0:
            raise ValueError(f"max_correction must be >= 1, got {self.max_correction}")
        if min(self.chunk_tokens, self.typical_prompt_tokens, self.typical_context_tokens) < 1:
            raise ValueError("chunk_tokens and the typical lengths must be >= 1")
        if self.min_observed < 1 or self.max_step < 0 or self.max_decode_steps < 0:
            raise ValueError("min_observed must be >= 1, max_step and max_decode_steps >= 0")
        if self.tpot_memory_s < 0:
            raise ValueError(f"tpot_memory_s must be >= 0, got {self.tpot_memory_s}")
        if not self.load_change_ratio > 1.0:
            raise ValueError(f"load_change_ratio must be > 1, got {self.load_change_ratio}")
        if self.urgent_slack >= 0 or self.urgent_dwell_s < 0:
            raise ValueError(f"urgent_slack must be < 0 and urgent_dwell_s >= 0, got "
                             f"{self.urgent_slack} and {self.urgent_dwell_s}")
        if not self.urgent_gain > 0:
            raise ValueError(f"urgent_gain must be > 0, got {self.urgent_gain}")


@dataclass(frozen=True)
class SplitPrediction:
    """Predicted latencies of one split (corrections applied), its normalized slack, and the factor its TPOT
    took from observations (`tpot_factors`)."""

    prefill_sms: int
    ttft_ms: float
    tpot_ms: float
    slack: float
    tpot_correction: float = 1.0


@dataclass
class _EngineState:
    """What the policy remembers of one engine: the split it last saw, when that split
    last changed, and the switch it last proposed (which the caller may not apply)."""

    seen_sms: int | None = None
    last_change: float | None = None
    last_side: int = 0  # +1: the last change gave prefill SMs, -1: decode, 0: none yet
    proposed: tuple[int, float, Load] | None = None  # (prefill SMs, time, the arrivals it was chosen for)
    change_times: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    tpot_ratios: dict[int, TpotRatio] = field(default_factory=dict)  # split -> its last observed TPOT ratio
    load: Load | None = None  # the arrivals when the current split was last chosen or held as fine
    urgent_moves: list[UrgentMove] = field(default_factory=list)  # those of the last dwell_s (`barred`)

    def observe(self, sms: int, now: float, load: Load) -> None:
        """Note the engine's current split and arrivals; a change counts from when it was proposed
        (if this policy proposed it) or from now (the caller switched on its own)."""
        if self.seen_sms is not None and sms != self.seen_sms:
            mine = self.proposed is not None and self.proposed[0] == sms
            when, self.load = (self.proposed[1], self.proposed[2]) if mine else (now, load)  # type: ignore[index]
            self.last_change = when
            self.last_side = 1 if sms > self.seen_sms else -1
            self.change_times.append(when)
            self.proposed = None
        self.seen_sms = sms


class Load(NamedTuple):
    """The arrivals a split was chosen for: prompt tokens per second and the mean prompt length."""

    tokens_per_s: float
    prompt_tokens: float

    @classmethod
    def of(cls, view: EngineView, cfg: ModelPolicyConfig) -> Load:
        return cls(view.arrival_tokens_per_s, float(typical_prompt_tokens(view, cfg)))


class UrgentMove(NamedTuple):
    """An urgent switch: the split it left, its side (+1: toward prefill, -1: toward decode), when it was proposed,
    and whether it was made for a TPOT missed by less than `urgent_slack` (`nearest_tpot_relief`)."""

    left: int
    side: int
    time: float
    for_tpot: bool

    def reversed_by(self, current: int, target: int) -> bool:
        """Whether moving from `current` to `target` goes back to the split this move left, or beyond it."""
        return (current - self.left) * self.side > 0 and (target - self.left) * self.side <= 0


class TpotRatio(NamedTuple):
    """Observed / modelled TPOT on one split, when, and under which arrivals."""

    ratio: float
    time: float
    load: Load


def _moved(a: float, b: float, ratio: float) -> bool:
    """Whether `b` is `ratio` times `a` or more, or that fraction of it or less (one of them 0 and not the other
    counts)."""
    if a <= 0 or b <= 0:
        return (a > 0) != (b > 0)
    return max(a / b, b / a) >= ratio


def load_changed(before: Load, now: Load, ratio: float) -> bool:
    """Whether the prompt-token rate or the mean prompt length moved by a factor of `ratio` or more (arrivals
    starting or stopping count as a change)."""
    return (_moved(before.tokens_per_s, now.tokens_per_s, ratio)
            or _moved(before.prompt_tokens, now.prompt_tokens, ratio))


def new_prompt_load(before: Load, now: Load, ratio: float) -> bool:
    """Whether prompts arrive `ratio` times as fast as before or more (arrivals starting count), or with a mean
    length `ratio` times (or that fraction of) what it was: a load whose prompts the split has not been seen to
    serve. Fewer prompts of the same kind are not one: on the H100 (run 31) the arrival rate read 2 s after a
    documents window's last request, a third of the window's, counted as a new load, and the policy moved
    72 -> 88 on the idle engine; the next window began there and its requests missed TPOT for 9 s. Shorter
    prompts are: chat at 50 req/s after documents moved toward prefill 2 s before its TTFT was observed past
    target (in simulation, H200 profile, prefill 15% slower than the profile, seed 3: 58.2% within both targets,
    against 43.9% when waiting for the observation)."""
    rate_up = now.tokens_per_s > 0 and (before.tokens_per_s <= 0 or now.tokens_per_s / before.tokens_per_s >= ratio)
    return rate_up or _moved(before.prompt_tokens, now.prompt_tokens, ratio)


def min_slack(ttft_ms: float, tpot_ms: float, targets: SLOTargets) -> float:
    """min(1 - TTFT / target, 1 - TPOT / target): 1 is idle, 0 on target, < 0 missing."""
    return min(1.0 - ttft_ms / targets.ttft_ms, 1.0 - tpot_ms / targets.tpot_ms)


def observed_correction(observed: tuple[float, ...], predicted: float, q: float, cfg: ModelPolicyConfig) -> float:
    """(P_q of observed / predicted) ** weight, clamped; 1.0 with too few samples."""
    if len(observed) < cfg.min_observed or predicted <= 0:
        return 1.0
    return correction_factor(percentile(observed, q) / predicted, cfg)


def tpot_factors(splits: tuple[int, ...], current: int, current_factor: float, remembered: Mapping[int, float]
                 ) -> dict[int, float]:
    """Each split's TPOT correction: the current split's and the remembered ones for themselves; any other
    split takes the largest of those on splits with no more prefill SMs than it (the model's decode error is
    taken to grow as the decode partition shrinks), or the current split's if there are none."""
    known = {**remembered, current: current_factor}
    factors = {}
    for s in splits:
        wider = [f for k, f in known.items() if k <= s]
        factors[s] = known.get(s, max(wider, default=current_factor))
    return factors


def correction_factor(ratio: float, cfg: ModelPolicyConfig) -> float:
    """An observed / predicted ratio as a factor on predictions: clamped to `max_correction`, ** `observed_weight`."""
    return clamped_ratio(ratio, cfg) ** cfg.observed_weight


def clamped_ratio(ratio: float, cfg: ModelPolicyConfig) -> float:
    """`ratio` within [1 / `max_correction`, `max_correction`]."""
    return min(cfg.max_correction, max(1.0 / cfg.max_correction, ratio))


class ModelPolicy:
    """Model-based split choice; see the module docstring. Implements `SplitPolicy`.

    `model` is one `LatencyModel`, or a mapping engine_id -> model (with an optional
    "*" entry as the default) when engines run on different devices.
    """

    def __init__(self, model: LatencyModel | Mapping[str, LatencyModel], config: ModelPolicyConfig | None = None) -> None:
        self.models: Mapping[str, LatencyModel] = {"*": model} if isinstance(model, LatencyModel) else dict(model)
        self.config = config or ModelPolicyConfig()
        self._states: dict[str, _EngineState] = {}

    def model_for(self, engine_id: str) -> LatencyModel:
        m = self.models.get(engine_id) or self.models.get("*")
        if m is None:
            raise KeyError(f"no latency model for engine {engine_id!r}")
        return m

    def predict(self, view: EngineView, targets: SLOTargets) -> tuple[list[SplitPrediction], dict[str, float]]:
        """Corrected predictions for every split of `view`, and the correction details."""
        cfg, model = self.config, self.model_for(view.engine_id)
        current = nearest_split(view.splits, view.prefill_sms)
        speed = prefill_speed_factor(model, view, cfg)
        raw = {s: predict_raw(model, view, s, cfg, speed) for s in view.splits}
        q = 100.0 * targets.attainment
        expected_tpot = max(raw[current][1], paced_tpot_ms(view))
        c_ttft = observed_correction(view.ttft_ms, raw[current][0], q, cfg)
        c_tpot = observed_correction(view.tpot_ms, expected_tpot, q, cfg)
        f_tpot = tpot_factors(view.splits, current, c_tpot, self._remembered_tpot(view, current))
        live = live_tpot_ms(view, targets, cfg)
        stalled = live_stall_ms(view, targets, live)

        def tpot_at(split: int, modelled: float) -> float:
            """No split with as few decode SMs as the current one decodes faster than its requests do now, and
            one with more still has the stalls they see."""
            corrected = modelled * f_tpot[split]
            return max(corrected, live) if split >= current else corrected + stalled

        preds = [SplitPrediction(s, t * c_ttft, tpot_at(s, p), min_slack(t * c_ttft, tpot_at(s, p), targets), f_tpot[s])
                 for s, (t, p) in raw.items()]
        info = {"ttft_correction": c_ttft, "tpot_correction": c_tpot, "prefill_speed_correction": speed,
                "arrival_tokens_per_s": view.arrival_tokens_per_s,
                "typical_prompt_tokens": float(typical_prompt_tokens(view, cfg)), "model_tpot_ms": expected_tpot}
        if view.ttft_ms:
            info["observed_ttft_ms"] = percentile(view.ttft_ms, q)
        if view.tpot_ms:
            info["observed_tpot_ms"] = percentile(view.tpot_ms, q)
        if live:
            info["live_tpot_ms"] = live
        if stalled:
            info["live_stall_ms"] = stalled
        return preds, info

    def _remembered_tpot(self, view: EngineView, current: int) -> dict[int, float]:
        """The TPOT corrections of the splits other than `current` seen within `tpot_memory_s` under the arrivals
        of now (split -> factor, as `observed_correction` makes it)."""
        state, cfg = self._states.get(view.engine_id), self.config
        if state is None or cfg.tpot_memory_s <= 0:
            return {}
        now, load = _now(view), Load.of(view, cfg)
        return {s: correction_factor(r.ratio, cfg) for s, r in state.tpot_ratios.items()
                if s != current and now - r.time <= cfg.tpot_memory_s
                and not load_changed(r.load, load, cfg.load_change_ratio)}

    def _remember_tpot(self, state: _EngineState, view: EngineView, current: int, info: Mapping[str, float],
                       now: float, load: Load) -> None:
        """Note the current split's observed / modelled TPOT under `load`, given `min_observed` samples in the view."""
        if len(view.tpot_ms) >= self.config.min_observed and info["model_tpot_ms"] > 0:
            state.tpot_ratios[current] = TpotRatio(info["observed_tpot_ms"] / info["model_tpot_ms"], now, load)

    def decide(self, view: EngineView, targets: SLOTargets) -> SplitDecision:
        if not view.splits:
            raise ValueError(f"engine {view.engine_id!r} reports no splits")
        cfg = self.config
        now = _now(view)
        state = self._states.setdefault(view.engine_id, _EngineState())
        current = nearest_split(view.splits, view.prefill_sms)
        load = Load.of(view, cfg)
        state.observe(current, now, load)
        preds, info = self.predict(view, targets)
        self._remember_tpot(state, view, current, info, now, load)
        by_sms = {p.prefill_sms: p for p in preds}
        cur = by_sms[current]
        needs = at_risk(cur, view, targets, cfg)
        side = 1 if needs == {"ttft"} else -1 if needs == {"tpot"} else 0
        new_load = ("ttft" in needs and state.load is not None
                    and new_prompt_load(state.load, load, cfg.load_change_ratio))
        evident = (observed_past(view, targets, cfg) & needs) | ({"ttft"} if new_load else set())
        best = self._best(view.splits, current, preds, targets, side, self._max_steps(cur, evident, targets),
                          view.refuses_late)
        tpot_missed = ("tpot" in evident and targets.tpot_ms < cur.tpot_ms and cur.slack >= cfg.urgent_slack
                       and best.prefill_sms < current)  # a small miss: relieved by the nearest split that does
        if tpot_missed:
            best = nearest_tpot_relief(preds, current, targets, cur.slack + cfg.margin) or best
        refusing_relief = None
        if view.refuses_late and "tpot" in evident and targets.tpot_ms < min(cur.tpot_ms, best.tpot_ms):
            refusing_relief = self._refusing_tpot_relief(view, preds, current, targets, info)
            best = refusing_relief or best
        gain = best.slack - cur.slack
        recent = sum(1 for t in state.change_times if now - t < 60.0)
        predicted = {
            **info,
            "ttft_ms": cur.ttft_ms, "tpot_ms": cur.tpot_ms, "slack": cur.slack,
            "best_sms": float(best.prefill_sms), "best_ttft_ms": best.ttft_ms, "best_tpot_ms": best.tpot_ms,
            "best_slack": best.slack, "gain": gain, "switches_last_minute": float(recent),
        }
        at = f"{_describe(cur, targets)} at {current}"
        if best.prefill_sms == current or not needs:
            state.load = load
            if best.prefill_sms == current:
                return SplitDecision(current, f"hold: best split; {at}{_neighbour(preds, current, side, targets)}",
                                     predicted)
            return SplitDecision(current, f"hold: comfortable (slack {cur.slack:+.2f} >= {cfg.comfort_slack:.2f}); "
                                          f"{at}", predicted)
        instead = f"{_describe(best, targets)} at {best.prefill_sms}{_evidence(view, info, targets)}"
        if gain <= cfg.margin and refusing_relief is None:
            return SplitDecision(current, f"hold: within hysteresis band (gain {gain:+.2f} <= {cfg.margin:.2f} "
                                          f"for {best.prefill_sms}); {at}; {instead}", predicted)
        relieved = "ttft" if best.prefill_sms > current else "tpot"
        if relieved not in evident and cfg.comfort_slack < 1.0:
            if cur.slack >= cfg.urgent_slack:
                unseen = "not observed nor a new load" if relieved == "ttft" else "not observed"
                return SplitDecision(current, f"hold: a {relieved.upper()} risk predicted only, {unseen} "
                                              f"(slack {cur.slack:+.2f} >= {cfg.urgent_slack:.2f}); {at}; {instead}",
                                     predicted)
            if relieved == "ttft" and view.waiting_prefill_tokens == 0:
                return SplitDecision(current, f"hold: a TTFT risk predicted only, with no prompt queued, not observed "
                                              f"nor a new load; {at}; {instead}", predicted)
        state.urgent_moves = [m for m in state.urgent_moves if now - m.time < cfg.dwell_s]
        gain_only = best.slack < cfg.urgent_slack
        urgent = ((cur.slack < cfg.urgent_slack or tpot_missed) and (not gain_only or gain >= cfg.urgent_gain)
                  and bool(evident) and not barred(state.urgent_moves, current, best.prefill_sms, gain_only))
        onward = best.prefill_sms > current and state.last_side > 0 and cur.slack < 0 <= best.slack
        dwell = min(cfg.urgent_dwell_s, cfg.dwell_s) if urgent or onward else cfg.dwell_s
        last = state.last_change
        if last is not None and now - last < dwell:
            wait = dwell - (now - last)
            return SplitDecision(current, f"hold: dwell ({wait:.1f} s left) before {best.prefill_sms}; {at}", predicted)
        state.proposed = (best.prefill_sms, now, load)
        if urgent:
            state.urgent_moves.append(UrgentMove(current, 1 if best.prefill_sms > current else -1, now, tpot_missed))
        predicted.update(ttft_ms=best.ttft_ms, tpot_ms=best.tpot_ms, slack=best.slack)
        side = "prefill" if best.prefill_sms > current else "decode"
        for_what = (f"TPOT missed by {info['tpot_miss_share']:.0%} of requests, {info['relief_refused_share']:.0%} "
                    f"of arrivals refused there" if refusing_relief is not None
                    else f"gain {gain:+.2f} > {cfg.margin:.2f}")
        why = (f"{'urgent ' if urgent else ''}switch {current}->{best.prefill_sms} (more SMs to {side}): {at}; "
               f"{_describe(best, targets)} at {best.prefill_sms} ({for_what}); "
               f"arrivals {load.tokens_per_s:.0f} prompt tokens/s in {load.prompt_tokens:.0f}-token prompts")
        if new_load and state.load is not None:
            why += f" (at the last switch: {state.load.tokens_per_s:.0f} in {state.load.prompt_tokens:.0f}-token)"
        why += _evidence(view, info, targets)
        why += (f"; corrections: TTFT x{info['ttft_correction']:.2f}, TPOT x{cur.tpot_correction:.2f} "
                f"(at {best.prefill_sms}: x{best.tpot_correction:.2f}), "
                f"prefill time x{info['prefill_speed_correction']:.2f}")
        return SplitDecision(best.prefill_sms, why, predicted, urgent=urgent)

    def _refusing_tpot_relief(self, view: EngineView, preds: list[SplitPrediction], current: int,
                              targets: SLOTargets, info: dict[str, float]) -> SplitPrediction | None:
        """For an engine that refuses late prompts and misses TPOT on `current`: the split with the most prefill
        SMs below it (at most `max_decode_steps` away) predicted within TPOT's target whose prefill would turn
        away a share of the arrivals (`refused_share`) smaller by more than `margin` than the share of recent
        requests that missed TPOT; None if none. Slack cannot weigh the two: a TTFT predicted past its target
        there costs the refused share, a TPOT past its target costs every request decoding (H100 profile, chat at
        45 req/s, TPOT <= 12 ms: 64 prefill SMs, TPOT predicted 12.0-12.6 ms, kept 42% in simulation; 56, TTFT
        predicted 1.3-2.1 s, kept 90%). Notes the two shares in `info`."""
        model, cfg = self.model_for(view.engine_id), self.config
        missed = sum(1 for t in view.tpot_ms if t > targets.tpot_ms) / max(1, len(view.tpot_ms))
        speed = info["prefill_speed_correction"]
        i = view.splits.index(current)
        for p in reversed(preds[max(0, i - (cfg.max_decode_steps or i)):i]):  # preds follow view.splits, ascending
            if p.tpot_ms > targets.tpot_ms:
                continue
            refused = refused_share(model, view, p.prefill_sms, cfg, speed)
            if refused + cfg.margin < missed:
                info.update(tpot_miss_share=missed, relief_refused_share=refused)
                return p
        return None

    def _max_steps(self, cur: SplitPrediction, evident: set[str], targets: SLOTargets) -> tuple[int, int]:
        """(toward decode, toward prefill): the split steps one decision may take each way (0: any). One, unless
        that side's target is observed past or under a new load (`evident`: TTFT moves toward prefill, TPOT
        toward decode), or the current split is predicted past its binding target by more than `margin`, or
        `comfort_slack` >= 1 (chase the best). Evidence for one target frees only the moves that relieve it. Toward
        decode never more than `max_decode_steps`."""
        cfg = self.config
        if cfg.comfort_slack >= 1.0:
            return self._capped_toward_decode(cfg.max_step), cfg.max_step
        free = set(evident)
        if cur.slack < -cfg.margin:
            free.add("ttft" if cur.ttft_ms / targets.ttft_ms >= cur.tpot_ms / targets.tpot_ms else "tpot")
        toward_decode = self._capped_toward_decode(cfg.max_step) if "tpot" in free else 1
        return toward_decode, (cfg.max_step if "ttft" in free else 1)

    def _capped_toward_decode(self, steps: int) -> int:
        """`steps` (0: any) within `max_decode_steps` (0: no cap)."""
        cap = self.config.max_decode_steps
        return steps if not cap or (steps and steps <= cap) else cap

    def _best(self, splits: tuple[int, ...], current: int, preds: list[SplitPrediction], targets: SLOTargets,
              side: int = 0, max_steps: tuple[int, int] = (0, 0), refuses_late: bool = False) -> SplitPrediction:
        """Within `max_steps` (toward decode, toward prefill; 0: any), on the `side` of the current split (+1:
        more prefill SMs, -1: fewer, 0: either; the current split is always a candidate): toward decode, the
        nearest split predicted comfortable (slack >= `comfort_slack`) by more than `margin` over the current
        one; toward prefill, when the split of the highest slack is predicted past its targets and past TPOT's,
        the highest slack of those predicted within TPOT's, if any, else that split only if it brings TTFT
        within its target and the engine does not refuse late prompts (`refuses_late`: it would trade the
        refused share of the arrivals for a TPOT missed by every request decoding; otherwise the current split);
        otherwise the highest slack (ties to the nearest split). Why each choice: `docs/split-policy.md`, "Which
        split on each side"."""
        def most_slack(candidates: list[SplitPrediction]) -> SplitPrediction:
            return max(candidates, key=lambda p: (round(p.slack, 9), -abs(p.prefill_sms - current)))

        i = splits.index(current)
        toward_decode, toward_prefill = (n or len(splits) for n in max_steps)
        allowed = [p for j, p in enumerate(preds) if -toward_decode <= j - i <= toward_prefill and (j - i) * side >= 0]
        if side < 0:
            enough = max(self.config.comfort_slack, preds[i].slack + self.config.margin)
            comfortable = [p for p in allowed if p.slack >= enough and p.prefill_sms != current]
            if comfortable:
                return min(comfortable, key=lambda p: abs(p.prefill_sms - current))
        best = most_slack(allowed)
        if best.prefill_sms > current and best.slack < 0 and best.tpot_ms > targets.tpot_ms:
            decode_within = [p for p in allowed if p.tpot_ms <= targets.tpot_ms and p.prefill_sms >= current]
            if decode_within:
                return most_slack(decode_within)
            return best if best.ttft_ms <= targets.ttft_ms and not refuses_late else preds[i]
        return best


def barred(recent: list[UrgentMove], current: int, target: int, gain_only: bool) -> bool:
    """Whether a move from `current` to `target` may not be urgent for going back over one of the `recent` urgent
    moves (the last `dwell_s`'): any move back over one made for a small TPOT miss (the two would alternate, TTFT
    missed on one split and TPOT on the other), and a move urgent only by its gain (`gain_only`) back over any (in an
    overload each split looks far better from the other). A move back to a split predicted within `urgent_slack`
    stays urgent: a quick undo of a move that went wrong."""
    back = [m for m in recent if m.reversed_by(current, target)]
    return any(m.for_tpot for m in back) or (gain_only and bool(back))


def nearest_tpot_relief(preds: list[SplitPrediction], current: int, targets: SLOTargets, min_slack: float
                        ) -> SplitPrediction | None:
    """The split with the most prefill SMs below `current` predicted within TPOT's target at a slack above
    `min_slack` (None: none)."""
    relief = [p for p in preds if p.prefill_sms < current and p.tpot_ms <= targets.tpot_ms and p.slack > min_slack]
    return max(relief, key=lambda p: p.prefill_sms, default=None)


def refused_share(model: LatencyModel, view: EngineView, sms: int, cfg: ModelPolicyConfig, speed: float) -> float:
    """The share of `view`'s arrivals that prefill on `sms` SMs cannot keep up with, so that an engine refusing
    late prompts turns them away: 1 - capacity / arrival rate, 0 within capacity."""
    load = prefill_load(model, view.arrival_tokens_per_s, model_sms(model, view, sms), view.num_decoding > 0, cfg,
                        typical_prompt_tokens(view, cfg), speed)
    return max(0.0, 1.0 - 1.0 / load.utilization) if load.utilization > 0 else 0.0


def _now(view: EngineView) -> float:
    """The view's time, or `time.monotonic()` where the caller keeps none."""
    return view.time if view.time > 0 else time.monotonic()


def observed_past(view: EngineView, targets: SLOTargets, cfg: ModelPolicyConfig) -> set[str]:
    """The targets ("ttft", "tpot") observed past target at the target percentile, given `min_observed` samples;
    TPOT also when the engine's recent decode step is past it (a TPOT sample comes only when a request ends:
    in simulation, chat's batch after documents pushed the step past 40 ms seconds before the first one), or the
    TPOT so far of the requests decoding now (`live_tpot_ms`: on the H200, run 27, documents streamed at 13.3-16.5
    ms a token against 15 for 7 s before their TPOT samples showed it, and the split moved only once the arrivals
    had ended); TTFT also when the queued prompt tokens take longer than its target at the prefill speed the
    engine measured on its split (`queue_drain_ms`: a request arriving now waits that long; a TTFT sample comes
    only with a first token, and on the H100 a queue of 56,000 tokens, 4.5 s of work, waited 10 s for 8 of
    them, run 26). TPOT's samples and the live TPOT count less the engine's decode stalls in them, as far as the
    engine tells them (`tpot_without_stalls`, `live_stall_ms`): more decode SMs shorten a step, not a stall, so a
    TPOT that stalls alone put past target is no evidence for a move toward decode (on the H100, run 33, chat's
    window at 37 req/s ended at P90 TPOT 12.2 ms against 12 with decode stalled 124 times in one second; the
    policy then moved 64 -> 40 on the draining engine, and the next window's prompts queued for 20 s). And the TPOT
    samples count only while the batch they decoded in may still be there: `min_observed` requests decoding, none
    of whose TPOT so far is known (run 36, H100, no stall: chat's window at 34.5 req/s ended at P90 TPOT 12.8 ms;
    on those samples the policy moved the draining engine 64 -> 40, and the next window began there and kept
    13.9% within both targets)."""
    q = 100.0 * targets.attainment
    past = {"ttft"} if _samples_past(view.ttft_ms, targets.ttft_ms, q, cfg) else set()
    live = live_tpot_ms(view, targets, cfg)
    if max(view.decode_step_ms, live - live_stall_ms(view, targets, live)) > targets.tpot_ms:
        past.add("tpot")
    elif not live and view.num_decoding >= cfg.min_observed and _samples_past(tpot_without_stalls(view),
                                                                              targets.tpot_ms, q, cfg):
        past.add("tpot")
    if queue_drain_ms(view) > targets.ttft_ms:
        past.add("ttft")
    return past


def _samples_past(samples: tuple[float, ...], target: float, q: float, cfg: ModelPolicyConfig) -> bool:
    """Whether `min_observed` samples or more are past `target` at percentile `q`."""
    return len(samples) >= cfg.min_observed and percentile(samples, q) > target


def tpot_without_stalls(view: EngineView) -> tuple[float, ...]:
    """The TPOT samples less the decode stalls in them where the engine tells them for every sample, else as
    they are."""
    unstalled = view.tpot_without_stalls_ms
    return unstalled if unstalled and len(unstalled) == len(view.tpot_ms) else view.tpot_ms


def live_tpot_ms(view: EngineView, targets: SLOTargets, cfg: ModelPolicyConfig) -> float:
    """The TPOT so far of the requests decoding now at the target percentile, given `min_observed` of them (0:
    fewer): the TPOT samples they will give when they end, if decode goes on as it did."""
    if len(view.live_tpot_ms) < cfg.min_observed:
        return 0.0
    return percentile(view.live_tpot_ms, 100.0 * targets.attainment)


def live_stall_ms(view: EngineView, targets: SLOTargets, live_ms: float) -> float:
    """What of the live TPOT (`live_tpot_ms`) the engine's decode stalls explain: it less the same percentile of
    the requests' TPOT so far without the stalls they decoded through (0: no live TPOT, or none without stalls
    published). More decode SMs shorten a step, not a stall: on the H100 (run 30, chat at 32 req/s on 64 prefill
    SMs) two stalls of 280 ms put the P90 TPOT so far at 29.7 ms over a 9 ms step; the policy moved to 56
    urgently for its predicted 10.3 ms, then to 48, where TTFT missed. A step slow throughout (under a long
    prompt's prefill) is no stall: with the median step in place of the TPOT without stalls, documents at 5.5
    req/s on 88 SMs held 88 while the TPOT so far of the requests decoding passed 15 ms for 8 s (run 31; 80 pinned
    kept 100%)."""
    unstalled = view.live_tpot_without_stalls_ms
    if live_ms <= 0 or len(unstalled) != len(view.live_tpot_ms):
        return 0.0
    return max(0.0, live_ms - percentile(unstalled, 100.0 * targets.attainment))


def queue_drain_ms(view: EngineView) -> float:
    """How long the queued prompt tokens take at the prefill speed the engine measured on its current split
    (0: no measured speed)."""
    if view.prefill_iteration_ms <= 0 or view.prefill_iteration_tokens <= 0:
        return 0.0
    return view.waiting_prefill_tokens * view.prefill_iteration_ms / view.prefill_iteration_tokens


def at_risk(cur: SplitPrediction, view: EngineView, targets: SLOTargets, cfg: ModelPolicyConfig) -> set[str]:
    """The targets ("ttft", "tpot") at risk on the current split: observed past target (`observed_past`),
    or the binding one of a prediction whose slack is under `comfort_slack`. The policy moves only for
    these, and only to the side that helps."""
    risky = observed_past(view, targets, cfg)
    if cur.slack < cfg.comfort_slack:
        risky.add("ttft" if cur.ttft_ms / targets.ttft_ms >= cur.tpot_ms / targets.tpot_ms else "tpot")
    return risky


def _evidence(view: EngineView, info: Mapping[str, float], targets: SLOTargets) -> str:
    """What the engine shows now, as a decision's reason gives it: the queued prompt tokens, the observed TTFT,
    the TPOT so far of the requests decoding and what of it the engine's decode stalls explain."""
    q = f"P{100 * targets.attainment:.0f}"
    seen = f"; queued {view.waiting_prefill_tokens} prompt tokens"
    if "observed_ttft_ms" in info:
        seen += f", {q} TTFT observed {info['observed_ttft_ms']:.0f} ms"
    if "live_tpot_ms" in info:
        seen += f"; {q} TPOT so far of the {len(view.live_tpot_ms)} requests decoding {info['live_tpot_ms']:.1f} ms"
    if "live_stall_ms" in info:
        seen += f" ({info['live_stall_ms']:.1f} of it stalls)"
    return seen


def _describe(p: SplitPrediction, targets: SLOTargets) -> str:
    return (f"TTFT {p.ttft_ms:.0f}/{targets.ttft_ms:.0f} ms, TPOT {p.tpot_ms:.1f}/{targets.tpot_ms:.1f} ms, "
            f"slack {p.slack:+.2f}")


def _neighbour(preds: list[SplitPrediction], current: int, side: int, targets: SLOTargets) -> str:
    """The prediction of the split next to `current` on the `side` that would relieve a risk (+1: more prefill
    SMs, -1: fewer), as "; not S: ..." for a hold's reason: what kept the policy from it. "" for side 0 or at the
    end of the split set."""
    splits = [p.prefill_sms for p in preds]
    j = splits.index(current) + side
    if side == 0 or not 0 <= j < len(preds):
        return ""
    return f"; not {splits[j]}: {_describe(preds[j], targets)}"


def make_policy(name: str, model: LatencyModel | Mapping[str, LatencyModel] | None = None,
                config: ModelPolicyConfig | None = None, step: int = 1) -> SplitPolicy:
    """`reactive`: the semi-PD paper's P90 rule moving `step` splits at a time (no model);
    `model`: `ModelPolicy` over `model` with `config`; `fixed`: keep the split the engine has.
    """
    if name == "fixed":
        return FixedPolicy()
    if name == "reactive":
        return ReactivePolicy(step=step)
    if name == "model":
        if model is None:
            raise ValueError("the model policy needs a latency model (see actors.slo.latency_model.load_or_profile)")
        return ModelPolicy(model, config)
    raise ValueError(f"unknown split policy {name!r}; choose from {', '.join(POLICIES)}")


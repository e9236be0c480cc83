"""Admission control: refuse (or de-prioritize) a request that cannot meet its TTFT target.

From the latency model and the engine's queue, the TTFT of a new request is predicted
as the time to prefill the queued tokens (those of the iteration still on the device
included) plus its own prompt at the current prefill split (slowed by contention when
decode runs). If that exceeds `slack` times its
target (its deadline, or the deployment's TTFT target), the request is

- `reject`: refused with `AdmissionRejected` (a ValueError; HTTP maps it to 429,
  gRPC to RESOURCE_EXHAUSTED), so the client can retry elsewhere or later, instead
  of every queued request missing its target;
- `queue`: accepted at the lowest priority class (`QUEUE_PRIORITY`), served after the
  requests that can still meet their targets, until it has waited the prefill order's aging
  bound (`actors.slo.ordering`: `SLOConfig.aging_s`, default twice the TTFT target); from then
  on it is ordered at the priority it asked for, so on-time work cannot hold it back for ever.
  Its first token out, it decodes at that priority too (`DecodeScheduler.add`).

Off by default (`SLOConfig.admission`). The prediction is conservative: it counts as ahead of
the new request every partial prefill and every waiting request of its priority class or a more
urgent one (whatever their deadlines), and no prefix-cache hit for it. Waiting requests that go
after it (a lower priority class, such as those `queue` put at `QUEUE_PRIORITY`) do not count:
counting them refused a high-priority request behind a low-priority backlog, and in `queue` mode
put every new request behind the others once one was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

from actors.engine.durations import Durations
from actors.slo.latency_model import LatencyModel

if TYPE_CHECKING:
    from actors.engine.core import EngineCore
    from actors.request import Request

AdmissionAction = Literal["reject", "queue"]
ADMISSION_ACTIONS: tuple[str, ...] = ("reject", "queue")
QUEUE_PRIORITY = 1 << 20  # priority given to requests queued past their target (lower value goes first)
# upper bounds of the buckets of an admitted request's TTFT over the TTFT predicted for it (`EngineAdmission`)
TTFT_RATIO_BOUNDS: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)


class AdmissionRejected(ValueError):
    """The request would miss its TTFT target under the current load (HTTP 429)."""

    def __init__(self, message: str, predicted_ttft_ms: float, target_ms: float) -> None:
        super().__init__(message)
        self.predicted_ttft_ms = predicted_ttft_ms
        self.target_ms = target_ms

    def __reduce__(self) -> tuple[type[AdmissionRejected], tuple[str, float, float]]:
        """Rebuilt with all three arguments: Ray pickles an actor's exception to raise it in the caller (without
        this, every refusal reached the HTTP front end as a 500 "UnserializableException": H200, 2026-12-04)."""
        return type(self), (str(self), self.predicted_ttft_ms, self.target_ms)


@dataclass(frozen=True)
class AdmissionConfig:
    """ttft_ms: target of requests without a deadline; slack: admit while predicted
    TTFT <= slack * target; chunk_tokens: prefill tokens per iteration; max_speed_correction:
    the engine's observed prefill speed corrects the model's by at most this factor either way."""

    ttft_ms: float = 1000.0
    slack: float = 1.0
    action: AdmissionAction = "reject"
    chunk_tokens: int = 4096
    max_speed_correction: float = 4.0

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.slack <= 0:
            raise ValueError("ttft_ms and slack must be positive")
        if self.max_speed_correction < 1:
            raise ValueError(f"max_speed_correction must be >= 1, got {self.max_speed_correction}")
        if self.action not in ADMISSION_ACTIONS:
            raise ValueError(f"action must be one of {ADMISSION_ACTIONS}, got {self.action!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


@dataclass(frozen=True)
class QueueSnapshot:
    """The engine's load as admission sees it, and its recent prefill iterations on the current split (mean
    time and tokens; 0: too few to tell)."""

    waiting_prefill_tokens: int
    num_prefill_requests: int
    num_decoding: int
    prefill_sms: int
    prefill_iteration_ms: float = 0.0
    prefill_iteration_tokens: float = 0.0


class AdmissionDecision(NamedTuple):
    """What admission made of a request: the priority to queue it with, its predicted TTFT, and whether it was
    held back (`queue` mode, predicted past its target)."""

    priority: int
    predicted_ttft_ms: float
    held_back: bool


class AdmissionController:
    """Predicts a new request's TTFT and admits, de-prioritizes or rejects it (pure)."""

    def __init__(self, model: LatencyModel, config: AdmissionConfig | None = None) -> None:
        self.model = model
        self.config = config or AdmissionConfig()

    def predict_ttft_ms(self, prompt_tokens: int, queue: QueueSnapshot) -> float:
        """Queued prefill tokens plus this prompt, at the current prefill split, at the speed the engine's
        recent prefill iterations ran at (`prefill_speed`)."""
        tokens, requests = queue.waiting_prefill_tokens + prompt_tokens, queue.num_prefill_requests + 1
        modelled = self.model.prefill_queue_ms(tokens, requests, queue.prefill_sms, concurrent=queue.num_decoding > 0,
                                               chunk_tokens=self.config.chunk_tokens)
        return modelled * self.prefill_speed(queue, tokens / requests)

    def prefill_speed(self, queue: QueueSnapshot, prompt_tokens: float) -> float:
        """Observed / modelled prefill iteration time, clamped to `max_speed_correction` (1.0: nothing observed).
        A profile that overrates the engine's prefill admits what then misses: in simulation (the H200 profile of
        2026-12-03, prefill 15% slower than it says, chat at 65 req/s, TPOT <= 12 ms), refusing by the profile's
        speed kept 16.4% of the requests within both targets, by the observed speed 65.7% (none refused: 11.5%)."""
        return self.model.observed_prefill_speed(queue.prefill_iteration_ms, queue.prefill_iteration_tokens,
                                                 prompt_tokens, queue.prefill_sms, queue.num_decoding > 0,
                                                 self.config.chunk_tokens, self.config.max_speed_correction)

    def target_ms(self, deadline: float | None, now: float) -> float:
        """Milliseconds left: to the request's deadline (monotonic s), else the deployment's target."""
        return (deadline - now) * 1000.0 if deadline is not None else self.config.ttft_ms

    def check(self, prompt_tokens: int, queue: QueueSnapshot, target_ms: float) -> float:
        """The predicted TTFT; raises `AdmissionRejected` when it exceeds slack * target."""
        predicted = self.predict_ttft_ms(prompt_tokens, queue)
        limit = self.config.slack * target_ms
        if predicted > limit:
            raise AdmissionRejected(
                f"request rejected by admission control: predicted time to first token {predicted:.0f} ms exceeds "
                f"its {target_ms:.0f} ms target (slack x{self.config.slack:g}) with {queue.waiting_prefill_tokens} "
                f"prompt tokens queued ahead of its {prompt_tokens}; retry later or on another replica",
                predicted, target_ms,
            )
        return predicted

    def decide(self, prompt_tokens: int, queue: QueueSnapshot, priority: int = 0, deadline: float | None = None,
               now: float | None = None) -> AdmissionDecision:
        """Admit, or hold back, the request; raises `AdmissionRejected` in reject mode."""
        target = self.target_ms(deadline, time.monotonic() if now is None else now)
        try:
            predicted = self.check(prompt_tokens, queue, target)
        except AdmissionRejected as e:
            if self.config.action == "reject":
                raise
            return AdmissionDecision(max(priority, QUEUE_PRIORITY), e.predicted_ttft_ms, held_back=True)
        return AdmissionDecision(priority, predicted, held_back=False)

    def admit(self, prompt_tokens: int, queue: QueueSnapshot, priority: int = 0, deadline: float | None = None,
              now: float | None = None) -> int:
        """The priority to queue the request with (`decide`); raises `AdmissionRejected` in reject mode."""
        return self.decide(prompt_tokens, queue, priority, deadline, now).priority


class EngineAdmission:
    """An `AdmissionController` bound to one engine's queues (what `EngineCore` calls), and how its predictions
    turned out: `ttft_over_predicted` counts each request admitted at its own priority by its TTFT in the engine
    (from `add_request` to its first token sampled) over the TTFT predicted for it, per bucket of
    `TTFT_RATIO_BOUNDS` (`semipd:admission_ttft_ratio`). A ratio past 1 / slack is a request admitted that then
    missed its target: what `--admission-slack` leaves room for."""

    def __init__(self, core: EngineCore, controller: AdmissionController) -> None:
        self.core = core
        self.controller = controller
        self.ttft_over_predicted = Durations(TTFT_RATIO_BOUNDS)

    @classmethod
    def for_engine(cls, core: EngineCore) -> EngineAdmission:
        """Load the engine's latency model from `SLOConfig.latency_profile`, or profile it now
        (before the workers start) and save it there."""
        from actors.slo.latency_model import load_or_profile
        from actors.slo.profiler import ProfileConfig, engine_profile_key, profile_engine

        slo = core.config.slo
        quick = core.device.type != "cuda"
        model = load_or_profile(slo.latency_profile, engine_profile_key(core),
                                lambda: profile_engine(core, ProfileConfig.quick() if quick else None))
        cfg = AdmissionConfig(ttft_ms=slo.ttft_ms, slack=slo.admission_slack, action=slo.admission_action,  # type: ignore[arg-type]
                              chunk_tokens=core.config.scheduler.max_prefill_tokens)
        return cls(core, AdmissionController(model, cfg))

    def snapshot(self, req: Request) -> QueueSnapshot:
        """The engine's load as a new `req` would meet it: the prefill work it would wait for (what
        `PrefillScheduler.queued_ahead_of` counts, and the iteration still on the device, counted whole), the decode
        batch, the split and the recent prefill speed. (Run 37, H100: predicted without the iteration on the device,
        documents at 5.5 req/s met TTFTs 10-25% over their predictions in bursts of 150-200 ms iterations.)"""
        core = self.core
        tokens, requests = core.prefill.queued_ahead_of(req)
        recent = core.recent_prefill()
        return QueueSnapshot(
            waiting_prefill_tokens=tokens + core.prefill_tokens_on_device(),
            num_prefill_requests=requests,
            num_decoding=core.decode.num_running,
            prefill_sms=core.partitioner.current,
            prefill_iteration_ms=recent.mean_ms,
            prefill_iteration_tokens=recent.mean_tokens,
        )

    def admit(self, req: Request) -> int:
        """The priority to queue the new `req` with; raises `AdmissionRejected` when rejecting. Notes the TTFT
        predicted for a request admitted at its own priority on it (`Request.admission_ttft_ms`)."""
        decision = self.controller.decide(req.num_prompt_tokens, self.snapshot(req), req.priority, req.deadline)
        if not decision.held_back:
            req.admission_ttft_ms = decision.predicted_ttft_ms
        return decision.priority

    def note_finished(self, req: Request) -> None:
        """Counts a finished request's TTFT over its prediction (those without a first token, or held back, not).
        Called under the engine's lock: one thread at a time."""
        if req.admission_ttft_ms and req.first_token_time is not None:
            ttft_ms = 1e3 * (req.first_token_time - req.arrival_time)
            self.ttft_over_predicted.observe(ttft_ms / req.admission_ttft_ms)

"""An open-loop simulation of one semi-PD engine whose latencies are a `LatencyModel`, for testing split
policies across load changes without a GPU.

Requests arrive as a seeded Poisson process in phases (each its own rate and lengths). Prefill drains them
first come, first served at the model's prefill speed on the current split; a prefilled request joins the
decode batch, which advances one token per modelled step on the remaining SMs until its output is done.
A policy, if given, decides every `decide_every_s` from the view a GPU actor would publish: queue, batch,
the TTFT and TPOT samples of requests that arrived after the last switch, the TPOT so far of those decoding
that had their first token after it (`LIVE_TPOT_MIN_TOKENS` or more made), the mean decode step of the last
2 s, the prefill iteration (a full chunk at the model's speed) once prefill has been busy on the current split
for `PREFILL_SPEED_AFTER_S`, and the arrival rate and lengths (through the actor's own `RateWindow`).
Switches take effect at once; `switch_transient` (seconds, factor) slows decode's steps by the factor for
that long after a switch that gives prefill more SMs (on the H200 decode streamed half its tokens in the
half second after such moves, runs 20-21, where the split held throughout ran at its settled pace). `stalls`
(per second, seconds) stops decode for that long, at that seeded rate, while prompts wait (on the H100 a fresh
server's first windows at a new load had decode stand still for 100-280 ms, about ten times in 15 s, run 30); a
stall is one long step in the view's mean decode step, and is left out of the TPOT so far without stalls. The
policy may hold another model than the one that times the engine (`with_prefill_factor`, `with_decode_factor`: a
profile that misjudges prefill or decode). Plain functions (no fixtures).
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, replace

from actors.gpu_actor import LIVE_TPOT_MIN_TOKENS, RateWindow
from actors.slo.admission import AdmissionController, AdmissionRejected, QueueSnapshot
from actors.slo.latency_model import LatencyModel
from actors.slo.types import EngineView, SLOTargets, SplitPolicy

CHUNK_TOKENS = 4096  # the engine's prefill tokens per iteration
STEP_SPAN_S = 2.0  # the view's decode step is the mean over this span, as an engine publishes it
PREFILL_SPEED_AFTER_S = 1.0  # busy prefill on one split this long shows its iteration in the view


def with_prefill_factor(model: LatencyModel, factor: float) -> LatencyModel:
    """`model` with every prefill time multiplied by `factor`."""
    return replace(model, prefill=replace(model.prefill, coef=tuple(factor * c for c in model.prefill.coef)))


def with_decode_factor(model: LatencyModel, factor: float) -> LatencyModel:
    """`model` with every decode step time multiplied by `factor`."""
    return replace(model, decode=replace(model.decode, coef=tuple(factor * c for c in model.decode.coef)))


@dataclass(frozen=True)
class Phase:
    """`seconds` of arrivals at `rate` requests/s, `output` tokens out each and `prompt` tokens in: all
    alike, or with `prompt_cv` > 0 lognormal of that mean and coefficient of variation (real prompts
    vary, and the queueing wait grows with their variance: in 15 s of arxiv's 7 req/s a fixed 104 kept
    98-100% with alike prompts, where the H200 kept 89.5%; see tests/test_slo.py)."""

    seconds: float
    rate: float
    prompt: int
    output: int
    prompt_cv: float = 0.0


@dataclass
class SimRequest:
    arrival: float
    prompt: int
    output: int
    prefill_left: float
    first_token: float = -1.0
    stalled_at_first: float = 0.0  # the simulation's stall time so far at its first token
    decoded: float = 0.0
    finish: float = -1.0
    stalled_at_finish: float = 0.0  # and at its last

    @property
    def ttft_ms(self) -> float:
        return (self.first_token - self.arrival) * 1000.0

    @property
    def tpot_ms(self) -> float:
        return (self.finish - self.first_token) * 1000.0 / max(1, self.output - 1)

    @property
    def tpot_without_stalls_ms(self) -> float:
        stalled = self.stalled_at_finish - self.stalled_at_first
        return (self.finish - self.first_token - stalled) * 1000.0 / max(1, self.output - 1)


@dataclass(frozen=True)
class SimResult:
    attainment: float  # share of requests within both targets
    switches: tuple[tuple[float, int, int], ...]  # (time s, from, to)


def arrivals(phases: list[Phase], seed: int) -> list[SimRequest]:
    rng, out, start = random.Random(seed), [], 0.0
    for p in phases:
        sigma = math.sqrt(math.log1p(p.prompt_cv**2))
        t = start + rng.expovariate(p.rate)
        while t < start + p.seconds:
            prompt = max(1, round(p.prompt * math.exp(rng.gauss(-sigma * sigma / 2, sigma)))) if sigma else p.prompt
            out.append(SimRequest(t, prompt, p.output, float(prompt)))
            t += rng.expovariate(p.rate)
        start += p.seconds
    return out


def simulate(model: LatencyModel, phases: list[Phase], targets: SLOTargets, start_sms: int,
             policy: SplitPolicy | None = None, seed: int = 0, dt: float = 0.005,
             decide_every_s: float = 0.5, hide: frozenset[str] = frozenset(),
             admission: AdmissionController | None = None, aging_s: float | None = None,
             switch_transient: tuple[float, float] = (0.0, 1.0),
             stalls: tuple[float, float] = (0.0, 0.0)) -> SimResult:
    """Run `phases` to the last request's end on `start_sms` prefill SMs, moved by `policy` if given. `hide`
    leaves out of the view "arrivals" (their rate), "lengths" (mean prompt and output lengths), "budgets" (the
    arrivals' max_tokens), "speed" (the prefill iteration) and/or "stalls" (the TPOT samples and the TPOT so far
    without stalls).
    `admission` admits an arriving request as the engine would: its `reject` action refuses one predicted past its
    target (a refused request counts as one that missed its targets; the view tells the policy, `refuses_late`),
    its `queue` action puts it behind the others, prefilled when no other waits or once it has waited `aging_s`
    (default twice the TTFT target, as `actors.slo.ordering` ages it), then ahead of the younger ones."""
    todo = deque(arrivals(phases, seed))
    total = len(todo)
    queue: deque[SimRequest] = deque()
    held_back: deque[SimRequest] = deque()  # queued by admission behind the others
    aging = aging_s if aging_s is not None else 2.0 * targets.ttft_ms / 1000.0
    decoding: list[SimRequest] = []
    done: list[SimRequest] = []
    window, budgets = RateWindow(), RateWindow()  # the arrivals' prompt tokens and their output (max_tokens)
    sms, last_switch, switches = start_sms, 0.0, []
    slowed_until = 0.0  # decode's transient after a switch toward prefill
    stalled_until, stall_draws = 0.0, random.Random(f"stalls {seed}")
    stalled_s = 0.0  # decode's stall time so far, the one under way counted whole
    busy_since: float | None = None  # since when prefill has had work on the current split
    steps: deque[tuple[float, float]] = deque()  # (time, decode step ms) of the last STEP_SPAN_S
    decide_ticks = round(decide_every_s / dt)
    tick = 0
    while todo or queue or held_back or decoding:
        now = tick * dt
        while todo and todo[0].arrival <= now:
            arrived = todo.popleft()
            window.add(arrived.prompt, now=now)
            budgets.add(arrived.output, now=now)
            verdict = "admit" if admission is None else _admitted(admission, model, arrived, queue, decoding, sms)
            if verdict != "reject":
                (queue if verdict == "admit" else held_back).append(arrived)
        _release_held_back(queue, held_back, now, aging)
        busy_since = (max(busy_since, last_switch) if busy_since is not None else now) if queue else None
        stalled_by_now = stalled_s - max(0.0, stalled_until - now)  # a stall starting now adds nothing by now
        _prefill(model, queue, decoding, sms, now, dt, stalled_by_now)
        slow = switch_transient[1] if now < slowed_until else 1.0
        if queue and decoding and now >= stalled_until and stall_draws.random() < stalls[0] * dt:
            stalled_until = now + stalls[1]
            stalled_s += stalls[1]
            steps.append((now, 1000.0 * stalls[1]))
        step_ms = (_decode(model, decoding, done, sms, bool(queue), now, dt, slow, stalled_s)
                   if now >= stalled_until else 0.0)
        if step_ms:
            steps.append((now, step_ms))
        while steps and steps[0][0] <= now - STEP_SPAN_S:
            steps.popleft()
        if policy is not None and tick % decide_ticks == 0:
            step_mean = sum(ms for _, ms in steps) / len(steps) if steps else 0.0
            waiting = deque((*queue, *held_back))
            view = _view(model, sms, waiting, decoding, done, window, budgets, last_switch, now, hide, step_mean,
                         stalled_by_now)
            if admission is not None and admission.config.action == "reject":
                view = replace(view, refuses_late=True)
            if "speed" not in hide and queue and busy_since is not None and now - busy_since >= PREFILL_SPEED_AFTER_S:
                view = replace(view, prefill_iteration_ms=_chunk_ms(model, queue, decoding, sms),
                               prefill_iteration_tokens=float(CHUNK_TOKENS))
            chosen = policy.decide(view, targets).prefill_sms
            if chosen != sms:
                switches.append((round(now, 2), sms, chosen))
                if chosen > sms:
                    slowed_until = now + switch_transient[0]
                sms, last_switch = chosen, now
        tick += 1
    ok = sum(1 for r in done if r.ttft_ms <= targets.ttft_ms and r.tpot_ms <= targets.tpot_ms)
    return SimResult(ok / total, tuple(switches))


def _admitted(admission: AdmissionController, model: LatencyModel, req: SimRequest, queue: deque[SimRequest],
              decoding: list[SimRequest], sms: int) -> str:
    """What `admission` does with `req` in the engine as it stands (the deployment's TTFT target): "admit", "hold"
    (queued behind the others) or "reject". The prediction counts the requests of `queue`, not those held back (they
    go after it); while prompts wait, the engine reports its prefill iterations (full chunks at `model`'s speed)."""
    iteration_ms = _chunk_ms(model, queue, decoding, sms) if queue else 0.0
    snapshot = QueueSnapshot(round(sum(r.prefill_left for r in queue)), len(queue), len(decoding), sms,
                             iteration_ms, float(CHUNK_TOKENS) if queue else 0.0)
    try:
        priority = admission.admit(req.prompt, snapshot)
    except AdmissionRejected:
        return "reject"
    return "admit" if priority == 0 else "hold"


def _release_held_back(queue: deque[SimRequest], held_back: deque[SimRequest], now: float, aging_s: float) -> None:
    """Move the held-back requests that have waited `aging_s` ahead of the younger ones in `queue` (after a prompt
    partly prefilled), and the oldest one held back into an empty `queue`."""
    aged = []
    while held_back and now - held_back[0].arrival >= aging_s:
        aged.append(held_back.popleft())
    if not queue and not aged and held_back:
        aged.append(held_back.popleft())
    if aged:
        head = [queue.popleft()] if queue and queue[0].prefill_left < queue[0].prompt else []
        queue.extendleft(reversed(head + aged))


def _prefill(model: LatencyModel, queue: deque[SimRequest], decoding: list[SimRequest], sms: int, now: float,
             dt: float, stalled_s: float) -> None:
    """Prefill the queue for `dt` at the model's speed; a prompt done joins the decode batch with its first token,
    noting `stalled_s` (decode's stall time so far)."""
    if not queue:
        return
    budget = dt * 1000.0 * CHUNK_TOKENS / _chunk_ms(model, queue, decoding, sms)
    while queue and budget > 0:
        r = queue[0]
        used = min(budget, r.prefill_left)
        r.prefill_left -= used
        budget -= used
        if r.prefill_left <= 0:
            r.first_token, r.stalled_at_first = now + dt, stalled_s
            decoding.append(queue.popleft())


def _chunk_ms(model: LatencyModel, queue: deque[SimRequest], decoding: list[SimRequest], sms: int) -> float:
    """One full prefill iteration of prompts like the queue's first, on `sms` prefill SMs."""
    return model.prefill_queue_ms(CHUNK_TOKENS, max(1, CHUNK_TOKENS // queue[0].prompt), sms, bool(decoding))


def _decode(model: LatencyModel, decoding: list[SimRequest], done: list[SimRequest], sms: int, prefilling: bool,
            now: float, dt: float, slow: float = 1.0, stalled_s: float = 0.0) -> float:
    """Advance the batch by `dt` at the model's step time times `slow`; the step time (ms) it ran at (0: nothing
    to decode). A request that ends notes `stalled_s`, decode's stall time so far."""
    if not decoding:
        return 0.0
    context = round(sum(r.prompt + r.decoded for r in decoding))
    step_ms = slow * model.decode_step_ms(len(decoding), context, model.total_sms - sms, prefilling)
    steps = dt * 1000.0 / step_ms
    for r in list(decoding):
        r.decoded += steps
        if r.decoded >= r.output - 1:
            r.finish, r.stalled_at_finish = now + dt, stalled_s
            decoding.remove(r)
            done.append(r)
    return step_ms


def _view(model: LatencyModel, sms: int, queue: deque[SimRequest], decoding: list[SimRequest],
          done: list[SimRequest], window: RateWindow, budgets: RateWindow, last_switch: float, now: float,
          hide: frozenset[str], decode_step_ms: float, stalled_s: float) -> EngineView:
    """`stalled_s`: the time decode stood still so far (up to `now`)."""
    started = [r for r in (*done, *decoding) if r.arrival > last_switch]
    live = [r for r in decoding if r.first_token > last_switch and r.decoded >= LIVE_TPOT_MIN_TOKENS]
    finished = [r for r in done if r.arrival > last_switch]
    outputs = [r.output for r in done[-256:]]
    lengths = "lengths" not in hide
    return EngineView(
        "sim", sms, model.total_sms, model.splits, waiting_prefill_tokens=round(sum(r.prefill_left for r in queue)),
        num_decoding=len(decoding), decode_context_tokens=round(sum(r.prompt + r.decoded for r in decoding)),
        ttft_ms=tuple(r.ttft_ms for r in started[-512:]), tpot_ms=tuple(r.tpot_ms for r in finished[-512:]),
        tpot_without_stalls_ms=() if "stalls" in hide else tuple(r.tpot_without_stalls_ms for r in finished[-512:]),
        time=now + 1.0, num_prefill_requests=len(queue),
        arrival_tokens_per_s=window.rate(now=now) if "arrivals" not in hide else 0.0,
        mean_prompt_tokens=window.mean_amount(now=now) if lengths else 0.0,
        mean_output_tokens=sum(outputs) / len(outputs) if outputs and lengths else 0.0,
        mean_max_tokens=budgets.mean_amount(now=now) if lengths and "budgets" not in hide else 0.0,
        decode_step_ms=decode_step_ms,
        live_tpot_ms=tuple((now - r.first_token) * 1000.0 / r.decoded for r in live),
        live_tpot_without_stalls_ms=() if "stalls" in hide else tuple(
            (now - r.first_token - max(0.0, stalled_s - r.stalled_at_first)) * 1000.0 / r.decoded for r in live),
    )

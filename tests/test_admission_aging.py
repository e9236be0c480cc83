"""Admission's hold-back is bounded (`actors.slo.ordering`): a request that `--admission queue` put behind the
on-time ones at `QUEUE_PRIORITY` is ordered at the priority it asked for once it has waited the prefill order's
aging bound, under either order, so a steady stream of on-time requests delays it by that bound, not for ever.

Time is simulated: each step one prefill iteration admits one request (its budget fits one prompt), then one new
request arrives, which admission finds on time (the deployment's target allows three prompts' prefill). The held
request has a target of its own, half a prompt's prefill: with one prompt queued ahead of it, it is late."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from actors.disagg.state import request_from, state_of
from actors.engine.core import EngineCore
from actors.kv.allocator import BlockAllocator
from actors.kv.manager import KVManager
from actors.request import Request
from actors.scheduler.prefill import PrefillScheduler
from actors.slo.admission import QUEUE_PRIORITY, AdmissionConfig, AdmissionController, QueueSnapshot
from actors.slo.ordering import AgingOrder, EDFOrder, FCFSOrder

from test_admission_ordering import PAGE, PARAMS, engine_with_admission, per_token_model, prompt, req

N = PAGE  # tokens of every prompt, and of one prefill iteration (one page: no prefix-cache hit shortens one)
TTFT_MS = 500.0
AGING_S = 1.0  # twice TTFT_MS, as the orders default to
STEP_S = 0.125  # simulated time between two iterations (a power of two: the bound falls on a step)
BOUND_STEP = 8  # AGING_S / STEP_S: the first iteration at which the held request has waited the bound
SMS = 66  # the prefill split of `per_token_model`


class SimulatedQueue:
    """A prefill scheduler in `order` on a simulated clock, whose arrivals admission (queue mode, a target of three
    prompts' prefill) gives their priority, as `EngineAdmission` does from the same scheduler."""

    def __init__(self, order: type[AgingOrder]) -> None:
        self.now = 0.0
        self.sched = PrefillScheduler(KVManager(BlockAllocator(64), PAGE), max_tokens=N,
                                      order=order(ttft_ms=TTFT_MS, clock=lambda: self.now))
        model = per_token_model()
        probe = AdmissionController(model, AdmissionConfig(chunk_tokens=N))
        self.prompt_s = probe.predict_ttft_ms(N, QueueSnapshot(0, 0, 0, SMS)) / 1000.0
        config = AdmissionConfig(ttft_ms=3000.0 * self.prompt_s, action="queue", chunk_tokens=N)
        self.admission = AdmissionController(model, config)

    def arrive(self, rid: str, target_s: float | None = None) -> Request:
        """A new request (`target_s`: its own TTFT target), queued at the priority admission gives it."""
        r = req(rid, self.now, N, deadline=None if target_s is None else self.now + target_s)
        tokens, requests = self.sched.queued_ahead_of(r)
        r.priority = self.admission.admit(N, QueueSnapshot(tokens, requests, 0, SMS), r.requested_priority,
                                          r.deadline, now=self.now)
        self.sched.add(r)
        return r

    def iterate(self) -> list[str]:
        """One prefill iteration: the ids of the requests it admitted (each prefilled whole, then let go)."""
        _, reqs = self.sched.schedule()
        for r in reqs:
            self.sched.finish_chunk(r, r.num_uncomputed)
            self.sched.drop(r)
        return [r.request_id for r in reqs]


@pytest.mark.parametrize("order", [FCFSOrder, EDFOrder], ids=["fcfs", "edf"])
def test_a_held_back_request_is_served_once_it_has_waited_the_bound_despite_a_stream_of_on_time_ones(
        order: type[AgingOrder]) -> None:
    q = SimulatedQueue(order)
    assert order(ttft_ms=TTFT_MS).effective_aging_s == AGING_S
    first = q.arrive("a")
    held = q.arrive("held", target_s=q.prompt_s / 2)
    assert first.priority == 0 and held.priority == QUEUE_PRIORITY
    admitted: list[str] = []
    stream: list[Request] = []
    for step in range(1, 3 * BOUND_STEP):
        q.now = step * STEP_S
        admitted += q.iterate()
        stream.append(q.arrive(f"s{step}"))
    assert all(r.priority == 0 for r in stream), "the stream was meant to be on time"
    assert "held" in admitted, "the held-back request was never served while on-time requests kept coming"
    assert admitted.index("held") == BOUND_STEP - 1  # the iteration at the bound, none before
    assert admitted[:BOUND_STEP - 1] == ["a", *(f"s{i}" for i in range(1, BOUND_STEP - 1))]
    assert admitted[BOUND_STEP:] == [f"s{i}" for i in range(BOUND_STEP - 1, len(admitted) - 1)]


def test_past_the_bound_a_held_back_request_regains_its_own_class_not_a_more_urgent_one() -> None:
    """Under FCFS it goes ahead of the (younger) on-time requests of the class it asked for, and still behind those
    of a more urgent class."""
    now = [0.0]
    order = FCFSOrder(ttft_ms=TTFT_MS, clock=lambda: now[0])
    held = req("held", 0.0, N, priority=3)
    held.priority = QUEUE_PRIORITY
    peer, urgent = req("peer", 0.5, N, priority=3), req("urgent", 0.6, N, priority=0)
    ids = lambda: [r.request_id for r in sorted([held, peer, urgent], key=order)]  # noqa: E731
    now[0] = AGING_S - STEP_S
    assert ids() == ["urgent", "peer", "held"]
    now[0] = AGING_S
    assert ids() == ["urgent", "held", "peer"]


def test_the_engine_serves_a_held_back_request_within_its_orders_bound(tiny_llama: Path) -> None:
    """The engine's own admission holds the request back, and its prefill order (from its config: FCFS, the bound
    twice the TTFT target) serves it at the bound while on-time requests keep coming. The engine stamps arrivals
    with the real clock; the order's clock is the real one when the held request is in, plus the simulated time."""
    core: EngineCore = engine_with_admission(tiny_llama, "queue", target_tokens=3 * N)
    order = core.prefill.order
    assert isinstance(order, FCFSOrder) and order.ttft_ms == core.config.slo.ttft_ms
    bound_s = order.effective_aging_s
    step_s = bound_s / BOUND_STEP
    assert core.admission is not None
    prompt_s = core.admission.controller.config.ttft_ms / 3000.0
    core.add_request("a", prompt(N), PARAMS)
    core.add_request("held", prompt(N), PARAMS, deadline=time.monotonic() + prompt_s / 2)
    start, elapsed = time.monotonic(), [0.0]
    core.prefill.order = dataclasses.replace(order, clock=lambda: start + elapsed[0])
    admitted: list[tuple[str, int]] = []
    for step in range(1, 3 * BOUND_STEP):
        elapsed[0] = step * step_s
        _, reqs = core.prefill.schedule(budget=N)
        for r in reqs:
            core.prefill.finish_chunk(r, r.num_uncomputed)
            core.prefill.drop(r)
        admitted += [(r.request_id, r.priority) for r in reqs]
        core.add_request(f"s{step}", prompt(N), PARAMS)
    assert ("held", QUEUE_PRIORITY) in admitted, "the held-back request was never served"
    held_at = admitted.index(("held", QUEUE_PRIORITY))
    assert held_at == BOUND_STEP - 1
    assert all(p == 0 for _, p in admitted[:held_at] + admitted[held_at + 1:])  # the others: on time, in turn
    assert [rid for rid, _ in admitted[:held_at]] == ["a", *(f"s{i}" for i in range(1, BOUND_STEP - 1))]


def test_a_held_back_request_keeps_its_place_across_a_disaggregated_handoff() -> None:
    """What the bound reads (arrival, the priority admission gave, the one asked for) crosses between the engines
    of a disaggregated pair: the rebuilt request is ordered as the original, before the bound and after."""
    now = [0.0]
    order = FCFSOrder(ttft_ms=TTFT_MS, clock=lambda: now[0])
    held = req("held", 0.25, N, priority=2)
    held.priority = QUEUE_PRIORITY
    rebuilt = request_from(state_of(held), torch.device("cpu"))
    now[0] = 0.25 + AGING_S - STEP_S
    assert order(rebuilt) == order(held) == (QUEUE_PRIORITY, 0.25)
    now[0] = 0.25 + AGING_S
    assert order(rebuilt) == order(held) == (2, 0.25)

"""Admission control, prefill order and request priority on the engine's queues: what a request is predicted to
wait for, in which order prefill serves it, and which partial prefill gives its pages back in a standoff."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.config import CacheConfig, EngineConfig, SchedulerConfig
from actors.engine.core import EngineCore
from actors.engine.workers import PrefillWorker
from actors.kv.allocator import BlockAllocator
from actors.kv.manager import KVManager
from actors.request import Request, SamplingParams
from actors.scheduler.prefill import PrefillScheduler
from actors.slo.admission import (
    QUEUE_PRIORITY,
    AdmissionConfig,
    AdmissionController,
    AdmissionRejected,
    EngineAdmission,
    QueueSnapshot,
)
from actors.slo.latency_model import LatencyModel, PhaseModel
from actors.slo.ordering import EDFOrder

PAGE = 16


def per_token_model() -> LatencyModel:
    """Prefill time proportional to the queued tokens, no contention: predictions compare token counts."""
    return LatencyModel(
        device="test", model="test", total_sms=132, splits=(66,),
        prefill=PhaseModel("compute", (1.0, 0.0, 0.0), scale=1.0, contention=0.0),
        decode=PhaseModel("bandwidth", (0.02, 4.4e-5, 5.5), scale=26.6, contention=0.0),
    )


def engine_with_admission(model_dir: Path, action: str, target_tokens: int, mode: str = "unified") -> EngineCore:
    """A CPU engine, not started (requests wait in its queue), whose admission allows a predicted TTFT of the time
    `target_tokens` queued prompt tokens take."""
    config = EngineConfig(model=str(model_dir), mode=mode, cache=CacheConfig(page_size=PAGE, num_pages=128),
                          scheduler=SchedulerConfig(max_prefill_tokens=1024))
    core = EngineCore(config, emit=lambda deltas: None)
    model = per_token_model()
    probe = AdmissionController(model, AdmissionConfig(chunk_tokens=1024))
    target_ms = probe.predict_ttft_ms(target_tokens, QueueSnapshot(0, 0, 0, core.partitioner.current))
    config_ = AdmissionConfig(ttft_ms=target_ms, action=action, chunk_tokens=1024)  # type: ignore[arg-type]
    core.admission = EngineAdmission(core, AdmissionController(model, config_))
    return core


def prompt(n: int, seed: int = 0) -> list[int]:
    return [1 + (seed * 31 + i * 7) % 500 for i in range(n)]


PARAMS = SamplingParams(max_tokens=4)


def test_a_high_priority_request_is_not_refused_for_a_lower_priority_backlog(tiny_llama: Path) -> None:
    """Reject mode: the backlog of a lower priority class is served after a new high-priority request, so it must
    not count in its prediction; a request of the backlog's own class still does."""
    core = engine_with_admission(tiny_llama, "reject", target_tokens=150)
    core.add_request("batch", prompt(120), PARAMS, priority=5)
    core.add_request("vip", prompt(100, 1), PARAMS, priority=-1)  # 100 tokens ahead of the batch's 120
    with pytest.raises(AdmissionRejected):
        core.add_request("peer", prompt(100, 2), PARAMS, priority=5)  # behind the batch: 220 tokens
    _, reqs = core.prefill.schedule()
    assert [r.request_id for r in reqs] == ["vip", "batch"]


def test_a_partial_prefill_counts_ahead_of_any_priority(tiny_llama: Path) -> None:
    core = engine_with_admission(tiny_llama, "reject", target_tokens=150)
    core.add_request("batch", prompt(120), PARAMS, priority=5)
    core.prefill.schedule(budget=32)  # admitted: its prefill goes on before anything new
    with pytest.raises(AdmissionRejected):
        core.add_request("vip", prompt(100, 1), PARAMS, priority=-1)


def test_queue_mode_serves_a_request_that_can_meet_its_target_before_the_late_ones(tiny_llama: Path) -> None:
    """Queue mode: requests predicted late are queued at `QUEUE_PRIORITY`, behind the others; a later short request
    that can still meet its target (only the first request goes before it) keeps its class and goes first."""
    core = engine_with_admission(tiny_llama, "queue", target_tokens=150)
    core.add_request("first", prompt(120), PARAMS)
    core.add_request("late1", prompt(120, 1), PARAMS)
    core.add_request("late2", prompt(120, 2), PARAMS)
    core.add_request("short", prompt(20, 3), PARAMS)
    _, reqs = core.prefill.schedule()
    assert [(r.request_id, r.priority) for r in reqs] == [
        ("first", 0), ("short", 0), ("late1", QUEUE_PRIORITY), ("late2", QUEUE_PRIORITY)]


class StillRunning:
    """A draw whose iteration has not ended on the device (what a CPU engine's synchronous iterations never leave)."""

    def finished(self) -> bool:
        return False


def test_a_prefill_iteration_still_on_the_device_counts_ahead(tiny_llama: Path) -> None:
    """The scheduler accounts for an iteration's chunks when it is queued; until it ends on the device, its prompt
    tokens still stand between a new request and its first token."""
    core = engine_with_admission(tiny_llama, "reject", target_tokens=150, mode="semi-pd")
    (worker,) = [w for w in core.workers if isinstance(w, PrefillWorker)]
    core.add_request("first", prompt(120), PARAMS)
    assert worker.step()  # its one iteration, ended within the step on the CPU
    assert worker._on_device is not None and worker._on_device[1] == 120
    assert core.prefill_tokens_on_device() == 0 and not core.prefill.has_work()
    core.add_request("second", prompt(100, 1), PARAMS)
    core.add_request("short", prompt(40, 2), PARAMS)  # 100 + 40 tokens: within the target
    worker._on_device = (StillRunning(), 120)  # type: ignore[assignment]  # an iteration of 120 tokens on the device
    assert core.prefill_tokens_on_device() == 120
    with pytest.raises(AdmissionRejected, match="260 prompt tokens queued ahead"):
        core.add_request("behind", prompt(20, 3), PARAMS)  # 100 + 40 + 120 ahead of it


def test_queued_ahead_of_counts_aged_requests_of_a_lower_priority_under_edf() -> None:
    now = [0.0]
    sched = PrefillScheduler(KVManager(BlockAllocator(64), PAGE), max_tokens=64,
                             order=EDFOrder(ttft_ms=1000.0, aging_s=2.0, clock=lambda: now[0]))
    sched.add(req("old-batch", 0.0, 40, priority=5))
    now[0] = 1.0
    new = req("vip", 1.0, 30, priority=-1)
    assert sched.queued_ahead_of(new) == (0, 0)
    now[0] = 2.5  # the batch request has waited past the aging time: it goes first now
    assert sched.queued_ahead_of(req("vip2", 2.5, 30, priority=-1)) == (40, 1)


def req(rid: str, arrival: float, n: int, priority: int = 0, deadline: float | None = None) -> Request:
    return Request(rid, prompt(n), n, SamplingParams(max_tokens=4), arrival_time=arrival, priority=priority,
                   requested_priority=priority, deadline=deadline)


def partial_prefill(sched: PrefillScheduler, r: Request, tokens: int) -> None:
    """Put `r` in `sched.running` with `tokens` of its prompt computed (as a concurrent page release lets two
    partial prefills run in a semi-PD engine)."""
    assert sched.kv.grow(r, tokens) == tokens
    sched.finish_chunk(r, tokens)
    sched.running.append(r)


@pytest.mark.parametrize("order", ["fcfs", "edf"])
def test_a_prefill_standoff_preempts_the_request_last_in_order_not_the_youngest(order: str) -> None:
    """Two partial prefills wait for pages: the older one of a lower priority gives its pages back, and the
    younger high-priority one goes on with them."""
    kwargs = {} if order == "fcfs" else {"order": EDFOrder(ttft_ms=1000.0, clock=lambda: 0.5)}
    sched = PrefillScheduler(KVManager(BlockAllocator(8), PAGE), max_tokens=64, **kwargs)  # type: ignore[arg-type]
    low, high = req("low", 0.0, 200, priority=3), req("high", 0.1, 200, priority=-3)
    partial_prefill(sched, low, 64)
    partial_prefill(sched, high, 64)
    assert sched.kv.allocator.num_free == 0
    _, reqs = sched.schedule()
    assert [r.request_id for r in reqs] == ["high"]
    assert low.num_preemptions == 1 and not low.block_ids and low.num_computed_tokens == 0
    assert high.num_preemptions == 0 and sched.running == [high]
    assert sched.num_waiting == 1


def test_edf_admits_a_far_deadline_request_once_aged_despite_a_steady_stream_of_urgent_ones() -> None:
    """Each iteration admits one request; a new urgent one arrives every 0.1 s. The relaxed request goes once it
    has waited the aging time, ahead of the urgent ones that have not."""
    now = [0.0]
    sched = PrefillScheduler(KVManager(BlockAllocator(256), PAGE), max_tokens=16,
                             order=EDFOrder(ttft_ms=1000.0, aging_s=1.0, clock=lambda: now[0]))
    sched.add(req("relaxed", 0.0, 16, deadline=100.0))
    admitted: list[str] = []
    for i in range(30):
        now[0] = 0.1 * i
        sched.add(req(f"urgent{i}", now[0], 16, deadline=now[0] + 0.2))
        _, reqs = sched.schedule()
        for r in reqs:
            sched.finish_chunk(r, r.num_uncomputed)
            sched.drop(r)
        admitted += [r.request_id for r in reqs]
    assert admitted.index("relaxed") == 10  # at 1.0 s, its aging time
    assert admitted[:10] == [f"urgent{i}" for i in range(10)]

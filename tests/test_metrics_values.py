"""/metrics values: what the series say equals what happened (tokens, requests, latencies covered), and the
per-engine counters never go down (an engine that starts again, a read of an engine that failed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from actors.config import CacheConfig, EngineConfig, SchedulerConfig
from actors.engine.frontend import StreamChunk
from cluster.engine_client import EngineLoad
from cluster.metrics import ServingMetrics

from support import Samples, metric, openai_server, parse_metrics, wait_until

MODEL = "tiny"
M = {"model_name": MODEL}
def rendered(metrics: ServingMetrics) -> Samples:
    return parse_metrics(metrics.render()[0].decode())


def _load(engine_id: str, **stats: Any) -> EngineLoad:
    return EngineLoad(engine_id, stats=stats)


# -- request series ------------------------------------------------------------------------------------------------


def test_itl_covers_every_token_after_the_first_when_the_first_chunk_brings_several() -> None:
    metrics = ServingMetrics("m", max_model_len=64)
    tracker = metrics.track(arrival=time.monotonic() - 0.2)
    tracker.on_chunk(StreamChunk("r", "abc", (1, 2, 3), num_prompt_tokens=4))  # the consumer read late
    tracker.on_chunk(StreamChunk("r", "d", (4,)))
    tracker.on_chunk(StreamChunk("r", "e", (5,), finish_reason="length"))
    s = rendered(metrics)
    m = {"model_name": "m"}
    assert metric(s, "vllm:generation_tokens_total", **m) == 5
    assert metric(s, "vllm:time_to_first_token_seconds_count", **m) == 1
    assert metric(s, "vllm:inter_token_latency_seconds_count", **m) == 5 - 1
    assert metric(s, "vllm:inter_token_latency_seconds_sum", **m) == pytest.approx(
        metric(s, "vllm:request_decode_time_seconds_sum", **m))


class Live:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        self.oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def scrape(self) -> Samples:
        return parse_metrics(self.http.get("/metrics").text)


@pytest.fixture(scope="module")
def live(tiny_llama: Path) -> Iterator[Live]:
    # few pages: the concurrent requests below preempt each other (recomputed, not generated again)
    cfg = EngineConfig(model=str(tiny_llama), mode="semi-pd", scheduler=SchedulerConfig(max_model_len=512),
                       cache=CacheConfig(num_pages=40))
    with openai_server(cfg, MODEL) as (_, url):
        yield Live(url)


def _idle(live: Live) -> Samples:
    def idle() -> Samples | None:
        s = live.scrape()
        gauges = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
        return s if all(metric(s, g, **M) == 0 for g in gauges) else None

    return wait_until(idle, what="the engine gauges back at 0")


def test_a_workload_is_counted_as_it_happened(live: Live) -> None:
    from concurrent.futures import ThreadPoolExecutor

    before = _idle(live)
    engine = {**M, "engine": "local"}
    echo = live.oa.completions.create(model=MODEL, prompt="Echo me", n=2, echo=True, max_tokens=4,
                                      extra_body={"ignore_eos": True})
    one = [c for c in live.oa.completions.create(model=MODEL, prompt="Just one", max_tokens=1, stream=True,
                                                 stream_options={"include_usage": True})][-1]
    doc = "word " * 60
    cached = [live.oa.completions.create(model=MODEL, prompt=doc, max_tokens=2, extra_body={"ignore_eos": True})
              for _ in range(2)]
    with ThreadPoolExecutor(6) as pool:
        crowd = list(pool.map(lambda i: live.oa.completions.create(
            model=MODEL, prompt=f"{i} " + "x " * 60, max_tokens=80, extra_body={"ignore_eos": True}), range(6)))
    stream = iter(live.oa.completions.create(model=MODEL, prompt="Leave early", max_tokens=300, stream=True,
                                             extra_body={"ignore_eos": True}))
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    after = _idle(live)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    usages = [echo.usage, one.usage, *(c.usage for c in cached), *(c.usage for c in crowd)]
    assert all(u is not None for u in usages)
    assert delta("vllm:num_preemptions_total", **engine) > 0, "the crowd should have preempted requests"
    aborted_generated = delta("vllm:generation_tokens_total", **M) - sum(u.completion_tokens for u in usages)
    assert 1 <= aborted_generated < 300  # the recomputed tokens of the preempted requests are not counted again
    # each of the n=2 requests counts its prompt (usage counts it once); the aborted one's was prefilled too
    aborted_prompt = delta("vllm:prompt_tokens_total", **M) - sum(u.prompt_tokens for u in usages) - echo.usage.prompt_tokens
    assert aborted_prompt == len(prompt_ids(live, "Leave early"))
    assert delta("vllm:prefix_cache_queries_total", **engine) == delta("vllm:prompt_tokens_total", **M)
    assert delta("vllm:prefix_cache_hits_total", **engine) == sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert cached[1].usage.prompt_tokens_details.cached_tokens > 0
    requests = 2 + 1 + 2 + 6 + 1
    assert delta("vllm:request_success_total", finished_reason="length", **M) == requests - 1
    assert delta("vllm:request_success_total", finished_reason="abort", **M) == 1
    assert delta("vllm:request_success_total", finished_reason="stop", **M) == 0
    assert delta("vllm:time_to_first_token_seconds_count", **M) == requests
    assert delta("vllm:e2e_request_latency_seconds_count", **M) == requests
    assert delta("vllm:request_time_per_output_token_seconds_count", **M) == requests
    assert delta("vllm:inter_token_latency_seconds_count", **M) == delta("vllm:generation_tokens_total", **M) - requests
    assert delta("vllm:request_generation_tokens_sum", **M) == delta("vllm:generation_tokens_total", **M)
    assert delta("vllm:request_params_n_count", **M) == requests - 1  # the echo's two requests are one prompt


def prompt_ids(live: Live, prompt: str) -> list[int]:
    r = live.http.post("/tokenize", json={"model": MODEL, "prompt": prompt})
    assert r.status_code == 200, r.text
    return list(r.json()["tokens"])


# -- engine counters ----------------------------------------------------------------------------------------------


def _counting(started: float | None = None, *, switches: int, queried: int, decode_counts: list[int],
              busy: float) -> dict[str, Any]:
    stats: dict[str, Any] = dict(num_switches=switches, prefix_queried_tokens=queried, prefix_hit_tokens=queried // 2,
                                 num_preemptions=switches, iteration_counts={"decode": decode_counts},
                                 busy_seconds={"decode": busy}, num_switch_stalls=switches,
                                 switch_stall_seconds=busy / 100, tokens={"decode": sum(decode_counts)})
    if started is not None:
        stats["started"] = started
    return stats


def test_an_engine_that_could_not_be_read_exports_no_counters_rather_than_zeros() -> None:
    """The router reports a dead or silent actor as a load whose stats are only an `error`: its counters must not
    be exported as zeros (a reset to 0 that never happened, then a jump back when it answers again), only its
    health (0); an engine never read has no counter series; the engines that answer are exported as they are."""
    metrics = ServingMetrics("m")
    g0, g1 = {"model_name": "m", "engine": "g0"}, {"model_name": "m", "engine": "g1"}
    counts = [2] * 17
    metrics.update_loads([_load("g0", **_counting(switches=3, queried=80, decode_counts=counts, busy=1.0)),
                          _load("g1", **_counting(switches=2, queried=20, decode_counts=counts, busy=1.0))])
    assert metric(rendered(metrics), "semipd:sm_repartitions_total", **g0) == 3
    metrics.update_loads([EngineLoad("g0", healthy=False, stats={"error": "ActorDiedError"}),
                          _load("g1", **_counting(switches=2, queried=30, decode_counts=counts, busy=1.0)),
                          EngineLoad("g2", healthy=False, stats={"error": "no report"})])
    s = rendered(metrics)
    assert not any(dict(labels).get("engine") in ("g0", "g2") and name != "semipd:engine_healthy"
                   for name, labels in s)
    assert metric(s, "semipd:engine_healthy", **g0) == 0 and metric(s, "semipd:engine_healthy", model_name="m",
                                                                engine="g2") == 0
    assert metric(s, "vllm:prefix_cache_queries_total", **g1) == 30
    assert metric(s, "semipd:sm_repartitions_total", **g1) == 2

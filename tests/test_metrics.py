"""/metrics: vLLM's names, request counters and histograms, engine gauges, semipd's own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from actors.config import EngineConfig, SchedulerConfig
from actors.engine.durations import Durations
from actors.engine.frontend import StreamChunk
from cluster.engine_client import EngineLoad, LocalEngineClient
from cluster.metrics import ServingMetrics

from support import Samples, metric, openai_server, parse_metrics, wait_until

MODEL = "tiny"
class Live:
    def __init__(self, client: LocalEngineClient, url: str) -> None:
        self.client = client
        self.http = httpx.Client(base_url=url, timeout=60)
        self.oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def scrape(self) -> Samples:
        r = self.http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return parse_metrics(r.text)


@pytest.fixture(scope="module")
def live(tiny_llama: Path) -> Iterator[Live]:
    cfg = EngineConfig(model=str(tiny_llama), mode="semi-pd", scheduler=SchedulerConfig(max_model_len=512))
    with openai_server(cfg, MODEL) as (client, url):
        yield Live(client, url)


def test_request_counters_and_histograms(live: Live) -> None:
    before = live.scrape()
    m = {"model_name": MODEL}
    a = live.oa.completions.create(model=MODEL, prompt="Count me", max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True})
    chunks = list(live.oa.completions.create(model=MODEL, prompt="Count me too", max_tokens=7, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
    b_usage = chunks[-1].usage
    c = live.oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "and me"}], n=2,
                                        max_tokens=3, extra_body={"ignore_eos": True})
    stopped = live.oa.completions.create(model=MODEL, prompt="Stop", max_tokens=5,
                                         extra_body={"stop_token_ids": list(range(512))})
    after = live.scrape()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **m, **labels) - metric(before, name, **m, **labels)

    assert a.usage and b_usage and c.usage and stopped.usage
    engine_requests = 1 + 1 + 2 + 1
    assert delta("vllm:request_success_total", finished_reason="length") == 4
    assert delta("vllm:request_success_total", finished_reason="stop") == 1
    assert delta("vllm:request_success_total", finished_reason="abort") == 0
    # the chat's n=2 requests each count their prompt (as vLLM's engine does); usage counts it once
    prompt_tokens = a.usage.prompt_tokens + b_usage.prompt_tokens + 2 * c.usage.prompt_tokens + stopped.usage.prompt_tokens
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:generation_tokens_total") == 5 + 7 + 6 + 1
    assert delta("vllm:time_to_first_token_seconds_count") == engine_requests
    assert delta("vllm:e2e_request_latency_seconds_count") == engine_requests
    assert delta("vllm:inter_token_latency_seconds_count") == (5 - 1) + (7 - 1) + 2 * (3 - 1) + 0
    assert delta("vllm:e2e_request_latency_seconds_sum") >= delta("vllm:time_to_first_token_seconds_sum") > 0
    assert metric(after, "vllm:time_to_first_token_seconds_bucket", le="+Inf", **m) == metric(
        after, "vllm:time_to_first_token_seconds_count", **m)


def test_engine_gauges_follow_the_engine(live: Live) -> None:
    stream = iter(live.oa.completions.create(model=MODEL, prompt="Keep running", max_tokens=400, stream=True,
                                             extra_body={"ignore_eos": True}))
    next(stream)
    running = live.scrape()
    stream.close()  # type: ignore[attr-defined]
    m = {"model_name": MODEL}
    assert metric(running, "vllm:num_requests_running", **m) == 1
    assert metric(running, "vllm:num_requests_waiting", **m) == 0
    assert 0 < metric(running, "vllm:kv_cache_usage_perc", **m) <= 1
    engine = {"model_name": MODEL, "engine": "local"}
    assert metric(running, "semipd:queue_depth", phase="decode", **engine) + metric(
        running, "semipd:queue_depth", phase="prefill", **engine) == 1
    assert 0 <= metric(running, "semipd:prefill_sm_fraction", **engine) <= 1
    assert metric(running, "semipd:sm_repartitions_total", **engine) >= 0
    assert metric(running, "semipd:engine_healthy", **engine) == 1
    assert metric(running, "semipd:sm_switch_stall_seconds_count", **engine) >= 0
    assert metric(running, "semipd:worker_iteration_seconds_count", worker="decode", **engine) >= 1  # it is decoding

    def idle() -> bool:
        s = live.scrape()
        return metric(s, "vllm:num_requests_running", **m) == 0 and metric(s, "vllm:kv_cache_usage_perc", **m) == 0

    wait_until(idle, what="the gauges to show the aborted request gone")


def _load(engine_id: str, **stats: Any) -> EngineLoad:
    return EngineLoad(engine_id, stats=stats)


def test_engine_collector_aggregates_engines() -> None:
    metrics = ServingMetrics("m")
    metrics.update_loads([
        _load("g0", num_waiting=2, num_prefilling=1, num_decoding=5, kv_usage=0.5, num_pages=100, prefill_sms=64,
              total_sms=128, num_switches=3, num_switch_stalls=3, switch_stall_seconds=0.006,
              iterations={"prefill": 10, "decode": 400}, busy_seconds={"prefill": 1.5, "decode": 2.8},
              iteration_counts={"prefill": [0] * 10 + [10] + [0] * 6,
                                "decode": [0, 100, 250, 40, 10] + [0] * 12},
              cuda_mallocs=30, cuda_alloc_retries=2, cuda_frees=7, cuda_host_allocs=9, prefix_queried_tokens=5000,
              prefix_hit_tokens=1200,
              launch_parts={"decode": {"graph": 1.25, "sample": 0.5}}, paced_seconds={"decode": 0.75}),
        _load("g1", num_waiting=0, num_prefilling=0, num_decoding=1, kv_usage=0.1, num_pages=300, prefill_sms=32,
              total_sms=128, num_switches=0),
    ])
    s = parse_metrics(metrics.render()[0].decode())
    assert metric(s, "vllm:num_requests_running", model_name="m") == 7
    assert metric(s, "vllm:num_requests_waiting", model_name="m") == 2
    assert metric(s, "vllm:kv_cache_usage_perc", model_name="m") == pytest.approx((50 + 30) / 400)
    assert metric(s, "semipd:prefill_sm_fraction", model_name="m", engine="g1") == 0.25
    assert metric(s, "semipd:sm_repartitions_total", model_name="m", engine="g0") == 3
    assert metric(s, "semipd:sm_switch_stall_seconds_count", model_name="m", engine="g0") == 3
    assert metric(s, "semipd:sm_switch_stall_seconds_sum", model_name="m", engine="g0") == pytest.approx(0.006)
    assert metric(s, "semipd:queue_depth", model_name="m", engine="g0", phase="prefill") == 3
    assert metric(s, "semipd:queue_depth", model_name="m", engine="g0", phase="decode") == 5
    decode = {"model_name": "m", "engine": "g0", "worker": "decode"}
    assert metric(s, "semipd:worker_iteration_seconds_count", **decode) == 400
    assert metric(s, "semipd:worker_iteration_seconds_sum", **decode) == pytest.approx(2.8)
    assert metric(s, "semipd:worker_iteration_seconds_bucket", le="0.015", **decode) == 350  # cumulative
    assert metric(s, "semipd:worker_iteration_seconds_bucket", le="+Inf", **decode) == 400
    assert metric(s, "semipd:worker_iteration_seconds_bucket", le="0.1", worker="prefill", model_name="m", engine="g0") == 0
    assert not any(name.startswith("semipd:worker_iteration") and dict(labels).get("engine") == "g1" for name, labels in s)
    assert metric(s, "semipd:cuda_alloc_retries_total", model_name="m", engine="g0") == 2
    assert metric(s, "semipd:cuda_frees_total", model_name="m", engine="g0") == 7
    assert metric(s, "semipd:cuda_mallocs_total", model_name="m", engine="g0") == 30
    assert metric(s, "semipd:cuda_host_allocs_total", model_name="m", engine="g0") == 9
    assert not any(name.startswith("semipd:cuda_") and dict(labels).get("engine") == "g1" for name, labels in s)  # a CPU engine
    assert metric(s, "vllm:prefix_cache_queries_total", model_name="m", engine="g0") == 5000
    assert metric(s, "vllm:prefix_cache_hits_total", model_name="m", engine="g0") == 1200
    assert metric(s, "semipd:worker_launch_part_seconds_total", part="graph", **decode) == 1.25
    assert metric(s, "semipd:worker_paced_seconds_total", **decode) == 0.75  # --decode-pace-ms
    assert not any(name.startswith("semipd:worker_paced") and dict(labels).get("engine") == "g1" for name, labels in s)
    metrics.update_loads([])  # engines gone: per-engine series disappear, totals drop to 0
    s = parse_metrics(metrics.render()[0].decode())
    assert metric(s, "vllm:num_requests_running", model_name="m") == 0
    assert not any(name.startswith("semipd:queue_depth") for name, _ in s)


def test_durations_count_each_duration_in_the_bucket_at_or_above_it() -> None:
    times = Durations((0.01, 0.1))
    for seconds in (0.004, 0.01, 0.05, 0.1, 3.0):
        times.observe(seconds)
    assert times.counts == [2, 2, 1] and times.count == 5 and times.sum_s == pytest.approx(3.164)
    assert times.to_dict() == {"counts": [2, 2, 1], "sum": times.sum_s}
    times.observe(0.0)
    assert times.to_dict()["counts"] == [3, 2, 1]  # a snapshot, not the live list


def test_a_disagg_engines_handoff_histograms() -> None:
    from actors.disagg.engines import HANDOFF_BUCKETS_S

    transfer, handoff = Durations(HANDOFF_BUCKETS_S), Durations(HANDOFF_BUCKETS_S)
    for seconds in (0.0008, 0.003, 0.02):
        transfer.observe(seconds)
        handoff.observe(seconds + 1.5)  # waited for decode pages
    metrics = ServingMetrics("m")
    metrics.update_loads([_load("d0", kv_transfer_bytes=3 << 20, kv_transfer_seconds=transfer.to_dict(),
                                kv_handoff_seconds=handoff.to_dict()), _load("g1")])
    s = parse_metrics(metrics.render()[0].decode())
    d0 = {"model_name": "m", "engine": "d0"}
    assert metric(s, "semipd:kv_transfer_bytes_total", **d0) == 3 << 20
    assert metric(s, "semipd:kv_transfer_seconds_count", **d0) == 3
    assert metric(s, "semipd:kv_transfer_seconds_sum", **d0) == pytest.approx(0.0238)
    assert metric(s, "semipd:kv_transfer_seconds_bucket", le="0.001", **d0) == 1
    assert metric(s, "semipd:kv_transfer_seconds_bucket", le="0.005", **d0) == 2
    assert metric(s, "semipd:kv_handoff_seconds_bucket", le="1.0", **d0) == 0
    assert metric(s, "semipd:kv_handoff_seconds_bucket", le="2.5", **d0) == 3
    assert not any(name.startswith("semipd:kv_") and dict(labels).get("engine") == "g1" for name, labels in s)


def test_an_engines_admission_ratios_histogram() -> None:
    from actors.slo.admission import TTFT_RATIO_BOUNDS

    ratios = Durations(TTFT_RATIO_BOUNDS)
    for ratio in (0.6, 0.95, 1.05, 1.3):
        ratios.observe(ratio)
    metrics = ServingMetrics("m")
    metrics.update_loads([_load("g0", admission_ttft_ratio=ratios.to_dict()), _load("g1", admission_ttft_ratio={})])
    s = parse_metrics(metrics.render()[0].decode())
    g0 = {"model_name": "m", "engine": "g0"}
    assert metric(s, "semipd:admission_ttft_ratio_count", **g0) == 4
    assert metric(s, "semipd:admission_ttft_ratio_sum", **g0) == pytest.approx(3.9)
    assert metric(s, "semipd:admission_ttft_ratio_bucket", le="0.75", **g0) == 1
    assert metric(s, "semipd:admission_ttft_ratio_bucket", le="1.0", **g0) == 2
    assert metric(s, "semipd:admission_ttft_ratio_bucket", le="1.5", **g0) == 4
    assert not any(name.startswith("semipd:admission_") and dict(labels).get("engine") == "g1" for name, labels in s)


def test_each_app_has_its_own_registry() -> None:
    a, b = ServingMetrics("a"), ServingMetrics("b")  # no "Duplicated timeseries" from a shared registry
    tracker = a.track(arrival=time.monotonic() - 0.5)
    tracker.on_chunk(StreamChunk("r", "x", (1,), num_prompt_tokens=3))
    tracker.on_chunk(StreamChunk("r", "y", (2, 3), finish_reason="stop"))
    tracker.finish("abort")  # already finished: not counted again
    sa, sb = parse_metrics(a.render()[0].decode()), parse_metrics(b.render()[0].decode())
    assert metric(sa, "vllm:generation_tokens_total", model_name="a") == 3
    assert metric(sa, "vllm:prompt_tokens_total", model_name="a") == 3
    assert metric(sa, "vllm:inter_token_latency_seconds_count", model_name="a") == 2
    assert metric(sa, "vllm:request_success_total", model_name="a", finished_reason="stop") == 1
    assert metric(sa, "vllm:request_success_total", model_name="a", finished_reason="abort") == 0
    assert metric(sa, "vllm:time_to_first_token_seconds_sum", model_name="a") >= 0.5
    assert metric(sb, "vllm:generation_tokens_total", model_name="b") == 0

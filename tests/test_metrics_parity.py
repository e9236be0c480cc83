"""/metrics against vLLM v1's PrometheusStatLogger (vllm/v1/metrics/loggers.py): names, types, buckets and meaning
of the series that dashboards, alerts and autoscalers read.

vLLM's per-request histograms are observed once per finished engine request (`IterationStats.
update_from_finished_request`, vllm/v1/metrics/stats.py), the `n` and max-generation ones once per parent request
(all `n` children finished, `ParentRequest.observe_finished_request`, vllm/v1/engine/parallel_sampling.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.config import EngineConfig, SchedulerConfig
from actors.engine.frontend import StreamChunk
from actors.request import SamplingParams
from cluster import metrics as metrics_module
from cluster.engine_client import EngineLoad, GenerateRequest
from cluster.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, ServingMetrics

from support import Samples, metric, openai_server, parse_metrics

MODEL = "tiny"
MAX_MODEL_LEN = 512
# vLLM's buckets, as vllm/v1/metrics/loggers.py writes them
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
VLLM_REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                        240.0, 480.0, 960.0, 1920.0, 7680.0]
VLLM_N = [1, 2, 5, 10, 20]


def vllm_1_2_5(max_value: int) -> list[int]:
    """vLLM's `build_1_2_5_buckets`: 1, 2, 5, 10, 20, 50, ... while at most `max_value`."""
    out = []
    for exponent in itertools.count():
        for m in (1, 2, 5):
            if m * 10**exponent > max_value:
                return out
            out.append(m * 10**exponent)
    raise AssertionError


def types(text: str) -> dict[str, str]:
    return {fam.name: fam.type for fam in text_string_to_metric_families(text)}


def les(samples: Samples, name: str) -> list[float]:
    """A histogram's finite bucket bounds, ascending."""
    bounds = {dict(labels)["le"] for n, labels in samples if n == f"{name}_bucket"}
    return sorted(float(b) for b in bounds if b != "+Inf")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _request(rid: str, prompt_len: int, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def test_request_latency_buckets_are_vllms() -> None:
    assert list(TTFT_BUCKETS) == VLLM_TTFT
    assert list(ITL_BUCKETS) == VLLM_ITL
    assert list(E2E_BUCKETS) == VLLM_REQUEST_LATENCY


def test_per_request_histograms_as_vllm_observes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(metrics_module.time, "monotonic", clock)
    metrics = ServingMetrics("m", max_model_len=100)
    arrival = clock.now
    # one prompt with n=2 (children a0, a1), then another prompt of the same call with n=2 (b0, b1)
    reqs = [_request("a0", 4, 8), _request("a1", 4, 8), _request("b0", 30, 50), _request("b1", 30, 50)]
    a0, a1, b0, b1 = metrics.track_call(arrival, reqs, n=2)

    def at(t: float, tracker, chunk: StreamChunk) -> None:  # type: ignore[no-untyped-def]
        clock.now = arrival + t
        tracker.on_chunk(chunk)

    at(1.0, a0, StreamChunk("a0", "x", (1,), num_prompt_tokens=4))
    at(1.5, a0, StreamChunk("a0", "y", (2,)))
    at(2.0, a0, StreamChunk("a0", "z", (3,), finish_reason="length"))  # 3 tokens: decode 1.0 s, 0.5 s per token
    at(1.2, a1, StreamChunk("a1", "x", (1,), num_prompt_tokens=4, finish_reason="stop"))  # 1 token: decode 0
    s = parse_metrics(metrics.render()[0].decode())
    m = {"model_name": "m"}
    assert metric(s, "vllm:request_params_n_count", **m) == 1  # prompt a's both children finished
    assert metric(s, "vllm:request_params_n_sum", **m) == 2
    assert metric(s, "vllm:request_max_num_generation_tokens_sum", **m) == 3  # max over the children
    at(3.0, b0, StreamChunk("b0", "x", (1, 2), num_prompt_tokens=30))
    b0.finish("abort", arrival + 4.0)  # the client left
    b1.finish("abort", arrival + 4.0)  # ... before b1's first token
    text = metrics.render()[0].decode()
    s = parse_metrics(text)

    for name in ("vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_params_max_tokens",
                 "vllm:request_max_num_generation_tokens", "vllm:request_params_n", "vllm:request_decode_time_seconds",
                 "vllm:request_time_per_output_token_seconds"):
        assert types(text)[name] == "histogram", name
        assert metric(s, f"{name}_bucket", le="+Inf", **m) == metric(s, f"{name}_count", **m), name
    assert metric(s, "vllm:request_prompt_tokens_count", **m) == 4  # every finished request, aborted ones too
    assert metric(s, "vllm:request_prompt_tokens_sum", **m) == 4 + 4 + 30 + 30
    assert metric(s, "vllm:request_prompt_tokens_bucket", le="5.0", **m) == 2
    assert metric(s, "vllm:request_generation_tokens_sum", **m) == 3 + 1 + 2 + 0
    assert metric(s, "vllm:request_params_max_tokens_sum", **m) == 8 + 8 + 50 + 50
    assert metric(s, "vllm:request_max_num_generation_tokens_count", **m) == 2  # one per prompt (parent request)
    assert metric(s, "vllm:request_max_num_generation_tokens_sum", **m) == 3 + 2
    assert metric(s, "vllm:request_params_n_count", **m) == 2
    assert metric(s, "vllm:request_params_n_sum", **m) == 4
    # decode: first token to last token (0 with one token or none); per output token: decode / (tokens - 1), else 0
    assert metric(s, "vllm:request_decode_time_seconds_count", **m) == 4
    assert metric(s, "vllm:request_decode_time_seconds_sum", **m) == pytest.approx(1.0)
    assert metric(s, "vllm:request_time_per_output_token_seconds_count", **m) == 4
    assert metric(s, "vllm:request_time_per_output_token_seconds_sum", **m) == pytest.approx(0.5)
    assert metric(s, "vllm:request_time_per_output_token_seconds_bucket", le="0.5", **m) == 4
    assert metric(s, "vllm:request_time_per_output_token_seconds_bucket", le="0.4", **m) == 3

    for name in ("vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_params_max_tokens",
                 "vllm:request_max_num_generation_tokens"):
        assert les(s, name) == vllm_1_2_5(100), name
    assert les(s, "vllm:request_params_n") == VLLM_N
    assert les(s, "vllm:request_decode_time_seconds") == VLLM_REQUEST_LATENCY
    assert les(s, "vllm:request_time_per_output_token_seconds") == VLLM_ITL
    assert metric(s, "vllm:request_success_total", finished_reason="abort", **m) == 2


def test_a_plain_tracker_observes_what_it_knows(monkeypatch: pytest.MonkeyPatch) -> None:
    """`track()` (no request, no max_model_len): the timing histograms, and `n` = 1 as vLLM's parentless request."""
    clock = Clock()
    monkeypatch.setattr(metrics_module.time, "monotonic", clock)
    metrics = ServingMetrics("m", max_model_len=1000)
    tracker = metrics.track(clock.now - 0.5)
    tracker.on_chunk(StreamChunk("r", "x", (1,), num_prompt_tokens=3))
    clock.now += 0.3
    tracker.on_chunk(StreamChunk("r", "y", (2, 3), finish_reason="stop"))
    s = parse_metrics(metrics.render()[0].decode())
    m = {"model_name": "m"}
    assert metric(s, "vllm:request_decode_time_seconds_sum", **m) == pytest.approx(0.3)
    assert metric(s, "vllm:request_time_per_output_token_seconds_sum", **m) == pytest.approx(0.15)
    assert metric(s, "vllm:request_params_n_sum", **m) == 1
    assert metric(s, "vllm:request_prompt_tokens_sum", **m) == 3
    assert metric(s, "vllm:request_generation_tokens_sum", **m) == 3
    assert metric(s, "vllm:request_max_num_generation_tokens_sum", **m) == 3
    assert metric(s, "vllm:request_params_max_tokens_count", **m) == 0  # unknown without the request
    assert les(s, "vllm:request_prompt_tokens") == vllm_1_2_5(1000)


class Live:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        self.oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def scrape(self) -> tuple[Samples, str]:
        r = self.http.get("/metrics")
        assert r.status_code == 200
        return parse_metrics(r.text), r.text


@pytest.fixture(scope="module")
def live(tiny_llama: Path) -> Iterator[Live]:
    cfg = EngineConfig(model=str(tiny_llama), mode="semi-pd", scheduler=SchedulerConfig(max_model_len=MAX_MODEL_LEN))
    with openai_server(cfg, MODEL) as (_, url):
        yield Live(url)


def test_the_server_feeds_the_per_request_histograms(live: Live) -> None:
    before, _ = live.scrape()
    m = {"model_name": MODEL}
    a = live.oa.completions.create(model=MODEL, prompt="Count me", max_tokens=5, n=2, temperature=0.8,
                                   extra_body={"ignore_eos": True})
    c = live.oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "and me"}], max_tokens=3,
                                        extra_body={"ignore_eos": True})
    after, text = live.scrape()

    def delta(name: str) -> float:  # the token histograms appear with the first request (max_model_len known)
        return metric(after, name, **m) - before.get((name, tuple(sorted(m.items()))), 0.0)

    assert a.usage and c.usage
    assert delta("vllm:request_params_n_count") == 2  # two parent requests: the completion (n=2) and the chat
    assert delta("vllm:request_params_n_sum") == 2 + 1
    assert delta("vllm:request_max_num_generation_tokens_count") == 2
    assert delta("vllm:request_max_num_generation_tokens_sum") == 5 + 3
    assert delta("vllm:request_prompt_tokens_count") == 3  # engine requests
    assert delta("vllm:request_prompt_tokens_sum") == 2 * a.usage.prompt_tokens + c.usage.prompt_tokens
    assert delta("vllm:request_generation_tokens_sum") == 5 + 5 + 3
    assert delta("vllm:request_params_max_tokens_sum") == 5 + 5 + 3
    assert delta("vllm:request_decode_time_seconds_count") == 3
    assert delta("vllm:request_time_per_output_token_seconds_count") == 3
    assert delta("vllm:request_decode_time_seconds_sum") > 0
    assert les(after, "vllm:request_prompt_tokens") == vllm_1_2_5(MAX_MODEL_LEN)  # from the served max_model_len
    assert types(text)["vllm:request_generation_tokens"] == "histogram"


def test_engines_that_cannot_be_read_export_no_engine_series() -> None:
    """A scrape whose `loads()` failed leaves the engine series out: "0 requests waiting" would tell an autoscaler
    to scale down exactly when the engines are too busy to answer. The request series stay."""
    metrics = ServingMetrics("m")
    metrics.update_loads([EngineLoad("g0", stats={"num_waiting": 7})])
    assert 'vllm:num_requests_waiting{model_name="m"} 7.0' in metrics.render()[0].decode()
    metrics.update_loads(None)
    text = metrics.render()[0].decode()
    assert "vllm:num_requests_waiting{" not in text and "vllm:time_to_first_token_seconds_count" in text


def test_preemptions_are_vllms_counter_per_engine(tiny_llama: Path) -> None:
    """`vllm:num_preemptions_total{engine}`: the engine's own count, from its stats (a pool of 8 pages for three
    requests that each grow to 4 preempts at least one)."""
    from actors.config import CacheConfig
    from actors.engine.frontend import LLM

    with LLM(tiny_llama, device="cpu", cache=CacheConfig(page_size=4, num_pages=8)) as llm:
        llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        stats = llm.core.stats()
    assert stats.num_preemptions == llm.core.num_preemptions > 0
    metrics = ServingMetrics("m")
    metrics.update_loads([EngineLoad("g0", stats={"num_preemptions": stats.num_preemptions})])
    assert f'vllm:num_preemptions_total{{engine="g0",model_name="m"}} {float(stats.num_preemptions)}' in (
        metrics.render()[0].decode())

"""Prometheus metrics of the API servers, under vLLM's names (plus semipd's own).

vLLM's names and their `model_name` label let existing dashboards, llm-d and Ray's
autoscaling read us unchanged. Two kinds of series:

- request series (histograms and counters) that the API observes as it streams:
  `vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`,
  `vllm:e2e_request_latency_seconds`, `vllm:prompt_tokens_total`,
  `vllm:generation_tokens_total`, `vllm:request_success_total{finished_reason}`, and per finished engine
  request, as vLLM's `IterationStats.update_from_finished_request`: `vllm:request_decode_time_seconds` (first
  token to last), `vllm:request_time_per_output_token_seconds` (that over the tokens after the first),
  `vllm:request_prompt_tokens`, `vllm:request_generation_tokens`, `vllm:request_params_max_tokens`; per
  prompt once its `n` requests finished (vLLM's parent request): `vllm:request_params_n`,
  `vllm:request_max_num_generation_tokens`. The token histograms' buckets are vLLM's 1-2-5 series up to
  max_model_len, so they exist when the metrics are made with it (`ServingMetrics(max_model_len=)`).
  Not exported, for the API cannot see when an engine first scheduled a request:
  `vllm:request_queue_time_seconds`, `vllm:request_prefill_time_seconds`, `vllm:request_inference_time_seconds`;
- engine series, read at scrape time from the latest `EngineClient.loads()` snapshot
  by a custom collector: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
  `vllm:kv_cache_usage_perc`, per engine `vllm:prefix_cache_queries_total` and
  `vllm:prefix_cache_hits_total` (prompt tokens at admission, and those served from the
  prefix cache), and `semipd:prefill_sm_fraction`,
  `semipd:sm_repartitions_total`, `semipd:sm_switch_stall_seconds`,
  `semipd:queue_depth{phase}`, `semipd:engine_healthy`, and per disagg engine
  `semipd:kv_transfer_bytes_total` (KV moved from its prefill to its decode engine),
  `semipd:kv_transfer_seconds` and `semipd:kv_handoff_seconds` (how long each request took to get there), and
  per engine with admission control `semipd:admission_ttft_ratio` (each admitted request's TTFT over the TTFT
  admission predicted for it: how much room `--admission-slack` needs).
  An engine that could not be read (dead, not answering) shows only in `semipd:engine_healthy` (0): its counters
  are left out, not exported as zeros, which would read as a reset and as an idle engine. An engine that starts
  again counts from 0, a reset that Prometheus' `rate()` and `increase()` take in their stride.

Every `ServingMetrics` has its own `CollectorRegistry`: nothing touches the global one.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric, SummaryMetricFamily,
)

from actors.disagg.engines import HANDOFF_BUCKETS_S
from actors.engine.frontend import StreamChunk
from actors.engine.workers import ITERATION_BUCKETS_S
from actors.slo.admission import TTFT_RATIO_BOUNDS
from cluster.engine_client import EngineLoad, GenerateRequest

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that dashboards' quantiles line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort", "error")
N_BUCKETS = (1, 2, 5, 10, 20)  # vllm:request_params_n


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's buckets of token counts: 1, 2, 5, 10, 20, 50, ... while at most `max_value`."""
    buckets: list[int] = []
    for exponent in itertools.count():
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
    raise AssertionError("unreachable")


class EngineCollector:
    """Engine gauges from the last `loads()` snapshot (refreshed by the scrape handler). None: the engines could not
    be read, so no engine series is exported (an autoscaler must not read "nothing waiting" from a failed read)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._loads: list[EngineLoad] | None = []
        self._lock = threading.Lock()

    def update(self, loads: Sequence[EngineLoad] | None) -> None:
        with self._lock:
            self._loads = None if loads is None else list(loads)

    def describe(self) -> list[Metric]:
        return []  # the families depend on the snapshot; collected only at scrape time

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._loads is None:
                return
            everyone = list(self._loads)
        loads = [l for l in everyone if "error" not in l.stats]  # an engine that could not be read reports nothing:
        # zeros would read as a counter reset, and as an idle engine
        m = [self.model_name]
        yield _gauge("vllm:num_requests_running", "Requests in model execution batches (prefill or decode).",
                     ["model_name"], [(m, sum(_stat(l, "num_prefilling") + _stat(l, "num_decoding") for l in loads))])
        yield _gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.",
                     ["model_name"], [(m, sum(_stat(l, "num_waiting") for l in loads))])
        yield _gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent (page-weighted over engines).",
                     ["model_name"], [(m, _kv_usage(loads))])
        per_engine = ["model_name", "engine"]
        yield _gauge("semipd:prefill_sm_fraction", "Fraction of the GPU's SMs given to prefill.", per_engine,
                     [([*m, l.engine_id], _sm_fraction(l)) for l in loads])
        yield _gauge("semipd:engine_healthy", "1 when the engine is healthy and not draining.", per_engine,
                     [([*m, l.engine_id], float(l.healthy and not l.draining)) for l in everyone])
        reparts = CounterMetricFamily("semipd:sm_repartitions", "SM split changes since the engine started.",
                                      labels=per_engine)
        for l in loads:
            reparts.add_metric([*m, l.engine_id], _stat(l, "num_switches"))
        yield reparts
        for name, key, doc in (
            ("vllm:prefix_cache_queries", "prefix_queried_tokens",
             "Prefix cache queries, in prompt tokens of the requests admitted."),
            ("vllm:prefix_cache_hits", "prefix_hit_tokens", "Prefix cache hits, in prompt tokens served from the cache."),
            ("semipd:cuda_mallocs", "cuda_mallocs",
             "cudaMalloc calls of the engine's process (torch's cache growing, per stream)."),
            ("semipd:cuda_alloc_retries", "cuda_alloc_retries",
             "cudaMalloc calls of the engine's process that failed and were retried after freeing torch's cache."),
            ("semipd:cuda_frees", "cuda_frees",
             "cudaFree calls of the engine's process; each synchronizes the whole device."),
            ("semipd:cuda_host_allocs", "cuda_host_allocs",
             "cudaHostAlloc calls of the engine's process (torch's pinned host allocator growing)."),
            ("semipd:kv_transfer_bytes", "kv_transfer_bytes",
             "KV bytes a disagg engine moved from its prefill engine to its decode engine."),
            ("vllm:num_preemptions", "num_preemptions",
             "Requests preempted (their KV pages released, to be recomputed) since the engine started."),
        ):
            family = CounterMetricFamily(name, doc, labels=per_engine)
            for l in loads:
                if key in l.stats:
                    family.add_metric([*m, l.engine_id], _stat(l, key))
            yield family
        stalls = SummaryMetricFamily("semipd:sm_switch_stall_seconds",
                                     "Time from an SM split request to the workers adopting it.", labels=per_engine)
        for l in loads:
            if "num_switch_stalls" in l.stats:
                stalls.add_metric([*m, l.engine_id], count_value=_stat(l, "num_switch_stalls"),
                                  sum_value=_stat(l, "switch_stall_seconds"))
        yield stalls
        iterations = HistogramMetricFamily(
            "semipd:worker_iteration_seconds",
            "Wall time of each worker's iterations (prefill, decode or unified), host work included.",
            labels=[*per_engine, "worker"])
        for l in loads:
            busy = l.stats.get("busy_seconds") or {}
            for worker, counts in (l.stats.get("iteration_counts") or {}).items():
                iterations.add_metric([*m, l.engine_id, worker], buckets=_buckets(counts, ITERATION_BUCKETS_S),
                                      sum_value=float(busy.get(worker, 0.0)))
        yield iterations
        for name, key, doc in (
            ("semipd:kv_transfer_seconds", "kv_transfer_seconds",
             "Disagg engines: time from a prefill's first token until its KV reached the decode engine's device."),
            ("semipd:kv_handoff_seconds", "kv_handoff_seconds",
             "Disagg engines: time from a prefill's first token until the request joined the decode batch "
             "(transfer, waiting for decode pages, copy into them)."),
        ):
            handoffs = HistogramMetricFamily(name, doc, labels=per_engine)
            for l in loads:
                times = l.stats.get(key)
                if times:
                    handoffs.add_metric([*m, l.engine_id], buckets=_buckets(times["counts"], HANDOFF_BUCKETS_S),
                                        sum_value=float(times["sum"]))
            yield handoffs
        ratios = HistogramMetricFamily(
            "semipd:admission_ttft_ratio",
            "Admission control: each request admitted at its own priority, its time to first token in the engine "
            "over the one admission predicted for it (past 1 / --admission-slack: admitted, then late).",
            labels=per_engine)
        for l in loads:
            ratio = l.stats.get("admission_ttft_ratio")
            if ratio:
                ratios.add_metric([*m, l.engine_id], buckets=_buckets(ratio["counts"], TTFT_RATIO_BOUNDS),
                                  sum_value=float(ratio["sum"]))
        yield ratios
        for name, key, doc in (
            ("semipd:worker_tokens", "tokens", "Tokens each worker computed (prefill chunk tokens, one per decode)."),
            ("semipd:worker_launch_seconds", "launch_seconds",
             "Host time each worker spent queueing its iterations on the device (within its iteration time)."),
            ("semipd:worker_paced_seconds", "paced_seconds",
             "Time a paced worker (semi-PD decode with --decode-pace-ms) waited for its pace (within its iteration time)."),
        ):
            family = CounterMetricFamily(name, doc, labels=[*per_engine, "worker"])
            for l in loads:
                for worker, value in (l.stats.get(key) or {}).items():
                    family.add_metric([*m, l.engine_id, worker], float(value))
            yield family
        parts = CounterMetricFamily(
            "semipd:worker_launch_part_seconds",
            "Host time queueing each worker's iterations, by part: prepare (inputs), plan (attention), "
            "forward (kernel launches), graph (CUDA-graph decode steps), sample.", labels=[*per_engine, "worker", "part"])
        for l in loads:
            for worker, by_part in (l.stats.get("launch_parts") or {}).items():
                for part, value in by_part.items():
                    parts.add_metric([*m, l.engine_id, worker, part], float(value))
        yield parts
        depth = GaugeMetricFamily("semipd:queue_depth", "Requests queued for or in each phase.",
                                  labels=[*per_engine, "phase"])
        for l in loads:
            depth.add_metric([*m, l.engine_id, "prefill"], _stat(l, "num_waiting") + _stat(l, "num_prefilling"))
            depth.add_metric([*m, l.engine_id, "decode"], _stat(l, "num_decoding"))
        yield depth


def _gauge(name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for values, v in samples:
        g.add_metric(values, v)
    return g


def _buckets(counts: Sequence[int], bounds_s: Sequence[float]) -> list[tuple[str, float]]:
    """A histogram's (le, cumulative count) pairs from counts per bucket of `bounds_s` plus one for longer."""
    assert len(counts) == len(bounds_s) + 1, "one count per bucket, and one for longer"
    return list(zip([*(repr(b) for b in bounds_s), "+Inf"], map(float, itertools.accumulate(counts))))


def _stat(load: EngineLoad, key: str) -> float:
    v: Any = load.stats.get(key, 0)
    return float(v) if isinstance(v, (int, float)) else 0.0


def _kv_usage(loads: Sequence[EngineLoad]) -> float:
    pages = sum(_stat(l, "num_pages") for l in loads)
    if pages <= 0:
        return 0.0
    return sum(_stat(l, "kv_usage") * _stat(l, "num_pages") for l in loads) / pages


def _sm_fraction(load: EngineLoad) -> float:
    total = _stat(load, "total_sms")
    return _stat(load, "prefill_sms") / total if total > 0 else 0.0


class ServingMetrics:
    """All metrics of one API server, in a registry of its own; `render()` for /metrics."""

    def __init__(self, model_name: str, max_model_len: int | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        reg = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token, from arrival at the API.",
                              labels, buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency from arrival to its last token.",
                             labels, buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        self.decode_time = Histogram(
            "vllm:request_decode_time_seconds", "Time from a request's first output token to its last.",
            labels, buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        self.request_tpot = Histogram(
            "vllm:request_time_per_output_token_seconds",
            "Per request: its decode time over its output tokens after the first (0 with fewer than 2).",
            labels, buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.params_n = Histogram("vllm:request_params_n", "The n request parameter, once per prompt.",
                                  labels, buckets=N_BUCKETS, registry=reg).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=reg).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels,
                                         registry=reg).labels(model_name)
        success = Counter("vllm:request_success", "Finished requests by finish reason.",
                          ["model_name", "finished_reason"], registry=reg)
        self.success = {r: success.labels(model_name, r) for r in FINISHED_REASONS}
        # buckets up to max_model_len: without it (a metrics object not bound to a model), no token histograms
        self.tokens = TokenHistograms(reg, model_name, build_1_2_5_buckets(max_model_len)) if max_model_len else None
        self.engines = EngineCollector(model_name)
        reg.register(self.engines)

    def update_loads(self, loads: Sequence[EngineLoad] | None) -> None:
        """The engines' latest loads; None when they could not be read (their series are then left out)."""
        self.engines.update(loads)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def track(self, arrival: float | None = None, request: GenerateRequest | None = None) -> RequestTracker:
        """A tracker for one engine request that arrived at `arrival` (time.monotonic()), a prompt of its own
        (n = 1)."""
        return RequestTracker(self, time.monotonic() if arrival is None else arrival, request, _Prompt(self, 1))

    def track_call(self, arrival: float, requests: Sequence[GenerateRequest], n: int = 1) -> list[RequestTracker]:
        """Trackers for the engine requests of one API call that arrived at `arrival`: each prompt's `n` requests
        in a row (as `Call.requests`)."""
        n = max(1, n)
        trackers: list[RequestTracker] = []
        for start in range(0, len(requests), n):
            children = requests[start:start + n]
            prompt = _Prompt(self, len(children))
            trackers.extend(RequestTracker(self, arrival, r, prompt) for r in children)
        return trackers


class TokenHistograms:
    """vLLM's histograms of token counts, bucketed 1-2-5 up to max_model_len."""

    def __init__(self, registry: CollectorRegistry, model_name: str, buckets: Sequence[int]) -> None:
        def histogram(name: str, doc: str) -> Any:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=registry).labels(model_name)

        self.prompt = histogram("vllm:request_prompt_tokens", "Prompt tokens of each finished request.")
        self.generation = histogram("vllm:request_generation_tokens", "Tokens generated by each finished request.")
        self.max_tokens = histogram("vllm:request_params_max_tokens", "The max_tokens of each finished request.")
        self.max_generation = histogram(
            "vllm:request_max_num_generation_tokens",
            "Per prompt: the most tokens any of its n requests generated, once all finished.")


class _Prompt:
    """One prompt's n engine requests (vLLM's parent request): observed once the last finishes."""

    def __init__(self, metrics: ServingMetrics, n: int) -> None:
        self.metrics = metrics
        self.n = n
        self.unfinished = n
        self.max_generation_tokens = 0

    def finished(self, generation_tokens: int) -> None:
        self.max_generation_tokens = max(self.max_generation_tokens, generation_tokens)
        self.unfinished -= 1
        if self.unfinished == 0:
            self.metrics.params_n.observe(self.n)
            if self.metrics.tokens is not None:
                self.metrics.tokens.max_generation.observe(self.max_generation_tokens)


class RequestTracker:
    """Observes one request's chunks: TTFT, inter-token latency, tokens, finish."""

    def __init__(self, metrics: ServingMetrics, arrival: float, request: GenerateRequest | None = None,
                 prompt: _Prompt | None = None) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.request = request
        self.prompt = prompt or _Prompt(metrics, 1)
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_prompt_tokens: int | None = None
        self.num_generation_tokens = 0
        self.prompt_counted = False
        self.finished = False

    def on_chunk(self, chunk: StreamChunk) -> None:
        if self.finished:
            return
        now = time.monotonic()
        m = self.metrics
        if not self.prompt_counted and chunk.num_prompt_tokens:
            m.prompt_tokens.inc(chunk.num_prompt_tokens)
            self.num_prompt_tokens = chunk.num_prompt_tokens
            self.prompt_counted = True
        n = len(chunk.token_ids)
        if n:
            if self.last_token_time is None:
                m.ttft.observe(now - self.arrival)
                self.first_token_time = now
                gaps = [0.0] * (n - 1)  # the tokens that came with the first one, at once
            else:
                gaps = [(now - self.last_token_time) / n] * n
            for gap in gaps:
                m.itl.observe(gap)
            self.last_token_time = now
            self.num_generation_tokens += n
            m.generation_tokens.inc(n)
        if chunk.finish_reason is not None:
            self.finish(chunk.finish_reason, now)

    def finish(self, reason: str, now: float | None = None) -> None:
        """Count the request as finished (idempotent); `abort` when the client left."""
        if self.finished:
            return
        self.finished = True
        now = time.monotonic() if now is None else now
        m = self.metrics
        m.e2e.observe(now - self.arrival)
        counter = m.success.get(reason)
        if counter is not None:
            counter.inc()
        # as vLLM: decode from the first token to the last (0 without a second), and its mean over the tokens after
        # the first (0 without a second)
        decode = (self.last_token_time - self.first_token_time
                  if self.first_token_time is not None and self.last_token_time is not None else 0.0)
        m.decode_time.observe(decode)
        gen = self.num_generation_tokens
        m.request_tpot.observe(decode / (gen - 1) if gen > 1 else 0.0)
        tokens = m.tokens
        if tokens is not None:
            prompt = self.num_prompt_tokens
            if prompt is None and self.request is not None:  # finished before its first chunk
                prompt = len(self.request.prompt_token_ids)
            if prompt is not None:
                tokens.prompt.observe(prompt)
            tokens.generation.observe(gen)
            if self.request is not None:
                tokens.max_tokens.observe(self.request.params.max_tokens)
        self.prompt.finished(gen)

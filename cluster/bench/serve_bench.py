"""`semipd bench serve`: open-loop load against an OpenAI-compatible server.

`run_serve_bench(config)` resolves the model (first of `/v1/models` when not given),
builds the workload's requests once (exact prompt lengths with a tokenizer: `tokenizer`, else the model's
directory, else, as vLLM takes it, the `root` directory `/v1/models` gives for the model; without one calibrated
through the server's `/tokenize`, else about one token per word), then for
each request rate of the sweep (or the one ramp of rates): reads the server's `/metrics`, sends every request at
its arrival time (Poisson or gamma; a semaphore for `max_concurrency`), waits for all
of them (each bounded by the request timeout), reads `/metrics` again, prints vLLM's
result block and writes the JSON. Every rate replays the same requests. With a `structured_output`
every request asks for it and the result adds the share of outputs that conform (vLLM's correct rate).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import numpy as np

from cluster.bench.arrivals import ArrivalConfig, RampUp, arrival_offsets, rps_change_events
from cluster.bench.client import (
    EndpointConfig, RequestRecord, ServerError, count_tokens, fetch_models, fetch_server_metrics, fetch_splits,
    send_request,
)
from cluster.bench.datasets import dataset_requests
from cluster.bench.metrics import METRICS, Conformance, SLOs, compute_metrics
from cluster.bench.report import (
    format_admission_ratios, format_cuda_allocator, format_failures, format_kv_handoffs, format_offered_load,
    format_preamble, format_prefix_cache, format_profile_breakdown, format_result_block, format_split_changes,
    format_worker_iterations,
)
from cluster.bench.result import BenchResult, write_result
from cluster.bench.structured import StructuredOutput
from cluster.bench.workloads import (
    BenchRequest, PromptBuilder, RatioPromptBuilder, TokenizerPromptBuilder, WorkloadConfig, build_requests,
    random_words,
)


# the server series read before and after each rate: semipd's own, and the prefix cache counters that
# semipd and vLLM both export (a run whose prompts hit the cache measures less prefill than it seems to)
SERVER_METRIC_PREFIXES = ("semipd:", "vllm:prefix_cache_")


@dataclass(frozen=True)
class ServeBenchConfig:
    """Everything one `semipd bench serve` invocation needs (validated on construction).

    `model` None: the first model the server lists. `tokenizer`: a local HF tokenizer
    directory for exact prompt lengths. `request_rates`: a sweep, run in order (math.inf:
    all requests at once). `ramp_up`: vLLM's ramp of rates instead (request_rates then (math.inf,)).
    Results are written when `save_result`, `result_dir` or
    `result_filename` is set; `result_filename` may hold `{rate}`. `structured_output`: what every output
    must match (None: plain requests). `commit` and `command`: the commit and the command line that made the
    run, written at the top of each result (the CLI fills them in; the device goes in `metadata`).
    """

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    tokenizer: str | None = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    request_rates: tuple[float, ...] = (math.inf,)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    slos: SLOs = field(default_factory=SLOs)
    percentile_metrics: tuple[str, ...] = METRICS
    metric_percentiles: tuple[float, ...] = (90.0, 99.0)
    ignore_eos: bool = True
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    label: str | None = None
    save_result: bool = False
    result_dir: str | None = None
    result_filename: str | None = None
    server_metric_prefixes: tuple[str, ...] = SERVER_METRIC_PREFIXES
    disable_tqdm: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)
    structured_output: StructuredOutput | None = None
    ramp_up: RampUp | None = None
    commit: str = ""
    command: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "request_rates", tuple(float(r) for r in self.request_rates))
        if not self.request_rates:
            raise ValueError("give at least one request rate")
        if self.model is not None and not self.model:
            raise ValueError("model name must not be empty")
        for rate in self.request_rates:
            ArrivalConfig(rate, self.burstiness, self.workload.seed, self.ramp_up)  # validates
        if self.ramp_up is not None and len(self.request_rates) > 1:
            raise ValueError("a ramp-up sets the request rate: do not give --request-rate with it")
        if self.ramp_up is not None and not bool(np.all(self.workload.rate_scales() == 1.0)):
            raise ValueError("a ramp-up cannot be combined with phases at their own rates (--phases NAME@SCALE)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be at least 1, got {self.max_concurrency}")
        bad = [m for m in self.percentile_metrics if m not in METRICS]
        if bad:
            raise ValueError(f"unknown percentile metrics {bad}; choose from {', '.join(METRICS)}")
        if not all(0 < p <= 100 for p in self.metric_percentiles):
            raise ValueError(f"metric percentiles must be in (0, 100], got {self.metric_percentiles}")
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ValueError(f"request timeout must be positive, got {self.request_timeout_s}")
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {self.tokenizer}")
        EndpointConfig(self.base_url, self.model or "-", self.endpoint, timeout_s=self.request_timeout_s,
                       temperature=self.temperature)  # validates URL, endpoint, temperature

    @property
    def writes_results(self) -> bool:
        return self.save_result or self.result_dir is not None or self.result_filename is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["api_key"] = "***" if self.api_key else None
        data["slos"] = self.slos.as_dict()
        data["structured_output"] = self.structured_output.to_dict() if self.structured_output else None
        return data


# ---------------------------------------------------------------- set-up


def _has_tokenizer(path: str) -> bool:
    d = Path(path)
    return d.is_dir() and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file())


def tokenizer_dir(config: ServeBenchConfig, model: str, card: dict[str, Any]) -> str | None:
    """The local tokenizer directory: `--tokenizer`, else the model name, else (vLLM's tokenizer of a model it
    did not name) the `root` of the model's `/v1/models` card, where either is a local tokenizer directory."""
    if config.tokenizer:
        return config.tokenizer
    root = card.get("root")
    return next((d for d in (model, root) if isinstance(d, str) and _has_tokenizer(d)), None)


async def make_prompt_builder(client: aiohttp.ClientSession, config: ServeBenchConfig, model: str, tok_dir: str | None,
                              out: TextIO) -> PromptBuilder:
    """Exact with the local tokenizer `tok_dir`; else calibrated by the server's /tokenize; else 1 token/word."""
    if tok_dir is not None:
        return TokenizerPromptBuilder.from_dir(tok_dir)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    words = 400
    sample = random_words(np.random.default_rng([config.workload.seed, 9]), words)
    full = await count_tokens(client, config.base_url, model, sample, headers)
    empty = await count_tokens(client, config.base_url, model, "", headers)
    if full is None or empty is None or full <= empty:
        print("note: no --tokenizer and no /tokenize on the server: prompt lengths are approximate "
              "(1 token per word); input token totals use the server's usage when it reports them", file=out)
        return RatioPromptBuilder(1.0, 0)
    return RatioPromptBuilder((full - empty) / words, empty)


async def resolve_model(client: aiohttp.ClientSession, config: ServeBenchConfig) -> tuple[str, dict[str, Any]]:
    """The model name to send, and its `/v1/models` card ({} when the server lists none by that name)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    if config.model is not None:
        try:
            cards = await fetch_models(client, config.base_url, headers)
        except ServerError:  # /v1/models is optional when the model is given
            return config.model, {}
        return config.model, next((c for c in cards if c.get("id") == config.model), {})
    cards = await fetch_models(client, config.base_url, headers)
    return str(cards[0]["id"]), cards[0]


def result_path(config: ServeBenchConfig, model: str, rate: float, date: str) -> Path:
    """Where a run's JSON goes (vLLM-like default name, a ramp's as vLLM names it; `{rate}` or a suffix in a
    sweep)."""
    rate_text = "inf" if math.isinf(rate) else f"{rate:g}"
    ramp = config.ramp_up
    if ramp is not None:
        rate_text = f"ramp-up-{ramp.strategy}-{ramp.start_rps:g}qps-{ramp.end_rps:g}"
    if config.result_filename:
        name = config.result_filename
        if "{rate}" in name:
            name = name.replace("{rate}", rate_text)
        elif len(config.request_rates) > 1:
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}-{rate_text}qps.{ext}" if dot else f"{name}-{rate_text}qps"
    else:
        conc = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
        base = model.rstrip("/").split("/")[-1]
        tag = (config.label or "semipd").replace("/", "_").replace(" ", "_")
        name = f"{tag}-{config.workload.name}-{rate_text}qps{conc}-{base}-{date}.json"
    return Path(config.result_dir or ".") / name


# ---------------------------------------------------------------- running


async def run_rate(client: aiohttp.ClientSession, endpoint: EndpointConfig, requests: Sequence[BenchRequest],
                   offsets: Sequence[float], max_concurrency: int | None, disable_tqdm: bool = False,
                   desc: str = "") -> tuple[list[RequestRecord], float]:
    """Send each request at its offset (open loop) and wait for all; (records, duration s)."""
    from tqdm import tqdm

    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc=desc, unit="req")
    t0 = time.perf_counter()

    async def one(request: BenchRequest, offset: float) -> RequestRecord:
        if sem is None:
            record = await send_request(client, endpoint, request, t0, offset)
        else:
            async with sem:
                record = await send_request(client, endpoint, request, t0, offset)
        bar.update(1)
        return record

    tasks: list[asyncio.Task[RequestRecord]] = []
    try:
        for request, offset in zip(requests, offsets):
            delay = t0 + float(offset) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule itself
            tasks.append(asyncio.create_task(one(request, float(offset))))
        records = list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        bar.close()
    return records, time.perf_counter() - t0


def _delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    if before is None and after is None:
        return None
    before, after = before or {}, after or {}
    return {"before": before, "after": after,
            "delta": {k: after[k] - before[k] for k in after if k in before}}


def _session(config: ServeBenchConfig) -> aiohttp.ClientSession:
    """The run's one HTTP session: at most `max_concurrency` connections (no limit without one), no wait limit for
    a free connection, `min(30 s, request timeout)` to connect and the request timeout for each read (the whole
    request is bounded by `send_request`). No proxy from the environment (httpx took one): the requests go straight
    to the server, and no `~/.netrc` is read for each (aiohttp's `trust_env` does both)."""
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=min(30.0, config.request_timeout_s),
                                    sock_read=config.request_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def _run(config: ServeBenchConfig, out: TextIO) -> list[BenchResult]:
    async with _session(config) as client:
        model, card = await resolve_model(client, config)
        tok_dir = tokenizer_dir(config, model, card)
        builder = await make_prompt_builder(client, config, model, tok_dir, out)
        endpoint = EndpointConfig(config.base_url, model, config.endpoint, config.api_key, config.ignore_eos,
                                  config.temperature, config.request_timeout_s, dict(config.extra_body),
                                  config.structured_output, _output_token_counter(builder))
        if config.structured_output is not None:
            print(f"Structured outputs: {json.dumps(config.structured_output.body())}", file=out)
        results = []
        for run, rate in enumerate(config.request_rates):
            requests = _build_requests(replace(config.workload, run=run), builder, card.get("max_model_len"), out)
            results.append(await _run_one_rate(client, config, endpoint, tok_dir, requests, rate, out))
        return results


def _output_token_counter(builder: PromptBuilder) -> Callable[[str], int] | None:
    """The tokens of a generated text by the benchmark's tokenizer, as vLLM counts a stream's output without usage
    (None without a tokenizer: the chunks are counted)."""
    if not isinstance(builder, TokenizerPromptBuilder):
        return None
    tokenizer = builder.tokenizer
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def _build_requests(wl: WorkloadConfig, builder: PromptBuilder, max_model_len: int | None,
                    out: TextIO) -> list[BenchRequest]:
    source = f" from {wl.dataset_path}" if wl.dataset_path is not None else ""
    print(f"Building {wl.num_prompts} requests of workload {wl.name}{source} (seed {wl.seed}, run {wl.run}, "
          f"{'exact' if builder.exact else 'approximate'} prompt lengths)", file=out)
    requests = dataset_requests(wl, builder) if wl.dataset_path is not None else build_requests(wl, builder)
    if max_model_len:
        too_long = sum(1 for r in requests if r.prompt_len + r.output_len > int(max_model_len))
        if too_long:
            print(f"warning: {too_long} requests exceed the server's max_model_len {max_model_len}", file=out)
    return requests


async def _run_one_rate(client: aiohttp.ClientSession, config: ServeBenchConfig, endpoint: EndpointConfig,
                        tok_dir: str | None, requests: Sequence[BenchRequest], rate: float,
                        out: TextIO) -> BenchResult:
    offsets = arrival_offsets(ArrivalConfig(rate, config.burstiness, config.workload.seed, config.ramp_up),
                              len(requests), config.workload.rate_scales())
    prefixes = config.server_metric_prefixes
    before = await fetch_server_metrics(client, config.base_url, prefixes) if prefixes else None
    splits_before = await fetch_splits(client, config.base_url) if prefixes else None
    phases = config.workload.phases if config.workload.ordered else ()
    print(format_preamble(rate, config.burstiness, config.max_concurrency, phases, config.ramp_up), file=out)
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.time()
    records, duration = await run_rate(client, endpoint, requests, offsets, config.max_concurrency,
                                       config.disable_tqdm, desc=f"rate {rate:g}")
    ended = time.time()
    after = await fetch_server_metrics(client, config.base_url, prefixes) if prefixes else None
    splits_after = await fetch_splits(client, config.base_url) if prefixes else None
    metrics = compute_metrics(records, duration, config.slos, config.metric_percentiles)
    result = BenchResult(
        label=config.label or endpoint.model, date=date, request_rate=rate, burstiness=config.burstiness,
        max_concurrency=config.max_concurrency, slos=config.slos, percentile_metrics=config.percentile_metrics,
        metric_percentiles=config.metric_percentiles, records=records, metrics=metrics,
        config={**config.to_dict(), "model": endpoint.model, "tokenizer_id": tok_dir},
        server_metrics=_delta(before, after),
        metadata=dict(config.metadata), split_changes=split_changes(splits_before, splits_after, started, ended),
        structured_output=config.structured_output.to_dict() if config.structured_output else None,
        conformance=Conformance.of(records) if config.structured_output else None,
        ramp_up=config.ramp_up,
        rps_change_events=None if config.ramp_up is None else rps_change_events(config.ramp_up, offsets, started),
    )
    print(format_result_block(result), file=out)
    for extra in (format_offered_load(records), format_profile_breakdown(result), format_split_changes(result),
                  format_prefix_cache(result), format_worker_iterations(result), format_cuda_allocator(result),
                  format_kv_handoffs(result), format_admission_ratios(result), format_failures(records)):
        if extra:
            print(extra, file=out)
    if config.writes_results:
        path = write_result(result, result_path(config, endpoint.model, rate, date))
        print(f"Result written to {path}", file=out)
    out.flush()
    return result


def split_changes(before: dict[str, Any] | None, after: dict[str, Any] | None, start: float, end: float
                  ) -> list[dict[str, Any]] | None:
    """The SM split changes a semipd server reported (`GET /splits`) between wall-clock `start` and
    `end` (the client's clock: run the benchmark where the cluster runs), oldest first; an entry
    `{"engine_id", "omitted": n}` says n more changes fell out of the server's recent list, and
    `{"engine_id", "log_lost": True}` that an engine listed before the run was gone after it or had
    started again (fewer switches than before): its changes during the run are unknown, not none.
    None when the server has no `/splits` (vLLM and other OpenAI servers).
    """
    if after is None:
        return None
    known = {e["engine_id"]: (int(e.get("num_switches", 0)), max((sw["time"] for sw in e.get("switches", [])),
                                                                 default=-math.inf))
             for e in (before or {}).get("data", [])}
    changes: list[dict[str, Any]] = []
    counts_after = {e["engine_id"]: int(e.get("num_switches", 0)) for e in after["data"]}
    changes.extend({"engine_id": eid, "log_lost": True} for eid, (count, _) in known.items()
                   if counts_after.get(eid, -1) < count)
    for engine in after["data"]:
        eid, switches = engine["engine_id"], engine.get("switches", [])
        changes.extend({"engine_id": eid, "time_s": round(sw["time"] - start, 3), "from_sms": sw["from_sms"],
                        "to_sms": sw["to_sms"], "reason": sw["reason"]}
                       for sw in switches if start <= sw["time"] <= end)
        if eid in known and counts_after[eid] >= known[eid][0]:
            count, last_seen = known[eid]
            missing = counts_after[eid] - count - sum(1 for sw in switches if sw["time"] > last_seen)
            if missing > 0:
                changes.append({"engine_id": eid, "omitted": missing})
    return sorted(changes, key=lambda c: c.get("time_s", -1.0))


def run_serve_bench(config: ServeBenchConfig, out: TextIO | None = None) -> list[BenchResult]:
    """Run the benchmark (one result per request rate); prints to `out` (stdout)."""
    return asyncio.run(_run(config, out or sys.stdout))


__all__ = ["ServeBenchConfig", "make_prompt_builder", "result_path", "run_rate", "run_serve_bench", "split_changes",
           "tokenizer_dir"]

"""`semipd bench serve` / `bench plot`: workloads, arrivals, metrics, report, client, end to end."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from cluster.bench.arrivals import ArrivalConfig, ArrivalError, arrival_offsets, parse_rates
from cluster.bench.client import (
    DONE, EndpointConfig, RequestRecord, StreamTimer, build_payload, parse_prometheus, parse_sse_line, send_request,
)
from cluster.bench.datasets import dataset_requests
from cluster.bench.metrics import (
    Conformance, SLOs, MetricsError, compute_metrics, parse_metric_names, parse_percentiles,
)
from cluster.bench.plot import plot_results, results_figure
from cluster.bench.report import (
    format_admission_ratios, format_cuda_allocator, format_failures, format_kv_handoffs, format_prefix_cache,
    format_result_block, format_split_changes, format_worker_iterations,
)
from cluster.bench.result import BenchResult, load_result, write_result
from cluster.bench.serve_bench import ServeBenchConfig, result_path, run_rate, split_changes
from cluster.bench.structured import (
    BUILTIN_CHOICES, BUILTIN_REGEX, BUILTIN_SCHEMA, StructuredOutput, StructuredOutputError, parse_spec,
)
from cluster.bench.server_metrics import (
    WorkerIterations, admission_ratios, cuda_allocator_counts, iteration_quantiles, iterations_over, kv_handoffs,
    prefix_cache_counts, worker_iterations,
)
from cluster.bench.sweep import metrics_under, rate_of, sustained_rates
from cluster.bench.traffic import streaming_around, token_times
from cluster.bench.workloads import (
    PROFILES, BenchRequest, LogNormalLengths, RatioPromptBuilder, TokenizerPromptBuilder, WorkloadConfig,
    WorkloadError, build_requests, mean_rate_scale, parse_phases, sample_lengths, split_counts, time_shares,
)
from cluster.cli import build_parser, main as cli_main

from support import LiveServer, StubReply, free_port, stub_http

# ---------------------------------------------------------------- workloads


def _lengths(name: str, n: int = 3000, seed: int = 0, **kw: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    s = sample_lengths(WorkloadConfig(name=name, num_prompts=n, seed=seed, **kw))
    return np.array([x.input_len for x in s]), np.array([x.output_len for x in s]), [x.profile for x in s]


@pytest.mark.parametrize("name, mean_in, mean_out", [
    ("sharegpt", 496, 97), ("arxiv", 3832, 200), ("long-doc", 5905, 180), ("math", 110, 2500),
    ("mixed", 0.6 * 496 + 0.4 * 5905, 0.6 * 97 + 0.4 * 180),
])
def test_workload_means_match_published_statistics(name: str, mean_in: float, mean_out: float) -> None:
    ins, outs, _ = _lengths(name)
    assert ins.mean() == pytest.approx(mean_in, rel=0.06)
    assert outs.mean() == pytest.approx(mean_out, rel=0.06)


@pytest.mark.parametrize("name", list(PROFILES))
def test_workload_caps_are_respected(name: str) -> None:
    p = PROFILES[name]
    ins, outs, _ = _lengths(name, seed=5)
    assert ins.min() >= p.input.low and ins.max() <= p.input.high
    assert outs.min() >= 1 and outs.max() <= p.output.high
    if p.max_total is not None:
        assert (ins + outs).max() <= p.max_total
    assert len(set(ins.tolist())) > 100  # a spread, not a constant


def test_sharegpt_harness_filter() -> None:
    ins, outs, _ = _lengths("sharegpt", n=5000, seed=11)
    assert ins.max() <= 1024 and (ins + outs).max() <= 2048
    assert np.median(ins) < ins.mean() * 1.1  # right-skewed or flat, never piled at the cap
    assert (ins == 1024).mean() < 0.01


def test_workloads_are_seeded() -> None:
    a = sample_lengths(WorkloadConfig(name="mixed", num_prompts=200, seed=3))
    b = sample_lengths(WorkloadConfig(name="mixed", num_prompts=200, seed=3))
    c = sample_lengths(WorkloadConfig(name="mixed", num_prompts=200, seed=4))
    assert a == b and a != c


def test_each_run_of_a_sweep_draws_its_own_prompts() -> None:
    """A sweep's runs must not share prompts: the server would find the later runs' in its prefix cache."""
    builder = RatioPromptBuilder(tokens_per_word=1.0)
    first, again, second = (build_requests(WorkloadConfig(name="arxiv", num_prompts=30, seed=5, run=run), builder)
                            for run in (0, 0, 1))
    assert first == again
    assert not {r.prompt for r in first} & {r.prompt for r in second}
    with pytest.raises(WorkloadError):
        WorkloadConfig(run=-1)


def test_mixed_is_shuffled_with_exact_shares() -> None:
    _, _, profiles = _lengths("mixed", n=1000)
    assert profiles.count("sharegpt") == 600 and profiles.count("long-doc") == 400
    assert profiles[:600].count("sharegpt") < 600  # interleaved, not in blocks


def test_shifting_changes_mix_mid_run() -> None:
    ins, _, profiles = _lengths("shifting", n=400)
    assert profiles[:200] == ["sharegpt"] * 200 and profiles[200:] == ["long-doc"] * 200
    assert ins[200:].mean() > 5 * ins[:200].mean()
    _, _, p2 = _lengths("shifting", n=90, phases=parse_phases("math:1,arxiv:2"))
    assert p2 == ["math"] * 30 + ["arxiv"] * 60


def test_shifting_phases_arrive_at_their_own_rates() -> None:
    """Chat at ten times the documents' rate for the first half of the time, documents for the second."""
    wl = WorkloadConfig(name="shifting", num_prompts=1100, seed=3, phases=parse_phases("sharegpt:0.5@10,long-doc:0.5"))
    _, _, profiles = _lengths("shifting", n=1100, seed=3, phases=wl.phases)
    assert profiles == ["sharegpt"] * 1000 + ["long-doc"] * 100
    scales = wl.rate_scales()
    assert scales.tolist() == [10.0] * 1000 + [1.0] * 100
    offsets = arrival_offsets(ArrivalConfig(4.0, 1.0, 3), 1100, scales)
    chat_time, doc_time = offsets[999], offsets[-1] - offsets[999]
    assert 1000 / chat_time == pytest.approx(40.0, rel=0.1) and 100 / doc_time == pytest.approx(4.0, rel=0.25)
    assert chat_time == pytest.approx(doc_time, rel=0.25)  # each phase for half of the time
    assert WorkloadConfig(name="sharegpt", num_prompts=5, phases=wl.phases).rate_scales().tolist() == [1.0] * 5
    assert parse_phases("math,arxiv:2@0.5") == (("math", 1.0, 1.0), ("arxiv", 2.0, 0.5))
    assert time_shares(parse_phases("math,arxiv:3")) == (0.25, 0.75)
    assert mean_rate_scale(wl.phases) * 4.0 * chat_time * 2 == pytest.approx(1100, rel=0.15)  # the requests it brings


def test_random_workload_like_vllm() -> None:
    ins, outs, _ = _lengths("random", n=2000, input_len=200, output_len=50, range_ratio=0.5)
    assert ins.min() >= 100 and ins.max() <= 300 and outs.min() >= 25 and outs.max() <= 75
    assert ins.mean() == pytest.approx(200, rel=0.03) and outs.mean() == pytest.approx(50, rel=0.03)
    ins, outs, _ = _lengths("random", n=10, input_len=7, output_len=3)
    assert set(ins.tolist()) == {7} and set(outs.tolist()) == {3}


def test_workload_validation() -> None:
    with pytest.raises(WorkloadError, match="workload must be one of"):
        WorkloadConfig(name="nope")
    with pytest.raises(WorkloadError, match="range_ratio"):
        WorkloadConfig(name="random", range_ratio=1.0)
    with pytest.raises(WorkloadError, match="phase 'mixed'"):
        WorkloadConfig(name="shifting", phases=(("mixed", 1.0),))
    with pytest.raises(WorkloadError, match="fraction"):
        parse_phases("sharegpt:x")
    with pytest.raises(WorkloadError, match="rate scale must be a number"):
        parse_phases("sharegpt:1@fast")
    with pytest.raises(WorkloadError, match="rate scale must be positive"):
        WorkloadConfig(name="shifting", phases=parse_phases("sharegpt@0"))
    with pytest.raises(WorkloadError, match="not reachable"):
        LogNormalLengths(mean=990, sigma=0.1, low=1, high=1000)
    with pytest.raises(WorkloadError, match="inside"):
        LogNormalLengths(mean=5000, sigma=1.0, low=1, high=1000)
    assert split_counts([0.6, 0.4], 7) == [4, 3] and sum(split_counts([1, 1, 1], 100)) == 100


def _words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


def test_sharegpt_file_is_read_and_filtered_as_vllm_does(tmp_path: Path) -> None:
    """One token per word (RatioPromptBuilder(1.0)): kept are conversations of two turns or more whose prompt and
    output have at least 4 tokens, a prompt of at most 1,024 and a request of at most 2,048."""
    usable = [(10 + i, 5 + i) for i in range(12)]
    conversations = [{"conversations": [{"from": "human", "value": _words(p, f"p{i}")},
                                        {"from": "gpt", "value": _words(o)}, {"from": "human", "value": "more"}]}
                     for i, (p, o) in enumerate(usable)]
    conversations += [
        {"conversations": [{"from": "human", "value": _words(20)}]},  # one turn
        {"conversations": [{"from": "human", "value": _words(3)}, {"from": "gpt", "value": _words(9)}]},
        {"conversations": [{"from": "human", "value": _words(9)}, {"from": "gpt", "value": _words(3)}]},
        {"conversations": [{"from": "human", "value": _words(1025)}, {"from": "gpt", "value": _words(9)}]},
        {"conversations": [{"from": "human", "value": _words(1000)}, {"from": "gpt", "value": _words(1049)}]},
        {"id": "no conversations"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    builder = RatioPromptBuilder(1.0, 0)
    config = WorkloadConfig(name="sharegpt", num_prompts=12, dataset_path=str(path))
    got = dataset_requests(config, builder)
    assert sorted((r.prompt_len, r.output_len) for r in got) == usable
    assert all(r.prompt.split()[0].startswith("p") and r.profile == "sharegpt" for r in got)
    assert [r.index for r in got] == list(range(12))
    assert dataset_requests(config, builder) == got
    assert [r.prompt for r in dataset_requests(replace(config, run=1), builder)] != [r.prompt for r in got]
    with pytest.raises(WorkloadError, match="holds 12 usable requests, fewer than --num-prompts 13"):
        dataset_requests(replace(config, num_prompts=13), builder)
    path.write_text("{not json")
    with pytest.raises(WorkloadError, match="cannot read dataset"):
        dataset_requests(config, builder)


def test_custom_jsonl_takes_its_output_lengths_or_the_default(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one two three", "output_tokens": 7}\n\n{"prompt": "four five"}\n')
    config = WorkloadConfig(name="custom", num_prompts=2, output_len=3, dataset_path=str(path))
    got = dataset_requests(config, RatioPromptBuilder(1.0, 1))
    assert sorted((r.prompt, r.prompt_len, r.output_len) for r in got) == [
        ("four five", 3, 3), ("one two three", 4, 7)]
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(WorkloadError, match="prompts.jsonl:2: expected"):
        dataset_requests(config, RatioPromptBuilder(1.0, 0))


def test_dataset_path_validation(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="custom workload reads its requests from a dataset path"):
        WorkloadConfig(name="custom")
    with pytest.raises(WorkloadError, match="applies to the sharegpt and custom workloads only"):
        WorkloadConfig(name="random", dataset_path=str(tmp_path))
    with pytest.raises(WorkloadError, match="dataset file not found"):
        WorkloadConfig(name="sharegpt", dataset_path=str(tmp_path / "missing.json"))
    with pytest.raises(WorkloadError, match="come from its file"):
        sample_lengths(WorkloadConfig(name="sharegpt", dataset_path=__file__))


def _bpe_tokenizer() -> Any:
    """A real BPE tokenizer with merges, trained in memory on our filler words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cluster.bench.workloads import random_words

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>"])
    rng = np.random.default_rng(0)
    tok.train_from_iterator([random_words(rng, 50) for _ in range(200)], trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def test_tokenizer_prompts_have_exact_length() -> None:
    hf = _bpe_tokenizer()
    builder = TokenizerPromptBuilder(hf, pool_tokens=3000)
    assert builder.special_tokens == 1
    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 256, 5000):
        text = builder.build(n, rng)
        assert len(hf.encode(text)) == n  # as the server counts it: BOS included
    assert builder.build(100, np.random.default_rng(1)) != builder.build(100, np.random.default_rng(2))


def test_byte_level_tokenizer_prompts(tiny_llama: Path) -> None:
    builder = TokenizerPromptBuilder.from_dir(tiny_llama)
    reqs = build_requests(WorkloadConfig(name="sharegpt", num_prompts=20, seed=2), builder)
    assert [builder.count(r.prompt) for r in reqs] == [r.prompt_len for r in reqs]
    with pytest.raises(FileNotFoundError):
        TokenizerPromptBuilder.from_dir(tiny_llama / "missing")


def test_ratio_prompt_builder_word_count() -> None:
    text = RatioPromptBuilder(tokens_per_word=2.0, special_tokens=1).build(101, np.random.default_rng(0))
    assert len(text.split()) == 50
    with pytest.raises(WorkloadError):
        RatioPromptBuilder(tokens_per_word=0)


# ---------------------------------------------------------------- arrivals


def _gaps(rate: float, burstiness: float, n: int = 20000, seed: int = 0) -> np.ndarray:
    return np.diff(arrival_offsets(ArrivalConfig(rate, burstiness, seed), n))


def test_poisson_arrivals_mean_rate() -> None:
    gaps = _gaps(8.0, 1.0)
    assert 1 / gaps.mean() == pytest.approx(8.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential gaps


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_cv(burstiness: float) -> None:
    gaps = _gaps(5.0, burstiness)
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_arrivals_seeded_and_infinite_rate() -> None:
    a = arrival_offsets(ArrivalConfig(3.0, 1.0, 7), 50)
    assert a[0] > 0.0 and np.all(np.diff(a) >= 0)  # the first request waits its own gap, as in vLLM
    assert np.array_equal(a, arrival_offsets(ArrivalConfig(3.0, 1.0, 7), 50))
    assert not np.array_equal(a, arrival_offsets(ArrivalConfig(3.0, 1.0, 8), 50))
    assert np.array_equal(arrival_offsets(ArrivalConfig(math.inf), 5), np.zeros(5))
    assert np.allclose(arrival_offsets(ArrivalConfig(3.0, 1.0, 7), 50, np.full(50, 2.0)), a / 2)
    with pytest.raises(ArrivalError, match="rate scales"):
        arrival_offsets(ArrivalConfig(3.0, 1.0, 7), 50, np.zeros(50))


def test_arrival_validation_and_rates() -> None:
    assert parse_rates("1,2, 4,8") == (1.0, 2.0, 4.0, 8.0)
    assert parse_rates("inf") == (math.inf,)
    for bad in ("0", "-1", "x", ",", "nan"):
        with pytest.raises(ArrivalError):
            parse_rates(bad)
    with pytest.raises(ArrivalError):
        ArrivalConfig(1.0, burstiness=0.0)


# ---------------------------------------------------------------- metrics


def _rec(i: int, ttft: float | None, e2el: float | None, out: int, itl: list[float] | None = None,
         ok: bool = True, start: float = 0.0, prompt: int = 10) -> RequestRecord:
    return RequestRecord(
        index=i, profile="t", prompt_len=prompt, max_tokens=out, start_s=start,
        end_s=start + (e2el or 0.5), success=ok, error=None if ok else "HTTP 500: boom",
        output_tokens=out if ok else 0, ttft_s=ttft, e2el_s=e2el, itl_s=itl or [], num_chunks=out,
    )


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        _rec(0, 0.100, 1.000, 10, [0.1] * 9, start=0.0),  # tpot 100 ms
        _rec(1, 0.200, 0.650, 10, [0.05] * 9, start=0.5),  # tpot 50 ms
        _rec(2, 0.300, 0.300, 1, [], start=0.9),  # one token: no tpot
        _rec(3, 0.400, 2.400, 21, [0.1] * 20, start=1.5, prompt=30),  # tpot 100 ms
        _rec(4, None, None, 0, ok=False, start=2.0),
    ]


def test_metric_computation(records: list[RequestRecord]) -> None:
    m = compute_metrics(records, 4.0, SLOs(), (50, 90, 99))
    assert (m.completed, m.failed, m.num_requests) == (4, 1, 5)
    assert m.total_input == 10 + 10 + 10 + 30 and m.total_output == 42
    assert m.request_throughput == pytest.approx(1.0) and m.output_throughput == pytest.approx(10.5)
    assert m.total_token_throughput == pytest.approx((60 + 42) / 4)
    ttft = m.distributions["ttft"]
    assert ttft.mean == pytest.approx(250) and ttft.median == pytest.approx(250)
    assert ttft.percentile(90) == pytest.approx(100 + 0.9 * 3 * 100)  # linear interpolation
    tpot = m.distributions["tpot"]
    assert tpot.mean == pytest.approx((100 + 50 + 100) / 3) and tpot.percentile(50) == pytest.approx(100)
    itl = m.distributions["itl"]
    assert itl.mean == pytest.approx((0.9 + 0.45 + 2.0) / 38 * 1000)
    assert m.distributions["e2el"].percentile(99) == pytest.approx(np.percentile([1000, 650, 300, 2400], 99))
    assert m.request_goodput is None and m.slo_attainment_pct is None
    assert m.peak_concurrency == 3  # requests 0, 1 and 2 overlap in [0.9, 1.0)


def test_goodput_on_hand_made_records(records: list[RequestRecord]) -> None:
    m = compute_metrics(records, 4.0, SLOs.parse(["ttft:250", "tpot:60"]))
    # request 1 (ttft 200, tpot 50) and request 2 (ttft 300 > 250: miss) -> only request 1
    assert m.request_goodput == pytest.approx(1 / 4.0) and m.slo_attainment_pct == pytest.approx(20.0)
    m = compute_metrics(records, 4.0, SLOs.parse(["tpot:60"]))  # one-token output counts as tpot 0
    assert m.request_goodput == pytest.approx(2 / 4.0)
    m = compute_metrics(records, 2.0, SLOs.parse(["e2el:1000", "ttft:1000"]))
    assert m.request_goodput == pytest.approx(3 / 2.0) and m.slo_attainment_pct == pytest.approx(60.0)


def test_empty_metrics_read_zero() -> None:
    m = compute_metrics([_rec(0, None, None, 0, ok=False)], 1.0, SLOs(ttft_ms=100), (99,))
    assert m.completed == 0 and m.distributions["ttft"].percentile(99) == 0.0 and m.request_goodput == 0.0


def test_metric_flag_parsing() -> None:
    assert SLOs.parse(["ttft:500", "E2EL:2000"]).as_dict() == {"ttft": 500.0, "e2el": 2000.0}
    for bad in (["foo:1"], ["ttft"], ["ttft:-1"], ["ttft:1", "ttft:2"], ["tpot:x"]):
        with pytest.raises(MetricsError):
            SLOs.parse(bad)
    assert parse_percentiles("90,99.9") == (90.0, 99.9)
    assert parse_metric_names("ttft,e2el") == ("ttft", "e2el")
    with pytest.raises(MetricsError):
        parse_percentiles("0")
    with pytest.raises(MetricsError):
        parse_metric_names("ttft,foo")


# ---------------------------------------------------------------- report


def _result(records: list[RequestRecord], rate: float = 4.0, label: str = "a", slos: SLOs = SLOs(),
            metrics: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el"), duration: float = 4.0) -> BenchResult:
    pct = (90.0, 99.0)
    return BenchResult(label=label, date="20250101-000000", request_rate=rate, burstiness=1.0, max_concurrency=8,
                       slos=slos, percentile_metrics=metrics, metric_percentiles=pct, records=records,
                       metrics=compute_metrics(records, duration, slos, pct), config={"request_rates": [rate]},
                       server_metrics={"delta": {"semipd:sm_repartitions_total": 3.0}}, metadata={"k": "v"})


def test_printed_block_has_vllm_lines(records: list[RequestRecord]) -> None:
    text = format_result_block(_result(records, slos=SLOs(ttft_ms=250)))
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    for label in ("Successful requests:", "Failed requests:", "Maximum request concurrency:",
                  "Request rate configured (RPS):", "Benchmark duration (s):", "Total input tokens:",
                  "Total generated tokens:", "Request throughput (req/s):", "Request goodput (req/s):",
                  "Output token throughput (tok/s):", "Total token throughput (tok/s):"):
        assert any(line.startswith(label) for line in lines), label
    assert "Successful requests:                     4" in text
    assert "Total generated tokens:                  42" in text
    for header in ("---------------Time to First Token----------------",
                   "-----Time per Output Token (excl. 1st token)------",
                   "---------------Inter-token Latency----------------",
                   "----------------End-to-end Latency----------------"):
        assert header in lines
    for short in ("TTFT", "TPOT", "ITL", "E2EL"):
        for stat in ("Mean", "Median", "P90", "P99"):
            assert any(line.startswith(f"{stat} {short} (ms):") for line in lines)
    assert "Mean TTFT (ms):                          250.00" in text
    short = format_result_block(_result(records, rate=math.inf, metrics=("ttft",)))
    assert "Request goodput" not in short and "Request rate configured" not in short
    assert "ITL" not in short and "P99 TTFT (ms):" in short


def test_per_profile_breakdown(records: list[RequestRecord], tmp_path: Path) -> None:
    from cluster.bench.report import format_profile_breakdown
    from cluster.bench.result import profile_breakdown

    assert profile_breakdown(_result(records)) == {}  # one profile: nothing extra
    for r in records[:2]:
        r.profile = "sharegpt"
    for r in records[2:]:
        r.profile = "long-doc"
    result = _result(records, slos=SLOs(ttft_ms=250))
    table = profile_breakdown(result)
    assert table["sharegpt"]["completed"] == 2 and table["sharegpt"]["slo_attainment_pct"] == 100.0
    assert table["long-doc"]["failed"] == 1 and table["long-doc"]["slo_attainment_pct"] == 0.0
    assert table["long-doc"]["mean_ttft_ms"] == pytest.approx(350)
    text = format_profile_breakdown(result)
    assert "sharegpt: 2 ok, 0 failed" in text and "long-doc: 2 ok, 1 failed" in text
    assert load_result(write_result(result, tmp_path / "r.json")).to_json()["by_profile"] == table


def test_json_round_trip(tmp_path: Path, records: list[RequestRecord]) -> None:
    for rate in (2.5, math.inf):
        result = _result(records, rate=rate, slos=SLOs(ttft_ms=250, tpot_ms=60))
        path = write_result(result, tmp_path / "sub" / f"r{rate}.json")
        raw = json.loads(path.read_text())  # strict JSON
        assert raw["completed"] == 4 and raw["p90_ttft_ms"] == pytest.approx(370)
        assert raw["goodput"] == {"ttft": 250.0, "tpot": 60.0} and len(raw["requests"]) == 5
        back = load_result(path)
        assert back.to_json() == result.to_json()
        assert back.request_rate == rate and back.records == records and back.label == "a"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a semipd"):
        load_result(tmp_path / "bad.json")


def test_plot_creates_png(tmp_path: Path, records: list[RequestRecord]) -> None:
    paths = []
    for label in ("semi-pd", "unified"):
        for rate in (1.0, 2.0, 4.0):
            res = _result(records, rate=rate, label=label, slos=SLOs(ttft_ms=250))
            paths.append(str(write_result(res, tmp_path / f"{label}-{rate}.json")))
    out = tmp_path / "plots" / "slo.png"
    assert cli_main(["bench", "plot", *paths, "--out", str(out), "--goodput", "ttft:300"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    direct = plot_results([load_result(paths[0])], tmp_path / "one.png")
    assert direct.read_bytes()[:4] == b"\x89PNG"


def test_one_window_of_several_configs_plots_bars_per_config(records: list[RequestRecord]) -> None:
    """Configurations measured once at the same rate (a shifting window): bars per label, goodput beside
    attainment, instead of a line chart whose lines are single points; a sweep still draws lines."""
    slos = SLOs(ttft_ms=250)
    window = [_result(records, rate=4.2, label=label, slos=slos) for label in ("dynamic", "pinned88", "vllm")]
    fig = results_figure(window)
    assert [ax.get_title().split(" at ")[0] for ax in fig.axes] == [
        "SLO attainment (%)", "goodput (req/s)", "P90 TTFT (ms)", "P90 TPOT (ms)"]
    goodput = fig.axes[1]
    assert [t.get_text() for t in goodput.get_xticklabels()] == ["dynamic", "pinned88", "vllm"]
    expected = metrics_under(window[0], None).request_goodput
    assert expected is not None and expected > 0
    assert [bar.get_height() for bar in goodput.patches] == pytest.approx([expected] * 3)
    sweep = window + [_result(records, rate=8.0, label="dynamic", slos=slos)]
    assert len(results_figure(sweep).axes) == 3 and not results_figure(sweep).axes[0].patches


def _ttft_records(ttfts_ms: list[float]) -> list[RequestRecord]:
    return [_rec(i, t / 1000, t / 1000 + 0.1, 2, [0.1], start=0.1 * i) for i, t in enumerate(ttfts_ms)]


def test_sustained_rate_is_last_passing_rate_and_interpolated_crossing(capsys: pytest.CaptureFixture[str],
                                                                        tmp_path: Path) -> None:
    slos = SLOs(ttft_ms=500)
    sweep = {1.0: [100.0] * 10, 2.0: [100.0] * 9 + [900.0], 4.0: [100.0] * 5 + [900.0] * 5, 8.0: [900.0] * 10}
    runs = [_result(_ttft_records(t), rate=r, label="dyn", slos=slos) for r, t in sweep.items()]
    runs.append(_result(_ttft_records([900.0] * 10), rate=1.0, label="never", slos=slos))
    runs.append(_result(_ttft_records([100.0] * 10), rate=3.0, label="always", slos=slos))
    dyn, never, always = sustained_rates(runs, attainment_pct=90.0)
    assert dyn.points == ((1.0, 100.0), (2.0, 90.0), (4.0, 50.0), (8.0, 0.0))
    assert dyn.last_passing == 2.0 and dyn.crossing == pytest.approx(2.0)
    assert sustained_rates(runs[:4], attainment_pct=70.0)[0].crossing == pytest.approx(2.0 + 2.0 * 20 / 40)
    assert never.last_passing is None and never.crossing is None
    assert always.last_passing == always.crossing == 3.0
    paths = [str(write_result(r, tmp_path / f"{i}.json")) for i, r in enumerate(runs)]
    assert cli_main(["bench", "plot", *paths, "--out", str(tmp_path / "p.png"), "--attainment", "70"]) == 0
    table = capsys.readouterr().out
    assert "| dyn | 2.00 | 3.00 |" in table and "| never | - | - |" in table
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "plot", *paths, "--out", str(tmp_path / "p.png"), "--attainment", "120"])
    assert e.value.code == 2


def test_sustained_rate_on_the_offered_axis_orders_windows_by_the_rate_they_were_sent_at(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Configured 35 req/s sent at 31 (a short Poisson window) sits below configured 30 sent at 32 on the
    offered axis: there the 31 window's pass and the 32 window's miss read as a sustained 31, where the
    configured axis reads 30 failed and nothing sustained."""
    slos = SLOs(ttft_ms=500)

    def window(configured: float, offered: float, ttft_ms: float) -> BenchResult:
        recs = [replace(r, scheduled_s=i / offered) for i, r in enumerate(_ttft_records([ttft_ms] * 11))]
        return _result(recs, rate=configured, label="dyn", slos=slos)

    runs = [window(30.0, 32.0, 900.0), window(35.0, 31.0, 100.0)]
    assert [rate_of(r, "offered") for r in runs] == pytest.approx([32.0, 31.0])
    (configured,) = sustained_rates(runs)
    assert configured.last_passing is None
    (offered,) = sustained_rates(runs, rate_axis="offered")
    assert offered.last_passing == pytest.approx(31.0)
    paths = [str(write_result(r, tmp_path / f"{i}.json")) for i, r in enumerate(runs)]
    assert cli_main(["bench", "plot", *paths, "--out", str(tmp_path / "p.png"), "--rate-axis", "offered"]) == 0
    assert "| dyn | 31.00 |" in capsys.readouterr().out
    one = replace(runs[0], records=runs[0].records[:1])
    write_result(one, tmp_path / "one.json")
    assert cli_main(["bench", "plot", str(tmp_path / "one.json"), "--out", str(tmp_path / "p.png"),
                     "--rate-axis", "offered"]) == 2
    assert "its offered rate is unknown" in capsys.readouterr().err


def test_plot_labels_by_folder_keep_runs_measured_apart_apart(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    """The same configuration swept on two machines (one folder each): one sweep per folder with
    `--label-by-dir`, one merged sweep without."""
    slos, paths = SLOs(ttft_ms=500), []
    for machine, ttfts in (("a", [100.0] * 10), ("b", [900.0] * 10)):
        for rate in (1.0, 2.0):
            (tmp_path / machine).mkdir(exist_ok=True)
            res = _result(_ttft_records(ttfts), rate=rate, label="dyn", slos=slos)
            paths.append(str(write_result(res, tmp_path / machine / f"dyn-{rate}.json")))
    assert cli_main(["bench", "plot", *paths, "--out", str(tmp_path / "p.png"), "--label-by-dir"]) == 0
    table = capsys.readouterr().out
    assert "| dyn (a) | 2.00 | 2.00 |" in table and "| dyn (b) | - | - |" in table
    assert cli_main(["bench", "plot", *paths, "--out", str(tmp_path / "p.png")]) == 0
    assert "| dyn | - | - | 1: 0, 1: 100, 2: 0, 2: 100 |" in capsys.readouterr().out  # one sweep of both


def test_results_without_their_records_plot_under_their_own_slos(tmp_path: Path) -> None:
    """A result JSON with "requests" removed (as kept in docs/perf) loads from its aggregates: it plots and
    gives its sustained rate under its own SLOs, and says why when asked for other ones."""
    slos = SLOs(ttft_ms=500)
    sweep = {1.0: [100.0] * 10, 2.0: [100.0] * 9 + [900.0], 4.0: [100.0] * 5 + [900.0] * 5}
    paths = []
    for rate, ttfts in sweep.items():
        full = _result(_ttft_records(ttfts), rate=rate, label="dyn", slos=slos)
        raw = full.to_json()
        del raw["requests"]
        path = tmp_path / f"dyn-{rate}.json"
        path.write_text(json.dumps(raw))
        back = load_result(path)
        assert back.records == [] and back.metrics == full.metrics
        paths.append(str(path))
    (dyn,) = sustained_rates([load_result(p) for p in paths])
    assert dyn.points == ((1.0, 100.0), (2.0, 90.0), (4.0, 50.0)) and dyn.last_passing == 2.0
    assert cli_main(["bench", "plot", *paths, "--out", str(tmp_path / "p.png")]) == 0
    with pytest.raises(ValueError, match="saved without its per-request records"):
        sustained_rates([load_result(p) for p in paths], slos=SLOs(ttft_ms=300))


def test_result_path_naming() -> None:
    cfg = ServeBenchConfig(request_rates=(1, 2), result_dir="/r", result_filename="x.json")
    assert result_path(cfg, "m", 2.0, "d") == Path("/r/x-2qps.json")
    cfg = ServeBenchConfig(request_rates=(1, math.inf), result_filename="run-{rate}.json")
    assert result_path(cfg, "m", math.inf, "d") == Path("run-inf.json")
    cfg = ServeBenchConfig(max_concurrency=4, label="semi pd", workload=WorkloadConfig(name="arxiv"))
    assert result_path(cfg, "org/model", 8.0, "D").name == "semi_pd-arxiv-8qps-concurrency4-model-D.json"


# ---------------------------------------------------------------- client


def test_sse_and_stream_timer() -> None:
    assert parse_sse_line("data: [DONE]") is DONE and parse_sse_line(": ping") is None
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    rec = RequestRecord(0, "t", 5, 4)
    timer = StreamTimer(rec, start=10.0, is_chat=True)
    timer.feed({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, 10.05)  # preamble: no token
    timer.feed({"choices": [{"delta": {"content": "a"}}]}, 10.2)
    timer.feed({"choices": [{"delta": {"content": ""}}]}, 10.3)  # partial UTF-8: still a token
    timer.feed({"choices": [{"delta": {"content": "b"}, "finish_reason": "length"}]}, 10.6)
    timer.feed({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}, 10.7)
    assert rec.ttft_s == pytest.approx(0.2) and rec.itl_s == pytest.approx([0.1, 0.3])
    assert (rec.num_chunks, rec.output_tokens, rec.prompt_tokens, rec.finish_reason) == (3, 4, 5, "length")
    for field in ("reasoning", "reasoning_content"):  # a reasoning model's first tokens, in vLLM's new and old field
        rec = RequestRecord(0, "t", 5, 4)
        timer = StreamTimer(rec, start=10.0, is_chat=True)
        timer.feed({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, 10.05)
        timer.feed({"choices": [{"delta": {field: "hmm"}}]}, 10.1)
        assert rec.ttft_s == pytest.approx(0.1), field


def test_payload() -> None:
    cfg = EndpointConfig("http://h:1/", "m", "/v1/chat/completions", api_key="k", extra_body={"top_k": 1})
    body = build_payload(cfg, BenchRequest(0, "hi", 2, 7, "t"))
    assert cfg.url == "http://h:1/v1/chat/completions" and cfg.headers() == {"Authorization": "Bearer k"}
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["max_completion_tokens"] == 7
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True} and body["top_k"] == 1
    with pytest.raises(ValueError):
        EndpointConfig("h:1", "m")
    with pytest.raises(ValueError):
        EndpointConfig("http://h", "m", "/v1/embeddings")


def test_prometheus_parsing() -> None:
    text = ('# HELP semipd:x x\nsemipd:sm_repartitions_total{engine="a"} 3.0\nsemipd:up 1\n'
            'vllm:num_requests_running{model_name="m"} 2\nsemipd:bad{a="b"} nan-ish\nsemipd:g NaN\n')
    assert parse_prometheus(text, ("semipd:",)) == {'semipd:sm_repartitions_total{engine="a"}': 3.0, "semipd:up": 1.0}


def _sse(*events: dict[str, Any], done: bool = True) -> list[bytes]:
    out = [f"data: {json.dumps(e)}\n\n".encode() for e in events]
    return out + ([b"data: [DONE]\n\n"] if done else [])


def _tok(text: str = "x") -> dict[str, Any]:
    return {"choices": [{"text": text, "index": 0}]}


async def _chunks(parts: list[bytes], fail: Exception | None = None, hang: bool = False) -> AsyncIterator[bytes]:
    for p in parts:
        yield p
    if fail is not None:
        raise fail
    if hang:
        await asyncio.Event().wait()  # a server that never answers again


def test_failures_are_counted_and_never_hang() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}

    def behaviour(body: dict[str, Any]) -> StubReply:
        kind = body["prompt"]
        if kind == "ok":
            return _chunks(_sse(_tok(), _tok(), usage))
        if kind == "error":
            return web.json_response({"error": {"message": "engine exploded", "type": "x"}}, status=500)
        if kind == "disconnect":
            return _chunks(_sse(_tok(), done=False), fail=ConnectionResetError("reset"))
        if kind == "truncated":
            return _chunks(_sse(_tok(), done=False))
        if kind == "stream-error":
            return _chunks(_sse({"error": {"message": "overloaded"}}))
        return _chunks(_sse(_tok(), done=False), hang=True)

    kinds = ["ok", "error", "disconnect", "truncated", "stream-error", "hang", "ok"]
    requests = [BenchRequest(i, k, 3, 2, "t") for i, k in enumerate(kinds)]

    async def go() -> tuple[list[RequestRecord], float]:
        async with stub_http(behaviour) as (client, url):
            return await run_rate(client, EndpointConfig(url, "m", timeout_s=0.5), requests, [0.0] * len(requests),
                                  max_concurrency=3, disable_tqdm=True)

    records, duration = asyncio.run(go())
    by_kind = dict(zip(kinds, records))
    assert [r.success for r in records] == [True, False, False, False, False, False, True]
    assert by_kind["error"].error == "HTTP 500: engine exploded" and by_kind["error"].http_status == 500
    assert "ClientPayloadError" in (by_kind["disconnect"].error or "")  # the chunked body cut off
    assert by_kind["truncated"].error == "the stream ended before [DONE]"
    assert by_kind["stream-error"].error == "overloaded"
    assert by_kind["hang"].error == "timed out after 0.5 s"
    assert records[0].output_tokens == 2 and records[0].prompt_tokens == 3 and len(records[0].itl_s) == 1
    assert duration < 5
    m = compute_metrics(records, duration)
    assert (m.completed, m.failed) == (2, 5)
    extra = [RequestRecord(9, "t", 1, 1, error=f"HTTP 400: context is 2048 tokens, you asked {n}") for n in (3000, 4)]
    summary = format_failures(records + extra, limit=10).splitlines()
    assert summary[0] == "Errors (count: example message):" and len(summary) == 1 + 6
    assert "  2: HTTP 400: context is 2048 tokens, you asked 3000" in summary


def test_output_tokens_fall_back_to_chunk_count() -> None:
    def behaviour(body: dict[str, Any]) -> StubReply:
        return _chunks(_sse(_tok(), _tok(""), _tok()))

    async def go() -> RequestRecord:
        async with stub_http(behaviour) as (client, url):
            return await send_request(client, EndpointConfig(url, "m"), BenchRequest(0, "p", 3, 3, "t"), 0.0)

    rec = asyncio.run(go())
    assert rec.success and rec.output_tokens == 3 and rec.prompt_tokens is None and rec.input_tokens == 3


def test_sse_lines_longer_than_the_readers_buffer_stream() -> None:
    """aiohttp's line reader refuses a line over 128 KiB ("Chunk too big"); a 200,000-character text chunk and a
    usage chunk as long, whole or written in pieces, are read like any other."""
    text = "y" * 200_000
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "note": "u" * 200_000}}
    body = b"".join(_sse(_tok("a"), _tok(text), _tok("b"), usage))
    assert max(len(line) for line in body.split(b"\n")) > 128 * 1024

    def behaviour(request: dict[str, Any]) -> StubReply:
        if request["prompt"] == "whole":
            return _chunks([body])
        return _chunks([body[i:i + 10_000] for i in range(0, len(body), 10_000)])

    async def go(prompt: str) -> RequestRecord:
        async with stub_http(behaviour) as (client, url):
            config = EndpointConfig(url, "m", structured_output=StructuredOutput("regex", "a?y*b?"))
            return await send_request(client, config, BenchRequest(0, prompt, 3, 3, "t"), 0.0)

    for prompt in ("whole", "pieces"):
        rec = asyncio.run(go(prompt))
        assert rec.success and rec.error is None, rec.error
        assert (rec.num_chunks, rec.output_tokens, rec.prompt_tokens) == (3, 3, 3)
        assert rec.output_text == "a" + text + "b"


# ---------------------------------------------------------------- structured outputs


@pytest.mark.parametrize("kind, field", [
    ("json", {"json": BUILTIN_SCHEMA}), ("json-object", {"json_object": True}), ("regex", {"regex": BUILTIN_REGEX}),
    ("choice", {"choice": list(BUILTIN_CHOICES)}),
])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_structured_payload_per_kind(kind: str, field: dict[str, Any], endpoint: str) -> None:
    request = BenchRequest(0, "hi", 2, 7, "t")
    plain = build_payload(EndpointConfig("http://h:1", "m", endpoint), request)
    assert "structured_outputs" not in plain  # without the option the body is as before
    body = build_payload(EndpointConfig("http://h:1", "m", endpoint, structured_output=StructuredOutput(kind)), request)
    assert body == {**plain, "structured_outputs": field}
    tight = StructuredOutput(kind, no_whitespace=True)
    body = build_payload(EndpointConfig("http://h:1", "m", endpoint, structured_output=tight), request)
    assert body["structured_outputs"] == {**field, "disable_any_whitespace": True}
    override = EndpointConfig("http://h:1", "m", endpoint, extra_body={"structured_outputs": {"regex": "x"}},
                              structured_output=tight)
    assert build_payload(override, request)["structured_outputs"] == {"regex": "x"}  # extra_body has the last word


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "serve", *argv])


def test_structured_spec_from_a_file_or_inline(tmp_path: Path) -> None:
    from cluster.commands.bench import serve_config

    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}, "required": ["n"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "choices.json").write_text('["yes", "no"]\n')
    (tmp_path / "pattern.txt").write_text("[0-9]+\n")
    assert parse_spec("json", str(tmp_path / "schema.json")) == schema
    assert parse_spec("json", json.dumps(schema)) == schema
    assert parse_spec("choice", str(tmp_path / "choices.json")) == ["yes", "no"] == parse_spec("choice", '["yes","no"]')
    assert parse_spec("regex", str(tmp_path / "pattern.txt")) == "[0-9]+"  # the file's newline dropped
    assert parse_spec("regex", "[0-9]+ ") == "[0-9]+ "  # inline: the text as given
    (tmp_path / "bad.json").write_text("[yes]")
    with pytest.raises(StructuredOutputError, match="--structured-spec file .*bad.json is not valid JSON"):
        parse_spec("choice", str(tmp_path / "bad.json"))

    cfg = serve_config(_serve_args("--structured-output", "json", "--structured-spec", str(tmp_path / "schema.json"),
                                   "--no-whitespace"))
    assert cfg.structured_output == StructuredOutput("json", schema, no_whitespace=True)
    assert cfg.to_dict()["structured_output"] == {"kind": "json", "spec": schema, "disable_any_whitespace": True}
    cfg = serve_config(_serve_args("--structured-output", "choice", "--structured-spec", '["a", "b"]'))
    assert cfg.structured_output is not None and cfg.structured_output.spec == ("a", "b")
    assert serve_config(_serve_args("--structured-output", "regex")).structured_output == StructuredOutput(
        "regex", BUILTIN_REGEX)
    assert serve_config(_serve_args()).structured_output is None
    with pytest.raises(StructuredOutputError, match="json-object takes no spec"):
        StructuredOutput("json-object", {})
    with pytest.raises(StructuredOutputError, match="not a valid JSON schema"):
        StructuredOutput("json", {"type": 3})


@pytest.mark.parametrize("kind, good, bad", [
    ("json", ['{"status": "ok", "urgent": true, "count": 0, "note": ""}',
              '{"note":"twelve chars","count":999,"urgent":false,"status":"down"}',
              '{"status":"ok","urgent":true,"count":7.0,"note":"x"}'],
     ['{"status": "ok", "urgent": true, "count": 0}', '{"status": "fine", "urgent": true, "count": 0, "note": ""}',
      '{"status": "ok", "urgent": 1, "count": 0, "note": ""}',
      '{"status": "ok", "urgent": true, "count": 1000, "note": ""}',
      '{"status": "ok", "urgent": true, "count": 1.5, "note": ""}',
      '{"status": "ok", "urgent": true, "count": 0, "note": "thirteen chrs"}',
      '{"status": "ok", "urgent": true, "count": 0, "note": "", "x": 1}', '{"status": "ok"', '[]', '']),
    ("json-object", ['{}', ' {"a": [1, {"b": null}]}\n'], ['[]', '"x"', '{"a": 1', '{}{}']),
    ("regex", ["abc-12", "abcdefgh-1234"], ["ab-12", "abc-1", "abc-12345", "ABC-12", " abc-12", "abc-12\n"]),
    ("choice", list(BUILTIN_CHOICES), ["Positive", " positive", "positive.", ""]),
])
def test_conformance_check_per_kind(kind: str, good: list[str], bad: list[str]) -> None:
    so = StructuredOutput(kind)
    assert [t for t in good if not so.conforms(t, "stop")] == []
    assert [t for t in bad if so.conforms(t, "stop")] == []
    assert not any(so.conforms(t, "length") for t in good)  # cut at max_tokens: never conforming
    assert not so.conforms(good[0], None)


def test_stream_keeps_the_text_and_checks_it() -> None:
    sent: list[dict[str, Any]] = []

    def behaviour(body: dict[str, Any]) -> StubReply:
        sent.append(body)
        stop = {"choices": [{"text": "", "index": 0, "finish_reason": "stop"}]}
        if "messages" in body:
            chat = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                    {"choices": [{"delta": {"content": "mix"}}]}, {"choices": [{"delta": {"content": "ed"}}]},
                    {"choices": [{"delta": {}, "finish_reason": "stop"}]}]
            return _chunks(_sse(*chat))
        if body["prompt"] == "cut":
            return _chunks(_sse(_tok("posi"), {"choices": [{"text": "tive", "index": 0, "finish_reason": "length"}]}))
        return _chunks(_sse(_tok("neg"), _tok("ative"), stop))

    so = StructuredOutput("choice")

    async def go(endpoint: str, prompt: str) -> RequestRecord:
        async with stub_http(behaviour) as (client, url):
            config = EndpointConfig(url, "m", endpoint, structured_output=so)
            return await send_request(client, config, BenchRequest(0, prompt, 3, 3, "t"), 0.0)

    ok, cut, chat = (asyncio.run(go(e, p)) for e, p in (("/v1/completions", "p"), ("/v1/completions", "cut"),
                                                         ("/v1/chat/completions", "p")))
    assert (ok.output_text, ok.conforms, ok.finish_reason) == ("negative", True, "stop")
    assert (cut.output_text, cut.conforms, cut.finish_reason) == ("positive", False, "length")
    assert (chat.output_text, chat.conforms, chat.finish_reason) == ("mixed", True, "stop")
    assert all(b["structured_outputs"] == {"choice": list(BUILTIN_CHOICES)} for b in sent) and len(sent) == 3


def _structured_records() -> list[RequestRecord]:
    def rec(i: int, finish: str | None, conforms: bool | None, ok: bool = True) -> RequestRecord:
        r = _rec(i, 0.1, 0.5, 4, [0.1] * 3, ok=ok, start=0.1 * i)
        r.finish_reason, r.conforms, r.output_text = finish, conforms, None if conforms is None else f"t{i}"
        return r

    return [rec(0, "stop", True), rec(1, "stop", True), rec(2, "stop", True), rec(3, "stop", False),
            rec(4, "length", False), rec(5, "length", False), rec(6, None, None, ok=False), rec(7, "abort", False)]


def test_conformance_counts_and_correct_rate_in_the_result(tmp_path: Path) -> None:
    records = _structured_records()
    c = Conformance.of(records)
    assert (c.completed, c.conforming, c.invalid, c.length_cut) == (7, 3, 2, 2)  # the failed request is not completed
    assert c.correct_rate == pytest.approx(100 * 3 / 7)
    assert Conformance.of([]).correct_rate == 0.0
    with pytest.raises(MetricsError):
        Conformance(2, 2, 1)

    plain = _result(records)
    assert "Correct rate" not in format_result_block(plain) and "correct_rate" not in plain.to_json()
    result = _result(records)
    result.structured_output, result.conformance = StructuredOutput("regex").to_dict(), c
    block = format_result_block(result)
    assert "Correct rate (%):                        42.86" in block
    assert "Outputs cut at max_tokens:               2" in block
    raw = json.loads(write_result(result, tmp_path / "r.json").read_text())
    assert raw["correct_rate"] == pytest.approx(100 * 3 / 7)
    assert raw["conformance"] == {"conforming": 3, "invalid": 2, "length_cut": 2}
    assert raw["structured_output"] == {"kind": "regex", "spec": BUILTIN_REGEX, "disable_any_whitespace": False}
    assert [r.get("conforms") for r in raw["requests"]] == [True] * 3 + [False] * 3 + [None, False]
    assert "conforms" not in raw["requests"][6] and "output_text" not in raw["requests"][6]  # not checked: left out
    back = load_result(tmp_path / "r.json")
    assert back.records == records and back.conformance == c and back.to_json() == result.to_json()
    del raw["requests"]  # a file kept small: the saved counts are used
    (tmp_path / "small.json").write_text(json.dumps(raw))
    assert load_result(tmp_path / "small.json").conformance == c
    old = records[0].to_dict()
    del old["conforms"], old["output_text"]  # a file from before structured outputs
    assert RequestRecord.from_dict(old) == replace(records[0], conforms=None, output_text=None)


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv", [
    ["--request-rate", "0"], ["--request-rate", "1,x"], ["--goodput", "foo:1"], ["--range-ratio", "1.5"],
    ["--workload", "nope"], ["--num-prompts", "0"], ["--metric-percentiles", "101"], ["--burstiness", "-1"],
    ["--percentile-metrics", "ttft,nope"], ["--endpoint", "/v1/embeddings"], ["--max-concurrency", "0"], ["--seed", "-1"],
    ["--structured-output", "yaml"],
])
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "serve", *argv])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--phases", "sharegpt,arxiv"], "--phases applies to --workload shifting"),
    (["--workload", "shifting", "--phases", "nope:1"], "phase 'nope'"),
    (["--base-url", "localhost:8000"], "base URL"),
    (["--tokenizer", "/nonexistent/tok"], "tokenizer directory not found"),
    (["--structured-output", "json", "--structured-spec", '{"type": "object",'],
     "--structured-spec text is not valid JSON"),
    (["--structured-output", "choice", "--structured-spec", '{"a": 1}'], "for choice must be a JSON list"),
    (["--structured-output", "choice", "--structured-spec", "[]"], "non-empty list of strings"),
    (["--structured-output", "regex", "--structured-spec", "[a-"], "does not compile"),
    (["--structured-output", "json-object", "--structured-spec", "{}"], "applies to json, regex and choice"),
    (["--structured-spec", '["a"]'], "need --structured-output"),
    (["--no-whitespace"], "need --structured-output"),
])
def test_invalid_values_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # a port nobody listens on
    assert cli_main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2",
                     "--disable-tqdm", "--request-timeout", "5"]) == 1
    assert "cannot list models" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end against a real server


class _Server:
    """The real OpenAI app over a real in-process semi-PD engine, served by uvicorn in a thread."""

    def __init__(self, model_dir: Path) -> None:
        from actors.config import EngineConfig
        from cluster.engine_client import LocalEngineClient
        from cluster.openai_api import create_app

        self.engine = LocalEngineClient(EngineConfig(model=str(model_dir), mode="semi-pd"))
        app = create_app(self.engine, self.engine.llm.tokenizer)
        self.http = LiveServer(app).start()
        self.url = self.http.url

    def stop(self) -> None:
        self.http.stop()
        self.engine.shutdown()


@pytest.fixture(scope="module")
def live_server(tiny_llama: Path) -> Iterator[_Server]:
    pytest.importorskip("cluster.openai_api", reason="cluster/openai_api (the HTTP front end) is not there yet")
    server = _Server(tiny_llama)
    yield server
    server.stop()


def test_end_to_end_against_real_server(live_server: _Server, tiny_llama: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main([
        "bench", "serve", "--base-url", live_server.url, "--tokenizer", str(tiny_llama), "--workload", "random",
        "--input-len", "48", "--output-len", "12", "--range-ratio", "0.5", "--num-prompts", "20",
        "--request-rate", "40", "--seed", "3", "--goodput", "e2el:60000", "--label", "e2e", "--disable-tqdm",
        "--result-dir", str(tmp_path), "--result-filename", "run.json", "--metadata", "engine=semi-pd",
    ])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "============ Serving Benchmark Result ============" in printed
    assert "Successful requests:                     20" in printed
    result = load_result(tmp_path / "run.json")
    recs = result.records
    assert result.metrics.completed == 20 and result.metrics.failed == 0 and len(recs) == 20
    assert all(r.http_status == 200 and r.finish_reason == "length" for r in recs)
    assert [r.prompt_tokens for r in recs] == [r.prompt_len for r in recs]  # exact prompts
    assert [r.output_tokens for r in recs] == [r.max_tokens for r in recs]  # ignore_eos
    assert all(24 <= r.prompt_len <= 72 and 6 <= r.max_tokens <= 18 for r in recs)
    assert result.metrics.total_input == sum(r.prompt_len for r in recs)
    assert result.metrics.total_output == sum(r.max_tokens for r in recs)
    assert f"Total generated tokens:                  {result.metrics.total_output}" in printed
    assert all(r.ttft_s is not None and 0 < r.ttft_s <= r.e2el_s for r in recs)
    assert all(len(r.itl_s) == r.num_chunks - 1 for r in recs)
    assert result.metrics.slo_attainment_pct == 100.0
    assert result.label == "e2e" and result.metadata == {"engine": "semi-pd"} and result.request_rate == 40.0
    assert result.server_metrics is not None
    assert any(k.startswith("semipd:sm_repartitions_total") for k in result.server_metrics["delta"])
    iterations = {worker: w for (_, worker), w in worker_iterations(result).items()}
    assert set(iterations) == {"prefill", "decode"}
    assert all(w.count >= 1 and w.mean_ms >= w.launch_ms > 0 for w in iterations.values())
    assert set(iterations["prefill"].launch_parts_ms) == {"prepare", "plan", "forward", "sample"}  # CPU: no graphs
    assert all(sum(w.launch_parts_ms.values()) <= w.launch_ms * 1.01 for w in iterations.values())
    assert iterations["decode"].count >= max(r.max_tokens for r in recs) - 1
    assert set(iterations["decode"].quantiles_ms) == {50, 90}  # from the engine's iteration-time histogram
    assert 1 <= iterations["decode"].tokens <= 20  # one token per running request
    assert 0 < round(iterations["prefill"].count * iterations["prefill"].tokens) <= result.metrics.total_input  # less cached
    assert "Worker iterations during the run (mean wall time): " in printed
    assert f"Offered load while requests arrived ({scheduled_span(recs):.1f} s): " in printed
    queried, hit = prefix_cache_counts(result) or (0.0, 0.0)
    assert queried == result.metrics.total_input and 0 <= hit < queried
    assert round(iterations["prefill"].count * iterations["prefill"].tokens) >= queried - hit  # preemptions add
    assert f"Prefix cache during the run: {hit:,.0f} of {queried:,.0f} prompt tokens hit" in printed
    assert result.split_changes == [] and "SM split changes during the run: 0" in printed  # none was asked for
    scheduled = [r.scheduled_s for r in recs]
    assert scheduled == sorted(scheduled) and scheduled[-1] > 0.1  # spread at 40 req/s, not all at once


def test_worker_iterations_from_the_metric_deltas() -> None:
    result = _result(_ttft_records([100.0]))
    e = 'model_name="m",engine="g0"'
    result.server_metrics = {"delta": {
        f'semipd:worker_iteration_seconds_count{{{e},worker="decode"}}': 400.0,
        f'semipd:worker_iteration_seconds_sum{{{e},worker="decode"}}': 8.0,
        f'semipd:worker_launch_seconds_total{{{e},worker="decode"}}': 0.4,
        f'semipd:worker_tokens_total{{{e},worker="decode"}}': 12800.0,
        f'semipd:worker_launch_part_seconds_total{{{e},worker="decode",part="graph"}}': 0.32,
        f'semipd:worker_launch_part_seconds_total{{{e},worker="decode",part="sample"}}': 0.08,
        f'semipd:worker_launch_part_seconds_total{{{e},worker="decode",part="forward"}}': 0.0,  # unused: left out
        f'semipd:worker_iteration_seconds_count{{{e},worker="prefill"}}': 0.0,  # idle during the run: left out
        f'semipd:worker_iteration_seconds_sum{{{e},worker="prefill"}}': 0.0,
    }}
    assert worker_iterations(result) == {
        ("g0", "decode"): WorkerIterations(400.0, 20.0, 1.0, 32.0, {"graph": 0.8, "sample": 0.2})}
    assert format_worker_iterations(result).endswith(
        "g0 decode: 400 x 20.00 ms (host 1.00 ms = graph 0.80 + sample 0.20, 32 tokens = 1,600 tok/s)")
    cumulative = {"0.01": 40.0, "0.02": 200.0, "0.03": 359.0, "0.05": 400.0, "+Inf": 400.0}  # the histogram's deltas
    result.server_metrics["delta"].update(
        {f'semipd:worker_iteration_seconds_bucket{{{e},worker="decode",le="{le}"}}': n for le, n in cumulative.items()})
    assert worker_iterations(result)[("g0", "decode")].quantiles_ms == {50: 20.0, 90: 50.0}
    assert format_worker_iterations(result).endswith("32 tokens = 1,600 tok/s, P50 <= 20 ms, P90 <= 50 ms)")
    stalled = {"0.01": 40.0, "0.02": 200.0, "0.05": 395.0, "0.1": 397.0, "0.2": 399.0, "+Inf": 400.0}
    result.server_metrics["delta"].update(
        {f'semipd:worker_iteration_seconds_bucket{{{e},worker="decode",le="{le}"}}': n for le, n in stalled.items()})
    assert worker_iterations(result)[("g0", "decode")].over_100ms == 3.0
    assert format_worker_iterations(result).endswith("P50 <= 20 ms, P90 <= 50 ms, 3 over 100 ms)")
    assert iterations_over({0.05: 1.0, math.inf: 2.0}, 0.1) == 0.0
    assert iteration_quantiles({0.01: 0.0, math.inf: 0.0}) == {} and iteration_quantiles({}) == {}
    result.server_metrics["delta"][f'semipd:worker_paced_seconds_total{{{e},worker="decode"}}'] = 2.0  # --decode-pace-ms
    assert worker_iterations(result)[("g0", "decode")].paced_ms == 5.0
    assert "(host 1.00 ms = graph 0.80 + sample 0.20, paced 5.00 ms, 32 tokens = 1,600 tok/s, P50" in (
        format_worker_iterations(result))
    result.server_metrics = None  # vLLM
    assert worker_iterations(result) == {} and format_worker_iterations(result) == ""


def scheduled_span(recs: list[RequestRecord]) -> float:
    return max(r.scheduled_s for r in recs) - min(r.scheduled_s for r in recs)


def test_offered_load_over_the_span_of_arrivals() -> None:
    """Requests 0.5 s apart carrying 100 and 300 prompt tokens in turn: 2 req/s and 400 prompt tokens/s offered."""
    from cluster.bench.report import format_offered_load
    from cluster.bench.traffic import offered_load

    recs = [RequestRecord(i, "random", 100 if i % 2 == 0 else 300, 8, scheduled_s=0.5 * i) for i in range(9)]
    rate, tokens, span = offered_load(recs) or (0.0, 0.0, 0.0)
    assert (rate, span) == (2.0, 4.0) and tokens == pytest.approx(2.0 * sum(r.prompt_len for r in recs) / 9)
    assert format_offered_load(recs) == f"Offered load while requests arrived (4.0 s): 2.00 req/s, {tokens:,.0f} prompt tokens/s"
    assert offered_load(recs[:1]) is None and format_offered_load([recs[0], recs[0]]) == ""  # no span: all at once


def test_cuda_allocator_counts_from_the_metric_deltas() -> None:
    result = _result(_ttft_records([100.0]))
    result.server_metrics = {"delta": {
        'semipd:cuda_mallocs_total{engine="g0",model_name="m"}': 12.0,
        'semipd:cuda_alloc_retries_total{engine="g0",model_name="m"}': 3.0,
        'semipd:cuda_frees_total{engine="g0",model_name="m"}': 41.0,
        'semipd:sm_repartitions_total{engine="g0",model_name="m"}': 1.0,
    }}
    assert cuda_allocator_counts(result) == {"g0": (12.0, 3.0, 41.0, None)}  # a server from before cudaHostAlloc
    assert format_cuda_allocator(result) == ("CUDA allocator during the run: g0: 12 cudaMalloc calls, 3 cudaMalloc "
                                             "retries, 41 cudaFree calls")
    result.server_metrics["delta"]['semipd:cuda_host_allocs_total{engine="g0",model_name="m"}'] = 5.0
    assert cuda_allocator_counts(result)["g0"].host_allocs == 5.0
    assert format_cuda_allocator(result).endswith("41 cudaFree calls, 5 cudaHostAlloc calls")
    result.server_metrics = None  # vLLM
    assert cuda_allocator_counts(result) == {} and format_cuda_allocator(result) == ""


def test_kv_handoffs_from_the_metric_deltas() -> None:
    """A disagg server's handoffs during the run: 4 requests, 8 MiB of KV; two reached the decode GPU within 5 ms
    and all four within 10 ms, and joined the decode batch within 10 ms and 25 ms."""
    result = _result(_ttft_records([100.0]))
    d0 = 'engine="d0",model_name="m"'
    delta = {f"semipd:kv_transfer_bytes_total{{{d0}}}": 8 * 2**20,
             f"semipd:kv_transfer_seconds_count{{{d0}}}": 4.0, f"semipd:kv_transfer_seconds_sum{{{d0}}}": 0.024,
             f"semipd:kv_handoff_seconds_count{{{d0}}}": 4.0, f"semipd:kv_handoff_seconds_sum{{{d0}}}": 0.05}
    for le, transfer, handoff in (("0.005", 2, 0), ("0.01", 4, 2), ("0.025", 4, 4), ("+Inf", 4, 4)):
        delta[f'semipd:kv_transfer_seconds_bucket{{engine="d0",le="{le}",model_name="m"}}'] = transfer
        delta[f'semipd:kv_handoff_seconds_bucket{{engine="d0",le="{le}",model_name="m"}}'] = handoff
    result.server_metrics = {"delta": delta}
    h = kv_handoffs(result)["d0"]
    assert (h.count, h.kv_bytes, h.transfer_ms, h.handoff_ms) == (4.0, 8 * 2**20, 6.0, 12.5)
    assert h.transfer_quantiles_ms == {50: 5.0, 90: 10.0} and h.handoff_quantiles_ms == {50: 10.0, 90: 25.0}
    assert format_kv_handoffs(result) == (
        "KV handoffs during the run (mean, from the first token): d0: 4 requests, 8.0 MiB of KV (2.00 MiB each), "
        "on the decode device after 6.00 ms (P90 <= 10 ms), decoding after 12.50 ms (P90 <= 25 ms)")
    delta[f"semipd:kv_handoff_seconds_count{{{d0}}}"] = 0.0  # no handoff during the run
    assert kv_handoffs(result) == {} and format_kv_handoffs(result) == ""
    result.server_metrics = None  # vLLM
    assert kv_handoffs(result) == {} and format_kv_handoffs(result) == ""


def test_admission_ratios_from_the_metric_deltas() -> None:
    """A refusing server's admitted requests during the run: 10, their TTFT over admission's prediction summing to
    9.5; 6 within 0.9 of it, 8 within 1.0 (so 20% later than predicted), all 10 within 1.25."""
    result = _result(_ttft_records([100.0]))
    g0 = 'engine="g0",model_name="m"'
    delta = {f"semipd:admission_ttft_ratio_count{{{g0}}}": 10.0, f"semipd:admission_ttft_ratio_sum{{{g0}}}": 9.5}
    for le, count in (("0.75", 2), ("0.9", 6), ("1.0", 8), ("1.1", 9), ("1.25", 10), ("+Inf", 10)):
        delta[f'semipd:admission_ttft_ratio_bucket{{engine="g0",le="{le}",model_name="m"}}'] = count
    result.server_metrics = {"delta": delta}
    a = admission_ratios(result)["g0"]
    assert (a.count, a.mean, a.over_one, a.quantiles) == (10.0, 0.95, pytest.approx(0.2), {50: 0.9, 90: 1.1})
    assert format_admission_ratios(result) == (
        "Admitted requests' TTFT over admission's prediction during the run: g0: 10 requests, mean x0.95, "
        "P50 <= x0.9, P90 <= x1.1, 20.0% later than predicted")
    delta[f"semipd:admission_ttft_ratio_count{{{g0}}}"] = 0.0  # nothing admitted during the run
    assert admission_ratios(result) == {} and format_admission_ratios(result) == ""
    result.server_metrics = None  # vLLM
    assert format_admission_ratios(result) == ""


def test_split_changes_keep_the_run_window_and_count_omitted() -> None:
    def engine(eid: str, n: int, times: list[float]) -> dict[str, Any]:
        return {"engine_id": eid, "prefill_sms": 64, "total_sms": 132, "num_switches": n,
                "switches": [{"time": t, "from_sms": 56, "to_sms": 64, "reason": f"r{t:g}"} for t in times]}

    before = {"data": [engine("e0", 1, [5.0]), engine("e1", 0, [])]}
    after = {"data": [engine("e0", 3, [5.0, 12.0, 14.5]), engine("e1", 4, [11.0, 19.0]), engine("e2", 1, [13.0])]}
    got = split_changes(before, after, start=10.0, end=15.0)
    assert [(c["engine_id"], c.get("time_s"), c.get("reason")) for c in got] == [
        ("e1", None, None), ("e1", 1.0, "r11"), ("e0", 2.0, "r12"), ("e2", 3.0, "r13"), ("e0", 4.5, "r14.5")]
    assert got[0]["omitted"] == 2  # e1 changed 4 times since `before`; the server still lists 2 of them
    assert split_changes(before, None, 0.0, 1.0) is None  # a server without /splits (vLLM)
    result = _result(_ttft_records([100.0]))
    result.split_changes = got
    block = format_split_changes(result)
    assert block.splitlines()[0] == "SM split changes during the run: 6"
    assert "t=   4.50s e0: 56 -> 64 prefill SMs (streamed 0 tokens/s in the second before, 0 in the slowest" in block
    assert block.endswith("; r14.5)")


def test_streaming_around_a_switch_shows_a_stall_after_it() -> None:
    """Two requests stream a token every 10 ms from 0.1 s to 4 s, except for a 400 ms gap from 2.0 s (a stalled
    decode): 200 tokens/s in the second before the switch at 2.0 s, and the slowest half second after it holds
    only the 10 tokens each streamed from 2.4 s, 40 tokens/s. A record that failed adds nothing."""
    def streaming(index: int) -> RequestRecord:
        gaps = [0.01] * 190 + [0.41] + [0.01] * 159
        return RequestRecord(index, "chat", 8, 351, start_s=0.0, end_s=4.0, success=True, output_tokens=351,
                             num_chunks=351, ttft_s=0.1, itl_s=gaps)

    failed = RequestRecord(2, "chat", 8, 10, success=False, ttft_s=0.1, itl_s=[0.01] * 500)
    times = token_times([streaming(0), streaming(1), failed])
    before, after = streaming_around(times, 2.0)
    assert before == pytest.approx(200.0, abs=2.1)  # a chunk at an edge of the second may fall either side
    assert after == pytest.approx(40.0, abs=4.1)
    assert streaming_around(token_times([streaming(0), streaming(1)]), 2.0) == (before, after)
    assert streaming_around(times, 1.0, span_s=0.5)[1] == pytest.approx(200.0, abs=4.1)  # no stall there


def test_timeline_places_misses_streaming_and_switches_in_their_second(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Misses count in the second a request arrived, streamed tokens and their gaps (and the long ones, 50 ms or
    more a token) in the second they reached the client, split changes in the second they happened; a wider bin
    sums them."""
    from cluster.bench.timeline import timeline

    records = [
        _rec(0, 0.1, 1.1, 3, [0.5, 0.5], start=0.2),  # chunks at 0.8 s and 1.3 s; TPOT 500 ms
        _rec(1, None, None, 0, ok=False, start=1.5),
        _rec(2, 2.0, 2.0, 1, [], start=1.7, prompt=30),  # TTFT 2 s, one token: no TPOT
    ]
    result = _result(records, slos=SLOs(ttft_ms=1000, tpot_ms=100))
    result.split_changes = [{"engine_id": "e0", "time_s": 1.2, "from_sms": 64, "to_sms": 72, "reason": "r"},
                            {"engine_id": "e1", "omitted": 2}]
    first, second = timeline(result)
    assert (first.arrived, first.prompt_tokens, first.streamed_tokens, first.itl_s, first.long_gaps) == \
        (1, 10, 1.0, 0.5, 1)
    assert (first.ttft_missed, first.tpot_missed, first.failed, first.split_changes) == (0, 1, 0, ())
    assert (second.arrived, second.prompt_tokens, second.streamed_tokens) == (2, 40, 1.0)
    assert (second.ttft_missed, second.tpot_missed, second.failed, second.split_changes) == (1, 0, 1, ("e0 64->72",))
    (whole,) = timeline(result, bin_s=2.0)
    assert (whole.arrived, whole.streamed_tokens, whole.ttft_missed, whole.tpot_missed) == (3, 2.0, 1, 1)
    assert whole.long_gaps == 2
    coalesced = _result([_rec(0, 0.1, 0.4, 7, [0.12, 0.16])])  # chunks of 3 tokens: 40 and 53 ms a token
    assert [b.long_gaps for b in timeline(coalesced)] == [1]
    assert timeline(result, SLOs(ttft_ms=3000))[1].ttft_missed == 0
    with pytest.raises(ValueError, match="bin_s must be > 0"):
        timeline(result, bin_s=0.0)

    path = write_result(result, tmp_path / "run.json")
    assert cli_main(["bench", "timeline", str(path), "--goodput", "ttft:1000", "tpot:100"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("a at 4 req/s configured, 3 requests")
    assert "TTFT>1000ms" in rows[1] and "TPOT>100ms" in rows[1] and "gaps>50ms" in rows[1]
    assert rows[4].split() == ["1-2", "2.0", "40", "1", "500.0", "1", "1", "0", "1", "e0", "64->72"]
    assert rows[5] == ("TPOT misses: 1 (median output 3 tokens); 0 of them within the target with their gaps of "
                       "30 ms or more a token cut to their median")  # both its gaps are its median
    assert rows[6] == ("Gaps of 30 ms or more a token: 2; during 0 of them at least half the other streams in flight "
                       "got a chunk (the stream's own path held it), during 0 none did (every stream stood still); "
                       "0.00% of all chunks came under 1 ms after their request's previous one (bunched)")
    assert rows[7] == "Split changes not in the table: e1 (2 not listed by the server)"
    empty = _result([])
    assert empty.split_changes is None and timeline(empty) == []
    assert cli_main(["bench", "timeline", str(write_result(empty, tmp_path / "empty.json"))]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # the title and the header
    assert cli_main(["bench", "timeline", str(tmp_path / "missing.json")]) == 2
    assert "result file not found" in capsys.readouterr().err


def test_tpot_misses_counts_those_their_long_gaps_put_past_the_target() -> None:
    """A miss counts as its gaps' when its TPOT is within the target with each gap of `gap_s` or more a token (a
    chunk of several tokens has as many times the room) cut to its median gap; a slow stream throughout is not;
    failed requests and those within the target are not misses."""
    from cluster.bench.timeline import tpot_misses

    def stream(i: int, itl: list[float], out: int, ok: bool = True) -> RequestRecord:
        return _rec(i, 0.1, 0.1 + sum(itl), out, itl, ok=ok)

    records = [stream(0, [0.01] * 18 + [0.1] * 2, 21),  # 19 ms a token; 10 ms with the two 100 ms gaps cut
               stream(1, [0.015] * 20, 21),  # 15 ms a token throughout
               stream(2, [0.01] * 20, 21),  # within 12 ms
               stream(3, [0.5] * 20, 21, ok=False),
               stream(4, [0.12, 0.01, 0.01], 7)]  # 3 chunks of 2 tokens: a 60 ms a token gap, then 5 ms
    result = _result(records, slos=SLOs(ttft_ms=1000, tpot_ms=12))
    m = tpot_misses(result, result.slos, 0.03)
    assert (m.missed, m.explained, m.median_output_tokens, m.gap_s) == (3, 2, 21, 0.03)
    assert tpot_misses(result, result.slos, 0.2).explained == 0  # no gap that long
    assert tpot_misses(result, SLOs(ttft_ms=1000), 0.03) is None


def test_gap_sources_tells_a_stream_held_on_its_own_path_from_every_stream_standing_still() -> None:
    """Streams of a token every 10 ms from 0.1 s. Stream 0 waits 60 ms at 0.3 s while streams 1 and 2 go on (its
    own path held it), then gets the held tokens in a bunch, from then on 1 ms behind the others; at 0.4 s all
    three wait 80 ms (the engine stood still): stream 0's chunks 1 ms after the others' at each end of their gap
    do not count as streaming during it. A stream that ended before a gap is not in flight during it; a failed
    request adds nothing; a chunk of several tokens has as many times the room."""
    from cluster.bench.timeline import gap_sources

    def stream(i: int, itl: list[float], start: float = 0.0, out: int | None = None) -> RequestRecord:
        n = out if out is not None else len(itl) + 1
        return _rec(i, 0.1 - start, 0.1 - start + sum(itl), n, itl, start=start)

    held = [0.01] * 20 + [0.06] + [0.0002] * 5 + [0.01] * 4 + [0.08] + [0.01] * 10
    steady = [0.01] * 30 + [0.08] + [0.01] * 10
    records = [stream(0, held), stream(1, steady, start=0.0001), stream(2, steady, start=0.0002),
               stream(3, [0.01, 0.09], start=0.0003),  # its 90 ms gap from 0.11 s: the others go on
               stream(4, [0.04, 0.04], out=9),  # chunks of 4 tokens, 10 ms a token: not long
               _rec(5, None, None, 0, ok=False)]
    g = gap_sources(_result(records), 0.03)
    assert (g.gaps, g.others_streamed, g.all_still, g.gap_s) == (5, 2, 3, 0.03)
    assert g.bunched == pytest.approx(5 / (41 + 41 + 41 + 2 + 2))
    alone = gap_sources(_result([stream(0, held)]), 0.03)
    assert (alone.gaps, alone.others_streamed, alone.all_still) == (2, 0, 0)  # no other stream in flight
    assert gap_sources(_result([]), 0.03).bunched == 0.0


def test_keep_writes_results_without_records_stall_lines_and_no_machine_paths(
        records: list[RequestRecord], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`semipd bench keep` (what docs/perf keeps of a GPU call's compare.tgz): each result without its records,
    still loading with the same aggregates; a server's stall and pause lines from their date on, instead of its
    log; neither the clock samples nor the CPU samples; every machine path cut to its last component."""
    run = tmp_path / "run"
    run.mkdir()
    full = _result(records, slos=SLOs(ttft_ms=250))
    raw = full.to_json()
    raw["config"].update(tokenizer="/tmp/models/llama3-8b", result_dir="/tmp/compare")
    (run / "dyn-arxiv-4.5.json").write_text(json.dumps(raw))
    (run / "dyn-arxiv-4.5.gpu.csv").write_text("t,clock_mhz,power_w\n0.0,1980,120\n")
    (run / "dyn-arxiv-4.5.cpu.txt").write_text("1.0 97.5 812 ray::ProxyActor\n")
    (run / "dyn-arxiv-4.5.log").write_text("Building 68 requests from /tmp/models/llama3-8b\n")
    (run / "semipd-profile.json").write_text(json.dumps({"key": {"device": "NVIDIA H100 80GB HBM3"}}))
    stall = "2026-12-06 02:03:42,607 INFO actors.engine.workers: decode stalled: an iteration of 167 ms (median 8.4 ms)"
    pause = "2026-12-06 06:22:23,735 INFO actors.engine.pauses: paused: the process stood still 98 ms"
    (run / "dyn-server.log").write_text("\n".join([
        f"\x1b[36m(EngineActor pid=3915)\x1b[0m {stall}",
        "\x1b[36m(ServeReplica:semipd pid=7219)\x1b[0m INFO 2026-12-06 06:22:10,016 POST /v1/completions 200",
        f"\x1b[36m(EngineActor pid=3915)\x1b[0m {pause}",
        "2026-12-06 06:22:24,000 INFO cluster.controller: model at /work/main/models/tiny-llama",
    ]) + "\n")
    archive = tmp_path / "compare.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run, arcname=".")

    kept = tmp_path / "docs" / "run35a"
    assert cli_main(["bench", "keep", str(archive), str(kept)]) == 0
    assert ("1 results without their records, 1 servers' stall lines (1 decode stalled, 0 prefill stalled, 1 paused)"
            in capsys.readouterr().out)
    assert sorted(p.name for p in kept.iterdir()) == ["dyn-arxiv-4.5.json", "dyn-arxiv-4.5.log", "dyn-stalls.txt",
                                                      "semipd-profile.json"]
    saved = json.loads((kept / "dyn-arxiv-4.5.json").read_text())
    assert "requests" not in saved and saved["config"]["tokenizer"] == "llama3-8b"
    assert saved["config"]["result_dir"] == "compare"
    back = load_result(kept / "dyn-arxiv-4.5.json")
    assert back.records == [] and back.metrics == full.metrics
    assert (kept / "dyn-stalls.txt").read_text() == f"{stall}\n{pause}\n"
    assert (kept / "dyn-arxiv-4.5.log").read_text() == "Building 68 requests from llama3-8b\n"
    assert not any(re.search(r"/(tmp|work|root)/", p.read_text()) for p in kept.iterdir())

    assert cli_main(["bench", "keep", str(run), str(tmp_path / "from-folder")]) == 0  # a folder as it is
    assert (tmp_path / "from-folder" / "dyn-stalls.txt").read_text() == f"{stall}\n{pause}\n"
    capsys.readouterr()
    outside = tmp_path / "outside.tgz"
    with tarfile.open(outside, "w:gz") as tar:
        tar.add(run / "dyn-arxiv-4.5.log", arcname="../escape.log")
    assert cli_main(["bench", "keep", str(outside), str(tmp_path / "x")]) == 2
    assert "points outside the results" in capsys.readouterr().err
    (run / "broken.json").write_text("{")
    assert cli_main(["bench", "keep", str(run), str(tmp_path / "y")]) == 2
    assert "broken.json: not JSON" in capsys.readouterr().err


def test_split_changes_say_when_an_engine_lost_its_switch_log() -> None:
    """An engine that died during the run (gone from `/splits`) or was started again (its count fell)
    recorded switches that nobody can list: the result says so instead of showing none."""
    def engine(eid: str, n: int, times: list[float]) -> dict[str, Any]:
        return {"engine_id": eid, "prefill_sms": 88, "total_sms": 132, "num_switches": n,
                "switches": [{"time": t, "from_sms": 80, "to_sms": 88, "reason": "r"} for t in times]}

    before = {"data": [engine("dead", 3, [1.0]), engine("restarted", 5, [2.0]), engine("fine", 1, [3.0])]}
    after = {"data": [engine("restarted", 1, [12.0]), engine("fine", 2, [3.0, 13.0])]}
    got = split_changes(before, after, start=10.0, end=15.0)
    assert [(c["engine_id"], c.get("log_lost"), c.get("time_s")) for c in got] == [
        ("dead", True, None), ("restarted", True, None), ("restarted", None, 2.0), ("fine", None, 3.0)]
    result = _result(_ttft_records([100.0]))
    result.split_changes = got
    block = format_split_changes(result)
    assert block.splitlines()[0] == "SM split changes during the run: 2 and those of 2 engine(s) whose log was lost"
    assert "  dead: switch log lost (the engine was gone or had started again after the run)" in block


def test_end_to_end_chat_and_rejections(live_server: _Server, tiny_llama: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main([
        "bench", "serve", "--base-url", live_server.url, "--endpoint", "/v1/chat/completions", "--workload",
        "random", "--input-len", "20", "--output-len", "6", "--num-prompts", "4", "--max-concurrency", "2",
        "--disable-tqdm", "--result-dir", str(tmp_path), "--request-rate", "inf,50",
    ])
    capsys.readouterr()
    assert rc == 0
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 2  # one result per rate of the sweep
    for f in files:
        res = load_result(f)
        assert res.metrics.completed == 4 and all(r.output_tokens == 6 for r in res.records)
        assert res.metrics.peak_concurrency <= 2
    # longer than the tiny model's context (2048): every request is a counted 400, exit 1
    rc = cli_main(["bench", "serve", "--base-url", live_server.url, "--workload", "random", "--input-len", "2100",
                   "--output-len", "4", "--num-prompts", "3", "--disable-tqdm", "--tokenizer", str(tiny_llama)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "Failed requests:                         3" in out and "maximum context length" in out


def test_end_to_end_from_a_dataset_file(live_server: _Server, tiny_llama: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: " + _words(5 + i, "why"), "output_tokens": 2 + i})
                            + "\n" for i in range(5)))
    out_dir = tmp_path / "results"
    rc = cli_main(["bench", "serve", "--base-url", live_server.url, "--workload", "custom", "--dataset-path",
                   str(data), "--num-prompts", "4", "--request-rate", "inf", "--disable-tqdm", "--tokenizer",
                   str(tiny_llama), "--result-dir", str(out_dir), "--no-server-metrics"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"requests of workload custom from {data}" in out
    res = load_result(next(out_dir.glob("*.json")))
    assert res.metrics.completed == 4
    assert len({r.max_tokens for r in res.records}) == 4 and {r.max_tokens for r in res.records} <= {2, 3, 4, 5, 6}
    assert all(r.output_tokens == r.max_tokens and r.prompt_tokens == r.prompt_len for r in res.records)
    rc = cli_main(["bench", "serve", "--base-url", live_server.url, "--workload", "custom", "--dataset-path",
                   str(tmp_path / "missing.jsonl"), "--disable-tqdm"])
    assert rc == 2 and "dataset file not found" in capsys.readouterr().err


def test_end_to_end_shifting_phases_at_their_own_rates(live_server: _Server, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main([
        "bench", "serve", "--base-url", live_server.url, "--workload", "shifting", "--phases", "random:1@4,random:3",
        "--input-len", "12", "--output-len", "3", "--num-prompts", "7", "--request-rate", "20", "--disable-tqdm",
        "--result-dir", str(tmp_path), "--no-server-metrics",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Phase rates: random 80 req/s for 25% of the time, random 20 req/s for 75% of the time" in out
    res = load_result(next(tmp_path.glob("*.json")))
    assert res.metrics.completed == 7 and res.config["workload"]["phases"] == [["random", 1.0, 4.0],
                                                                               ["random", 3.0, 1.0]]


def test_end_to_end_structured_outputs_all_conform(live_server: _Server, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny model's outputs under a regex (completions) and the built-in JSON schema without whitespace (chat)
    end when the grammar is complete, well before max_tokens, and all of them conform."""
    for kind, endpoint, extra in (("regex", "/v1/completions", []),
                                  ("json", "/v1/chat/completions", ["--no-whitespace"])):
        out_dir = tmp_path / kind
        rc = cli_main(["bench", "serve", "--base-url", live_server.url, "--endpoint", endpoint, "--workload", "random",
                       "--input-len", "16", "--output-len", "160", "--num-prompts", "6", "--disable-tqdm",
                       "--result-dir", str(out_dir), "--no-server-metrics", "--structured-output", kind, *extra])
        printed = capsys.readouterr().out
        assert rc == 0, printed
        assert "Correct rate (%):                        100.00" in printed
        assert "Outputs cut at max_tokens:               0" in printed
        result = load_result(next(out_dir.glob("*.json")))
        assert result.metrics.completed == 6 and result.conformance is not None
        assert result.conformance.correct_rate == 100.0
        assert all(r.finish_reason == "stop" and r.conforms and r.output_tokens < r.max_tokens for r in result.records)
        assert result.structured_output is not None and result.structured_output["kind"] == kind
        assert result.config["structured_output"] == result.structured_output
    regex_run = load_result(next((tmp_path / "regex").glob("*.json")))
    assert all(re.fullmatch(BUILTIN_REGEX, r.output_text or "") for r in regex_run.records)
    json_run = load_result(next((tmp_path / "json").glob("*.json")))
    statuses = BUILTIN_SCHEMA["properties"]["status"]["enum"]
    assert all((r.output_text or "").startswith('{"status":"') and json.loads(r.output_text or "")["status"]
               in statuses for r in json_run.records)  # no whitespace, and the schema's order


def test_engine_decode_loop_bench_runs_both_ways_on_cpu(tiny_llama: Path) -> None:
    """The GPU engine benchmark's loop part, on the CPU engine and each way in its own process as
    `run_engine_bench` runs it: one row per batch and way, each from `steps` steps of the whole batch."""
    from cluster.bench.engine_bench import bench_decode_loop, format_table, in_fresh_process

    rows = [row for mode in ("unified", "semi-pd") for overlap in (False, True)
            for row in in_fresh_process(bench_decode_loop, str(tiny_llama), overlap, (1, 3), ctx=24, steps=12,
                                        mode=mode)]
    assert [(r["mode"], r["batch"], r["overlap"]) for r in rows] == [
        (m, b, o) for m in ("unified", "semi-pd") for o in (False, True) for b in (1, 3)]
    assert all(r["iterations"] == 12 and r["step_ms"] > 0 and r["mean_context"] > 24 for r in rows), rows
    assert [r["decode_sms"] for r in rows] == [128] * 4 + [128 - 16] * 4  # semi-pd: on the smallest prefill split
    vllm = dict(seconds=5.0, output_tokens_per_s=6000.0, total_tokens_per_s=9000.0,
                decode=[dict(batch=3, context=24, step_ms=9.87)])
    table = format_table(dict(model="m", device="cpu", date="d", commit="c", command="x",
                              ceilings=dict(copy_TBps=1.0, matmul_TFLOPs=1.0), decode_loop=rows, vllm=vllm))
    assert "| one step at a time ms | overlapped ms | vLLM step ms (its loop) |" in table
    assert table.count("\n| unified | 3 | 24 |") == 1 and table.count("\n| semi-pd | 3 | 24 |") == 1
    assert [line.endswith("| 9.87 |") for line in table.splitlines() if "| 3 | 24 |" in line] == [True, True]


def test_engine_offline_bench_says_where_the_job_went_on_cpu(tiny_llama: Path) -> None:
    """The offline job on the CPU engine, in unified mode: its prompts take several iterations with prefill chunks
    (the token budget), and the last prompt's request then needs a decode-only step for each token after its
    first."""
    from actors.config import SchedulerConfig
    from cluster.bench.engine_bench import bench_offline, format_table
    from cluster.bench.offline_job import OfflineJob, offline_prompts

    job = OfflineJob(num_requests=6, min_prompt=20, max_prompt=40, output_tokens=6)
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    prompt_tokens = sum(map(len, offline_prompts(vocab, job)))
    [row] = bench_offline(str(tiny_llama), "unified", [None], job,
                          scheduler=SchedulerConfig(max_prefill_tokens=64, max_decode_seqs=8))
    assert row["output_tokens"] == 36 and row["seconds"] > 0
    [(name, phases)] = row["phases"].items()
    assert name == "unified"
    assert phases["prefill_iterations"] >= -(-prompt_tokens // 64) and phases["decode_steps"] >= job.output_tokens - 1
    assert 0 < phases["prefill_s"] + phases["decode_s"] <= row["seconds"]
    table = format_table(dict(model="m", device="cpu", date="d", commit="c", command="x",
                              ceilings=dict(copy_TBps=1.0, matmul_TFLOPs=1.0), offline=[row]))
    assert f"| unified | fa2 | {row['prefill_sms']} | unified | {phases['prefill_iterations']} | " in table
    assert row["gpu"] == {}  # no clock samples off a GPU
    assert f"| {row['output_tokens_per_s']:.0f} | {row['total_tokens_per_s']:.0f} | - |" in table


def test_engine_contention_bench_runs_on_cpu(tiny_llama: Path) -> None:
    """The GPU engine benchmark's contention part on the CPU engine: per split, in the order given, one row per
    decode condition (idle, back to back, each pace), every one timing the same prompts, with the decode batch's
    context at the start; no telemetry off a GPU."""
    from cluster.bench.engine_bench import bench_contention, format_table

    rows = bench_contention(str(tiny_llama), (72, 64), 2, (5.0,), prompts=3, prompt_len=48, ctx=16)
    assert [(r["prefill_sms"], r["decode"], r["decode_batch"], r["pace_ms"]) for r in rows] == [
        (72, "idle", 0, None), (72, "back to back", 2, None), (72, "paced 5 ms", 2, 5.0),
        (64, "idle", 0, None), (64, "back to back", 2, None), (64, "paced 5 ms", 2, 5.0)]
    assert all(r["prefill_tokens_per_s"] > 0 and r["prompts"] * r["prompt_len"] == 144 for r in rows)
    assert rows[0]["decode_step_ms"] is None and rows[0]["paced_s"] == rows[1]["paced_s"] == 0.0
    assert rows[0]["decode_context_tokens"] == 0 and all(r["decode_context_tokens"] >= 2 * 16 for r in rows[1:3])
    assert "sm_clock_mhz" not in rows[0]
    table = format_table(dict(model="m", device="cpu", date="d", commit="c", command="x",
                              ceilings=dict(copy_TBps=1.0, matmul_TFLOPs=1.0), contention=rows))
    assert "| idle | 0 | " in table and "| 1.00x | - | - | - |" in table and "| paced 5 ms | 2 | " in table


def test_gpu_telemetry_summary_from_nvidia_smi_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.bench.telemetry import main, parse_telemetry, summarize

    samples = parse_telemetry("1980, 650.5\n[N/A], 10\nFailed to initialize NVML\n1755, 699.5\n")
    assert samples == [(1980.0, 650.5), (1755.0, 699.5)]
    assert summarize(samples) == dict(sm_clock_mhz=1867.5, sm_clock_min_mhz=1755.0, power_w=675.0, power_max_w=699.5,
                                      peak_samples=1.0, peak_power_threshold_w=689.7, peak_sm_clock_mhz=1755.0,
                                      peak_power_w=699.5)
    log = tmp_path / "w.gpu.csv"
    log.write_text("1980, 123.5\n1980, 122.5\n1500, 690\n1520, 700\n1980, 450\n")  # idle, load, the drain
    assert main(["summary", str(log)]) == 0 and main(["summary", str(tmp_path / "none.csv")]) == 0
    assert capsys.readouterr().out == (
        "GPU during the run: SM clock 1792 MHz mean, 1500 min; power 417 W mean, 700 max; "
        "near peak power (2 samples at 584 W or more): SM clock 1510 MHz, power 695 W\n\n")
    assert main([str(log)]) == 2 and "usage:" in capsys.readouterr().err


def test_fresh_process_returns_raises_and_gives_up_after_its_timeout() -> None:
    """`in_fresh_process` runs in another process, brings back a result or the exception raised there, and stops
    waiting for (and kills) a call that overruns its timeout."""
    import multiprocessing
    import os
    import time

    from cluster.bench.engine_bench import in_fresh_process

    assert in_fresh_process(os.getpid) != os.getpid()
    with pytest.raises(ValueError, match="invalid literal"):
        in_fresh_process(int, "not a number")
    t0 = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError, match="sleep did not return within 1 s"):
        in_fresh_process(time.sleep, 600, timeout=1)
    assert time.monotonic() - t0 < 60


def test_prefix_cache_share_from_the_metric_deltas_of_semipd_and_vllm() -> None:
    result = _result(_ttft_records([100.0]))
    result.server_metrics = {"delta": {  # two semipd engines
        'vllm:prefix_cache_queries_total{engine="g0",model_name="m"}': 30000.0,
        'vllm:prefix_cache_hits_total{engine="g0",model_name="m"}': 6000.0,
        'vllm:prefix_cache_queries_total{engine="g1",model_name="m"}': 10000.0,
        'vllm:prefix_cache_hits_total{engine="g1",model_name="m"}': 0.0,
    }}
    assert prefix_cache_counts(result) == (40000.0, 6000.0)
    assert format_prefix_cache(result) == "Prefix cache during the run: 6,000 of 40,000 prompt tokens hit (15.0%)"
    result.server_metrics = {"delta": {  # vLLM: prometheus_client counters also export *_created
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"}': 512.0,
        'vllm:prefix_cache_queries_created{engine="0",model_name="m"}': 0.0,
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"}': 512.0,
    }}
    assert format_prefix_cache(result) == "Prefix cache during the run: 512 of 512 prompt tokens hit (100.0%)"
    result.server_metrics = {"delta": {'semipd:sm_repartitions_total{engine="g0",model_name="m"}': 1.0}}
    assert prefix_cache_counts(result) is None and format_prefix_cache(result) == ""


def test_engine_prefill_bench_splits_launch_from_step_on_cpu(tiny_llama: Path) -> None:
    """The prefill part on the CPU engine: each row's host launch is part of its step."""
    from cluster.bench.engine_bench import Ceilings, bench_prefill, format_table, make_core

    core = make_core(str(tiny_llama), "unified")
    try:
        rows = bench_prefill(core, Ceilings(1e12, 1e12), ((1, 32), (2, 48)), reps=3)
    finally:
        core.shutdown()
    assert [(r["requests"], r["length"], r["tokens"]) for r in rows] == [(1, 32, 32), (2, 48, 96)]
    assert all(0 < r["launch_ms"] <= r["ms"] for r in rows)
    assert core.allocator.num_free == core.allocator.num_blocks  # the bench gave its pages back
    table = format_table(dict(model="m", device="cpu", date="d", commit="c", command="x",
                              ceilings=dict(copy_TBps=1.0, matmul_TFLOPs=1.0), prefill=rows))
    assert "| requests | length | ms | of which host launch ms |" in table and "\n| 2 | 48 | " in table


def test_engine_decode_table_sets_vllms_step_beside_ours_at_the_same_batch_and_context() -> None:
    """`bench/vllm_offline.py` writes vLLM's decode steps into its JSON (`decode`); the decode table puts each beside
    our row of the same batch and context, as a ratio to our roofline, and leaves rows vLLM did not run blank."""
    from cluster.bench.engine_bench import format_table

    ours = [dict(batch=b, context=512, step_ms=5.0 + b / 8, roofline_ms=4.0, ratio=(5.0 + b / 8) / 4.0,
                 tokens_per_s=b / (5.0 + b / 8) * 1e3) for b in (1, 8, 32)]
    vllm = dict(version="0.26.0", seconds=5.0, output_tokens_per_s=1.0, total_tokens_per_s=2.0,
                decode=[dict(batch=1, context=512, step_ms=4.8), dict(batch=8, context=512, step_ms=6.0),
                        dict(batch=1, context=2048, step_ms=5.5)])
    table = format_table(dict(model="m", device="cpu", date="d", commit="c", command="x",
                              ceilings=dict(copy_TBps=1.0, matmul_TFLOPs=1.0), decode=ours, vllm=vllm))
    assert "| vLLM step ms (its loop) | vLLM ratio |" in table
    assert "| fa2 | 1 | 512 | 5.12 | 4.00 | 1.28x | 195 | 4.80 | 1.20x |" in table
    assert "| fa2 | 8 | 512 | 6.00 | 4.00 | 1.50x | 1333 | 6.00 | 1.50x |" in table
    assert "| fa2 | 32 | 512 | 9.00 | 4.00 | 2.25x | 3556 | - | - |" in table


def test_kernel_time_reads_a_trace_and_splits_idle_time_at_the_last_prefill(tmp_path: Path) -> None:
    """The tables `bench/offline_profile.py` and `bench/vllm_offline.py` (with a profile directory) print, from a
    Chrome trace as torch's profiler writes it (gzipped; CPU events and zero-length ones ignored)."""
    import gzip

    from cluster.bench.kernel_time import chrome_trace_kernels, kind_of, report

    def event(cat: str, name: str, ts: float, dur: float) -> dict[str, Any]:
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, pid=0, tid=7)

    events = [
        event("cpu_op", "aten::mm", 0, 5000),
        event("kernel", "nvjet_sm90_tst_192x192_gemm", 0, 1000),
        event("kernel", "flashinfer::PrefillWithKVCacheKernel<...>", 1000, 500),
        event("kernel", "void vllm::rms_norm_kernel<c10::BFloat16>", 1500, 0),
        event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 1500, 10),
        event("kernel", "void vllm::reshape_and_cache_flash_kernel<...>", 1600, 100),  # 90 us after the copy
        event("kernel", "nvjet_sm90_tst_128x64_gemm", 2700, 300),  # 1,000 us after
    ]
    path = tmp_path / "worker.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(dict(traceEvents=events), f)

    kernels = chrome_trace_kernels(path)
    assert [k.name[:6] for k in kernels] == ["nvjet_", "flashi", "Memcpy", "void v", "nvjet_"]
    assert [kind_of(k.name) for k in kernels] == ["gemm", "attention", "copy", "kv write", "gemm"]
    text = report(kernels, wall_s=0.003, split_after="PrefillWithKVCacheKernel")
    assert "GPU busy 0.00 s (64%)" in text  # 1,910 us of 3,000
    assert "| gemm | 0.001 | 43.3% |" in text
    assert "GPU idle with prefill: 0.000 s in 0 gaps" in text  # nothing idle before the prefill kernel ended
    assert "GPU idle decode-only: 0.001 s in 2 gaps" in text  # 90 + 1,000 us after it
    assert "| 1000 | void vllm::reshape_and_cache_flash_kernel<...> | nvjet_sm90_tst_128x64_gemm |" in text
    assert "GPU idle in all: 0.001 s in 2 gaps" in report(kernels, wall_s=0.003)


@pytest.mark.timeout(180)
def test_the_stall_probe_runs_each_arm_in_its_own_process_with_its_module_loading(tiny_llama: Path) -> None:
    """`bench/stall_probe.py` (run 32's experiment: do decode's stalls go with CUDA_MODULE_LOADING=EAGER?) builds a
    fresh engine per arm with the loading mode in that process's environment, and prints one row per arm; a wave
    the engine refuses (documents past the tiny model's 2,048 positions) fails the probe instead of printing an
    empty row."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_MODULE_LOADING"} | {"PYTHONPATH": str(root)}

    def probe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(root / "bench" / "stall_probe.py"), str(tiny_llama), *args],
                              capture_output=True, text=True, env=env, timeout=150)

    done = probe("--loading", "lazy,eager", "--draws", "yes", "--requests", "4", "--waves", "2", "--gap-s", "0.01")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| lazy", "| eager"))]
    assert [r.split("|")[1:3] for r in rows] == [[" lazy ", " yes "], [" eager ", " yes "]]
    assert all(int(r.split("|")[9]) >= 127 for r in rows)  # decode steps: 4 requests of 128 tokens, batched
    refused = probe("--prompts", "documents", "--draws", "yes", "--requests", "1", "--waves", "1")
    assert refused.returncode != 0 and "waves failed" in refused.stderr
    traced = probe("--draws", "yes", "--prefill-overlap", "yes,no", "--requests", "2", "--waves", "1", "--trace",
                   "--stacks")
    assert traced.returncode == 0, traced.stderr
    rows = [line for line in traced.stdout.splitlines() if line.startswith("| lazy")]
    assert [r.split("|")[2:4] for r in rows] == [[" yes ", " yes "], [" yes ", " no "]]
    assert all(float(r.split("|")[7]) > 0 and float(r.split("|")[8].replace(",", "")) > 0 for r in rows)
    for overlap in ("yes", "no"):
        arm = f"lazy loading, draws yes, prefill overlap {overlap}"
        assert f"longest CUDA calls, {arm}:\n  no CUDA calls in the trace" in traced.stdout
        assert f"the workers' stacks during decode's iterations over 100 ms, {arm}:\n" in traced.stdout


def test_the_longest_cuda_calls_of_a_trace_come_with_what_ran_beside_them() -> None:
    """`long_calls` (`bench/stall_probe.py --trace`) reads torch's chrome trace: a CUDA call of 50 ms or more,
    longest first, with its thread, the innermost torch op of that thread around it, the other threads' calls by
    their overlap, and the kernels then running by stream; shorter calls are not listed."""
    from cluster.bench.kernel_time import long_calls

    def x(cat: str, name: str, tid: int, ts: float, dur: float, **args: Any) -> dict[str, Any]:
        return {"ph": "X", "cat": cat, "name": name, "tid": tid, "ts": ts, "dur": dur, "args": args}

    events = [
        {"ph": "M", "name": "thread_name", "tid": 1, "args": {"name": "python"}},
        x("cpu_op", "replay", 1, 990.0, 160_000.0), x("cpu_op", "aten::outer", 1, 900.0, 200_000.0),
        x("cuda_runtime", "cudaGraphLaunch", 1, 1_000.0, 150_000.0),
        x("cuda_driver", "cuLaunchKernel", 2, 1_000.0, 20.0),
        x("cuda_runtime", "cudaMemcpyAsync", 2, 2_000.0, 148_000.0),
        x("cuda_runtime", "cudaLaunchKernel", 2, 152_000.0, 10.0),  # after both: beside neither
        x("cuda_runtime", "cudaStreamSynchronize", 3, 400_000.0, 60_000.0),
        x("cuda_runtime", "cudaEventRecord", 3, 600_000.0, 40_000.0),  # under 50 ms
        x("kernel", "gemm_" + "x" * 80, 7, 0.0, 140_000.0, stream=7),
        x("kernel", "flash_fwd", 9, 100_000.0, 10_000.0, stream=9),
    ]
    gemm = "gemm_" + "x" * 40 + "..."
    assert long_calls(events, {1: "decode", 2: "prefill"}) == [
        "decode cudaGraphLaunch 150.0 ms at +0.000 s in replay | other threads' calls meanwhile: prefill "
        f"cudaMemcpyAsync 148.0 ms; prefill cuLaunchKernel 0.0 ms | kernels meanwhile (2): stream 7 {gemm} 139.0 ms; "
        "stream 9 flash_fwd 10.0 ms",
        "prefill cudaMemcpyAsync 148.0 ms at +0.001 s in no torch op | other threads' calls meanwhile: decode "
        f"cudaGraphLaunch 150.0 ms | kernels meanwhile (2): stream 7 {gemm} 138.0 ms; stream 9 flash_fwd 10.0 ms",
        "thread 3 cudaStreamSynchronize 60.0 ms at +0.399 s in no torch op | other threads' calls meanwhile: none | "
        "kernels meanwhile (0): none",
    ]
    assert long_calls([x("kernel", "k", 7, 0.0, 1.0)], {}) == ["no CUDA calls in the trace"]
    assert long_calls(events[:4], {}, min_ms=500.0) == ["no CUDA call of 500 ms or more"]


def test_stack_samples_are_counted_per_thread_inside_the_stall_windows_only() -> None:
    """`stacks_in` (`bench/stall_probe.py --stacks`): per thread, the share of each stack among its samples inside
    the windows, commonest first; samples outside are left out, and the sampler's late samples that began inside
    are counted (the interpreter lock held)."""
    from cluster.bench.stacks import StackSample, stacks_in

    samples = [StackSample(1.00, "decode", "core.py:10 replay"), StackSample(1.01, "decode", "core.py:10 replay"),
               StackSample(1.02, "decode", "lock.py:5 acquire"), StackSample(1.01, "prefill", "model.py:7 mm"),
               StackSample(5.00, "decode", "elsewhere.py:1 idle")]
    assert stacks_in(samples, [(1.05, 0.04), (3.0, 0.2)], [(0.99, 1.03), (4.0, 4.1)]) == [
        "decode: 3 samples in 2 windows", "  67% core.py:10 replay", "  33% lock.py:5 acquire",
        "prefill: 1 samples in 2 windows", "  100% model.py:7 mm",
        "sampler late by 20 ms or more inside them: 0 times",
    ]
    assert stacks_in(samples, [(1.0, 0.05)], [(0.99, 1.03)])[-1] == (
        "sampler late by 20 ms or more inside them: 1 times, longest 50 ms")
    assert stacks_in(samples, [], []) == ["no windows"]


def test_the_stack_sampler_sees_where_a_thread_waits() -> None:
    """`StackSampler` samples each named thread's innermost frames while it is entered: a thread parked in
    `Event.wait` shows that wait under its own function."""
    import threading

    from cluster.bench.stacks import StackSampler

    release, parked = threading.Event(), threading.Event()

    def park_here() -> None:
        parked.set()
        release.wait(10)

    worker = threading.Thread(target=park_here)
    worker.start()
    parked.wait(10)
    assert worker.ident is not None
    with StackSampler({worker.ident: "parked"}, every_s=0.001, depth=3) as sampler:
        while len(sampler.samples) < 3:
            threading.Event().wait(0.001)
    release.set()
    worker.join()
    assert {s.thread for s in sampler.samples} == {"parked"}
    assert any("park_here" in s.stack and s.stack.startswith("threading.py:") for s in sampler.samples)
    with pytest.raises(ValueError):
        StackSampler({}, every_s=0)


def test_the_lazy_load_probe_says_it_needs_a_gpu_where_there_is_none() -> None:
    """`bench/lazy_load_probe.py` times a kernel's first launch beside queued GPU work (torch only); without a CUDA
    device it stops with a message and a non-zero status instead of a traceback."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / "lazy_load_probe.py")], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == "lazy_load_probe: needs a CUDA device"


def test_carry_room_moves_what_a_device_call_does_not_need_out_of_the_checkout_and_back(tmp_path: Path) -> None:
    """`bench/carry_room.sh aside tests wheels` leaves the committed raw results, the tests and four wheels out of
    what a device call carries (and says how much is left); `back` puts every one where it was."""
    import shutil
    import subprocess

    repo = tmp_path / "main"
    files = {"bench/carry_room.sh": (Path(__file__).parents[1] / "bench" / "carry_room.sh").read_text(),
             "docs/perf/2026-12-06-h100/run.json": "{}" * 300_000, "docs/perf/chat.png": "png",
             "docs/perf/README.md": "kept", "tests/test_x.py": "x = 1\n", "actors/a.py": "a = 1\n"}
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    wheels = repo / ".device" / "wheels"
    wheels.mkdir(parents=True)
    for wheel in ("websockets-17.4-cp312.whl", "python_dotenv-1.2.4-py3.whl", "grpcio-1.85.4-cp312.whl"):
        (wheels / wheel).write_text("w")
    (repo / ".gitignore").write_text("/.device/\n")
    git = shutil.which("git")
    assert git is not None
    subprocess.run([git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([git, "add", "-A"], cwd=repo, check=True)

    def room(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "bench/carry_room.sh", *args], cwd=repo, capture_output=True, text=True)

    before = room("size")
    assert before.returncode == 0 and re.search(r"carry: 0\.6 MiB of 64 \(tree 0\.6, \.device 0\.0\)", before.stdout)
    moved = room("aside", "tests", "wheels")
    assert moved.returncode == 0, moved.stderr
    assert re.search(r"carry: 0\.0 MiB of 64", moved.stdout)
    left = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")
                  if p.is_file() and ".git/" not in p.as_posix())
    assert left == [".device/wheels/grpcio-1.85.4-cp312.whl", ".gitignore", "actors/a.py", "bench/carry_room.sh",
                    "docs/perf/README.md"]
    assert (tmp_path / ".carry-aside" / "docs/perf/2026-12-06-h100/run.json").is_file()
    assert room("aside", "docs").returncode == 2
    assert room("back").returncode == 0
    for name, text in files.items():
        assert (repo / name).read_text() == text, name
    assert sorted(p.name for p in wheels.iterdir()) == ["grpcio-1.85.4-cp312.whl", "python_dotenv-1.2.4-py3.whl",
                                                        "websockets-17.4-cp312.whl"]
    assert not (tmp_path / ".carry-aside").exists()

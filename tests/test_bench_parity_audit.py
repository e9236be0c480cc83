"""`semipd bench serve` against `vllm bench serve` (vLLM 0.26: vllm/benchmarks/serve.py get_request, benchmark,
main_async; vllm/benchmarks/lib/endpoint_request_func.py): the arrival schedule (its first gap, burstiness inf,
the request-rate ramp), the request body a strict OpenAI server accepts, the output token count of a stream
without usage, the tokenizer of a model served under another name, the printed result block and the result JSON's
setup keys. Servers are real HTTP servers: a minimal strict OpenAI-compatible one, and ours.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.bench.arrivals import ArrivalConfig, arrival_offsets
from cluster.bench.client import RequestRecord
from cluster.bench.metrics import SLOs, compute_metrics
from cluster.bench.report import format_preamble, format_result_block
from cluster.bench.result import BenchResult, load_result
from cluster.cli import main as cli_main

from support import LiveServer

SERVED = "other-model"
TOKENS_PER_CHUNK = 2
CHUNK_TEXT = " hello world"  # what one chunk of TOKENS_PER_CHUNK tokens reads
ALLOWED = {  # the body fields OpenAI's API knows (of those a benchmark sends); anything else is a 400
    "completions": {"model", "prompt", "max_tokens", "temperature", "stream", "stream_options", "top_p", "seed"},
    "chat": {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stream", "stream_options",
             "top_p", "seed"},
}


class OtherServer:
    """An OpenAI-compatible server that is not ours: one model, `/v1/models` without `root` or `max_model_len`, no
    `/tokenize`, `/metrics` or `/splits`; with `strict`, a body field OpenAI does not know is a 400 as OpenAI answers
    it (else ignored); every streamed chunk carries TOKENS_PER_CHUNK tokens (a chat stream starts with OpenAI's role
    chunk); the usage chunk only when `usage` and the body asks for it. `paths`: every request's path; `bodies`:
    every generation body."""

    def __init__(self, usage: bool = True, strict: bool = False) -> None:
        self.usage = usage
        self.strict = strict
        self.paths: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.http = LiveServer(self._app())

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Response:
            self.paths.append(request.url.path)
            return await call_next(request)

        @app.get("/v1/models")
        async def models() -> Any:
            return {"object": "list", "data": [{"id": SERVED, "object": "model", "owned_by": "someone"}]}

        async def generate(request: Request, kind: str) -> Response:
            body = await request.json()
            self.bodies.append(body)
            unknown = sorted(set(body) - ALLOWED[kind])
            if self.strict and unknown:
                return JSONResponse({"error": {"message": f"Unrecognized request argument supplied: {unknown[0]}",
                                               "type": "invalid_request_error"}}, status_code=400)
            return StreamingResponse(iter(self._events(kind, body)), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await generate(request, "completions")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await generate(request, "chat")

        return app

    def _events(self, kind: str, body: dict[str, Any]) -> list[bytes]:
        n = int(body["max_completion_tokens"] if "max_completion_tokens" in body else body["max_tokens"])
        chunks = math.ceil(n / TOKENS_PER_CHUNK)
        events: list[dict[str, Any]] = []
        if kind == "chat":
            events.append({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
        for i in range(chunks):
            finish = "length" if i == chunks - 1 else None
            part = {"delta": {"content": CHUNK_TEXT}} if kind == "chat" else {"text": CHUNK_TEXT}
            events.append({"choices": [{"index": 0, **part, "finish_reason": finish}]})
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            events.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n,
                                                    "total_tokens": 7 + n}})
        return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]

    def __enter__(self) -> OtherServer:
        self.http.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.stop()


@pytest.fixture
def other() -> Iterator[OtherServer]:
    with OtherServer() as server:
        yield server


def _bench(url: str, out_dir: Path, *extra: str) -> list[str]:
    return ["bench", "serve", "--base-url", url, "--workload", "random", "--input-len", "8", "--output-len", "5",
            "--num-prompts", "4", "--disable-tqdm", "--request-timeout", "30", "--result-dir", str(out_dir),
            "--result-filename", "run.json", *extra]


# ---------------------------------------------------------------- arrivals


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_the_first_request_waits_its_gap_and_the_last_arrives_at_n_over_rate(burstiness: float) -> None:
    """vLLM's get_request sleeps every request's cumulative delay, the first one's own gap included, after rescaling
    them so that the last is at N / rate: a window of N requests lasts N / rate seconds, its request throughput
    counted over that, whatever the burstiness and the seed."""
    n, rate = 50, 10.0
    for seed in range(5):
        offsets = arrival_offsets(ArrivalConfig(rate, burstiness, seed), n)
        assert offsets[0] > 0 and np.all(np.diff(offsets) >= 0)
        assert offsets[-1] == pytest.approx(n / rate)
    scales = np.repeat([4.0, 1.0], [40, 10])
    assert arrival_offsets(ArrivalConfig(rate, burstiness, 1), n, scales)[-1] == pytest.approx(
        40 / (4 * rate) + 10 / rate)


def test_infinite_burstiness_sends_at_constant_gaps() -> None:
    """vLLM takes burstiness inf (`--burstiness inf`) as the gamma's limit: every gap is 1 / rate."""
    offsets = arrival_offsets(ArrivalConfig(8.0, math.inf, 3), 6)
    assert offsets == pytest.approx(np.arange(1, 7) / 8.0)
    assert format_preamble(8.0, math.inf, None).splitlines()[1] == "Burstiness factor: inf (Gamma distribution)"
    assert _exit_code(["bench", "serve", "--burstiness", "nan", "--base-url", "http://127.0.0.1:1"]) == 2


def test_burstiness_inf_runs_from_the_command_line(other: OtherServer, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(_bench(other.http.url, tmp_path, "--request-rate", "40", "--burstiness", "inf"))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Burstiness factor: inf (Gamma distribution)" in out
    scheduled = [r.scheduled_s for r in load_result(tmp_path / "run.json").records]
    assert scheduled == pytest.approx([0.025, 0.05, 0.075, 0.1])


@pytest.mark.parametrize("strategy, rates", [
    ("linear", [2.0, 4.0, 6.0, 8.0, 10.0]),
    ("exponential", [2.0 * 5 ** (i / 4) for i in range(5)]),
])
def test_ramp_up_draws_each_gap_at_its_request_rate_without_rescaling(strategy: str, rates: list[float]) -> None:
    """vLLM's _get_current_request_rate: request i of N at start + (end - start) * i / (N - 1) (linear) or
    start * (end / start) ** (i / (N - 1)) (exponential); each gap drawn at that rate, their sum not rescaled."""
    from cluster.bench.arrivals import RampUp

    ramp = RampUp(strategy, 2.0, 10.0)
    assert ramp.rates(5) == pytest.approx(rates)
    offsets = arrival_offsets(ArrivalConfig(math.inf, math.inf, 0, ramp=ramp), 5)
    assert offsets == pytest.approx(np.cumsum(1.0 / np.asarray(rates)))
    poisson = np.diff(arrival_offsets(ArrivalConfig(math.inf, 1.0, 0, ramp=RampUp(strategy, 5.0, 5.0)), 20000))
    assert 1 / poisson.mean() == pytest.approx(5.0, rel=0.03)  # no rescaling, yet the rate it was drawn at


def test_ramp_up_end_to_end(other: OtherServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM prints the ramp instead of the traffic rate, no configured rate in the block, and writes the ramp and
    the RPS change events into the result."""
    from cluster.bench.arrivals import RampUp

    rc = cli_main(["bench", "serve", "--base-url", other.http.url, "--workload", "random", "--input-len", "8",
                   "--output-len", "3", "--num-prompts", "5", "--disable-tqdm", "--burstiness", "inf",
                   "--ramp-up-strategy", "linear", "--ramp-up-start-rps", "20", "--ramp-up-end-rps", "60",
                   "--save-result", "--result-dir", str(tmp_path), "--label", "ramp"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert "Traffic ramp-up strategy: linear." in lines
    assert "Will increase RPS from 20 to 60 RPS over the duration of the benchmark." in lines
    assert not any(line.startswith(("Traffic request rate:", "Request rate configured")) for line in lines)
    (path,) = tmp_path.glob("*.json")
    assert path.name.startswith("ramp-random-ramp-up-linear-20qps-60qps-")
    raw = json.loads(path.read_text())
    assert (raw["ramp_up_strategy"], raw["ramp_up_start_rps"], raw["ramp_up_end_rps"]) == ("linear", 20.0, 60.0)
    assert [e["rps"] for e in raw["rps_change_events"]] == list(range(20, 61))
    result = load_result(path)
    assert result.ramp_up == RampUp("linear", 20.0, 60.0) and result.metrics.completed == 5
    assert [r.scheduled_s for r in result.records] == pytest.approx(np.cumsum(1 / np.array([20, 30, 40, 50, 60])))


@pytest.mark.parametrize("argv, message", [
    (["--ramp-up-strategy", "linear"], "--ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps"),
    (["--ramp-up-start-rps", "1", "--ramp-up-end-rps", "4"], "need --ramp-up-strategy"),
    (["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1", "--ramp-up-end-rps", "4", "--request-rate", "3"],
     "do not give --request-rate"),
    (["--ramp-up-strategy", "exponential", "--ramp-up-start-rps", "5", "--ramp-up-end-rps", "4"],
     "start RPS 5 is above its end RPS 4"),
    (["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "0", "--ramp-up-end-rps", "4"], "positive"),
    (["--ramp-up-strategy", "sideways"], "invalid choice"),
    (["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1", "--ramp-up-end-rps", "4", "--workload",
      "shifting", "--phases", "sharegpt@2,arxiv"], "phases at their own rates"),
])
def test_bad_ramp_up_flags_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["bench", "serve", "--base-url", "http://127.0.0.1:1", *argv]) == 2
    assert message in capsys.readouterr().err


def _exit_code(argv: list[str]) -> int:
    """The CLI's exit status, whether argparse exits (SystemExit) or the command returns it."""
    try:
        return cli_main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_an_empty_model_name_exits_2_before_any_request(other: OtherServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "serve", "--base-url", other.http.url, "--model", "", "--num-prompts", "1",
                     "--disable-tqdm"]) == 2
    assert "model name must not be empty" in capsys.readouterr().err
    assert other.paths == []


# ---------------------------------------------------------------- another OpenAI-compatible server


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_no_ignore_eos_sends_no_ignore_eos_field(tmp_path: Path, endpoint: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM adds `ignore_eos` to the body only when it is set (_update_payload_common): `--no-ignore-eos` runs
    against a server that refuses fields it does not know (OpenAI's), where `"ignore_eos": false` failed every
    request. Its multi-token chunks: one ITL per chunk, the output tokens and TPOT from the usage, and the chat's
    role chunk no token."""
    with OtherServer(strict=True) as strict:
        rc = cli_main(_bench(strict.http.url, tmp_path, "--endpoint", endpoint, "--no-ignore-eos"))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert strict.bodies and all("ignore_eos" not in body for body in strict.bodies)
    result = load_result(tmp_path / "run.json")
    assert result.metrics.completed == 4 and result.metrics.failed == 0
    for r in result.records:
        chunks = math.ceil(r.max_tokens / TOKENS_PER_CHUNK)
        assert r.output_tokens == r.max_tokens and r.prompt_tokens == 7 and len(r.itl_s) == chunks - 1
        assert r.tpot_s == pytest.approx(sum(r.itl_s) / (r.max_tokens - 1))


def test_chat_asks_for_max_completion_tokens(other: OtherServer, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM's chat request sets `max_completion_tokens` (OpenAI's field; its reasoning models refuse `max_tokens`),
    the completions request `max_tokens`."""
    for endpoint in ("/v1/chat/completions", "/v1/completions"):
        assert cli_main(_bench(other.http.url, tmp_path, "--endpoint", endpoint)) == 0, capsys.readouterr().out
    chat, completions = other.bodies[:4], other.bodies[4:]
    assert all("max_tokens" not in b and b["max_completion_tokens"] == 5 for b in chat)
    assert all("max_completion_tokens" not in b and b["max_tokens"] == 5 for b in completions)


def test_output_tokens_without_usage_are_counted_by_the_tokenizer(tiny_llama: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A server that sends no usage chunk: vLLM counts the output tokens by tokenizing the generated text
    (calculate_metrics; "multiple output tokens may be bundled together" in a chunk), not by counting chunks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    with OtherServer(usage=False) as server:
        rc = cli_main(_bench(server.http.url, tmp_path, "--tokenizer", str(tiny_llama)))
    assert rc == 0, capsys.readouterr().out
    result = load_result(tmp_path / "run.json")
    for r in result.records:
        text = CHUNK_TEXT * r.num_chunks
        assert r.output_tokens == len(tokenizer(text, add_special_tokens=False).input_ids) != r.num_chunks
    assert result.metrics.total_output == sum(r.output_tokens for r in result.records)


def test_result_json_carries_vllms_setup_keys(other: OtherServer, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM's result JSON names the run's model, tokenizer, prompt count and backend at its top level, and spreads
    `--metadata` there too (main_async)."""
    rc = cli_main(_bench(other.http.url, tmp_path, "--endpoint", "/v1/chat/completions", "--metadata", "tp=1",
                         "gpu=h200"))
    assert rc == 0, capsys.readouterr().out
    raw = json.loads((tmp_path / "run.json").read_text())
    assert (raw["model_id"], raw["tokenizer_id"], raw["num_prompts"]) == (SERVED, None, 4)
    assert raw["backend"] == raw["endpoint_type"] == "openai-chat"
    assert (raw["tp"], raw["gpu"]) == ("1", "h200") and raw["metadata"] == {"tp": "1", "gpu": "h200"}


def test_result_json_names_the_commit_and_the_command_that_made_it(other: OtherServer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Each result records where its figures came from: the commit ($SEMIPD_COMMIT where the tree travels without
    .git, as on the GPU machine) and the command line as typed, quoted so that it runs again; the device comes in
    `--metadata`, as bench/gpu_serve_compare.sh passes it."""
    monkeypatch.setenv("SEMIPD_COMMIT", "abc1234")
    args = _bench(other.http.url, tmp_path, "--label", "two words", "--metadata", "device=NVIDIA H100 80GB HBM3")
    assert cli_main(args) == 0, capsys.readouterr().out
    raw = json.loads((tmp_path / "run.json").read_text())
    assert raw["commit"] == "abc1234" and raw["device"] == "NVIDIA H100 80GB HBM3"
    assert raw["command"].startswith("semipd bench serve --base-url ") and "--label 'two words'" in raw["command"]
    assert raw["metadata"] == {"device": "NVIDIA H100 80GB HBM3"}  # the user's pairs only


def test_the_commit_is_that_of_this_checkout_wherever_the_benchmark_runs(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $SEMIPD_COMMIT the commit is the HEAD of the checkout the package runs from, not of the directory
    the command runs in (a benchmark against another server's checkout recorded that one's before)."""
    import subprocess

    from cluster.bench.provenance import REPO, git_commit

    monkeypatch.delenv("SEMIPD_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("this tree is not a git checkout")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)  # a repository without a commit: git would fail here
    assert git_commit() == head.stdout.strip()


def test_a_model_served_under_another_name_gets_its_tokenizer_from_the_models_root(
        tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM takes the tokenizer of a model it did not name from the first model's `root` in `/v1/models`
    (get_first_model_from_server): our server serving the checkpoint as "tiny" gets prompts of exact length, as
    with `--tokenizer`, rather than lengths calibrated through `/tokenize`."""
    from actors.config import EngineConfig
    from support import openai_server

    with openai_server(EngineConfig(model=str(tiny_llama), mode="semi-pd", device="cpu"), "tiny") as (_, url):
        rc = cli_main(_bench(url, tmp_path, "--input-len", "24", "--range-ratio", "0.5", "--no-server-metrics"))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "exact prompt lengths" in out and "approximate" not in out
    result = load_result(tmp_path / "run.json")
    assert result.metrics.completed == 4
    assert [r.prompt_tokens for r in result.records] == [r.prompt_len for r in result.records]
    assert json.loads((tmp_path / "run.json").read_text())["tokenizer_id"] == str(tiny_llama)


# ---------------------------------------------------------------- the printed block


VLLM_BLOCK = ("Successful requests:", "Failed requests:", "Maximum request concurrency:",
              "Request rate configured (RPS):", "Benchmark duration (s):", "Total input tokens:",
              "Total generated tokens:", "Request throughput (req/s):", "Request goodput (req/s):",
              "Output token throughput (tok/s):", "Peak output token throughput (tok/s):", "Peak concurrent requests:",
              "Total token throughput (tok/s):")


def test_result_block_has_vllms_lines_in_vllms_order() -> None:
    """vLLM 0.26 prints "Total token throughput" (lower-case since vllm#30403), after the peaks."""
    records = [RequestRecord(i, "t", 10, 4, start_s=0.1 * i, end_s=0.1 * i + 0.5, success=True, output_tokens=4,
                             ttft_s=0.2, itl_s=[0.1] * 3, e2el_s=0.5, num_chunks=4) for i in range(3)]
    slos = SLOs(ttft_ms=300)
    result = BenchResult("a", "d", 4.0, 1.0, 2, slos, ("ttft",), (99.0,), records, compute_metrics(records, 1.0, slos))
    labels = [line[:40].rstrip() for line in format_result_block(result).splitlines()]
    assert [label for label in labels if label in VLLM_BLOCK] == list(VLLM_BLOCK)

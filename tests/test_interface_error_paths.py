"""Error paths of the user-facing interfaces: the gRPC service, the `semipd` CLI and the `bench serve` client.

Bad user input gets a clear error in the interface's own convention (gRPC INVALID_ARGUMENT naming the field; CLI
message on stderr, exit 2, no traceback), and a misbehaving server never loses a benchmark run: its requests are
counted as failed with their error text, and the run finishes and writes its result.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from actors.engine.frontend import StreamChunk, Tokenizer
from actors.slo.admission import AdmissionRejected
from cluster.bench.client import EndpointConfig, ServerError, fetch_models
from cluster.bench.serve_bench import run_rate
from cluster.bench.workloads import BenchRequest
from cluster.cli import main
from cluster.engine_client import GenerateRequest, ModelInfo
from cluster.grpc_client import GenerationClient, GrpcInvalidArgument, load_stubs
from cluster.grpc_server import GrpcServer

from support import LiveServer, LoopThread, StubReply, free_port, stub_http

pytestmark = pytest.mark.timeout(120)

PB2, _ = load_stubs()


# -- gRPC ----------------------------------------------------------------------------------------


class EchoClient:
    """An EngineClient that answers every request with one token, or refuses it with `error`."""

    def __init__(self, model_dir: Path, error: Exception | None = None) -> None:
        self.info = ModelInfo("tiny", str(model_dir), "LlamaForCausalLM", 512, 512, "unified")
        self.error = error
        self.seen: list[str] = []

    def model_info(self) -> ModelInfo:
        return self.info

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        self.seen.append(request.request_id)
        if self.error is not None:
            raise self.error
        yield StreamChunk(request.request_id, "a", (7,), finish_reason="length",
                          num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=1)

    async def abort(self, request_id: str) -> bool:
        return False

    async def loads(self) -> list[Any]:
        return []


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread(name="interface-errors-loop")
    yield thread
    thread.close()


def start_grpc(loop: LoopThread, client: EchoClient) -> GrpcServer:
    server = GrpcServer(client, Tokenizer(client.info.model_dir), port=0, host="127.0.0.1")  # type: ignore[arg-type]
    loop.run(server.start())
    return server


def test_grpc_deeply_nested_json_schema_is_invalid_argument(tiny_llama: Path, loop: LoopThread) -> None:
    """A schema nested past the JSON decoder's depth is the request's fault: INVALID_ARGUMENT naming the field (it was
    UNKNOWN, a RecursionError), and the server goes on serving."""
    client = EchoClient(tiny_llama)
    server = start_grpc(loop, client)
    try:
        deep = "[" * 5000 + "]" * 5000
        params = PB2.SamplingParams(max_tokens=2, structured_outputs=PB2.StructuredOutputs(json=deep))
        with GenerationClient(f"127.0.0.1:{server.port}", timeout=30) as c:
            with pytest.raises(GrpcInvalidArgument) as e:
                list(c.generate("Hi", params))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "structured_outputs json" in e.value.details
            assert list(c.generate("Hi", PB2.SamplingParams(max_tokens=2)))[-1].finish_reason == "length"
        assert server.in_flight == 0 and len(client.seen) == 1
    finally:
        loop.run(server.stop(grace=1.0))


# -- CLI -----------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    """main()'s exit code; argparse's own usage errors (SystemExit) count as their code."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_generate_grpc_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    addr = f"127.0.0.1:{free_port()}"  # nobody listens there
    assert run_cli(["generate", "--grpc", addr, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("semipd generate: error:") and addr in err and "UNAVAILABLE" in err


def test_generate_grpc_server_refusal_is_a_message_not_a_traceback(tiny_llama: Path, loop: LoopThread,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A server that is up but refuses the request (overloaded): the reason on stderr and exit 1."""
    server = start_grpc(loop, EchoClient(tiny_llama, AdmissionRejected("admission control refused it", 900.0, 100.0)))
    try:
        assert run_cli(["generate", "--grpc", f"127.0.0.1:{server.port}", "--prompt", "hi"]) == 1
    finally:
        loop.run(server.stop(grace=1.0))
    err = capsys.readouterr().err
    assert err.startswith("semipd generate: error:") and "RESOURCE_EXHAUSTED" in err and "admission control" in err


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--json"], ["pin", "--prefill-sms", "4"], ["pin", "--clear"],
], ids=["status", "status-json", "pin", "pin-clear"])
def test_unreachable_redis_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert run_cli([*argv, "--redis", url]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"semipd {argv[0]}: error: cannot reach Redis") and captured.out == ""


def test_make_model_out_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    assert run_cli(["make-model", "--preset", "tiny-llama", "--out", str(taken), "--no-weights"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("semipd make-model: error:") and str(taken) in err


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_make_model_bad_device_exits_2_before_writing(tmp_path: Path, device: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    assert run_cli(["make-model", "--preset", "tiny-llama", "--out", str(out), "--device", device]) == 2
    assert "--device" in capsys.readouterr().err
    assert not out.exists()


def test_run_batch_bad_device_exits_2(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("{}\n")
    argv = ["run-batch", "-i", str(inp), "-o", str(tmp_path / "out.jsonl"), "--model", str(tiny_llama),
            "--device", "bogus"]
    assert run_cli(argv) == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--http-port", "0", "--grpc-port", "70000"], "--grpc-port must be in [0, 65535]"),
    (["--http-port", "-1"], "--http-port must be in [0, 65535]"),
    (["--http-port", "8123", "--grpc-port", "8123"], "--http-port and --grpc-port must differ"),
], ids=["grpc-too-big", "http-negative", "same-port"])
def test_serve_refuses_bad_ports_before_starting(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], flags: list[str],
                                                 message: str) -> None:
    import ray

    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("serve started Ray with ports it cannot bind")

    monkeypatch.setattr(ray, "init", no_ray)
    argv = ["serve", "--model", str(tiny_llama), "--device", "cpu", "--redis", "redis://127.0.0.1:1/0", *flags]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("semipd serve: error:") and message in err


# -- bench serve ---------------------------------------------------------------------------------


def _sse(*data: str) -> bytes:
    return "".join(f"data: {d}\n\n" for d in data).encode()


TOKEN = json.dumps({"choices": [{"text": "x", "index": 0}]})


def test_bench_odd_json_in_the_stream_fails_only_that_request() -> None:
    """A number too large for an int (1e999 reads as inf) or JSON nested too deeply for the decoder raised out of
    send_request and lost the whole run; now each is a failed request with its error, the others complete. A chunk
    that says `"error": null` is no error."""
    bodies = {
        "ok": _sse(TOKEN, TOKEN, "[DONE]"),
        "inf-usage": _sse(TOKEN, json.dumps({"choices": []}).replace("[]", '[], "usage": {"completion_tokens": 1e999}'),
                          "[DONE]"),
        "deep": _sse(TOKEN, "[" * 100_000 + "]" * 100_000, "[DONE]"),
        "null-error": _sse(TOKEN, json.dumps({"choices": [], "error": None, "usage": {"completion_tokens": 1}}),
                           "[DONE]"),
    }

    def handler(body: dict[str, Any]) -> StubReply:
        return bodies[body["prompt"]]

    kinds = list(bodies)
    requests = [BenchRequest(i, k, 3, 2, "t") for i, k in enumerate(kinds)]

    async def go() -> list[Any]:
        async with stub_http(handler) as (client, url):
            records, _ = await run_rate(client, EndpointConfig(url, "m", timeout_s=10), requests,
                                        [0.0] * len(requests), max_concurrency=2, disable_tqdm=True)
            return records

    by_kind = dict(zip(kinds, asyncio.run(go())))
    assert by_kind["ok"].success and by_kind["null-error"].success and by_kind["null-error"].error is None
    assert not by_kind["inf-usage"].success and "OverflowError" in (by_kind["inf-usage"].error or "")
    assert not by_kind["deep"].success and "RecursionError" in (by_kind["deep"].error or "")


def fake_openai_server(splits_body: bytes = b"<html>catch-all page</html>",
                       models: Any = None) -> Any:
    """A minimal OpenAI-compatible server: one model, streamed completions, and `/splits` answering 200 with
    `splits_body` (as a server with a catch-all page does)."""
    from fastapi import FastAPI
    from fastapi.responses import Response, StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def list_models() -> Any:
        return {"object": "list", "data": models if models is not None else [{"id": "fake", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        return StreamingResponse(iter([_sse(TOKEN, TOKEN, usage, "[DONE]")]), media_type="text/event-stream")

    @app.get("/splits")
    async def splits() -> Response:
        return Response(splits_body, media_type="text/html")

    return app


def test_bench_run_finishes_and_writes_its_result_when_splits_is_not_json(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with LiveServer(fake_openai_server()) as http:
        rc = run_cli(["bench", "serve", "--base-url", http.url, "--workload", "random", "--input-len", "8",
                      "--output-len", "2", "--num-prompts", "3", "--disable-tqdm", "--request-timeout", "30",
                      "--result-dir", str(tmp_path), "--result-filename", "out.json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads((tmp_path / "out.json").read_text())
    assert [r["success"] for r in result["requests"]] == [True] * 3


def test_bench_malformed_model_list_is_a_server_error() -> None:
    """`/v1/models` whose entries are not model cards with an id: ServerError (exit 1 with its message), not a
    KeyError/AttributeError traceback."""

    def handler(body: Any) -> StubReply:
        return web.json_response({"data": ["fake"]})

    async def go() -> None:
        async with stub_http(handler) as (client, url):
            await fetch_models(client, url)

    with pytest.raises(ServerError, match="model cards"):
        asyncio.run(go())


def test_bench_malformed_model_list_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with LiveServer(fake_openai_server(models=[{"object": "model"}])) as http:
        rc = run_cli(["bench", "serve", "--base-url", http.url, "--num-prompts", "1", "--disable-tqdm"])
    assert rc == 1
    assert "model cards" in capsys.readouterr().err

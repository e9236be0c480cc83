"""The gRPC service against a live server with a real (tiny, CPU) engine.

The gRPC server runs on its own event loop thread, next to the OpenAI HTTP app (uvicorn)
over the same engine, so that greedy results can be compared between the two.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actors.config import EngineConfig, SchedulerConfig
from actors.engine.frontend import StreamChunk, Tokenizer
from actors.request import SamplingParams, SamplingParamsError, StructuredOutputsParams
from actors.slo.admission import AdmissionRejected
from cluster.engine_client import GenerateRequest, LocalEngineClient, NoCapacityError
from cluster.grpc_client import (
    AsyncGenerationClient,
    GenerationClient,
    GrpcCallError,
    GrpcInvalidArgument,
    build_request,
    generate_once,
    load_stubs,
    params_to_proto,
)
from cluster.grpc_server import SERVICE_NAME, GrpcServer, params_from_proto
from cluster.openai_api import create_app

from support import LiveServer, LoopThread, wait_until

MAX_MODEL_LEN = 512
MODEL = "tiny"


class RecordingClient(LocalEngineClient):
    """The local engine client, recording how each request's stream ended."""

    def __init__(self, config: EngineConfig, served_name: str) -> None:
        super().__init__(config, served_name)
        self.endings: dict[str, str] = {}  # request id -> finish reason, or "closed-early"

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        ending = "closed-early"
        try:
            async for chunk in super().generate(request):
                if chunk.finish_reason:
                    ending = chunk.finish_reason
                yield chunk
        finally:
            self.endings[request.request_id] = ending


class Live:
    def __init__(self, client: RecordingClient, loop: LoopThread, server: GrpcServer, http_url: str) -> None:
        self.client = client
        self.loop = loop
        self.server = server
        self.addr = f"127.0.0.1:{server.port}"
        self.oa = openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0, timeout=60)

    @property
    def core(self) -> Any:
        return self.client.llm.core

    def idle(self) -> bool:
        return self.core.num_unfinished == 0 and self.core.allocator.usage == 0.0


@pytest.fixture(scope="module")
def live(tiny_llama: Path) -> Iterator[Live]:
    cfg = EngineConfig(model=str(tiny_llama), mode="semi-pd", scheduler=SchedulerConfig(max_model_len=MAX_MODEL_LEN))
    client = RecordingClient(cfg, served_name=MODEL)
    tokenizer = Tokenizer(tiny_llama)
    loop = LoopThread(name="grpc-test-loop")
    server = GrpcServer(client, tokenizer, port=0, host="127.0.0.1")
    http = LiveServer(create_app(client, tokenizer))
    try:
        loop.run(server.start())
        http.start()
        yield Live(client, loop, server, http.url)
    finally:
        http.stop()
        loop.run(server.stop(grace=1.0))
        loop.close()
        client.shutdown()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_generate_streams_the_same_tokens_as_http(live: Live) -> None:
    prompt = "The quick brown fox"
    with GenerationClient(live.addr, timeout=60) as c:
        chunks = list(c.generate(prompt, greedy(12), request_id="grpc-greedy-1"))
    final = chunks[-1]
    assert final.finish_reason == "length" and final.request_id == "grpc-greedy-1"
    assert all(ch.finish_reason is None for ch in chunks[:-1])
    ids = [t for ch in chunks for t in ch.token_ids]
    text = "".join(ch.text for ch in chunks)
    assert len(ids) == final.completion_tokens == 12
    http = live.oa.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
    assert text == http.choices[0].text
    assert http.usage is not None and final.prompt_tokens == http.usage.prompt_tokens
    tokenizer = Tokenizer(live.core.config.model)
    assert [tokenizer.decode([t], skip_special_tokens=False) for t in ids] == http.choices[0].logprobs.tokens  # type: ignore[union-attr]


def test_generate_token_ids_prompt_logprobs_and_async_client(live: Live) -> None:
    async def run() -> list[Any]:
        client = AsyncGenerationClient(live.addr, timeout=60)
        try:
            params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2)
            return [c async for c in client.generate([1, 2, 3, 4], params)]
        finally:
            await client.close()

    chunks = asyncio.run(run())
    lps = [lp for c in chunks for lp in c.logprobs]
    assert len(lps) == 5 and chunks[-1].prompt_tokens == 4
    assert all(len(top) == 2 and lp <= 0 for _, lp, top in lps)
    assert [i for i, _, _ in lps] == [t for c in chunks for t in c.token_ids]


def test_chat_messages_go_through_the_chat_template_as_over_http(live: Live) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    with GenerationClient(live.addr, timeout=60) as c:
        chunks = list(c.generate(messages, greedy(6)))
    http = live.oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,  # type: ignore
                                           extra_body={"ignore_eos": True})
    assert "".join(ch.text for ch in chunks) == http.choices[0].message.content
    assert http.usage is not None and chunks[-1].prompt_tokens == http.usage.prompt_tokens
    empty = build_request([{"role": "user", "content": "x"}], greedy(2))
    del empty.chat.messages[:]
    with GenerationClient(live.addr, timeout=30) as c:
        with pytest.raises(grpc.RpcError) as e:
            list(c.stub.Generate(empty, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "the chat has no messages" in e.value.details()


def test_logit_bias_reaches_the_sampler(live: Live) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={7: 100.0})
    with GenerationClient(live.addr, timeout=60) as c:
        ids = [t for ch in c.generate("Hello", params) for t in ch.token_ids]
    assert ids == [7] * 4


def test_prompt_logprobs_come_with_the_first_token(live: Live) -> None:
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    with GenerationClient(live.addr, timeout=60) as c:
        chunks = list(c.generate([5, 6, 7, 8, 9], params))
    scored = [lp for ch in chunks for lp in ch.prompt_logprobs]
    assert [t for t, _, _, _ in scored] == [6, 7, 8, 9] and chunks[0].prompt_logprobs
    assert all(lp <= 0 and len(top) == 2 and rank >= 1 for _, lp, top, rank in scored)


def test_generate_once_and_cli(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    result = generate_once(live.addr, "Hello", greedy(6), timeout=60)
    assert result["finish_reason"] == "length" and len(result["token_ids"]) == 6
    assert result["num_prompt_tokens"] > 0
    from cluster.cli import main

    assert main(["generate", "--grpc", live.addr, "--prompt", "Hello", "--max-tokens", "6", "--temperature", "0",
                 "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == result["token_ids"] and out["text"] == result["text"]
    assert main(["generate", "--grpc", live.addr, "--prompt", "Hello", "--temperature", "7"]) == 2
    assert "temperature must be in [0, 2]" in capsys.readouterr().err


def test_cancelled_stream_aborts_and_frees_pages(live: Live) -> None:
    wait_until(live.idle, what="the engine to go idle")
    with GenerationClient(live.addr, timeout=60) as c:
        stream = c.generate("Cancel me", greedy(400), request_id="grpc-cancel-1")
        first = next(stream)
        assert first.token_ids
        assert live.core.num_unfinished == 1 and live.core.allocator.usage > 0
        stream.close()  # cancels the call
        wait_until(live.idle, what="the cancelled request's pages to be freed")
    wait_until(lambda: "grpc-cancel-1" in live.client.endings, what="the server to close the stream")
    assert live.client.endings["grpc-cancel-1"] == "closed-early"


def test_abort_rpc_ends_the_stream(live: Live) -> None:
    with GenerationClient(live.addr, timeout=60) as c, GenerationClient(live.addr, timeout=60) as other:
        stream = c.generate("Abort me", greedy(400), request_id="grpc-abort-1")
        next(stream)
        assert other.abort("grpc-abort-1") is True
        final = list(stream)[-1]
        assert final.finish_reason == "abort"
        assert other.abort("grpc-abort-1") is False
    wait_until(live.idle, what="the aborted request's pages to be freed")


PB2, _ = load_stubs()


@pytest.mark.parametrize("prompt,params,message", [
    ("Hi", PB2.SamplingParams(temperature=5.0), "temperature must be in [0, 2]"),
    ("Hi", PB2.SamplingParams(max_tokens=-1), "max_tokens must be at least 1"),
    ([7] * (MAX_MODEL_LEN + 4), PB2.SamplingParams(max_tokens=4),
     f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
     f"{MAX_MODEL_LEN + 8} tokens"),
    ([1, 2, 10**6], PB2.SamplingParams(max_tokens=2), "token ids must be in"),
    ("", PB2.SamplingParams(max_tokens=2), "the prompt is empty"),
    ("Hi", PB2.SamplingParams(cache_salt=""), "cache_salt must be a non-empty string"),
    ("Hi", PB2.SamplingParams(logit_bias={10**6: 1.0}), "logit_bias token ids must be in"),
    ("Hi", PB2.SamplingParams(logit_bias={5: -101.0}), "logit_bias values must be in [-100, 100]"),
    ("Hi", PB2.SamplingParams(structured_outputs=PB2.StructuredOutputs()),
     "structured_outputs needs exactly one of json, regex, choice, grammar and json_object, got none"),
    ("Hi", PB2.SamplingParams(structured_outputs=PB2.StructuredOutputs(json="{not json")),
     "structured_outputs json is not valid JSON"),
    ("Hi", PB2.SamplingParams(structured_outputs=PB2.StructuredOutputs(choice=PB2.ChoiceList())),
     "structured_outputs choice must be a non-empty list of non-empty strings"),
    ("Hi", PB2.SamplingParams(structured_outputs=PB2.StructuredOutputs(json_object=False)),
     "got none"),
    ("Hi", PB2.SamplingParams(structured_outputs=PB2.StructuredOutputs(grammar="start: foo")),
     'unknown name: "foo"'),  # compiled (and refused) by the engine
], ids=["temperature", "negative-max-tokens", "too-long", "bad-token-id", "empty", "empty-cache-salt",
        "logit-bias-token", "logit-bias-value", "structured-no-kind", "structured-bad-json", "structured-no-choices",
        "structured-json-object-false", "structured-bad-grammar"])
def test_invalid_argument(live: Live, prompt: Any, params: Any, message: str) -> None:
    with GenerationClient(live.addr, timeout=30) as c:
        with pytest.raises(GrpcInvalidArgument) as e:
            list(c.generate(prompt, params))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details


def structured(max_tokens: int = 48, **spec: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=StructuredOutputsParams(**spec))


def run_to_end(live: Live, prompt: Any, params: SamplingParams) -> tuple[str, str | None]:
    with GenerationClient(live.addr, timeout=60) as c:
        chunks = list(c.generate(prompt, params))
    return "".join(ch.text for ch in chunks), chunks[-1].finish_reason


def test_structured_outputs_choice_regex_and_json_schema(live: Live) -> None:
    text, reason = run_to_end(live, "Answer:", structured(choice=["yes", "no way"]))
    assert text in ("yes", "no way") and reason == "stop"
    text, reason = run_to_end(live, "Letters:", structured(regex=r"[a-c]{2,5}x"))
    assert re.fullmatch(r"[a-c]{2,5}x", text) and reason == "stop"
    schema = {"type": "object", "additionalProperties": False, "required": ["color", "ok"],
              "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}}}
    text, reason = run_to_end(live, "JSON:", structured(json=schema, disable_any_whitespace=True))
    assert reason == "stop"
    jsonschema.validate(json.loads(text), schema)
    assert not re.search(r"\s", text)


def test_invalid_structured_outputs_do_not_hurt_other_requests(live: Live) -> None:
    """A regex the dataclass accepts but the engine cannot compile: INVALID_ARGUMENT, nothing left queued, and the
    next request (structured or not), as well as one running meanwhile, finish as usual."""
    wait_until(live.idle, what="the engine to go idle")
    with GenerationClient(live.addr, timeout=60) as c, GenerationClient(live.addr, timeout=60) as other:
        running = c.generate("Keep going", greedy(30))
        assert next(running).token_ids
        with pytest.raises(GrpcInvalidArgument) as e:
            list(other.generate("Hi", structured(regex="[a-"), request_id="grpc-bad-regex"))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "structured_outputs" in e.value.details and 'invalid regex "[a-"' in e.value.details
        assert list(running)[-1].finish_reason == "length"
        # the id was never taken: it can be used again, with a valid regex
        chunks = list(other.generate("Hi", structured(regex="[a-c]{2,5}x"), request_id="grpc-bad-regex"))
    assert re.fullmatch(r"[a-c]{2,5}x", "".join(ch.text for ch in chunks)) and chunks[-1].finish_reason == "stop"
    wait_until(live.idle, what="the engine to go idle")


@pytest.mark.parametrize("spec", [
    {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
    {"json": '{"type": "array"}', "disable_any_whitespace": True},
    {"regex": "[a-c]{2,5}x"},
    {"choice": ["yes", "no way"]},
    {"grammar": 'start: "a"+'},
    {"json_object": True},
    {"json_object": True, "disable_any_whitespace": True},
    {"regex": "[0-9]+", "start_after": [7, 8]},
], ids=["json-dict", "json-str", "regex", "choice", "grammar", "json-object", "json-object-compact", "start-after"])
def test_structured_outputs_round_trip(spec: dict[str, Any]) -> None:
    params = SamplingParams(max_tokens=7, structured_outputs=StructuredOutputsParams(**spec))
    msg = params_to_proto(params)
    so = msg.structured_outputs
    kind = next(k for k in ("json", "regex", "choice", "grammar", "json_object") if k in spec)
    assert so.WhichOneof("kind") == kind and so.disable_any_whitespace == spec.get("disable_any_whitespace", False)
    wire = PB2.SamplingParams.FromString(msg.SerializeToString())
    assert params_from_proto(wire) == params
    assert params_from_proto(params_to_proto(SamplingParams())).structured_outputs is None
    assert not params_to_proto(SamplingParams()).HasField("structured_outputs")


def test_structured_outputs_oneof_keeps_one_kind() -> None:
    """The proto's oneof cannot carry two kinds (the last one set wins); the dataclass refuses two."""
    so = PB2.StructuredOutputs(regex="a+")
    so.choice.choices.append("x")
    assert so.WhichOneof("kind") == "choice" and not so.HasField("regex")
    assert params_from_proto(PB2.SamplingParams(structured_outputs=so)).structured_outputs == \
        StructuredOutputsParams(choice=("x",))
    with pytest.raises(SamplingParamsError, match="got regex, choice"):
        StructuredOutputsParams(regex="a+", choice=["x"])


class RefusingClient:
    """An EngineClient that refuses every request with `error`."""

    def __init__(self, info: Any, error: Exception) -> None:
        self.info = info
        self.error = error

    def model_info(self) -> Any:
        return self.info

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        raise self.error
        yield  # pragma: no cover  (makes this an async generator)

    async def abort(self, request_id: str) -> bool:
        return False

    async def loads(self) -> list[Any]:
        return []


@pytest.mark.parametrize("error,code", [
    (AdmissionRejected("request rejected by admission control", 900.0, 100.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoCapacityError("all engines are draining"), grpc.StatusCode.UNAVAILABLE),
], ids=["admission", "no-capacity"])
def test_capacity_errors(live: Live, error: Exception, code: grpc.StatusCode) -> None:
    client = RefusingClient(live.client.model_info(), error)
    server = GrpcServer(client, Tokenizer(live.core.config.model), port=0, host="127.0.0.1")  # type: ignore[arg-type]
    port = live.loop.run(server.start())
    try:
        with GenerationClient(f"127.0.0.1:{port}", timeout=30) as c:
            with pytest.raises(GrpcCallError) as e:
                list(c.generate("Hi", greedy(2)))
        assert e.value.code == code and str(error) in e.value.details
        assert server.in_flight == 0
    finally:
        live.loop.run(server.stop(grace=1.0))


def test_loads_and_model_info(live: Live) -> None:
    with GenerationClient(live.addr, timeout=30) as c:
        info = c.model_info()
        loads = c.loads()
    assert info["name"] == MODEL and info["max_model_len"] == MAX_MODEL_LEN and info["mode"] == "semi-pd"
    assert [l["engine_id"] for l in loads] == ["local"]
    assert loads[0]["healthy"] is True and 0.0 <= loads[0]["stats"]["kv_usage"] <= 1.0


def test_health_serving_then_not_serving_on_drain(live: Live) -> None:
    server = GrpcServer(live.client, Tokenizer(live.core.config.model), port=0, host="127.0.0.1")
    port = live.loop.run(server.start(ready=False))
    addr = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(addr) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            serving = health_pb2.HealthCheckResponse.SERVING
            for service in ("", SERVICE_NAME):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # still loading
            live.loop.run(server.set_serving(True))
            assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status == serving
            # a request in flight while draining finishes; new ones are refused
            with GenerationClient(addr, timeout=60) as c:
                stream = c.generate("Drain", greedy(30))
                next(stream)
                drained = asyncio.run_coroutine_threadsafe(server.drain(timeout=30), live.loop.loop)
                wait_until(lambda: server.draining, what="the drain to start")
                status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(GrpcCallError) as e:
                    list(c.generate("Too late", greedy(2)))
                assert e.value.code == grpc.StatusCode.UNAVAILABLE
                assert list(stream)[-1].finish_reason == "length"
                assert drained.result(timeout=30) is True
    finally:
        live.loop.run(server.stop(grace=1.0))


def test_build_request_round_trip() -> None:
    req = build_request([1, 2], SamplingParams(max_tokens=3, seed=5, stop=("x",), logprobs=1), request_id="r1",
                        ttft_slo_ms=200.0, session_id="s")
    from cluster.grpc_server import params_from_proto

    params = params_from_proto(req.params)
    assert params == SamplingParams(max_tokens=3, seed=5, stop=("x",), logprobs=1)
    assert req.WhichOneof("prompt") == "token_ids" and req.HasField("ttft_slo_ms") and not req.HasField("tpot_slo_ms")
    assert params_from_proto(load_stubs()[0].SamplingParams()) == SamplingParams()
    assert params_from_proto(build_request("x", SamplingParams(detokenize=False)).params).detokenize is False
    assert params_from_proto(build_request("x", SamplingParams(cache_salt="t1")).params).cache_salt == "t1"
    assert params_from_proto(build_request("x", SamplingParams(prompt_logprobs=0)).params).prompt_logprobs == 0
    defaults = {"temperature": 0.0, "top_p": 0.5}
    assert params_from_proto(build_request("x", SamplingParams(top_p=0.9)).params, defaults).top_p == 0.9
    assert params_from_proto(load_stubs()[0].SamplingParams(), defaults) == SamplingParams(temperature=0.0, top_p=0.5)
    assert params_from_proto(build_request("x", SamplingParams(allowed_token_ids=[4, 2])).params).allowed_token_ids == (
        4, 2)
    assert params_from_proto(build_request("x", SamplingParams()).params).allowed_token_ids is None
    biased = SamplingParams(logit_bias={3: -2.5, 1: 4.0})
    assert params_from_proto(build_request("x", biased).params).logit_bias == ((1, 4.0), (3, -2.5))


def test_stubs_import_as_semipd_v1_next_to_proto_plus(tmp_path: Path) -> None:
    """The stubs are the installed package semipd.v1, so they import from anywhere (here a directory
    outside the checkout), also with proto-plus's top-level `proto` (a Ray dependency) imported first."""
    code = (
        "import proto\n"
        "import cluster.grpc_client as g\n"
        "from semipd.v1 import semipd_pb2, semipd_pb2_grpc\n"
        "pb2, stub = g.load_stubs()\n"
        "print(proto.__file__.endswith('site-packages/proto/__init__.py'), pb2.__name__, "
        "pb2 is semipd_pb2 and stub is semipd_pb2_grpc, pb2.GenerateRequest(text='x').text, "
        "hasattr(stub, 'GenerationStub'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "semipd.v1.semipd_pb2", "True", "x", "True"]


def test_completion_carries_the_stop_reason(live: Live) -> None:
    """vLLM's stop_reason: the stop string that ended the request, or its stop token id; none for a length end."""
    with GenerationClient(live.addr, timeout=60) as c:
        chunks = list(c.generate("The quick brown fox", greedy(12)))
        ids, text = [t for ch in chunks for t in ch.token_ids], "".join(ch.text for ch in chunks)
        assert chunks[-1].finish_reason == "length" and chunks[-1].stop_reason is None
        stop = text[len(text) // 2:][:2]
        assert stop
        by_string = list(c.generate("The quick brown fox", replace(greedy(12), stop=(stop,))))[-1]
        by_token = list(c.generate("The quick brown fox", replace(greedy(12), stop_token_ids=(ids[5],))))[-1]
    assert (by_string.finish_reason, by_string.stop_reason) == ("stop", stop)
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", ids[5])

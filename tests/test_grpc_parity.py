"""The gRPC service as the OpenAI HTTP API for the same request: defaults, validation, outputs, status codes, health,
and the clean-up of calls that end early (cancelled, past their deadline).

A scripted engine client (no model runs) stands behind a real gRPC server and client, so that each test controls
what the engine answers and sees what it was asked.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actors.engine.frontend import StreamChunk, Tokenizer
from actors.runner.sampler import TokenLogprobs
from cluster.engine_client import EngineLoad, GenerateRequest, ModelInfo
from cluster.grpc_client import GenerationClient, GrpcCallError, GrpcInvalidArgument, load_stubs
from cluster.grpc_server import SERVICE_NAME, GrpcServer

from support import LoopThread, wait_until

pytestmark = pytest.mark.timeout(120)

PB2, _ = load_stubs()
MAX_MODEL_LEN = 512
VOCAB = 512
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ScriptedEngine:
    """An EngineClient that records each request and answers it with `reply(request)` (one finished chunk by
    default); `hold` makes every stream wait, unfinished, until it is closed."""

    def __init__(self, model_dir: Path, max_model_len: int = MAX_MODEL_LEN, vocab_size: int = VOCAB) -> None:
        self.info = ModelInfo("tiny", str(model_dir), "LlamaForCausalLM", max_model_len, vocab_size, "unified")
        self.requests: list[GenerateRequest] = []
        self.closed: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.hold = False
        self.error: BaseException | None = None
        self.extra: dict[str, Any] = {}
        self.engine_loads: list[EngineLoad] = [EngineLoad("e0")]

    def model_info(self) -> ModelInfo:
        return self.info

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        rid = request.request_id
        self.requests.append(request)
        self.closed[rid] = threading.Event()
        self.started.setdefault(rid, threading.Event()).set()
        try:
            if self.error is not None:
                raise self.error
            if self.hold:
                yield StreamChunk(rid, "a", (7,))
                await asyncio.Event().wait()
            fields = {"text": "a", "token_ids": (7,), **self.extra}
            yield StreamChunk(rid, finish_reason="length", num_prompt_tokens=len(request.prompt_token_ids),
                              num_output_tokens=len(fields["token_ids"]), **fields)
        finally:
            self.closed[rid].set()

    async def abort(self, request_id: str) -> bool:
        return False

    async def loads(self) -> list[EngineLoad]:
        return list(self.engine_loads)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread(name="grpc-parity-loop")
    yield thread
    thread.close()


class Served:
    """A GrpcServer over a ScriptedEngine, on the test loop."""

    def __init__(self, loop: LoopThread, engine: ScriptedEngine, **kwargs: Any) -> None:
        self.loop = loop
        self.engine = engine
        tokenizer = Tokenizer(engine.info.model_dir)
        self.server = GrpcServer(engine, tokenizer, port=0, host="127.0.0.1", **kwargs)  # type: ignore[arg-type]
        loop.run(self.server.start())
        self.addr = f"127.0.0.1:{self.server.port}"

    def client(self, timeout: float | None = 30) -> GenerationClient:
        return GenerationClient(self.addr, timeout=timeout)

    def run(self, prompt: Any, params: Any) -> GenerateRequest:
        """The engine request one Generate call made."""
        with self.client() as c:
            assert list(c.generate(prompt, params))[-1].finish_reason == "length"
        return self.engine.requests[-1]

    def stop(self) -> None:
        self.loop.run(self.server.stop(grace=1.0))


@pytest.fixture
def served(loop: LoopThread, tiny_llama: Path) -> Iterator[Served]:
    s = Served(loop, ScriptedEngine(tiny_llama))
    yield s
    s.stop()


def model_with_generation_config(src: Path, dst: Path, config: dict[str, Any]) -> Path:
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(config))
    return dst


# -- defaults ---------------------------------------------------------------------------------------------------


def test_unset_max_tokens_takes_the_checkpoint_default_capped_by_the_context(loop: LoopThread, tiny_llama: Path,
                                                                              tmp_path: Path) -> None:
    """generation_config.json's max_new_tokens is a default, as over HTTP (vLLM's): a prompt that fits the context
    gets the room left when the default is larger (it was INVALID_ARGUMENT, "maximum context length"); a request's
    own max_tokens is checked as given."""
    model = model_with_generation_config(tiny_llama, tmp_path / "m", {"max_new_tokens": 2048, "temperature": 0.5})
    s = Served(loop, ScriptedEngine(model))
    try:
        req = s.run([5] * 500, PB2.SamplingParams())
        assert req.params.max_tokens == MAX_MODEL_LEN - 500 and req.params.temperature == 0.5
        assert s.run([5] * 10, PB2.SamplingParams(max_tokens=30)).params.max_tokens == 30
        with s.client() as c, pytest.raises(GrpcInvalidArgument, match="maximum context length is 512"):
            list(c.generate([5] * 500, PB2.SamplingParams(max_tokens=100)))
    finally:
        s.stop()


def test_unset_max_tokens_without_a_checkpoint_default_is_16_within_the_context(served: Served) -> None:
    assert served.run([5] * 10, PB2.SamplingParams()).params.max_tokens == 16
    assert served.run([5] * 505, PB2.SamplingParams()).params.max_tokens == MAX_MODEL_LEN - 505


# -- message sizes ----------------------------------------------------------------------------------------------


def test_prompt_logprobs_of_a_long_prompt_reach_the_client(served: Served) -> None:
    """prompt_logprobs 20 of a 16k-token prompt is ~6 MB of protobuf: more than gRPC's default 4 MiB a message
    (the client failed with RESOURCE_EXHAUSTED)."""
    n = 16_000
    top = tuple((t, -1.5) for t in range(20))
    served.engine.extra = {"prompt_logprobs": tuple(TokenLogprobs(i % VOCAB, -2.0, top, 3) for i in range(n))}
    with served.client() as c:
        chunks = list(c.generate([5, 6], PB2.SamplingParams(max_tokens=1, prompt_logprobs=20)))
    scored = [lp for ch in chunks for lp in ch.prompt_logprobs]
    assert len(scored) == n and scored[-1] == ((n - 1) % VOCAB, -2.0, top, 3)
    assert [t for ch in chunks for t in ch.token_ids] == [7] and chunks[-1].finish_reason == "length"


def test_many_tokens_with_logprobs_come_in_messages_under_the_default_limit(served: Served) -> None:
    """A chunk the engine coalesced (a slow reader) with 20 top logprobs a token goes out in several messages, each
    under 4 MiB, the text with the last; a plain channel (gRPC's default limits) reads them all."""
    n = 16_000
    top = tuple((t, -1.5) for t in range(20))
    served.engine.extra = {"token_ids": tuple(i % VOCAB for i in range(n)), "text": "all of it",
                           "logprobs": tuple(TokenLogprobs(i % VOCAB, -0.5, top) for i in range(n))}
    with grpc.insecure_channel(served.addr) as channel:
        stub = load_stubs()[1].GenerationStub(channel)
        request = PB2.GenerateRequest(text="Hi", params=PB2.SamplingParams(max_tokens=1, logprobs=20))
        replies = list(stub.Generate(request, timeout=30))
    chunks = [r.chunk for r in replies if r.WhichOneof("kind") == "chunk"]
    assert len(chunks) > 1 and all(r.ByteSize() < 4 << 20 for r in replies)
    assert [t for c in chunks for t in c.token_ids] == [i % VOCAB for i in range(n)]
    assert [lp.token_id for c in chunks for lp in c.logprobs] == [i % VOCAB for i in range(n)]
    assert [c.text for c in chunks] == [""] * (len(chunks) - 1) + ["all of it"]
    assert replies[-1].complete.finish_reason == "length"


# -- status codes and validation --------------------------------------------------------------------------------


def test_an_engine_failure_is_internal_with_its_message(served: Served) -> None:
    """As HTTP's 500 "internal error: ...": INTERNAL naming the error (it was UNKNOWN, "Unexpected <class ...>"),
    and the call is not left counted in flight."""
    served.engine.error = RuntimeError("the KV pool is corrupt")
    with served.client() as c, pytest.raises(GrpcCallError) as e:
        list(c.generate("Hi", PB2.SamplingParams(max_tokens=2)))
    assert e.value.code == grpc.StatusCode.INTERNAL
    assert e.value.details == "internal error: RuntimeError: the KV pool is corrupt"
    assert served.server.in_flight == 0


@pytest.mark.parametrize("field,value", [("ttft_slo_ms", float("inf")), ("tpot_slo_ms", float("inf")),
                                         ("ttft_slo_ms", float("nan")), ("tpot_slo_ms", 0.0),
                                         ("ttft_slo_ms", -5.0)])
def test_slo_targets_must_be_finite_and_positive(served: Served, field: str, value: float) -> None:
    """As HTTP's x-slo-ttft-ms / x-slo-tpot-ms headers: a positive, finite number of milliseconds (infinity was
    taken, an infinite first-token deadline)."""
    with served.client() as c, pytest.raises(GrpcInvalidArgument, match=f"{field} must be"):
        list(c.generate("Hi", PB2.SamplingParams(max_tokens=2), **{field: value}))
    assert served.engine.requests == []


class GatedTokenizer(Tokenizer):
    """A tokenizer whose encode of a long text waits for `gate` (a stand-in for a slow tokenization)."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 100_000:
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().encode(text[:100], add_special_tokens)


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_a_long_prompt_is_tokenized_off_the_event_loop(loop: LoopThread, tiny_llama: Path, kind: str) -> None:
    """While a long prompt is tokenized, other calls are served (a 1 MB prompt held every stream for as long),
    as over HTTP."""
    s = Served(loop, ScriptedEngine(tiny_llama))
    tokenizer = GatedTokenizer(tiny_llama)
    s.server.tokenizer = tokenizer
    long = "word " * 30_000
    prompt = long if kind == "text" else [{"role": "user", "content": long}]
    try:
        with s.client() as c, s.client(timeout=10) as other:
            pending = threading.Thread(target=lambda: list(c.generate(prompt, PB2.SamplingParams(max_tokens=1))))
            pending.start()
            try:
                assert tokenizer.entered.wait(30)
                assert s.server.in_flight == 1  # a drain now waits for it
                assert other.model_info()["max_model_len"] == MAX_MODEL_LEN
                assert list(other.generate("Hi", PB2.SamplingParams(max_tokens=1)))[-1].finish_reason == "length"
            finally:
                tokenizer.gate.set()
                pending.join(30)
        assert len(s.engine.requests) == 2
    finally:
        s.stop()


# -- health -----------------------------------------------------------------------------------------------------


def health_status(addr: str, service: str = SERVICE_NAME) -> int:
    with grpc.insecure_channel(addr) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


@pytest.mark.parametrize("load", [EngineLoad("e0", healthy=False), EngineLoad("e0", draining=True),
                                  EngineLoad("e0", stats={"seconds_since_progress": 120.0})],
                         ids=["unhealthy", "draining", "stalled"])
def test_health_follows_the_engines(loop: LoopThread, tiny_llama: Path, load: EngineLoad) -> None:
    """NOT_SERVING while no engine serves, as HTTP's /health (it said SERVING with every engine dead or hung),
    SERVING again once one does; Watch streams the changes."""
    engine = ScriptedEngine(tiny_llama)
    s = Served(loop, engine, health_interval_s=0.05)
    try:
        with grpc.insecure_channel(s.addr) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                              timeout=30)
            assert next(watch).status == SERVING
            engine.engine_loads = [load]
            assert next(watch).status == NOT_SERVING
            assert health_status(s.addr) == NOT_SERVING and health_status(s.addr, "") == NOT_SERVING
            engine.engine_loads = [load, EngineLoad("e1")]
            assert next(watch).status == SERVING
            watch.cancel()
    finally:
        s.stop()


def test_health_without_engine_answers_is_not_serving_and_a_drain_stays_not_serving(loop: LoopThread,
                                                                                    tiny_llama: Path) -> None:
    engine = ScriptedEngine(tiny_llama)
    s = Served(loop, engine, health_interval_s=0.05)
    try:
        engine.engine_loads = []
        wait_until(lambda: health_status(s.addr) == NOT_SERVING, what="no engines to be NOT_SERVING")
        engine.engine_loads = [EngineLoad("e0")]
        wait_until(lambda: health_status(s.addr) == SERVING, what="SERVING again")
        assert loop.run(s.server.drain(timeout=5)) is True
        assert health_status(s.addr) == NOT_SERVING
        wait_until(lambda: s.server.engines_ok, what="an engine check")
        assert health_status(s.addr) == NOT_SERVING
    finally:
        s.stop()


def test_an_unknown_model_is_not_found(served: Served) -> None:
    """As HTTP's 404 for a `model` that is not the served one (the request had no model to name: a client of two
    deployments could not tell them apart); the served name or directory, or none, is served."""
    with served.client() as c:
        with pytest.raises(GrpcCallError) as e:
            list(c.generate("Hi", PB2.SamplingParams(max_tokens=1), model="gpt-4"))
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.details == "The model `gpt-4` does not exist."
        for model in ("tiny", served.engine.info.model_dir, None):
            assert list(c.generate("Hi", PB2.SamplingParams(max_tokens=1), model=model))[-1].finish_reason == "length"
    assert len(served.engine.requests) == 3


# -- calls that end early ---------------------------------------------------------------------------------------


def test_a_call_past_its_deadline_closes_its_engine_stream(served: Served) -> None:
    served.engine.hold = True
    with served.client(timeout=2) as c:
        stream = c.generate("Hi", PB2.SamplingParams(max_tokens=5), request_id="late-1")
        assert next(stream).token_ids == (7,)
        with pytest.raises(GrpcCallError) as e:
            list(stream)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert served.engine.closed["late-1"].wait(10)
    wait_until(lambda: served.server.in_flight == 0, what="the call to leave")

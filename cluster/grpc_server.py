"""The semipd gRPC server (grpc.aio): `semipd.v1.Generation` plus `grpc.health.v1.Health`.

    server = GrpcServer(client, tokenizer, port=50051)
    port = await server.start()      # health SERVING once ready
    ...
    await server.drain()             # health NOT_SERVING, new calls UNAVAILABLE, in-flight finish
    await server.stop()

Status codes: INVALID_ARGUMENT (bad parameters, prompt too long, with the message),
RESOURCE_EXHAUSTED (admission refused), UNAVAILABLE (draining, no capacity), INTERNAL (the
engine failed). A cancelled call (client gone, deadline) aborts its request, which frees its
KV pages. Health follows the engines as the HTTP API's `/health` does: NOT_SERVING while no
engine is healthy, not draining and making progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from actors.config import generation_defaults
from actors.engine.core import check_context_length, default_max_tokens
from actors.engine.frontend import StreamChunk, Tokenizer
from actors.request import SamplingParams, StructuredOutputsParams
from actors.runner.sampler import TokenLogprobs
from actors.slo.admission import AdmissionRejected
from cluster.engine_client import (
    HEALTH_STALL_SECONDS, LOADS_TIMEOUT_SECONDS, EngineClient, GenerateRequest, NoCapacityError, off_the_loop_if_long,
)
from cluster.grpc_client import load_stubs

log = logging.getLogger(__name__)

SERVICE_NAME = "semipd.v1.Generation"
_PARAM_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "logprobs", "skip_special_tokens", "detokenize",
                 "cache_salt", "prompt_logprobs")
DEFAULT_MAX_TOKENS = 16  # an unset max_tokens without a checkpoint default (the proto's), capped by the context
MAX_LOGPROBS_PER_MESSAGE = 4096  # ~1.5 MB at 20 top logprobs: a message stays under gRPC's default 4 MiB limit
HEALTH_INTERVAL_S = 5.0


class InvalidRequest(ValueError):
    """The request cannot be served as given (INVALID_ARGUMENT)."""


class UnknownModel(LookupError):
    """The request names a model this server does not serve (NOT_FOUND)."""


def params_from_proto(msg: Any, defaults: dict[str, float | int] | None = None) -> SamplingParams:
    """SamplingParams from the proto message; unset optional fields take `defaults` (the checkpoint's
    `generation_defaults`), else SamplingParams' own."""
    kwargs: dict[str, Any] = dict(defaults or {})
    kwargs.update({name: getattr(msg, name) for name in _PARAM_FIELDS if msg.HasField(name)})
    kwargs.update(stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                  include_stop_str_in_output=msg.include_stop_str_in_output, logit_bias=dict(msg.logit_bias),
                  allowed_token_ids=tuple(msg.allowed_token_ids) or None)
    if msg.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_from_proto(msg.structured_outputs)
    return SamplingParams(**kwargs)


def structured_from_proto(msg: Any) -> StructuredOutputsParams:
    """StructuredOutputsParams from a `StructuredOutputs` message; SamplingParamsError (INVALID_ARGUMENT) when its
    kind is unset or malformed (a grammar that does not compile is found by the engine, also a SamplingParamsError)."""
    kind = msg.WhichOneof("kind")
    kwargs: dict[str, Any] = {"disable_any_whitespace": msg.disable_any_whitespace,
                              "start_after": tuple(msg.start_after)}
    if kind == "choice":
        kwargs["choice"] = tuple(msg.choice.choices)
    elif kind is not None:
        kwargs[kind] = getattr(msg, kind)
    return StructuredOutputsParams(**kwargs)


def status_of(e: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and details a Generate call that failed with `e` ends with."""
    if isinstance(e, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, AdmissionRejected):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is overloaded, retry later: {e}"
    if isinstance(e, NoCapacityError):
        return grpc.StatusCode.UNAVAILABLE, f"no engine can take the request now: {e}"
    if isinstance(e, ValueError):  # SamplingParamsError, PromptTooLongError, InvalidRequest, a duplicate request id
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    log.exception("a Generate call failed", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


class _Generation:
    """The Generation servicer (registered through the generated add_..._to_server)."""

    def __init__(self, owner: GrpcServer) -> None:
        self.owner = owner
        self.pb2, _ = load_stubs()
        self.generation_defaults = generation_defaults(owner.client.model_info().model_dir)

    async def build(self, request: Any) -> GenerateRequest:
        """Validate and tokenize; raises UnknownModel, InvalidRequest / SamplingParamsError / PromptTooLongError."""
        info = self.owner.client.model_info()
        if request.model and request.model not in (info.name, info.model_dir):
            raise UnknownModel(f"The model `{request.model}` does not exist.")
        ids = await self.prompt_ids(request, info.vocab_size)
        if not ids:
            raise InvalidRequest("the prompt is empty")
        msg = request.params
        check_context_length(len(ids), msg.max_tokens if msg.HasField("max_tokens") else None, info.max_model_len)
        params = params_from_proto(msg, self.defaults(len(ids), info.max_model_len))
        params.check_vocab(info.vocab_size)
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            if request.HasField(name) and not (getattr(request, name) > 0 and math.isfinite(getattr(request, name))):
                raise InvalidRequest(f"{name} must be a positive number of milliseconds, got {getattr(request, name)}")
        return GenerateRequest(
            request_id=request.request_id or uuid.uuid4().hex, prompt_token_ids=ids, params=params,
            priority=request.priority,
            ttft_slo_ms=request.ttft_slo_ms if request.HasField("ttft_slo_ms") else None,
            tpot_slo_ms=request.tpot_slo_ms if request.HasField("tpot_slo_ms") else None,
            session_id=request.session_id or None,
        )

    def defaults(self, num_prompt_tokens: int, max_model_len: int) -> dict[str, float | int]:
        """The checkpoint's defaults for the fields a request leaves unset; max_tokens its max_new_tokens, else
        DEFAULT_MAX_TOKENS, capped by the room the prompt leaves in the context (`default_max_tokens`; the
        prompt fits: `check_context_length` came first)."""
        default = self.generation_defaults.get("max_tokens", DEFAULT_MAX_TOKENS)
        return {**self.generation_defaults, "max_tokens": default_max_tokens(num_prompt_tokens, max_model_len, default)}

    async def prompt_ids(self, request: Any, vocab_size: int) -> list[int]:
        """The prompt's token ids; InvalidRequest for no prompt or an id outside the vocabulary."""
        kind = request.WhichOneof("prompt")
        if kind == "text":
            return await self.encode(request.text)
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequest(f"token ids must be in [0, {vocab_size}), got {bad[0]}")
            return ids
        if kind == "chat":
            return await self.chat_ids(request.chat)
        raise InvalidRequest("the request has no prompt (set text, token_ids or chat)")

    async def encode(self, text: str) -> list[int]:
        """Tokenize; long texts off the event loop, so that streams in flight keep flowing."""
        return await off_the_loop_if_long(len(text), self.owner.tokenizer.encode, text)

    async def chat_ids(self, chat: Any) -> list[int]:
        """A `Chat` through the model's chat template; InvalidRequest for what the template refuses."""
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        if not messages:
            raise InvalidRequest("the chat has no messages")
        chars = sum(len(m["content"]) for m in messages)
        try:
            return await off_the_loop_if_long(chars, self.owner.tokenizer.chat_ids, messages)
        except Exception as e:  # a template error is the request's fault
            raise InvalidRequest(f"cannot apply the chat template: {e}") from None

    def logprob(self, lp: TokenLogprobs) -> Any:
        msg = self.pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                    top=[self.pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
        if lp.rank is not None:
            msg.rank = lp.rank
        return msg

    def token_chunks(self, chunk: StreamChunk) -> list[Any]:
        """`chunk`'s output as TokenChunk messages of at most MAX_LOGPROBS_PER_MESSAGE (prompt) logprobs each: a long
        prompt's logprobs lead, in order; many tokens go in slices, the text with the last one. None without output."""
        n = MAX_LOGPROBS_PER_MESSAGE
        lead, ids, lps = chunk.prompt_logprobs, chunk.token_ids, chunk.logprobs
        out = []
        while len(lead) > n:
            out.append(self.token_chunk(prompt_logprobs=lead[:n]))
            lead = lead[n:]
        while len(ids) > n and len(lps) == len(ids):
            out.append(self.token_chunk(ids[:n], lps[:n], lead))
            lead, ids, lps = (), ids[n:], lps[n:]
        if chunk.text or ids or lps or lead:
            out.append(self.token_chunk(ids, lps, lead, chunk.text))
        return out

    def token_chunk(self, token_ids: Sequence[int] = (), logprobs: Sequence[TokenLogprobs] = (),
                    prompt_logprobs: Sequence[TokenLogprobs] = (), text: str = "") -> Any:
        return self.pb2.TokenChunk(text=text, token_ids=list(token_ids), logprobs=[self.logprob(lp) for lp in logprobs],
                                   prompt_logprobs=[self.logprob(lp) for lp in prompt_logprobs])

    def responses(self, rid: str, chunk: StreamChunk) -> list[Any]:
        pb2 = self.pb2
        out = [pb2.GenerateResponse(request_id=rid, chunk=c) for c in self.token_chunks(chunk)]
        if chunk.finish_reason is not None:
            usage = pb2.Usage(prompt_tokens=chunk.num_prompt_tokens, completion_tokens=chunk.num_output_tokens,
                              cached_tokens=chunk.num_cached_tokens)
            complete = pb2.Completion(finish_reason=chunk.finish_reason, usage=usage, error=chunk.error or "")
            if isinstance(chunk.stop_reason, str):
                complete.stop_string = chunk.stop_reason
            elif chunk.stop_reason is not None:
                complete.stop_token_id = chunk.stop_reason
            out.append(pb2.GenerateResponse(request_id=rid, complete=complete))
        return out

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        o = self.owner
        if o.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining")
        o.enter()  # a drain waits for this call from here, its tokenization included
        status: tuple[grpc.StatusCode, str] | None = None
        try:
            req = await self.build(request)
            gen = o.client.generate(req)
            try:
                async for chunk in gen:
                    for msg in self.responses(req.request_id, chunk):
                        yield msg
            finally:
                await gen.aclose()  # type: ignore[attr-defined]  # aborts the request if it is unfinished
        except Exception as e:
            status = status_of(e)
        finally:
            o.leave()
        if status is not None:
            await context.abort(*status)

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.pb2.AbortResponse(found=await self.owner.client.abort(request.request_id))

    async def GetLoads(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        pb2 = self.pb2
        loads = []
        for load in await self.owner.client.loads():
            stats = struct_pb2.Struct()
            stats.update(load.stats)
            loads.append(pb2.EngineLoad(engine_id=load.engine_id, node_id=load.node_id, healthy=load.healthy,
                                        draining=load.draining, in_flight=load.in_flight, stats=stats))
        return pb2.GetLoadsResponse(loads=loads)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        i = self.owner.client.model_info()
        return self.pb2.ModelInfo(name=i.name, model_dir=i.model_dir, architecture=i.architecture,
                                  max_model_len=i.max_model_len, vocab_size=i.vocab_size, mode=i.mode)


class GrpcServer:
    """gRPC front end over an `EngineClient`; run start/drain/stop on one event loop.

    Health is SERVING once ready, until the drain, while some engine is serving (`engines_serving`, asked every
    `health_interval_s`)."""

    def __init__(self, client: EngineClient, tokenizer: Tokenizer, port: int = 50051, host: str = "[::]",
                 health_interval_s: float = HEALTH_INTERVAL_S, health_stall_s: float = HEALTH_STALL_SECONDS) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.host = host
        self.port = port
        self.health_interval_s = health_interval_s
        self.health_stall_s = health_stall_s
        self.draining = False
        self.ready = False
        self.engines_ok = True
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._monitor: asyncio.Task[None] | None = None

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    async def start(self, ready: bool = True) -> int:
        """Bind and serve; returns the bound port (useful with port 0).

        Health is NOT_SERVING until `set_serving(True)` (done here when `ready`).
        """
        _, pb2_grpc = load_stubs()
        self.idle = asyncio.Event()  # bound to the serving loop
        self.idle.set()
        server = grpc.aio.server()
        pb2_grpc.add_GenerationServicer_to_server(_Generation(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self.set_serving(False)
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC server to {self.host}")
        await server.start()
        self._server = server
        self._monitor = asyncio.create_task(self.watch_engines())
        if ready:
            await self.set_serving(True)
        log.info("gRPC server on port %d", self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Ready (or not) to serve; health is SERVING while ready, not draining and some engine serves."""
        self.ready = serving
        await self.publish_health()

    async def publish_health(self) -> None:
        serving = self.ready and not self.draining and self.engines_ok
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def watch_engines(self) -> None:
        """Keep `engines_ok` (and health) up to date, every `health_interval_s`."""
        while True:
            ok = await self.engines_serving()
            if ok != self.engines_ok:
                log.warning("gRPC health: the engines are %s", "serving again" if ok else "not serving")
                self.engines_ok = ok
                await self.publish_health()
            await asyncio.sleep(self.health_interval_s)

    async def engines_serving(self) -> bool:
        """Whether some engine is healthy, not draining and making progress (HTTP's `/health`); False when the
        engines do not answer within LOADS_TIMEOUT_SECONDS."""
        try:
            loads = await asyncio.wait_for(self.client.loads(), LOADS_TIMEOUT_SECONDS)
        except Exception as e:
            log.warning("gRPC health: the engines do not answer: %s: %s", type(e).__name__, e)
            return False
        return any(load.serving_problem(self.health_stall_s) is None for load in loads)

    async def drain(self, timeout: float = 30.0) -> bool:
        """NOT_SERVING, refuse new calls, wait for in-flight ones; True if they all finished."""
        self.draining = True
        await self.publish_health()
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self.idle.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving; calls still running after `grace` seconds are cancelled (aborted)."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

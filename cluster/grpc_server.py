"""The semipd gRPC server (grpc.aio): `semipd.v1.Generation` plus `grpc.health.v1.Health`.

    server = GrpcServer(client, tokenizer, port=50051)
    port = await server.start()      # health SERVING once ready
    ...
    await server.drain()             # health NOT_SERVING, new calls UNAVAILABLE, in-flight finish
    await server.stop()

Status codes: INVALID_ARGUMENT (bad parameters, prompt too long, with the message),
RESOURCE_EXHAUSTED (admission refused), UNAVAILABLE (draining, no capacity). A
cancelled call (client gone, deadline) aborts its request, which frees its KV pages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from actors.config import generation_defaults
from actors.engine.core import check_context_length
from actors.engine.frontend import StreamChunk, Tokenizer
from actors.request import SamplingParams, StructuredOutputsParams
from actors.runner.sampler import TokenLogprobs
from actors.slo.admission import AdmissionRejected
from cluster.engine_client import EngineClient, GenerateRequest, NoCapacityError
from cluster.grpc_client import load_stubs

log = logging.getLogger(__name__)

SERVICE_NAME = "semipd.v1.Generation"
_PARAM_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "logprobs", "skip_special_tokens", "detokenize",
                 "cache_salt", "prompt_logprobs")


class InvalidRequest(ValueError):
    """The request cannot be served as given (INVALID_ARGUMENT)."""


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


class _Generation:
    """The Generation servicer (registered through the generated add_..._to_server)."""

    def __init__(self, owner: GrpcServer) -> None:
        self.owner = owner
        self.pb2, _ = load_stubs()
        self.generation_defaults = generation_defaults(owner.client.model_info().model_dir)

    def build(self, request: Any) -> GenerateRequest:
        """Validate and tokenize; raises InvalidRequest / SamplingParamsError."""
        o = self.owner
        info = o.client.model_info()
        params = params_from_proto(request.params, self.generation_defaults)
        params.check_vocab(info.vocab_size)
        kind = request.WhichOneof("prompt")
        if kind == "text":
            ids = o.tokenizer.encode(request.text)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            bad = [t for t in ids if not 0 <= t < info.vocab_size]
            if bad:
                raise InvalidRequest(f"token ids must be in [0, {info.vocab_size}), got {bad[0]}")
        elif kind == "chat":
            ids = self.chat_ids(request.chat)
        else:
            raise InvalidRequest("the request has no prompt (set text, token_ids or chat)")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        check_context_length(len(ids), params.max_tokens, info.max_model_len)
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            if request.HasField(name) and not getattr(request, name) > 0:
                raise InvalidRequest(f"{name} must be positive")
        return GenerateRequest(
            request_id=request.request_id or uuid.uuid4().hex, prompt_token_ids=ids, params=params,
            priority=request.priority,
            ttft_slo_ms=request.ttft_slo_ms if request.HasField("ttft_slo_ms") else None,
            tpot_slo_ms=request.tpot_slo_ms if request.HasField("tpot_slo_ms") else None,
            session_id=request.session_id or None,
        )

    def chat_ids(self, chat: Any) -> list[int]:
        """A `Chat` through the model's chat template; InvalidRequest for what the template refuses."""
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        if not messages:
            raise InvalidRequest("the chat has no messages")
        try:
            return self.owner.tokenizer.chat_ids(messages)
        except Exception as e:  # a template error is the request's fault
            raise InvalidRequest(f"cannot apply the chat template: {e}") from None

    def logprob(self, lp: TokenLogprobs) -> Any:
        msg = self.pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                    top=[self.pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
        if lp.rank is not None:
            msg.rank = lp.rank
        return msg

    def responses(self, rid: str, chunk: StreamChunk) -> list[Any]:
        pb2 = self.pb2
        out = []
        if chunk.text or chunk.token_ids or chunk.logprobs or chunk.prompt_logprobs:
            out.append(pb2.GenerateResponse(request_id=rid, chunk=pb2.TokenChunk(
                text=chunk.text, token_ids=list(chunk.token_ids), logprobs=[self.logprob(lp) for lp in chunk.logprobs],
                prompt_logprobs=[self.logprob(lp) for lp in chunk.prompt_logprobs])))
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
        try:
            req = self.build(request)
        except ValueError as e:  # SamplingParamsError, PromptTooLongError, InvalidRequest
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        o.enter()
        gen = o.client.generate(req)
        status: tuple[grpc.StatusCode, str] | None = None
        try:
            async for chunk in gen:
                for msg in self.responses(req.request_id, chunk):
                    yield msg
        except AdmissionRejected as e:
            status = (grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is overloaded, retry later: {e}")
        except NoCapacityError as e:
            status = (grpc.StatusCode.UNAVAILABLE, f"no engine can take the request now: {e}")
        except ValueError as e:  # rejected by the engine (e.g. a duplicate request id)
            status = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            await gen.aclose()  # type: ignore[attr-defined]  # aborts the request if it is unfinished
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
    """gRPC front end over an `EngineClient`; run start/drain/stop on one event loop."""

    def __init__(self, client: EngineClient, tokenizer: Tokenizer, port: int = 50051, host: str = "[::]") -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.host = host
        self.port = port
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

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
        if ready:
            await self.set_serving(True)
        log.info("gRPC server on port %d", self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def drain(self, timeout: float = 30.0) -> bool:
        """NOT_SERVING, refuse new calls, wait for in-flight ones; True if they all finished."""
        self.draining = True
        await self.set_serving(False)
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self.idle.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving; calls still running after `grace` seconds are cancelled (aborted)."""
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

"""A small Python client of the semipd gRPC API (`proto/semipd/v1/semipd.proto`).

    client = GenerationClient("localhost:50051")
    for chunk in client.generate("Hello", SamplingParams(max_tokens=16, temperature=0)):
        print(chunk.text, end="")          # the last chunk has finish_reason and usage

`AsyncGenerationClient` is the asyncio twin. Closing (or breaking out of) a generate
iterator cancels the call, which aborts the request on the server and frees its pages.
`generate_once(addr, prompt, params)` is what `semipd generate --grpc ADDR` uses, with only the fields its flags set
(`given_params_to_proto`): the server's defaults apply to the others.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc

from actors.request import SamplingParams, StructuredOutputsParams

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]  # text, token ids, or chat messages (role, content)


def load_stubs() -> tuple[ModuleType, ModuleType]:
    """(semipd_pb2, semipd_pb2_grpc), the generated stubs in the package semipd.v1."""
    from semipd.v1 import semipd_pb2, semipd_pb2_grpc

    return semipd_pb2, semipd_pb2_grpc


class GrpcCallError(RuntimeError):
    """A failed call; `code` is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class GrpcInvalidArgument(GrpcCallError, ValueError):
    """INVALID_ARGUMENT: the request's parameters were rejected (the CLI exits 2)."""


def _call_error(e: grpc.RpcError) -> GrpcCallError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else str(e)) or ""
    cls = GrpcInvalidArgument if code == grpc.StatusCode.INVALID_ARGUMENT else GrpcCallError
    return cls(code, details)


@dataclass(frozen=True)
class GenerationChunk:
    """New output of a request; the last one has `finish_reason` and the usage."""

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...] = ()  # (id, logprob, top)
    prompt_logprobs: tuple[tuple[int, float, tuple[tuple[int, float], ...], int], ...] = ()  # (id, logprob, top, rank)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended the request


def params_to_proto(params: SamplingParams) -> Any:
    pb2, _ = load_stubs()
    msg = pb2.SamplingParams(
        max_tokens=params.max_tokens, min_tokens=params.min_tokens, temperature=params.temperature,
        top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        stop=list(params.stop), stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
        include_stop_str_in_output=params.include_stop_str_in_output,
        skip_special_tokens=params.skip_special_tokens, detokenize=params.detokenize,
        logit_bias=dict(params.logit_bias), allowed_token_ids=list(params.allowed_token_ids or ()),
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.cache_salt is not None:
        msg.cache_salt = params.cache_salt
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    if params.structured_outputs is not None:
        msg.structured_outputs.CopyFrom(structured_to_proto(params.structured_outputs))
    return msg


def given_params_to_proto(given: Mapping[str, Any]) -> Any:
    """A proto SamplingParams setting only the fields of `given` (SamplingParams field names and values); the server
    gives the others its defaults (the checkpoint's generation_config.json, else its own)."""
    pb2, _ = load_stubs()
    fields = dict(given)
    spec = fields.pop("structured_outputs", None)
    msg = pb2.SamplingParams(**fields)
    if spec is not None:
        msg.structured_outputs.CopyFrom(structured_to_proto(spec))
    return msg


def structured_to_proto(spec: StructuredOutputsParams) -> Any:
    """A `StructuredOutputs` message (its one kind set) from StructuredOutputsParams."""
    pb2, _ = load_stubs()
    msg = pb2.StructuredOutputs(disable_any_whitespace=spec.disable_any_whitespace, start_after=spec.start_after)
    if spec.choice is not None:
        msg.choice.choices.extend(spec.choice)
    elif spec.json_object:
        msg.json_object = True
    else:
        for kind in ("json", "regex", "grammar"):
            if getattr(spec, kind) is not None:
                setattr(msg, kind, getattr(spec, kind))
    return msg


def build_request(
    prompt: Prompt,
    params: SamplingParams | Any | None = None,
    request_id: str | None = None,
    priority: int = 0,
    ttft_slo_ms: float | None = None,
    tpot_slo_ms: float | None = None,
    session_id: str | None = None,
    model: str | None = None,
) -> Any:
    """A GenerateRequest message: `prompt` is text, token ids, or chat messages ({"role", "content"} each, put
    through the server's chat template); `params` is a SamplingParams or a proto SamplingParams; `model` (the
    OpenAI API's) None for the served one."""
    pb2, _ = load_stubs()
    if params is None:
        params = SamplingParams()
    proto_params = params_to_proto(params) if isinstance(params, SamplingParams) else params
    req = pb2.GenerateRequest(request_id=request_id or uuid.uuid4().hex, params=proto_params, priority=priority,
                              session_id=session_id or "", model=model or "")
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and all(isinstance(m, Mapping) for m in prompt):
        req.chat.messages.extend(pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)  # type: ignore
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)  # type: ignore[arg-type]
    if ttft_slo_ms is not None:
        req.ttft_slo_ms = ttft_slo_ms
    if tpot_slo_ms is not None:
        req.tpot_slo_ms = tpot_slo_ms
    return req


def chunk_from_proto(msg: Any) -> GenerationChunk:
    if msg.WhichOneof("kind") == "complete":
        c = msg.complete
        kind = c.WhichOneof("stop_reason")
        return GenerationChunk(msg.request_id, finish_reason=c.finish_reason, prompt_tokens=c.usage.prompt_tokens,
                               completion_tokens=c.usage.completion_tokens, cached_tokens=c.usage.cached_tokens,
                               error=c.error or None, stop_reason=getattr(c, kind) if kind else None)
    ch = msg.chunk
    lps = tuple((lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top)) for lp in ch.logprobs)
    prompt = tuple((lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top), lp.rank)
                   for lp in ch.prompt_logprobs)
    return GenerationChunk(msg.request_id, text=ch.text, token_ids=tuple(ch.token_ids), logprobs=lps,
                           prompt_logprobs=prompt)


def _load_dict(load: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return {"engine_id": load.engine_id, "node_id": load.node_id, "healthy": load.healthy,
            "draining": load.draining, "in_flight": load.in_flight, "stats": MessageToDict(load.stats)}


def _info_dict(info: Any) -> dict[str, Any]:
    return {"name": info.name, "model_dir": info.model_dir, "architecture": info.architecture,
            "max_model_len": info.max_model_len, "vocab_size": info.vocab_size, "mode": info.mode}


class GenerationClient:
    """Blocking client over one channel; use as a context manager or call close()."""

    def __init__(self, addr: str, timeout: float | None = None) -> None:
        _, pb2_grpc = load_stubs()
        self.addr = addr
        self.timeout = timeout
        self.channel = grpc.insecure_channel(addr)
        self.stub = pb2_grpc.GenerationStub(self.channel)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                 **kwargs: Any) -> Iterator[GenerationChunk]:
        """Stream the chunks of one request; closing the iterator cancels (aborts) it."""
        call = self.stub.Generate(build_request(prompt, params, **kwargs), timeout=self.timeout)
        try:
            for msg in call:
                yield chunk_from_proto(msg)
        except grpc.RpcError as e:
            raise _call_error(e) from None
        finally:
            call.cancel()  # no-op once the stream completed

    def abort(self, request_id: str) -> bool:
        pb2, _ = load_stubs()
        try:
            return bool(self.stub.Abort(pb2.AbortRequest(request_id=request_id), timeout=self.timeout).found)
        except grpc.RpcError as e:
            raise _call_error(e) from None

    def loads(self) -> list[dict[str, Any]]:
        pb2, _ = load_stubs()
        try:
            reply = self.stub.GetLoads(pb2.GetLoadsRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _call_error(e) from None
        return [_load_dict(l) for l in reply.loads]

    def model_info(self) -> dict[str, Any]:
        pb2, _ = load_stubs()
        try:
            return _info_dict(self.stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=self.timeout))
        except grpc.RpcError as e:
            raise _call_error(e) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGenerationClient:
    """asyncio client (grpc.aio); create and use it on one event loop."""

    def __init__(self, addr: str, timeout: float | None = None) -> None:
        _, pb2_grpc = load_stubs()
        self.addr = addr
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(addr)
        self.stub = pb2_grpc.GenerationStub(self.channel)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        call = self.stub.Generate(build_request(prompt, params, **kwargs), timeout=self.timeout)
        try:
            async for msg in call:
                yield chunk_from_proto(msg)
        except grpc.RpcError as e:
            raise _call_error(e) from None
        finally:
            call.cancel()

    async def abort(self, request_id: str) -> bool:
        pb2, _ = load_stubs()
        try:
            reply = await self.stub.Abort(pb2.AbortRequest(request_id=request_id), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _call_error(e) from None
        return bool(reply.found)

    async def loads(self) -> list[dict[str, Any]]:
        pb2, _ = load_stubs()
        try:
            reply = await self.stub.GetLoads(pb2.GetLoadsRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _call_error(e) from None
        return [_load_dict(l) for l in reply.loads]

    async def model_info(self) -> dict[str, Any]:
        pb2, _ = load_stubs()
        try:
            return _info_dict(await self.stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=self.timeout))
        except grpc.RpcError as e:
            raise _call_error(e) from None

    async def close(self) -> None:
        await self.channel.close()


def generate_once(addr: str, prompt: Prompt, params: SamplingParams | Any | None = None,
                  timeout: float | None = None) -> dict[str, Any]:
    """Run one request to the end: {text, token_ids, finish_reason, num_prompt_tokens, ...}; `params` as
    `build_request`'s.

    Raises GrpcInvalidArgument (a ValueError) for rejected parameters, GrpcCallError else.
    """
    text, ids = [], []
    last: GenerationChunk | None = None
    with GenerationClient(addr, timeout=timeout) as client:
        for chunk in client.generate(prompt, params):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
    if last is None or last.finish_reason is None:
        raise GrpcCallError(grpc.StatusCode.INTERNAL, "the stream ended without a completion message")
    return {"text": "".join(text), "token_ids": ids, "finish_reason": last.finish_reason,
            "num_prompt_tokens": last.prompt_tokens, "num_output_tokens": last.completion_tokens,
            "request_id": last.request_id, "error": last.error, "stop_reason": last.stop_reason}

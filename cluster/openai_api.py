"""OpenAI-compatible HTTP API over an `EngineClient`, with vLLM's routes, errors and metrics.

`create_app(client, tokenizer)` returns a FastAPI app with
`POST /v1/completions`, `POST /v1/chat/completions` (streaming as SSE `data: {...}`
chunks ending with `data: [DONE]`, or not), `GET /v1/models`, `POST /tokenize`,
`POST /detokenize`, `GET /health` (503 when no engine makes progress),
`GET /metrics` (Prometheus, see `cluster.metrics`) and `GET /splits` (each engine's
SM split and its recent changes: time, from, to, reason).

Requests are tokenized and checked here (parameters, model name, context length)
before anything is dispatched. Errors have OpenAI's body,
`{"error": {"message", "type", "param", "code"}}`: 400 bad input (the over-long prompt
message in vLLM's words, which clients match), 401 bad API key, 404 unknown model,
413 body too large, 429 admission refused, 503 draining or no capacity. A client
that disconnects aborts its requests, which frees their KV pages.

Headers: `x-request-id` (used as the request id and echoed back), `x-slo-ttft-ms`,
`x-slo-tpot-ms` (per-request SLO targets for the router), `x-session-id`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.engine.core import PromptTooLongError
from actors.engine.frontend import StreamChunk, Tokenizer
from actors.request import SamplingParams, SamplingParamsError
from actors.runner.sampler import TokenLogprobs
from actors.slo.admission import AdmissionRejected
from cluster.engine_client import EngineClient, EngineLoad, GenerateRequest, NoCapacityError
from cluster.metrics import ServingMetrics

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20  # larger bodies get 413
DRAIN_CAP_BYTES = 64 << 20  # past this much of an oversized body, stop reading it
HEALTH_STALL_SECONDS = 30.0  # an engine with work that made no progress for this long is unhealthy
LOADS_TIMEOUT_SECONDS = 5.0
MAX_N = 128
INLINE_TOKENIZE_CHARS = 16384  # longer texts are tokenized in a worker thread
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
T = TypeVar("T")


# -- errors ------------------------------------------------------------------------

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error answered in OpenAI's body shape with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)

    def response(self) -> JSONResponse:
        headers = {"retry-after": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready."""


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param,
                      "code": status}}


def engine_error(e: BaseException) -> APIError:
    """The HTTP error for an exception raised while dispatching or running a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, AdmissionRejected):
        return APIError(429, f"the server is overloaded, retry later: {e}", retry_after=1)
    if isinstance(e, NoCapacityError):
        return APIError(503, f"no engine can take the request now: {e}", retry_after=1)
    if isinstance(e, SamplingParamsError):
        return APIError(400, str(e), param=str(e).split(" ", 1)[0])
    if isinstance(e, ValueError):  # PromptTooLongError, bad token ids, duplicate request id
        return APIError(400, str(e))
    log.exception("request failed", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """Raise PromptTooLongError (vLLM's wording) if the request cannot fit the context.

    `max_tokens` None means "as many as fit": then only the prompt itself is checked.
    """
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    if num_prompt_tokens >= max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens. Please reduce the length of the input messages."
        )


# -- schemas -----------------------------------------------------------------------


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Schema):
    include_usage: bool = False


class _SamplingFields(_Schema):
    """Fields common to completions and chat (OpenAI's plus vLLM's extensions)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    priority: int = 0
    user: str | None = None
    cache_salt: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Schema):
    type: str
    text: str | None = None


class ChatMessage(_Schema):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class TokenizeRequest(_Schema):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Schema):
    model: str | None = None
    tokens: list[int]


class PromptTokensDetails(_Schema):
    cached_tokens: int  # prompt tokens served by the prefix cache


class Usage(_Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(_Schema):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class CompletionResponse(_Schema):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(_Schema):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Schema):
    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Schema):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in errors[:5]]
    param = ".".join(str(x) for x in errors[0]["loc"]) if errors and errors[0]["loc"] else None
    return APIError(400, "invalid request: " + "; ".join(parts), param=param)


def _parse(schema: type[T], data: Any) -> T:
    try:
        return schema.model_validate(data)  # type: ignore[attr-defined, no-any-return]
    except ValidationError as e:
        raise _validation_error(e) from None


# -- per-call state ----------------------------------------------------------------


@dataclass
class _Choice:
    """What one engine request produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    text_offset: int = 0  # completions logprobs: offset of the next token's text
    num_cached_tokens: int = 0

    def add(self, chunk: StreamChunk) -> None:
        self.num_cached_tokens = chunk.num_cached_tokens or self.num_cached_tokens
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.error = chunk.error or self.error


@dataclass
class _Call:
    """One HTTP completion call: its engine requests and how to render them."""

    kind: Literal["completion", "chat"]
    response_id: str
    model: str
    requests: list[GenerateRequest]
    prompt_tokens: int  # each prompt counted once, whatever n
    include_usage: bool
    want_logprobs: bool
    n: int = 1  # choices per prompt; `requests` holds each prompt's n in a row
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.choices = [_Choice() for _ in self.requests]

    def usage(self) -> dict[str, Any]:
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(c.num_cached_tokens for c in self.choices[:: self.n])  # each prompt once, as prompt_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


# -- the app -----------------------------------------------------------------------


class OpenAIServer:
    """The request handling behind `create_app`; `draining` turns new requests away (503)."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer: Tokenizer,
        api_key: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        health_stall_s: float = HEALTH_STALL_SECONDS,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.health_stall_s = health_stall_s
        self.info = client.model_info()
        self.metrics = ServingMetrics(self.info.name)
        self.draining = False
        self._token_strs: dict[int, str] = {}

    # -- request plumbing ----------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid or missing API key (expected 'Authorization: Bearer <key>')")

    def check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is draining and takes no new requests", retry_after=1)

    def check_model(self, model: str | None) -> None:
        if model and model not in (self.info.name, self.info.model_dir):
            raise APIError(404, f"The model `{model}` does not exist.", param="model")

    async def read_json(self, request: Request) -> Any:
        """The body as JSON: 413 over the size limit, 400 if not UTF-8 or not JSON."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = declared.isdigit() and int(declared) > limit
        body = bytearray()
        seen = 0
        async for part in request.stream():
            seen += len(part)
            if seen > limit:
                too_big = True
            if not too_big:
                body += part
            elif seen > DRAIN_CAP_BYTES:
                break
        if too_big:
            raise APIError(413, f"the request body is larger than the limit of {limit} bytes")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not valid UTF-8: {e}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise APIError(400, f"malformed JSON in the request body: {e}") from None

    @staticmethod
    def request_id(request: Request) -> str:
        return getattr(request.state, "request_id", None) or uuid.uuid4().hex

    @staticmethod
    def slo_headers(request: Request) -> tuple[float | None, float | None, str | None]:
        values: list[float | None] = []
        for name in ("x-slo-ttft-ms", "x-slo-tpot-ms"):
            raw = request.headers.get(name)
            if raw is None:
                values.append(None)
                continue
            try:
                v = float(raw)
            except ValueError:
                v = float("nan")
            if not (v > 0 and v < float("inf")):
                raise APIError(400, f"header {name} must be a positive number of milliseconds, got {raw!r}",
                               param=name)
            values.append(v)
        return values[0], values[1], request.headers.get("x-session-id") or None

    # -- building requests ---------------------------------------------------------

    def sampling_params(self, body: _SamplingFields, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        seed = None if body.seed is None else body.seed + index
        kwargs: dict[str, Any] = dict(
            max_tokens=max_tokens, min_tokens=body.min_tokens, seed=seed, stop=tuple(stop),
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output, skip_special_tokens=body.skip_special_tokens,
            cache_salt=body.cache_salt,
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(body, name)
            if value is not None:
                kwargs[name] = value
        try:
            return SamplingParams(**kwargs)
        except SamplingParamsError as e:
            raise engine_error(e) from None

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        if num_prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        try:
            check_context_length(num_prompt_tokens, max_tokens, self.info.max_model_len)
        except PromptTooLongError as e:
            raise APIError(400, str(e)) from None
        return self.info.max_model_len - num_prompt_tokens if max_tokens is None else max_tokens

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {self.info.vocab_size}), got {bad[0]}", param=param)

    async def encode(self, text: str) -> list[int]:
        """Tokenize; long texts off the event loop, so that streams in flight keep flowing."""
        if len(text) < INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(text)
        return await asyncio.to_thread(self.tokenizer.encode, text)

    async def completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            return [await self.encode(prompt)]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            ids = [list(prompt)]  # type: ignore[arg-type]
        elif all(isinstance(p, str) for p in prompt):
            ids = [await self.encode(p) for p in prompt]  # type: ignore[arg-type]
        else:
            ids = [list(p) for p in prompt]  # type: ignore[arg-type]
        for p in ids:
            self.check_token_ids(p, "prompt")
        return ids

    async def chat_prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        plain: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            if isinstance(m.content, list):
                if any(p.type != "text" for p in m.content):
                    raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
                content = "".join(p.text or "" for p in m.content)
            else:
                content = m.content or ""
            entry: dict[str, Any] = {"role": m.role, "content": content}
            if m.name:
                entry["name"] = m.name
            plain.append(entry)
        try:
            text = self.tokenizer.chat_prompt(plain)
        except Exception as e:  # a template error is the request's fault
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        return await self.encode(text)

    def engine_requests(self, request: Request, body: _SamplingFields, prompts: list[list[int]],
                        max_tokens: int | None, logprobs: int | None) -> list[GenerateRequest]:
        rid = self.request_id(request)
        ttft, tpot, session = self.slo_headers(request)
        out: list[GenerateRequest] = []
        total = len(prompts) * body.n
        for ids in prompts:
            limit = self.resolve_max_tokens(len(ids), max_tokens)
            for j in range(body.n):
                params = self.sampling_params(body, limit, logprobs, j)
                sub_id = rid if total == 1 else f"{rid}-{len(out)}"
                out.append(GenerateRequest(sub_id, ids, params, priority=body.priority, ttft_slo_ms=ttft,
                                           tpot_slo_ms=tpot, session_id=session))
        return out

    # -- running requests ----------------------------------------------------------

    async def stream_call(self, call: _Call) -> AsyncIterator[tuple[int, StreamChunk]]:
        """All engine requests of `call`, merged; closing it aborts the unfinished ones."""
        arrival = time.monotonic()
        trackers = [self.metrics.track(arrival) for _ in call.requests]
        gens = [self.client.generate(r) for r in call.requests]
        failed = False
        try:
            async for i, chunk in merge_streams(gens):
                trackers[i].on_chunk(chunk)
                call.choices[i].add(chunk)
                yield i, chunk
        except BaseException as e:
            failed = not isinstance(e, (asyncio.CancelledError, GeneratorExit))
            raise
        finally:
            if not failed:
                for t in trackers:
                    t.finish("abort")  # no-op for the finished ones

    async def run_to_end(self, request: Request, call: _Call) -> None:
        async def consume() -> None:
            stream = self.stream_call(call)
            try:
                async for _ in stream:
                    pass
            finally:
                await stream.aclose()

        try:
            await until_disconnect(request, consume())
        except ClientDisconnected:
            raise
        except Exception as e:
            raise engine_error(e) from None
        errors = [c.error for c in call.choices if c.error or c.finish_reason == "error"]
        if errors:
            raise APIError(500, f"the engine failed the request: {errors[0] or 'unknown error'}")

    async def open_stream(self, request: Request, call: _Call) -> StreamingResponse:
        """Start the engine requests; errors before the first chunk become HTTP errors."""
        stream = self.stream_call(call)

        async def first() -> tuple[int, StreamChunk]:
            return await stream.__anext__()

        try:
            head = await until_disconnect(request, first())
        except ClientDisconnected:
            await stream.aclose()
            raise
        except StopAsyncIteration:
            await stream.aclose()
            raise APIError(500, "the engine closed the stream without output") from None
        except Exception as e:
            await stream.aclose()
            raise engine_error(e) from None
        return StreamingResponse(self.sse(call, head, stream), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    async def sse(self, call: _Call, head: tuple[int, StreamChunk],
                  stream: AsyncIterator[tuple[int, StreamChunk]]) -> AsyncIterator[bytes]:
        render = self.completion_chunk if call.kind == "completion" else self.chat_chunk
        try:
            if call.kind == "chat":
                for i in range(len(call.requests)):
                    yield _sse(self.chat_delta(call, i, {"role": "assistant", "content": ""}, None, None))
            item: tuple[int, StreamChunk] | None = head
            while item is not None:
                payload = render(call, *item)
                if payload is not None:
                    yield _sse(payload)
                if item[1].error:
                    yield _sse(error_body(500, f"the engine failed the request: {item[1].error}"))
                item = await anext(stream, None)  # type: ignore[arg-type]
            if call.include_usage:
                yield _sse({"id": call.response_id, "object": _chunk_object(call), "created": call.created,
                            "model": call.model, "choices": [], "usage": call.usage()})
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            yield _sse(engine_error(e).body())
            yield b"data: [DONE]\n\n"
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    # -- rendering ---------------------------------------------------------------------

    def token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_strs[token_id] = s
        return s

    def completion_logprobs(self, lps: Sequence[TokenLogprobs], choice: _Choice) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            s = self.token_str(lp.token_id)
            tokens.append(s)
            token_lps.append(lp.logprob)
            top = {self.token_str(t): v for t, v in lp.top}
            top.setdefault(s, lp.logprob)
            tops.append(top)
            offsets.append(choice.text_offset)
            choice.text_offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, lps: Sequence[TokenLogprobs]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            s = self.token_str(token_id)
            return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    def completion_chunk(self, call: _Call, i: int, chunk: StreamChunk) -> dict[str, Any] | None:
        wants_lp = call.want_logprobs and bool(chunk.logprobs)
        if not (chunk.text or chunk.finish_reason or wants_lp):
            return None
        lp = self.completion_logprobs(chunk.logprobs, call.choices[i]) if wants_lp else None
        return {"id": call.response_id, "object": "text_completion", "created": call.created, "model": call.model,
                "choices": [{"index": i, "text": chunk.text, "logprobs": lp, "finish_reason": chunk.finish_reason}]}

    def chat_chunk(self, call: _Call, i: int, chunk: StreamChunk) -> dict[str, Any] | None:
        wants_lp = call.want_logprobs and bool(chunk.logprobs)
        if not (chunk.text or chunk.finish_reason or wants_lp):
            return None
        delta = {"content": chunk.text} if chunk.text else {}
        lp = self.chat_logprobs(chunk.logprobs) if wants_lp else None
        return self.chat_delta(call, i, delta, lp, chunk.finish_reason)

    @staticmethod
    def chat_delta(call: _Call, i: int, delta: dict[str, Any], lp: dict[str, Any] | None,
                   finish: str | None) -> dict[str, Any]:
        return {"id": call.response_id, "object": "chat.completion.chunk", "created": call.created,
                "model": call.model,
                "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    def completion_response(self, call: _Call) -> dict[str, Any]:
        choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                    logprobs=self.completion_logprobs(c.logprobs, _Choice()) if call.want_logprobs
                                    else None)
                   for i, c in enumerate(call.choices)]
        resp = CompletionResponse(id=call.response_id, created=call.created, model=call.model, choices=choices,
                                  usage=Usage(**call.usage()))
        return resp.model_dump()

    def chat_response(self, call: _Call) -> dict[str, Any]:
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                              logprobs=self.chat_logprobs(c.logprobs) if call.want_logprobs else None)
                   for i, c in enumerate(call.choices)]
        resp = ChatCompletionResponse(id=call.response_id, created=call.created, model=call.model, choices=choices,
                                      usage=Usage(**call.usage()))
        return resp.model_dump()

    # -- routes --------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        self.check_auth(request)
        self.check_accepting()
        body = _parse(CompletionRequest, await self.read_json(request))
        self.check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        _check_stream_options(body)
        prompts = await self.completion_prompts(body.prompt)
        reqs = self.engine_requests(request, body, prompts, body.max_tokens, body.logprobs)
        call = _Call("completion", f"cmpl-{self.request_id(request)}", self.info.name, reqs,
                     sum(len(p) for p in prompts), _include_usage(body), body.logprobs is not None, body.n)
        if body.stream:
            return await self.open_stream(request, call)
        await self.run_to_end(request, call)
        return JSONResponse(self.completion_response(call))

    async def chat_completions(self, request: Request) -> Response:
        self.check_auth(request)
        self.check_accepting()
        body = _parse(ChatCompletionRequest, await self.read_json(request))
        self.check_model(body.model)
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
        _check_stream_options(body)
        ids = await self.chat_prompt_ids(body.messages)
        self.check_token_ids(ids, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        reqs = self.engine_requests(request, body, [ids], max_tokens, logprobs)
        call = _Call("chat", f"chatcmpl-{self.request_id(request)}", self.info.name, reqs, len(ids),
                     _include_usage(body), body.logprobs, body.n)
        if body.stream:
            return await self.open_stream(request, call)
        await self.run_to_end(request, call)
        return JSONResponse(self.chat_response(call))

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        info = self.info
        return JSONResponse({"object": "list", "data": [
            {"id": info.name, "object": "model", "created": int(time.time()), "owned_by": "semipd",
             "root": info.model_dir, "parent": None, "max_model_len": info.max_model_len}]})

    async def tokenize(self, request: Request) -> Response:
        body = _parse(TokenizeRequest, await self.read_json(request))
        self.check_model(body.model)
        if body.messages is not None:
            ids = await self.chat_prompt_ids(body.messages)
        elif body.prompt is not None:
            ids = (await self.encode(body.prompt) if body.add_special_tokens
                   else list(self.tokenizer.hf.encode(body.prompt, add_special_tokens=False)))
        else:
            raise APIError(400, "give `prompt` or `messages`", param="prompt")
        return JSONResponse({"count": len(ids), "max_model_len": self.info.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        body = _parse(DetokenizeRequest, await self.read_json(request))
        self.check_model(body.model)
        self.check_token_ids(body.tokens, "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(body.tokens)})

    async def engine_loads(self) -> list[EngineLoad]:
        """The engines' loads; 503 when they do not answer within LOADS_TIMEOUT_SECONDS."""
        try:
            return await asyncio.wait_for(self.client.loads(), LOADS_TIMEOUT_SECONDS)
        except Exception as e:
            raise APIError(503, f"the engines do not answer: {type(e).__name__}: {e}") from None

    async def version(self) -> Response:
        """The package version, as vLLM's `/version` gives its own."""
        try:
            return JSONResponse({"version": metadata.version("semipd")})
        except metadata.PackageNotFoundError:
            return JSONResponse({"version": "unknown"})

    async def health(self) -> Response:
        """200 while some engine is healthy, not draining and making progress; else 503."""
        if self.draining:
            raise APIError(503, "the server is draining")
        problems = []
        loads = await self.engine_loads()
        for load in loads:
            stalled = float(load.stats.get("seconds_since_progress", 0.0))
            if not load.healthy:
                problems.append(f"{load.engine_id}: unhealthy")
            elif load.draining:
                problems.append(f"{load.engine_id}: draining")
            elif stalled > self.health_stall_s:
                problems.append(f"{load.engine_id}: no progress for {stalled:.0f}s")
            else:
                return Response(status_code=200)
        raise APIError(503, "no engine is serving: " + ("; ".join(problems) or "no engines"))

    async def splits(self, request: Request) -> Response:
        """Each engine's SM split and its recent changes (time, from, to, why): `GET /splits`."""
        self.check_auth(request)
        data = []
        for load in await self.engine_loads():
            s = load.stats
            if "prefill_sms" not in s:  # an engine that did not report
                continue
            data.append({"engine_id": load.engine_id, "prefill_sms": s["prefill_sms"], "total_sms": s["total_sms"],
                         "num_switches": s.get("num_switches", 0), "switches": list(s.get("switches", ()))})
        return JSONResponse({"object": "list", "time": time.time(), "data": data})

    async def reset_prefix_cache(self, request: Request) -> Response:
        """`POST /reset_prefix_cache` (as vLLM's): every engine forgets its cached pages that no request
        holds, so that prompts sent again are computed again (a benchmark's windows start alike).
        Returns the pages each engine forgot; 503 when no engine answered."""
        self.check_auth(request)
        forgotten = await self.client.reset_prefix_cache()
        if not forgotten:
            raise APIError(503, "no engine answered the prefix cache reset")
        return JSONResponse({"object": "list", "data": [{"engine_id": eid, "pages_freed": n}
                                                        for eid, n in sorted(forgotten.items())]})

    async def prometheus(self) -> Response:
        try:
            self.metrics.update_loads(await asyncio.wait_for(self.client.loads(), LOADS_TIMEOUT_SECONDS))
        except Exception as e:  # serve the request series anyway
            log.warning("metrics: loads() failed: %s", e)
            self.metrics.update_loads([])
        content, content_type = self.metrics.render()
        return Response(content, media_type=content_type)


def _chunk_object(call: _Call) -> str:
    return "text_completion" if call.kind == "completion" else "chat.completion.chunk"


def _check_stream_options(body: _SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")


def _include_usage(body: _SamplingFields) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


# -- streams and disconnects -------------------------------------------------------


async def merge_streams(gens: Sequence[AsyncIterator[StreamChunk]]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """Interleave several chunk streams as (index, chunk); closing it closes them all."""
    if len(gens) == 1:
        gen = gens[0]
        try:
            async for chunk in gen:
                yield 0, chunk
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, StreamChunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[StreamChunk]) -> None:
        try:
            async for chunk in gen:
                await queue.put((i, chunk, None))
        except Exception as e:
            await queue.put((i, None, e))
            return
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, chunk, err = await queue.get()
            if err is not None:
                raise err
            if chunk is None:
                remaining -= 1
                continue
            yield i, chunk
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_disconnect(request: Request) -> None:
    """Return when the HTTP client has gone away (the body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.1)  # a server that answers receive() with empty bodies must not spin us


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (e.g. by Ray Serve): stop the work too
        await _cancel(task, watcher)
        raise
    if not task.done():
        await _cancel(task, watcher)
        raise ClientDisconnected()
    await _cancel(watcher)
    return task.result()


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class RequestIdMiddleware:
    """Takes `x-request-id` from the request (or makes one), puts it on every response.

    `echo=False` where a proxy in front already echoes it (Ray Serve's does).
    """

    def __init__(self, app: ASGIApp, echo: bool = True) -> None:
        self.app = app
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if self.echo and message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(
    client: EngineClient,
    tokenizer: Tokenizer,
    api_key: str | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    health_stall_s: float = HEALTH_STALL_SECONDS,
    echo_request_id: bool = True,
) -> FastAPI:
    """The OpenAI-compatible app over `client`; `app.state.openai` is its `OpenAIServer`.

    `api_key`: when set, /v1/* requests need `Authorization: Bearer <api_key>` (as vLLM).
    `health_stall_s`: /health fails when no engine made progress for this long.
    `echo_request_id`: False behind a proxy that already echoes `x-request-id` (Ray Serve).
    """
    server = OpenAIServer(client, tokenizer, api_key, max_body_bytes, health_stall_s)
    app = FastAPI(title="semipd OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.openai = server
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return APIError(400, f"invalid request: {exc.errors()}").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return engine_error(exc).response()

    routes: list[tuple[str, Callable[..., Awaitable[Response]], list[str]]] = [
        ("/v1/completions", server.completions, ["POST"]),
        ("/v1/chat/completions", server.chat_completions, ["POST"]),
        ("/v1/models", server.models, ["GET"]),
        ("/tokenize", server.tokenize, ["POST"]),
        ("/detokenize", server.detokenize, ["POST"]),
    ]
    for path, handler, methods in routes:
        app.add_api_route(path, handler, methods=methods)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/version", server.version, methods=["GET"])
    app.add_api_route("/splits", server.splits, methods=["GET"])
    app.add_api_route("/reset_prefix_cache", server.reset_prefix_cache, methods=["POST"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"], include_in_schema=False)
    return app


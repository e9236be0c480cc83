"""The request handling behind the app: checks, tokenization, engine requests, streaming and the routes."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from importlib import metadata
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from actors.config import generation_defaults
from actors.engine.core import PromptTooLongError, check_context_length, default_max_tokens
from actors.engine.frontend import StreamChunk, Tokenizer
from actors.request import SamplingParams, SamplingParamsError, StructuredOutputsParams
from cluster.engine_client import (
    HEALTH_STALL_SECONDS, LOADS_TIMEOUT_SECONDS, EngineClient, EngineLoad, GenerateRequest, off_the_loop_if_long,
)
from cluster.metrics import ServingMetrics
from cluster.openai_api.errors import APIError, ClientDisconnected, engine_error, error_body
from cluster.openai_api.reasoning import ReasoningParser, reasoning_parser_named
from cluster.openai_api.render import Call, Renderer, sse_event
from cluster.openai_api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTemplateFields,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    Tool,
    parse_body,
)
from cluster.openai_api.streams import merge_streams, until_disconnect
from cluster.openai_api.tools import (
    FirstCallOnly, ForcedCalls, ToolCallParser, forced_calls_schema, parser_named, template_messages,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20  # larger bodies get 413
DRAIN_CAP_BYTES = 64 << 20  # past this much of an oversized body, stop reading it

# writes a stream's body: (the call, its first (request index, chunk), the rest of its chunks) -> SSE bytes
SSEWriter = Callable[[Call, tuple[int, StreamChunk], AsyncIterator[tuple[int, StreamChunk]]], AsyncIterator[bytes]]


class EngineStreamResponse(StreamingResponse):
    """A server-sent events response that closes its engine `stream` (aborting what is unfinished) once it is over,
    however the server stopped sending it. A cancel that lands in a blocked write (a client that stopped reading,
    then left) leaves `body` suspended where it last yielded, in a reference cycle: without this, the engine went
    on computing until the garbage collector found it."""

    def __init__(self, body: AsyncIterator[bytes], stream: AsyncIterator[Any]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._body = body
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()  # type: ignore[attr-defined]
            await self._stream.aclose()  # type: ignore[attr-defined]  # a body that never started did not close it


class OpenAIServer:
    """The request handling behind `create_app`; `draining` turns new requests away (503)."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer: Tokenizer,
        api_key: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        health_stall_s: float = HEALTH_STALL_SECONDS,
        tool_call_parser: str = "hermes",
        reasoning_parser: str | None = None,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.health_stall_s = health_stall_s
        self.info = client.model_info()
        self.generation_defaults = generation_defaults(self.info.model_dir)  # for the fields a request leaves out
        self.metrics = ServingMetrics(self.info.name, self.info.max_model_len)
        self.draining = False
        self.render = Renderer(tokenizer)
        self.tool_parser = parser_named(tool_call_parser)
        self.reasoning_parser: ReasoningParser | None = (
            None if reasoning_parser is None else reasoning_parser_named(reasoning_parser))

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
        except RecursionError:
            raise APIError(400, "the request body's JSON is nested too deeply") from None

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

    def sampling_params(self, body: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                        index: int, structured: StructuredOutputsParams | None = None) -> SamplingParams:
        """The engine's parameters for choice `index` of `body` (the seed offset by the index; sampling fields left
        out take the checkpoint's generation defaults); 400 for an invalid one."""
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        seed = None if body.seed in (None, -1) else body.seed + index  # -1: no seed (vLLM's)
        kwargs: dict[str, Any] = dict(
            max_tokens=max_tokens, min_tokens=body.min_tokens, seed=seed, stop=tuple(stop),
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output, skip_special_tokens=body.skip_special_tokens,
            cache_salt=body.cache_salt, logit_bias=body.logit_bias_by_id(), prompt_logprobs=prompt_logprobs,
            allowed_token_ids=body.allowed_token_ids, structured_outputs=structured,
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(body, name)
            if value is None:
                value = self.generation_defaults.get(name)
            if value is not None:
                kwargs[name] = value
        try:
            params = SamplingParams(**kwargs)
            params.check_vocab(self.info.vocab_size)
        except SamplingParamsError as e:
            raise engine_error(e) from None
        return params

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        if num_prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        try:
            check_context_length(num_prompt_tokens, max_tokens, self.info.max_model_len)
        except PromptTooLongError as e:
            raise APIError(400, str(e)) from None
        if max_tokens is not None:
            return max_tokens
        default = self.generation_defaults.get("max_tokens")
        return default_max_tokens(num_prompt_tokens, self.info.max_model_len, default)

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {self.info.vocab_size}), got {bad[0]}", param=param)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize; long texts off the event loop, so that streams in flight keep flowing."""
        return await off_the_loop_if_long(len(text), self.tokenizer.encode, text, add_special_tokens)

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

    def echo_texts(self, prompt: str | list[str] | list[int] | list[list[int]], ids: list[list[int]], n: int,
                   truncated: bool = False) -> list[str]:
        """Each engine request's prompt as `echo` shows it: the text sent, or the token ids decoded (also when
        the prompt was `truncated`)."""
        if isinstance(prompt, str) and not truncated:
            texts = [prompt]
        elif all(isinstance(p, str) for p in prompt) and not truncated:
            texts = list(prompt)  # type: ignore[arg-type]
        else:
            texts = [self.tokenizer.decode(p, skip_special_tokens=False) for p in ids]
        return [t for t in texts for _ in range(n)]

    async def chat_prompt_ids(self, messages: list[ChatMessage], options: ChatTemplateFields,
                              add_special_tokens: bool = False, tools: list[Tool] | None = None) -> list[int]:
        """`messages` (and `tools`) through the chat template (`options`), tokenized; 400 for what the template
        refuses."""
        return await self.encode(self.chat_prompt(messages, options, tools), add_special_tokens)

    def chat_prompt(self, messages: list[ChatMessage], options: ChatTemplateFields,
                    tools: list[Tool] | None = None) -> str:
        """`messages` (and `tools`) through the chat template (`options`); 400 for what the template refuses."""
        options.check_template_options()
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
            for name in ("name", "tool_calls", "tool_call_id"):
                if getattr(m, name):
                    entry[name] = getattr(m, name)
            plain.append(entry)
        try:
            text = self.tokenizer.chat_prompt(template_messages(plain), options.add_generation_prompt,
                                              options.continue_final_message, options.chat_template_kwargs,
                                              [t.model_dump(exclude_none=True) for t in tools] if tools else None)
        except Exception as e:  # a template error is the request's fault
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        return text

    def engine_requests(self, request: Request, body: SamplingFields, prompts: list[list[int]],
                        max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                        structured: StructuredOutputsParams | None = None) -> list[GenerateRequest]:
        rid = self.request_id(request)
        ttft, tpot, session = self.slo_headers(request)
        out: list[GenerateRequest] = []
        total = len(prompts) * body.n
        for ids in prompts:
            limit = self.resolve_max_tokens(len(ids), max_tokens)
            for j in range(body.n):
                params = self.sampling_params(body, limit, logprobs, prompt_logprobs, j, structured)
                sub_id = rid if total == 1 else f"{rid}-{len(out)}"
                out.append(GenerateRequest(sub_id, ids, params, priority=body.priority, ttft_slo_ms=ttft,
                                           tpot_slo_ms=tpot, session_id=session))
        return out

    # -- running requests ----------------------------------------------------------

    async def stream_call(self, call: Call) -> AsyncIterator[tuple[int, StreamChunk]]:
        """All engine requests of `call`, merged; closing it aborts the unfinished ones."""
        arrival = time.monotonic()
        trackers = self.metrics.track_call(arrival, call.requests, call.n)
        gens = [self.client.generate(r) for r in call.requests]
        ending = "abort"  # the client left, or the call ended early (a choice failed)
        try:
            async with aclosing(merge_streams(gens)) as merged:
                async for i, chunk in merged:
                    trackers[i].on_chunk(chunk)
                    chunk = call.shown(chunk)
                    call.choices[i].add(chunk)
                    yield i, chunk
        except BaseException as e:
            if not isinstance(e, (asyncio.CancelledError, GeneratorExit)):
                ending = "error"  # the engine raised
            raise
        finally:
            for t in trackers:
                t.finish(ending)  # no-op for the finished ones

    async def run_to_end(self, request: Request, call: Call) -> None:
        """Run `call`'s engine requests to their end, or until one fails (the answer is then an error: the others
        are aborted)."""
        async def consume() -> None:
            stream = self.stream_call(call)
            try:
                async for _, chunk in stream:
                    if chunk.error or chunk.finish_reason == "error":
                        break
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

    async def answer(self, request: Request, call: Call, stream: bool) -> Response:
        """Run `call`: a stream of its chunks, or its whole response once it has ended."""
        if stream:
            return await self.open_stream(request, call)
        await self.run_to_end(request, call)
        return JSONResponse(self.render.response(call))

    async def open_stream(self, request: Request, call: Call, events: SSEWriter | None = None) -> EngineStreamResponse:
        """Start the engine requests; errors before the first chunk become HTTP errors. `events` writes the
        stream's body from the call, its first chunk and the rest (default: completions and chat chunks)."""
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
        return EngineStreamResponse((events or self.sse)(call, head, stream), stream)

    async def sse(self, call: Call, head: tuple[int, StreamChunk],
                  stream: AsyncIterator[tuple[int, StreamChunk]]) -> AsyncIterator[bytes]:
        try:
            if call.kind == "chat":
                for i in range(len(call.requests)):
                    yield sse_event(self.render.chat_delta(call, i, {"role": "assistant", "content": ""}, None, None))
            item: tuple[int, StreamChunk] | None = head
            while item is not None:
                for payload in self.render.chunks(call, *item):
                    yield sse_event(payload)
                if item[1].error:
                    yield sse_event(error_body(500, f"the engine failed the request: {item[1].error}"))
                item = await anext(stream, None)  # type: ignore[arg-type]
            if call.include_usage:
                yield sse_event(self.render.usage_chunk(call))
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            yield sse_event(engine_error(e).body())
            yield b"data: [DONE]\n\n"
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    # -- routes --------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, await self.admitted_json(request))

    async def chat_completions(self, request: Request) -> Response:
        return await self.chat(request, await self.admitted_json(request))

    async def invocations(self, request: Request) -> Response:
        """`POST /invocations` (SageMaker's, as vLLM serves it): a chat body (with `messages`) or a completions
        body (with `prompt`)."""
        data = await self.admitted_json(request)
        if isinstance(data, dict) and "messages" in data:
            return await self.chat(request, data)
        if isinstance(data, dict) and "prompt" in data:
            return await self.complete(request, data)
        raise APIError(400, "an invocation is a chat body (messages) or a completions body (prompt)")

    async def admitted_json(self, request: Request) -> Any:
        """The body of a generation call, once the caller's key and the server's state let it in."""
        self.check_auth(request)
        self.check_accepting()
        return await self.read_json(request)

    async def complete(self, request: Request, data: Any) -> Response:
        """A completions call, from its parsed JSON body."""
        body = parse_body(CompletionRequest, data)
        self.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        body.check_stream_options()
        body.check_prompt_logprobs()
        prompts = [body.truncated(p) for p in await self.completion_prompts(body.prompt)]
        asked = body.prompt_logprobs if body.prompt_logprobs is not None or not body.echo else body.logprobs
        scored = asked
        if body.echo and body.logprobs is not None:  # the echoed prompt's logprobs come from its scores
            scored = max(asked or 0, body.logprobs)
        echo_only = body.echo and body.max_tokens == 0  # the engine makes one token, not shown (as vLLM)
        reqs = self.engine_requests(request, body, prompts, 1 if echo_only else body.max_tokens, body.logprobs,
                                    scored, body.structured_outputs_params())
        call = Call("completion", f"cmpl-{self.request_id(request)}", self.info.name, reqs,
                    sum(len(p) for p in prompts), body.include_usage, body.logprobs is not None, body.n,
                    echo_prompts=(self.echo_texts(body.prompt, prompts, body.n, bool(body.truncate_prompt_tokens))
                                  if body.echo else None),
                    echo_only=echo_only, prompt_top=asked, continuous_usage=body.continuous_usage)
        return await self.answer(request, call, body.stream)

    async def chat(self, request: Request, data: Any) -> Response:
        """A chat completions call, from its parsed JSON body."""
        body = parse_body(ChatCompletionRequest, data)
        return await self.answer(request, await self.chat_call(request, body), body.stream)

    async def chat_call(self, request: Request, body: ChatCompletionRequest) -> Call:
        """The call (checked, tokenized, its engine requests built, not started) of a chat completions `body`."""
        self.check_model(body.model)
        parser, structured = self.tool_call_reading(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
        body.check_stream_options()
        body.check_prompt_logprobs()
        prompt = self.chat_prompt(body.messages, body, body.tools)
        ids = body.truncated(await self.encode(prompt, body.add_special_tokens))
        self.check_token_ids(ids, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        thinks = self.thinks(prompt, body)
        if thinks and structured is not None:  # the format holds from the reasoning's end, as in vLLM
            end = await self.encode(self.reasoning_parser.end, False)  # type: ignore[union-attr]
            structured = replace(structured, start_after=tuple(end))
        try:
            reqs = self.engine_requests(request, body, [ids], max_tokens, logprobs, body.prompt_logprobs, structured)
        except APIError as e:
            raise _as_top_logprobs(e) from None
        call = Call("chat", f"chatcmpl-{self.request_id(request)}", self.info.name, reqs, len(ids),
                    body.include_usage, body.logprobs, body.n, continuous_usage=body.continuous_usage,
                    tool_parser=parser, reasoning_parser=self.reasoning_parser, thinks=thinks,
                    include_reasoning=body.include_reasoning)
        return call

    def thinks(self, prompt: str, body: ChatCompletionRequest) -> bool:
        """Whether the output to this chat's `prompt` opens with reasoning, for the server's reasoning parser."""
        if self.reasoning_parser is None:
            return False
        return self.reasoning_parser.thinks(prompt, body.chat_template_kwargs or {})

    def tool_call_reading(self, body: ChatCompletionRequest) -> tuple[ToolCallParser | None,
                                                                       StructuredOutputsParams | None]:
        """How a chat's output is read for tool calls, and what it must match: with `tool_choice` auto the
        server's parser and the request's own format; required or named, a grammar that forces the calls. With
        `parallel_tool_calls` false, the first call only."""
        mode = body.tool_choice_mode()
        if mode is None:
            return None, body.structured_outputs_params()
        if mode == "auto":
            return self.calls_read_by(self.tool_parser, body), body.structured_outputs_params()
        function = None if mode == "required" else mode
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
        schema = forced_calls_schema(tools, function)  # compact: the calls are re-read, not shown
        forced = ForcedCalls(function)
        return (forced if function else self.calls_read_by(forced, body),  # a named function: one call
                StructuredOutputsParams(json=schema, disable_any_whitespace=True))

    @staticmethod
    def calls_read_by(parser: ToolCallParser, body: ChatCompletionRequest) -> ToolCallParser:
        """`parser`, keeping the first call only when the request's `parallel_tool_calls` is false."""
        return FirstCallOnly(parser) if body.parallel_tool_calls is False else parser

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        info = self.info
        return JSONResponse({"object": "list", "data": [
            {"id": info.name, "object": "model", "created": int(time.time()), "owned_by": "semipd",
             "root": info.model_dir, "parent": None, "max_model_len": info.max_model_len}]})

    async def tokenize(self, request: Request) -> Response:
        body = parse_body(TokenizeRequest, await self.read_json(request))
        self.check_model(body.model)
        if body.messages is not None:
            ids = await self.chat_prompt_ids(body.messages, body, bool(body.add_special_tokens))
        elif body.prompt is not None:
            ids = await self.encode(body.prompt, body.add_special_tokens is not False)
        else:
            raise APIError(400, "give `prompt` or `messages`", param="prompt")
        return JSONResponse({"count": len(ids), "max_model_len": self.info.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        body = parse_body(DetokenizeRequest, await self.read_json(request))
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
            problem = load.serving_problem(self.health_stall_s)
            if problem is None:
                return Response(status_code=200)
            problems.append(f"{load.engine_id}: {problem}")
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
        except Exception as e:  # serve the request series anyway; the engine series are unknown, not zero
            log.warning("metrics: loads() failed: %s", e)
            self.metrics.update_loads(None)
        content, content_type = self.metrics.render()
        return Response(content, media_type=content_type)


def _as_top_logprobs(e: APIError) -> APIError:
    """A chat's error `e` with the engine's `logprobs` (the number of top tokens) named as chat names it:
    `top_logprobs` (chat's `logprobs` is a flag)."""
    if e.param != "logprobs":
        return e
    return APIError(e.status, "top_" + e.message, param="top_logprobs")

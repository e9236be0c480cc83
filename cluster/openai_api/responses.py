"""OpenAI's Responses API as vLLM's server answers it: `POST /v1/responses`, streamed or not, and `GET` (`DELETE`,
`POST .../cancel`) `/v1/responses/{id}`, which find nothing since nothing is stored.

The body becomes a chat completions call (`responses_schemas`), run and read as chat's is: the same template,
structured outputs, forced tool calls and one parse of the reasoning and the tool calls (`Renderer`) behind both the
stream and the whole response. Its result becomes Responses' output items, in order: a `reasoning` item (with a
reasoning parser, when the model reasoned), a `message` item (when there is content) and `function_call` items.
A response cut by `max_output_tokens` is `incomplete` (`incomplete_details.reason` "max_output_tokens").

A stream is OpenAI's server-sent events, `event: <type>` and `data: {...}` with a `sequence_number` each:
response.created, response.in_progress, then for each item response.output_item.added, its content part's
response.content_part.added, deltas (response.reasoning_text.delta or response.output_text.delta) and their
.done, response.content_part.done, response.output_item.done (a function call: its arguments in one
response.function_call_arguments.delta, then .done), and last response.completed (response.incomplete when cut,
response.failed when the engine failed) with the whole response, which equals the one a non-streamed call returns.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from actors.engine.frontend import StreamChunk
from cluster.openai_api.errors import APIError, engine_error
from cluster.openai_api.render import Call, Renderer
from cluster.openai_api.responses_schemas import ResponsesRequest
from cluster.openai_api.schemas import ChatCompletionRequest, parse_body
from cluster.openai_api.server import OpenAIServer

# chat's names of the fields a Responses body gives under other names, for the `param` of an error
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class ResponsesAPI:
    """The Responses routes over an `OpenAIServer`."""

    def __init__(self, server: OpenAIServer) -> None:
        self.server = server

    async def create(self, request: Request) -> Response:
        """`POST /v1/responses`."""
        server = self.server
        data = await server.admitted_json(request)
        body = parse_body(ResponsesRequest, data)
        server.check_model(body.model)
        body.check_supported()
        try:
            call = await server.chat_call(request, parse_body(ChatCompletionRequest, body.chat_body(data)))
        except APIError as e:
            e.param = _PARAMS.get(e.param or "", e.param)
            raise
        call.response_id = f"resp_{server.request_id(request)}"
        answer = Answer(body, call, server.render)
        if body.stream:
            return await server.open_stream(request, call, answer.events)
        await server.run_to_end(request, call)
        output = Output.of_message(server.render.response(call)["choices"][0]["message"])
        return JSONResponse(answer.response(output))

    async def retrieve(self, request: Request, response_id: str) -> Response:
        """`GET`/`DELETE /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`: nothing is stored, so 404."""
        self.server.check_auth(request)
        raise APIError(404, f"Response with id '{response_id}' not found. This server stores no responses.",
                       param="response_id")


@dataclass
class Output:
    """What a response's output holds, read as chat reads it: reasoning, content, tool calls (chat's entries)."""

    reasoning: str = ""
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # chat's entries, when asked
    reasoning_id: str = field(default_factory=lambda: _item_id("rs"))
    message_id: str = field(default_factory=lambda: _item_id("msg"))
    call_ids: list[str] = field(default_factory=list)  # the function_call items' ids

    @classmethod
    def of_message(cls, message: dict[str, Any]) -> Output:
        """The output of a whole chat message."""
        out = cls(message.get("reasoning") or "", message.get("content") or "")
        out.add_calls(message.get("tool_calls") or [])
        return out

    def add_calls(self, calls: list[dict[str, Any]]) -> None:
        for c in calls:
            self.calls.append(c)
            self.call_ids.append(_item_id("fc"))


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class Answer:
    """How one Responses call is rendered: its whole response, and its stream's events."""

    body: ResponsesRequest
    call: Call
    render: Renderer
    seq: int = 0  # the stream's next sequence_number

    @property
    def status(self) -> str:
        return "incomplete" if self.call.choices[0].finish_reason == "length" else "completed"

    def response(self, output: Output | None, status: str | None = None, error: str | None = None
                 ) -> dict[str, Any]:
        """The response object: `output` None while it runs (status in_progress, no output or usage yet)."""
        call, params = self.call, self.call.requests[0].params
        status = status or ("in_progress" if output is None else self.status)
        usage = None
        if output is not None:
            output.logprobs = self.logprobs()
            u = call.usage()
            usage = {"input_tokens": u["prompt_tokens"], "input_tokens_details": u["prompt_tokens_details"],
                     "output_tokens": u["completion_tokens"],
                     "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens(output)},
                     "total_tokens": u["total_tokens"]}
        return {"id": call.response_id, "object": "response", "created_at": call.created, "status": status,
                "error": None if error is None else {"code": "server_error", "message": error},
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": call.model, "output": [] if output is None else self.items(output, status),
                "max_output_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "top_logprobs": params.logprobs, "usage": usage, **self.body.echo()}

    def logprobs(self) -> list[dict[str, Any]]:
        """The output tokens' logprobs, as chat's entries, when the request includes them (all the tokens, as
        vLLM's); else none."""
        if not self.call.want_logprobs:
            return []
        return self.render.chat_logprobs(self.call.choices[0].logprobs)["content"]  # type: ignore[no-any-return]

    def reasoning_tokens(self, output: Output) -> int:
        """OpenAI's `reasoning_tokens`: the output's tokens up to the one that ends its reasoning (all of them when
        it never ended), none without a reasoning item."""
        parser = self.call.reasoning_parser
        if not output.reasoning or parser is None:
            return 0
        ids, tail = self.call.choices[0].token_ids, ""
        for k, token in enumerate(ids):
            tail = tail[-len(parser.end):] + self.render.token_str(token)
            if parser.end in tail:
                return k + 1
        return len(ids)

    def items(self, output: Output, status: str) -> list[dict[str, Any]]:
        """The output items, in order; the last, unless it is a call (whole, so complete), is incomplete when the
        response is."""
        items = []
        if output.reasoning:
            items.append(self.reasoning_item(output, "completed"))
        if output.content:
            items.append(self.message_item(output, "completed"))
        if items and not output.calls and status == "incomplete":
            items[-1]["status"] = "incomplete"
        items.extend(self.call_item(output, k, "completed") for k in range(len(output.calls)))
        return items

    @staticmethod
    def reasoning_item(output: Output, status: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": output.reasoning_id, "summary": [],
                "content": [{"type": "reasoning_text", "text": output.reasoning}] if status != "in_progress" else [],
                "status": status}

    @staticmethod
    def message_item(output: Output, status: str) -> dict[str, Any]:
        return {"type": "message", "id": output.message_id, "status": status, "role": "assistant",
                "content": [_text_part(output.content, output.logprobs)] if status != "in_progress" else []}

    @staticmethod
    def call_item(output: Output, k: int, status: str) -> dict[str, Any]:
        fn = output.calls[k]["function"]
        return {"type": "function_call", "id": output.call_ids[k], "call_id": output.calls[k]["id"],
                "name": fn["name"], "arguments": fn["arguments"] if status != "in_progress" else "", "status": status}

    # -- the stream --------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    async def events(self, call: Call, head: tuple[int, StreamChunk],
                     stream: AsyncIterator[tuple[int, StreamChunk]]) -> AsyncIterator[bytes]:
        """The stream's events: the chat deltas of `call`'s chunks (`head`, then `stream`) as output items."""
        out = Output()
        writer = _ItemWriter(self, out)
        try:
            yield self.event("response.created", response=self.response(None))
            yield self.event("response.in_progress", response=self.response(None))
            item: tuple[int, StreamChunk] | None = head
            while item is not None:
                chunk = item[1]
                payload = self.render.chunk(call, *item)  # chat's delta: the one parse of reasoning and calls
                if payload is not None:
                    delta, lp = payload["choices"][0]["delta"], payload["choices"][0]["logprobs"]
                    for ev in writer.delta(delta.get("reasoning") or "", delta.get("content") or "",
                                           delta.get("tool_calls") or [], lp["content"] if lp else []):
                        yield ev
                if chunk.error:
                    yield self.failed(out, f"the engine failed the request: {chunk.error}")
                    return
                item = await anext(stream, None)  # type: ignore[arg-type]
            for ev in writer.close_open(self.status):  # the item still open is the last: incomplete if cut
                yield ev
            kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
            yield self.event(kind, response=self.response(out))
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            yield self.failed(out, engine_error(e).message)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    def failed(self, out: Output, message: str) -> bytes:
        return self.event("response.failed", response=self.response(out, "failed", message))


class _ItemWriter:
    """Opens and closes a stream's output items as the chat deltas come: reasoning, then content, then calls."""

    def __init__(self, answer: Answer, out: Output) -> None:
        self.answer = answer
        self.out = out
        self.open: str | None = None  # "reasoning" or "message": the item taking deltas
        self.index = -1  # output_index of the last item added

    def delta(self, reasoning: str, content: str, calls: list[dict[str, Any]],
              logprobs: list[dict[str, Any]]) -> list[bytes]:
        events: list[bytes] = []
        ev = self.answer.event
        out = self.out
        if reasoning:
            if self.open != "reasoning":
                events += self.close_open("completed")
                events += self.add(Answer.reasoning_item(out, "in_progress"), out.reasoning_id,
                                   {"type": "reasoning_text", "text": ""}, "reasoning")
            out.reasoning += reasoning
            events.append(ev("response.reasoning_text.delta", item_id=out.reasoning_id, output_index=self.index,
                             content_index=0, delta=reasoning))
        if content:
            if self.open != "message":
                events += self.close_open("completed")
                events += self.add(Answer.message_item(out, "in_progress"), out.message_id, _text_part(""), "message")
            out.content += content
            out.logprobs += logprobs
            events.append(ev("response.output_text.delta", item_id=out.message_id, output_index=self.index,
                             content_index=0, delta=content, logprobs=logprobs))
        if calls:
            events += self.close_open("completed")
            first = len(out.calls)
            out.add_calls(sorted(calls, key=lambda c: c.get("index", 0)))
            for k in range(first, len(out.calls)):
                self.index += 1
                item_id, fn = out.call_ids[k], out.calls[k]["function"]
                events.append(ev("response.output_item.added", output_index=self.index,
                                 item=Answer.call_item(out, k, "in_progress")))
                events.append(ev("response.function_call_arguments.delta", item_id=item_id, output_index=self.index,
                                 delta=fn["arguments"]))
                events.append(ev("response.function_call_arguments.done", item_id=item_id, output_index=self.index,
                                 name=fn["name"], arguments=fn["arguments"]))
                events.append(ev("response.output_item.done", output_index=self.index,
                                 item=Answer.call_item(out, k, "completed")))
        return events

    def add(self, item: dict[str, Any], item_id: str, part: dict[str, Any], kind: str) -> list[bytes]:
        self.index += 1
        self.open = kind
        ev = self.answer.event
        return [ev("response.output_item.added", output_index=self.index, item=item),
                ev("response.content_part.added", item_id=item_id, output_index=self.index, content_index=0,
                   part=part)]

    def close_open(self, status: str) -> list[bytes]:
        """The .done events of the item taking deltas, if any."""
        ev, out, kind = self.answer.event, self.out, self.open
        self.open = None
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": out.reasoning}
            return [ev("response.reasoning_text.done", item_id=out.reasoning_id, output_index=self.index,
                       content_index=0, text=out.reasoning),
                    ev("response.content_part.done", item_id=out.reasoning_id, output_index=self.index,
                       content_index=0, part=part),
                    ev("response.output_item.done", output_index=self.index,
                       item=Answer.reasoning_item(out, status))]
        if kind == "message":
            return [ev("response.output_text.done", item_id=out.message_id, output_index=self.index,
                       content_index=0, text=out.content, logprobs=out.logprobs),
                    ev("response.content_part.done", item_id=out.message_id, output_index=self.index,
                       content_index=0, part=_text_part(out.content, out.logprobs)),
                    ev("response.output_item.done", output_index=self.index, item=Answer.message_item(out, status))]
        return []


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


"""One HTTP completion call's state, and how it is rendered as OpenAI's JSON: whole responses and SSE chunks."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from actors.engine.frontend import StreamChunk, Tokenizer
from actors.runner.sampler import TokenLogprobs
from cluster.engine_client import GenerateRequest
from cluster.openai_api.schemas import (
    ChatChoice,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    Usage,
)


@dataclass
class Choice:
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
class Call:
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
        self.choices = [Choice() for _ in self.requests]

    def usage(self) -> dict[str, Any]:
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(c.num_cached_tokens for c in self.choices[:: self.n])  # each prompt once, as prompt_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    @property
    def chunk_object(self) -> str:
        """The `object` of this call's stream chunks."""
        return "text_completion" if self.kind == "completion" else "chat.completion.chunk"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Renderer:
    """Turns calls into OpenAI's response and chunk bodies; caches each token id's text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_strs: dict[int, str] = {}

    def chunk(self, call: Call, i: int, chunk: StreamChunk) -> dict[str, Any] | None:
        """The stream chunk for request `i`'s `chunk`; None when it carries nothing to show."""
        return self.completion_chunk(call, i, chunk) if call.kind == "completion" else self.chat_chunk(call, i, chunk)

    def response(self, call: Call) -> dict[str, Any]:
        """The whole (non-streamed) response of a finished call."""
        return self.completion_response(call) if call.kind == "completion" else self.chat_response(call)

    def token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_strs[token_id] = s
        return s

    def completion_logprobs(self, lps: Sequence[TokenLogprobs], choice: Choice) -> dict[str, Any]:
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

    def completion_chunk(self, call: Call, i: int, chunk: StreamChunk) -> dict[str, Any] | None:
        wants_lp = call.want_logprobs and bool(chunk.logprobs)
        if not (chunk.text or chunk.finish_reason or wants_lp):
            return None
        lp = self.completion_logprobs(chunk.logprobs, call.choices[i]) if wants_lp else None
        return {"id": call.response_id, "object": "text_completion", "created": call.created, "model": call.model,
                "choices": [{"index": i, "text": chunk.text, "logprobs": lp, "finish_reason": chunk.finish_reason}]}

    def chat_chunk(self, call: Call, i: int, chunk: StreamChunk) -> dict[str, Any] | None:
        wants_lp = call.want_logprobs and bool(chunk.logprobs)
        if not (chunk.text or chunk.finish_reason or wants_lp):
            return None
        delta = {"content": chunk.text} if chunk.text else {}
        lp = self.chat_logprobs(chunk.logprobs) if wants_lp else None
        return self.chat_delta(call, i, delta, lp, chunk.finish_reason)

    @staticmethod
    def chat_delta(call: Call, i: int, delta: dict[str, Any], lp: dict[str, Any] | None,
                   finish: str | None) -> dict[str, Any]:
        return {"id": call.response_id, "object": "chat.completion.chunk", "created": call.created,
                "model": call.model,
                "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    def completion_response(self, call: Call) -> dict[str, Any]:
        choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                    logprobs=self.completion_logprobs(c.logprobs, Choice()) if call.want_logprobs
                                    else None)
                   for i, c in enumerate(call.choices)]
        resp = CompletionResponse(id=call.response_id, created=call.created, model=call.model, choices=choices,
                                  usage=Usage(**call.usage()))
        return resp.model_dump()

    def chat_response(self, call: Call) -> dict[str, Any]:
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                              logprobs=self.chat_logprobs(c.logprobs) if call.want_logprobs else None)
                   for i, c in enumerate(call.choices)]
        resp = ChatCompletionResponse(id=call.response_id, created=call.created, model=call.model, choices=choices,
                                      usage=Usage(**call.usage()))
        return resp.model_dump()

    @staticmethod
    def usage_chunk(call: Call) -> dict[str, Any]:
        """The last chunk of a stream that asked for usage."""
        return {"id": call.response_id, "object": call.chunk_object, "created": call.created, "model": call.model,
                "choices": [], "usage": call.usage()}

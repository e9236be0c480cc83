"""One HTTP completion call's state, and how it is rendered as OpenAI's JSON: whole responses and SSE chunks."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from actors.engine.frontend import StreamChunk, Tokenizer
from actors.runner.sampler import TokenLogprobs
from cluster.engine_client import GenerateRequest
from cluster.openai_api.reasoning import ReasoningParser, split
from cluster.openai_api.schemas import (
    ChatChoice,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    Usage,
)
from cluster.openai_api.tools import ToolCallParser, finish_with_calls


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
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1.., when asked
    echoed: bool = False  # a stream with `echo`: the prompt went out in a chunk
    prompt_scored_sent: bool = False  # a completions stream: the `prompt_logprobs` went out in a chunk
    content_sent: int = 0  # a chat stream: characters of its content (`text` past any reasoning) sent
    reasoning_sent: int = 0  # a chat stream read for reasoning: characters of the reasoning sent
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it

    def add(self, chunk: StreamChunk) -> None:
        self.num_cached_tokens = chunk.num_cached_tokens or self.num_cached_tokens
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.prompt_logprobs.extend(chunk.prompt_logprobs)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.error = chunk.error or self.error
        if chunk.stop_reason is not None:
            self.stop_reason = chunk.stop_reason


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
    echo_prompts: list[str] | None = None  # completions with `echo`: each request's prompt text, shown first
    echo_only: bool = False  # completions with `echo` and `max_tokens` 0: the prompt alone (see `shown`)
    prompt_top: int | None = None  # alternatives the `prompt_logprobs` field shows (None: all scored)
    continuous_usage: bool = False  # every chunk carries its choice's usage so far
    tool_parser: ToolCallParser | None = None  # chat with tools: the output is read for tool calls
    reasoning_parser: ReasoningParser | None = None  # a server reading reasoning: the message has `reasoning`
    thinks: bool = False  # ... and the output opens with reasoning (else it is all content)
    include_reasoning: bool = True  # ... shown (false: read, so apart from the content, and dropped)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.choices = [Choice() for _ in self.requests]

    def shown(self, chunk: StreamChunk) -> StreamChunk:
        """`chunk` as this call shows it: an echo-only call drops the token the engine had to make (its output is
        the prompt alone, cut by `max_tokens` 0, as vLLM's)."""
        if not self.echo_only:
            return chunk
        finish = "length" if chunk.finish_reason in ("stop", "length") else chunk.finish_reason
        return replace(chunk, text="", token_ids=(), logprobs=(), finish_reason=finish, stop_reason=None)

    def usage(self) -> dict[str, Any]:
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(c.num_cached_tokens for c in self.choices[:: self.n])  # each prompt once, as prompt_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    def choice_usage(self, i: int) -> dict[str, int]:
        """Request `i`'s token counts so far."""
        prompt, completion = len(self.requests[i].prompt_token_ids), len(self.choices[i].token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

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
        payload = (self.completion_chunk(call, i, chunk) if call.kind == "completion"
                   else self.chat_chunk(call, i, chunk))
        if payload is not None and call.continuous_usage:
            payload["usage"] = call.choice_usage(i)
        return payload

    def chunks(self, call: Call, i: int, chunk: StreamChunk) -> list[dict[str, Any]]:
        """The stream chunks for request `i`'s `chunk`: `chunk`'s payload, if any, but a chat choice that ends with
        tool calls ends in two, the calls and then the finish, as OpenAI's."""
        payload = self.chunk(call, i, chunk)
        if payload is None:
            return []
        return _finish_apart(payload) if call.kind == "chat" else [payload]

    def response(self, call: Call) -> dict[str, Any]:
        """The whole (non-streamed) response of a finished call."""
        return self.completion_response(call) if call.kind == "completion" else self.chat_response(call)

    def token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_strs[token_id] = s
        return s

    def completion_logprobs(self, lps: Sequence[TokenLogprobs], choice: Choice, top_n: int | None = None
                            ) -> dict[str, Any]:
        """Completions logprobs of `lps`: each token's, and its `top_n` (None: all scored) most likely tokens
        plus itself, by text; offsets go on from the choice's."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            s = self.token_str(lp.token_id)
            tokens.append(s)
            token_lps.append(lp.logprob)
            top = {self.token_str(t): v for t, v in lp.top[:top_n]}
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

    def echo_logprobs(self, prompt_ids: Sequence[int], scored: Sequence[TokenLogprobs], choice: Choice,
                      top_n: int | None) -> dict[str, Any]:
        """Completions logprobs of an echoed prompt: its first token has none (null), the others `scored`, with
        the `top_n` most likely tokens the request's `logprobs` asks (the prompt may be scored wider, for
        `prompt_logprobs`)."""
        s = self.token_str(prompt_ids[0])
        first = {"tokens": [s], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [choice.text_offset]}
        choice.text_offset += len(s)
        return _joined(first, self.completion_logprobs(scored, choice, top_n))

    def prompt_logprobs(self, prompt_ids: Sequence[int], scored: Sequence[TokenLogprobs], top_n: int | None = None
                        ) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: null for the first token, then each token's and its `top_n` (None: all scored)
        most likely ones', by token id."""
        def entry(token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
            return {"logprob": logprob, "rank": rank, "decoded_token": self.token_str(token_id)}

        out: list[dict[str, Any] | None] = [None] if prompt_ids else []
        for lp in scored:
            top = {str(t): entry(t, v, r) for r, (t, v) in enumerate(lp.top[:top_n], 1)}
            top[str(lp.token_id)] = entry(lp.token_id, lp.logprob, lp.rank)
            out.append(top)
        return out

    def completion_chunk(self, call: Call, i: int, chunk: StreamChunk) -> dict[str, Any] | None:
        choice = call.choices[i]
        text, lp = chunk.text, None
        if call.echo_prompts is not None and not choice.echoed:
            choice.echoed = True
            text = call.echo_prompts[i] + text
            if call.want_logprobs:
                lp = self.echo_logprobs(call.requests[i].prompt_token_ids, chunk.prompt_logprobs, choice,
                                        call.requests[i].params.logprobs)
        if call.want_logprobs and chunk.logprobs:
            lp = _joined(lp, self.completion_logprobs(chunk.logprobs, choice))
        first = not choice.prompt_scored_sent and bool(chunk.token_ids or (call.echo_only and chunk.finish_reason))
        scored = first and call.requests[i].params.prompt_logprobs is not None
        if not (text or chunk.finish_reason or lp or scored):
            return None
        out: dict[str, Any] = {"index": i, "text": text, "logprobs": lp, "finish_reason": chunk.finish_reason,
                               "stop_reason": chunk.stop_reason}
        if scored:
            choice.prompt_scored_sent = True
            out["prompt_logprobs"] = self.prompt_logprobs(call.requests[i].prompt_token_ids, chunk.prompt_logprobs,
                                                          call.prompt_top)
        return {"id": call.response_id, "object": "text_completion", "created": call.created, "model": call.model,
                "choices": [out]}

    def chat_chunk(self, call: Call, i: int, chunk: StreamChunk) -> dict[str, Any] | None:
        wants_lp = call.want_logprobs and bool(chunk.logprobs)
        lp = self.chat_logprobs(chunk.logprobs) if wants_lp else None
        choice, finish = call.choices[i], chunk.finish_reason
        reasoning, text = _split(call, choice.text, final=finish is not None)
        new_reasoning, choice.reasoning_sent = reasoning[choice.reasoning_sent:], len(reasoning)
        delta: dict[str, Any] = {"reasoning": new_reasoning} if new_reasoning and call.include_reasoning else {}
        if call.tool_parser is not None:
            content, finish = _tool_aware_delta(call.tool_parser, text, choice, finish)
        else:
            content = _content_delta(text, choice)
        delta.update(content)
        if not (delta or finish or wants_lp):
            return None
        if call.tool_parser is None and call.reasoning_parser is None:  # as vLLM's: content, if only ""
            delta.setdefault("content", "")
        return self.chat_delta(call, i, delta, lp, finish, chunk.stop_reason)

    @staticmethod
    def chat_delta(call: Call, i: int, delta: dict[str, Any], lp: dict[str, Any] | None,
                   finish: str | None, stop_reason: str | int | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        if finish is not None:  # as vLLM's last chunk of a choice
            choice["stop_reason"] = stop_reason
        return {"id": call.response_id, "object": "chat.completion.chunk", "created": call.created,
                "model": call.model, "choices": [choice]}

    def completion_response(self, call: Call) -> dict[str, Any]:
        choices = [self._completion_choice(call, i) for i in range(len(call.choices))]
        resp = CompletionResponse(id=call.response_id, created=call.created, model=call.model, choices=choices,
                                  usage=Usage(**call.usage()))
        return resp.model_dump()

    def _completion_choice(self, call: Call, i: int) -> CompletionChoice:
        c, prompt_ids = call.choices[i], call.requests[i].prompt_token_ids
        text, lp, offsets = c.text, None, Choice()
        if call.echo_prompts is not None:
            text = call.echo_prompts[i] + text
            if call.want_logprobs:
                lp = self.echo_logprobs(prompt_ids, c.prompt_logprobs, offsets, call.requests[i].params.logprobs)
        if call.want_logprobs:
            lp = _joined(lp, self.completion_logprobs(c.logprobs, offsets))
        scored = call.requests[i].params.prompt_logprobs is not None
        shown = self.prompt_logprobs(prompt_ids, c.prompt_logprobs, call.prompt_top) if scored else None
        return CompletionChoice(index=i, text=text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                logprobs=lp, prompt_logprobs=shown)

    def chat_response(self, call: Call) -> dict[str, Any]:
        choices = [self._chat_choice(call, i) for i in range(len(call.choices))]
        first = call.requests[0]
        scored = (self.prompt_logprobs(first.prompt_token_ids, call.choices[0].prompt_logprobs)
                  if first.params.prompt_logprobs is not None else None)
        resp = ChatCompletionResponse(id=call.response_id, created=call.created, model=call.model, choices=choices,
                                      usage=Usage(**call.usage()), prompt_logprobs=scored)
        return resp.model_dump()

    def _chat_choice(self, call: Call, i: int) -> ChatChoice:
        c = call.choices[i]
        reasoning, text = _split(call, c.text, final=True)
        content, calls = (text, []) if call.tool_parser is None else call.tool_parser.parse(text)
        tool_calls = [t.as_dict() for t in calls]
        if call.reasoning_parser is None:
            message = ChatResponseMessage(content=content, tool_calls=tool_calls)
        else:  # as vLLM's: an empty part is null
            shown = reasoning if call.include_reasoning else ""
            message = ChatResponseMessage(content=content or None, reasoning=shown or None, tool_calls=tool_calls)
        finish = finish_with_calls(call.tool_parser) if call.tool_parser is not None and calls else c.finish_reason
        return ChatChoice(index=i, finish_reason=finish, message=message,
                          stop_reason=c.stop_reason,
                          logprobs=self.chat_logprobs(c.logprobs) if call.want_logprobs else None)

    @staticmethod
    def usage_chunk(call: Call) -> dict[str, Any]:
        """The last chunk of a stream that asked for usage."""
        return {"id": call.response_id, "object": call.chunk_object, "created": call.created, "model": call.model,
                "choices": [], "usage": call.usage()}


def _joined(a: dict[str, list[Any]] | None, b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Two completions logprobs objects as one (`a` first; None: `b` alone)."""
    return b if a is None else {k: a[k] + b[k] for k in a}


def _finish_apart(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat chunk whose delta carries tool calls and finishes its choice, as two: the delta, then the finish and
    stop reasons with an empty delta (OpenAI's last chunk). The openai client's stream helper reports a call's
    arguments done once a later chunk comes, so it never did for a call sent with the finish. Others as they are."""
    choice = payload["choices"][0]
    if choice["finish_reason"] is None or "tool_calls" not in choice["delta"]:
        return [payload]
    calls = {k: v for k, v in choice.items() if k != "stop_reason"}
    finish = {"index": choice["index"], "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"],
              "stop_reason": choice.get("stop_reason")}
    return [{**payload, "choices": [{**calls, "finish_reason": None}]}, {**payload, "choices": [finish]}]


def _split(call: Call, text: str, final: bool) -> tuple[str, str]:
    """(reasoning, content) of a chat choice's `text` so far (`final`: all of it): the one parse behind a stream's
    deltas and the whole response. No reasoning unless the call's output opens with it."""
    if call.reasoning_parser is None or not call.thinks:
        return "", text
    return split(call.reasoning_parser, text, final)


def _content_delta(text: str, choice: Choice) -> dict[str, Any]:
    """The part of the content so far, `text`, that the stream has not sent yet."""
    new, choice.content_sent = text[choice.content_sent:], len(text)
    return {"content": new} if new else {}


def _tool_aware_delta(parser: ToolCallParser, text: str, choice: Choice, finish: str | None
                      ) -> tuple[dict[str, Any], str | None]:
    """The next delta of a stream read for tool calls, from the choice's content so far, `text`: content up to
    where a call may begin (a partial opening held back), then, once the output ends, its calls (finish reason
    `tool_calls`) or the content held back."""
    start = text.find(parser.start)
    if finish is None:
        end = start if start != -1 else max(len(text) - len(parser.start) + 1, 0)
        content, choice.content_sent = text[choice.content_sent:end], max(choice.content_sent, end)
        return ({"content": content} if content else {}), None
    _, calls = parser.parse(text)
    delta: dict[str, Any] = {}
    rest = text[choice.content_sent:start if calls else len(text)]
    if rest:  # text before a call too, whitespace included, as the whole response keeps it
        delta["content"] = rest
    if calls:
        delta["tool_calls"] = [t.as_dict(k) for k, t in enumerate(calls)]
    choice.content_sent = len(text)
    return delta, finish_with_calls(parser) if calls else finish


"""Tool calls in chat completions, read back from the model's text in the format it was trained to write.

The request's `tools` go to the chat template, which tells the model how to call them; a parser then finds
the calls in the output (vLLM's `--tool-call-parser`):

- `hermes` (Qwen2.5, Qwen3, Hermes, ...): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks,
  with any text before them, untrimmed (as it streams, and as vLLM leaves it), as the message's content;
- `llama3_json` (Llama 3.1+): the whole output is `{"name": ..., "parameters": {...}}` (several joined by `;`),
  optionally after `<|python_tag|>`.

Either takes the arguments under `arguments` or `parameters`, as vLLM's llama3_json does. Text that does not parse
(JSON nested past what Python's parser takes included) stays the message's content, as vLLM leaves it.

`tool_choice` "required" or a named function is forced instead (as vLLM does): a grammar from the tools' parameter
schemas makes the output a JSON list of `{"name", "parameters"}` objects, or the named function's arguments, and
`ForcedCalls` reads it.

`parallel_tool_calls` false keeps the first call read (`FirstCallOnly`), as vLLM does.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from actors.request import StructuredOutputsParams
from actors.structured.grammar import grammar_error
from cluster.openai_api.errors import APIError


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as a JSON string (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = ""

    def as_dict(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's `tool_calls` entry (with `index` in a stream's delta)."""
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


class ToolCallParser(Protocol):
    start: str  # text that opens a call: a stream holds its content back from here

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output; no calls: the text is all content."""
        ...


def _json(text: str) -> Any:
    """`text` as JSON; ValueError if it is not (also when nested past what the parser recurses into: a model stuck
    opening arrays must not fail the request)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _call(text: str) -> ToolCall | None:
    """A call from JSON text of an object with `name` and its arguments, else None."""
    try:
        return _call_from(_json(text))
    except ValueError:
        return None


def _call_from(obj: Any) -> ToolCall | None:
    """A call from a JSON object with `name` and `arguments` or `parameters` (models write either; vLLM's parsers
    take both), else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    try:
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    except RecursionError:
        return None
    return ToolCall(obj["name"], arguments, _call_id())


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class HermesParser:
    start = "<tool_call>"
    end = "</tool_call>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls: list[ToolCall] = []
        first = text.find(self.start)
        pos = first
        while pos != -1:
            close = text.find(self.end, pos)
            call = _call(text[pos + len(self.start): close if close != -1 else len(text)])
            if call is None:
                return text, []
            calls.append(call)
            pos = text.find(self.start, close) if close != -1 else -1
        if not calls:
            return text, []
        return text[:first] or None, calls  # as it streamed (vLLM's too): untrimmed


class Llama3JsonParser:
    start = "{"
    tag = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self.tag).strip()
        if not body.startswith("{"):
            return text, []
        calls: list[ToolCall] = []
        pos, decoder = 0, json.JSONDecoder()
        while pos < len(body):  # each object read whole, so that a `;` inside its strings does not split it
            try:
                obj, end = decoder.raw_decode(body, pos)
            except (ValueError, RecursionError):
                return text, []
            call = _call_from(obj)
            rest = body[end:].lstrip()
            if call is None or not (rest == "" or rest.startswith(";")):
                return text, []
            calls.append(call)
            pos = len(body) - len(rest.removeprefix(";").lstrip())
        return None, calls


class ForcedCalls:
    """The output of a forced tool choice: a JSON list of calls (`function` None, "required"), or the arguments of
    `function`. Output that does not parse (cut by max_tokens) stays content."""

    start = ""  # all of it is held back while it streams

    def __init__(self, function: str | None = None) -> None:
        self.function = function

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        try:
            value = _json(text)
        except ValueError:
            return text, []
        if self.function is not None:
            return None, [ToolCall(self.function, text, _call_id())]
        if not isinstance(value, list):
            return text, []
        calls = [_call_from(v) for v in value]
        return (None, calls) if all(c is not None for c in calls) else (text, [])  # type: ignore[misc]


class FirstCallOnly:
    """`parser` keeping the first of the calls it reads (`parallel_tool_calls` false): the others are dropped, as
    vLLM does, and their text is not content."""

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self.start = parser.start

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls = self.parser.parse(text)
        return content, calls[:1]


def finish_with_calls(parser: ToolCallParser) -> str:
    """The finish reason of an output read as tool calls, as OpenAI's and vLLM's: `tool_calls` for auto and
    `required`, `stop` for a function named by `tool_choice`."""
    return "stop" if isinstance(parser, ForcedCalls) and parser.function is not None else "tool_calls"


def forced_calls_schema(tools: list[dict[str, Any]], function: str | None) -> dict[str, Any]:
    """The JSON schema of the output that `ForcedCalls(function)` reads, from OpenAI `tools` entries; 400 naming
    the tool whose parameters (that the grammar is made of) are not a schema it can be (rather than the engine's
    error about a `structured_outputs` the request never sent)."""
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object", "properties": {}}
              for t in tools}
    for k, t in enumerate(tools):
        name = t["function"]["name"]
        if function in (None, name):
            problem = grammar_error(StructuredOutputsParams(json=params[name]))
            if problem:
                raise APIError(400, f"tools.{k}.function.parameters of {name!r} cannot be forced by tool_choice: "
                                    f"{problem}", param="tools")
    if function is not None:
        return params[function]
    return {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
         "required": ["name", "parameters"], "additionalProperties": False}
        for name, schema in params.items()]}}


TOOL_CALL_PARSERS: dict[str, ToolCallParser] = {"hermes": HermesParser(), "llama3_json": Llama3JsonParser()}


def parser_named(name: str) -> ToolCallParser:
    """The parser named `name` (ValueError naming the choices otherwise)."""
    try:
        return TOOL_CALL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose from {', '.join(TOOL_CALL_PARSERS)}") from None


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template: an assistant's earlier calls get their arguments as objects, as
    templates index them (vLLM does the same)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(m)
    return out


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        return {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
    except json.JSONDecodeError:
        return call

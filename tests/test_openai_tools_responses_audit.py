"""Tool calling and the Responses API as users of the official `openai` client meet them: through the client's own
stream helpers and typed parsing (`chat.completions.stream` / `.parse` with `pydantic_function_tool`,
`responses.stream` / `.parse`), which fail loudly on events or chunks of the wrong shape or order.

Scripted engines (test_openai_api's `ScriptedClient`) write the tool calls a real model would (the hermes format);
the live tiny engine is made to call tools by a forced `tool_choice` (a grammar from the tools' schemas).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import openai
import pytest
from pydantic import BaseModel

from actors.engine.frontend import Tokenizer
from cluster.openai_api import create_app

from test_openai_api import (  # noqa: F401  (live, tool_template_tokenizer: fixtures used here)
    FLAG_TOOL, MODEL, NO_WHITESPACE, UNIT_TOOL, WEATHER_TOOL, Live, ScriptedClient, StubClient, live,
    tool_template_tokenizer,
)
from test_reasoning import THOUGHT

T = TypeVar("T")

PARIS = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
OSLO = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
USER = [{"role": "user", "content": "Weather in Paris and Oslo?"}]


class GetWeather(BaseModel):
    """Weather of a city (the client's strict tool, parsed back into this model)."""

    city: str


class SetFlag(BaseModel):
    on: bool


class Color(BaseModel):
    color: Literal["red", "green"]
    ok: bool


def flat(tool: dict[str, Any]) -> dict[str, Any]:
    """A chat tool as a Responses function tool (flat)."""
    return {"type": "function", **tool["function"]}


def through_client(app: Any, use: Callable[[openai.AsyncOpenAI], Awaitable[T]]) -> T:
    """`use(client)`'s result, the official async client talking to `app` in process."""
    async def go() -> T:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            return await use(openai.AsyncOpenAI(base_url="http://stub/v1", api_key="x", http_client=http,
                                                max_retries=0))

    return asyncio.run(go())


def scripted_app(tokenizer: Path, said: str, **kw: Any) -> tuple[Any, ScriptedClient]:
    client = ScriptedClient(said)
    return create_app(client, Tokenizer(tokenizer), **kw), client  # type: ignore[arg-type]


def prompt_of(tokenizer: Path, client: StubClient, k: int = 0) -> str:
    return Tokenizer(tokenizer).decode(client.requests[k].prompt_token_ids, skip_special_tokens=False)


# -- chat completions: tool calls through the client's helpers ---------------------------------------


def test_streamed_hermes_calls_parse_with_the_client_s_stream_helper(tool_template_tokenizer: Path) -> None:
    """`chat.completions.stream` with a strict pydantic tool: the helper joins the deltas (an id sent twice would
    be joined twice), reports each call's arguments done, parses them into the tool's model, and the final
    completion matches the whole (non-streamed) one."""
    app, _ = scripted_app(tool_template_tokenizer, f"Let me look.{PARIS}{OSLO}")
    tools = [openai.pydantic_function_tool(GetWeather, name="get_weather")]

    async def use(oa: openai.AsyncOpenAI) -> tuple[Any, list[Any], Any]:
        async with oa.chat.completions.stream(model=MODEL, messages=USER, tools=tools) as s:  # type: ignore[arg-type]
            events = [e async for e in s]
            final = await s.get_final_completion()
        whole = await oa.chat.completions.parse(model=MODEL, messages=USER, tools=tools)  # type: ignore[arg-type]
        return final, events, whole

    final, events, whole = through_client(app, use)
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.index, e.name, e.parsed_arguments) for e in done] == [
        (0, "get_weather", GetWeather(city="Paris")), (1, "get_weather", GetWeather(city="Oslo"))]
    for completion in (final, whole):
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
        calls = choice.message.tool_calls or []
        assert [c.function.parsed_arguments for c in calls] == [GetWeather(city="Paris"), GetWeather(city="Oslo")]
        assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
        assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "set_flag"}}])
def test_forced_calls_of_the_live_model_parse_into_the_tools_models(live: Live, tool_choice: Any,
                                                                    stream: bool) -> None:
    """tool_choice required or named on the random model: the calls parse (the client's strict parsing) into the
    tools' models; finish_reason tool_calls, or stop for a named function (OpenAI's)."""
    tools = [openai.pydantic_function_tool(SetFlag, name="set_flag")]
    kw: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": "Do it"}], max_tokens=60,
                              temperature=0, tools=tools, tool_choice=tool_choice)
    if stream:
        with live.oa.chat.completions.stream(**kw) as s:
            completion = s.get_final_completion()
    else:
        completion = live.oa.chat.completions.parse(**kw)
    choice = completion.choices[0]
    assert choice.finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
    calls = choice.message.tool_calls or []
    assert calls and all(isinstance(c.function.parsed_arguments, SetFlag) for c in calls)
    assert all(c.id.startswith("call_") for c in calls) and not choice.message.content


def _joined_calls(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Each streamed call's fields by index: the id and type as first sent (an error if sent again), the name,
    the arguments deltas joined."""
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks:
        for t in (c.choices[0].delta.tool_calls if c.choices else None) or []:
            entry = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
            if t.id is not None:
                assert entry["id"] is None, f"call {t.index}: a second id {t.id}"
                entry["id"] = t.id
            entry["name"] += (t.function.name or "") if t.function else ""
            entry["arguments"] += (t.function.arguments or "") if t.function else ""
    return calls


def test_parallel_tool_calls_false_gives_one_call_of_several_written(tool_template_tokenizer: Path) -> None:
    """`parallel_tool_calls: false` (vLLM since 0.11.1, OpenAI's API): the first call only, streamed or not; true
    or left out, all of them."""
    app, _ = scripted_app(tool_template_tokenizer, f"{PARIS}\n{OSLO}")

    async def use(oa: openai.AsyncOpenAI) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for parallel in (False, True, openai.omit):
            kw: dict[str, Any] = dict(model=MODEL, messages=USER, tools=[WEATHER_TOOL], parallel_tool_calls=parallel)
            r = await oa.chat.completions.create(**kw)
            chunks = [c async for c in await oa.chat.completions.create(stream=True, **kw)]
            out[parallel] = (r, chunks)
        return out

    for parallel, (r, chunks) in through_client(app, use).items():
        expected = [{"city": "Paris"}] if parallel is False else [{"city": "Paris"}, {"city": "Oslo"}]
        calls = r.choices[0].message.tool_calls or []
        assert [json.loads(c.function.arguments) for c in calls] == expected, parallel
        joined = _joined_calls(chunks)
        assert sorted(joined) == list(range(len(expected)))
        assert [json.loads(joined[k]["arguments"]) for k in sorted(joined)] == expected, parallel
        assert r.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_with_tool_choice_required_makes_one_call(tool_template_tokenizer: Path) -> None:
    """Forced (required) and not parallel: one call of the list the grammar lets the model write."""
    said = json.dumps([{"name": "get_weather", "parameters": {"city": c}} for c in ("Paris", "Oslo")])
    app, _ = scripted_app(tool_template_tokenizer, said)

    async def use(oa: openai.AsyncOpenAI) -> tuple[Any, list[Any]]:
        kw: dict[str, Any] = dict(model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="required",
                                  parallel_tool_calls=False)
        return (await oa.chat.completions.create(**kw),
                [c async for c in await oa.chat.completions.create(stream=True, **kw)])

    r, chunks = through_client(app, use)
    calls = r.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}]
    assert r.choices[0].finish_reason == "tool_calls"
    assert [json.loads(c["arguments"]) for c in _joined_calls(chunks).values()] == [{"city": "Paris"}]


BAD_TOOLS: list[tuple[str, dict[str, Any], str, str]] = [  # id, body fields, message, param
    ("parameters-not-an-object", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools.0.function.parameters", "tools.0.function.parameters"),
    ("no-name", {"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools.0.function.name",
     "tools.0.function.name"),
    ("not-a-function", {"tools": [{"type": "retrieval"}]}, "tools.0.type", "tools.0.type"),
    ("forced-bad-schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "datetime"}}}}}], "tool_choice": "required"},
     "cannot be forced by tool_choice", "tools"),
    ("named-unknown", {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not one of the tools", "tool_choice"),
    ("required-no-tools", {"tool_choice": "required"}, "needs tools", "tool_choice"),
]


# -- the Responses API through the client's helpers ---------------------------------------------------


TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.done", "response.content_part.done",
               "response.output_item.done", "response.completed"]


def test_a_text_response_streams_openai_s_event_sequence(tool_template_tokenizer: Path) -> None:
    """`responses.stream`: created, in_progress, the message's item and part added, its text deltas, text done,
    part done, item done, completed (with usage), numbered from 0; the final response is the whole one's."""
    app, _ = scripted_app(tool_template_tokenizer, "The sky is blue today.")

    async def use(oa: openai.AsyncOpenAI) -> tuple[list[Any], Any, Any]:
        async with oa.responses.stream(model=MODEL, input="Sky?", instructions="Be brief.") as s:
            events = [e async for e in s]
            final = await s.get_final_response()
        return events, final, await oa.responses.create(model=MODEL, input="Sky?", instructions="Be brief.")

    events, final, whole = through_client(app, use)
    kinds = [e.type for e in events]
    assert [k for k in kinds if k != "response.output_text.delta"] == TEXT_EVENTS
    assert kinds.index("response.output_text.delta") == 4 and kinds.count("response.output_text.delta") >= 2
    assert [e.sequence_number for e in events] == list(range(len(events)))
    message_id = events[2].item.id
    assert all(e.item_id == message_id for e in events if hasattr(e, "item_id"))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "The sky is blue today."
    for r in (final, whole):
        assert r.status == "completed" and r.output_text == "The sky is blue today." and r.instructions == "Be brief."
        assert r.usage is not None and r.usage.output_tokens > 0 and r.usage.total_tokens == (
            r.usage.input_tokens + r.usage.output_tokens)
    assert final.id == events[0].response.id and final.output[0].id == message_id


def test_function_calls_stream_with_call_ids_and_their_outputs_go_back_as_input(tool_template_tokenizer: Path
                                                                               ) -> None:
    """A turn with text and two calls: the stream helper gets a message item, then a function_call item per call
    (added, arguments delta and done, item done), each with its call_id; the final response's items sent back as
    input with a function_call_output per call_id reach the template as one assistant turn and tool messages."""
    app, client = scripted_app(tool_template_tokenizer, f"Checking.{PARIS}{OSLO}")
    tools = [flat(WEATHER_TOOL)]

    async def use(oa: openai.AsyncOpenAI) -> tuple[list[Any], Any, Any]:
        async with oa.responses.stream(model=MODEL, input=USER, tools=tools) as s:  # type: ignore[arg-type]
            events = [e async for e in s]
            final = await s.get_final_response()
        calls = [i for i in final.output if i.type == "function_call"]
        follow_up = [*USER, *(i.model_dump(exclude_none=True) for i in final.output),
                     *({"type": "function_call_output", "call_id": c.call_id, "output": f"sun in {k}"}
                       for k, c in enumerate(calls))]
        return events, final, await oa.responses.create(model=MODEL, input=follow_up, tools=tools)  # type: ignore

    events, final, _ = through_client(app, use)
    assert [i.type for i in final.output] == ["message", "function_call", "function_call"]
    assert final.output_text == "Checking." and final.status == "completed"
    calls = final.output[1:]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                 ("get_weather", {"city": "Oslo"})]
    assert all(c.call_id.startswith("call_") and c.id.startswith("fc_") for c in calls)
    assert len({c.call_id for c in calls}) == 2
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.output_index, e.item_id, e.arguments) for e in done] == [(k + 1, c.id, c.arguments)
                                                                       for k, c in enumerate(calls)]
    assert prompt_of(tool_template_tokenizer, client, 1) == (
        "[tools: get_weather]<user>Weather in Paris and Oslo?<assistant>Checking.(call get_weather city=Paris)"
        "(call get_weather city=Oslo)<tool>sun in 0<tool>sun in 1<assistant>")


@pytest.mark.parametrize("stream", [False, True])
def test_responses_parallel_tool_calls_false_gives_one_function_call(tool_template_tokenizer: Path,
                                                                     stream: bool) -> None:
    app, _ = scripted_app(tool_template_tokenizer, f"{PARIS}{OSLO}")

    async def use(oa: openai.AsyncOpenAI) -> Any:
        kw: dict[str, Any] = dict(model=MODEL, input=USER, tools=[flat(WEATHER_TOOL)], parallel_tool_calls=False)
        if not stream:
            return await oa.responses.create(**kw)
        async with oa.responses.stream(**kw) as s:
            return await s.get_final_response()

    r = through_client(app, use)
    assert [(i.type, json.loads(i.arguments)) for i in r.output] == [("function_call", {"city": "Paris"})]
    assert r.parallel_tool_calls is False


def test_reasoning_then_message_through_the_stream_helper(tool_template_tokenizer: Path) -> None:
    app, _ = scripted_app(tool_template_tokenizer, THOUGHT, reasoning_parser="deepseek_r1")

    async def use(oa: openai.AsyncOpenAI) -> tuple[list[Any], Any]:
        async with oa.responses.stream(model=MODEL, input="2+2?") as s:
            return [e async for e in s], await s.get_final_response()

    events, final = through_client(app, use)
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "\nThe user asks 2+2. That is 4.\n"  # type: ignore[union-attr, index]
    assert final.output_text == "\n\nIt is 4." and events[-1].type == "response.completed"
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens > 0


def test_a_cut_stream_ends_incomplete_with_the_reason_through_the_stream_helper(live: Live) -> None:
    """Cut by max_output_tokens: the helper takes every event, the last response.incomplete (OpenAI's; the helper's
    get_final_response wants response.completed, so it raises for OpenAI's own cut streams too)."""
    with live.oa.responses.stream(model=MODEL, input="Go on", max_output_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True}) as s:
        events = list(s)
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.usage is not None and final.usage.output_tokens == 4 and final.output[0].status == "incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text


@pytest.mark.parametrize("stream", [False, True])
def test_text_format_from_a_pydantic_model_parses_into_it(live: Live, stream: bool) -> None:
    kw: dict[str, Any] = dict(model=MODEL, input="Pick a color", max_output_tokens=64, temperature=0,
                              text_format=Color, extra_body={"logit_bias": NO_WHITESPACE})
    if stream:
        with live.oa.responses.stream(**kw) as s:
            r = s.get_final_response()
    else:
        r = live.oa.responses.parse(**kw)
    assert r.status == "completed" and isinstance(r.output_parsed, Color)


@pytest.mark.parametrize("stream", [False, True])
def test_forced_function_calls_of_the_live_model_through_responses(live: Live, stream: bool) -> None:
    """tool_choice required with not parallel: exactly one function_call, whose arguments validate."""
    kw: dict[str, Any] = dict(model=MODEL, input="Do it", max_output_tokens=200, temperature=0,
                              tools=[flat(UNIT_TOOL), flat(FLAG_TOOL)], tool_choice="required",
                              parallel_tool_calls=False, extra_body={"logit_bias": NO_WHITESPACE})
    if stream:
        with live.oa.responses.stream(**kw) as s:
            r = s.get_final_response()
    else:
        r = live.oa.responses.create(**kw)
    (call,) = r.output
    assert call.type == "function_call" and call.call_id.startswith("call_")
    model = {"set_flag": SetFlag, "get_temperature": None}[call.name]
    if model is not None:
        model.model_validate_json(call.arguments)


def test_nothing_stored_delete_and_cancel_are_not_found_through_the_client(tool_template_tokenizer: Path) -> None:
    app, _ = scripted_app(tool_template_tokenizer, "Hi.")

    async def use(oa: openai.AsyncOpenAI) -> list[int]:
        r = await oa.responses.create(model=MODEL, input="Hi", store=True)
        codes = []
        for call in (oa.responses.retrieve, oa.responses.delete, oa.responses.cancel):
            with pytest.raises(openai.NotFoundError) as e:
                await call(r.id)
            codes.append(e.value.status_code)
        return codes

    assert through_client(app, use) == [404, 404, 404]


RESPONSES_BAD_TOOLS: list[tuple[str, dict[str, Any], str, str]] = [
    ("parameters-not-an-object", {"tools": [{"type": "function", "name": "f", "parameters": "x"}]},
     "tools.0.parameters", "tools.0.parameters"),
    ("no-name", {"tools": [{"type": "function", "parameters": {}}]}, "tools.0.name", "tools.0.name"),
    ("forced-bad-schema", {"tools": [{"type": "function", "name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "datetime"}}}}], "tool_choice": "required"},
     "cannot be forced by tool_choice", "tools"),
]


async def _chat_with(oa: openai.AsyncOpenAI, fields: dict[str, Any]) -> Any:
    return await oa.chat.completions.create(model=MODEL, messages=USER, extra_body=fields)  # type: ignore[arg-type]


async def _response_with(oa: openai.AsyncOpenAI, fields: dict[str, Any]) -> Any:
    return await oa.responses.create(model=MODEL, input="hi", extra_body=fields)


BAD_TOOL_CALLS = ([(f"chat-{c[0]}", _chat_with, *c[1:]) for c in BAD_TOOLS]
                  + [(f"responses-{c[0]}", _response_with, *c[1:]) for c in RESPONSES_BAD_TOOLS])


@pytest.mark.parametrize("create,fields,message,param", [c[1:] for c in BAD_TOOL_CALLS],
                         ids=[c[0] for c in BAD_TOOL_CALLS])
def test_bad_tools_are_a_400_the_client_raises_with_param(tiny_llama: Path, create: Any, fields: dict[str, Any],
                                                          message: str, param: str) -> None:
    """Chat and Responses alike: OpenAI's error body, `param` naming the field, nothing sent to an engine."""
    client = StubClient()
    app = create_app(client, Tokenizer(tiny_llama))  # type: ignore[arg-type]

    async def use(oa: openai.AsyncOpenAI) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as e:
            await create(oa, fields)
        return e.value

    err = through_client(app, use)
    assert err.status_code == 400 and message in err.message and client.requests == []
    assert isinstance(err.body, dict) and err.body["param"] == param and err.body["code"] == 400

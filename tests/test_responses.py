"""OpenAI's Responses API (`POST /v1/responses`) through the official `openai` client, as vLLM's server answers it.

A live server on the tiny CPU engine (test_openai_api's `live`) for what the model's tokens decide: string and message
input, instructions in the prompt, the max_output_tokens cut, `text.format`, forced function calls, stream against
whole response, bad input. Scripted engines (test_openai_api's `ScriptedClient`, test_reasoning's `ChunkedClient`) for
what the random model cannot write: reasoning, tool calls in the hermes format, earlier calls and their outputs in the
prompt.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response

from actors.engine.frontend import Tokenizer
from cluster.openai_api import create_app

from support import wait_until
from test_openai_api import (  # noqa: F401  (live, tool_template_tokenizer: fixtures used here)
    COLOR_SCHEMA, FLAG_TOOL, LONG, MAX_MODEL_LEN, MODEL, NO_WHITESPACE, UNIT_TOOL, WEATHER_TOOL, Live, ScriptedClient,
    StubClient, _stub_call, leave_while_running, live, tool_template_tokenizer,
)
from test_reasoning import THOUGHT, ChunkedClient


def flat(tool: dict[str, Any]) -> dict[str, Any]:
    """A chat tool as a Responses function tool (flat)."""
    return {"type": "function", **tool["function"]}


def streamed(events: list[Any]) -> Response:
    """The final response of a stream's events (parsed by the client), after checking the events' order."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert kinds.count(kinds[-1]) == 1 and not any(k in ("response.failed", "error") for k in kinds)
    final: Response = events[-1].response
    # each item: added, its part, deltas, done; the items' done events carry what the final response holds
    done = [e.item for e in events if e.type == "response.output_item.done"]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.output_index for e in added] == list(range(len(final.output)))
    assert [i.model_dump() for i in done] == [i.model_dump() for i in final.output]
    for index, item in enumerate(final.output):
        mine = [e for e in events if getattr(e, "output_index", None) == index]
        types = [e.type for e in mine]
        assert types[0] == "response.output_item.added" and types[-1] == "response.output_item.done"
        if item.type == "message":
            deltas = "".join(e.delta for e in mine if e.type == "response.output_text.delta")
            assert types[1] == "response.content_part.added" and types[-3:-1] == [
                "response.output_text.done", "response.content_part.done"]
            assert deltas == item.content[0].text == mine[-3].text  # type: ignore[union-attr]
        elif item.type == "reasoning":
            deltas = "".join(e.delta for e in mine if e.type == "response.reasoning_text.delta")
            assert types[1] == "response.content_part.added" and types[-3:-1] == [
                "response.reasoning_text.done", "response.content_part.done"]
            assert item.content is not None and deltas == item.content[0].text == mine[-3].text
        else:
            assert item.type == "function_call"
            assert types[1:-1] == ["response.function_call_arguments.delta", "response.function_call_arguments.done"]
            assert mine[1].delta == mine[2].arguments == item.arguments
    return final


def same_output(a: Response, b: Response) -> None:
    """The two responses' output items agree but for their ids (and a function call's call_id), and so do their
    status and token counts (the prefix cache may serve the second's prompt)."""
    def plain(r: Response) -> list[dict[str, Any]]:
        return [{k: v for k, v in i.model_dump().items() if k not in ("id", "call_id")} for i in r.output]

    def counts(r: Response) -> tuple[int, int, int] | None:
        return None if r.usage is None else (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens)

    assert plain(a) == plain(b)
    assert (a.status, a.incomplete_details, counts(a)) == (b.status, b.incomplete_details, counts(b))


# -- against the tiny engine -----------------------------------------------------------


def test_a_string_input_gives_a_message_whose_text_output_text_reads(live: Live) -> None:
    raw = live.oa.responses.with_raw_response.create(
        model=MODEL, input="Hello world", max_output_tokens=8, temperature=0,
        extra_headers={"x-request-id": "resp-test.1"}, extra_body={"ignore_eos": True}, metadata={"k": "v"})
    assert raw.headers["x-request-id"] == "resp-test.1"
    r = raw.parse()
    assert r.id == "resp_resp-test.1" and r.object == "response" and r.model == MODEL
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert r.output_text == message.content[0].text and r.output_text
    assert (r.max_output_tokens, r.temperature, r.top_p, r.metadata, r.tools, r.tool_choice) == (
        8, 0.0, 1.0, {"k": "v"}, [], "auto")
    assert r.text is not None and r.text.format is not None and r.text.format.type == "text"
    chat_ids = live.http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hello world"}]}).json()
    assert r.usage is not None and r.usage.input_tokens == chat_ids["count"]
    assert (r.usage.output_tokens, r.usage.total_tokens) == (8, chat_ids["count"] + 8)
    assert r.usage.output_tokens_details.reasoning_tokens == 0 and r.usage.input_tokens_details.cached_tokens >= 0


def test_instructions_come_first_as_a_system_message(live: Live) -> None:
    """usage.input_tokens is the chat template's count of the system message (the instructions) and the input's
    messages; the engine's prompt is that text."""
    instructions = "Answer in one word."
    items = [{"role": "user", "content": "Name a color"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Red"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Another"}, {"type": "input_text",
                                                                                    "text": " one"}]}]
    r = live.oa.responses.create(model=MODEL, input=items, instructions=instructions,  # type: ignore[arg-type]
                                 max_output_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r.instructions == instructions
    chat = [{"role": "system", "content": instructions}, {"role": "user", "content": "Name a color"},
            {"role": "assistant", "content": "Red"}, {"role": "user", "content": "Another one"}]
    assert r.usage is not None and r.usage.input_tokens == live.http.post(
        "/tokenize", json={"messages": chat}).json()["count"]


def test_the_engine_prompt_holds_the_instructions_then_the_input(tiny_llama: Path) -> None:
    client = ScriptedClient("Fine.")
    tok = Tokenizer(tiny_llama)
    r = ask(create_app(client, tok), input=[{"role": "user", "content": "Hi"}], instructions="Be terse.")  # type: ignore
    assert r.output_text == "Fine." and r.status == "completed"
    assert client.requests[0].prompt_token_ids == tok.chat_ids([{"role": "system", "content": "Be terse."},
                                                                {"role": "user", "content": "Hi"}])


def test_fields_sent_as_null_take_their_defaults(tiny_llama: Path) -> None:
    """Clients that send unset fields as null (OpenAI's API takes them as left out)."""
    nulls = dict.fromkeys(("instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools",
                           "tool_choice", "parallel_tool_calls", "text", "store", "metadata", "reasoning", "top_k",
                           "seed", "ignore_eos", "truncation", "user", "previous_response_id", "background"))
    r = _stub_call(tiny_llama, ScriptedClient("Fine."), "POST", "/v1/responses",
                   json={"model": MODEL, "input": "Hi", **nulls})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["status"], body["tools"], body["tool_choice"], body["parallel_tool_calls"]) == (
        "completed", [], "auto", True)
    assert body["output"][0]["content"][0]["text"] == "Fine."


@pytest.mark.parametrize("stream", [False, True])
def test_max_output_tokens_cut_makes_the_response_incomplete(live: Live, stream: bool) -> None:
    kw: dict[str, Any] = dict(model=MODEL, input="Keep going", max_output_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    if stream:
        events = list(live.oa.responses.create(stream=True, **kw))
        assert events[-1].type == "response.incomplete"
        r = streamed(events)
    else:
        r = live.oa.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 5
    (message,) = r.output
    assert message.type == "message" and message.status == "incomplete"


def test_a_stream_ends_in_the_response_a_whole_call_returns(live: Live) -> None:
    """The same greedy request, streamed and not: the events parse with the official client, deltas join to the
    items' text, and the final event's response equals the non-streamed one but for ids."""
    kw: dict[str, Any] = dict(model=MODEL, input=[{"role": "user", "content": "Tell me more"}], instructions="Be kind.",
                              max_output_tokens=12, temperature=0, extra_body={"ignore_eos": True, "stop": ["zz"]})
    whole = live.oa.responses.create(**kw)
    events = list(live.oa.responses.create(stream=True, **kw))
    final = streamed(events)
    assert events[-1].type == "response.incomplete"  # 12 tokens, ignore_eos: cut
    same_output(final, whole)
    assert final.output_text == whole.output_text and final.output_text
    ignore = {"id", "created_at", "output", "usage"}
    assert ({k: v for k, v in final.model_dump().items() if k not in ignore}
            == {k: v for k, v in whole.model_dump().items() if k not in ignore})
    # a completed one: EOS allowed, room for it
    full = live.oa.responses.create(model=MODEL, input="Hi", max_output_tokens=40, temperature=0, top_p=0.5)
    events = list(live.oa.responses.create(model=MODEL, input="Hi", max_output_tokens=40, temperature=0, top_p=0.5,
                                           stream=True))
    same_output(streamed(events), full)
    assert full.top_p == 0.5


def test_raw_stream_is_server_sent_events_named_by_type(live: Live) -> None:
    with live.http.stream("POST", "/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True,
                                                         "max_output_tokens": 3, "ignore_eos": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        blocks = [b for b in r.read().decode().split("\n\n") if b]
    for k, block in enumerate(blocks):
        event, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert event == f"event: {payload['type']}" and payload["sequence_number"] == k
    assert "[DONE]" not in blocks[-1]


def test_text_format_json_schema_makes_output_text_validate(live: Live) -> None:
    """text.format json_schema becomes structured outputs (vLLM's logit_bias keeps the random model off JSON's
    optional whitespace); json_object too."""
    fmt = {"type": "json_schema", "name": "pick", "schema": COLOR_SCHEMA, "strict": True}
    for stream in (False, True):
        kw: dict[str, Any] = dict(model=MODEL, input="Pick a color", max_output_tokens=64, temperature=0,
                                  text={"format": fmt}, extra_body={"logit_bias": NO_WHITESPACE})
        r = streamed(list(live.oa.responses.create(stream=True, **kw))) if stream else live.oa.responses.create(**kw)
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), COLOR_SCHEMA)
        assert r.text is not None and r.text.format is not None and r.text.format.type == "json_schema"
        assert r.text.format.schema_ == COLOR_SCHEMA  # type: ignore[union-attr]  (echoed)
    r = live.oa.responses.create(model=MODEL, input="Any JSON", max_output_tokens=64, temperature=0,
                                 text={"format": {"type": "json_object"}}, extra_body={"logit_bias": {"125": 100}})
    assert (r.output_text, r.status) == ("{}", "completed")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "set_flag"}])
def test_a_required_or_named_tool_choice_gives_function_calls_that_validate(live: Live, tool_choice: Any,
                                                                           stream: bool) -> None:
    tools = [flat(UNIT_TOOL), flat(FLAG_TOOL)]
    kw: dict[str, Any] = dict(model=MODEL, input="Do it", max_output_tokens=120, temperature=0, tools=tools,
                              tool_choice=tool_choice)
    r = streamed(list(live.oa.responses.create(stream=True, **kw))) if stream else live.oa.responses.create(**kw)
    assert r.status == "completed" and r.output and r.output_text == ""
    schemas = {t["name"]: t["parameters"] for t in tools}
    for item in r.output:
        assert item.type == "function_call" and item.status == "completed"
        assert item.id and item.id.startswith("fc_") and item.call_id.startswith("call_")
        assert item.name in schemas and (tool_choice == "required" or item.name == "set_flag")
        jsonschema.validate(json.loads(item.arguments), schemas[item.name])
    assert [t.name for t in r.tools] == ["get_temperature", "set_flag"]  # type: ignore[union-attr]
    assert r.tool_choice == tool_choice or r.tool_choice.model_dump(exclude_none=True) == tool_choice  # type: ignore


# -- bad input -----------------------------------------------------------------------


def _req(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "Hello", "max_output_tokens": 4, **kw}


BAD: list[tuple[str, dict[str, Any] | bytes, int, str, str | None]] = [  # body, status, message, param
    ("unknown-item-type", _req(input=[{"type": "web_search_call", "id": "ws_1"}]), 400,
     "input item type 'web_search_call' is not supported", "input.0.type"),
    ("image-part", _req(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), 400,
     "only text content parts", "input.0.content"),
    ("bad-role", _req(input=[{"role": "robot", "content": "hi"}]), 400, "input.0.role", "input.0.role"),
    ("call-without-id", _req(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), 400,
     "input.0.call_id: Field required", "input.0.call_id"),
    ("empty-input", _req(input=[]), 400, "input must not be empty", "input"),
    ("missing-input", {"model": MODEL}, 400, "input: Field required", "input"),
    ("previous-response-id", _req(previous_response_id="resp_123"), 400,
     "Previous response with id 'resp_123' not found: this server stores no responses", "previous_response_id"),
    ("background", _req(background=True), 400, "does not support the background mode", "background"),
    ("prompt-template", _req(prompt={"id": "pmpt_1"}), 400, "prompt template is not supported", "prompt"),
    ("format-type", _req(text={"format": {"type": "xml"}}), 400, "text.format.type", "text.format.type"),
    ("format-no-schema", _req(text={"format": {"type": "json_schema", "name": "x"}}), 400,
     "text.format json_schema needs a name and a schema", "text.format"),
    ("format-bad-schema", _req(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}),
     400, "structured_outputs is invalid", None),
    ("non-function-tool", _req(tools=[{"type": "web_search_preview"}]), 400, "tools.0.type", "tools.0.type"),
    ("named-tool-not-given", _req(tools=[flat(WEATHER_TOOL)], tool_choice={"type": "function", "name": "nope"}), 400,
     "tool_choice names 'nope', which is not one of the tools", "tool_choice"),
    ("required-without-tools", _req(tool_choice="required"), 400, "tool_choice 'required' needs tools", "tool_choice"),
    ("forced-and-format", _req(tools=[flat(WEATHER_TOOL)], tool_choice="required",
                               text={"format": {"type": "json_object"}}), 400, "cannot be combined", "tool_choice"),
    ("max-output-tokens-zero", _req(max_output_tokens=0), 400, "max_output_tokens", "max_output_tokens"),
    ("too-long", _req(max_output_tokens=MAX_MODEL_LEN), 400,
     f"This model's maximum context length is {MAX_MODEL_LEN} tokens", None),
    ("temperature-range", _req(temperature=5.0), 400, "temperature must be in [0, 2]", "temperature"),
    ("top-k-type", _req(top_k="many"), 400, "top_k", "top_k"),
    ("unknown-model", _req(model="gpt-17"), 404, "The model `gpt-17` does not exist.", "model"),
    ("malformed-json", b'{"model": "tiny", "input": ', 400, "malformed JSON", None),
]


@pytest.mark.parametrize("body,status,message,param", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_an_openai_error(live: Live, body: dict[str, Any] | bytes, status: int, message: str,
                                      param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = live.http.post("/v1/responses", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and (param is None or err["param"] == param), err


def test_nothing_is_stored_so_a_response_is_never_found(live: Live) -> None:
    r = live.oa.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=True)
    assert r.model_extra is not None and r.model_extra.get("store") is False  # accepted, not kept
    with pytest.raises(openai.NotFoundError) as e:
        live.oa.responses.retrieve(r.id)
    assert e.value.status_code == 404 and f"Response with id '{r.id}' not found." in e.value.message
    for method, path in (("GET", "/v1/responses/resp_x"), ("DELETE", "/v1/responses/resp_x"),
                         ("POST", "/v1/responses/resp_x/cancel")):
        resp = live.http.request(method, path)
        assert resp.status_code == 404 and resp.json()["error"]["param"] == "response_id"
    with pytest.raises(openai.BadRequestError, match="stores no responses"):
        live.oa.responses.create(model=MODEL, input="Hi", previous_response_id=r.id)


def test_bad_requests_do_not_disturb_a_response_stream_in_flight(live: Live) -> None:
    kw: dict[str, Any] = dict(model=MODEL, input="Steady", max_output_tokens=60, temperature=0,
                              extra_body={"ignore_eos": True})
    reference = live.oa.responses.create(**kw)
    stream = iter(live.oa.responses.create(stream=True, **kw))
    first = next(stream)
    assert first.type == "response.created"
    wait_until(lambda: live.core.num_unfinished == 1, what="the stream's request to run")
    for _, body, status, _, _ in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert live.http.post("/v1/responses", content=content).status_code == status
    same_output(streamed([first, *stream]), reference)
    wait_until(live.idle, what="the engine to go idle")


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_a_client_that_leaves_aborts_its_response(live: Live, stream: bool) -> None:
    wait_until(live.idle, what="the engine to go idle")
    body = {"model": MODEL, "input": "Leave early", "max_output_tokens": LONG, "ignore_eos": True, "stream": stream}
    leave_while_running(live, "/v1/responses", body, b"response.output_text.delta" if stream else None)


# -- scripted engines: calls, earlier turns, reasoning ----------------------------------


def ask(app: Any, stream: bool = False, **kw: Any) -> Response:
    """One Responses call through the official client against `app` (streamed: its final response, the events
    checked)."""
    async def go() -> Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            oa = openai.AsyncOpenAI(base_url="http://stub/v1", api_key="x", http_client=http, max_retries=0)
            if not stream:
                return await oa.responses.create(model=MODEL, **kw)
            return streamed([e async for e in await oa.responses.create(model=MODEL, stream=True, **kw)])

    return asyncio.run(go())


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_hermes_calls_come_back_as_function_call_items_and_earlier_calls_reach_the_template(
        tool_template_tokenizer: Path, stream: bool) -> None:
    """Earlier turns as items (a function_call and its function_call_output) go to the template as an assistant's
    tool call and a tool message; the model's `<tool_call>` block comes back as a function_call item after the
    message with the text before it."""
    client = ScriptedClient(f"Let me look.{CALL}")
    app = create_app(client, Tokenizer(tool_template_tokenizer))  # type: ignore[arg-type]
    items = [{"role": "user", "content": "Weather in Oslo?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
             {"role": "user", "content": "And Paris?"}]
    r = ask(app, stream, input=items, tools=[flat(WEATHER_TOOL)])
    message, call = r.output
    assert message.type == "message" and r.output_text == "Let me look."
    assert call.type == "function_call" and (call.name, json.loads(call.arguments)) == ("get_weather",
                                                                                       {"city": "Paris"})
    assert call.call_id.startswith("call_") and r.status == "completed"
    prompt = Tokenizer(tool_template_tokenizer).decode(client.requests[0].prompt_token_ids, skip_special_tokens=False)
    assert prompt == ("[tools: get_weather]<user>Weather in Oslo?<assistant>(call get_weather city=Oslo)<tool>rain"
                      "<user>And Paris?<assistant>")


def test_an_output_passed_back_as_input_continues_the_conversation(tool_template_tokenizer: Path) -> None:
    """The usual loop: the response's output items, then the call's result, as the next input (no store): the
    reasoning item is dropped, the message and its call make one assistant turn."""
    first_app = create_app(ScriptedClient(f"<think>Look it up.</think>Checking.{CALL}"),  # type: ignore[arg-type]
                           Tokenizer(tool_template_tokenizer), reasoning_parser="deepseek_r1")
    first = ask(first_app, input="Weather in Paris?", tools=[flat(WEATHER_TOOL)])
    assert [i.type for i in first.output] == ["reasoning", "message", "function_call"]
    call = first.output[-1]
    client = ScriptedClient("<think>It says sun.</think>Sunny.")
    app = create_app(client, Tokenizer(tool_template_tokenizer), reasoning_parser="deepseek_r1")  # type: ignore
    items = [{"role": "user", "content": "Weather in Paris?"}, *(i.model_dump(exclude_none=True) for i in first.output),
             {"type": "function_call_output", "call_id": call.call_id, "output": "sun"}]  # type: ignore[union-attr]
    r = ask(app, input=items, tools=[flat(WEATHER_TOOL)])
    assert r.output_text == "Sunny."
    prompt = Tokenizer(tool_template_tokenizer).decode(client.requests[0].prompt_token_ids, skip_special_tokens=False)
    assert prompt == ("[tools: get_weather]<user>Weather in Paris?<assistant>Checking.(call get_weather city=Paris)"
                      "<tool>sun<assistant>")


def test_tool_choice_none_keeps_the_tools_from_the_template_and_reads_no_calls(tool_template_tokenizer: Path) -> None:
    client = ScriptedClient(CALL)
    app = create_app(client, Tokenizer(tool_template_tokenizer))  # type: ignore[arg-type]
    r = ask(app, input="hi", tools=[flat(WEATHER_TOOL)], tool_choice="none")
    assert [i.type for i in r.output] == ["message"] and r.output_text == CALL
    prompt = Tokenizer(tool_template_tokenizer).decode(client.requests[0].prompt_token_ids, skip_special_tokens=False)
    assert prompt == "<user>hi<assistant>"  # as vLLM's: no tools in the template


@pytest.mark.parametrize("size", [1, 3, 7])
def test_a_reasoning_parser_gives_a_reasoning_item_then_the_message(tiny_llama: Path, size: int) -> None:
    """With `--reasoning-parser`, the thinking comes back as a reasoning item (its text in `content`, as vLLM's),
    then the answer as the message; streamed (the tags split across chunks) the same."""
    app = create_app(ChunkedClient(THOUGHT, size), Tokenizer(tiny_llama),  # type: ignore[arg-type]
                     reasoning_parser="deepseek_r1")
    whole = ask(app, input="What is 2+2?")
    reasoning, message = whole.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert reasoning.content is not None and reasoning.content[0].type == "reasoning_text"
    assert reasoning.content[0].text == "\nThe user asks 2+2. That is 4.\n"
    assert message.type == "message" and whole.output_text == "\n\nIt is 4."
    same_output(ask(app, True, input="What is 2+2?"), whole)


@pytest.mark.parametrize("stream", [False, True])
def test_cut_while_thinking_leaves_an_incomplete_reasoning_item_and_no_message(tiny_llama: Path, stream: bool
                                                                              ) -> None:
    class CutClient(ChunkedClient):
        async def generate(self, request: Any) -> Any:
            async for chunk in super().generate(request):
                yield chunk if chunk.finish_reason is None else type(chunk)(
                    chunk.request_id, chunk.text, chunk.token_ids, "length", num_prompt_tokens=chunk.num_prompt_tokens,
                    num_output_tokens=chunk.num_output_tokens)

    app = create_app(CutClient("<think>2+2 is, let me", 4), Tokenizer(tiny_llama),  # type: ignore[arg-type]
                     reasoning_parser="qwen3")
    r = ask(app, stream, input="2+2?")
    (reasoning,) = r.output
    assert reasoning.type == "reasoning" and reasoning.status == "incomplete"
    assert r.status == "incomplete" and r.output_text == ""


def test_an_engine_failure_mid_stream_ends_it_with_response_failed(tiny_llama: Path) -> None:
    class FailingClient(StubClient):
        async def generate(self, request: Any) -> Any:
            from actors.engine.frontend import StreamChunk

            yield StreamChunk(request.request_id, "Hel", (1,), None, num_prompt_tokens=3, num_output_tokens=1)
            yield StreamChunk(request.request_id, "", (), "error", error="device lost", num_prompt_tokens=3,
                              num_output_tokens=1)

    app = create_app(FailingClient(), Tokenizer(tiny_llama))  # type: ignore[arg-type]

    async def go() -> list[Any]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            oa = openai.AsyncOpenAI(base_url="http://stub/v1", api_key="x", http_client=http, max_retries=0)
            return [e async for e in await oa.responses.create(model=MODEL, input="hi", stream=True)]

    events = asyncio.run(go())
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error is not None
    assert "device lost" in events[-1].response.error.message

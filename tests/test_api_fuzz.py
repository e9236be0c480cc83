"""Bodies with fields of any JSON shape never make the OpenAI API fail with a 500: each is answered, or refused
with a 4xx in OpenAI's error shape (hypothesis; the engine is scripted, so this checks the API's own handling)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.engine.frontend import Tokenizer
from cluster.openai_api import create_app
from test_openai_api import MODEL, WEATHER_TOOL, ScriptedClient

KEYS = ["type", "name", "function", "schema", "json_schema", "json", "regex", "choice", "grammar", "json_object",
        "role", "content", "text", "format", "parameters", "arguments", "call_id", "output", "include_usage"]
LEAVES = (st.none() | st.booleans() | st.integers(-3, 1 << 40) | st.floats(allow_nan=False, width=32)
          | st.sampled_from(["", "a", "text", "json_object", "json_schema", "function", "required", "auto", "none",
                             "user", "get_weather", "[a-", "{", "input_text"]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4), max_leaves=8)

def shaped(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts with some of `fields` (each of its strategy's values): near-valid shapes, which reach deeper checks."""
    return st.fixed_dictionaries({}, optional=fields)


TOOL_NAME = st.just("get_weather") | LEAVES  # the base bodies' tool, or anything
ROLES = st.sampled_from(["user", "assistant", "system", "tool", "developer", "x"])
SHAPED = {  # fields whose near-valid shapes are worth more than random JSON
    "tool_choice": st.sampled_from(["none", "auto", "required"])
    | shaped(type=st.just("function") | LEAVES, function=shaped(name=TOOL_NAME) | VALUES, name=TOOL_NAME),
    "response_format": shaped(type=st.sampled_from(["text", "json_object", "json_schema", "x"]),
                              json_schema=VALUES | shaped(name=LEAVES, schema=VALUES, strict=LEAVES)),
    "structured_outputs": shaped(json=VALUES, regex=LEAVES, choice=VALUES, grammar=LEAVES, json_object=LEAVES,
                                 disable_any_whitespace=LEAVES),
    "messages": st.lists(shaped(role=ROLES, content=VALUES, tool_calls=VALUES, tool_call_id=LEAVES, name=LEAVES),
                         max_size=3),
    "tools": st.lists(shaped(type=LEAVES, function=VALUES | shaped(name=LEAVES, parameters=VALUES), name=LEAVES,
                             parameters=VALUES), max_size=2),
    "input": LEAVES | st.lists(shaped(type=st.sampled_from(["message", "function_call", "function_call_output",
                                                               "reasoning", "x"]), role=ROLES, content=VALUES,
                                      call_id=LEAVES, name=LEAVES, arguments=LEAVES, output=VALUES), max_size=3),
    "text": shaped(format=shaped(type=st.sampled_from(["text", "json_object", "json_schema", "x"]), name=LEAVES,
                                 schema=VALUES)),
}


def field_values(name: str) -> st.SearchStrategy[Any]:
    return SHAPED[name] | VALUES if name in SHAPED else VALUES


FIELDS = {
    "/v1/chat/completions": ["messages", "tools", "tool_choice", "response_format", "structured_outputs", "n",
                             "temperature", "logit_bias", "stop", "stream", "stream_options", "max_tokens",
                             "logprobs", "top_logprobs", "chat_template_kwargs", "include_reasoning",
                             "allowed_token_ids", "prompt_logprobs", "continue_final_message", "seed"],
    "/v1/completions": ["prompt", "echo", "logprobs", "suffix", "best_of", "structured_outputs", "response_format",
                        "max_tokens", "n", "stream", "stop", "logit_bias", "truncate_prompt_tokens"],
    "/v1/responses": ["input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "stream",
                      "previous_response_id", "reasoning", "temperature", "top_p", "metadata", "store"],
}
BASE = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                             "tools": [WEATHER_TOOL]},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 4},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 4,
                      "tools": [{"type": "function", **WEATHER_TOOL["function"]}]},
}


@pytest.fixture(scope="module")
def app(tiny_llama: Path) -> Any:
    return create_app(ScriptedClient('{"a": 1}'), Tokenizer(tiny_llama), reasoning_parser="qwen3")  # type: ignore


def post(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is a 500 response
        async with httpx.AsyncClient(transport=transport, base_url="http://fuzz") as http:
            return await http.post(path, content=json.dumps(body))

    return asyncio.run(go())


@pytest.mark.parametrize("path", list(FIELDS))
def test_no_body_makes_the_api_fail(app: Any, path: str) -> None:
    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.sets(st.sampled_from(FIELDS[path]), min_size=1, max_size=2).flatmap(
        lambda names: st.fixed_dictionaries({n: field_values(n) for n in names})))
    def check(changes: dict[str, Any]) -> None:
        r = post(app, path, {**BASE[path], **changes})
        assert r.status_code < 500, (changes, r.text)
        if r.status_code != 200:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code, r.text

    check()

"""Chat extras checked against vLLM's behaviour: tool-call parsers (`hermes`, `llama3_json`), forced tool choices,
reasoning with tool calls, and structured-output grammars that cannot be met.

Scripted engines (test_openai_api's `ScriptedClient`, test_reasoning's `ChunkedClient`) write what a real model
would; the grammar checks run on llguidance with the tiny model's tokenizer, on the CPU.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from actors.engine.frontend import Tokenizer
from actors.request import SamplingParamsError
from actors.request import StructuredOutputsParams as Structured
from actors.structured import GrammarCompiler, fill_bitmasks
from cluster.openai_api import create_app
from cluster.openai_api.tools import ForcedCalls, parser_named

from support import sse_events

from test_openai_api import (  # noqa: F401  (tool_template_tokenizer: a fixture used here)
    MODEL, WEATHER_TOOL, ScriptedClient, StubClient, _stub_call, tool_template_tokenizer,
)
from test_reasoning import both, think_template_tokenizer  # noqa: F401  (a fixture used here)

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def args(calls: list[Any]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


# -- tool calls ------------------------------------------------------------------------------


@pytest.mark.parametrize(("parser", "said", "content"), [
    (None, f"Let me look.\n\n{CALL}", "Let me look.\n\n"),
    ("qwen3", f"<think>Weather needed.</think>\n\n{CALL}", "\n\n"),  # Qwen3's usual layout
])
def test_hermes_text_before_a_call_is_the_same_content_streamed_or_not(
        think_template_tokenizer: Path, parser: str | None, said: str, content: str) -> None:
    """vLLM's hermes parser keeps the text before `<tool_call>` as it is (`content if content else None`); a stream
    sends it as it comes, so the whole response must not trim it either."""
    a = both(think_template_tokenizer, said, parser, tools=[WEATHER_TOOL])
    assert (a.content, a.calls, a.finish) == (content, [("get_weather", {"city": "Paris"})], "tool_calls")


def test_several_hermes_calls_stream_as_indexed_calls_with_the_whole_arguments(tool_template_tokenizer: Path
                                                                               ) -> None:
    """Two calls in one message: streamed, each has its index, one id and a name, and its arguments deltas joined
    are the whole response's arguments."""
    said = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo; Bergen"}}</tool_call>')
    app = create_app(ScriptedClient(said), Tokenizer(tool_template_tokenizer))  # type: ignore[arg-type]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]}

    async def go() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            whole = (await http.post("/v1/chat/completions", json=body)).json()["choices"][0]
            r = await http.post("/v1/chat/completions", json={**body, "stream": True})
            return whole, [e["choices"][0] for e in sse_events(r.text)]

    whole, chunks = asyncio.run(go())
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for t in c["delta"].get("tool_calls") or []:
            entry = calls.setdefault(t["index"], {"id": t["id"], "name": "", "arguments": ""})
            assert t.get("id", entry["id"]) == entry["id"]
            entry["name"] += t["function"].get("name") or ""
            entry["arguments"] += t["function"].get("arguments") or ""
    assert sorted(calls) == [0, 1] and calls[0]["id"] != calls[1]["id"]
    assert [(c["name"], c["arguments"]) for c in (calls[0], calls[1])] == [
        (t["function"]["name"], t["function"]["arguments"]) for t in whole["message"]["tool_calls"]]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"] == "tool_calls"


def test_llama3_json_takes_arguments_as_vllm_does() -> None:
    """Llama 3.1 writes `parameters` or `arguments` (vLLM's parser takes either): the arguments must not be lost."""
    content, calls = parser_named("llama3_json").parse('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert content is None and args(calls) == [("get_weather", {"city": "Paris"})]


def test_llama3_json_calls_with_semicolons_in_their_strings() -> None:
    """Calls are joined by `;`, which a string inside a call may hold too (SQL, shell commands)."""
    said = ('{"name": "run_sql", "parameters": {"q": "SELECT 1; SELECT 2"}}; '
            '{"name": "sh", "parameters": {"cmd": "cd /tmp;ls"}}')
    content, calls = parser_named("llama3_json").parse(said)
    assert content is None
    assert args(calls) == [("run_sql", {"q": "SELECT 1; SELECT 2"}), ("sh", {"cmd": "cd /tmp;ls"})]
    assert parser_named("llama3_json").parse('{"name": "a", "parameters": {}} {"name": "b"}')[1] == []


DEEP = "[" * 5000  # a model stuck opening arrays: past what Python's JSON parser recurses into


@pytest.mark.parametrize(("reader", "said"), [
    (parser_named("hermes"), f'<tool_call>{{"name": "a", "arguments": {DEEP}'),
    (parser_named("llama3_json"), f'{{"name": "a", "parameters": {DEEP}'),
    (ForcedCalls(), DEEP), (ForcedCalls("get_weather"), DEEP)], ids=["hermes", "llama3_json", "required", "named"])
def test_tool_json_nested_too_deeply_is_content(reader: Any, said: str) -> None:
    assert reader.parse(said) == (said, [])


@pytest.mark.parametrize("stream", [False, True])
def test_deeply_nested_tool_json_from_the_model_is_content_not_a_500(tool_template_tokenizer: Path,
                                                                     stream: bool) -> None:
    said = f'<tool_call>{{"name": "get_weather", "arguments": {DEEP}'
    r = _stub_call(tool_template_tokenizer, ScriptedClient(said), "POST", "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL],
                         "stream": stream})
    assert r.status_code == 200, r.text
    if not stream:
        assert r.json()["choices"][0]["message"]["content"] == said
        return
    chunks = sse_events(r.text)
    assert not any("error" in c for c in chunks), r.text[-300:]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == said


BROKEN_TOOL = {"type": "function", "function": {"name": "broken", "parameters": {
    "type": "object", "properties": {"when": {"type": "datetime"}}}}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "broken"}}])
def test_a_forced_call_whose_parameters_are_no_schema_is_a_400_naming_the_tool(tiny_llama: Path,
                                                                               tool_choice: Any) -> None:
    """The grammar of a forced call comes from the tools' parameters: one that is not a schema is the request's
    mistake, named as the tool's (the request sent no structured_outputs), before any engine work."""
    client = StubClient()
    r = _stub_call(tiny_llama, client, "POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL, BROKEN_TOOL],
        "tool_choice": tool_choice})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "'broken'" in err["message"] and "datetime" in err["message"] and err["param"] == "tools"
    assert client.requests == []
    named_ok = _stub_call(tiny_llama, client, "POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL, BROKEN_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named_ok.status_code == 200, named_ok.text  # only the named tool's schema makes the grammar


# -- structured outputs that admit nothing ---------------------------------------------------------


@pytest.fixture(scope="module")
def compiler(tiny_llama: Path) -> GrammarCompiler:
    tok = Tokenizer(tiny_llama)
    return GrammarCompiler(tiny_llama, len(tok.hf), [tok.hf.eos_token_id])


@pytest.mark.parametrize("spec", [Structured(regex=r"[^\s\S]"), Structured(regex=r"ab[^\s\S]"),
                                  Structured(grammar=r'start: /[^\s\S]/'), Structured(json="false")],
                         ids=["regex", "regex-after-text", "lark", "json-false"])
def test_a_grammar_that_admits_no_output_is_refused_naming_it(compiler: GrammarCompiler, spec: Structured) -> None:
    """A grammar no text can match is a 400 saying so, not an empty answer that stopped at once for no reason."""
    with pytest.raises(SamplingParamsError, match="admits no output"):
        compiler.compile(spec)


def test_json_schema_true_admits_any_json(compiler: GrammarCompiler) -> None:
    """`true` is the JSON schema every value matches (StructuredOutputsParams takes it), as `{}`."""
    grammar = compiler.compile(Structured(json="true"))
    assert torch.equal(fill_bitmasks([grammar]), fill_bitmasks([compiler.compile(Structured(json={}))]))


def test_checking_a_grammar_leaves_its_first_mask_as_it_was(compiler: GrammarCompiler) -> None:
    spec = Structured(regex="[a-c]{2}")
    first = fill_bitmasks([compiler.compile(spec)])
    tok = compiler._llg_tokenizer()
    import llguidance

    fresh = llguidance.LLMatcher(tok, llguidance.grammar_from("regex", "[a-c]{2}"), log_level=0)
    words = (compiler.vocab_size + 31) // 32
    expected = torch.frombuffer(bytearray(fresh.compute_bitmask()), dtype=torch.int32)[:words]
    assert torch.equal(first[0], expected) and int(first.count_nonzero()) > 0

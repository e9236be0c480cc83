"""Reasoning read back from a reasoning model's `<think> ... </think>` (vLLM's `--reasoning-parser`).

A stub engine answers with scripted model text a few characters per chunk (tags split across chunks); the official
`openai` client reads the message's `reasoning` (vLLM's field) and `content`, streamed and not: the deltas joined
must give the whole response's fields.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from actors.engine.frontend import StreamChunk, Tokenizer
from cluster.engine_client import GenerateRequest
from cluster.openai_api import create_app
from cluster.openai_api.reasoning import DeepSeekR1Parser, Qwen3Parser, reasoning_parser_named, split

from support import sse_events

from test_openai_api import MODEL, WEATHER_TOOL, ScriptedClient, StubClient

THOUGHT = "<think>\nThe user asks 2+2. That is 4.\n</think>\n\nIt is 4."


class ChunkedClient(ScriptedClient):
    """ScriptedClient with `size` characters a chunk, so that the tags split at other places."""

    def __init__(self, text: str, size: int) -> None:
        super().__init__(text)
        self.size = size

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        self.requests.append(request)
        pieces = [self.text[i:i + self.size] for i in range(0, len(self.text), self.size)] or [""]
        for k, piece in enumerate(pieces):
            yield StreamChunk(request.request_id, piece, (1,), "stop" if k == len(pieces) - 1 else None,
                              num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=k + 1)


@pytest.fixture(scope="module")
def think_template_tokenizer(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer with a reasoning model's template: the tools' names, then the messages; the generation
    prompt opens the think block with `r1` (DeepSeek-R1's template), and closes an empty one when
    `enable_thinking` is false (Qwen3's)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.chat_template = (
        "{% if tools %}[tools: {{ tools | map(attribute='function.name') | join(',') }}]{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
        "{% elif r1 %}<think>\n{% endif %}{% endif %}")
    out = tmp_path_factory.mktemp("think-template")
    tok.save_pretrained(str(out))
    return out


@dataclass
class Answer:
    reasoning: str | None
    content: str | None
    calls: list[tuple[str, Any]]
    finish: str | None
    extra: dict[str, Any]  # fields beyond OpenAI's: the message's (whole) or every delta's keys (stream)


def ask(tokenizer: Path, said: str, stream: bool, reasoning_parser: str | None, size: int = 5,
        **body: Any) -> Answer:
    """One chat through the openai client against an app whose engine writes `said`."""
    app = create_app(ChunkedClient(said, size), Tokenizer(tokenizer),  # type: ignore[arg-type]
                     reasoning_parser=reasoning_parser)
    kw: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], **body)

    async def go() -> Answer:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            oa = openai.AsyncOpenAI(base_url="http://stub/v1", api_key="x", http_client=http, max_retries=0)
            if not stream:
                r = await oa.chat.completions.create(**kw)
                m = r.choices[0].message
                calls = [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []]
                return Answer(getattr(m, "reasoning", None), m.content, calls, r.choices[0].finish_reason,
                              dict(m.model_extra or {}))
            return await streamed(oa, kw)

    return asyncio.run(go())


async def streamed(oa: openai.AsyncOpenAI, kw: dict[str, Any]) -> Answer:
    """A stream's deltas joined; reasoning must come before any content."""
    reasoning, content, calls, finish, extra = "", "", {}, None, {}
    async for c in await oa.chat.completions.create(stream=True, **kw):
        d = c.choices[0].delta
        extra.update(d.model_extra or {})
        if getattr(d, "reasoning", None):
            assert not content, "reasoning after content"
            reasoning += d.reasoning  # type: ignore[attr-defined]
        content += d.content or ""
        for t in d.tool_calls or []:
            calls[t.index] = (t.function.name, json.loads(t.function.arguments))
        finish = c.choices[0].finish_reason or finish
    return Answer(reasoning or None, content or None, [calls[k] for k in sorted(calls)], finish, extra)


def both(tokenizer: Path, said: str, reasoning_parser: str | None, **body: Any) -> Answer:
    """The whole response, checked equal to the stream's deltas joined (at several chunk sizes)."""
    whole = ask(tokenizer, said, False, reasoning_parser, **body)
    for size in (1, 3, 5):
        s = ask(tokenizer, said, True, reasoning_parser, size=size, **body)
        assert (s.reasoning, s.content, s.calls, s.finish) == (whole.reasoning, whole.content, whole.calls,
                                                              whole.finish), size
    return whole


CASES = [  # parser, chat_template_kwargs, model text, (reasoning, content)
    ("deepseek_r1", {}, THOUGHT, ("\nThe user asks 2+2. That is 4.\n", "\n\nIt is 4.")),
    ("qwen3", {}, THOUGHT, ("\nThe user asks 2+2. That is 4.\n", "\n\nIt is 4.")),
    # the template opened the block in the prompt: the output has no <think>
    ("deepseek_r1", {"r1": True}, "2+2 is 4.</think>It is 4.", ("2+2 is 4.", "It is 4.")),
    ("qwen3", {"r1": True}, "2+2 is 4.</think>It is 4.", ("2+2 is 4.", "It is 4.")),
    # never closed (cut off while thinking): all reasoning
    ("deepseek_r1", {"r1": True}, "2+2 is, let me see", ("2+2 is, let me see", None)),
    ("qwen3", {}, "<think>2+2 is, let me see", ("2+2 is, let me see", None)),
    # a partial tag at the end stays text
    ("deepseek_r1", {}, "<think>2+2 is 4 </thi", ("2+2 is 4 </thi", None)),
    # thinking off: the template closed an empty block in the prompt, the output is all content
    ("qwen3", {"enable_thinking": False}, "It is 4.", (None, "It is 4.")),
    ("deepseek_r1", {"enable_thinking": False}, "It is 4.", (None, "It is 4.")),
]


@pytest.mark.parametrize(("parser", "kwargs", "said", "expected"), CASES)
def test_reasoning_comes_back_apart_from_the_content_streamed_or_not(
        think_template_tokenizer: Path, parser: str, kwargs: dict[str, Any], said: str,
        expected: tuple[str | None, str | None]) -> None:
    a = both(think_template_tokenizer, said, parser, extra_body={"chat_template_kwargs": kwargs})
    assert (a.reasoning, a.content) == expected
    assert "reasoning" in a.extra  # vLLM's field, null or not, whenever the server reads reasoning
    assert a.finish == "stop" and a.calls == []


def test_streamed_reasoning_comes_first_then_content(think_template_tokenizer: Path) -> None:
    """The raw deltas: `reasoning` while the model thinks, `content` after `</think>` (one delta may carry the end
    of one and the start of the other)."""
    app = create_app(ChunkedClient(THOUGHT, 4), Tokenizer(think_template_tokenizer),  # type: ignore[arg-type]
                     reasoning_parser="deepseek_r1")

    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            r = await http.post("/v1/chat/completions", json={
                "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "2+2?"}]})
            return [e["choices"][0]["delta"] for e in sse_events(r.text)]

    deltas = asyncio.run(go())
    assert deltas[0] == {"role": "assistant", "content": ""}
    kinds = [tuple(d) for d in deltas[1:] if d]
    assert kinds[0] == ("reasoning",) and kinds[-1] == ("content",)
    assert all(k in {("reasoning",), ("reasoning", "content"), ("content",)} for k in kinds)
    first_content = next(i for i, k in enumerate(kinds) if "content" in k)
    assert all("content" in k for k in kinds[first_content:])
    assert "".join(d.get("reasoning", "") for d in deltas) == "\nThe user asks 2+2. That is 4.\n"


def test_tool_calls_are_read_from_the_content_only(think_template_tokenizer: Path) -> None:
    """With tools, the tool call parser (hermes) reads what follows `</think>`: a call there is a call, one
    written in the reasoning is only reasoning."""
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    a = both(think_template_tokenizer, f"<think>I should look it up.</think>Let me look.{call}", "qwen3",
             tools=[WEATHER_TOOL])
    assert (a.reasoning, a.content, a.finish) == ("I should look it up.", "Let me look.", "tool_calls")
    assert a.calls == [("get_weather", {"city": "Paris"})]
    only_call = both(think_template_tokenizer, f"<think>Weather needed.</think>{call}", "deepseek_r1",
                     tools=[WEATHER_TOOL])
    assert (only_call.reasoning, only_call.content, only_call.finish) == ("Weather needed.", None, "tool_calls")
    thought = both(think_template_tokenizer, f"<think>Maybe {call}? No.</think>Sunny, I think.", "qwen3",
                   tools=[WEATHER_TOOL])
    assert (thought.reasoning, thought.content, thought.calls) == (f"Maybe {call}? No.", "Sunny, I think.", [])
    assert thought.finish == "stop"


def test_a_format_holds_from_the_end_of_the_reasoning(think_template_tokenizer: Path) -> None:
    """With a reasoning parser, a format's grammar is asked to hold only after `</think>` (the engine request's
    `start_after`: the tag's token ids), so the model reasons first and the content is the format's; with the think
    block closed in the prompt, or no parser, it holds from the first token."""
    said = '<think>Four.</think>{"answer": 4}'
    tok = Tokenizer(think_template_tokenizer)
    for parser, kwargs, expected in [("qwen3", {}, tuple(tok.encode("</think>", add_special_tokens=False))),
                                     ("qwen3", {"enable_thinking": False}, ()), (None, {}, ())]:
        client = ChunkedClient(said, 4)
        app = create_app(client, tok, reasoning_parser=parser)  # type: ignore[arg-type]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "2+2?"}], "chat_template_kwargs": kwargs,
                "response_format": {"type": "json_object"}}

        async def go() -> dict[str, Any]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
                return (await http.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]

        message = asyncio.run(go())
        assert client.requests[-1].params.structured_outputs.start_after == expected, parser
        if parser is not None and not kwargs:
            assert (message["reasoning"], message["content"]) == ("Four.", '{"answer": 4}')
    a = both(think_template_tokenizer, said, "deepseek_r1", response_format={"type": "json_object"})
    assert (a.reasoning, a.content) == ("Four.", '{"answer": 4}')


def test_include_reasoning_false_drops_the_reasoning_but_not_its_reading(think_template_tokenizer: Path) -> None:
    """vLLM's `include_reasoning`: the thinking is still read apart from the content, then left out."""
    a = both(think_template_tokenizer, THOUGHT, "qwen3", extra_body={"include_reasoning": False})
    assert (a.reasoning, a.content, a.finish) == (None, "\n\nIt is 4.", "stop")


def test_without_a_reasoning_parser_the_text_is_all_content(think_template_tokenizer: Path) -> None:
    for stream in (False, True):
        a = ask(think_template_tokenizer, THOUGHT, stream, None)
        assert (a.reasoning, a.content, a.finish) == (None, THOUGHT, "stop")
        assert "reasoning" not in a.extra  # the message as before: no field of vLLM's reasoning


def test_parsers_split_and_hold_back_what_may_become_a_tag() -> None:
    r1, qwen3 = reasoning_parser_named("deepseek_r1"), reasoning_parser_named("qwen3")
    assert isinstance(r1, DeepSeekR1Parser) and isinstance(qwen3, Qwen3Parser)
    assert split(r1, THOUGHT) == ("\nThe user asks 2+2. That is 4.\n", "\n\nIt is 4.")
    assert split(r1, "a</think>b</think>c") == ("a", "b</think>c")  # the first end tag ends the reasoning
    assert split(r1, "so <think>a</think>b") == ("so a", "b")  # the opening tag dropped where it comes
    assert split(r1, "a </thi", final=False) == ("a ", "") and split(r1, "a </thi") == ("a </thi", "")
    assert split(r1, "<thi", final=False) == ("", "") and split(r1, "<think>a <", final=False) == ("a ", "")
    assert split(r1, "<think>a <b", final=False) == ("a <b", "")
    for parser in (r1, qwen3):
        assert parser.thinks("<user>hi<assistant><think>\n", {})
        assert parser.thinks("<user>hi<assistant>", {})
        assert not parser.thinks("<assistant><think>\n\n</think>\n\n", {})  # the template closed the block
        assert parser.thinks("<assistant><think>a</think>b<user>hi<assistant><think>\n", {})
    assert not qwen3.thinks("<user>hi<assistant>", {"enable_thinking": False})  # Qwen3's switch
    assert r1.thinks("<user>hi<assistant>", {"enable_thinking": False})


def test_an_unknown_reasoning_parser_fails_at_startup_naming_the_choices(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown reasoning parser 'granite'; choose from deepseek_r1, qwen3"):
        create_app(StubClient(), Tokenizer(tiny_llama), reasoning_parser="granite")  # type: ignore[arg-type]


def test_serve_takes_reasoning_parser_and_gives_it_to_the_app() -> None:
    from cluster.cli import build_parser
    from cluster.commands.serve import serve_app_args
    from cluster.serve_app import ServeArgs

    parser = build_parser()
    for flags, expected in (([], None), (["--reasoning-parser", "qwen3"], "qwen3"),
                            (["--reasoning-parser", "deepseek_r1"], "deepseek_r1")):
        args = parser.parse_args(["serve", "--model", "m", *flags])
        app_args = serve_app_args(args, None, None)
        assert app_args["reasoning_parser"] == expected
        assert ServeArgs.parse(app_args).reasoning_parser == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "m", "--reasoning-parser", "granite"])

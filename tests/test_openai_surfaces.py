"""OpenAI's Responses API and `semipd run-batch`, checked against OpenAI's reference and vLLM's implementation.

The Responses checks run the official `openai` client against the app over scripted engines (`ScriptedClient`-like
clients whose output is given), for what a random model cannot write: reasoning, tool calls, a cut. Each streamed
event is also checked against the client's own pydantic model for its type (the client itself builds them
leniently, so a missing field would pass unseen). The run-batch checks go through `semipd run-batch` (`main`), as
users run it, or through `run_batch` over such an app where the engine's tokens do not matter.
"""

from __future__ import annotations

import asyncio
import io
import json
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.responses import ResponseStreamEvent

from actors.engine.frontend import StreamChunk, Tokenizer
from cluster.commands import run_batch
from cluster.engine_client import GenerateRequest
from cluster.openai_api import create_app

from test_openai_api import MODEL, WEATHER_TOOL, ScriptedClient, StubClient
from test_responses import ask, flat
from test_run_batch import CHAT, line, run_file

pytestmark = pytest.mark.timeout(120)


class TokenClient(StubClient):
    """Answers with `ids`, one token a chunk with its text, as the engine does (so that token counts are real);
    `finish` ends it."""

    def __init__(self, tok: Tokenizer, ids: list[int], finish: str = "stop") -> None:
        super().__init__()
        self.tok, self.ids, self.finish = tok, ids, finish

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        self.requests.append(request)
        for k, token in enumerate(self.ids):
            yield StreamChunk(request.request_id, self.tok.decode([token], skip_special_tokens=False), (token,),
                              self.finish if k == len(self.ids) - 1 else None,
                              num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=k + 1)


# -- the Responses API ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("thinking, answer, finish", [
    ("<think>\nThe user asks 2+2. That is 4.\n</think>", "\n\nIt is 4.", "stop"),
    ("<think>2+2 is, let me", "", "length"),  # cut while thinking: every token is reasoning
], ids=["answered", "cut-while-thinking"])
def test_usage_counts_the_reasoning_tokens(tiny_llama: Path, stream: bool, thinking: str, answer: str,
                                           finish: str) -> None:
    """OpenAI's `usage.output_tokens_details.reasoning_tokens`: the output tokens spent reasoning (the tags with
    them), of `output_tokens`."""
    tok = Tokenizer(tiny_llama)
    reasoning_ids = tok.encode(thinking, add_special_tokens=False)
    answer_ids = tok.encode(answer, add_special_tokens=False)
    app = create_app(TokenClient(tok, reasoning_ids + answer_ids, finish), tok,  # type: ignore[arg-type]
                     reasoning_parser="deepseek_r1")
    r = ask(app, stream, input="What is 2+2?")
    assert r.output[0].type == "reasoning" and r.output_text == answer
    assert r.usage is not None and r.usage.output_tokens == len(reasoning_ids) + len(answer_ids)
    assert r.usage.output_tokens_details.reasoning_tokens == len(reasoning_ids)


def test_without_reasoning_no_token_is_a_reasoning_token(tiny_llama: Path) -> None:
    tok = Tokenizer(tiny_llama)
    app = create_app(TokenClient(tok, tok.encode("<think>no parser", add_special_tokens=False)), tok)  # type: ignore
    r = ask(app, input="Hi")
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == 0 and r.output_text



def _event_models() -> dict[str, Any]:
    """The client's pydantic model of each streamed event, by its `type`."""
    union = typing.get_args(ResponseStreamEvent)[0]  # Annotated[Union[...], discriminator]
    return {value: cls for cls in typing.get_args(union)
            for value in typing.get_args(cls.model_fields["type"].annotation)}


def raw_events(app: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The payloads of a streamed call's server-sent events (each named by its type)."""
    async def go() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            r = await http.post("/v1/responses", json={"model": MODEL, "stream": True, **body})
            assert r.status_code == 200, r.text
            return r.text

    events = []
    for block in filter(None, asyncio.run(go()).split("\n\n")):
        name, data = block.split("\n")
        events.append(json.loads(data.removeprefix("data: ")))
        assert name == f"event: {events[-1]['type']}"
    return events


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.mark.parametrize("text, finish, parsers, body, items", [
    ("<think>Sum it.</think>It is 4.", "stop", {"reasoning_parser": "deepseek_r1"}, {}, ["reasoning", "message"]),
    (f"Let me look.{CALL}", "stop", {"tool_call_parser": "hermes"}, {"tools": [flat(WEATHER_TOOL)]},
     ["message", "function_call"]),
    ("Cut off here", "length", {}, {"max_output_tokens": 12}, ["message"]),
], ids=["reasoning", "function-call", "incomplete"])
def test_every_streamed_event_is_valid_for_the_client_s_own_types(tiny_llama: Path, text: str, finish: str,
                                                                   parsers: dict[str, str], body: dict[str, Any],
                                                                   items: list[str]) -> None:
    """Each event validates (strictly, not as the client builds it) against the client's model for its type; the
    sequence numbers count from 0; an item's id is the same in all its events and in the final response."""
    tok = Tokenizer(tiny_llama)
    app = create_app(TokenClient(tok, tok.encode(text, add_special_tokens=False), finish), tok,  # type: ignore
                     **parsers)
    events, models = raw_events(app, {"input": "hi", **body}), _event_models()
    for e in events:
        details = ((e.get("response") or {}).get("usage") or {}).get("input_tokens_details")
        if details is not None:  # required by this client (3.60) only; neither vLLM nor this server sends it
            details.setdefault("cache_write_tokens", 0)
        models[e["type"]].model_validate(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert events[-1]["type"] == ("response.incomplete" if finish == "length" else "response.completed")
    assert [i["type"] for i in final["output"]] == items
    for index, item in enumerate(final["output"]):
        mine = [e for e in events if e.get("output_index") == index]
        assert {e["item_id"] if "item_id" in e else e["item"]["id"] for e in mine} == {item["id"]}


# -- semipd run-batch ---------------------------------------------------------------------


def batch(tiny_llama: Path, text: str) -> list[dict[str, Any]]:
    """`text`, a batch file, through `run_batch` over an app whose engine answers "Fine."."""
    app = create_app(ScriptedClient("Fine."), Tokenizer(tiny_llama))  # type: ignore[arg-type]
    out = io.StringIO()
    asyncio.run(run_batch.run_batch(app, io.StringIO(text), out, 4, progress=False))
    return [json.loads(x) for x in out.getvalue().splitlines()]


def test_a_file_with_a_byte_order_mark_loses_no_line(tiny_llama: Path, tmp_path: Path) -> None:
    """Windows editors (Notepad, PowerShell's Out-File) start a UTF-8 file with a BOM: the first request must
    still be read (through the CLI from a file, and from any stream)."""
    rc, out = run_file(tmp_path, tiny_llama, ["\ufeff" + line("first", "/v1/chat/completions", CHAT),
                                              line("second", "/v1/chat/completions", CHAT)])
    assert rc == 0 and [(o["custom_id"], o["error"]) for o in out] == [("first", None), ("second", None)]
    lines = batch(tiny_llama, "\ufeff" + line("first", "/v1/chat/completions", CHAT) + "\n")
    assert [(o["custom_id"], o["response"]["status_code"]) for o in lines] == [("first", 200)]


def test_an_empty_file_gives_an_empty_output_file(tiny_llama: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """As vLLM: nothing to run is no error (exit 0), and the output file is there, empty."""
    from cluster.cli import main

    inp, out = tmp_path / "empty.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n  \n")
    assert main(["run-batch", "-i", str(inp), "-o", str(out), "--model", str(tiny_llama), "--no-progress"]) == 0
    assert out.read_text() == "" and "0 request(s), 0 succeeded, 0 failed" in capsys.readouterr().err


def test_duplicate_custom_ids_are_each_answered_in_order(tiny_llama: Path) -> None:
    """As vLLM (which does not check them either): every line is served, in the input's order; OpenAI's Batch API
    would refuse the whole file."""
    lines = batch(tiny_llama, "\n".join(line(c, "/v1/chat/completions", CHAT) for c in ("a", "b", "a")))
    assert [(o["custom_id"], o["response"]["status_code"]) for o in lines] == [("a", 200), ("b", 200), ("a", 200)]
    assert len({o["id"] for o in lines}) == len({o["response"]["request_id"] for o in lines}) == 3

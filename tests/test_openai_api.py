"""The OpenAI-compatible API against a live server: uvicorn + a real (tiny, CPU) engine.

One engine and one server per module; the official `openai` client where it applies,
raw HTTP for malformed input. A stub EngineClient covers what a tiny CPU engine cannot
show (a stalled engine, admission refusal, no capacity). One test goes through Ray Serve.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.config import EngineConfig, SchedulerConfig
from actors.engine.frontend import StreamChunk, Tokenizer
from actors.slo.admission import AdmissionRejected
from cluster.engine_client import EngineLoad, GenerateRequest, LocalEngineClient, ModelInfo, NoCapacityError
from cluster.openai_api import create_app

from support import LiveServer, free_port, wait_until

MAX_MODEL_LEN = 512
MODEL = "tiny"
LONG = 400  # max_tokens of requests that must still be running when the client leaves


class Live:
    def __init__(self, client: LocalEngineClient, server: LiveServer) -> None:
        self.client = client
        self.server = server
        self.url = server.url
        self.oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=server.url, timeout=60)

    @property
    def core(self) -> Any:
        return self.client.llm.core

    def idle(self) -> bool:
        return self.core.num_unfinished == 0 and self.core.allocator.usage == 0.0

    def counter(self, name: str, **labels: str) -> float:
        text = self.http.get("/metrics").text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0


@pytest.fixture(scope="module")
def live(tiny_llama: Path) -> Iterator[Live]:
    cfg = EngineConfig(model=str(tiny_llama), mode="semi-pd", scheduler=SchedulerConfig(max_model_len=MAX_MODEL_LEN))
    client = LocalEngineClient(cfg, served_name=MODEL)
    app = create_app(client, Tokenizer(tiny_llama))
    try:
        with LiveServer(app) as server:
            yield Live(client, server)
    finally:
        client.shutdown()


# -- completions and chat ------------------------------------------------------------


def test_completion_greedy_with_usage_and_request_id(live: Live) -> None:
    raw = live.oa.completions.with_raw_response.create(
        model=MODEL, prompt="Hello world", max_tokens=8, temperature=0, extra_headers={"x-request-id": "req-abc.1"},
        extra_body={"ignore_eos": True})
    assert raw.headers["x-request-id"] == "req-abc.1"
    r = raw.parse()
    assert r.id == "cmpl-req-abc.1"
    assert r.model == MODEL and r.object == "text_completion"
    assert len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].text
    prompt_ids = live.http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), 8)
    assert r.usage.total_tokens == len(prompt_ids) + 8


def test_cache_salt_keeps_prefix_cache_hits_within_a_salt(live: Live) -> None:
    """usage.prompt_tokens_details.cached_tokens: a repeated prompt hits the cache only under the same salt."""
    prompt = [(37 * i + 11) % 251 for i in range(70)]  # four full pages of 16, seen by no other test

    def cached(**salt: str) -> int:
        r = live.oa.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, extra_body=salt)
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        return r.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]

    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-a") == 64
    assert cached(cache_salt="tenant-b") == 0
    assert cached() == 0  # unsalted is a salt of its own
    assert cached() == 64


def test_reset_prefix_cache_makes_a_repeated_prompt_computed_again(live: Live) -> None:
    """`POST /reset_prefix_cache` (vLLM's route): the pages cached for a prompt are forgotten, so the prompt
    sent again hits nothing, and the next repeat hits again."""
    prompt = [(53 * i + 5) % 251 for i in range(70)]  # four full pages of 16, seen by no other test

    def cached() -> int:
        r = live.oa.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        return r.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]

    assert cached() == 0 and cached() == 64
    wait_until(live.idle)
    reset = live.http.post("/reset_prefix_cache")
    assert reset.status_code == 200
    (engine,) = reset.json()["data"]
    assert engine["engine_id"] == "local" and engine["pages_freed"] >= 4
    assert cached() == 0 and cached() == 64


def test_request_id_generated_when_absent(live: Live) -> None:
    resp = live.http.get("/v1/models")
    assert len(resp.headers["x-request-id"]) >= 16


def test_completion_stream_equals_non_stream(live: Live) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="The capital of", max_tokens=12, temperature=0,
                              extra_body={"ignore_eos": True})
    full = live.oa.completions.create(**kw)
    chunks = list(live.oa.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])
    running = list(live.oa.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))  # type: ignore
    counts = [c.usage.completion_tokens for c in running[:-1]]  # type: ignore[union-attr]
    assert counts == sorted(counts) and counts[-1] == 12 and running[-1].usage.completion_tokens == 12  # type: ignore
    assert all(c.usage.prompt_tokens == full.usage.prompt_tokens for c in running)  # type: ignore[union-attr]


def test_chat_stream_equals_non_stream(live: Live) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    full = live.oa.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 10
    template_ids = live.http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert full.usage.prompt_tokens == len(template_ids)
    stream = live.oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_chat_default_max_tokens_fills_the_context(live: Live) -> None:
    messages = [{"role": "user", "content": "x" * 20}]
    n_prompt = live.http.post("/tokenize", json={"messages": messages}).json()["count"]
    # no max_tokens: as many as fit in the context
    r = live.oa.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == MAX_MODEL_LEN - n_prompt


def test_n_choices_and_batched_prompts(live: Live) -> None:
    r = live.oa.completions.create(model=MODEL, prompt=["One", "Two"], n=2, max_tokens=5, seed=7,
                                   extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == 20
    chat = live.oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hey"}], n=3,
                                           max_tokens=6, seed=3, stream=True, extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for c in chat:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert len(set(texts.values())) > 1  # choices of one seeded request differ (seed + index, as vLLM)


def test_seed_reproducible(live: Live) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0,
                              extra_body={"ignore_eos": True})
    a = live.oa.completions.create(seed=1234, **kw).choices[0].text
    b = live.oa.completions.create(seed=1234, **kw).choices[0].text
    c = live.oa.completions.create(seed=4321, **kw).choices[0].text
    assert a == b
    assert a != c


def test_stop_string_and_stop_token(live: Live) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="abc", max_tokens=16, temperature=0)
    full = live.oa.completions.create(extra_body={"ignore_eos": True}, **kw).choices[0].text
    assert len(full) >= 8
    stop = full[4:7]
    cut = full.find(stop)
    r = live.oa.completions.create(stop=[stop], extra_body={"ignore_eos": True}, **kw).choices[0]
    assert r.finish_reason == "stop"
    assert r.text == full[:cut]
    # stop_token_ids: with every id a stop token, the first token ends the request
    r = live.oa.completions.create(extra_body={"ignore_eos": True, "stop_token_ids": list(range(512))}, **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 1


def test_logit_bias_reaches_the_sampler(live: Live) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    forced = live.oa.completions.create(logit_bias={"7": 100}, logprobs=0, **kw).choices[0]
    seven = live.http.post("/detokenize", json={"tokens": [7]}).json()["prompt"]
    assert forced.logprobs is not None and forced.logprobs.tokens == [seven] * 4
    both = live.oa.completions.create(logit_bias={"7": -100, "9": 100}, logprobs=0, **kw).choices[0]
    assert both.logprobs is not None and both.logprobs.tokens == [live.http.post("/detokenize", json={
        "tokens": [9]}).json()["prompt"]] * 4
    chat = live.oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           temperature=0, logit_bias={"7": 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == seven * 3


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(live: Live) -> None:
    """lm-eval-harness's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1. The echoed
    logprobs are the prompt's (the first null) then the output's, equal to vLLM's `prompt_logprobs` field of the
    same request; streamed, the prompt comes in the first chunk."""
    prompts = [[72, 101, 108, 108, 111, 32, 119], [84, 104, 101, 32, 113]]
    kw: dict[str, Any] = dict(model=MODEL, prompt=prompts, max_tokens=1, temperature=0, logprobs=1, echo=True)
    r = live.oa.completions.create(**kw)
    scored = live.oa.completions.create(model=MODEL, prompt=prompts, max_tokens=1, temperature=0,
                                        extra_body={"prompt_logprobs": 1})
    for ids, choice, plain in zip(prompts, r.choices, scored.choices):
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        prompt_field = plain.model_extra["prompt_logprobs"]  # type: ignore[index]
        assert prompt_field[0] is None and len(prompt_field) == len(ids)
        for t, got, top, entry in zip(ids[1:], lp.token_logprobs[1:len(ids)], lp.top_logprobs[1:], prompt_field[1:]):
            assert got == pytest.approx(entry[str(t)]["logprob"], abs=1e-4) and entry[str(t)]["rank"] >= 1
            assert (got == max(top.values())) == (entry[str(t)]["rank"] == 1)  # lm-eval's is_greedy test
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        prompt_text = live.http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
        assert choice.text == prompt_text + plain.text
        assert "".join(lp.tokens or []) == choice.text and lp.text_offset == sorted(lp.text_offset or [])
    streamed = live.oa.completions.create(stream=True, **kw)
    texts, tokens = ["", ""], [[], []]  # type: ignore[var-annotated]
    for c in streamed:
        for ch in c.choices:
            texts[ch.index] += ch.text
            tokens[ch.index] += ch.logprobs.token_logprobs if ch.logprobs else []
    assert texts == [c.text for c in r.choices]
    assert [t[0] for t in tokens] == [None, None] and [len(t) for t in tokens] == [8, 6]
    plain_echo = live.oa.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, echo=True,
                                            extra_body={"ignore_eos": True})
    assert plain_echo.choices[0].text.startswith("Hello there") and plain_echo.choices[0].logprobs is None
    streamed_scores = [c.choices[0].model_extra.get("prompt_logprobs") for c in live.oa.completions.create(  # type: ignore
        model=MODEL, prompt=prompts[0], max_tokens=3, temperature=0, stream=True,
        extra_body={"prompt_logprobs": 0, "ignore_eos": True}) if c.choices]  # more is refused in a stream, as vLLM
    whole = scored.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    assert streamed_scores[0][0] is None and len(streamed_scores[0]) == len(whole)
    for t, got, want in zip(prompts[0][1:], streamed_scores[0][1:], whole[1:]):
        assert list(got) == [str(t)] and got[str(t)]["rank"] == want[str(t)]["rank"]
        assert got[str(t)]["logprob"] == pytest.approx(want[str(t)]["logprob"], abs=1e-4)
    assert all(s is None for s in streamed_scores[1:])
    cut = live.oa.completions.create(model=MODEL, prompt="Hello there", max_tokens=1, temperature=0, echo=True,
                                     extra_body={"truncate_prompt_tokens": 3})
    assert cut.choices[0].text.startswith(live.http.post("/detokenize", json={"tokens": live.http.post(
        "/tokenize", json={"prompt": "Hello there"}).json()["tokens"][-3:]}).json()["prompt"])


def test_allowed_token_ids_and_prompt_truncation(live: Live) -> None:
    kw: dict[str, Any] = dict(model=MODEL, max_tokens=6, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    r = live.oa.completions.create(prompt=[1, 2, 3], logprobs=0, **{**kw, "extra_body": {
        "ignore_eos": True, "allowed_token_ids": [7, 9]}})
    nine, seven = (live.http.post("/detokenize", json={"tokens": [t]}).json()["prompt"] for t in (9, 7))
    assert set(r.choices[0].logprobs.tokens) <= {seven, nine}  # type: ignore[union-attr, arg-type]
    full = live.oa.completions.create(prompt=list(range(10, 40)), **kw)
    cut = live.oa.completions.create(prompt=list(range(10, 40)), **{**kw, "extra_body": {
        "ignore_eos": True, "truncate_prompt_tokens": 5}})
    last5 = live.oa.completions.create(prompt=list(range(35, 40)), **kw)
    assert cut.usage.prompt_tokens == 5 and cut.choices[0].text == last5.choices[0].text  # type: ignore[union-attr]
    assert full.usage.prompt_tokens == 30  # type: ignore[union-attr]


NO_WHITESPACE = {str(ord(c)): -100 for c in " \t\r\n"}  # the tiny tokenizer's ids are its bytes
COLOR_SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
                "required": ["color", "ok"], "additionalProperties": False}


def test_response_format_json_schema_and_json_object(live: Live) -> None:
    """OpenAI's response_format through the official client: the content validates against the schema (logit_bias
    keeps the random model off JSON's optional whitespace, and the grammar's mask comes after it)."""
    import jsonschema

    msgs = [{"role": "user", "content": "Pick a color"}]
    r = live.oa.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=64, temperature=0, logit_bias=NO_WHITESPACE,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": COLOR_SCHEMA}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), COLOR_SCHEMA)
    r = live.oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, temperature=0,  # type: ignore
                                        response_format={"type": "json_object"}, logit_bias={"125": 100})  # "}"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("{}", "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_on_completions(live: Live, stream: bool) -> None:
    """vLLM's `structured_outputs` in the body (the openai client's extra_body), streamed or not, n > 1."""
    regex = r"[0-9]{3}-[a-z]{2,4}"
    kw: dict[str, Any] = dict(model=MODEL, prompt="Code:", max_tokens=32, temperature=1.0, seed=5, n=3,
                              extra_body={"structured_outputs": {"regex": regex}})
    if stream:
        texts = ["", "", ""]
        for c in live.oa.completions.create(stream=True, **kw):
            for choice in c.choices:
                texts[choice.index] += choice.text
    else:
        texts = [c.text for c in live.oa.completions.create(**kw).choices]
    assert all(re.fullmatch(regex, t) for t in texts), texts
    choices = ["alpha", "beta gamma"]
    r = live.oa.completions.create(model=MODEL, prompt="Pick:", max_tokens=32, temperature=0,
                                   extra_body={"structured_outputs": {"choice": choices}})
    assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"


UNIT_TOOL = {"type": "function", "function": {"name": "get_temperature", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
    "additionalProperties": False}}}
FLAG_TOOL = {"type": "function", "function": {"name": "set_flag", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "set_flag"}}])
def test_a_required_or_named_tool_choice_forces_valid_calls(live: Live, tool_choice: Any, stream: bool) -> None:
    """The grammar built from the tools' parameter schemas makes the random model call them: every call names a
    given tool (the named one when named) and its arguments validate against that tool's schema."""
    import jsonschema

    kw: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": "Do it"}], max_tokens=120,
                              temperature=0, tools=[UNIT_TOOL, FLAG_TOOL], tool_choice=tool_choice)
    if stream:
        calls: dict[int, list[str]] = {}
        finish = None
        for c in live.oa.chat.completions.create(stream=True, **kw):
            for t in c.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(t.index, ["", ""])
                entry[0] += (t.function.name or "") if t.function else ""
                entry[1] += (t.function.arguments or "") if t.function else ""
            finish = c.choices[0].finish_reason or finish
        got = [(name, args) for name, args in (calls[k] for k in sorted(calls))]
    else:
        r = live.oa.chat.completions.create(**kw)
        finish = r.choices[0].finish_reason
        assert not r.choices[0].message.content
        got = [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls or []]
    assert got and finish == ("tool_calls" if tool_choice == "required" else "stop")  # OpenAI's: a named call stops
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (UNIT_TOOL, FLAG_TOOL)}
    for name, args in got:
        assert name in schemas and (tool_choice == "required" or name == "set_flag")
        jsonschema.validate(json.loads(args), schemas[name])


def test_chat_prompt_logprobs(live: Live) -> None:
    chat = live.oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           temperature=0, extra_body={"prompt_logprobs": 0})
    scored = chat.model_extra["prompt_logprobs"]  # type: ignore[index]
    assert chat.usage is not None and len(scored) == chat.usage.prompt_tokens and scored[0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["logprob"] <= 0 for entry in scored[1:])
    plain = live.oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                            temperature=0)
    assert plain.model_extra.get("prompt_logprobs") is None  # type: ignore[union-attr]


def test_logprobs(live: Live) -> None:
    r = live.oa.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=3,
                                   extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(v <= 0 for v in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(chosen)  # greedy: the chosen token is the most likely
    assert "".join(lp.tokens or []) == r.choices[0].text
    chat = live.oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           temperature=0, logprobs=True, top_logprobs=2,
                                           extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    streamed = live.oa.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=3,
                                          stream=True, extra_body={"ignore_eos": True})
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []]
    assert tokens == lp.tokens


def test_models_tokenize_detokenize(live: Live) -> None:
    models = live.oa.models.list()
    assert [m.id for m in models.data] == [MODEL]
    tok = live.http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == MAX_MODEL_LEN
    text = live.http.post("/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()["prompt"]
    assert text == "Hello world"
    bad = live.http.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "token ids must be in" in bad.json()["error"]["message"]


def test_sagemaker_invocations_and_ping(live: Live) -> None:
    kw = {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    chat = live.http.post("/invocations", json={"messages": [{"role": "user", "content": "hi"}], **kw}).json()
    direct = live.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **kw}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"] == direct["choices"][0]["message"]
    completion = live.http.post("/invocations", json={"prompt": "Hello", **kw}).json()
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == live.oa.completions.create(prompt="Hello", extra_body={
        "ignore_eos": True}, **{k: v for k, v in kw.items() if k != "ignore_eos"}).choices[0].text
    bad = live.http.post("/invocations", json={"input": "?"})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    assert live.http.get("/ping").status_code == 200 and live.http.post("/ping").status_code == 200


def test_version(live: Live) -> None:
    from importlib.metadata import version

    r = live.http.get("/version")
    assert r.status_code == 200 and r.json() == {"version": version("semipd")}


def test_health_ok(live: Live) -> None:
    assert live.http.get("/health").status_code == 200


def test_splits_report_each_engine_split_and_its_changes(live: Live) -> None:
    part = live.core.partitioner
    [before] = live.http.get("/splits").json()["data"]
    assert (before["engine_id"], before["prefill_sms"], before["total_sms"]) == ("local", part.current, part.total_sms)
    start = part.current
    target = next(n for n in part.splits if n != start)
    assert part.switch(target, "test: move")
    try:
        body = live.http.get("/splits").json()
        [after] = body["data"]
        assert after["prefill_sms"] == target and after["num_switches"] == before["num_switches"] + 1
        last = after["switches"][-1]
        assert (last["from_sms"], last["to_sms"], last["reason"]) == (start, target, "test: move")
        assert last["time"] <= body["time"]
    finally:
        part.switch(start, "test: back")


# -- bad input -----------------------------------------------------------------------


def _body(**kw: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4, **kw}).encode()


BAD_REQUESTS: list[tuple[str, str, bytes, int, str]] = [
    ("malformed-json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, "malformed JSON"),
    ("not-an-object", "/v1/completions", b'[1, 2]', 400, "invalid request"),
    ("unknown-model", "/v1/completions", _body(model="gpt-17"), 404, "The model `gpt-17` does not exist."),
    ("negative-max-tokens", "/v1/completions", _body(max_tokens=-3), 400, "max_tokens must be at least 1"),
    ("absurd-max-tokens", "/v1/completions", _body(max_tokens=10**12), 400,
     f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested"),
    ("temperature-range", "/v1/completions", _body(temperature=5.0), 400, "temperature must be in [0, 2]"),
    ("temperature-type", "/v1/completions", _body(temperature="hot"), 400, "temperature"),
    ("top-p-zero", "/v1/completions", _body(top_p=0.0), 400, "top_p must be in (0, 1]"),
    ("n-zero", "/v1/completions", _body(n=0), 400, "n: Input should be greater than or equal to 1"),
    ("missing-prompt", "/v1/completions", json.dumps({"model": MODEL}).encode(), 400, "prompt: Field required"),
    ("prompt-too-long", "/v1/completions", _body(prompt=[5] * (MAX_MODEL_LEN + 10), max_tokens=10), 400,
     f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
     f"{MAX_MODEL_LEN + 20} tokens ({MAX_MODEL_LEN + 10} in the messages, 10 in the completion)."),
    ("bad-token-id", "/v1/completions", _body(prompt=[1, 2, 99999]), 400, "token ids must be in"),
    ("empty-messages", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), 400,
     "messages must not be empty"),
    ("chat-too-long", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "y" * 3000}]}).encode(), 400,
     f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your request has"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}).encode(),
     400, "`logprobs` must be set to true"),
    ("logit-bias-key", "/v1/completions", _body(logit_bias={"x": 1}), 400, "logit_bias keys must be token ids"),
    ("logit-bias-token", "/v1/completions", _body(logit_bias={"99999": 1}), 400, "logit_bias token ids must be in"),
    ("logit-bias-value", "/v1/completions", _body(logit_bias={"5": 150}), 400,
     "logit_bias values must be in [-100, 100]"),
    ("allowed-token-ids-range", "/v1/completions", _body(allowed_token_ids=[99999]), 400,
     "allowed_token_ids token ids must be in"),
    ("truncate-prompt-tokens-zero", "/v1/completions", _body(truncate_prompt_tokens=0), 400, "truncate_prompt_tokens"),
    ("prompt-logprobs-range", "/v1/completions", _body(prompt_logprobs=21), 400, "prompt_logprobs must be in [0, 20]"),
    ("empty-cache-salt", "/v1/completions", json.dumps({"model": MODEL, "prompt": "a", "cache_salt": ""}).encode(), 400,
     "cache_salt must be a non-empty string"),
    ("structured-regex", "/v1/completions", _body(structured_outputs={"regex": "[a-"}), 400,
     "structured_outputs is invalid"),
    ("structured-two-kinds", "/v1/completions", _body(structured_outputs={"regex": "a", "choice": ["b"]}), 400,
     "exactly one of"),
    ("structured-and-format", "/v1/completions",
     _body(structured_outputs={"regex": "a"}, response_format={"type": "json_object"}), 400, "not both"),
    ("response-format-type", "/v1/completions", _body(response_format={"type": "xml"}), 400,
     "response_format type must be"),
    ("response-format-no-schema", "/v1/completions", _body(response_format={"type": "json_schema"}), 400,
     "json_schema.schema"),
    ("tool-choice-shape", "/v1/chat/completions",  # once an AttributeError (500)
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                 "tools": [{"type": "function", "function": {"name": "f"}}],
                 "tool_choice": {"type": "function", "function": "f"}}).encode(), 400, "tool_choice"),
    ("invalid-utf8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}', 400, "not valid UTF-8"),
    ("nested-too-deeply", "/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     400, "nested too deeply"),  # once a RecursionError (500)
    ("body-too-large", "/v1/completions", b'{"prompt": "' + b"a" * (10 * 1000 * 1000) + b'"}', 413,
     "larger than the limit"),
]


@pytest.mark.parametrize("path,body,status,message", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(live: Live, path: str, body: bytes, status: int, message: str) -> None:
    r = live.http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"]
    assert err["code"] == status and err["type"]
    assert set(err) == {"message", "type", "param", "code"}


def test_openai_client_sees_vllm_errors(live: Live) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        live.oa.completions.create(model=MODEL, prompt=[3] * MAX_MODEL_LEN, max_tokens=1)
    assert f"This model's maximum context length is {MAX_MODEL_LEN} tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        live.oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError):
        live.oa.completions.create(model=MODEL, prompt="a", stream=False, stream_options={"include_usage": True})


def test_bad_requests_do_not_disturb_a_stream_in_flight(live: Live) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="Steady stream", max_tokens=60, temperature=0,
                              extra_body={"ignore_eos": True})
    reference = live.oa.completions.create(**kw).choices[0].text
    stream = iter(live.oa.completions.create(stream=True, **kw))
    first = next(stream)
    assert live.core.num_unfinished == 1
    for _, path, body, status, _ in BAD_REQUESTS:
        assert live.http.post(path, content=body).status_code == status
    rest = list(stream)
    chunks = [first, *rest]
    assert "".join(c.choices[0].text for c in chunks) == reference
    assert chunks[-1].choices[0].finish_reason == "length"
    wait_until(live.idle, what="the engine to go idle")


# -- disconnects ---------------------------------------------------------------------


def _raw_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def leave_while_running(live: Live, path: str, body: dict[str, Any], first_bytes: bytes | None) -> None:
    """Post `body`, read the stream until `first_bytes` (None: nothing) while the request runs, hang up, and wait
    for the engine to free the request's pages."""
    sock = _raw_post(live.server.port, path, body)
    try:
        if first_bytes is not None:
            received = b""
            while first_bytes not in received:
                part = sock.recv(65536)
                assert part, f"the server closed the connection: {received!r}"
                received += part
            assert received.startswith(b"HTTP/1.1 200"), received
        wait_until(lambda: live.core.num_unfinished == 1 and live.core.allocator.usage > 0, what="the request to run")
    finally:
        sock.close()
    wait_until(live.idle, what="the aborted request's pages to be freed")


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_client_disconnect_aborts_and_frees_pages(live: Live, stream: bool) -> None:
    wait_until(live.idle, what="the engine to go idle")
    aborted = live.counter("vllm:request_success_total", finished_reason="abort")
    finished = live.counter("vllm:request_success_total", finished_reason="length")
    body = {"model": MODEL, "prompt": "Leave early", "max_tokens": LONG, "ignore_eos": True, "stream": stream}
    leave_while_running(live, "/v1/completions", body, b"data: " if stream else None)
    wait_until(lambda: live.counter("vllm:request_success_total", finished_reason="abort") == aborted + 1,
               what="the abort to be counted")
    assert live.counter("vllm:request_success_total", finished_reason="length") == finished


# -- a stub engine: stalls, admission, capacity, API key ------------------------------


class StubClient:
    """An EngineClient whose behaviour the test sets: loads to report, an error to raise."""

    def __init__(self, loads: list[EngineLoad] | None = None, error: Exception | None = None) -> None:
        self._loads = loads if loads is not None else [EngineLoad("e0", stats={"seconds_since_progress": 0.01})]
        self.error = error
        self.requests: list[GenerateRequest] = []

    def model_info(self) -> ModelInfo:
        return ModelInfo(MODEL, "/models/tiny", "LlamaForCausalLM", MAX_MODEL_LEN, 512, "semi-pd")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        yield StreamChunk(request.request_id, "ok", (1,), "stop", num_prompt_tokens=len(request.prompt_token_ids),
                          num_output_tokens=1)

    async def abort(self, request_id: str) -> bool:
        return False

    async def loads(self) -> list[EngineLoad]:
        return self._loads


def _stub_call(tiny_llama: Path, client: StubClient, method: str, path: str, api_key: str | None = None,
               **kw: Any) -> httpx.Response:
    app = create_app(client, Tokenizer(tiny_llama), api_key=api_key, health_stall_s=5.0)  # type: ignore[arg-type]

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def llama3_like_tokenizer(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer made like Llama 3's: encoding adds a BOS, and the chat template writes one too
    (with an optional `hint` from the template's kwargs)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}{% if hint %}[{{ hint }}]{% endif %}" + tok.chat_template
    out = tmp_path_factory.mktemp("llama3-like-tokenizer")
    tok.save_pretrained(str(out))
    return out


def test_chat_prompts_get_the_template_s_bos_only_and_vllm_s_template_options(llama3_like_tokenizer: Path) -> None:
    tok = Tokenizer(llama3_like_tokenizer)
    bos = tok.hf.bos_token_id
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    assert tok.encode("hi")[0] == bos and tok.chat_ids(msgs[:1])[:2].count(bos) == 1

    def tokenize(**body: Any) -> list[int]:
        r = _stub_call(llama3_like_tokenizer, StubClient(), "POST", "/tokenize", json=body)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    assert tokenize(messages=msgs[:1])[:2] == [bos, tok.chat_ids(msgs[:1])[1]]
    assert tokenize(messages=msgs[:1], add_special_tokens=True)[:2] == [bos, bos]
    assert tokenize(prompt="hi")[0] == bos and tokenize(prompt="hi", add_special_tokens=False)[0] != bos
    hinted = tok.decode(tokenize(messages=msgs[:1], chat_template_kwargs={"hint": "brief"}), skip_special_tokens=False)
    assert hinted.startswith(f"{tok.hf.bos_token}[brief]")
    continued = tok.decode(tokenize(messages=msgs, add_generation_prompt=False, continue_final_message=True),
                           skip_special_tokens=False)
    assert continued.endswith("assistant\nHel")
    client = StubClient()
    r = _stub_call(llama3_like_tokenizer, client, "POST", "/v1/chat/completions", json={"model": MODEL, "messages": msgs[:1]})
    assert r.status_code == 200 and client.requests[0].prompt_token_ids == tok.chat_ids(msgs[:1])
    r = _stub_call(llama3_like_tokenizer, StubClient(), "POST", "/v1/chat/completions",
                   json={"model": MODEL, "messages": msgs, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_sampling_fields_a_request_leaves_out_come_from_the_generation_config(tmp_path: Path, tiny_llama: Path
                                                                               ) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 5, "max_new_tokens": 7}))
    client = StubClient()
    client.model_info = lambda: ModelInfo(MODEL, str(tmp_path), "LlamaForCausalLM", MAX_MODEL_LEN, 512,  # type: ignore
                                          "semi-pd")
    for body, temperature, top_k in (({}, 0.0, 5), ({"temperature": 0.7, "top_k": 2}, 0.7, 2)):
        r = _stub_call(tiny_llama, client, "POST", "/v1/completions", json={"model": MODEL, "prompt": "hi", **body})
        assert r.status_code == 200
        params = client.requests[-1].params
        assert (params.temperature, params.top_k, params.top_p) == (temperature, top_k, 1.0)
    r = _stub_call(tiny_llama, client, "POST", "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and client.requests[-1].params.max_tokens == 7  # a chat's max_tokens left out
    assert client.requests[-2].params.max_tokens == 16  # completions' own default stays


class ScriptedClient(StubClient):
    """Answers every request with `text`, a few characters per chunk, as if the model had written it."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        self.requests.append(request)
        pieces = [self.text[i:i + 5] for i in range(0, len(self.text), 5)]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            yield StreamChunk(request.request_id, piece, (1,), "stop" if last else None,
                              num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=k + 1)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tool_template_tokenizer(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer with a template that writes the tools' names and an assistant's earlier call."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.chat_template = (
        "{% if tools %}[tools: {{ tools | map(attribute='function.name') | join(',') }}]{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}(call {{ c.function.name }} city={{ c.function.arguments.city }}){% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    out = tmp_path_factory.mktemp("tool-template")
    tok.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_in_the_hermes_format_come_back_as_openai_tool_calls(tool_template_tokenizer: Path,
                                                                       stream: bool) -> None:
    """The openai client sends tools and an earlier call's answer; the template sees them (the earlier call's
    arguments as an object); the model's `<tool_call>` block comes back as a tool call, streamed or not."""
    said = 'Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    client = ScriptedClient(said)
    app = create_app(client, Tokenizer(tool_template_tokenizer))  # type: ignore[arg-type]
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                {"role": "user", "content": "And Paris?"}]

    async def ask() -> tuple[str | None, list[Any], str | None]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as http:
            oa = openai.AsyncOpenAI(base_url="http://stub/v1", api_key="x", http_client=http, max_retries=0)
            if not stream:
                r = await oa.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])  # type: ignore
                return r.choices[0].message.content, list(r.choices[0].message.tool_calls or []), \
                    r.choices[0].finish_reason
            content, calls, finish = "", {}, None
            async for c in await oa.chat.completions.create(model=MODEL, messages=messages,  # type: ignore
                                                            tools=[WEATHER_TOOL], stream=True):
                d = c.choices[0].delta
                content += d.content or ""
                for t in d.tool_calls or []:
                    calls[t.index] = t
                finish = c.choices[0].finish_reason or finish
            return content, [calls[k] for k in sorted(calls)], finish

    content, calls, finish = asyncio.run(ask())
    assert (content, finish) == ("Let me look.", "tool_calls")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and calls[0].type == "function"
    prompt = Tokenizer(tool_template_tokenizer).decode(client.requests[0].prompt_token_ids, skip_special_tokens=False)
    assert prompt.startswith("[tools: get_weather]") and "(call get_weather city=Oslo)" in prompt
    assert "<tool>rain" in prompt and prompt.endswith("<assistant>")


def test_tool_call_parsers_read_their_formats_and_leave_anything_else_as_content() -> None:
    from cluster.openai_api.tools import parser_named

    hermes, llama = parser_named("hermes"), parser_named("llama3_json")
    two = ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
           '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>')
    content, calls = hermes.parse(two)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {"y": 2})]
    assert len({c.id for c in calls}) == 2
    assert hermes.parse('<tool_call>{"name": "a", "argu') == ('<tool_call>{"name": "a", "argu', [])
    assert hermes.parse("no calls here") == ("no calls here", [])
    content, calls = llama.parse('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert llama.parse("{not json}") == ("{not json}", []) and llama.parse("plain") == ("plain", [])
    with pytest.raises(ValueError, match="choose from hermes, llama3_json"):
        parser_named("mistral")


def test_tool_choice_and_plain_text_with_tools(tool_template_tokenizer: Path) -> None:
    def chat(client: StubClient, **body: Any) -> httpx.Response:
        return _stub_call(tool_template_tokenizer, client, "POST", "/v1/chat/completions",
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body})

    plain = chat(ScriptedClient("Just text, no call."), tools=[WEATHER_TOOL]).json()["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "Just text, no call.", "tool_calls": []}
    assert plain["finish_reason"] == "stop"
    ignored = chat(ScriptedClient('<tool_call>{"name": "x", "arguments": {}}</tool_call>'), tools=[WEATHER_TOOL],
                   tool_choice="none").json()["choices"][0]
    assert ignored["message"]["tool_calls"] == [] and ignored["message"]["content"].startswith("<tool_call>")
    for body in ({"tool_choice": {"type": "function", "function": {"name": "not_a_tool"}}, "tools": [WEATHER_TOOL]},
                 {"tool_choice": "required"},
                 {"tool_choice": "required", "tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}):
        r = chat(StubClient(), **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    bad = chat(StubClient(), tools=[{"type": "function", "function": {"description": "no name"}}])
    assert bad.status_code == 400 and "tools.0.function.name" in bad.json()["error"]["message"]


def test_health_fails_when_the_engine_makes_no_progress(tiny_llama: Path) -> None:
    stalled = StubClient([EngineLoad("e0", stats={"seconds_since_progress": 120.0})])
    r = _stub_call(tiny_llama, stalled, "GET", "/health")
    assert r.status_code == 503 and "no progress for 120s" in r.json()["error"]["message"]
    unhealthy = StubClient([EngineLoad("e0", healthy=False), EngineLoad("e1", draining=True)])
    r = _stub_call(tiny_llama, unhealthy, "GET", "/health")
    assert r.status_code == 503 and "e0: unhealthy" in r.text and "e1: draining" in r.text
    one_ok = StubClient([EngineLoad("e0", healthy=False), EngineLoad("e1", stats={"seconds_since_progress": 0.1})])
    assert _stub_call(tiny_llama, one_ok, "GET", "/health").status_code == 200
    assert _stub_call(tiny_llama, StubClient([]), "GET", "/health").status_code == 503


@pytest.mark.parametrize("error,status", [
    (AdmissionRejected("request rejected by admission control: predicted TTFT too high", 900.0, 100.0), 429),
    (NoCapacityError("all engines are draining"), 503),
], ids=["admission-429", "no-capacity-503"])
@pytest.mark.parametrize("stream", [False, True])
def test_capacity_errors(tiny_llama: Path, error: Exception, status: int, stream: bool) -> None:
    r = _stub_call(tiny_llama, StubClient(error=error), "POST", "/v1/completions",
                   json={"model": MODEL, "prompt": "hi", "stream": stream})
    assert r.status_code == status
    assert r.headers["retry-after"] == "1"
    assert str(error) in r.json()["error"]["message"]


def test_admission_set_in_the_app_arguments_refuses_a_request_past_its_own_ttft_target(tiny_llama: Path) -> None:
    """A real CPU engine built from the Serve app's arguments (`admission: reject`, EDF): a request with a
    generous target is served, one whose own TTFT target (`x-slo-ttft-ms`) the latency model says cannot be met
    gets 429 with the OpenAI error body and the engine goes on serving."""
    from cluster.serve_app import ServeArgs, local_client

    args = ServeArgs(model=str(tiny_llama), served_model_name=MODEL, local=True, num_pages=256, ttft_slo_ms=60_000,
                     prefill_order="edf", admission="reject")
    client = local_client(args)
    try:
        slo = client.llm.core.config.slo
        assert (slo.order, slo.admission, slo.admission_action, slo.ttft_ms) == ("edf", True, "reject", 60_000)
        body = {"model": MODEL, "prompt": "hello there", "max_tokens": 3}
        with LiveServer(create_app(client, Tokenizer(tiny_llama))) as server:
            assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
            refused = httpx.post(f"{server.url}/v1/completions", json=body, headers={"x-slo-ttft-ms": "0.001"},
                                 timeout=60)
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert "admission control" in error["message"] and error["type"] and error["code"] == 429
            assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        client.shutdown()


def test_priority_slo_headers_and_session_reach_the_engine(tiny_llama: Path) -> None:
    client = StubClient()
    headers = {"x-slo-ttft-ms": "250", "x-slo-tpot-ms": "20.5", "x-session-id": "user-42", "x-request-id": "rq-9"}
    r = _stub_call(tiny_llama, client, "POST", "/v1/chat/completions", headers=headers,
                   json={"messages": [{"role": "user", "content": "hi"}], "priority": -3, "max_tokens": 7,
                         "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 0.5,
                         "frequency_penalty": -0.5, "min_tokens": 2, "seed": 11, "stop": "END"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "rq-9"
    req = client.requests[0]
    assert (req.request_id, req.priority, req.ttft_slo_ms, req.tpot_slo_ms, req.session_id) == (
        "rq-9", -3, 250.0, 20.5, "user-42")
    p = req.params
    assert (p.max_tokens, p.top_k, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
            p.min_tokens, p.seed, p.stop) == (7, 5, 0.1, 1.2, 0.5, -0.5, 2, 11, ("END",))
    bad = _stub_call(tiny_llama, client, "POST", "/v1/completions", headers={"x-slo-ttft-ms": "-1"},
                     json={"prompt": "hi"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-slo-ttft-ms"
    assert len(client.requests) == 1


def test_api_key(tiny_llama: Path) -> None:
    client = StubClient()
    assert _stub_call(tiny_llama, client, "GET", "/v1/models", api_key="s3cret").status_code == 401
    wrong = _stub_call(tiny_llama, client, "GET", "/v1/models", api_key="s3cret",
                       headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "AuthenticationError"
    ok = _stub_call(tiny_llama, client, "POST", "/v1/completions", api_key="s3cret",
                    headers={"authorization": "Bearer s3cret"}, json={"prompt": "hi"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"
    assert _stub_call(tiny_llama, client, "GET", "/health", api_key="s3cret").status_code == 200


def test_draining_refuses_new_requests(tiny_llama: Path) -> None:
    app = create_app(StubClient(), Tokenizer(tiny_llama))  # type: ignore[arg-type]
    app.state.openai.draining = True

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub") as c:
            return await c.post("/v1/completions", json={"prompt": "hi"}), await c.get("/health")

    gen, health = asyncio.run(go())
    assert gen.status_code == 503 and "draining" in gen.json()["error"]["message"]
    assert health.status_code == 503


# -- through Ray Serve ---------------------------------------------------------------


SERVE_APPS = ("local", "cluster")


@pytest.fixture(scope="module")
def serve_urls(tiny_llama: Path) -> Iterator[dict[str, str]]:
    """Two Serve apps on one local Ray instance: `local` (engine in the replica) and
    `cluster` (a Router over an engine actor that the replica's ensure_cluster starts)."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from cluster.serve_app import build_app

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 << 20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"model": str(tiny_llama), "mode": "unified", "served_model_name": MODEL, "device": "cpu",
                  "replica_num_cpus": 0.5}
        grpc_port = free_port()
        serve.run(build_app({**common, "local": True, "grpc_port": grpc_port}), name="local", route_prefix="/local",
                  blocking=False)
        serve.run(build_app({**common, "num_actors": 1, "router_policy": "prefix-affinity"}), name="cluster",
                  route_prefix="/cluster")
        yield {**{name: f"http://127.0.0.1:{port}/{name}" for name in SERVE_APPS}, "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.parametrize("name", SERVE_APPS)
def test_openai_client_through_ray_serve(serve_urls: dict[str, str], name: str) -> None:
    url = serve_urls[name]
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    r = oa.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 5
    chunks = list(oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="other", prompt="x", max_tokens=2)
    resp = httpx.post(f"{url}/v1/completions", content=b"{", headers={"x-request-id": "via-serve-1"})
    assert resp.status_code == 400 and resp.headers["x-request-id"] == "via-serve-1"
    assert httpx.get(f"{url}/health").status_code == 200
    assert "vllm:e2e_request_latency_seconds" in httpx.get(f"{url}/metrics").text
    if name == "cluster":  # the replica started the engine actor and routes to it
        import ray

        assert ray.get_actor("semipd-engine-0", namespace="semipd") is not None
    else:  # the replica also serves gRPC over its engine
        from actors.request import SamplingParams
        from cluster.grpc_client import generate_once

        out = generate_once(serve_urls["grpc"], "Hello", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                            timeout=60)
        assert out["text"] == r.choices[0].text and out["finish_reason"] == "length"

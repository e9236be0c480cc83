"""Corners of the OpenAI-compatible API where vLLM's server answers in a particular way, and ours must too.

One live server (uvicorn + the tiny CPU engine) for the module; the official `openai` client where it applies, raw
HTTP to read stream chunks as sent.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from test_logprobs_parity import MODEL, Live, live  # noqa: F401  (live: a fixture used here)

pytestmark = pytest.mark.timeout(300)

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]  # "Hello world", byte-level
BEGIN_OF_TEXT = 256  # a special token: no text once special tokens are skipped, and not an end of text


def test_echo_with_max_tokens_zero_is_the_prompt_alone(live: Live) -> None:
    """`echo` with `max_tokens` 0 (lm-eval-harness's scoring request) is accepted, as by vLLM: the text and the
    logprobs are the prompt's alone (the first token's null), cut by length, with no completion tokens; whole and
    streamed, n = 2."""
    text = "Hello world"
    r = live.oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, n=2,
                                   temperature=1.0, seed=3)
    assert r.usage is not None and r.usage.completion_tokens == 0 and r.usage.total_tokens == len(PROMPT)
    for choice in r.choices:
        assert choice.text == text and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
        assert "".join(lp.tokens) == text and len(lp.token_logprobs) == len(PROMPT)
        assert lp.token_logprobs[0] is None and all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    plain = live.oa.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True)
    assert plain.choices[0].text == text and plain.choices[0].logprobs is None
    chunks = live.stream("/v1/completions", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, n=2,
                         stream_options={"include_usage": True})
    texts, tokens, finishes = ["", ""], [[], []], [None, None]  # type: ignore[var-annotated]
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
            tokens[ch["index"]] += ch["logprobs"]["tokens"] if ch["logprobs"] else []
            finishes[ch["index"]] = ch["finish_reason"] or finishes[ch["index"]]
    assert texts == [text, text] and finishes == ["length", "length"]
    assert ["".join(t) for t in tokens] == [text, text]
    assert chunks[-1]["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "Hello"}),
])
def test_prompt_logprobs_are_refused_in_a_stream(live: Live, path: str, body: dict[str, Any]) -> None:
    """A stream asking `prompt_logprobs` (other than 0) gets vLLM's 400; 0 goes through."""
    r = live.http.post(path, json={"model": MODEL, "max_tokens": 2, "stream": True, "prompt_logprobs": 1, **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == "`prompt_logprobs` are not available when `stream=True`."
    assert error["param"] == "prompt_logprobs"
    assert live.stream(path, max_tokens=2, prompt_logprobs=0, **body)


def test_prompt_logprobs_field_shows_what_prompt_logprobs_asks_beside_echo(live: Live) -> None:
    """With `echo` and `logprobs` 5, the `prompt_logprobs` field holds the alternatives `prompt_logprobs` asks
    (0: the prompt token alone), while the echoed logprobs hold the 5 `logprobs` asks; without `prompt_logprobs`
    the field follows `logprobs`, as vLLM's."""
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=1, echo=True, logprobs=5, temperature=0)
    r = live.oa.completions.create(**kw, extra_body={"prompt_logprobs": 0})
    choice = r.choices[0]
    field = choice.model_extra["prompt_logprobs"]  # type: ignore[index]
    assert field[0] is None and len(field) == len(PROMPT)
    assert all(list(entry) == [str(t)] for entry, t in zip(field[1:], PROMPT[1:]))
    assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
    tops = choice.logprobs.top_logprobs[1:]  # keyed by text: the lone bytes of characters share one key
    assert all(len(top) >= 2 for top in tops) and max(len(top) for top in tops) >= 5
    wide = live.oa.completions.create(**kw).choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    assert all(5 <= len(entry) <= 6 and str(t) in entry for entry, t in zip(wide[1:], PROMPT[1:]))


def test_top_logprobs_over_the_limit_names_top_logprobs(live: Live) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        live.oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                        logprobs=True, top_logprobs=21)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "top_logprobs"  # type: ignore[index]
    assert "top_logprobs must be in [0, 20]" in e.value.body["message"]  # type: ignore[index]


def test_chat_chunk_with_logprobs_and_no_text_has_empty_content(live: Live) -> None:
    """A chat stream's chunk of tokens that show no text (a special token, skipped) carries its logprobs and,
    as vLLM's without a parser, `content` "" (not an empty delta), the last chunk too."""
    chunks = live.stream("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                         temperature=0, logprobs=True, ignore_eos=True, logit_bias={str(BEGIN_OF_TEXT): 100})
    tokens = [c["choices"][0] for c in chunks[1:]]  # after the role's chunk
    assert sum(len(ch["logprobs"]["content"]) for ch in tokens) == 3
    assert all(ch["delta"] == {"content": ""} for ch in tokens)
    assert tokens[-1]["finish_reason"] == "length"


def test_responses_output_text_carries_logprobs_when_included(live: Live) -> None:
    """Responses with `include` ["message.output_text.logprobs"] and `top_logprobs`: the output text carries each
    output token's logprob and its most likely alternatives, as chat's entries (vLLM's); streamed, the text deltas
    carry them and the final response equals the whole one's; not included, none."""
    kw: dict[str, Any] = dict(model=MODEL, input="hi", max_output_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    r = live.oa.responses.create(include=["message.output_text.logprobs"], top_logprobs=2, **kw)
    assert r.usage is not None and r.top_logprobs == 2
    part = r.output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "output_text" and len(part.logprobs) == r.usage.output_tokens == 4  # type: ignore[union-attr]
    for entry in part.logprobs:  # type: ignore[union-attr]
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 2 and values == sorted(values, reverse=True) and entry.logprob == values[0]
    plain = live.oa.responses.create(**kw).output[0].content[0]  # type: ignore[union-attr]
    assert plain.text == part.text and plain.logprobs == []  # type: ignore[union-attr]
    events = list(live.oa.responses.create(include=["message.output_text.logprobs"], top_logprobs=2, stream=True,
                                           **kw))
    deltas = [lp for ev in events if ev.type == "response.output_text.delta" for lp in ev.logprobs]
    assert 1 <= len(deltas) <= 4 and all(len(lp.top_logprobs) == 2 for lp in deltas)
    final = events[-1].response.output[0].content[0]  # type: ignore[union-attr]
    assert [e.token for e in final.logprobs] == [e.token for e in part.logprobs]  # type: ignore[union-attr]

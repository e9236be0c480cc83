"""Structured outputs at their edges: outputs cut by max_tokens or a stop string, logprobs beside a grammar, aborts
mid-grammar, preemption of sampled requests in semi-PD mode, a model whose vocabulary is wider than its tokenizer,
`n` choices streamed over HTTP, and regexes that do not compile."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.config import CacheConfig, EngineConfig, SchedulerConfig
from actors.engine.frontend import LLM, Tokenizer
from actors.models.make_model import make_model, write_tokenizer
from actors.request import SamplingParams, SamplingParamsError
from actors.request import StructuredOutputsParams as Structured
from actors.structured.grammar import grammar_error
from cluster.engine_client import LocalEngineClient
from cluster.openai_api import create_app

from support import sse_events, wait_until
from test_structured import PROMPTS, REGEX, check_output, spec_checks

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> Iterator[LLM]:
    engine = LLM(tiny_llama, mode="semi-pd", device="cpu")
    yield engine
    engine.shutdown()


def grammar_takes(llm: LLM, spec: Structured, token_ids: list[int]) -> tuple[bool, bool]:
    """(whether a fresh matcher of `spec` takes every token of `token_ids`, whether it is complete then)."""
    matcher = llm.core.grammars.compile(spec).matcher
    took = all(matcher.consume_token(t) for t in token_ids)
    return took, took and matcher.is_accepting()


def test_an_output_cut_by_max_tokens_is_a_prefix_the_grammar_takes(llm: LLM) -> None:
    spec = Structured(json={"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string"}}},
                            "required": ["words"]}, disable_any_whitespace=True)
    out = llm.generate(["Tell me"], SamplingParams(max_tokens=6, temperature=0.0, structured_outputs=spec))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    assert grammar_takes(llm, spec, out.token_ids) == (True, False)
    assert out.text == llm.tokenizer.decode(out.token_ids) and '{"words":'.startswith(out.text)


def test_a_stop_string_cuts_a_constrained_output(llm: LLM) -> None:
    """A stop string ends the output wherever it falls in the grammar (as in vLLM): the text before it, finish stop,
    the string as the stop reason."""
    spec = Structured(regex=REGEX)
    whole = llm.generate(["Tell me"], SamplingParams(max_tokens=32, temperature=0.0, structured_outputs=spec))[0]
    assert whole.finish_reason == "stop" and "-" in whole.text
    cut = llm.generate(["Tell me"], SamplingParams(max_tokens=32, temperature=0.0, stop=["-"],
                                                   structured_outputs=spec))[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (whole.text.split("-")[0], "stop", "-")


def test_logprobs_beside_a_grammar_are_those_of_the_raw_model_output(llm: LLM) -> None:
    """As vLLM's default (`raw_logprobs`): the chosen token's logprob and the top ones come from the distribution
    before the grammar's mask, the same as an unconstrained request's; the chosen tokens obey the grammar."""
    spec = Structured(regex="[a-c]{4}")
    shaped = llm.generate(["Once upon"], SamplingParams(max_tokens=8, temperature=0.0, logprobs=5,
                                                        structured_outputs=spec))[0]
    free = llm.generate(["Once upon"], SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))[0]
    assert re.fullmatch("[a-c]{4}", shaped.text) and shaped.finish_reason == "stop"
    assert len(shaped.logprobs) == len(shaped.token_ids) == 4
    first, raw = shaped.logprobs[0], free.logprobs[0]
    assert first.top == raw.top and first.token_id == shaped.token_ids[0]
    raw_top = dict(raw.top)
    if first.token_id in raw_top:
        assert first.logprob == pytest.approx(raw_top[first.token_id], abs=1e-5)
    else:
        assert first.rank is not None and first.rank > 5 and first.logprob < min(raw_top.values())
    assert any(chr(t) not in "abc" for t, _ in first.top if t < 128), "the top tokens are the model's, unmasked"


def test_aborting_a_constrained_request_mid_grammar_frees_it(llm: LLM) -> None:
    spec = Structured(json={"type": "array", "items": {"type": "integer"}}, disable_any_whitespace=True)
    stream = llm.stream("Tell me", SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True,
                                                  structured_outputs=spec))
    first = next(stream)
    assert first.finish_reason is None
    stream.close()  # the reader leaves: the request is aborted
    wait_until(lambda: llm.core.num_unfinished == 0, 30, "the aborted request to end")
    out = llm.generate(["x"], SamplingParams(max_tokens=32, temperature=0.0, structured_outputs=Structured(regex="ab")))
    assert out[0].text == "ab" and out[0].finish_reason == "stop"


@pytest.mark.parametrize("regex", ["a\\", "\\", "[a-c]+\\\\\\"])
def test_a_regex_ending_in_a_lone_backslash_is_refused(llm: LLM, regex: str) -> None:
    """An unfinished escape is no regex (Python's `re`, Rust's `regex` refuse it); llguidance dropped it unseen, so
    `a\\` matched `a` and `\\` the empty text, an output that 'stopped' for a pattern the user never meant."""
    with pytest.raises(re.error):
        re.compile(regex)
    with pytest.raises(SamplingParamsError, match="unfinished escape"):
        llm.generate(["x"], SamplingParams(max_tokens=8, structured_outputs=Structured(regex=regex)))
    assert "unfinished escape" in (grammar_error(Structured(regex=regex)) or "")
    escaped = llm.generate(["x"], SamplingParams(max_tokens=8, temperature=0.0,
                                                 structured_outputs=Structured(regex="a\\\\")))[0]
    assert escaped.text == "a\\" and escaped.finish_reason == "stop"  # an escaped backslash stays one


def test_preempted_sampled_constrained_requests_resume_their_grammar_in_semi_pd(tiny_llama: Path) -> None:
    """Semi-PD mode (the decode worker preempts, the prefill worker recomputes and draws the next token through the
    grammar): seeded sampled and greedy outputs equal those of a roomy pool, and obey their grammars."""
    specs = spec_checks()
    prompts = [" ".join(PROMPTS) * (1 + i % 3) for i in range(12)]
    params = [SamplingParams(max_tokens=48, temperature=0.0 if i % 2 else 1.0, seed=i,
                             structured_outputs=specs[i % len(specs)][0]) for i in range(12)]
    results, preemptions = [], 0
    for pages in (None, 24):
        engine = LLM(tiny_llama, mode="semi-pd", device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=64),
                     cache=CacheConfig(page_size=16, num_pages=pages))
        try:
            outs = engine.generate(prompts, params)
            preemptions = engine.core.num_preemptions
        finally:
            engine.shutdown()
        for k, out in enumerate(outs):
            check_output(out, specs[k % len(specs)][1], 48)
        results.append([(o.token_ids, o.finish_reason) for o in outs])
    assert preemptions > 0
    assert results[0] == results[1]


@pytest.fixture(scope="module")
def narrow_tokenizer_model(model_factory: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's weights (512 logits) with a tokenizer of 300 tokens: ids 300.. are padding rows."""
    out = make_model("tiny-llama", tmp_path_factory.mktemp("padded-vocab"), seed=0)
    write_tokenizer(out, 300)
    return out


def test_padding_ids_of_a_vocabulary_wider_than_the_tokenizer_are_masked(narrow_tokenizer_model: Path) -> None:
    """Padding ids have no text: unconstrained hot sampling draws them, a grammar never does."""
    assert len(Tokenizer(narrow_tokenizer_model).hf) == 300
    engine = LLM(narrow_tokenizer_model, mode="unified", device="cpu")
    try:
        spec = Structured(json_object=True, disable_any_whitespace=True)
        free = engine.generate(["hello"] * 4, [SamplingParams(max_tokens=32, temperature=2.0, seed=i, ignore_eos=True)
                                               for i in range(4)])
        shaped = engine.generate(["hello"] * 8, [SamplingParams(max_tokens=48, temperature=2.0, seed=i,
                                                                structured_outputs=spec) for i in range(8)])
    finally:
        engine.shutdown()
    assert any(t >= 300 for o in free for t in o.token_ids), "the test needs padding ids to be likely"
    for out in shaped:
        assert all(t < 300 for t in out.token_ids), out.token_ids
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_n_constrained_choices_stream_over_http_as_their_whole_texts(tiny_llama: Path) -> None:
    """`n` 3 with a regex, streamed: each choice's deltas join to its text, which matches; the same call unstreamed
    (same seed) gives the same texts."""
    client = LocalEngineClient(EngineConfig(model=str(tiny_llama), mode="semi-pd", device="cpu"), served_name="tiny")
    app = create_app(client, Tokenizer(tiny_llama))
    body: dict[str, Any] = {"model": "tiny", "prompt": "Tell me", "max_tokens": 32, "n": 3, "temperature": 1.0,
                            "seed": 5, "structured_outputs": {"regex": REGEX}}

    async def go() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=60) as http:
            whole = await http.post("/v1/completions", json=body)
            assert whole.status_code == 200, whole.text
            streamed = await http.post("/v1/completions", json={**body, "stream": True})
            assert streamed.status_code == 200, streamed.text
            return whole.json(), sse_events(streamed.text)

    try:
        whole, chunks = asyncio.run(go())
    finally:
        client.shutdown()
    texts, finishes = ["", "", ""], [None, None, None]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
    assert finishes == ["stop"] * 3
    assert all(re.fullmatch(REGEX, t) for t in texts), texts
    assert [c["text"] for c in sorted(whole["choices"], key=lambda c: c["index"])] == texts


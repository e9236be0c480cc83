"""Incremental detokenization and stop handling (`OutputStream`) against vLLM's: random token ids of the tiny
checkpoints' byte-level tokenizer with random stop strings give deltas that join to the whole text, which is the
decode of the kept tokens cut at the stop string; with `include_stop_str_in_output` nothing is held back (vLLM
holds text back only for stop strings it cuts off)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.engine.frontend import LLM, PROMPT_CONTEXT_TOKENS, OutputStream, StreamChunk, Tokenizer
from actors.request import FinishReason, SamplingParams, TokenDelta

pytestmark = pytest.mark.timeout(120)

EOS = 259  # the tiny tokenizer's eos_token (<|im_end|>)
IM_START = 258  # a special token
MULTI_BYTE = "é€😀".encode()
STOP_PIECES = [*"ab .é€😀<|>\ufffd", "<|reserved_3", "_30", "|><|", "<|im_"]  # some span a reserved token's text


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def tok(request: pytest.FixtureRequest, model_factory: Callable[[str], Path]) -> Tokenizer:
    return Tokenizer(model_factory(request.param))


def byte_ids(text: str) -> list[int]:
    """The tiny byte-level tokenizer's ids of `text`: one per UTF-8 byte, the byte's value."""
    return list(text.encode())


@dataclass(frozen=True)
class Case:
    prompt: list[int]
    output: list[int]
    sizes: list[int]  # tokens of each delta, in order
    params: SamplingParams
    stop_token: bool  # the last output token is the stop token that ended the request


TOKENS = st.one_of(st.sampled_from([*b"ab .", *MULTI_BYTE]), st.integers(0, 511), st.integers(256, 261),
                   st.sampled_from([300, 303, 330]))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    output = draw(st.lists(TOKENS, min_size=1, max_size=16))
    if draw(st.booleans()):
        sizes = [1] * len(output)  # the engine's deltas: one token each
    else:
        sizes, left = [], len(output)
        while left:
            sizes.append(draw(st.integers(1, left)))
            left -= sizes[-1]
    stops = draw(st.lists(st.lists(st.sampled_from(STOP_PIECES), min_size=1, max_size=3).map("".join), max_size=3))
    params = SamplingParams(max_tokens=len(output), min_tokens=draw(st.integers(0, len(output))), stop=tuple(stops),
                            include_stop_str_in_output=draw(st.booleans()), skip_special_tokens=draw(st.booleans()))
    return Case(draw(st.lists(TOKENS, min_size=1, max_size=8)), output, sizes, params, draw(st.booleans()))


def feed(tok: Tokenizer, case: Case) -> tuple[OutputStream, list[StreamChunk]]:
    """The case's deltas through an `OutputStream`, the last one finishing the request, until it is done."""
    stream = OutputStream("r", case.prompt, case.params, tok)
    chunks, at = [], 0
    end = FinishReason.STOP if case.stop_token else FinishReason.LENGTH
    for k, size in enumerate(case.sizes):
        last = k == len(case.sizes) - 1
        chunk, _ = stream.process(TokenDelta("r", tuple(case.output[at:at + size]), end if last else None,
                                             ends_with_stop_token=last and case.stop_token))
        chunks.append(chunk)
        at += size
        if stream.done:
            break
    assert stream.done
    return stream, chunks


def shown_text(tok: Tokenizer, prompt: Sequence[int], output: Sequence[int], skip: bool, held: bool = False) -> str:
    """The text of `output`: decoded after the prompt's last tokens; a trailing incomplete character is U+FFFD, or
    left out if `held` (as while more tokens may complete it)."""
    context = list(prompt[-PROMPT_CONTEXT_TOKENS:])
    while context and tok.decode(context, skip).endswith("\ufffd"):
        context.pop()
    base = tok.decode(context, skip)
    n = len(output)
    while held and n and tok.decode(context + list(output[:n]), skip).endswith("\ufffd"):
        n -= 1
    text = tok.decode(context + list(output[:n]), skip)
    assert text.startswith(base)
    return text[len(base):]


def stop_ends(text: str, stops: Sequence[str], floor: int) -> list[tuple[int, int]]:
    """(start, end) of each occurrence of a stop string in `text` that ends past offset `floor`."""
    found = []
    for s in stops:
        i = text.find(s)
        while i != -1:
            if i + len(s) > floor:
                found.append((i, i + len(s)))
            i = text.find(s, i + 1)
    return found


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_deltas_join_to_the_decoded_text_cut_at_the_first_stop_string(tok: Tokenizer, case: Case) -> None:
    params = case.params
    stream, chunks = feed(tok, case)
    sent = ""
    for c in chunks:
        sent += c.text
        assert stream.text.startswith(sent)  # nothing past the cut, ever
    assert sent == stream.text
    kept = case.output[:-1] if case.stop_token and not params.include_stop_str_in_output else case.output
    skip = params.skip_special_tokens
    whole = shown_text(tok, case.prompt, kept, skip)
    # stop strings match decoded text only: not the U+FFFD of a character still incomplete at the end
    decoded = shown_text(tok, case.prompt, kept, skip, held=True)
    floor = len(shown_text(tok, case.prompt, kept[:params.min_tokens], skip, held=True))
    last = chunks[-1]
    assert all(c.finish_reason is None and c.stop_reason is None for c in chunks[:-1])
    if isinstance(last.stop_reason, str):
        s = last.stop_reason
        assert last.finish_reason == "stop" and s in params.stop
        start = len(sent) - len(s) if params.include_stop_str_in_output else len(sent)
        assert decoded.startswith(sent) and decoded[start:].startswith(s)
        assert not [hit for hit in stop_ends(decoded, params.stop, floor) if hit[1] <= start]
    else:
        assert sent == whole
        assert not stop_ends(decoded, params.stop, floor)
        assert last.finish_reason == ("stop" if case.stop_token else "length")
        want = case.output[-1] if case.stop_token and case.output[-1] != EOS else None
        assert last.stop_reason == want


def test_included_stop_strings_hold_no_text_back(tok: Tokenizer) -> None:
    """With include_stop_str_in_output nothing said may be taken back, so each token's text streams at once (vLLM's
    stop_buffer_length is 0 then); the stop string still ends the text."""
    ids = byte_ids("abcdxyz!")
    params = SamplingParams(max_tokens=len(ids), stop=("xyz", "qq"), include_stop_str_in_output=True)
    _, chunks = feed(tok, Case([1], ids, [1] * len(ids), params, False))
    assert [c.text for c in chunks] == list("abcdxyz")
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", "xyz")


# -- end to end, through LLM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(model_factory: Callable[[str], Path]) -> Iterator[LLM]:
    engine = LLM(model_factory("tiny-llama"), mode="unified")
    yield engine
    engine.shutdown()


def test_stream_with_an_included_stop_string_sends_each_token_as_it_comes(llm: LLM) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, allowed_token_ids=[ord("a")],
                            stop=["xyz"], include_stop_str_in_output=True)
    assert [c.text for c in llm.stream("Hi", params)] == ["a"] * 4

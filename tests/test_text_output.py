"""The text output path against vLLM's: token deltas to text deltas (`OutputStream`), and what the OpenAI API
makes of them (stop strings and `stop_reason`, `min_tokens`, streamed vs whole, special tokens)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.config import EngineConfig, SchedulerConfig
from actors.engine.frontend import AsyncLLM, OutputStream, StreamChunk, Tokenizer
from actors.request import FinishReason, SamplingParams, TokenDelta

from support import openai_server

pytestmark = pytest.mark.timeout(300)

EOS = 259  # the tiny tokenizer's eos_token (<|im_end|>); generation_config.json also ends on 257
IM_START = 258  # a special token


@pytest.fixture(scope="module")
def tok(tiny_llama: Path) -> Tokenizer:
    return Tokenizer(tiny_llama)


def byte_ids(text: str) -> list[int]:
    """The tiny byte-level tokenizer's ids of `text`: one per UTF-8 byte, the byte's value."""
    return list(text.encode())


def feed(tok: Tokenizer, groups: Sequence[Sequence[int]], params: SamplingParams, prompt: Sequence[int] = (1,),
         end: FinishReason = FinishReason.LENGTH, stop_token: bool = False) -> list[StreamChunk]:
    """Feed one delta per group of token ids, the last finishing with `end` (its last token the stop token if
    `stop_token`), until the stream is done."""
    stream = OutputStream("r", list(prompt), params, tok)
    chunks = []
    for k, ids in enumerate(groups):
        last = k == len(groups) - 1
        chunk, _ = stream.process(TokenDelta("r", tuple(ids), end if last else None,
                                             ends_with_stop_token=last and stop_token))
        chunks.append(chunk)
        if stream.done:
            break
    assert stream.done
    return chunks


def text_of(chunks: Sequence[StreamChunk]) -> str:
    return "".join(c.text for c in chunks)


# -- min_tokens: no stop string in the first min_tokens tokens' text (vLLM's stop_check_offset) ---------------


@pytest.mark.parametrize("grouping", ["one token a delta", "one delta"])
def test_a_stop_string_within_the_min_tokens_text_is_not_matched_later(tok: Tokenizer, grouping: str) -> None:
    """min_tokens=2 protects "ba": a shorter stop string ("a") in it must not match once the third token comes
    (it did: the search window was sized for the longest stop string, so it reached back into that text)."""
    ids = byte_ids("bacdef")
    groups = [[t] for t in ids] if grouping == "one token a delta" else [ids[:3], ids[3:]]
    params = SamplingParams(max_tokens=6, min_tokens=2, stop=("a", "xyz"))
    chunks = feed(tok, groups, params)
    assert text_of(chunks) == "bacdef" and chunks[-1].finish_reason == "length"
    # past min_tokens the same stop string still ends the request
    chunks = feed(tok, [[t] for t in byte_ids("bacda")], replace(params, max_tokens=8))
    assert text_of(chunks) == "bacd" and chunks[-1].finish_reason == "stop"


# -- the first output tokens are decoded after the prompt (vLLM's initial detokenization offset) -------------


@pytest.fixture(scope="module")
def metaspace_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A SentencePiece-style (Metaspace) tokenizer, as Llama 2's and Mistral's: a word's leading space is its
    token's "▁", dropped by decode at the start of a text."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", ".", "▁Hello"]
    raw = RawTokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    raw.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    out = tmp_path_factory.mktemp("metaspace")
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out))
    return Tokenizer(out)


def test_the_first_output_token_keeps_its_leading_space(metaspace_tokenizer: Tokenizer) -> None:
    """"The capital of France is" -> " Paris.": the output's text is decode(prompt + output) past the prompt's,
    as vLLM gives it (it decodes the output after the prompt's last tokens), streamed and whole alike."""
    tok = metaspace_tokenizer
    prompt = tok.encode("The capital of France is")
    out = [tok.hf.convert_tokens_to_ids(t) for t in ("▁Paris", ".")]
    want = tok.decode(prompt + out)[len(tok.decode(prompt)):]
    assert want == " Paris."
    for groups in ([[t] for t in out], [out]):
        assert text_of(feed(tok, groups, SamplingParams(), prompt=prompt)) == want


def test_a_prompt_that_ends_in_a_partial_character_does_not_break_the_output(tok: Tokenizer) -> None:
    prompt = byte_ids("Hi ") + byte_ids("é")[:1]  # token-id prompts may end mid-character
    chunks = feed(tok, [[t] for t in byte_ids("ab€c")], SamplingParams(), prompt=prompt)
    assert [c.text for c in chunks] == ["a", "b", "", "", "€", "c"]


# -- stop_reason (vLLM's field): the matched stop string, the stop token id, None for EOS and length ---------


@pytest.mark.parametrize(("params", "ids", "end", "stop_token", "text", "reason"), [
    (SamplingParams(stop=("o w", "zz")), byte_ids("hello world"), FinishReason.LENGTH, False, "hell", "o w"),
    (SamplingParams(stop=("o w",), include_stop_str_in_output=True), byte_ids("hello world"), FinishReason.LENGTH,
     False, "hello w", "o w"),
    (SamplingParams(stop_token_ids=(ord("!"),)), byte_ids("hi!"), FinishReason.STOP, True, "hi", ord("!")),
    (SamplingParams(), byte_ids("hi") + [EOS], FinishReason.STOP, True, "hi", None),
    (SamplingParams(), byte_ids("hi") + [257], FinishReason.STOP, True, "hi", 257),  # generation_config's 2nd EOS
    (SamplingParams(ignore_eos=True, stop_token_ids=(EOS,)), byte_ids("hi") + [EOS], FinishReason.STOP, True, "hi",
     EOS),
    (SamplingParams(), byte_ids("hi"), FinishReason.LENGTH, False, "hi", None),
], ids=["stop-string", "stop-string-included", "stop-token-id", "eos", "second-eos", "eos-as-stop-token-id",
        "length"])
def test_stop_reason(tok: Tokenizer, params: SamplingParams, ids: list[int], end: FinishReason, stop_token: bool,
                     text: str, reason: str | int | None) -> None:
    chunks = feed(tok, [[t] for t in ids], params, end=end, stop_token=stop_token)
    assert text_of(chunks) == text
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == (end.value if stop_token or not params.stop
                                                                  else "stop", reason)
    assert all(c.stop_reason is None for c in chunks[:-1])


# -- what was found right: chunkings, split characters, stop strings across tokens, special tokens -----------


def groupings(n: int) -> Iterator[list[int]]:
    """Sizes of consecutive deltas covering n tokens: one each, all at once, and a few mixed ones."""
    yield [1] * n
    yield [n]
    for size in (2, 3, 5):
        yield [size] * (n // size) + ([n % size] if n % size else [])


@pytest.mark.parametrize(("stops", "include"), [((), False), (("é€x",), False), (("é€x",), True),
                                                 (("x😀", "€"), False), (("€x", "€"), True), (("€xy",), False)])
def test_any_chunking_gives_the_text_cut_before_the_first_stop_string(
        tok: Tokenizer, stops: tuple[str, ...], include: bool) -> None:
    """Multi-byte characters split across byte tokens never show a U+FFFD; a stop string that spans tokens and
    deltas cuts the text exactly (after it if included); nothing past it is ever sent; every chunking adds up to
    the same text."""
    full = "aé€x😀yé€xz"
    ids = byte_ids(full)
    cut = min((full.find(s) + (len(s) if include else 0) for s in stops if s in full), default=None)
    want = full if cut is None else full[:cut]
    params = SamplingParams(max_tokens=64, stop=stops, include_stop_str_in_output=include)
    for sizes in groupings(len(ids)):
        groups, at = [], 0
        for size in sizes:
            groups.append(ids[at:at + size])
            at += size
        chunks = feed(tok, groups, params)
        sent = ""
        for c in chunks:
            assert "\ufffd" not in c.text
            sent += c.text
            assert want.startswith(sent), (sizes, sent)  # nothing past the cut, ever
        assert sent == want, sizes
        assert chunks[-1].finish_reason == ("length" if cut is None else "stop")


# -- a request that ends on an incomplete character (vLLM matches stop strings against decoded text only) -------

PARTIAL = byte_ids("é")[:1]  # the first byte of a two-byte character: decodes to U+FFFD until the second comes


@pytest.mark.parametrize("end", [FinishReason.ABORT, FinishReason.LENGTH])
@pytest.mark.parametrize("stop", ["\ufffd", "b\ufffd"])
def test_a_stop_string_does_not_match_the_incomplete_character_a_request_ends_on(
        tok: Tokenizer, end: FinishReason, stop: str) -> None:
    """The U+FFFD that stands for the bytes of a character still incomplete when the request ends is no text a
    stop string can match: the request keeps its own finish reason (an abort reports "abort", not "stop"), with
    the incomplete character shown as U+FFFD, as the decode of its tokens has it."""
    for groups in ([[t] for t in byte_ids("ab") + PARTIAL], [byte_ids("ab") + PARTIAL]):
        chunks = feed(tok, groups, SamplingParams(max_tokens=8, stop=(stop,)), end=end)
        assert text_of(chunks) == "ab\ufffd"
        assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == (end.value, None)


def test_a_stop_string_in_the_text_held_back_before_an_incomplete_character_still_matches(tok: Tokenizer) -> None:
    """Text held back only because an incomplete character followed it is decoded text: at the end a stop string
    in it cuts the output there and ends the request with "stop"."""
    ids = byte_ids("a") + [IM_START] + PARTIAL
    chunks = feed(tok, [[t] for t in ids], SamplingParams(stop=("<|im_start|>",), skip_special_tokens=False),
                  end=FinishReason.ABORT)
    assert text_of(chunks) == "a"
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", "<|im_start|>")


def test_an_aborted_stream_ending_on_an_incomplete_character_reports_abort(tiny_llama: Path) -> None:
    """Through the engine: a request that has only drawn the first byte of a character is aborted by its client;
    its stop string "\ufffd" must not turn the abort into a "stop"."""
    engine = AsyncLLM(EngineConfig(model=str(tiny_llama), mode="unified"))
    engine.start()
    params = SamplingParams(max_tokens=1500, ignore_eos=True, allowed_token_ids=tuple(PARTIAL), stop=("\ufffd",))

    async def abort_after_first_chunk() -> list[StreamChunk]:
        stream = engine.generate("Hi", params, request_id="partial")
        first = await anext(stream)
        assert engine.abort("partial")
        return [first] + [c async for c in stream]

    try:
        chunks = asyncio.run(abort_after_first_chunk())
    finally:
        engine.shutdown()
    last = chunks[-1]
    assert last.num_output_tokens < params.max_tokens  # the abort, not the length, ended it
    assert (last.finish_reason, last.stop_reason) == ("abort", None)
    assert text_of(chunks) == "\ufffd" * last.num_output_tokens


@pytest.mark.parametrize(("skip", "want"), [(True, "hix"), (False, "hi<|im_start|>x")])
def test_special_tokens_are_skipped_unless_asked(tok: Tokenizer, skip: bool, want: str) -> None:
    chunks = feed(tok, [[t] for t in byte_ids("hi") + [IM_START] + byte_ids("x") + [EOS]],
                  SamplingParams(skip_special_tokens=skip), end=FinishReason.STOP, stop_token=True)
    assert text_of(chunks) == want  # the EOS that ended it is not shown either way


# -- through the OpenAI API: n choices with stop strings, stop_reason, streamed and not -------------------------


@pytest.fixture(scope="module")
def api(tiny_llama: Path) -> Iterator[httpx.Client]:
    cfg = EngineConfig(model=str(tiny_llama), mode="unified", scheduler=SchedulerConfig(max_model_len=256))
    with openai_server(cfg, "tiny") as (_, url), httpx.Client(base_url=url, timeout=120) as http:
        yield http


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
    """The JSON response, or the list of a stream's chunks."""
    r = http.post(path, json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return r.json()  # type: ignore[no-any-return]
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def streamed_choices(chunks: list[dict[str, Any]], chat: bool) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for c in chunks:
        for ch in c["choices"]:
            got = out.setdefault(ch["index"], {"text": "", "finish_reason": None, "stop_reason": None})
            got["text"] += (ch["delta"].get("content") or "") if chat else ch["text"]
            if ch["finish_reason"]:
                got["finish_reason"], got["stop_reason"] = ch["finish_reason"], ch.get("stop_reason")
    return out


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_n_choices_stop_at_their_own_first_stop_string_streamed_or_not(api: httpx.Client, chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base: dict[str, Any] = ({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Once"})
    base.update(n=3, seed=5, temperature=1.0, max_tokens=24, ignore_eos=True,
                allowed_token_ids=[ord(c) for c in "abcde "])
    full = post(api, path, base)
    texts = [c["message"]["content"] if chat else c["text"] for c in full["choices"]]  # type: ignore[index]
    stops = ["ab", "a b", "ba"]
    assert any(s in t for s in stops for t in texts)
    whole = post(api, path, {**base, "stop": stops})
    streamed = streamed_choices(post(api, path, {**base, "stop": stops, "stream": True}), chat)  # type: ignore
    for i, t in enumerate(texts):
        hits = [(t.find(s), s) for s in stops if s in t]
        at, s = min(hits) if hits else (len(t), None)
        want = {"text": t[:at], "finish_reason": "stop" if hits else "length", "stop_reason": s}
        c = whole["choices"][i]  # type: ignore[index]
        got = {"text": c["message"]["content"] if chat else c["text"], "finish_reason": c["finish_reason"],
               "stop_reason": c.get("stop_reason", "missing")}
        assert got == want, i
        assert streamed[i] == want, i


def test_stop_reason_of_a_stop_token_eos_and_length(api: httpx.Client) -> None:
    base: dict[str, Any] = {"prompt": "Hi", "max_tokens": 3, "temperature": 0}
    for body, finish, reason in (
            ({"ignore_eos": True, "stop_token_ids": [7], "logit_bias": {"7": 100}}, "stop", 7),
            ({"logit_bias": {str(EOS): 100}}, "stop", None),
            ({"ignore_eos": True}, "length", None)):
        for stream in (False, True):
            got = post(api, "/v1/completions", {**base, **body, "stream": stream})
            choice = (streamed_choices(got, False)[0] if stream  # type: ignore[arg-type]
                      else got["choices"][0])  # type: ignore[index]
            assert (choice["finish_reason"], choice.get("stop_reason", "missing")) == (finish, reason), (body, stream)


def test_echo_logprobs_offsets_follow_the_text_streamed_or_not(api: httpx.Client) -> None:
    body: dict[str, Any] = {"prompt": "Say it", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "echo": True,
                            "logprobs": 1, "stop": ["zz"]}
    whole = post(api, "/v1/completions", body)["choices"][0]  # type: ignore[index]
    lp = whole["logprobs"]
    assert whole["text"].startswith("Say it") and "".join(lp["tokens"]) == whole["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:k])) for k in range(len(lp["tokens"]))]
    chunks = post(api, "/v1/completions", {**body, "stream": True})
    parts = [c["choices"][0] for c in chunks if c["choices"]]  # type: ignore[index]
    assert "".join(p["text"] for p in parts) == whole["text"]
    streamed = [p["logprobs"] for p in parts if p["logprobs"]]
    assert [o for s in streamed for o in s["text_offset"]] == lp["text_offset"]
    assert [t for s in streamed for t in s["tokens"]] == lp["tokens"]

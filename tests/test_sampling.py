"""Sampling and stopping: the Sampler on crafted logits, then the same rules end to end.

Semantics follow vLLM: logprobs of the raw logits; repetition penalty over prompt and
output tokens (positive logits divided, others multiplied); presence and frequency
penalties over output tokens; EOS and stop tokens masked until min_tokens; stop strings
cut the text (kept with include_stop_str_in_output); a stop token's text is not shown.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from actors.config import ModelArch, SchedulerConfig, generation_defaults
from actors.engine.frontend import LLM, CompletionOutput, OutputStream, StreamChunk, Tokenizer
from actors.request import FinishReason, Request, SamplingParams, TokenDelta
from actors.runner.sampler import Sampler

from support import wait_until

EOS = (257, 259)

pytestmark = pytest.mark.timeout(120)


def request(params: SamplingParams, prompt: Sequence[int] = (1, 2), output: Sequence[int] = ()) -> Request:
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    req = Request("r", [*prompt, *output], len(prompt), params, eos_token_ids=EOS, generator=gen)
    return req


def sample(logits: torch.Tensor, reqs: list[Request], seed: int = 0) -> list[int]:
    return Sampler(torch.device("cpu"), seed)(logits, reqs).token_ids


def draws(logits_row: list[float], params: SamplingParams, n: int = 400) -> set[int]:
    """Tokens drawn over n rows of the same logits (the sampler's own generator)."""
    logits = torch.tensor([logits_row] * n)
    return set(sample(logits, [request(params) for _ in range(n)]))


def probs_logits(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


# -- Sampler on crafted logits -------------------------------------------------------------


def test_greedy_rows_take_the_argmax_even_in_a_mixed_batch() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3)] * 3
    got = sample(logits, [request(p) for p in params])
    argmax = logits.argmax(dim=-1).tolist()
    assert [g for g, p in zip(got, params) if p.greedy] == [a for a, p in zip(argmax, params) if p.greedy]
    assert sample(logits, [request(SamplingParams(temperature=0.0)) for _ in range(6)]) == argmax


def test_seeded_rows_do_not_depend_on_batch_position_or_sampler_seed() -> None:
    logits = torch.zeros(1, 64)  # uniform: every token equally likely
    seeded = SamplingParams(temperature=1.0, seed=7)
    other = SamplingParams(temperature=1.0)

    def seeded_tokens(position: int, sampler_seed: int) -> list[int]:
        req = request(seeded)
        out = []
        for _ in range(12):
            batch = [request(other) for _ in range(3)]
            batch.insert(position, req)
            out.append(sample(logits.expand(4, -1), batch, sampler_seed)[position])
        return out

    first = seeded_tokens(0, sampler_seed=0)
    assert seeded_tokens(3, sampler_seed=99) == first
    req8 = request(SamplingParams(temperature=1.0, seed=8))
    assert [sample(logits, [req8])[0] for _ in range(12)] != first


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(8, 200, generator=torch.Generator().manual_seed(2))
    argmax = logits.argmax(dim=-1).tolist()
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        assert sample(logits, [request(params) for _ in range(8)]) == argmax


def test_top_k_top_p_min_p_bound_the_support() -> None:
    row = probs_logits([0.4, 0.3, 0.2, 0.1])
    assert draws(row, SamplingParams()) == {0, 1, 2, 3}
    assert draws(row, SamplingParams(top_k=2)) == {0, 1}
    assert draws(row, SamplingParams(top_p=0.5)) == {0, 1}  # 0.4 < 0.5, so the next token is kept too
    assert draws(row, SamplingParams(top_p=0.75)) == {0, 1, 2}
    assert draws(row, SamplingParams(min_p=0.6)) == {0, 1}  # p >= 0.6 * 0.4
    assert draws(row, SamplingParams(min_p=0.8)) == {0}


def test_low_temperature_sharpens() -> None:
    row = probs_logits([0.4, 0.3, 0.2, 0.1])
    assert draws(row, SamplingParams(temperature=0.01)) == {0}


def test_penalties_change_logits_as_vllm_defines() -> None:
    vocab = 8
    raw = torch.tensor([[1.0, 2.0, -1.0, 3.0, -2.0, 0.5, 0.0, 1.5]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    req = request(params, prompt=[1, 4], output=[2, 3, 3])
    got = Sampler(torch.device("cpu"))._apply_penalties(raw.clone(), [req])[0]
    expected = raw[0].clone()
    for t in (1, 2, 3, 4):  # prompt and output tokens: positive / 2, negative * 2
        expected[t] = expected[t] / 2 if expected[t] > 0 else expected[t] * 2
    counts = torch.bincount(torch.tensor([2, 3, 3]), minlength=vocab).float()
    expected -= 0.25 * counts + 0.5 * (counts > 0).float()  # output tokens only
    torch.testing.assert_close(got, expected)


def test_penalties_steer_the_greedy_choice() -> None:
    raw = torch.tensor([[0.0, 2.0, 1.5, 0.0]])
    greedy = dict(temperature=0.0)
    assert sample(raw, [request(SamplingParams(**greedy), prompt=[1])]) == [1]
    assert sample(raw, [request(SamplingParams(repetition_penalty=2.0, **greedy), prompt=[1])]) == [2]
    assert sample(raw, [request(SamplingParams(presence_penalty=1.0, **greedy), prompt=[1])]) == [1]
    assert sample(raw, [request(SamplingParams(presence_penalty=1.0, **greedy), prompt=[0], output=[1])]) == [2]
    assert sample(raw, [request(SamplingParams(frequency_penalty=0.3, **greedy), prompt=[0], output=[1])]) == [1]
    assert sample(raw, [request(SamplingParams(frequency_penalty=0.3, **greedy), prompt=[0], output=[1, 1])]) == [2]


def test_logit_bias_is_added_before_greedy_and_random_picks() -> None:
    raw = torch.tensor([[0.0, 2.0, 1.5, 0.0], [3.0, 0.0, 0.0, 0.0]])
    plain, banned = SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logit_bias={1: -100.0})
    assert sample(raw, [request(banned), request(plain)]) == [2, 0]
    assert sample(raw, [request(SamplingParams(temperature=0.0, logit_bias={3: 1.9, 1: -0.2}))] * 2) == [3, 0]
    assert draws([0.0, 0.0, 0.0, 0.0], SamplingParams(temperature=1.0, logit_bias={0: -100, 2: -100})) == {1, 3}
    bf16 = raw.to(torch.bfloat16)
    assert sample(bf16, [request(banned), request(SamplingParams(temperature=0.0, logit_bias={2: 100}))]) == [2, 2]


def test_allowed_token_ids_restrict_only_their_own_rows() -> None:
    raw = torch.tensor([[0.0, 2.0, 1.5, 0.5], [0.0, 2.0, 1.5, 0.5]])
    only = SamplingParams(temperature=0.0, allowed_token_ids=[0, 3])
    assert sample(raw, [request(only), request(SamplingParams(temperature=0.0))]) == [3, 1]
    assert draws([0.0, 5.0, 5.0, 0.0], SamplingParams(temperature=1.0, allowed_token_ids=(0, 2))) == {0, 2}
    with pytest.raises(ValueError, match="allowed_token_ids must be a non-empty list"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match=re.escape("allowed_token_ids token ids must be in [0, 4), got 4")):
        SamplingParams(allowed_token_ids=[1, 4]).check_vocab(4)


@pytest.mark.parametrize("bias,message", [
    ({-1: 1.0}, "logit_bias keys must be token ids"),
    ({"7": 1.0}, "logit_bias keys must be token ids"),
    ({7: 100.5}, "logit_bias values must be in [-100, 100]"),
    ({7: math.nan}, "logit_bias values must be in [-100, 100]"),
    (((7, 1.0), (7, 2.0)), "logit_bias names a token id twice"),
])
def test_logit_bias_is_validated(bias: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(logit_bias=bias)  # type: ignore[arg-type]
    assert SamplingParams(logit_bias={9: 1.0, 2: -1}).logit_bias == ((2, -1), (9, 1.0))
    with pytest.raises(ValueError, match=re.escape("logit_bias token ids must be in [0, 9), got 9")):
        SamplingParams(logit_bias={9: 1.0}).check_vocab(9)


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    raw = torch.full((1, 300), -5.0)
    raw[0, 259], raw[0, 42], raw[0, 7] = 10.0, 9.0, 1.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(42,))
    assert sample(raw, [request(params, output=[5, 6])]) == [7]
    assert sample(raw, [request(params, output=[5, 6, 7])]) == [259]


def test_logprobs_are_raw_log_softmax_with_sorted_top_n() -> None:
    raw = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    reqs = [request(SamplingParams(temperature=0.0, logprobs=n, repetition_penalty=1.5), output=[9]) for n in (0, 3, 5)]
    result = Sampler(torch.device("cpu"))(raw, reqs)
    expected = torch.log_softmax(raw, dim=-1)
    for i, (lp, n) in enumerate(zip(result.logprobs, (0, 3, 5))):
        assert lp is not None and lp.token_id == result.token_ids[i]
        assert lp.logprob == pytest.approx(expected[i, lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == n
        assert [t for t, _ in lp.top] == expected[i].topk(n).indices.tolist()
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert Sampler(torch.device("cpu"))(raw, [request(SamplingParams())] * 3).logprobs == [None] * 3


# -- OutputStream: token deltas to text, on crafted byte tokens --------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Tokenizer:
    return Tokenizer(tiny_llama)


def byte_ids(text: str) -> list[int]:
    """Our byte-level tokenizer's id of each UTF-8 byte is the byte's value."""
    return list(text.encode())


def stream_text(tokenizer: Tokenizer, ids: list[int], params: SamplingParams,
                end: FinishReason = FinishReason.LENGTH) -> tuple[list[StreamChunk], bool]:
    """Feed ids one delta each (the last one finishing with `end`, as a stop token if that is STOP) until the stream
    is done."""
    stream = OutputStream("r", [1], params, tokenizer)
    chunks, stopped = [], False
    for i, t in enumerate(ids):
        reason = end if i == len(ids) - 1 else None
        chunk, stopped = stream.process(TokenDelta("r", (t,), reason, ends_with_stop_token=reason == FinishReason.STOP))
        chunks.append(chunk)
        if stream.done:
            break
    assert stream.done
    assert "".join(c.text for c in chunks) == stream.text
    return chunks, stopped


def joined(chunks: list[StreamChunk]) -> str:
    return "".join(c.text for c in chunks)


@pytest.mark.parametrize(("stops", "include", "text", "num_tokens"), [
    (["wor"], False, "Hello ", 9),
    (["wor"], True, "Hello wor", 9),
    (["Bye", "o w"], False, "Hell", 7),  # the earliest match wins
    (["ld. B"], True, "Hello world. B", 14),
    (["absent"], False, "Hello world. Bye", 16),
])
def test_stop_strings_cut_the_streamed_text(
    tokenizer: Tokenizer, stops: list[str], include: bool, text: str, num_tokens: int
) -> None:
    params = SamplingParams(max_tokens=64, stop=stops, include_stop_str_in_output=include)
    chunks, stopped = stream_text(tokenizer, byte_ids("Hello world. Bye"), params)
    assert joined(chunks) == text
    assert sum(len(c.token_ids) for c in chunks) == num_tokens
    assert chunks[-1].finish_reason == ("length" if stops == ["absent"] else "stop")
    assert stopped == (stops != ["absent"])


def test_text_that_could_start_a_stop_string_is_held_back(tokenizer: Tokenizer) -> None:
    chunks, _ = stream_text(tokenizer, byte_ids("abcabd"), SamplingParams(stop=["abx"]))
    assert [c.text for c in chunks] == ["", "", "a", "b", "c", "abd"]


def test_stop_strings_wait_for_min_tokens(tokenizer: Tokenizer) -> None:
    """The third token ("l") comes before min_tokens is passed; the fifth one stops."""
    chunks, stopped = stream_text(tokenizer, byte_ids("lalala"), SamplingParams(stop=["l"], min_tokens=3))
    assert stopped and joined(chunks) == "lala"
    assert sum(len(c.token_ids) for c in chunks) == 5


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_token_text_is_shown_only_if_asked(tokenizer: Tokenizer, include: bool) -> None:
    params = SamplingParams(stop_token_ids=(ord("!"),), include_stop_str_in_output=include)
    chunks, _ = stream_text(tokenizer, byte_ids("Hi!"), params, end=FinishReason.STOP)
    assert joined(chunks) == ("Hi!" if include else "Hi")
    assert chunks[-1].num_output_tokens == 3 and chunks[-1].token_ids == (ord("!"),)


def test_multibyte_characters_wait_for_their_last_byte(tokenizer: Tokenizer) -> None:
    chunks, _ = stream_text(tokenizer, byte_ids("né€"), SamplingParams())
    assert [c.text for c in chunks] == ["n", "", "é", "", "", "€"]


# -- end to end ---------------------------------------------------------------------------

PROMPT = "Hello"


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> Iterator[LLM]:
    engine = LLM(tiny_llama)
    yield engine
    engine.shutdown()


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 16, **kw})  # type: ignore[arg-type]


def run(llm: LLM, prompt: str, params: SamplingParams) -> CompletionOutput:
    return llm.generate([prompt], params)[0]


@pytest.fixture(scope="module")
def reference(llm: LLM) -> CompletionOutput:
    out = run(llm, PROMPT, greedy(max_tokens=24, ignore_eos=True))
    assert len(out.token_ids) == 24 and out.finish_reason == "length"
    return out


def test_engine_seeded_sampling_reproducible_across_batches(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    alone = run(llm, PROMPT, seeded).token_ids
    batched = llm.generate(["abc", "The quick brown fox", PROMPT], [other, other, seeded])[2].token_ids
    first = llm.generate([PROMPT, "xyz"], [seeded, other])[0].token_ids
    assert alone == batched == first
    other_seed = run(llm, PROMPT, SamplingParams(temperature=1.0, seed=4321, max_tokens=12, ignore_eos=True))
    assert other_seed.token_ids != alone


def test_engine_top_k_1_and_tiny_top_p_equal_greedy(llm: LLM, reference: CompletionOutput) -> None:
    for params in (SamplingParams(top_k=1, seed=5), SamplingParams(top_p=1e-6, seed=6)):
        out = run(llm, PROMPT, replace(params, max_tokens=24, ignore_eos=True))
        assert out.token_ids == reference.token_ids


def test_engine_logit_bias_steers_every_step_and_out_of_vocab_ids_are_refused(
        llm: LLM, reference: CompletionOutput) -> None:
    first = reference.token_ids[0]
    banned = run(llm, PROMPT, greedy(max_tokens=6, ignore_eos=True, logit_bias={first: -100.0}))
    assert banned.token_ids[0] != first and first not in banned.token_ids
    forced = run(llm, PROMPT, greedy(max_tokens=6, ignore_eos=True, logit_bias={7: 100.0}))
    assert forced.token_ids == [7] * 6
    with pytest.raises(ValueError, match="logit_bias token ids must be in"):
        run(llm, PROMPT, greedy(logit_bias={10**6: 1.0}))
    assert run(llm, PROMPT, greedy(max_tokens=24, ignore_eos=True)).token_ids == reference.token_ids


@pytest.mark.parametrize("mode", ["semi-pd", "unified"])
def test_prompt_logprobs_equal_each_prefix_s_next_token_logprob_across_chunks_and_the_prefix_cache(
        tiny_llama: Path, mode: str) -> None:
    """Prompt token k's logprob is the one the model gives it after tokens 0..k-1: the logprob of token k forced
    (logit_bias; logprobs are of the raw distribution) as the first output after that prefix. Chunked prefill
    (16-token chunks) scores across chunk boundaries; a prompt sent again is computed again, not served from
    the prefix cache, and scores the same."""
    prompt = list(range(40, 77))
    with LLM(tiny_llama, mode=mode, scheduler=SchedulerConfig(max_prefill_tokens=16)) as engine:
        scored = engine.generate([prompt], greedy(max_tokens=2, ignore_eos=True, prompt_logprobs=3))[0]
        again = engine.generate([prompt], greedy(max_tokens=2, ignore_eos=True, prompt_logprobs=3))[0]
        forced = engine.generate([prompt[:k] for k in range(1, len(prompt))],
                                 [greedy(max_tokens=1, ignore_eos=True, logprobs=3, logit_bias={t: 100.0})
                                  for t in prompt[1:]])
        plain = engine.generate([prompt], greedy(max_tokens=2, ignore_eos=True))[0]
    assert [lp.token_id for lp in scored.prompt_logprobs] == prompt[1:]
    for got, want in zip(scored.prompt_logprobs, (f.logprobs[0] for f in forced)):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
        assert got.rank == 1 + sum(1 for _, v in want.top if v > want.logprob + 1e-4) or got.rank > 3
    assert again.num_cached_tokens == 0 and again.prompt_logprobs == scored.prompt_logprobs
    assert scored.token_ids == again.token_ids == plain.token_ids and plain.prompt_logprobs == []
    assert plain.num_cached_tokens > 0  # the cache held the prompt: the scoring requests did not use it


def test_max_tokens_finishes_with_length(llm: LLM, reference: CompletionOutput) -> None:
    out = run(llm, PROMPT, greedy(max_tokens=5, ignore_eos=True))
    assert (out.token_ids, out.finish_reason) == (reference.token_ids[:5], "length")


@pytest.fixture(scope="module")
def eos_first_llm(
    tiny_llama: Path, reference: CompletionOutput, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LLM]:
    """The same weights, with EOS declared to be the first token greedy decoding picks for PROMPT."""
    model_dir = tmp_path_factory.mktemp("eos-first")
    for f in tiny_llama.iterdir():
        (model_dir / f.name).symlink_to(f)
    config = json.loads((tiny_llama / "config.json").read_text())
    config["eos_token_id"] = [reference.token_ids[0]]
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").write_text(json.dumps(config))
    engine = LLM(model_dir)
    yield engine
    engine.shutdown()


def test_eos_stops_unless_ignored_or_before_min_tokens(eos_first_llm: LLM, reference: CompletionOutput) -> None:
    eos = reference.token_ids[0]
    stopped = run(eos_first_llm, PROMPT, greedy())
    assert (stopped.token_ids, stopped.finish_reason, stopped.text) == ([eos], "stop", "")
    ignored = run(eos_first_llm, PROMPT, greedy(max_tokens=6, ignore_eos=True))
    assert (ignored.token_ids, ignored.finish_reason) == (reference.token_ids[:6], "length")
    held = run(eos_first_llm, PROMPT, greedy(max_tokens=8, min_tokens=4))
    assert len(held.token_ids) >= 4
    assert eos not in held.token_ids[:4]
    assert held.finish_reason == ("stop" if eos in held.token_ids else "length")


def test_generation_config_eos_ids_stop_too(tiny_llama: Path, reference: CompletionOutput, tmp_path: Path) -> None:
    """generation_config.json's EOS ids join config.json's (as vLLM stops on both); its recommended sampling
    parameters are read for the front ends (`generation_defaults`)."""
    for f in tiny_llama.iterdir():
        (tmp_path / f.name).symlink_to(f)
    eos = reference.token_ids[0]
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [EOS[0], eos], "temperature": 0.6, "top_p": 0.9, "do_sample": True, "top_k": "x"}))
    assert ModelArch.from_dir(tmp_path).eos_token_ids == tuple(dict.fromkeys((*ModelArch.from_dir(tiny_llama)
                                                                               .eos_token_ids, EOS[0], eos)))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9}  # bools and strings left out
    with LLM(tmp_path) as engine:
        out = run(engine, PROMPT, greedy())
        assert engine.default_params == SamplingParams(temperature=0.6, top_p=0.9)  # a call without parameters
    assert (out.token_ids, out.finish_reason) == ([eos], "stop")


def test_stop_token_ids_end_generation_without_their_text(llm: LLM, reference: CompletionOutput) -> None:
    ids = reference.token_ids
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    out = run(llm, PROMPT, greedy(max_tokens=24, ignore_eos=True, stop_token_ids=[ids[k]]))
    assert (out.token_ids, out.finish_reason) == (ids[: k + 1], "stop")
    assert out.text == run(llm, PROMPT, greedy(max_tokens=k, ignore_eos=True)).text
    kept = run(llm, PROMPT, greedy(max_tokens=24, ignore_eos=True, stop_token_ids=[ids[k]],
                                   include_stop_str_in_output=True))
    assert kept.text == run(llm, PROMPT, greedy(max_tokens=k + 1, ignore_eos=True)).text


@pytest.mark.parametrize("include", [False, True])
def test_engine_stop_string_ends_generation(llm: LLM, reference: CompletionOutput, include: bool) -> None:
    text = reference.text
    i = next(i for i in range(len(text) // 2, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[i : i + 2]
    cut = text.index(stop)
    out = run(llm, PROMPT, greedy(max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=include))
    assert out.finish_reason == "stop"
    assert out.text == text[: cut + len(stop) if include else cut]
    n = len(out.token_ids)
    assert n >= 2 and out.token_ids == reference.token_ids[:n]
    assert stop not in run(llm, PROMPT, greedy(max_tokens=n - 1, ignore_eos=True)).text, "generation ran past the stop"
    wait_until(lambda: llm.core.num_unfinished == 0, timeout=10.0,
               what="the stop string to abort the request in the core")
    assert llm.core.allocator.num_free == llm.core.allocator.num_blocks


def test_engine_logprobs_match_the_model(llm: LLM, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = run(llm, PROMPT, greedy(max_tokens=6, ignore_eos=True, logprobs=4))
    assert len(out.logprobs) == 6
    prompt_ids = llm.tokenizer.encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + out.token_ids])).logits[0, len(prompt_ids) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(expected[i, lp.token_id].item(), abs=1e-4)
        assert lp.logprob == pytest.approx(lp.top[0][1], abs=1e-6)  # greedy: the chosen token is the top one
        assert [t for t, _ in lp.top] == expected[i].topk(4).indices.tolist()

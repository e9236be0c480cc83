"""Structured outputs (vLLM's `structured_outputs`): the output matches the request's JSON schema, regex, choice or
grammar, in both engine modes, beside unconstrained requests (whose tokens it must not change), under preemption,
and across a disaggregated pair."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import torch

from actors.config import CacheConfig, SchedulerConfig
from actors.disagg.frontend import DisaggLLM
from actors.engine.frontend import LLM, CompletionOutput
from actors.request import SamplingParams, SamplingParamsError
from actors.request import StructuredOutputsParams as Structured
from actors.structured import mask_logits

pytestmark = pytest.mark.timeout(120)

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["color", "ok", "n"], "additionalProperties": False}
REGEX = r"[a-c]{2,5}-[0-9]{2}"
CHOICES = ["yes", "no way", 'quote " and \\ slash']
GRAMMAR = 'start: "x" ("y" | "z")+ "!"'  # Lark
GBNF = 'root ::= "<" [0-9]+ ">"'
PROMPTS = ["Tell me", "Once upon a time", "hello hello", "q", "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z"]


def spec_checks() -> list[tuple[Structured, object]]:
    """Each kind of spec, with how to check an output that ended because the grammar did."""
    return [
        (Structured(json=SCHEMA, disable_any_whitespace=True), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        (Structured(regex=REGEX), lambda t: re.fullmatch(REGEX, t) or pytest.fail(f"{t!r} !~ {REGEX}")),
        (Structured(choice=CHOICES), lambda t: t in CHOICES or pytest.fail(f"{t!r} not a choice")),
        (Structured(grammar=GRAMMAR), lambda t: re.fullmatch(r"x[yz]+!", t) or pytest.fail(repr(t))),
        (Structured(grammar=GBNF), lambda t: re.fullmatch(r"<[0-9]+>", t) or pytest.fail(repr(t))),
        (Structured(json_object=True, disable_any_whitespace=True),
         lambda t: isinstance(json.loads(t), dict) or pytest.fail(repr(t))),
    ]


def check_output(out: CompletionOutput, check: object, max_tokens: int) -> None:
    assert out.finish_reason in ("stop", "length"), out
    if out.finish_reason == "length":  # only a grammar long enough to need more than max_tokens may end so
        assert len(out.token_ids) == max_tokens
        return
    check(out.text)  # type: ignore[operator]


@pytest.fixture(scope="module", params=["semi-pd", "unified"])
def llm(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[LLM]:
    engine = LLM(tiny_llama, mode=request.param, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=64))
    yield engine
    engine.shutdown()


def test_each_kind_of_spec_is_obeyed_greedy_and_sampled(llm: LLM) -> None:
    specs = spec_checks()
    params = [SamplingParams(max_tokens=96, temperature=t, seed=s, structured_outputs=spec)
              for spec, _ in specs for t, s in ((0.0, None), (1.0, 7), (1.0, 8))]
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params)
    for k, out in enumerate(outs):
        check_output(out, specs[k // 3][1], 96)
    assert all(o.finish_reason == "stop" for o in outs[:9])  # the schema, regex and choice cannot run long
    first = json.loads(outs[0].text)
    assert list(first) == ["color", "ok", "n"]  # in the schema's order
    choice_out = outs[6]
    assert choice_out.token_ids and llm.tokenizer.decode(choice_out.token_ids) == choice_out.text  # last token shown


def test_constrained_requests_do_not_change_their_neighbours_tokens(llm: LLM) -> None:
    """Greedy plain requests batched with constrained ones give the tokens they give alone; a constrained request's
    tokens do not depend on its batch either (overlapped decode of the plain ones goes on around it)."""
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    shaped = SamplingParams(max_tokens=64, temperature=0.0, structured_outputs=Structured(regex=REGEX))
    alone_plain = [o.token_ids for o in llm.generate(PROMPTS, plain)]
    alone_shaped = [o.token_ids for o in llm.generate(PROMPTS, shaped)]
    mixed = llm.generate(PROMPTS * 2, [plain] * len(PROMPTS) + [shaped] * len(PROMPTS))
    assert [o.token_ids for o in mixed[: len(PROMPTS)]] == alone_plain
    assert [o.token_ids for o in mixed[len(PROMPTS):]] == alone_shaped
    assert all(re.fullmatch(REGEX, o.text) for o in mixed[len(PROMPTS):])


@pytest.mark.parametrize("mode", ["semi-pd", "unified"])
def test_constrained_batches_keep_overlapped_decode(tiny_llama: Path, mode: str) -> None:
    """Decode steps that hold grammars are still queued ahead, their draws waiting for the step before's tokens
    (the masks need them): the tokens equal those of one step at a time, sampled ones included."""
    specs = spec_checks()
    params = [SamplingParams(max_tokens=40, temperature=t, seed=i, structured_outputs=specs[i % len(specs)][0])
              for i, t in enumerate([0.0, 1.0] * 6)] + [SamplingParams(max_tokens=40, temperature=0.0)] * 3
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    runs = {}
    for overlap in (False, True):
        engine = LLM(tiny_llama, mode=mode, device="cpu", overlap_decode=overlap)
        try:
            outs = engine.generate(prompts, params)
            ahead = sum(w.steps_queued_ahead for w in engine.core.workers if w.name != "prefill")
        finally:
            engine.shutdown()
        assert (ahead > 0) == overlap, ahead
        runs[overlap] = [(o.token_ids, o.finish_reason) for o in outs]
        for out, p in zip(outs, params):
            if p.structured_outputs is not None:
                check_output(out, dict(specs)[p.structured_outputs], 40)
    assert runs[True] == runs[False]


def test_the_grammar_ends_the_output_whatever_min_tokens_and_ignore_eos_say(llm: LLM) -> None:
    params = SamplingParams(max_tokens=64, min_tokens=40, ignore_eos=True, temperature=0.0,
                            structured_outputs=Structured(choice=["yes", "no"]))
    out = llm.generate(["Is it?"], params)[0]
    assert out.finish_reason == "stop" and out.text in ("yes", "no") and len(out.token_ids) < 40


def test_a_grammar_with_start_after_holds_only_once_the_output_had_those_tokens(llm: LLM) -> None:
    """The output runs free until it has had `start_after` (here the two tokens greedy decoding writes first, as a
    reasoning model writes `</think>`), then matches the grammar; a request beside it that never writes them stays
    free to its length."""
    free = llm.generate(["Tell me"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].token_ids
    trigger = tuple(free[:2])
    gated = [SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True,
                            structured_outputs=Structured(regex=REGEX, start_after=after)) for after in (trigger, (9999,))]
    shaped, never = llm.generate(["Tell me", "Tell me"], gated)
    assert shaped.token_ids[:2] == list(trigger) and shaped.finish_reason == "stop"
    assert re.fullmatch(REGEX, llm.tokenizer.decode(shaped.token_ids[2:]))
    assert never.token_ids[:8] == free and never.finish_reason == "length"


def test_an_invalid_spec_is_refused_and_the_engine_serves_on(llm: LLM) -> None:
    for spec, message in [(Structured(regex="[a-"), "unclosed character class"),
                          (Structured(json={"type": "objectx"}), "objectx"),
                          (Structured(grammar="start: undefined_rule"), "undefined_rule")]:
        with pytest.raises(SamplingParamsError, match=message):
            llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=spec))
    assert llm.core.num_unfinished == 0
    out = llm.generate(["x"], SamplingParams(max_tokens=32, temperature=0.0, structured_outputs=Structured(regex="ab")))
    assert out[0].text == "ab" and out[0].finish_reason == "stop"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["b"]}, "got regex, choice"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": "[1, 2]"}, "must be a JSON schema"),
    ({"choice": []}, "non-empty list"),
    ({"regex": ""}, "non-empty string"),
])
def test_malformed_specs_are_refused_on_construction(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SamplingParamsError, match=message):
        Structured(**kwargs)  # type: ignore[arg-type]


def test_sampling_params_take_a_mapping_as_vllm_s_llm_does() -> None:
    p = SamplingParams(structured_outputs={"json": {"type": "object"}, "disable_any_whitespace": True})
    assert p.structured_outputs == Structured(json='{"type": "object"}', disable_any_whitespace=True)
    with pytest.raises(SamplingParamsError, match="structured_outputs takes only"):
        SamplingParams(structured_outputs={"guided_json": {}})


def test_preempted_constrained_requests_resume_their_grammar(tiny_llama: Path) -> None:
    """A pool far too small for the load: requests are preempted and recomputed, their grammar state kept; the
    outputs equal those of a roomy pool."""
    specs = spec_checks()
    prompts = [" ".join(PROMPTS) * (1 + i % 3) for i in range(12)]
    params = [SamplingParams(max_tokens=48, temperature=0.0, structured_outputs=specs[i % len(specs)][0])
              for i in range(12)]
    results = []
    for pages in (None, 24):
        engine = LLM(tiny_llama, mode="unified", device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=64),
                     cache=CacheConfig(page_size=16, num_pages=pages))
        try:
            results.append([(o.token_ids, o.finish_reason) for o in engine.generate(prompts, params)])
            preemptions = engine.core.num_preemptions
        finally:
            engine.shutdown()
    assert preemptions > 0
    assert results[0] == results[1]


def test_a_disaggregated_pair_rebuilds_the_grammar_on_the_decode_side(tiny_llama: Path) -> None:
    specs = spec_checks()
    params = [SamplingParams(max_tokens=48, temperature=0.0, structured_outputs=spec) for spec, _ in specs]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    unified = LLM(tiny_llama, mode="unified", device="cpu")
    try:
        expected = [(o.token_ids, o.finish_reason) for o in unified.generate(prompts, params)]
    finally:
        unified.shutdown()
    pair = DisaggLLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=64),
                     prefill_cache=CacheConfig(page_size=16, num_pages=64),
                     decode_cache=CacheConfig(page_size=16, num_pages=64))
    try:
        outs = pair.generate(prompts, params)
    finally:
        pair.shutdown()
    assert [(o.token_ids, o.finish_reason) for o in outs] == expected
    for out, (_, check) in zip(outs, specs):
        check_output(out, check, 48)


def test_mask_logits_forbids_exactly_the_tokens_whose_bit_is_clear() -> None:
    rng = random.Random(0)
    vocab, rows = 77, [0, 2, 3]
    logits = torch.randn(5, vocab)
    bitmask = torch.tensor([[rng.getrandbits(32) - (1 << 31) for _ in range(3)] for _ in rows], dtype=torch.int32)
    out = mask_logits(logits, torch.tensor(rows), bitmask)
    for r in range(5):
        for t in range(vocab):
            allowed = r not in rows or (int(bitmask[rows.index(r), t // 32]) >> (t % 32)) & 1
            assert out[r, t] == (logits[r, t] if allowed else float("-inf"))

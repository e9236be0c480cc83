"""Constraints that leave no token to draw: a structured output and `allowed_token_ids` (or `min_tokens`) with an
empty intersection at some step. The request ends with finish reason "error" and a message naming the constraints,
no token taken for that step; the other requests of its batch go on untouched. Where the conflict is plain from the
parameters (every allowed token a stop token that `min_tokens` bars), the request is refused up front (HTTP 400).
Runtime conflicts reach the HTTP API as other per-request engine errors do: a 500 with the message, or an error
event in a stream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from actors.config import EngineConfig, SchedulerConfig
from actors.engine.frontend import LLM
from actors.request import Request, SamplingParams, SamplingParamsError
from actors.request import StructuredOutputsParams as Structured
from actors.runner.sampler import Sampler

from support import openai_server

pytestmark = pytest.mark.timeout(180)

MODEL = "tiny"
EOS = (257, 259)  # the tiny checkpoint's
A = ord("a")
# the first token may only be "a" (allowed) and is; the second must be x, y or z (grammar), none of them allowed
MID_CONFLICT = SamplingParams(max_tokens=8, temperature=0.0, allowed_token_ids=[A],
                              structured_outputs=Structured(regex="a[x-z]"))
FIRST_CONFLICT = SamplingParams(max_tokens=8, temperature=0.0, allowed_token_ids=[ord("x")],
                                structured_outputs=Structured(regex="[a-c]+"))
FREE = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)  # still decoding when a conflict comes
BOTH = "no token satisfies both the structured output and allowed_token_ids"

Draws = list[list[tuple[SamplingParams, int]]]


def spy_on_draws(core: Any, monkeypatch: pytest.MonkeyPatch) -> Draws:
    """Each draw of `core`'s workers, from now on: (params, output tokens so far) of each row of its batch."""
    draws: Draws = []
    for worker in core.workers:
        sampler = worker.runner.sampler
        real = sampler.draw

        def draw(logits: torch.Tensor, reqs: list[Request], real: Callable[..., Any] = real) -> Any:
            draws.append([(r.params, r.num_output_tokens) for r in reqs])
            return real(logits, reqs)

        monkeypatch.setattr(sampler, "draw", draw)
    return draws


def drew_beside(draws: Draws, params: SamplingParams, output_index: int, other: SamplingParams) -> bool:
    """Whether a draw took `params`' token `output_index` in the batch of a row of `other`."""
    return any((params, output_index) in rows and any(p == other for p, _ in rows) for rows in draws)


# -- the sampler ----------------------------------------------------------------------------------------------


def request(params: SamplingParams, output: tuple[int, ...] = ()) -> Request:
    return Request("r", [1, 2, *output], 2, params, eos_token_ids=EOS)


@pytest.mark.parametrize("greedy", [True, False])
def test_the_sampler_reports_a_row_its_masks_left_empty_and_only_that_row(greedy: bool) -> None:
    """allowed_token_ids that are all EOS under min_tokens (built past validation) leave row 1 nothing; the rows
    around it, one with the same allowed tokens past min_tokens and one asking for logprobs, draw as ever."""
    temperature = 0.0 if greedy else 1.0
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
    reqs = [request(SamplingParams(temperature=temperature, seed=1, min_tokens=1, allowed_token_ids=EOS), (5,)),
            request(SamplingParams(temperature=temperature, seed=1, min_tokens=2, allowed_token_ids=EOS), (5,)),
            request(SamplingParams(temperature=0.0, logprobs=2))]
    result = Sampler(torch.device("cpu"))(logits, reqs)
    assert result.conflicts[0] is None and result.conflicts[2] is None
    assert result.conflicts[1] == ("no token satisfies both allowed_token_ids and min_tokens (no stop token yet) "
                                   "at output token 2: the request's constraints conflict")
    assert result.token_ids[0] in EOS
    assert result.token_ids[2] == logits[2].argmax().item()
    assert result.logprobs[2] is not None and result.logprobs[2].rank == 1 and result.logprobs[1] is None


def test_unconstrained_batches_report_nothing() -> None:
    result = Sampler(torch.device("cpu"))(torch.randn(2, 50), [request(SamplingParams()), request(FREE)])
    assert result.conflicts == (None, None)


# -- the LLM class ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["semi-pd", "unified"])
def llm(tiny_llama: Path, request: pytest.FixtureRequest) -> Iterator[LLM]:
    engine = LLM(tiny_llama, mode=request.param, device="cpu")
    yield engine
    engine.shutdown()


def test_a_conflict_at_the_first_token_ends_the_request_with_an_error(llm: LLM) -> None:
    alone = llm.generate(["Tell me"], FREE)[0]
    free, conflicted = llm.generate(["Tell me", "Tell me"], [FREE, FIRST_CONFLICT])
    assert (conflicted.finish_reason, conflicted.token_ids, conflicted.text) == ("error", [], "")
    assert conflicted.error is not None and conflicted.error.startswith(BOTH) and "output token 1" in conflicted.error
    assert (free.token_ids, free.finish_reason, free.error) == (alone.token_ids, "length", None)


def test_a_conflict_mid_output_keeps_the_tokens_before_it_and_spares_its_batch(
        llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    alone = llm.generate(["Tell me"], FREE)[0]
    draws = spy_on_draws(llm.core, monkeypatch)
    free, conflicted = llm.generate(["Tell me", "Tell me"], [FREE, MID_CONFLICT])
    assert (conflicted.finish_reason, conflicted.token_ids, conflicted.text) == ("error", [A], "a")
    assert conflicted.error is not None and conflicted.error.startswith(BOTH) and "output token 2" in conflicted.error
    assert drew_beside(draws, MID_CONFLICT, 1, FREE), "the conflicting step had the other request in its batch"
    assert (free.token_ids, free.finish_reason, free.error) == (alone.token_ids, "length", None)
    assert llm.core.num_unfinished == 0
    again = llm.generate(["Tell me"], SamplingParams(max_tokens=8, temperature=0.0, allowed_token_ids=[A, ord("y")],
                                                     structured_outputs=Structured(regex="a[x-z]")))[0]
    assert (again.text, again.finish_reason) == ("ay", "stop")  # the engine serves the same grammar after it


def test_allowed_tokens_that_min_tokens_bars_are_refused_up_front(llm: LLM) -> None:
    with pytest.raises(SamplingParamsError, match="allowed_token_ids holds only EOS and stop tokens"):
        llm.generate(["x"], SamplingParams(min_tokens=1, allowed_token_ids=[EOS[0]]))
    with pytest.raises(SamplingParamsError, match="allowed_token_ids holds only EOS and stop tokens"):
        llm.generate(["x"], SamplingParams(min_tokens=1, allowed_token_ids=[EOS[1], 7], stop_token_ids=[7]))
    ok = llm.generate(["x"], SamplingParams(min_tokens=1, max_tokens=1, allowed_token_ids=[EOS[0], 7]))[0]
    assert (ok.token_ids, ok.finish_reason) == ([7], "length")  # min_tokens bars the EOS only
    ended = llm.generate(["x"], SamplingParams(max_tokens=2, allowed_token_ids=[EOS[0]]))[0]
    assert (ended.token_ids, ended.finish_reason) == ([EOS[0]], "stop")  # no min_tokens: no conflict


# -- the OpenAI HTTP server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[tuple[Any, str]]:
    cfg = EngineConfig(model=str(tiny_llama), mode="semi-pd", device="cpu",
                       scheduler=SchedulerConfig(max_model_len=512))
    with openai_server(cfg, MODEL) as (client, url):
        yield client, url


def extra(params: SamplingParams) -> dict[str, Any]:
    assert params.structured_outputs is not None and params.structured_outputs.regex is not None
    return {"allowed_token_ids": list(params.allowed_token_ids or ()),
            "structured_outputs": {"regex": params.structured_outputs.regex}}


def test_http_a_conflict_is_an_error_and_its_concurrent_request_completes(
        server: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The conflicting request comes while another one decodes (streamed: its first chunk has come): a 500 naming
    the constraints for it, the other's whole output for the other."""
    client, url = server
    draws = spy_on_draws(client.llm.core, monkeypatch)
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    free = oa.completions.create(model=MODEL, prompt="Tell me", max_tokens=FREE.max_tokens, temperature=0,
                                 stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [next(iter(free))]
    with pytest.raises(openai.InternalServerError) as caught:
        oa.completions.create(model=MODEL, prompt="Tell me", max_tokens=8, temperature=0,
                              extra_body=extra(MID_CONFLICT))
    chunks += list(free)
    assert caught.value.status_code == 500
    assert BOTH in caught.value.message and "output token 2" in caught.value.message
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == FREE.max_tokens
    assert any(any(p.allowed_token_ids == (A,) and n == 1 for p, n in rows)
               and any(p.allowed_token_ids is None for p, _ in rows) for rows in draws), \
        "the conflicting step had the other request in its batch"


def test_http_a_streamed_conflict_ends_the_stream_with_an_error_event(server: tuple[Any, str]) -> None:
    oa = openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=60)
    texts: list[str] = []
    with pytest.raises(openai.APIError, match=BOTH) as caught:
        for chunk in oa.completions.create(model=MODEL, prompt="Tell me", max_tokens=8, temperature=0, stream=True,
                                           extra_body=extra(MID_CONFLICT)):
            texts.append(chunk.choices[0].text)
    assert "".join(texts) == "a" and "output token 2" in caught.value.message


def test_http_a_conflict_plain_from_the_parameters_is_a_400(server: tuple[Any, str]) -> None:
    oa = openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="allowed_token_ids holds only EOS and stop tokens") as caught:
        oa.completions.create(model=MODEL, prompt="Tell me", max_tokens=8,
                              extra_body={"min_tokens": 2, "allowed_token_ids": [EOS[0]]})
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body.get("param") == "allowed_token_ids"

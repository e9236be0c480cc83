"""The Sampler against vLLM's sampling semantics, on crafted logits (CPU).

vLLM's order (vllm/v1/sample/sampler.py and the model runner v2 sampler): logprobs of the raw logits; allowed
tokens, bad words, min_tokens and logit bias; then penalties; greedy rows take the argmax; the others temperature,
then min-p, then top-k and top-p, then the draw. `SamplingParams` raises a temperature in (0, 0.01) to 0.01 and
reads seed -1 as no seed. Each sampled token's logprob comes with its rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from actors.request import Request, SamplingParams
from actors.runner.sampler import Sampler, _top_k_top_p

pytestmark = pytest.mark.timeout(120)

CPU = torch.device("cpu")


def request(params: SamplingParams, prompt: Sequence[int] = (1, 2), output: Sequence[int] = ()) -> Request:
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    return Request("r", [*prompt, *output], len(prompt), params, generator=gen)


def sample(logits: torch.Tensor, reqs: list[Request], seed: int = 0) -> list[int]:
    return Sampler(CPU, seed)(logits, reqs).token_ids


def draws(logits_row: list[float], params: SamplingParams, n: int = 400) -> set[int]:
    """Tokens drawn over n rows of the same logits (the sampler's own generator)."""
    return set(sample(torch.tensor([logits_row] * n), [request(params) for _ in range(n)]))


def probs_logits(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def test_logit_bias_is_added_before_the_penalties() -> None:
    """vLLM biases first, then penalizes the biased logit: (1 + 1) / 2 = 1.0 < 1.4, and (-1 + 2) / 2 = 0.5 > 0.2
    (penalizing first gives 1 / 2 + 1 = 1.5 and -1 * 2 + 2 = 0, the other token each time)."""
    rep = dict(temperature=0.0, repetition_penalty=2.0)
    assert sample(torch.tensor([[1.0, 1.4]]), [request(SamplingParams(**rep, logit_bias={0: 1.0}), prompt=[0])]) == [1]
    assert sample(torch.tensor([[-1.0, 0.2]]), [request(SamplingParams(**rep, logit_bias={0: 2.0}), prompt=[0])]) == [0]


def test_min_p_filters_before_top_p() -> None:
    """min_p 0.3 drops p < 0.12 (token 3); top_p 0.75 then runs on the rest, renormalized (4/9, 3/9, 2/9): the
    mass before token 2 is 7/9 >= 0.75, so it goes too. (top_p first, on the full distribution, keeps token 2.)"""
    row = probs_logits([0.4, 0.3, 0.2, 0.1])
    assert draws(row, SamplingParams(min_p=0.3, top_p=0.75)) == {0, 1}
    assert draws(row, SamplingParams(min_p=0.3)) == {0, 1, 2}
    assert draws(row, SamplingParams(top_p=0.75)) == {0, 1, 2}


def test_top_p_of_one_filters_nothing_whatever_the_batch() -> None:
    """A row with top_p 1 keeps its whole support when a batch partner asks for top-p (batch invariance): here the
    tail's mass (3 * 2e-9) is below fp32's resolution at 1, so the cumulative mass before it rounds to 1."""
    row = [0.0, -20.0, -20.0, -20.0]
    alone = _top_k_top_p(torch.tensor([row]), [request(SamplingParams())])  # [1, 4]
    batched = _top_k_top_p(torch.tensor([row, row]),
                           [request(SamplingParams()), request(SamplingParams(top_p=0.5))])  # [2, 4]
    assert torch.equal(alone[0], torch.tensor(row))
    assert torch.equal(batched[0], torch.tensor(row))
    assert batched[1].isinf().tolist() == [False, True, True, True]


@pytest.mark.parametrize("temperature", [1e-5, 1e-40, 1e-300])
def test_tiny_temperature_is_raised_to_a_hundredth(temperature: float) -> None:
    """vLLM raises a temperature in (0, 0.01) to 0.01 (smaller ones overflow: 2 / 1e-40 is inf in fp32, and the
    softmax of inf is NaN, whose argmax is token 0)."""
    params = SamplingParams(temperature=temperature)
    logits = torch.tensor([[0.5, 2.0, 1.0, -1.0, 0.0, float("-inf")]])
    assert {sample(logits, [request(params)], seed=s)[0] for s in range(20)} == {1}
    assert params.temperature == 0.01 and not params.greedy
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=0.01).temperature == 0.01


def test_seed_minus_one_means_no_seed() -> None:
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=0).seed == 0 and SamplingParams(seed=-2).seed == -2


def test_sampled_token_logprob_comes_with_its_rank() -> None:
    """The chosen token's rank in the raw distribution: 1 + how many tokens are more likely (tokens tied with it
    do not count), whatever picked it (greedy, bias, allowed tokens, a draw)."""
    raw = torch.tensor([[3.0, 1.0, 2.0, 1.0, 0.0]] * 4)
    reqs = [request(SamplingParams(temperature=0.0, logprobs=1)),
            request(SamplingParams(temperature=0.0, logprobs=0, logit_bias={3: 5.0})),
            request(SamplingParams(temperature=1.0, logprobs=2, allowed_token_ids=[4])),
            request(SamplingParams(temperature=1.0, logprobs=2, seed=3, allowed_token_ids=[2]))]
    result = Sampler(CPU)(raw, reqs)
    assert result.token_ids == [0, 3, 4, 2]
    expected = torch.log_softmax(raw[0], dim=-1)
    for lp, rank in zip(result.logprobs, [1, 3, 5, 2]):
        assert lp is not None and lp.rank == rank
        assert lp.logprob == pytest.approx(expected[lp.token_id].item(), abs=1e-6)


def test_seeded_row_does_not_depend_on_its_partners_filters() -> None:
    """A seeded row draws the same tokens alone and among rows with top-k, top-p, min-p, penalties, logit bias and
    greedy picks (which send the whole batch through the filters' code)."""
    logits = torch.randn(5, 97, generator=torch.Generator().manual_seed(11)) * 3  # [5, V]
    seeded = SamplingParams(temperature=0.8, seed=42)
    partners = [SamplingParams(top_k=3, top_p=0.6), SamplingParams(min_p=0.2, repetition_penalty=1.3),
                SamplingParams(temperature=0.0, logit_bias={5: 2.0}), SamplingParams(frequency_penalty=1.0)]

    def tokens(batched: bool) -> list[int]:
        req, out = request(seeded), []
        for _ in range(10):
            if batched:
                out.append(sample(logits, [request(partners[0]), request(partners[1]), req, request(partners[2]),
                                           request(partners[3], output=[1, 1])], seed=9)[2])
            else:
                out.append(sample(logits[2:3], [req])[0])
        return out

    assert tokens(batched=True) == tokens(batched=False)

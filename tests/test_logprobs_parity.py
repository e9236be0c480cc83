"""Logprobs as vLLM's OpenAI server returns them, checked against transformers on the same tiny checkpoint.

The engine's numbers (sampled tokens' and prompt tokens' logprobs, ranks, top tokens) are those of the raw
model output, whatever sampled the token; the HTTP API shapes them as vLLM does: completions `logprobs` (and
`echo`, lm-eval-harness's loglikelihood request), chat `logprobs` + `top_logprobs`, `prompt_logprobs`, streamed
and whole, with n > 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from actors.config import EngineConfig, SchedulerConfig
from actors.engine.frontend import LLM, Tokenizer
from actors.request import SamplingParams

from support import openai_server, sse_events

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny"
PROMPTS = [[72, 101, 108, 108, 111, 32, 119, 200, 201, 111, 114, 108, 100],
           [84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110, 32, 102, 111, 120, 33]]
ABS = 1e-4  # fp32 noise between our kernels and transformers'


def reference_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' fp32 logits after each position of `ids` [len(ids), V]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def strict_rank(row: torch.Tensor, token: int) -> int:
    return int((row > row[token]).sum()) + 1


class Live:
    def __init__(self, url: str, tokenizer: Tokenizer) -> None:
        self.oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=url, timeout=60)
        self.tokenizer = tokenizer

    def post(self, path: str, **body: Any) -> dict[str, Any]:
        r = self.http.post(path, json={"model": MODEL, **body})
        assert r.status_code == 200, r.text
        return r.json()

    def stream(self, path: str, **body: Any) -> list[dict[str, Any]]:
        """The JSON chunks of a streamed call, in order."""
        r = self.http.post(path, json={"model": MODEL, "stream": True, **body})
        assert r.status_code == 200, r.text
        return sse_events(r.text)


@pytest.fixture(scope="module")
def live(tiny_llama: Path) -> Iterator[Live]:
    cfg = EngineConfig(model=str(tiny_llama), mode="semi-pd", scheduler=SchedulerConfig(max_model_len=512))
    with openai_server(cfg, MODEL) as (_, url):
        yield Live(url, Tokenizer(tiny_llama))


def joined_completion_logprobs(chunks: list[dict[str, Any]], n: int) -> list[dict[str, list[Any]]]:
    """Each choice's completions logprobs of a stream, its chunks' joined."""
    out: list[dict[str, list[Any]]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                                       for _ in range(n)]
    for c in chunks:
        for ch in c["choices"]:
            if ch["logprobs"]:
                for k, v in ch["logprobs"].items():
                    out[ch["index"]][k] += v
    return out


# -- the engine's numbers --------------------------------------------------------------------


def test_engine_logprobs_equal_transformers_raw_distribution(tiny_llama: Path) -> None:
    """Prompt logprobs scored over several prefill chunks, and sampled tokens' logprobs under a repetition
    penalty, top-k and a logit bias: each value, rank (1 + how many are more likely) and top-k list is that of
    transformers' raw fp32 distribution at the same position, as vLLM's default raw_logprobs mode."""
    llm = LLM(str(tiny_llama), mode="semi-pd", scheduler=SchedulerConfig(max_prefill_tokens=8))
    try:
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=7, logprobs=5, prompt_logprobs=3,
                                ignore_eos=True, repetition_penalty=1.3, top_k=3, logit_bias={200: 4.0})
        outs = llm.generate([list(p) for p in PROMPTS], params)
    finally:
        llm.shutdown()
    for prompt, out in zip(PROMPTS, outs):
        ids = prompt + out.token_ids
        ref = reference_logprobs(tiny_llama, ids)
        assert len(out.prompt_logprobs) == len(prompt) - 1 and len(out.logprobs) == len(out.token_ids) == 6
        scored = [(i, prompt[i + 1], lp, 3) for i, lp in enumerate(out.prompt_logprobs)]
        scored += [(len(prompt) - 1 + j, t, lp, 5) for j, (t, lp) in enumerate(zip(out.token_ids, out.logprobs))]
        for pos, token, lp, k in scored:
            row = ref[pos]
            assert lp.token_id == token
            assert lp.logprob == pytest.approx(row[token].item(), abs=ABS)
            assert lp.rank == strict_rank(row, token)
            assert [t for t, _ in lp.top] == row.topk(k).indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(row.topk(k).values.tolist(), abs=ABS)


# -- completions ---------------------------------------------------------------------------


def test_lm_eval_loglikelihood_equals_transformers(live: Live, tiny_llama: Path) -> None:
    """lm-eval-harness's local-completions loglikelihood: token prompts, echo, logprobs=1, max_tokens=1,
    temperature 0; it sums token_logprobs[ctxlen:-1] and calls the continuation greedy when each equals the
    largest of its top_logprobs. Both equal transformers' on the same tokens."""
    ctxlen = 5
    r = live.post("/v1/completions", prompt=PROMPTS, max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
    for prompt, choice in zip(PROMPTS, sorted(r["choices"], key=lambda c: c["index"])):
        ref = reference_logprobs(tiny_llama, prompt)
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None
        got = sum(lp["token_logprobs"][ctxlen:-1])
        want = sum(ref[i - 1, prompt[i]].item() for i in range(ctxlen, len(prompt)))
        assert got == pytest.approx(want, abs=1e-3)
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                             lp["top_logprobs"][ctxlen:-1]))
        want_greedy = all(ref[i - 1].argmax().item() == prompt[i] for i in range(ctxlen, len(prompt)))
        assert greedy == want_greedy
        tokens = [live.tokenizer.decode([t], skip_special_tokens=False) for t in prompt]
        assert lp["tokens"][: len(prompt)] == tokens
        offsets = [sum(len(s) for s in tokens[:i]) for i in range(len(prompt) + 1)]
        assert lp["text_offset"] == offsets  # characters of the tokens before, as vLLM counts them


def test_echoed_prompt_shows_the_asked_logprobs_whatever_prompt_logprobs_asks(live: Live) -> None:
    """With echo, the prompt positions' top_logprobs hold the `logprobs` most likely tokens (and the prompt
    token), as the output's do: asking `prompt_logprobs` for more (its own field) leaves them as they were.
    Whole and streamed (without `prompt_logprobs`, which a stream may not ask, as in vLLM), n = 2."""
    kw: dict[str, Any] = dict(prompt=PROMPTS[0], max_tokens=3, temperature=1.0, seed=11, n=2, logprobs=1,
                              echo=True, ignore_eos=True)
    plain = live.post("/v1/completions", **kw)
    wide = live.post("/v1/completions", prompt_logprobs=4, **kw)
    for a, b in zip(plain["choices"], wide["choices"]):
        assert b["logprobs"]["tokens"] == a["logprobs"]["tokens"]
        for x, y in zip(a["logprobs"]["top_logprobs"], b["logprobs"]["top_logprobs"]):
            assert (x is None) == (y is None)
            if x is not None:
                assert y.keys() == x.keys() and len(y) <= 2
        assert all(len(entry) >= 4 for entry in b["prompt_logprobs"][1:])  # its own field has the 4 asked
    streamed = joined_completion_logprobs(live.stream("/v1/completions", **kw), 2)
    for got, whole in zip(streamed, wide["choices"]):
        assert got["tokens"] == whole["logprobs"]["tokens"]
        assert [None if t is None else set(t) for t in got["top_logprobs"]] == \
               [None if t is None else set(t) for t in whole["logprobs"]["top_logprobs"]]
        assert got["text_offset"] == whole["logprobs"]["text_offset"]


def test_completion_logprobs_include_the_sampled_token_and_stream_as_whole(live: Live) -> None:
    """logprobs=k: each position's top_logprobs hold the k most likely tokens plus the sampled one when it is not
    among them (raw logprobs: a logit bias that forces a token does not change its logprob); streamed, n = 2,
    the same tokens, values and offsets as the whole response."""
    kw: dict[str, Any] = dict(prompt="Hello", max_tokens=5, temperature=1.0, seed=3, n=2, logprobs=2,
                              ignore_eos=True, logit_bias={"120": 8})
    whole = live.post("/v1/completions", **kw)
    for choice in whole["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == 5 and "".join(lp["tokens"]) == choice["text"]
        for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert token in top and 2 <= len(top) <= 3 and value <= 0
            if token != "\ufffd":  # keyed by text, as vLLM's: single bytes of a character share this one
                assert top[token] == value
                assert len(top) == 3 or value >= min(top.values())
    streamed = joined_completion_logprobs(live.stream("/v1/completions", **kw), 2)
    for got, choice in zip(streamed, whole["choices"]):
        assert got["tokens"] == choice["logprobs"]["tokens"]
        assert got["token_logprobs"] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=ABS)
        assert got["text_offset"] == choice["logprobs"]["text_offset"]


# -- chat ------------------------------------------------------------------------------------


def test_chat_logprobs_entries_as_vllm(live: Live) -> None:
    """Chat `logprobs` + `top_logprobs`: one entry per output token with its text, raw logprob, the UTF-8 bytes of
    its text and the top_logprobs most likely tokens, most likely first; the same numbers as the completions
    API's for the chat's prompt tokens; streamed (n = 2) entries equal the whole response's; no top_logprobs
    gives empty lists."""
    messages = [{"role": "user", "content": "hi"}]
    greedy = live.post("/v1/chat/completions", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                       top_logprobs=3, ignore_eos=True)
    prompt = live.http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    plain = live.post("/v1/completions", prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
                      ignore_eos=True)["choices"][0]["logprobs"]
    content = greedy["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == plain["tokens"]
    assert [e["logprob"] for e in content] == pytest.approx(plain["token_logprobs"], abs=ABS)
    for entry, top in zip(content, plain["top_logprobs"]):
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(values) == 3 and values == sorted(values, reverse=True) and entry["logprob"] == values[0]
        assert all(t["bytes"] == list(t["token"].encode("utf-8")) for t in entry["top_logprobs"])
        assert {t["token"]: t["logprob"] for t in entry["top_logprobs"]} == pytest.approx(top, abs=ABS)
    kw: dict[str, Any] = dict(messages=messages, max_tokens=5, temperature=1.0, seed=5, n=2, logprobs=True,
                              top_logprobs=2, ignore_eos=True)
    whole = live.post("/v1/chat/completions", **kw)
    streamed: list[list[dict[str, Any]]] = [[], []]
    for c in live.stream("/v1/chat/completions", **kw):
        for ch in c["choices"]:
            if ch["logprobs"]:
                streamed[ch["index"]] += ch["logprobs"]["content"]
    for got, choice in zip(streamed, whole["choices"]):
        want = choice["logprobs"]["content"]
        assert len(got) == len(want) == 5
        assert [e["token"] for e in got] == [e["token"] for e in want]
        assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in want], abs=ABS)
    bare = live.post("/v1/chat/completions", messages=messages, max_tokens=2, temperature=0, logprobs=True)
    assert [e["top_logprobs"] for e in bare["choices"][0]["logprobs"]["content"]] == [[], []]

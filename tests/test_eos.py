"""End of sequence as vLLM has it: the tokenizer's `eos_token_id` ends a request (finish reason "stop", stop_reason
None) even when neither config.json nor generation_config.json lists it, with `ignore_eos` and `min_tokens` honoured
as for the checkpoint's EOS ids; on every path (LLM in each mode, the HTTP API, gRPC, run-batch)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.config import EngineConfig, ModelArch
from actors.engine.frontend import LLM, OutputStream, Tokenizer
from actors.request import FinishReason, SamplingParams, TokenDelta
from cluster.cli import main
from cluster.engine_client import LocalEngineClient
from cluster.grpc_client import GenerationClient
from cluster.grpc_server import GrpcServer
from cluster.openai_api import create_app

from support import LoopThread, sse_events

pytestmark = pytest.mark.timeout(300)

TOKENIZER_EOS = 258  # <|im_start|>: made the tokenizer's eos_token below; not in config.json's or
# generation_config.json's eos_token_id ([257, 259])
FORCED = {TOKENIZER_EOS: 100.0}  # greedy picks it wherever it is allowed
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint, its tokenizer's eos_token changed to one the checkpoint's configs do not name."""
    out = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(tiny_llama, out)
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["eos_token"] = "<|im_start|>"
    path.write_text(json.dumps(cfg))
    assert Tokenizer(out).eos_token_id == TOKENIZER_EOS
    assert TOKENIZER_EOS not in ModelArch.from_dir(out).eos_token_ids
    return out


def test_with_eos_token_id_adds_the_tokenizer_s_eos_once(model: Path) -> None:
    arch = ModelArch.from_dir(model)
    assert arch.with_eos_token_id(TOKENIZER_EOS).eos_token_ids == (*arch.eos_token_ids, TOKENIZER_EOS)
    assert arch.with_eos_token_id(arch.eos_token_ids[0]) == arch
    assert arch.with_eos_token_id(None) == arch
    assert arch.with_eos_token_id(arch.vocab_size) == arch


@pytest.mark.parametrize("mode", ["unified", "semi-pd", "disagg"])
def test_the_tokenizer_s_eos_ends_a_request_with_no_stop_reason(model: Path, mode: str) -> None:
    with LLM(model, mode=mode) as llm:
        eos, ignored, short, stop_id = llm.generate(["Hi"] * 4, [
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logit_bias=FORCED),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logit_bias=FORCED, ignore_eos=True),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logit_bias=FORCED, min_tokens=3),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logit_bias=FORCED, ignore_eos=True,
                           stop_token_ids=(TOKENIZER_EOS,)),
        ])
    assert (eos.token_ids, eos.text, eos.finish_reason, eos.stop_reason) == ([TOKENIZER_EOS], "", "stop", None)
    assert (ignored.token_ids, ignored.finish_reason) == ([TOKENIZER_EOS] * MAX_TOKENS, "length")
    # min_tokens keeps the EOS out of the first 3 tokens (masked as the checkpoint's are), then it ends the request
    assert len(short.token_ids) == 4 and TOKENIZER_EOS not in short.token_ids[:3], short.token_ids
    assert (short.token_ids[-1], short.finish_reason, short.stop_reason) == (TOKENIZER_EOS, "stop", None)
    # a stop token id that is the EOS, with ignore_eos: a stop token (vLLM's stop_reason is its id)
    assert (stop_id.token_ids, stop_id.finish_reason, stop_id.stop_reason) == ([TOKENIZER_EOS], "stop",
                                                                               TOKENIZER_EOS)


def test_the_disaggregated_front_end_stops_on_the_tokenizer_s_eos(model: Path) -> None:
    """`DisaggLLM` builds its pair of engines itself, not through `LLM`'s set-up: it must pass the tokenizer's EOS
    to both."""
    from actors.disagg.frontend import DisaggLLM

    with DisaggLLM(model, device="cpu") as llm:
        (out,) = llm.generate(["Hi"], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logit_bias=FORCED))
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([TOKENIZER_EOS], "stop", None)


def test_the_http_api_stops_on_the_tokenizer_s_eos(model: Path) -> None:
    client = LocalEngineClient(EngineConfig(model=str(model)), served_name="tiny")
    base = {"model": "tiny", "prompt": "Hi", "max_tokens": MAX_TOKENS, "temperature": 0,
            "logit_bias": {str(TOKENIZER_EOS): 100}}
    try:
        app = create_app(client, Tokenizer(model))

        async def go() -> list[tuple[str, Any, int]]:
            out = []
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
                for extra in ({}, {"ignore_eos": True}):
                    body = (await http.post("/v1/completions", json={**base, **extra})).json()
                    choice = body["choices"][0]
                    out.append((choice["finish_reason"], choice.get("stop_reason", "missing"),
                                body["usage"]["completion_tokens"]))
                r = await http.post("/v1/completions", json={**base, "stream": True})
                events = sse_events(r.text)
                last = [c["choices"][0] for c in events if c["choices"] and c["choices"][0]["finish_reason"]][-1]
                out.append((last["finish_reason"], last.get("stop_reason", "missing"), -1))
            return out

        got = asyncio.run(go())
    finally:
        client.shutdown()
    assert got == [("stop", None, 1), ("length", None, MAX_TOKENS), ("stop", None, -1)]


def test_grpc_stops_on_the_tokenizer_s_eos(model: Path) -> None:
    client = LocalEngineClient(EngineConfig(model=str(model)), served_name="tiny")
    loop = LoopThread(name="eos-grpc-loop")
    server = GrpcServer(client, Tokenizer(model), port=0, host="127.0.0.1")
    try:
        port = loop.run(server.start())
        with GenerationClient(f"127.0.0.1:{port}", timeout=60) as c:
            got = [list(c.generate("Hi", SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logit_bias=FORCED,
                                                        **extra)))
                   for extra in ({}, {"ignore_eos": True})]
    finally:
        loop.run(server.stop(grace=1.0))
        loop.close()
        client.shutdown()
    assert [(c[-1].finish_reason, c[-1].stop_reason, c[-1].completion_tokens) for c in got] == [
        ("stop", None, 1), ("length", None, MAX_TOKENS)]


def test_run_batch_stops_on_the_tokenizer_s_eos(model: Path, tmp_path: Path) -> None:
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": MAX_TOKENS, "temperature": 0,
            "logit_bias": {str(TOKENIZER_EOS): 100}}
    inp, out = tmp_path / "batch.jsonl", tmp_path / "results.jsonl"
    inp.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    assert main(["run-batch", "-i", str(inp), "-o", str(out), "--model", str(model),
                 "--served-model-name", "tiny"]) == 0
    result = json.loads(out.read_text())["response"]["body"]
    assert (result["choices"][0]["finish_reason"], result["usage"]["completion_tokens"]) == ("stop", 1)


def test_a_stop_token_that_completes_a_kept_stop_string_reports_the_string(tiny_llama: Path) -> None:
    """Current vLLM (detokenizer `update` since its min_tokens support) searches stop strings in the text of a
    request a stop token ended too: with include_stop_str_in_output the token's text can complete one, and
    stop_reason is the string. Without it the token's text is not shown, so the stop token id is the reason."""
    tok = Tokenizer(tiny_llama)
    for include, text, reason in ((True, "hi!", "i!"), (False, "hi", ord("!"))):
        params = SamplingParams(stop=("i!",), stop_token_ids=(ord("!"),), include_stop_str_in_output=include)
        stream = OutputStream("r", [1], params, tok)
        stream.process(TokenDelta("r", tuple(b"hi")))
        chunk, _ = stream.process(TokenDelta("r", (ord("!"),), FinishReason.STOP, ends_with_stop_token=True))
        assert (stream.text, chunk.finish_reason, chunk.stop_reason) == (text, "stop", reason)

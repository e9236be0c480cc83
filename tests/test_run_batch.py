"""`semipd run-batch`: an OpenAI Batch API file through the tiny model, in-process, as `vllm run-batch`."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.config import EngineConfig
from actors.engine.frontend import LLM
from actors.request import SamplingParams
from cluster.cli import main
from cluster.commands import run_batch
from cluster.engine_client import LocalEngineClient
from cluster.openai_api import create_app

pytestmark = pytest.mark.timeout(120)

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8, "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "The capital of", "max_tokens": 8, "temperature": 0}
RESPONSE = {"model": MODEL, "input": "Tell me a story", "max_output_tokens": 8, "temperature": 0}
GOOD = {"chat": ("/v1/chat/completions", CHAT), "cmpl": ("/v1/completions", COMPLETION),
        "resp": ("/v1/responses", RESPONSE)}


def line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


INPUT = [
    line("chat", *GOOD["chat"]),
    line("cmpl", *GOOD["cmpl"]),
    "",  # blank lines are skipped, as vLLM's reader does
    line("resp", *GOOD["resp"]),
    line("bad-temperature", "/v1/completions", {**COMPLETION, "temperature": 5}),
    "this is not json",
    line("embeddings", "/v1/embeddings", {"model": MODEL, "input": "x"}),
    line("streamed", "/v1/chat/completions", {**CHAT, "stream": True}),
    json.dumps({"custom_id": "no-body", "method": "POST", "url": "/v1/completions"}),
]
IDS = ["chat", "cmpl", "resp", "bad-temperature", None, "embeddings", "streamed", "no-body"]


def run_file(tmp: Path, model: Path, lines: list[str], *flags: str) -> tuple[int, list[dict[str, Any]]]:
    inp, out = tmp / "batch.jsonl", tmp / "results.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    rc = main(["run-batch", "-i", str(inp), "-o", str(out), "--model", str(model), "--served-model-name", MODEL,
               *flags])
    return rc, [json.loads(x) for x in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def batch(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rc, out = run_file(tmp_path_factory.mktemp("run-batch"), tiny_llama, INPUT)
    assert rc == 0
    return {"lines": out, **{o["custom_id"]: o for o in out if o["custom_id"]}}


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> dict[str, Any]:
    """The good bodies sent one at a time to the HTTP API's app over the same (unified) engine config."""
    client = LocalEngineClient(EngineConfig(model=str(tiny_llama)), served_name=MODEL)
    try:
        app = create_app(client, client.llm.tokenizer)

        async def go() -> dict[str, Any]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ref") as http:
                return {name: (await http.post(url, json=body)).json() for name, (url, body) in GOOD.items()}

        return asyncio.run(go())
    finally:
        client.shutdown()


def test_one_output_line_per_input_line_in_order(batch: dict[str, Any]) -> None:
    lines = batch["lines"]
    assert [o["custom_id"] for o in lines] == IDS
    assert [o["response"]["status_code"] for o in lines] == [200, 200, 200, 400, 400, 400, 400, 400]
    for o in lines:
        assert set(o) == {"id", "custom_id", "response", "error"}
        assert o["id"].startswith("batch_req_") and o["response"]["request_id"]
    assert len({o["id"] for o in lines}) == len({o["response"]["request_id"] for o in lines}) == len(lines)


def test_good_lines_are_openai_objects(batch: dict[str, Any]) -> None:
    for name in GOOD:
        assert batch[name]["error"] is None
    chat = batch["chat"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["model"] == MODEL
    assert chat["id"] == "chatcmpl-" + batch["chat"]["response"]["request_id"]
    assert isinstance(chat["choices"][0]["message"]["content"], str)
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["finish_reason"] == "length"
    assert chat["usage"]["completion_tokens"] == 8
    assert chat["usage"]["total_tokens"] == chat["usage"]["prompt_tokens"] + 8
    cmpl = batch["cmpl"]["response"]["body"]
    assert cmpl["object"] == "text_completion" and isinstance(cmpl["choices"][0]["text"], str)
    assert cmpl["usage"]["completion_tokens"] == 8
    resp = batch["resp"]["response"]["body"]
    assert resp["object"] == "response" and resp["status"] == "incomplete"
    assert isinstance(resp["output"][0]["content"][0]["text"], str)
    assert resp["usage"]["output_tokens"] == 8


def test_a_bad_body_gets_the_api_s_status_and_error_body(batch: dict[str, Any]) -> None:
    """vLLM's shape for an ErrorResponse: the status in `response`, no body, the OpenAI error body in `error`."""
    bad = batch["bad-temperature"]
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"] is None
    err = bad["error"]["error"]
    assert err["code"] == 400 and err["param"] == "temperature" and err["type"] == "BadRequestError"
    assert "temperature" in err["message"]


def test_lines_that_cannot_be_sent_are_error_lines(batch: dict[str, Any]) -> None:
    """Not JSON, an unsupported url (vLLM's message), a streamed body (vLLM's refusal), a missing field: a 400
    with the reason as the line's error; the run goes on."""
    not_json = batch["lines"][4]
    assert not_json["custom_id"] is None and "not valid JSON" in not_json["error"]
    assert batch["embeddings"]["error"] == ("URL /v1/embeddings was used. Supported endpoints: /v1/chat/completions, "
                                            "/v1/completions, /v1/responses.")
    assert batch["streamed"]["error"] == "Request must not be sent in stream mode"
    assert "lacks body" in batch["no-body"]["error"]
    for name in ("embeddings", "streamed", "no-body"):
        assert batch[name]["response"]["body"] is None


def test_greedy_lines_equal_the_http_api_and_llm(batch: dict[str, Any], reference: dict[str, Any],
                                                 tiny_llama: Path) -> None:
    def texts(bodies: dict[str, Any]) -> tuple[str, str, str]:
        return (bodies["chat"]["choices"][0]["message"]["content"], bodies["cmpl"]["choices"][0]["text"],
                bodies["resp"]["output"][0]["content"][0]["text"])

    got = texts({name: batch[name]["response"]["body"] for name in GOOD})
    assert got == texts(reference)
    with LLM(tiny_llama) as llm:
        out = llm.generate([COMPLETION["prompt"]], SamplingParams(max_tokens=8, temperature=0))[0]
    assert got[1] == out.text


def test_stdin_to_stdout_semi_pd_with_a_bound(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`-` for both files; the engine is shut down at the end; a progress bar and a summary on stderr."""
    shutdowns: list[bool] = []
    real = LocalEngineClient.shutdown
    monkeypatch.setattr(LocalEngineClient, "shutdown", lambda self: (shutdowns.append(True), real(self))[1])
    lines = [line(f"c{i}", "/v1/completions", {**COMPLETION, "max_tokens": 4, "prompt": f"p{i}"}) for i in range(5)]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["run-batch", "-i", "-", "-o", "-", "--model", str(tiny_llama), "--served-model-name", MODEL,
                 "--mode", "semi-pd", "--max-concurrency", "2"]) == 0
    captured = capsys.readouterr()
    out = [json.loads(x) for x in captured.out.splitlines()]
    assert [o["custom_id"] for o in out] == [f"c{i}" for i in range(5)]
    assert all(o["response"]["status_code"] == 200 for o in out)
    assert "Running batch" in captured.err and "5 request(s), 5 succeeded, 0 failed" in captured.err
    assert shutdowns == [True]


def test_ctrl_c_shuts_the_engine_down(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutdowns: list[bool] = []
    real = LocalEngineClient.shutdown
    monkeypatch.setattr(LocalEngineClient, "shutdown", lambda self: (shutdowns.append(True), real(self))[1])

    async def interrupted(*args: Any, **kwargs: Any) -> tuple[int, int]:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_batch, "run_batch", interrupted)
    (tmp_path / "in.jsonl").write_text(line("c", *GOOD["cmpl"]) + "\n")
    assert main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                 "--model", str(tiny_llama)]) == 130
    assert shutdowns == [True]


@pytest.mark.parametrize("what, message", [
    ("missing input", "input file not found"),
    ("url input", "URLs are not supported"),
    ("output directory missing", "output file's directory not found"),
    ("bad model", "model directory not found"),
    ("zero concurrency", "--max-concurrency must be >= 1"),
])
def test_user_errors_exit_2_before_the_engine_starts(tiny_llama: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], what: str,
                                                     message: str) -> None:
    inp, out, model, extra = tmp_path / "in.jsonl", tmp_path / "out.jsonl", str(tiny_llama), []
    inp.write_text(line("c", *GOOD["cmpl"]) + "\n")
    if what == "missing input":
        inp = tmp_path / "nowhere.jsonl"
    elif what == "url input":
        inp = "https://example.com/batch.jsonl"  # type: ignore[assignment]
    elif what == "output directory missing":
        out = tmp_path / "no-such-dir" / "out.jsonl"
    elif what == "bad model":
        model = str(tmp_path / "no-model")
    else:
        extra = ["--max-concurrency", "0"]
    assert main(["run-batch", "-i", str(inp), "-o", str(out), "--model", model, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("semipd run-batch: error:") and message in err
    assert not out.exists()


def test_missing_required_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run-batch", "-i", "in.jsonl", "--model", "m"])
    assert e.value.code == 2 and "--output-file" in capsys.readouterr().err

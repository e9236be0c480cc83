"""`semipd generate` sends only the sampling flags given: the model's defaults (its generation_config.json, else the
engine's) apply to the others, through a real gRPC server and through the local engine (`--model`) alike."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.config import EngineConfig, SchedulerConfig
from actors.engine.frontend import LLM, StreamChunk, Tokenizer
from actors.models.make_model import make_model
from actors.request import SamplingParams
from cluster.cli import main
from cluster.engine_client import GenerateRequest, LocalEngineClient
from cluster.grpc_client import generate_once
from cluster.grpc_server import GrpcServer

from support import LoopThread

pytestmark = pytest.mark.timeout(300)

PROMPT = "Hello"
# the checkpoint's defaults: a hot, nucleus-cut draw of 5 tokens (the command's old flags: greedy, 64 tokens)
CHECKPOINT = {"temperature": 1.5, "top_p": 0.9, "max_new_tokens": 5}
BY_DEFAULT = SamplingParams(max_tokens=5, temperature=1.5, top_p=0.9, seed=3, ignore_eos=True)
BY_FLAGS = SamplingParams(max_tokens=3, temperature=0.0, top_p=0.5, ignore_eos=True)
FLAGS = ["--max-tokens", "3", "--temperature", "0", "--top-p", "0.5", "--ignore-eos"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """make-model's tiny checkpoint, its generation_config.json given sampling defaults."""
    out = make_model("tiny-llama", tmp_path_factory.mktemp("defaults"), seed=0)
    config = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, **CHECKPOINT}))
    return out


class RecordingClient(LocalEngineClient):
    """The local engine client, keeping the parameters of each request it was sent."""

    def __init__(self, config: EngineConfig, served_name: str) -> None:
        super().__init__(config, served_name)
        self.params: list[SamplingParams] = []

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        self.params.append(request.params)
        async for chunk in super().generate(request):
            yield chunk


class Served:
    def __init__(self, client: RecordingClient, addr: str) -> None:
        self.client = client
        self.addr = addr


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[Served]:
    client = RecordingClient(EngineConfig(model=str(checkpoint), mode="semi-pd", device="cpu",
                                          scheduler=SchedulerConfig(max_model_len=512)), served_name="tiny")
    loop = LoopThread(name="generate-cli-loop")
    server = GrpcServer(client, Tokenizer(checkpoint), port=0, host="127.0.0.1")
    try:
        loop.run(server.start())
        yield Served(client, f"127.0.0.1:{server.port}")
    finally:
        loop.run(server.stop(grace=1.0))
        loop.close()
        client.shutdown()


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["generate", "--prompt", PROMPT, "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def sent(params: SamplingParams) -> tuple[Any, ...]:
    return params.max_tokens, params.temperature, params.top_p, params.seed, params.ignore_eos


def test_grpc_flags_left_out_take_the_checkpoint_defaults(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli_json(capsys, "--grpc", served.addr, "--seed", "3", "--ignore-eos")
    assert sent(served.client.params[-1]) == sent(BY_DEFAULT)
    expected = generate_once(served.addr, PROMPT, BY_DEFAULT, timeout=60)
    assert (result["token_ids"], result["finish_reason"]) == (expected["token_ids"], "length")
    assert len(result["token_ids"]) == CHECKPOINT["max_new_tokens"]


def test_grpc_flags_given_override_the_checkpoint_defaults(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli_json(capsys, "--grpc", served.addr, *FLAGS)
    assert sent(served.client.params[-1]) == sent(BY_FLAGS)
    expected = generate_once(served.addr, PROMPT, BY_FLAGS, timeout=60)
    assert result["token_ids"] == expected["token_ids"] and len(result["token_ids"]) == 3


def test_grpc_a_bad_flag_exits_2_before_sending(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    sent_before = len(served.client.params)
    assert main(["generate", "--grpc", served.addr, "--prompt", PROMPT, "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err and len(served.client.params) == sent_before


def test_local_model_flags_left_out_take_the_checkpoint_defaults_and_given_ones_win(
        checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    by_default = cli_json(capsys, "--model", str(checkpoint), "--seed", "3", "--ignore-eos")
    by_flags = cli_json(capsys, "--model", str(checkpoint), *FLAGS)
    with LLM(checkpoint, mode="unified", device="cpu") as llm:  # the command's engine
        expected = llm.generate([PROMPT, PROMPT], [BY_DEFAULT, BY_FLAGS])
    assert (by_default["token_ids"], by_default["finish_reason"]) == (expected[0].token_ids, "length")
    assert len(by_default["token_ids"]) == CHECKPOINT["max_new_tokens"]
    assert by_flags["token_ids"] == expected[1].token_ids and len(by_flags["token_ids"]) == 3


def test_help_names_the_defaults_that_apply(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    defaults = SamplingParams()
    for flag, default in (("--max-tokens", defaults.max_tokens), ("--temperature", defaults.temperature),
                          ("--top-p", defaults.top_p)):
        described = re.search(rf"{flag} [A-Z_]+ (.*?\))", text)
        assert described is not None, flag
        assert "generation_config.json" in described.group(1) and f"else {default}" in described.group(1), \
            described.group(1)

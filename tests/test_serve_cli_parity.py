"""`semipd serve` takes the flags of `vllm serve` that users type: the model as a positional argument, vLLM's
names for the engine settings semipd has (reaching every engine and the Serve app), vLLM's flags for settings
semipd has only one value of (that value accepted, any other refused with exit 2 and what semipd supports), and
flags that change nothing here (accepted, ignored). README.md's 'From vllm serve' table lists them."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cluster.cli import build_parser

from support import ROOT, ServeProcess, free_port

if TYPE_CHECKING:
    from cluster.bootstrap import ClusterConfig

pytestmark = pytest.mark.timeout(300)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    from cluster.commands.serve import cluster_config as serve_cluster_config

    return serve_cluster_config(args, None)


def app_cluster_config(args: argparse.Namespace) -> ClusterConfig:
    """The cluster config the Serve app's replicas build from the arguments `semipd serve` gives it."""
    from cluster.commands.serve import serve_app_args
    from cluster.serve_app import ServeArgs
    from cluster.serve_app import cluster_config as serve_app_cluster_config

    return serve_app_cluster_config(ServeArgs.parse(serve_app_args(args, None, None)), None)


VLLM_ENGINE_FLAGS = ("--max-model-len", "1k", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
                     "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching", "--block-size", "32",
                     "--seed", "7", "--dtype", "half")


def test_vllms_engine_flags_reach_every_engine_and_the_serve_app(tiny_llama: Path) -> None:
    engine = cluster_config(parse(str(tiny_llama), "--device", "cpu", *VLLM_ENGINE_FLAGS)).engine_config()
    assert engine.scheduler.max_model_len == 1000
    assert engine.scheduler.max_decode_seqs == 8
    assert engine.scheduler.max_prefill_tokens == 512
    assert engine.cache.memory_fraction == 0.5
    assert engine.cache.enable_prefix_caching is False
    assert engine.cache.page_size == 32
    assert (engine.seed, engine.dtype) == (7, "half")
    assert app_cluster_config(parse(str(tiny_llama), "--device", "cpu", *VLLM_ENGINE_FLAGS)).engine_config() == engine


SEMIPD_ENGINE_FLAGS = ("--num-pages", "96", "--decode-attention", "cuda-cores", "--prefill-sms", "40",
                       "--no-overlap-decode", "--no-overlap-prefill", "--decode-pace-ms", "3",
                       "--prefill-layers-ahead", "6", "--switch-interval-ms", "1", "--prefill-order", "edf",
                       "--admission", "queue", "--admission-slack", "1.5", "--load-format", "dummy")


def test_semipds_own_engine_flags_reach_the_serve_app_as_they_reach_the_engines(tiny_llama: Path) -> None:
    args = parse(str(tiny_llama), "--device", "cpu", *SEMIPD_ENGINE_FLAGS)
    engine = cluster_config(args).engine
    assert (engine.num_pages, engine.decode_attention, engine.prefill_order) == (96, "cuda-cores", "edf")
    assert app_cluster_config(args).engine == engine


def test_the_defaults_are_the_engines(tiny_llama: Path) -> None:
    """Left out, the new flags give each engine the settings it has by default (the parser's defaults are written
    out for --help: they must not drift from EngineOptions')."""
    from cluster.bootstrap import EngineOptions

    args = parse(str(tiny_llama))
    assert cluster_config(args).engine == EngineOptions()
    assert app_cluster_config(args).engine == EngineOptions()
    assert args.http_port == 8000


def test_the_model_is_positional_or_model(tiny_llama: Path) -> None:
    positional = parse(str(tiny_llama), "--port", "9001")
    assert positional.model == str(tiny_llama)
    assert cluster_config(positional) == cluster_config(parse("--model", str(tiny_llama), "--http-port", "9001"))
    assert parse("--port", "9001", str(tiny_llama), "--max-model-len", "64").model == str(tiny_llama)


@pytest.mark.parametrize("vllm, semipd", [
    (("--port", "9002"), ("--http-port", "9002")),
    (("--max-num-batched-tokens", "333"), ("--max-prefill-tokens", "333")),
])
def test_vllms_names_are_aliases_of_semipds(tiny_llama: Path, vllm: tuple[str, ...], semipd: tuple[str, ...]) -> None:
    assert parse(str(tiny_llama), *vllm) == parse(str(tiny_llama), *semipd)


@pytest.mark.parametrize("text, tokens", [("2048", 2048), ("32k", 32000), ("32K", 32768), ("1.5k", 1500),
                                          ("1.1k", 1100), ("1m", 1000000), ("1M", 1 << 20)])
def test_max_model_len_reads_vllms_human_readable_numbers(tiny_llama: Path, text: str, tokens: int) -> None:
    assert parse(str(tiny_llama), "--max-model-len", text).max_model_len == tokens


SINGLE_VALUED = ("-tp", "1", "--pipeline-parallel-size", "1", "--kv-cache-dtype", "auto", "--max-logprobs", "20",
                 "--response-role", "assistant", "--generation-config", "auto")
IGNORED = ("--disable-log-requests", "--enable-log-requests", "--disable-log-stats", "--uvicorn-log-level", "debug",
           "--enable-auto-tool-choice", "--trust-remote-code", "--root-path", "/semipd")


def test_flags_at_semipds_only_value_and_ignored_flags_change_nothing(tiny_llama: Path) -> None:
    from cluster.commands.serve import serve_app_args

    plain = parse(str(tiny_llama))
    vllm_style = parse(str(tiny_llama), *SINGLE_VALUED, *IGNORED)
    assert cluster_config(vllm_style) == cluster_config(plain)
    assert serve_app_args(vllm_style, None, None) == serve_app_args(plain, None, None)


def semipd_serve(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "serve", *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


REFUSED = [  # (flags, words of the message): exit 2 before anything starts
    (["-tp", "2"], "argument --tensor-parallel-size/-tp: semipd supports only 1"),
    (["--pipeline-parallel-size", "4"], "argument --pipeline-parallel-size/-pp: semipd supports only 1"),
    (["--quantization", "fp8"], "argument --quantization/-q: not supported by semipd: semipd serves unquantized"),
    (["--kv-cache-dtype", "fp8"], "argument --kv-cache-dtype: semipd supports only auto"),
    (["--max-logprobs", "50"], "argument --max-logprobs: semipd supports only 20"),
    (["--response-role", "user"], "argument --response-role: semipd supports only assistant"),
    (["--generation-config", "vllm"], "argument --generation-config: semipd supports only auto"),
    (["--chat-template", "t.jinja"], "argument --chat-template: not supported by semipd: the chat template is"),
    (["--allowed-origins", '["*"]'], "argument --allowed-origins: not supported by semipd: the HTTP API sends no CORS"),
    (["--middleware", "a.B"], "argument --middleware: not supported by semipd"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--dtype", "float32", "--device", "cuda"], "dtype float32 is not supported on the GPU"),
    (["--max-model-len", "4096"], "max_model_len 4096 exceeds the model's max_position_embeddings 2048"),
    (["--max-model-len", "1"], "argument --max-model-len: max_model_len must be >= 2"),
    (["--max-model-len", "auto"], "argument --max-model-len: expected a whole number such as 2048, 32k or 32K"),
    (["--max-model-len", "1.5K"], "argument --max-model-len: expected a whole number"),
    (["--max-num-seqs", "0"], "argument --max-num-seqs: max_decode_seqs must be >= 1"),
    (["--max-num-batched-tokens", "0"], "argument --max-prefill-tokens/--max-num-batched-tokens: max_prefill_tokens"),
    (["--gpu-memory-utilization", "1.5"], "argument --gpu-memory-utilization: memory_fraction must be in (0, 0.98]"),
    (["--block-size", "24"], "argument --block-size: page_size must be a power of two"),
    (["--uvicorn-log-level", "loud"], "argument --uvicorn-log-level: invalid choice: 'loud'"),
    (["--model", "other"], "argument --model: not allowed with argument MODEL"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_unsupported_values_exit_2_saying_what_semipd_supports(tiny_llama: Path, flags: list[str],
                                                               message: str) -> None:
    out = semipd_serve(str(tiny_llama), "--device", "cpu", "--http-port", "0", "--grpc-port", "0", *flags)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "semipd serve: error: " in out.stderr and message in out.stderr, out.stderr
    assert "starting" not in out.stdout


def test_serve_without_a_model_exits_2() -> None:
    out = semipd_serve("--port", "8123")
    assert out.returncode == 2
    assert "one of the arguments MODEL --model is required" in out.stderr


def test_vllm_style_command_line_serves_end_to_end(tiny_llama: Path) -> None:
    """`semipd serve MODEL --port P --max-model-len N --served-model-name NAME` (and vLLM's other habits) comes
    up, the official openai client sees NAME with max_model_len N and gets completions, a request past N tokens
    is refused as vLLM refuses it, and SIGINT stops it cleanly."""
    import openai

    from cluster.redis_server import ping

    port = free_port()
    server = ServeProcess([str(tiny_llama), "--port", str(port), "--max-model-len", "200", "--served-model-name",
                           "tiny-vllm", "--max-num-seqs", "16", "-tp", "1", "--disable-log-requests",
                           "--device", "cpu", "--grpc-port", "0", "--num-pages", "256"])
    try:
        server.read_until("serving; Ctrl-C to stop", 240)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == ["tiny-vllm"]
        assert (models[0].model_extra or {})["max_model_len"] == 200
        done = client.completions.create(model="tiny-vllm", prompt="Hello", max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert done.usage is not None and done.usage.completion_tokens == 5
        assert done.choices[0].finish_reason == "length" and done.choices[0].text
        with pytest.raises(openai.BadRequestError, match="maximum context length is 200 tokens"):
            client.completions.create(model="tiny-vllm", prompt=[7] * 190, max_tokens=20)
        server.proc.send_signal(signal.SIGINT)
        server.read_until("semipd stopped", 120)
        assert server.proc.wait(timeout=60) == 0
        assert server.redis_port is not None and not ping("127.0.0.1", server.redis_port)
    finally:
        server.stop()

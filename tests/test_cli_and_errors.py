"""`semipd make-model` / `semipd generate`, and how user errors surface (exit code 2, Python exceptions)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from actors.config import CacheConfig, ConfigError
from actors.engine.core import PromptTooLongError
from actors.engine.frontend import LLM
from actors.request import SamplingParams, SamplingParamsError
from cluster.cli import main

from support import wait_until

pytestmark = pytest.mark.timeout(120)

CONTEXT_ERROR = "This model's maximum context length is"


def semipd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=90,
                          cwd=Path(__file__).resolve().parents[1])


def broken_copy(src: Path, dst: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def set_architecture(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))


def remove(pattern: str) -> Callable[[Path], None]:
    def edit(model_dir: Path) -> None:
        for f in model_dir.glob(pattern):
            f.unlink()

    return edit


BROKEN = {  # name: (how to break a checkpoint, words the message must contain)
    "unknown architecture": (set_architecture, "unknown architecture 'GPT2LMHeadModel'"),
    "no config.json": (remove("config.json"), "no config.json"),
    "no safetensors": (remove("*.safetensors"), "no *.safetensors"),
}


@pytest.fixture(scope="module")
def broken_models(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    return {name: broken_copy(tiny_llama, root / name.replace(" ", "-"), edit) for name, (edit, _) in BROKEN.items()}


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> Iterator[LLM]:
    engine = LLM(tiny_llama)
    yield engine
    engine.shutdown()


# -- the commands, as a user runs them --------------------------------------------------------


def test_make_model_then_generate_json(tmp_path: Path, llm: LLM) -> None:
    made = semipd("make-model", "--preset", "tiny-qwen2", "--out", str(tmp_path / "m"))
    assert made.returncode == 0, made.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in (tmp_path / "m").iterdir()}
    gen = semipd("generate", "--model", str(tmp_path / "m"), "--prompt", "Hello there", "--max-tokens", "7",
                 "--temperature", "0", "--ignore-eos", "--json")
    assert gen.returncode == 0, gen.stderr
    result = json.loads(gen.stdout)
    assert result["finish_reason"] == "length"
    assert len(result["token_ids"]) == 7 and all(isinstance(t, int) for t in result["token_ids"])
    assert isinstance(result["text"], str) and result["num_prompt_tokens"] == len("Hello there")
    local = LLM(tmp_path / "m")
    try:
        expected = local.generate(["Hello there"], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))[0]
    finally:
        local.shutdown()
    assert (result["token_ids"], result["text"]) == (expected.token_ids, expected.text)


def test_broken_checkpoint_exits_2_from_the_shell(broken_models: dict[str, Path]) -> None:
    proc = semipd("generate", "--model", str(broken_models["unknown architecture"]), "--prompt", "hi", "--json")
    assert proc.returncode == 2
    assert "unknown architecture 'GPT2LMHeadModel'" in proc.stderr
    assert proc.stdout == ""


# -- the same errors through main() and through the Python API -----------------------------------


@pytest.mark.parametrize("name", BROKEN)
def test_broken_checkpoint_exit_code_and_message(
    broken_models: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert main(["generate", "--model", str(broken_models[name]), "--prompt", "hi"]) == 2
    assert BROKEN[name][1] in capsys.readouterr().err


@pytest.mark.parametrize("name", BROKEN)
def test_broken_checkpoint_raises_config_error(broken_models: dict[str, Path], name: str) -> None:
    with pytest.raises(ConfigError, match=BROKEN[name][1].replace("*", r"\*")):
        LLM(broken_models[name])


def test_missing_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "model directory not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model directory not found"):
        LLM(tmp_path / "nowhere")


@pytest.mark.parametrize("flags, message", [
    (["--prefill-sm-min", "0.7", "--prefill-sm-max", "0.3"], "0 <= min <= max <= 1"),
    (["--prefill-sm-max", "1.5"], "0 <= min <= max <= 1"),
    (["--policy", "nonsense"], "unknown split policy"),
    (["--switch-interval-ms", "0"], "switch_interval_ms must be in (0, 1000]"),
    (["--decode-pace-ms", "-5"], "decode_pace_ms must be in (0, 1000]"),
    (["--prefill-layers-ahead", "-1"], "prefill_layers_ahead must be 0 (off) or more"),
    (["--stream-interval", "0"], "stream_interval must be >= 1"),
    (["--num-replicas", "0"], "num_replicas"),
])
def test_serve_refuses_bad_controller_flags_before_starting(tiny_llama: Path, capsys: pytest.CaptureFixture[str],
                                                          flags: list[str], message: str) -> None:
    assert main(["serve", "--model", str(tiny_llama), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("semipd serve: error:") and message in err


@pytest.mark.parametrize("level, shown", [("INFO", True), ("WARNING", False), (None, False)])
def test_a_serve_jobs_workers_log_at_its_level(level: str | None, shown: bool) -> None:
    """Ray runs `configure_worker_logging` in every worker of a `semipd serve` job, with the job's --log-level in
    the environment: the controller's split decisions (INFO) then reach the job's output. A fresh interpreter
    stands in for the worker (Python's default, WARNING, is what a Ray worker has without it)."""
    env = {k: v for k, v in os.environ.items() if k != "SEMIPD_LOG_LEVEL"}
    if level:
        env["SEMIPD_LOG_LEVEL"] = level
    code = ("import logging; from cluster.cli import configure_worker_logging; configure_worker_logging(); "
            "logging.getLogger('cluster.controller').info('engine-0 stays at 64 SMs')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert ("INFO cluster.controller: engine-0 stays at 64 SMs" in out.stderr) == shown, out.stderr


def test_engine_sets_the_thread_switch_interval_it_is_given(tiny_llama: Path) -> None:
    default = sys.getswitchinterval()
    try:
        with LLM(tiny_llama, device="cpu", switch_interval_ms=0.5) as llm:
            assert sys.getswitchinterval() == pytest.approx(0.0005)
            assert llm.generate(["hi"], SamplingParams(max_tokens=2))[0].token_ids
    finally:
        sys.setswitchinterval(default)
    with pytest.raises(ConfigError, match="switch_interval_ms"):
        LLM(tiny_llama, device="cpu", switch_interval_ms=-1.0)


def test_engine_keeps_what_it_built_out_of_the_collectors_way_until_shutdown(tiny_llama: Path) -> None:
    """A started engine freezes the objects that exist by then (the cyclic collector skips them while it serves);
    shutdown thaws them, so the engine, dropped, goes like any other object."""
    import gc
    import weakref

    gc.unfreeze()
    llm = LLM(tiny_llama, device="cpu")
    assert gc.get_freeze_count() > 0
    pool = weakref.ref(llm.core.pool)
    assert llm.generate(["hi"], SamplingParams(max_tokens=2))[0].token_ids
    llm.shutdown()
    assert gc.get_freeze_count() == 0
    del llm
    gc.collect()
    assert pool() is None


def test_an_engine_whose_worker_cannot_start_raises_and_leaves_no_worker_running(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker thread that fails to enter its runner (on a GPU: making its pinned staging ring) fails the engine's
    start, instead of an engine that counts as started while one of its loops never runs."""
    import threading

    from actors.runner.model_runner import ModelRunner

    def enter_thread(runner: ModelRunner) -> None:
        if threading.current_thread().name == "semipd-decode":
            raise MemoryError("no pinned memory")

    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("semipd-") and t.is_alive()}

    before = workers()  # other tests' engines
    monkeypatch.setattr(ModelRunner, "enter_thread", enter_thread)
    with pytest.raises(RuntimeError, match="decode worker could not start") as failed:
        LLM(tiny_llama, device="cpu", mode="semi-pd")
    assert isinstance(failed.value.__cause__, MemoryError)
    assert workers() <= before


def test_engine_refuses_an_unknown_decode_attention_kernel(tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match=r"decode_attention must be one of \('fa2', 'fa3', 'cuda-cores'\)"):
        LLM(tiny_llama, device="cpu", decode_attention="fa4")


def test_prompt_longer_than_the_context(tiny_llama: Path, llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    long_prompt = "a" * 2100
    assert main(["generate", "--model", str(tiny_llama), "--prompt", long_prompt, "--max-tokens", "4"]) == 2
    assert capsys.readouterr().err.split("error: ", 1)[1].startswith(CONTEXT_ERROR)
    with pytest.raises(PromptTooLongError) as e:
        llm.generate([long_prompt], SamplingParams(max_tokens=4))
    assert str(e.value).startswith(CONTEXT_ERROR + " 2048 tokens")
    too_much = r"requested 2049 tokens \(5 in the messages, 2044 in the completion\)"
    with pytest.raises(PromptTooLongError, match=too_much):
        llm.generate(["short"], SamplingParams(max_tokens=2044))


def test_request_larger_than_the_kv_pool_is_refused(tiny_llama: Path) -> None:
    small = LLM(tiny_llama, cache=CacheConfig(page_size=16, num_pages=4))
    try:
        with pytest.raises(PromptTooLongError, match=f"^{CONTEXT_ERROR}.*KV cache holds only 64 tokens"):
            small.generate([list(range(1, 11))], SamplingParams(max_tokens=100))
        out = small.generate([list(range(1, 11))], SamplingParams(temperature=0.0, max_tokens=55, ignore_eos=True))[0]
        assert len(out.token_ids) == 55  # 10 + 54 cached tokens: exactly the pool
    finally:
        small.shutdown()


INVALID_SAMPLING = [
    (["--temperature", "-1"], dict(temperature=-1.0), "temperature"),
    (["--temperature", "2.5"], dict(temperature=2.5), "temperature"),
    (["--top-p", "0"], dict(top_p=0.0), "top_p"),
    (["--top-p", "1.5"], dict(top_p=1.5), "top_p"),
    (["--max-tokens", "0"], dict(max_tokens=0), "max_tokens"),
]


@pytest.mark.parametrize(("flags", "kwargs", "field"), INVALID_SAMPLING)
def test_invalid_sampling_values(
    tiny_llama: Path, capsys: pytest.CaptureFixture[str], flags: list[str], kwargs: dict[str, float], field: str
) -> None:
    assert main(["generate", "--model", str(tiny_llama), "--prompt", "hi", *flags]) == 2
    assert f"error: {field} " in capsys.readouterr().err
    with pytest.raises(SamplingParamsError, match=f"^{field} "):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(logprobs=21), "logprobs"), (dict(min_tokens=20, max_tokens=10), "min_tokens"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(temperature=float("nan")), "temperature"),
])
def test_other_invalid_sampling_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SamplingParamsError, match=f"^{field} "):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_invalid_prompts_raise_value_errors(llm: LLM) -> None:
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 512\)"):
        llm.generate([[1, 512]], SamplingParams())
    with pytest.raises(ValueError, match="got 1 sampling params for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_a_failed_batch_runs_none_of_its_prompts(llm: LLM) -> None:
    ok = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)
    with pytest.raises(PromptTooLongError):
        llm.generate(["fine", "a" * 2100], [ok, SamplingParams()])
    assert not llm._sinks
    wait_until(lambda: llm.core.num_unfinished == 0, timeout=5.0, what="the core to finish every request")
    alloc = llm.core.allocator
    wait_until(lambda: alloc.num_free == alloc.num_blocks, timeout=5.0, what="every KV block to be free")
    assert llm.generate(["fine"], SamplingParams(temperature=0.0, max_tokens=3))[0].finish_reason in ("stop", "length")


def engine_exception_classes() -> list[type[BaseException]]:
    """Every exception class defined in the `actors` package (what an engine actor may raise to its caller)."""
    import importlib
    import inspect
    import pkgutil

    import actors

    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(actors.__path__, "actors."):
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{obj.__module__}.{name}"] = obj
    return [found[k] for k in sorted(found)]


def test_every_engine_exception_survives_pickling() -> None:
    """Ray pickles an actor's exception to raise it in the caller: a class built from its message alone comes back
    equal; one whose constructor needs more must say how to rebuild itself (`__reduce__`), or the caller gets an
    UnserializableException (AdmissionRejected did not, H200 run 20: every refusal an HTTP 500)."""
    import pickle

    classes = engine_exception_classes()
    assert {c.__name__ for c in classes} >= {"AdmissionRejected", "ConfigError", "PromptTooLongError",
                                             "SamplingParamsError", "EngineDeadError"}
    for cls in classes:
        try:
            sent = cls("a message")
        except TypeError:
            assert cls.__reduce__ is not BaseException.__reduce__, f"{cls.__name__} cannot be rebuilt from its args"
            continue
        got = pickle.loads(pickle.dumps(sent))
        assert type(got) is cls and str(got) == "a message"


# -- structured outputs from the command line (the tiny model is random: check conformance, never the text) ----------

COLOR_SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"],
                "additionalProperties": False}


def generate_json(capsys: pytest.CaptureFixture[str], model: Path, *flags: str) -> dict[str, object]:
    assert main(["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "32", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_with_a_regex(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = generate_json(capsys, tiny_llama, "--regex", "[a-c]{2,5}-[0-9]{2}")
    assert re.fullmatch("[a-c]{2,5}-[0-9]{2}", str(result["text"])) and result["finish_reason"] == "stop"


def test_generate_with_choices(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate_json(capsys, tiny_llama, "--choice", "yes", "--choice", "no way")["text"] in ("yes", "no way")


def test_generate_with_a_json_schema_file(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(COLOR_SCHEMA))
    text = str(generate_json(capsys, tiny_llama, "--json-schema", str(schema_file), "--no-whitespace")["text"])
    jsonschema.validate(json.loads(text), COLOR_SCHEMA)
    assert " " not in text


@pytest.mark.parametrize("flags, message", [
    (["--regex", "a+", "--choice", "a"], "argument --choice: not allowed with argument --regex"),
    (["--json-schema", "no-such-schema.json"], "'no-such-schema.json' (neither a readable file nor inline JSON)"),
    (["--regex", "[a-"], 'invalid regex "[a-"'),
])
def test_bad_structured_output_flags_exit_2(tiny_llama: Path, capsys: pytest.CaptureFixture[str],
                                            flags: list[str], message: str) -> None:
    argv = ["generate", "--model", str(tiny_llama), "--prompt", "hi", *flags]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_a_schema_file_that_is_not_json_exits_2(tiny_llama: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["generate", "--model", str(tiny_llama), "--prompt", "hi", "--json-schema", str(bad)]) == 2
    assert f"schema file '{bad}' is not valid JSON" in capsys.readouterr().err

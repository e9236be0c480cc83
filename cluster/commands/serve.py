"""`semipd serve`: a semipd cluster on this machine (or joined to a Ray cluster) and its front ends.

Starts (or joins with --address) Ray, a private redis-server unless --redis is given,
the engine actors and the SLO controller (`cluster.bootstrap.ensure_cluster`), then the
OpenAI HTTP API (the Ray Serve app, `cluster.serve_app.build_app`; Serve's controller and
HTTP proxy start while the engines load) with the gRPC service in its replica; without the
Serve app, the gRPC server runs here over a Router.
`--self-test` sends one request through the HTTP API (or the Router) and prints the
answer. Ctrl-C / SIGTERM drains (new requests refused, in-flight ones finish within
--drain-timeout) and shuts everything down that this command started. A SIGTERM to the whole process group
(docker stop, systemd, Kubernetes) also ends the local Ray instance's GCS and raylet, which `ray.init` started
in it: the shutdown then skips what needs the GCS and ends the rest without it (`RayCalls`), within seconds.

It takes the `vllm serve` flags users know (README.md, 'From vllm serve'): the model as a positional argument,
vLLM's names for the engine settings semipd has, vLLM's flags for settings semipd has one value of (that value
only: any other is a usage error, exit 2) and flags that change nothing here (accepted, ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from types import ModuleType
from typing import Any

from cluster.local_ray import RayCalls, end_local_ray, stop_ray

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start a local semipd cluster with its HTTP and gRPC front ends",
                       usage="%(prog)s [-h] (MODEL | --model MODEL) [options]",
                       description="Start a local semipd cluster with its HTTP and gRPC front ends. vLLM's common "
                                   "`vllm serve` flags are taken too (README.md: 'From vllm serve').")
    _add_model(p)
    _add_cluster_flags(p)
    _add_engine_flags(p.add_argument_group("engine", "settings of every engine actor"))
    _add_frontend_flags(p.add_argument_group("front ends", "the OpenAI HTTP API and the gRPC service"))
    _add_vllm_fixed_flags(p.add_argument_group(
        "vLLM flags with a single setting in semipd", "the value shown is the only one accepted, how semipd always "
        "runs; (none): semipd has no such setting, and any value is refused"))
    _add_vllm_ignored_flags(p.add_argument_group(
        "vLLM flags semipd accepts and ignores", "they change nothing semipd does"))
    p.set_defaults(func=run)


class _PositionalModel(argparse.Action):
    """`semipd serve MODEL` (vLLM's form) sets what `--model MODEL` does."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values is not None:
            namespace.model = values


def _add_model(p: argparse.ArgumentParser) -> None:
    """The checkpoint, as `semipd serve MODEL` or `--model MODEL` (one of them, required)."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("model_tag", nargs="?", metavar="MODEL", action=_PositionalModel,
                       help="Hugging Face checkpoint directory (as `vllm serve MODEL`)")
    which.add_argument("--model", help="Hugging Face checkpoint directory (instead of MODEL)")


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-actors", type=int, default=1,
                   help="engine actors (one GPU each when GPUs exist; --mode disagg: two, prefill and decode)")
    p.add_argument("--redis", metavar="URL", default=None,
                   help="Redis for the SLO controller (default: $SEMIPD_REDIS_URL, else a private redis-server)")
    p.add_argument("--mode", default="semi-pd", choices=["semi-pd", "unified", "disagg"],
                   help="disagg: the DistServe-style baseline, a prefill GPU and a decode GPU per actor")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    p.add_argument("--policy", default="reactive",
                   help="split policy: reactive, model (latency model per engine), fixed (keep --prefill-sms), "
                        "or module:Class")
    p.add_argument("--prefill-sm-min", type=float, default=0.0, metavar="FRACTION",
                   help="lowest share of an engine's SMs the controller may give prefill (0..1)")
    p.add_argument("--prefill-sm-max", type=float, default=1.0, metavar="FRACTION",
                   help="highest share of an engine's SMs the controller may give prefill (0..1)")
    p.add_argument("--engine-restarts", type=int, default=3, metavar="N",
                   help="times an engine actor is started again when its process dies (an engine whose GPU "
                        "fails with a sticky CUDA error ends its requests with an error and exits for this) "
                        "(-1: always; default 3)")
    p.add_argument("--latency-profile", metavar="PATH", default=None,
                   help="--policy model: JSON latency profiles on the engines' nodes (loaded, or profiled and saved)")
    p.add_argument("--profile-grid", default="quick", choices=["quick", "full"],
                   help="--policy model: profiling grid when an engine has no saved profile")
    p.add_argument("--admission", default="off", choices=["off", "reject", "queue"],
                   help="admission control: a request predicted to miss --admission-slack x its TTFT target is "
                        "refused (reject: HTTP 429, gRPC RESOURCE_EXHAUSTED) or served after the others (queue; "
                        "for at most twice --ttft-slo-ms, then in its turn)")
    p.add_argument("--admission-slack", type=float, default=1.0, metavar="X",
                   help="admit while the predicted TTFT is at most X times the target (default 1; a value under 1 "
                        "allows for the prediction's error, as 0.8 did on documents in docs/perf/serve-h100.md; "
                        "/metrics' semipd:admission_ttft_ratio shows that error)")
    p.add_argument("--router-policy", default="least-loaded", choices=["least-loaded", "prefix-affinity"])
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--cluster-name", default="default", help="Redis key namespace")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on shutdown")
    p.add_argument("--self-test", action="store_true", help="send one request once up and print the answer")
    p.add_argument("--exit-after-self-test", action="store_true", help="shut down after --self-test")


VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")  # vLLM's --dtype choices
SUFFIXES = {"k": 1000, "K": 1 << 10, "m": 1000**2, "M": 1 << 20, "g": 1000**3, "G": 1 << 30}
_HUMAN_INT = re.compile(r"(\d+)([kKmMgG]?)|(\d+\.\d+)([kmg])")


def human_int(text: str) -> int:
    """An integer as vLLM's `--max-model-len` reads one: `2048`, `32k` (32000), `32K` (32768), `1.5k` (a decimal
    number only with a decimal suffix, k, m or g, and a whole result)."""
    found = _HUMAN_INT.fullmatch(text)
    if found is not None:
        number, suffix = found.group(1, 2) if found[1] is not None else found.group(3, 4)
        value = Fraction(number) * SUFFIXES.get(suffix, 1)
        if value.denominator == 1:
            return int(value)
    raise argparse.ArgumentTypeError(f"expected a whole number such as 2048, 32k or 32K, got {text!r}")


def _checked(convert: Callable[[str], Any], check: Callable[[Any], object]) -> Callable[[str], Any]:
    """An argparse type: `convert` the text, then `check` it with the engine's own validation (a config whose
    ConfigError becomes a usage error, exit 2, under the flag's name)."""
    from actors.config import ConfigError

    def parse(text: str) -> Any:
        value = convert(text)
        try:
            check(value)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = convert.__name__
    return parse


def _add_engine_flags(g: argparse._ArgumentGroup) -> None:
    from actors.config import CacheConfig, SchedulerConfig

    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=VLLM_DTYPES,
                   help="weights and KV dtype (auto: bfloat16 on GPU, the checkpoint's on CPU; float32 on CPU "
                        "only)")
    g.add_argument("--max-model-len", type=_checked(human_int, lambda v: SchedulerConfig(max_model_len=v)),
                   default=None, metavar="N",
                   help="longest prompt plus output in tokens, as vLLM's (2048, 32k, 32K; default: the model's "
                        "max_position_embeddings)")
    g.add_argument("--max-prefill-tokens", "--max-num-batched-tokens", dest="max_prefill_tokens", default=4096,
                   type=_checked(int, lambda v: SchedulerConfig(max_prefill_tokens=v)), metavar="N",
                   help="tokens of one prefill iteration, the chunk size of chunked prefill (vLLM's "
                        "--max-num-batched-tokens)")
    g.add_argument("--max-num-seqs", type=_checked(int, lambda v: SchedulerConfig(max_decode_seqs=v)), default=256,
                   metavar="N", help="most requests in a decode batch")
    g.add_argument("--gpu-memory-utilization", type=_checked(float, lambda v: CacheConfig(memory_fraction=v)),
                   default=0.85, metavar="FRACTION",
                   help="share of the GPU's memory an engine may fill, weights and KV cache (at most 0.98); sizes "
                        "the KV cache unless --num-pages")
    g.add_argument("--num-pages", type=_checked(int, lambda v: CacheConfig(num_pages=v)), default=None,
                   help="KV pages per engine (default: from memory)")
    g.add_argument("--block-size", type=_checked(int, lambda v: CacheConfig(page_size=v)), default=16, metavar="N",
                   help="tokens per KV page (a power of two)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV pages of a prompt's cached prefix")
    g.add_argument("--seed", type=int, default=0, help="seed of the engines' sampling (and of --load-format dummy)")
    g.add_argument("--decode-attention", default="fa2", choices=["fa2", "fa3", "cuda-cores"],
                   help="flashinfer's decode-attention kernel (GPU)")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights drawn on the device (speed runs without a checkpoint)")
    g.add_argument("--prefill-sms", type=int, default=None,
                   help="semi-pd: SMs given to prefill at start (default: about half; the nearest split is used)")
    g.add_argument("--no-overlap-decode", dest="overlap_decode", action="store_false",
                   help="decode (unified: every batch) one step at a time (by default the next step is queued "
                        "while the current one runs)")
    g.add_argument("--no-overlap-prefill", dest="overlap_prefill", action="store_false",
                   help="semi-pd: take each prefill iteration's first tokens before planning the next (by default "
                        "the next iteration is queued while the current one runs)")
    g.add_argument("--decode-pace-ms", type=float, default=None, metavar="MS",
                   help="semi-pd: while prefill has work, start at most one decode step per MS (under the TPOT "
                        "target), leaving prefill the memory bandwidth of back-to-back steps (default: back to back)")
    g.add_argument("--prefill-layers-ahead", type=int, default=8, metavar="N",
                   help="semi-pd on a GPU: queue at most N decoder layers of a prefill iteration ahead of its SMs, "
                        "so that prefill's kernels do not fill CUDA's launch queue, which decode's launches share "
                        "(default: 8; 0: an iteration at once)")
    g.add_argument("--switch-interval-ms", type=float, default=None, metavar="MS",
                   help="Python thread switch interval the engines set (default: Python's 5 ms); the engine "
                        "workers and the token streaming share one interpreter lock")
    g.add_argument("--prefill-order", default="fcfs", choices=["fcfs", "edf"],
                   help="order of waiting prompts: first come first served, or earliest TTFT deadline first (a "
                        "request's own ttft target, else --ttft-slo-ms; one waiting twice its target goes first)")


def _add_frontend_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--host", default="127.0.0.1", help="HTTP bind address (vLLM's default: all interfaces)")
    g.add_argument("--http-port", "--port", dest="http_port", type=int, default=8000,
                   help="OpenAI HTTP port (0: no HTTP front end)")
    g.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: no gRPC front end)")
    g.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL's "
                                                                 "directory name)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the HTTP API (default: $SEMIPD_API_KEY; unset: open)")
    add_output_parser_flags(g)
    g.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="tokens per streamed chunk after the first: fewer, larger SSE events "
                        "(vLLM's --stream-interval)")
    g.add_argument("--num-replicas", type=int, default=1,
                   help="replicas of the HTTP/gRPC ingress (Ray Serve deployment); each relays the tokens of the "
                        "requests it serves, so more replicas spread that CPU work")


def only(value: str, why: str, convert: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """An argparse type for a vLLM flag semipd takes only at `value` (compared after `convert`): any other value
    is a usage error (exit 2) saying `why`."""

    def parse(text: str) -> Any:
        try:
            ok = convert(text) == convert(value)
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"semipd supports only {value} ({why}), got {text!r}")
        return convert(text)

    return parse


def refused(why: str) -> Callable[[str], Any]:
    """An argparse type for a vLLM flag semipd takes no value of: any is a usage error (exit 2) saying `why`."""

    def parse(text: str) -> Any:
        raise argparse.ArgumentTypeError(f"not supported by semipd: {why}")

    return parse


def _add_vllm_fixed_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--tensor-parallel-size", "-tp", type=only("1", "an engine runs on one GPU; --num-actors "
                                                                   "starts more engines", int),
                   default=1, metavar="1")
    g.add_argument("--pipeline-parallel-size", "-pp", type=only("1", "an engine runs on one GPU; --num-actors "
                                                                     "starts more engines", int),
                   default=1, metavar="1")
    g.add_argument("--kv-cache-dtype", type=only("auto", "the KV cache has the model's --dtype"),
                   default="auto", metavar="auto")
    g.add_argument("--quantization", "-q", type=refused("semipd serves unquantized checkpoints (float16, bfloat16, "
                                                        "float32) only"),
                   default=None, metavar="(none)", help="no value is accepted: unquantized checkpoints only")
    g.add_argument("--max-logprobs", type=only("20", "logprobs and top_logprobs go up to 20", int), default=20,
                   metavar="20")
    g.add_argument("--response-role", type=only("assistant", "a chat reply's role is assistant"),
                   default="assistant", metavar="assistant")
    g.add_argument("--generation-config", type=only("auto", "the sampling defaults come from MODEL's "
                                                            "generation_config.json"),
                   default="auto", metavar="auto")
    g.add_argument("--chat-template", type=refused("the chat template is the checkpoint's own (its "
                                                   "tokenizer_config.json or chat_template.jinja)"),
                   default=None, metavar="(none)", help="no value is accepted: the checkpoint's template is used")
    g.add_argument("--middleware", type=refused("the HTTP app takes no extra middleware"), default=None,
                   metavar="(none)", help="no value is accepted")
    g.add_argument("--allowed-origins", type=refused("the HTTP API sends no CORS headers; put a proxy that adds "
                                                     "them in front of it"),
                   default=None, metavar="(none)", help="no value is accepted (no CORS)")


def _add_vllm_ignored_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--disable-log-requests", action="store_true", help="semipd logs no line per request")
    g.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False,
                   help="semipd logs no line per request")
    g.add_argument("--disable-log-stats", action="store_true", help="semipd logs no periodic stats (see "
                                                                     "/metrics and `semipd status`)")
    g.add_argument("--uvicorn-log-level", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   default="info", help="the HTTP server is Ray Serve's proxy, which logs as Ray's settings say")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="always on: tool calls are read (--tool-call-parser) whenever a request gives tools")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="semipd runs its own code for the architectures it supports, never a checkpoint's")
    g.add_argument("--root-path", default=None, metavar="PATH",
                   help="the API is served at /, with no pages or redirects that name their own URL (a proxy in "
                        "front strips its prefix)")


def add_output_parser_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """How chat outputs are read (`--tool-call-parser`, `--reasoning-parser`): `serve` and `run-batch` take both."""
    p.add_argument("--tool-call-parser", default="hermes", choices=["hermes", "llama3_json"],
                   help="how chat outputs are read for tool calls when a request gives tools (vLLM's names)")
    p.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                   help="read a reasoning model's <think>...</think> as the chat message's `reasoning`, the rest as "
                        "its content (vLLM's names; default: none, all of the output is content)")


def cluster_config(args: argparse.Namespace, redis_url: str | None) -> Any:
    from actors.slo.types import SLOTargets
    from cluster.bootstrap import ClusterConfig, EngineOptions
    from cluster.routing import RouterPolicy

    return ClusterConfig(
        model=args.model, num_actors=args.num_actors, mode=args.mode, redis_url=redis_url,
        slo=SLOTargets(args.ttft_slo_ms, args.tpot_slo_ms), policy=args.policy,
        prefill_sm_fraction=(args.prefill_sm_min, args.prefill_sm_max),
        latency_profile=args.latency_profile, profile_grid=args.profile_grid,
        router=RouterPolicy(session_affinity=args.router_policy == "prefix-affinity"),
        engine=EngineOptions(**engine_settings(args)),
        cluster_name=args.cluster_name, served_model_name=args.served_model_name, stream_interval=args.stream_interval,
        engine_restarts=args.engine_restarts,
    )


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings that `EngineOptions` and the Serve app's `ServeArgs` both take, under their names (the
    vLLM-named flags renamed)."""
    return dict(device=args.device, dtype=args.dtype, seed=args.seed, page_size=args.block_size,
                num_pages=args.num_pages, decode_attention=args.decode_attention,
                memory_fraction=args.gpu_memory_utilization, enable_prefix_caching=args.enable_prefix_caching,
                max_prefill_tokens=args.max_prefill_tokens, max_decode_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len, load_format=args.load_format, prefill_sms=args.prefill_sms,
                overlap_decode=args.overlap_decode, overlap_prefill=args.overlap_prefill,
                decode_pace_ms=args.decode_pace_ms, prefill_layers_ahead=args.prefill_layers_ahead,
                switch_interval_ms=args.switch_interval_ms, prefill_order=args.prefill_order, admission=args.admission,
                admission_slack=args.admission_slack)


def check_ports(args: argparse.Namespace) -> None:
    """ValueError (exit 2) for ports that could only fail to bind once Ray and the engines are up."""
    for flag, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port)):
        if not 0 <= port <= 65535:
            raise ValueError(f"{flag} must be in [0, 65535] (0: off), got {port}")
    if args.http_port and args.http_port == args.grpc_port:
        raise ValueError(f"--http-port and --grpc-port must differ, both are {args.http_port}")
    for flag, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port)):
        if port and (error := _bind_error(args.host, port)) is not None:
            raise ValueError(f"{flag} {port} cannot be bound on {args.host} ({error}): is another server using it?")


def _bind_error(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now (None: it could). SO_REUSEADDR as the HTTP server sets it:
    a port another server listens on is refused, one left in TIME_WAIT is not. No SO_REUSEPORT, which gRPC sets:
    another gRPC server on the port would share it with this one silently."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:  # socket.gaierror included
        return e.strerror or str(e)
    return None


def serve_app_args(args: argparse.Namespace, redis_url: str | None, grpc_port: int | None) -> dict[str, Any]:
    """Application arguments for `cluster.serve_app.build_app` (its ServeArgs)."""
    from cluster.bootstrap import API_KEY_ENV

    return dict(model=args.model, served_model_name=args.served_model_name, ttft_slo_ms=args.ttft_slo_ms,
                api_key_env=API_KEY_ENV if args.api_key else None, tool_call_parser=args.tool_call_parser,
                reasoning_parser=args.reasoning_parser,
                tpot_slo_ms=args.tpot_slo_ms, mode=args.mode, router_policy=args.router_policy,
                num_actors=args.num_actors, redis_url=redis_url, grpc_port=grpc_port or None,
                **engine_settings(args), stream_interval=args.stream_interval,
                prefill_sm_min=args.prefill_sm_min or None,
                prefill_sm_max=args.prefill_sm_max if args.prefill_sm_max < 1.0 else None,
                controller_policy=args.policy, latency_profile=args.latency_profile, profile_grid=args.profile_grid,
                cluster_name=args.cluster_name, num_replicas=args.num_replicas)


def _optional_module(name: str) -> ModuleType | None:
    """Import a front-end module written elsewhere; None (logged) if it is not there yet."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        log.warning("%s is not available: that front end is off", name)
        return None


@dataclass
class Started:
    """What this command started, to be stopped in reverse order."""

    redis: Any = None
    ray_started: bool = False
    cluster: Any = None
    serve_start: ServeStart | None = None  # Serve's controller and HTTP proxy, started beside the engines
    drained: bool = False  # the serving loop drained (or a second signal cut its drain short)
    rc: int | None = None  # the serving loop's exit status, once it returned
    created: list[str] = field(default_factory=list)  # actors started here, as they start (ensure_cluster)
    endpoints: dict[str, str] = field(default_factory=dict)


class ServeStart:
    """`serve.start` in a thread of its own, so that Serve's controller and HTTP proxy come up while the engines
    load (on the H100, run 29: 29 s of `serve.start` after 45 s of engine start-up, one after the other)."""

    def __init__(self, host: str, port: int) -> None:
        from ray import serve

        self._failed: list[BaseException] = []

        def start() -> None:
            try:
                serve.start(http_options={"host": host, "port": port})
            except BaseException as e:  # raised in `wait`
                self._failed.append(e)

        self.thread = threading.Thread(target=start, name="semipd serve start", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Return once Serve has started; raise what `serve.start` raised."""
        while self.thread.is_alive():
            self.thread.join(0.2)  # a signal's exception comes through between joins
        if self._failed:
            raise self._failed[0]


EXIT_ON_SIGNAL = 128  # + the signal's number, as a shell reports a process a signal ended (SIGINT: 130)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(EXIT_ON_SIGNAL + signum)


def _catch_sigterm() -> None:
    """SIGTERM outside the serving loop (start-up, shutdown) ends the command as Ctrl-C does: an exception, so
    that `run` stops what it started, and exit code 143. Its default action ended the process at once, leaving
    the private redis-server (in its own session) running and its directory behind; Ray's handler, which
    `ray.init` installs, exits with code 15, and the serving loop's end restores the default action."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def run(args: argparse.Namespace) -> int:
    import ray

    from cluster.bootstrap import (
        API_KEY_ENV, LOG_LEVEL_ENV, drain_cluster, ensure_cluster, env_defaults, teardown_cluster,
    )
    from cluster.redis_server import RedisServerProcess

    started = Started()
    redis_url = args.redis or env_defaults().get("redis_url")
    args.api_key = args.api_key or env_defaults().get("api_key")
    cluster_config(args, None)  # flags are checked before anything starts
    check_ports(args)
    app_module = _optional_module("cluster.serve_app") if args.http_port else None
    if app_module is not None:
        app_module.ServeArgs(**serve_app_args(args, None, args.grpc_port))  # a pydantic ValidationError is a ValueError
    sigterm = signal.getsignal(signal.SIGTERM)
    _catch_sigterm()
    try:
        if redis_url is None:
            started.redis = RedisServerProcess()  # kept before it starts: a signal while it starts stops it too
            started.redis.start()
            redis_url = started.redis.url
        cfg = cluster_config(args, redis_url)
        started.endpoints["redis"] = redis_url
        # "local": a new instance even if another one runs on this machine (ray.init() would join it)
        # the Serve replicas read the API key from their environment (the job's runtime env); every worker of
        # the job logs at the job's --log-level
        env_vars = {LOG_LEVEL_ENV: args.log_level.upper(), **({API_KEY_ENV: args.api_key} if args.api_key else {})}
        runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "cluster.cli.configure_worker_logging"}
        started.ray_started = args.address is None  # before: a local instance interrupted while starting is stopped
        ray.init(address=args.address or "local", namespace=cfg.namespace, runtime_env=runtime_env,
                 include_dashboard=False if not args.address else None)
        _catch_sigterm()  # ray.init installed its own handler
        started.endpoints["ray"] = ray.get_runtime_context().gcs_address
        print(f"starting {cfg.num_actors} engine actor(s) for {cfg.model} ({cfg.mode}) ...", flush=True)
        if app_module is not None:
            started.serve_start = ServeStart(args.host, args.http_port)
        started.cluster = ensure_cluster(cfg, created=started.created)
        for name, info in started.cluster.infos.items():
            started.endpoints[name] = f"node {info['node_id'][:12]}, {info['mode']}, {info['total_sms']} SMs"
        grpc_in_app = False
        if started.serve_start is not None:  # started above exactly when there is a Serve app
            from ray import serve

            started.serve_start.wait()
            grpc_in_app = bool(args.grpc_port)
            app = app_module.build_app(serve_app_args(args, redis_url, args.grpc_port if grpc_in_app else None))
            serve.run(app, name="semipd", route_prefix="/")
            started.endpoints["http"] = f"http://{args.host}:{args.http_port}/v1"
            if grpc_in_app:
                started.endpoints["grpc"] = f"{args.host}:{args.grpc_port} (in the Serve replica)"
        started.rc = asyncio.run(_serve(args, cfg, started, run_grpc=bool(args.grpc_port) and not grpc_in_app))
        return started.rc
    finally:
        try:
            _shutdown(args, started, drain_cluster, teardown_cluster)
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)


async def _serve(args: argparse.Namespace, cfg: Any, started: Started, run_grpc: bool) -> int:
    stop = asyncio.Event()  # Ctrl-C / SIGTERM from here on drains: the HTTP app is up already
    hurry = asyncio.Event()  # a second one: stop without waiting for the requests in flight
    signals: list[int] = []

    def on_signal(sig: int) -> None:
        signals.append(sig)
        if stop.is_set():
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _serve_until_stopped(args, cfg, started, run_grpc, stop, hurry, signals)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C raises again; SIGTERM too (not its default action)
            loop.remove_signal_handler(sig)
        _catch_sigterm()


async def _serve_until_stopped(args: argparse.Namespace, cfg: Any, started: Started, run_grpc: bool,
                               stop: asyncio.Event, hurry: asyncio.Event, signals: list[int]) -> int:
    from cluster.router import Router

    router = await asyncio.to_thread(Router.connect, cfg.actor_names, cfg.namespace, cfg.router, cfg.actor_prefix,
                                     cfg.served_model_name)
    refresher = asyncio.create_task(router.run_refresh_loop())
    grpc = None
    if run_grpc:
        mod = _optional_module("cluster.grpc_server")
        if mod is not None:
            from actors.engine.frontend import Tokenizer

            grpc = mod.GrpcServer(router, Tokenizer(cfg.model), port=args.grpc_port, host=args.host)
            port = await grpc.start()
            started.endpoints["grpc"] = f"{args.host}:{port}"
    print("semipd is up:")
    for what, where in started.endpoints.items():
        print(f"  {what:18s} {where}")
    print(f"  status             semipd status --redis {started.endpoints['redis']}", flush=True)
    rc = 0
    if args.self_test:
        rc = await _self_test(args, router, started)
    if not args.exit_after_self_test and not stop.is_set():
        print("serving; Ctrl-C to stop", flush=True)
        await stop.wait()
    print(f"draining (up to {args.drain_timeout:.0f} s; Ctrl-C again to stop without waiting) ...", flush=True)
    # the front end and the engines at once, to one deadline (one after the other, each took its own)
    drains = asyncio.gather(router.drain(args.drain_timeout),
                            *([grpc.drain(args.drain_timeout)] if grpc is not None else []))
    cut = asyncio.ensure_future(hurry.wait())
    await asyncio.wait({drains, cut}, return_when=asyncio.FIRST_COMPLETED)
    cut.cancel()
    started.drained = True  # the shutdown ends what is still in flight instead of waiting for it again
    if drains.done():
        remaining = drains.result()[0]
        if remaining:
            print(f"{remaining} request(s) still in flight at the drain deadline", flush=True)
    else:
        drains.cancel()
        print("stopping without waiting for the requests in flight", flush=True)
        rc = EXIT_ON_SIGNAL + signals[-1]
    if grpc is not None:
        await grpc.stop(grace=None if hurry.is_set() else 5.0)
    refresher.cancel()
    return rc


async def _self_test(args: argparse.Namespace, router: Any, started: Started) -> int:
    """One greedy request through HTTP when the Serve app is up, else through the Router."""
    prompt, max_tokens = "Hello", 16
    t0 = time.monotonic()
    try:
        if "http" in started.endpoints:
            import httpx

            base = f"http://{args.host}:{args.http_port}"
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            async with httpx.AsyncClient(timeout=120, headers=headers) as client:
                model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
                r = await client.post(f"{base}/v1/completions", json=dict(
                    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0))
                r.raise_for_status()
                text, via = r.json()["choices"][0]["text"], "HTTP /v1/completions"
        else:
            from actors.engine.frontend import Tokenizer
            from actors.request import SamplingParams
            from cluster.engine_client import GenerateRequest

            tok = Tokenizer(router.model_info().model_dir)
            req = GenerateRequest(f"self-test-{uuid.uuid4().hex[:8]}", tok.encode(prompt),
                                  SamplingParams(max_tokens=max_tokens, temperature=0))
            ids: list[int] = []
            async for chunk in router.generate(req):
                ids.extend(chunk.token_ids)
                if chunk.error:
                    raise RuntimeError(chunk.error)
            text, via = tok.decode(ids), "the Router"
    except Exception as e:
        print(f"self-test FAILED: {type(e).__name__}: {e}", flush=True)
        return 1
    print(f"self-test via {via} ({time.monotonic() - t0:.2f} s): {prompt!r} -> {text!r}", flush=True)
    return 0


def _shutdown(args: argparse.Namespace, started: Started, drain: Any, teardown: Any,
              calls: RayCalls | None = None) -> None:
    """Stop what this command started: the engine actors it created, Serve, Ray, Redis.

    Every step is tried: a Ctrl-C or SIGTERM cuts the step it comes in short (a second Ctrl-C during the drain
    stops waiting for the requests in flight) and is raised once all are done; a step that fails is logged.
    The engines go before the HTTP front end: requests still running past the drain deadline end with an
    error through it (Serve's shutdown first cut their connections mid-stream).
    The steps that talk to Ray go through `calls` (a `RayCalls`): once Ray's GCS stops answering (a signal to the
    whole process group stopped the local Ray instance too) they are skipped, the local instance's processes
    are ended without it, and the process ends here, past Ray's exit handler (`_exit_past_ray`).
    """
    import ray

    _catch_sigterm()
    calls = calls if calls is not None else RayCalls()
    interrupted: BaseException | None = None

    def step(what: str, fn: Any, *fn_args: Any, **kwargs: Any) -> None:
        nonlocal interrupted
        try:
            fn(*fn_args, **kwargs)
        except (KeyboardInterrupt, SystemExit) as e:
            print(f"{what}: interrupted", file=sys.stderr, flush=True)
            interrupted = interrupted or e
        except Exception as e:
            log.warning("%s failed: %s", what, e)

    def ray_step(what: str, fn: Any, *fn_args: Any, **kwargs: Any) -> None:
        step(what, calls.call, what, fn, *fn_args, **kwargs)

    if ray.is_initialized() and (started.cluster is not None or started.created):
        from cluster.bootstrap import resume_cluster

        cfg = cluster_config(args, started.endpoints.get("redis"))
        ready = started.cluster is not None  # else the start-up was cut short: nothing served yet
        if ready and not started.drained:  # actors still serving (an error before the drain) finish in-flight work
            ray_step("drain", drain, cfg, args.drain_timeout)
        if started.ray_started:  # everything in this Ray instance is this command's
            ray_step("engine shutdown", teardown, cfg, names=None, controller=True, graceful=ready)
        else:  # joined a cluster: stop the actors this command started, and let the others serve again
            ray_step("engine shutdown", teardown, cfg, names=[n for n in cfg.actor_names if n in started.created],
                     controller=cfg.controller_name in started.created, graceful=ready)
            ray_step("resume", resume_cluster, cfg, [n for n in cfg.actor_names if n not in started.created])
    if started.serve_start is not None:
        from ray import serve

        if started.serve_start.thread.is_alive():  # interrupted while the engines started: let it finish first
            ray_step("serve start", started.serve_start.thread.join)
        ray_step("serve shutdown", serve.shutdown)
    if started.ray_started or ray.is_initialized():
        step("ray shutdown", stop_ray, calls)
    without_ray = calls.lost or calls.blocked  # Ray's exit handler would wait for its GCS or for the call
    if without_ray and started.ray_started:
        step("ray processes", end_local_ray)
    if started.redis is not None:
        step("redis-server shutdown", started.redis.cleanup)
    print("semipd stopped", file=sys.stderr, flush=True)
    if without_ray:
        _exit_past_ray(interrupted, started.rc)
    if interrupted is not None:
        raise interrupted


def _exit_past_ray(interrupted: BaseException | None, rc: int | None) -> None:
    """End the process now, without Ray's exit handler (`ray.shutdown`), which waits for a GCS that is gone (and for
    a call blocked in Ray, then crashes), with the status the command would have had: that of the signal that
    interrupted the shutdown or the command, else of an error that ended it, else the serving loop's `rc`."""
    ended = interrupted or sys.exc_info()[1]  # called from `run`'s `finally`: what ends the command, if anything
    if isinstance(ended, SystemExit):
        status = ended.code if isinstance(ended.code, int) else 1
    elif isinstance(ended, KeyboardInterrupt):
        status = EXIT_ON_SIGNAL + signal.SIGINT
    elif ended is not None:
        traceback.print_exception(ended)
        status = 1
    else:
        status = rc if rc is not None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

"""The Ray Serve application: the OpenAI-compatible API (and the gRPC service) of a cluster.

Entry point `cluster.serve_app:build_app` (for `serve run`, `serve deploy`, KubeRay's
`serveConfigV2`), with application arguments:

    model                 checkpoint directory (required)
    served_model_name     the name clients send (default: the directory's name)
    stream_interval       tokens per streamed chunk after the first, from the engine actors (default 1)
    ttft_slo_ms, tpot_slo_ms    SLO targets of the controller
    mode                  semi-pd | unified | disagg (a prefill GPU and a decode GPU per actor)
    prefill_sm_min, prefill_sm_max   bounds of the prefill SM fraction (0..1)
    router_policy         least-loaded | prefix-affinity, or a dict of RouterPolicy fields
    num_actors            GPU engine actors
    redis_url             SLO controller state (default: $SEMIPD_REDIS_URL; none: no controller)
    api_key_env           name of the environment variable holding the API key (none: no key)
    tool_call_parser      hermes | llama3_json: how chat outputs are read for tool calls (cluster.openai_api.tools)
    reasoning_parser      deepseek_r1 | qwen3 | none: how chat outputs are read for reasoning
                          (cluster.openai_api.reasoning; none: all content)
    grpc_port             serve semipd.v1.Generation on this port from each replica (0/none: off)
    page_size, max_prefill_tokens, num_pages, device, prefill_sms, overlap_decode,
      overlap_prefill, decode_pace_ms, prefill_layers_ahead, switch_interval_ms   engine settings
    max_model_len, max_decode_seqs, memory_fraction, enable_prefix_caching, dtype, seed
                          engine settings too (vLLM's max_model_len, max_num_seqs, gpu_memory_utilization,
                          enable_prefix_caching, dtype, seed)
    prefill_order         fcfs | edf (earliest TTFT deadline first)
    admission, admission_slack   off | reject | queue: a request predicted past slack x its TTFT target
    controller_policy, cluster_name   SLO controller policy (reactive, model, fixed) and Redis key namespace
    latency_profile, profile_grid     controller_policy "model": the engines' profile file and grid
    local                 true: one in-process engine in the replica, no actors, no router
    num_replicas, replica_num_cpus, replica_num_gpus   the ingress deployment's size
    max_ongoing_requests                           concurrent requests per ingress replica

Each replica builds its `EngineClient` at start: `Router.connect(...)` over the engine
actors that `ensure_cluster(cfg)` gets or starts (they are detached and shared by all
replicas), or a `LocalEngineClient` when `local` is set. The actors a replica starts are recorded as the app's,
with their settings (`cluster.bootstrap.record_owner`); deleting the app (`serve.delete`, `serve shutdown`) drains
and stops them, and a redeploy's replicas drain and replace those whose settings it changes and stop the engines
beyond its `num_actors`. Actors the app found running are used as they are, never stopped; a replica's restart or
a scale-down leaves all running.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.config import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

    from cluster.bootstrap import ClusterConfig
    from cluster.engine_client import EngineClient
    from cluster.grpc_server import GrpcServer
    from cluster.routing import RouterPolicy

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "semipd-openai"
ROUTER_POLICIES = ("least-loaded", "prefix-affinity")
DRAIN_TIMEOUT_S = 30.0
# a replica's own drain, then (the app deleted) the engines' drain and their shutdown
SHUTDOWN_TIMEOUT_S = 2 * DRAIN_TIMEOUT_S + 30


class ServeArgs(BaseModel):
    """The application arguments (strings from `serve run k=v` are coerced)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    served_model_name: str | None = None
    stream_interval: int = Field(1, ge=1)
    ttft_slo_ms: float | None = Field(None, gt=0)
    tpot_slo_ms: float | None = Field(None, gt=0)
    mode: Literal["semi-pd", "unified", "disagg"] = "semi-pd"
    prefill_sm_min: float | None = Field(None, gt=0, lt=1)
    prefill_sm_max: float | None = Field(None, gt=0, lt=1)
    router_policy: str | dict[str, Any] = "least-loaded"
    num_actors: int = Field(1, ge=1)
    redis_url: str | None = None
    api_key_env: str | None = None
    tool_call_parser: Literal["hermes", "llama3_json"] = "hermes"
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = None
    grpc_port: int | None = Field(None, ge=0, le=65535)
    page_size: int | None = None
    max_prefill_tokens: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    max_decode_seqs: int | None = Field(None, ge=1)
    memory_fraction: float | None = Field(None, gt=0, le=0.98)
    enable_prefix_caching: bool | None = None
    dtype: str | None = None
    seed: int | None = None
    local: bool = False
    device: str = "auto"
    num_pages: int | None = Field(None, ge=2)
    decode_attention: Literal["fa2", "fa3", "cuda-cores"] | None = None
    prefill_sms: int | None = Field(None, ge=1)
    overlap_decode: bool | None = None
    overlap_prefill: bool | None = None
    decode_pace_ms: float | None = Field(None, gt=0, le=1000)
    prefill_layers_ahead: int | None = Field(None, ge=0)
    switch_interval_ms: float | None = Field(None, gt=0, le=1000)
    load_format: Literal["auto", "dummy"] | None = None
    prefill_order: Literal["fcfs", "edf"] | None = None
    admission: Literal["off", "reject", "queue"] | None = None
    admission_slack: float | None = Field(None, gt=0)
    controller_policy: str | None = None
    latency_profile: str | None = None
    profile_grid: Literal["quick", "full"] | None = None
    cluster_name: str | None = None
    num_replicas: int = Field(1, ge=1)
    replica_num_cpus: float = Field(1.0, ge=0)
    replica_num_gpus: float = Field(0.0, ge=0)
    # Serve's default (5) would queue all but 5 streams per replica in the proxy; admission is the engine's job
    max_ongoing_requests: int = Field(4096, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ServeArgs:
        lo, hi = self.prefill_sm_min, self.prefill_sm_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"prefill_sm_min ({lo}) must not exceed prefill_sm_max ({hi})")
        if isinstance(self.router_policy, str) and self.router_policy not in ROUTER_POLICIES:
            raise ValueError(f"router_policy must be one of {ROUTER_POLICIES} or a dict, got {self.router_policy!r}")
        return self

    @classmethod
    def parse(cls, args: dict[str, Any]) -> ServeArgs:
        try:
            return cls.model_validate(args)
        except ValidationError as e:
            raise ConfigError(f"invalid semipd application arguments: {e}") from None


def redis_url_of(args: ServeArgs) -> str | None:
    """The controller's Redis: the `redis_url` arg, else $SEMIPD_REDIS_URL (None: no controller)."""
    from cluster.bootstrap import env_defaults

    return args.redis_url or env_defaults().get("redis_url")


def read_env(args: ServeArgs) -> dict[str, str | None]:
    """The environment this app reads (only here): the API key and the Redis URL default."""
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise ConfigError(f"api_key_env is {args.api_key_env!r} but that variable is empty or unset")
    return {"api_key": api_key, "redis_url": redis_url_of(args)}


def router_policy(value: str | dict[str, Any]) -> RouterPolicy:
    from cluster.routing import RouterPolicy

    if isinstance(value, dict):
        return RouterPolicy(**value)
    # least-loaded: lowest predicted TTFT; prefix-affinity: same x-session-id -> same engine
    return RouterPolicy(session_affinity=value == "prefix-affinity")


def cluster_config(args: ServeArgs, redis_url: str | None) -> ClusterConfig:
    """The ClusterConfig the replicas agree on (with `semipd serve`, via cluster.bootstrap); raises ConfigError
    for settings the engines, the controller or the model directory refuse."""
    from actors.slo.types import SLOTargets
    from cluster.bootstrap import ClusterConfig, EngineOptions

    slo = {k: v for k, v in (("ttft_ms", args.ttft_slo_ms), ("tpot_ms", args.tpot_slo_ms)) if v is not None}
    engine = {f.name: v for f in fields(EngineOptions)  # the engine settings the app takes, those given
              if f.name in ServeArgs.model_fields and (v := getattr(args, f.name)) is not None}
    extra = {k: v for k, v in (("policy", args.controller_policy), ("cluster_name", args.cluster_name),
                               ("latency_profile", args.latency_profile), ("profile_grid", args.profile_grid))
             if v is not None}
    if args.prefill_sm_min is not None or args.prefill_sm_max is not None:
        extra["prefill_sm_fraction"] = (args.prefill_sm_min or 0.0, args.prefill_sm_max or 1.0)
    return ClusterConfig(model=args.model, num_actors=args.num_actors, mode=args.mode, redis_url=redis_url,
                         slo=SLOTargets(**slo), router=router_policy(args.router_policy),
                         engine=EngineOptions(**engine), served_model_name=args.served_model_name,
                         stream_interval=args.stream_interval, **extra)


def local_client(args: ServeArgs) -> EngineClient:
    """One in-process engine with the engine settings, SLO targets, prefill order and admission of `args`."""
    from cluster.engine_client import LocalEngineClient

    return LocalEngineClient(cluster_config(args, None).engine_config(), served_name=args.served_model_name)


def app_owner(app_name: str) -> str:
    """The owner recorded for the actors the replicas of Serve application `app_name` start."""
    return f"serve-app:{app_name}"


def cluster_client(cfg: ClusterConfig, owner: str) -> EngineClient:
    """Replace or stop the actors `owner` started that do not run as `cfg` asks (a redeploy's changed settings or
    lower `num_actors`: drained first), get or start the engine actors (those started are recorded as `owner`'s),
    then a Router over them (blocking; run it in a thread). The replicas of an app do the first two steps one at
    a time (`start_lock`), so one of them replaces the engines and the others attach to the new ones."""
    from cluster.bootstrap import ensure_cluster, outdated_actors, record_owner, retire_actors, start_lock
    from cluster.router import Router

    created: list[str] = []
    with start_lock(cfg, timeout_s=SHUTDOWN_TIMEOUT_S + 2 * cfg.ready_timeout_s):  # another replica's whole start
        retire_actors(cfg, outdated_actors(cfg, owner), DRAIN_TIMEOUT_S)
        try:
            ensure_cluster(cfg, created=created)
        finally:
            record_owner(cfg, created, owner)
    return Router.connect(names=cfg.actor_names, namespace=cfg.namespace, policy=cfg.router,
                          prefix=cfg.actor_prefix, served_name=cfg.served_model_name, timeout_s=cfg.ready_timeout_s)


class OpenAIIngress:
    """One Serve replica: an EngineClient, the OpenAI app over it, optionally a gRPC server.

    Wrapped by `serve.deployment(serve.ingress()(...))` in `build_app`; Serve calls
    `__serve_build_asgi_app__` after `__init__` for the app.
    """

    async def __init__(self, args: dict[str, Any]) -> None:
        from ray import serve

        from actors.engine.frontend import Tokenizer

        self.args = ServeArgs.parse(args)
        env = read_env(self.args)
        self.api_key = env["api_key"]
        self.app_name = serve.get_replica_context().app_name
        self.cluster: ClusterConfig | None = None
        if self.args.local:
            self.client = await asyncio.to_thread(local_client, self.args)
        else:
            self.cluster = cluster_config(self.args, env["redis_url"])
            self.client = await asyncio.to_thread(cluster_client, self.cluster, app_owner(self.app_name))
        self.tokenizer = Tokenizer(self.args.model)
        self.openai_app: FastAPI | None = None  # not `app`: Serve's wrapper owns that name
        self.grpc: GrpcServer | None = None
        if self.args.grpc_port:
            from cluster.grpc_server import GrpcServer

            self.grpc = GrpcServer(self.client, self.tokenizer, port=self.args.grpc_port)
            await self.grpc.start()

    async def __serve_build_asgi_app__(self) -> FastAPI:
        from cluster.openai_api import create_app

        self.openai_app = create_app(self.client, self.tokenizer, api_key=self.api_key,
                                     echo_request_id=False,  # Serve's proxy echoes it
                                     tool_call_parser=self.args.tool_call_parser,
                                     reasoning_parser=self.args.reasoning_parser)
        return self.openai_app

    async def check_health(self) -> None:
        """Serve's replica health check: a local engine that stopped making progress fails it."""
        if not self.args.local:
            return  # the engines are separate actors; restarting this replica would not help them
        loads = await self.client.loads()
        if not any(l.healthy for l in loads):
            raise RuntimeError("the local engine makes no progress")

    async def __del__(self) -> None:
        """Replica shutdown (Serve already drained HTTP): drain gRPC, stop a local engine; when Serve deletes the
        app, stop the engine actors and the controller its replicas started (not those they found running)."""
        app: FastAPI | None = getattr(self, "openai_app", None)  # None if __init__ failed early
        if app is not None:
            app.state.openai.draining = True
        grpc_server: GrpcServer | None = getattr(self, "grpc", None)
        if grpc_server is not None:
            await grpc_server.drain(DRAIN_TIMEOUT_S)
            await grpc_server.stop()
        shutdown = getattr(getattr(self, "client", None), "shutdown", None)
        if getattr(self, "args", None) is not None and self.args.local and shutdown is not None:
            await asyncio.to_thread(shutdown)
        cluster: ClusterConfig | None = getattr(self, "cluster", None)
        if cluster is not None and await asyncio.to_thread(app_deleting, self.app_name):
            await asyncio.to_thread(stop_owned_actors, cluster, app_owner(self.app_name))


def app_deleting(app_name: str) -> bool:
    """Whether Serve is deleting application `app_name` (`serve.delete`, `serve shutdown`, a `serve deploy`
    without it), rather than stopping one replica of it (a restart, a scale-down, a rolling update)."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception as e:  # the Serve controller is gone already
        log.warning("could not read the status of Serve app %s: %s", app_name, e)
        return False
    return app is None or app.status == "DELETING"


def stop_owned_actors(cfg: ClusterConfig, owner: str) -> None:
    """Drain, then stop the engine actors and the controller of `cfg` that `owner` started (not those it found
    running); the replicas of a deleted app all call it, so the engines finish the others' streams first."""
    from cluster.bootstrap import owned_actors, retire_actors

    retire_actors(cfg, dict.fromkeys(owned_actors(cfg, owner), "its app is deleted"), DRAIN_TIMEOUT_S)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application (import path `cluster.serve_app:build_app`).

    Bad arguments fail here, before any replica starts: their types and ranges, and what the engines, the
    controller and the model directory (`model`, as seen where the app is built) accept.
    """
    from ray import serve

    parsed = ServeArgs.parse(args)
    cluster_config(parsed, None if parsed.local else redis_url_of(parsed))
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=parsed.num_replicas,
        max_ongoing_requests=parsed.max_ongoing_requests,
        ray_actor_options={"num_cpus": parsed.replica_num_cpus, "num_gpus": parsed.replica_num_gpus},
        graceful_shutdown_timeout_s=SHUTDOWN_TIMEOUT_S,
    )(serve.ingress()(OpenAIIngress))
    return deployment.bind(parsed.model_dump())

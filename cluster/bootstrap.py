"""Cluster configuration and start-up: named, detached engine actors and the SLO controller.

`ClusterConfig` is what `semipd serve` and the Ray Serve app's `build_app` agree on; it
round-trips through a plain dict (`to_dict` / `from_dict`) so it can travel as Serve
application arguments. `ensure_cluster(cfg)` gets or starts every engine actor
(`<actor_prefix>-<i>` in `namespace`, `get_if_exists`) and, when a Redis URL is set,
the controller actor; any process can then build a `Router.connect(...)` over them.
Needs `ray.init(...)` done by the caller.

A Serve app records the actors it starts, with their settings, in Ray's KV store (`record_owner`), so that it
stops them when it is deleted and replaces or stops them when a redeploy changes them (`outdated_actors`,
`retire_actors`); its replicas do that one at a time (`start_lock`).

Environment variables are read here only (`env_defaults()`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.config import (
    ENGINE_MODES, CacheConfig, ConfigError, EngineConfig, ModelArch, SchedulerConfig, SLOConfig,
)
from actors.engine.pauses import PAUSE_STACKS_ENV
from actors.slo.latency_model import ModelSource
from actors.slo.types import SLOTargets
from cluster.controller import ControllerConfig, check_prefill_sm_fraction, policy_by_name, policy_needs_models
from cluster.redis_store import PublisherConfig
from cluster.router import ACTOR_PREFIX, NAMESPACE
from cluster.routing import RouterPolicy

log = logging.getLogger(__name__)

CONTROLLER_SUFFIX = "controller"


ENGINE_ENV = ("CUDA_MODULE_LOADING", PAUSE_STACKS_ENV)  # passed on to the engine actors as they are


def kernel_env() -> dict[str, str]:
    """FLASHINFER_* settings of this process (compiled-kernel cache, arch list), CUDA_MODULE_LOADING and
    SEMIPD_PAUSE_STACKS (`actors.engine.pauses`), for the engine actors.

    Given explicitly to the actors' runtime env: on the GPU machine an engine actor that did not
    find the kernel cache compiled every kernel again (minutes) before its first token.
    """
    return {k: v for k, v in os.environ.items() if k.startswith("FLASHINFER_") or k in ENGINE_ENV}


API_KEY_ENV = "SEMIPD_API_KEY"
LOG_LEVEL_ENV = "SEMIPD_LOG_LEVEL"  # a `semipd serve` job's --log-level, for its Ray workers


def env_defaults() -> dict[str, str]:
    """Defaults taken from the environment: SEMIPD_REDIS_URL, RAY_ADDRESS, SEMIPD_API_KEY, SEMIPD_LOG_LEVEL."""
    out = {}
    if os.environ.get(API_KEY_ENV):
        out["api_key"] = os.environ[API_KEY_ENV]
    if os.environ.get("SEMIPD_REDIS_URL"):
        out["redis_url"] = os.environ["SEMIPD_REDIS_URL"]
    if os.environ.get("RAY_ADDRESS"):
        out["ray_address"] = os.environ["RAY_ADDRESS"]
    if os.environ.get(LOG_LEVEL_ENV):
        out["log_level"] = os.environ[LOG_LEVEL_ENV]
    return out


ADMISSION_MODES: tuple[str, ...] = ("off", "reject", "queue")


@dataclass(frozen=True)
class EngineOptions:
    """Per-engine settings (everything of `EngineConfig` but the model, the mode and the SLO targets).

    `prefill_order`: `fcfs` or `edf` (earliest TTFT deadline first, with aging; `actors.slo.ordering`).
    `admission`: `off`, `reject` (a request predicted past `admission_slack` x its TTFT target is refused: HTTP
    429, gRPC RESOURCE_EXHAUSTED) or `queue` (it is served after those that can still meet theirs, until it has
    waited twice the TTFT target: `actors.slo.ordering`).
    """

    dtype: str = "auto"
    device: str = "auto"
    attention_backend: str = "auto"
    decode_attention: str = "fa2"
    seed: int = 0
    page_size: int = 16
    num_pages: int | None = None
    memory_fraction: float = 0.85
    cpu_kv_bytes: int = 256 << 20
    enable_prefix_caching: bool = True
    max_prefill_tokens: int = 4096
    max_decode_seqs: int = 256
    max_model_len: int | None = None
    prefill_sms: int | None = None
    cuda_graphs: bool = True
    overlap_decode: bool = True
    overlap_prefill: bool = True
    decode_pace_ms: float | None = None
    prefill_layers_ahead: int = 8
    switch_interval_ms: float | None = None
    load_format: str = "auto"  # "dummy": random weights, no checkpoint read (speed runs)
    prefill_order: str = "fcfs"
    admission: str = "off"
    admission_slack: float = 1.0

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_MODES:
            raise ConfigError(f"admission must be one of {ADMISSION_MODES}, got {self.admission!r}")
        # the nested configs validate the values
        CacheConfig(self.page_size, self.num_pages, self.memory_fraction, self.cpu_kv_bytes, self.enable_prefix_caching)
        SchedulerConfig(self.max_prefill_tokens, self.max_decode_seqs, self.max_model_len)
        self.slo_config(SLOTargets())

    def slo_config(self, targets: SLOTargets, latency_profile: str | None = None) -> SLOConfig:
        """The engine's SLO settings: the deployment's `targets`, this prefill order and admission control
        (which loads its latency model from `latency_profile`, or profiles the engine at start)."""
        admit = self.admission != "off"
        return SLOConfig(ttft_ms=targets.ttft_ms, tpot_ms=targets.tpot_ms, order=self.prefill_order, admission=admit,
                         admission_slack=self.admission_slack, admission_action=self.admission if admit else "reject",
                         latency_profile=latency_profile)

    def engine_config(self, model: str, mode: str, targets: SLOTargets | None = None,
                      latency_profile: str | None = None) -> EngineConfig:
        return EngineConfig(
            model=model, dtype=self.dtype, device=self.device, mode=mode, attention_backend=self.attention_backend,
            decode_attention=self.decode_attention, seed=self.seed, prefill_sms=self.prefill_sms, cuda_graphs=self.cuda_graphs, load_format=self.load_format,
            overlap_decode=self.overlap_decode, overlap_prefill=self.overlap_prefill,
            decode_pace_ms=self.decode_pace_ms, prefill_layers_ahead=self.prefill_layers_ahead,
            switch_interval_ms=self.switch_interval_ms,
            cache=CacheConfig(self.page_size, self.num_pages, self.memory_fraction, self.cpu_kv_bytes,
                              self.enable_prefix_caching),
            scheduler=SchedulerConfig(self.max_prefill_tokens, self.max_decode_seqs, self.max_model_len),
            slo=self.slo_config(targets or SLOTargets(), latency_profile),
        )


Resources = tuple[tuple[str, float], ...]


def _freeze_resources(items: Sequence[Mapping[str, float] | Resources]) -> tuple[Resources, ...]:
    out = []
    for r in items:
        pairs = tuple(sorted((dict(r) if not isinstance(r, Mapping) else r).items()))
        for k, v in pairs:
            if not isinstance(k, str) or not k or float(v) <= 0:
                raise ConfigError(f"actor resources must be name -> positive amount, got {k!r}: {v!r}")
        out.append(tuple((k, float(v)) for k, v in pairs))
    return tuple(out)


@dataclass(frozen=True)
class ClusterConfig:
    """A semipd cluster: the model, its engine actors, Redis, SLO targets, router and controller.

    `actor_resources[i]`: extra Ray custom resources engine i needs (pin actors to nodes);
    empty means none. `num_gpus_per_actor` None: 1 when the Ray cluster has GPUs, else 0.
    `mode` "disagg": each actor is a prefill+decode pair with 2 GPUs (N GPUs: N/2 actors), or none on
    CPU; it has no SM split, so no controller is started and no latency model is made for it.
    With the "model" split policy (and Redis) each engine actor gets its latency model at
    start and publishes it: loaded from `latency_profile` (a JSON profile file on the
    actors' nodes) or profiled on `profile_grid` (`quick` or `full`) and saved there.
    `prefill_sm_fraction` bounds the prefill share of each engine's SMs the controller may set.
    `stream_interval`: tokens per chunk an engine actor streams (after the first; vLLM's `--stream-interval`).
    `engine_restarts`: how many times Ray starts an engine actor again when its process dies (-1: always).
    A CUDA error that poisons the process's context ends it (on the H200 an engine died so, and with no
    restart every later request got 503, 2026-12-03); routers pick the restarted actor up by name.
    """

    model: str
    num_actors: int = 1
    mode: str = "semi-pd"
    redis_url: str | None = None
    slo: SLOTargets = field(default_factory=SLOTargets)
    policy: str = "reactive"
    latency_profile: str | None = None
    profile_grid: str = "quick"
    router: RouterPolicy = field(default_factory=RouterPolicy)
    engine: EngineOptions = field(default_factory=EngineOptions)
    actor_resources: tuple[Resources, ...] = ()
    num_gpus_per_actor: float | None = None
    num_cpus_per_actor: float = 0.0
    namespace: str = NAMESPACE
    actor_prefix: str = ACTOR_PREFIX
    cluster_name: str = "default"
    served_model_name: str | None = None
    stream_interval: int = 1
    engine_restarts: int = 3
    publish_interval_s: float = 0.5
    controller_interval_s: float = 0.5
    lease_s: float = 3.0
    min_dwell_s: float = 5.0
    min_samples: int = 8
    prefill_sm_fraction: tuple[float, float] = (0.0, 1.0)
    start_controller: bool = True
    ready_timeout_s: float = 300.0
    check_model: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "actor_resources", _freeze_resources(self.actor_resources))
        if self.num_actors < 1:
            raise ConfigError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.mode not in ENGINE_MODES:
            raise ConfigError(f"mode must be one of {ENGINE_MODES}, got {self.mode!r}")
        if self.actor_resources and len(self.actor_resources) != self.num_actors:
            raise ConfigError(f"actor_resources has {len(self.actor_resources)} entries for {self.num_actors} actors")
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise ConfigError("num_gpus_per_actor must be >= 0")
        if self.mode == "disagg":
            self._check_disagg()
        if self.num_cpus_per_actor < 0:
            raise ConfigError("num_cpus_per_actor must be >= 0")
        if self.stream_interval < 1:
            raise ConfigError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.engine_restarts < -1:
            raise ConfigError(f"engine_restarts must be >= -1, got {self.engine_restarts}")
        if not self.namespace or not self.actor_prefix or not self.cluster_name:
            raise ConfigError("namespace, actor_prefix and cluster_name must not be empty")
        if self.check_model:
            if not (Path(self.model) / "config.json").is_file():
                raise ConfigError(f"{self.model}: no config.json (expected a Hugging Face checkpoint directory)")
            engine = self.engine_config()  # the engines' own checks, before any actor starts
            if engine.scheduler.max_model_len is not None:
                engine.max_model_len(ModelArch.from_dir(self.model))  # a context past what the model has
        try:
            check_prefill_sm_fraction(self.prefill_sm_fraction)
            policy_by_name(self.policy)
            ModelSource(self.latency_profile, self.profile_grid)
            if self.redis_url is not None:
                self.controller_config()
                self.publisher_config()
        except (ValueError, ImportError, AttributeError) as e:
            raise ConfigError(str(e)) from e

    def _check_disagg(self) -> None:
        if self.num_gpus_per_actor not in (None, 0, 2):
            raise ConfigError(f"disagg mode: an engine actor takes 2 GPUs (prefill on one, decode on the other) "
                              f"or none (CPU), got num_gpus_per_actor={self.num_gpus_per_actor:g}")
        if self.engine.admission != "off":
            raise ConfigError("disagg mode has no admission control (it needs an engine's latency model)")

    # -- derived ---------------------------------------------------------------------

    def actor_name(self, i: int) -> str:
        return f"{self.actor_prefix}-{i}"

    @property
    def actor_names(self) -> list[str]:
        return [self.actor_name(i) for i in range(self.num_actors)]

    @property
    def controller_name(self) -> str:
        return f"{self.actor_prefix}-{CONTROLLER_SUFFIX}"

    @property
    def wants_controller(self) -> bool:
        """Whether `ensure_cluster` starts an SLO controller (it needs Redis; disagg has no split to control)."""
        return self.redis_url is not None and self.start_controller and self.mode != "disagg"

    def resources_for(self, i: int) -> dict[str, float]:
        return dict(self.actor_resources[i]) if self.actor_resources else {}

    def engine_config(self) -> EngineConfig:
        cfg = self.engine.engine_config(self.model, self.mode, self.slo, self.latency_profile)
        if self.policy == "fixed" and cfg.prefill_sms is not None and cfg.splits is None:
            cfg = dataclasses.replace(cfg, splits=(cfg.prefill_sms,))  # the split never moves: create only it
        return cfg

    def publisher_config(self) -> PublisherConfig | None:
        if self.redis_url is None:
            return None
        return PublisherConfig(self.redis_url, self.cluster_name, self.publish_interval_s,
                               view_ttl_s=max(5.0, 4 * self.publish_interval_s))

    def model_source(self) -> ModelSource | None:
        """What the engine actors need to get and publish a latency model (None: they need none,
        the policy does not use one or there is no Redis to publish it to)."""
        if self.redis_url is None or not policy_needs_models(self.policy) or self.mode == "disagg":
            return None
        return ModelSource(self.latency_profile, self.profile_grid)

    def controller_config(self) -> ControllerConfig:
        if self.redis_url is None:
            raise ConfigError("the controller needs a redis_url")
        return ControllerConfig(self.redis_url, self.cluster_name, self.slo, self.policy,
                                interval_s=self.controller_interval_s, lease_s=self.lease_s,
                                min_dwell_s=self.min_dwell_s, min_samples=self.min_samples,
                                prefill_sm_fraction=self.prefill_sm_fraction)

    # -- dict round trip (Serve application arguments) ----------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["actor_resources"] = [dict(r) for r in self.actor_resources]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterConfig:
        """Inverse of `to_dict`; unknown keys are an error, missing ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown cluster config keys: {', '.join(sorted(unknown))}")
        kw = dict(d)
        if isinstance(kw.get("slo"), Mapping):
            kw["slo"] = SLOTargets(**kw["slo"])
        if isinstance(kw.get("router"), Mapping):
            kw["router"] = RouterPolicy(**kw["router"])
        if isinstance(kw.get("engine"), Mapping):
            kw["engine"] = EngineOptions(**kw["engine"])
        if "actor_resources" in kw:
            kw["actor_resources"] = tuple(kw["actor_resources"])
        if "prefill_sm_fraction" in kw:
            kw["prefill_sm_fraction"] = tuple(kw["prefill_sm_fraction"])
        return cls(**kw)


@dataclass
class ClusterHandles:
    """What `ensure_cluster` found or started."""

    actors: dict[str, Any]  # actor name -> handle
    created: list[str]  # names of actors started by this call
    controller: Any | None = None
    controller_created: bool = False
    infos: dict[str, dict[str, Any]] = field(default_factory=dict)


def gpus_per_actor(cfg: ClusterConfig, cluster_gpus: float) -> float:
    """GPUs an engine actor asks Ray for: `num_gpus_per_actor`, else none on a cluster without GPUs, else 1
    (disagg: 2, its prefill and decode GPUs; ConfigError when the cluster has fewer than 2 per actor)."""
    if cfg.num_gpus_per_actor is not None:
        return cfg.num_gpus_per_actor
    if cluster_gpus < 1:
        return 0.0
    if cfg.mode != "disagg":
        return 1.0
    if cluster_gpus < 2 * cfg.num_actors:
        raise ConfigError(f"disagg mode: {cfg.num_actors} engine actor(s) need {2 * cfg.num_actors} GPUs (a prefill "
                          f"and a decode GPU each); the Ray cluster has {cluster_gpus:g}")
    return 2.0


def _num_gpus(cfg: ClusterConfig) -> float:
    import ray

    return gpus_per_actor(cfg, ray.cluster_resources().get("GPU", 0))


def _get_actor(name: str, namespace: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def ensure_cluster(cfg: ClusterConfig, created: list[str] | None = None) -> ClusterHandles:
    """Get or start the engine actors (and the controller when Redis is set); wait until ready.

    `created`: the name of each actor this call starts (the controller's too) is added to it just before it starts,
    so that a caller interrupted before this returns knows what to stop (the actors are detached: they outlive it);
    a name there may have no actor yet.
    """
    import ray

    from actors.gpu_actor import engine_actor_cls
    from cluster.controller import controller_actor_cls

    if not ray.is_initialized():
        raise RuntimeError("ensure_cluster needs ray.init(...) first")
    gpus = _num_gpus(cfg)
    actors: dict[str, Any] = {}
    started: list[str] = []
    created = created if created is not None else []
    for i, name in enumerate(cfg.actor_names):
        existing = _get_actor(name, cfg.namespace)
        if existing is not None:
            actors[name] = existing
            continue
        cls = engine_actor_cls(num_gpus=gpus, num_cpus=cfg.num_cpus_per_actor, resources=cfg.resources_for(i))
        started.append(name)
        created.append(name)  # before `.remote()`, inside which the actor registers: a Ctrl-C there must stop it too
        actors[name] = cls.options(name=name, namespace=cfg.namespace, lifetime="detached", get_if_exists=True,
                                   max_restarts=cfg.engine_restarts, runtime_env={"env_vars": kernel_env()},
                                   ).remote(name, cfg.engine_config(), cfg.publisher_config(),
                                            model_source=cfg.model_source(), stream_interval=cfg.stream_interval)
    names = list(actors)
    infos = ray.get([actors[n].ready.remote() for n in names], timeout=cfg.ready_timeout_s)
    by_name = dict(zip(names, infos))
    for n, info in by_name.items():
        if Path(info["model_dir"]).resolve() != Path(cfg.model).resolve() or info["mode"] != cfg.mode:
            log.warning("actor %s serves %s (%s), not %s (%s): it was started with another config",
                        n, info["model_dir"], info["mode"], cfg.model, cfg.mode)
    log.info("engine actors ready: %s (started %d)", ", ".join(names), len(started))
    handles = ClusterHandles(actors, started, infos=by_name)
    if cfg.wants_controller:
        existing = _get_actor(cfg.controller_name, cfg.namespace)
        if existing is None:
            handles.controller_created = True
            created.append(cfg.controller_name)
            existing = controller_actor_cls().options(
                name=cfg.controller_name, namespace=cfg.namespace, lifetime="detached", get_if_exists=True,
                max_restarts=-1,
            ).remote(cfg.controller_config(), autostart=True)
        ray.get(existing.start.remote(), timeout=cfg.ready_timeout_s)
        handles.controller = existing
    return handles


OWNER_KV_NAMESPACE = "semipd-owners"


def _owner_key(cfg: ClusterConfig, name: str) -> bytes:
    return f"{cfg.namespace}/{name}".encode()


def _json(value: Any) -> Any:
    """`value` (dataclasses, tuples) as the JSON values a record holds, so that it compares equal to a record's."""
    return json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value))


def actor_settings(cfg: ClusterConfig, name: str) -> dict[str, Any] | None:
    """What actor `name` of `cfg` starts with (JSON values): an engine's config, Redis publisher, latency-model
    source, stream interval and Ray options, or the controller's config. None: `cfg` has no such actor (an engine
    beyond `num_actors`, a controller it does not start, another name)."""
    if name in cfg.actor_names:
        i = cfg.actor_names.index(name)
        publisher, source = cfg.publisher_config(), cfg.model_source()
        return _json({"engine": _json(cfg.engine_config()), "publisher": publisher and _json(publisher),
                      "model_source": source and _json(source), "stream_interval": cfg.stream_interval,
                      "num_gpus": cfg.num_gpus_per_actor, "num_cpus": cfg.num_cpus_per_actor,
                      "resources": cfg.resources_for(i), "max_restarts": cfg.engine_restarts})
    if name == cfg.controller_name and cfg.wants_controller:
        return _json(cfg.controller_config())
    return None


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_differences(recorded: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> list[str]:
    """The dotted names of the settings in which `recorded` and `wanted` differ (`recorded` None: a record
    without settings, from before they were recorded: all of them)."""
    if recorded is None:
        return ["(settings not recorded)"]
    old, new = _flat(recorded), _flat(wanted)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def record_owner(cfg: ClusterConfig, names: Sequence[str], owner: str) -> None:
    """Record in Ray's KV store that `owner` started the actors `names` of `cfg` (the engines and the controller),
    with the settings it started them with (`actor_settings`): the record outlives the process that started them,
    so whoever stops `owner` later knows what to stop, and a redeploy of `owner` knows what to replace."""
    from ray.experimental import internal_kv

    for name in names:
        handle = _get_actor(name, cfg.namespace)
        if handle is not None:
            record = json.dumps({"owner": owner, "actor_id": handle._actor_id.hex(),
                                 "settings": actor_settings(cfg, name)})
            internal_kv._internal_kv_put(_owner_key(cfg, name), record, overwrite=True, namespace=OWNER_KV_NAMESPACE)


def _recorded_names(cfg: ClusterConfig) -> list[str]:
    """The names of `cfg`'s engines (any index) and controller that have an ownership record."""
    from ray.experimental import internal_kv

    keys = internal_kv._internal_kv_list(_owner_key(cfg, f"{cfg.actor_prefix}-"), namespace=OWNER_KV_NAMESPACE)
    names = [k.decode().removeprefix(f"{cfg.namespace}/") for k in keys]
    suffixes = {n: n.removeprefix(f"{cfg.actor_prefix}-") for n in names}
    return sorted(n for n, suffix in suffixes.items() if suffix.isdigit() or n == cfg.controller_name)


def _owned_record(cfg: ClusterConfig, name: str, owner: str) -> dict[str, Any] | None:
    """The record of actor `name` if `owner` started the actor running under that name now."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_owner_key(cfg, name), namespace=OWNER_KV_NAMESPACE)
    handle = _get_actor(name, cfg.namespace)
    if raw is None or handle is None:
        return None
    record: dict[str, Any] = json.loads(raw)
    return record if record.get("owner") == owner and record.get("actor_id") == handle._actor_id.hex() else None


def owned_actors(cfg: ClusterConfig, owner: str) -> list[str]:
    """The actors of `cfg`'s prefix (engines of any index, controller) running now that `record_owner` recorded
    as started by `owner`."""
    return [name for name in _recorded_names(cfg) if _owned_record(cfg, name, owner) is not None]


def outdated_actors(cfg: ClusterConfig, owner: str) -> dict[str, str]:
    """The actors `owner` started that do not run as `cfg` asks: name -> why. An engine beyond `num_actors`, a
    controller `cfg` starts none of, an engine or controller whose recorded settings differ from `cfg`'s.
    Actors `owner` did not start are never in it."""
    out = {}
    for name in _recorded_names(cfg):
        record = _owned_record(cfg, name, owner)
        if record is None:
            continue
        wanted = actor_settings(cfg, name)
        if wanted is None:
            out[name] = f"the config has no such actor (num_actors={cfg.num_actors})"
        elif differences := settings_differences(record.get("settings"), wanted):
            out[name] = f"its settings differ from the config's in {', '.join(differences)}"
    return out


def forget_owner(cfg: ClusterConfig, names: Sequence[str]) -> None:
    """Drop the ownership records of the actors `names` of `cfg`."""
    from ray.experimental import internal_kv

    for name in names:
        internal_kv._internal_kv_del(_owner_key(cfg, name), namespace=OWNER_KV_NAMESPACE)


NAME_FREE_TIMEOUT_S = 30.0
_NAME_POLL_S = 0.05


def retire_actors(cfg: ClusterConfig, reasons: Mapping[str, str], drain_timeout_s: float) -> None:
    """Drain (engines), stop and forget the actors of `cfg` named in `reasons` (name -> why, logged), and return
    once their names are free for new actors: Ray frees a killed actor's name a moment after `ray.kill`, and
    `ensure_cluster` would take the dying actor for a running one."""
    if not reasons:
        return
    for name, why in reasons.items():
        log.info("stopping %s: %s", name, why)
    ids = {n: h._actor_id for n in reasons if (h := _get_actor(n, cfg.namespace)) is not None}
    engines = [n for n in reasons if n != cfg.controller_name]
    if engines:
        drain_cluster(cfg, drain_timeout_s, names=engines)
    teardown_cluster(cfg, names=engines, controller=cfg.controller_name in reasons)
    deadline = time.monotonic() + NAME_FREE_TIMEOUT_S
    while taken := [n for n, actor_id in ids.items()
                    if (h := _get_actor(n, cfg.namespace)) is not None and h._actor_id == actor_id]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"actors {', '.join(taken)} still hold their names {NAME_FREE_TIMEOUT_S:g} s after "
                               "they were killed")
        time.sleep(_NAME_POLL_S)
    forget_owner(cfg, list(reasons))


class StartLock:
    """A mutex among processes of one Ray cluster, as a named actor: whoever creates it holds the lock, killing it
    releases it, and so does its owner's death (it is not detached). Others wait in `held`, which ends only with
    the actor."""

    async def held(self) -> None:
        await asyncio.Event().wait()


@contextmanager
def start_lock(cfg: ClusterConfig, timeout_s: float) -> Iterator[None]:
    """Hold `cfg`'s start lock (`<actor_prefix>.start-lock` in its namespace) inside the block: the processes
    that start, replace or stop `cfg`'s actors (the replicas of a Serve app) do it one at a time.
    TimeoutError when another process holds it for longer than `timeout_s`."""
    import ray

    name = f"{cfg.actor_prefix}.start-lock"
    cls = ray.remote(num_cpus=0)(StartLock)
    deadline = time.monotonic() + timeout_s
    held = TimeoutError(f"{name} is still held by another process after {timeout_s:g} s")
    while True:
        try:
            lock = cls.options(name=name, namespace=cfg.namespace).remote()
            break
        except ValueError:  # the name is taken: held, or released a moment ago (Ray frees it after the kill)
            pass
        holder = _get_actor(name, cfg.namespace)
        if holder is not None:
            try:
                ray.get(holder.held.remote(), timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                pass  # released (killed, or its owner died)
            except ray.exceptions.GetTimeoutError:
                raise held from None
        if time.monotonic() > deadline:
            raise held
        time.sleep(_NAME_POLL_S)  # until Ray frees the released lock's name
    try:
        yield
    finally:
        ray.kill(lock, no_restart=True)


def drain_cluster(cfg: ClusterConfig, timeout_s: float = 30.0, names: Sequence[str] | None = None) -> int:
    """Drain the engine actors `names` (default: all of `cfg`): stop accepting, wait for in-flight; returns
    what remains."""
    import ray

    handles = [h for n in (names if names is not None else cfg.actor_names)
               if (h := _get_actor(n, cfg.namespace)) is not None]
    refs = [h.drain.remote(timeout_s) for h in handles]
    remaining = 0
    for ref in refs:
        try:
            remaining += int(ray.get(ref, timeout=timeout_s + 10))
        except Exception as e:
            log.warning("drain failed: %s", e)
    return remaining


def resume_cluster(cfg: ClusterConfig, names: Sequence[str]) -> None:
    """Let the engine actors `names` of `cfg` accept requests again after a drain (those that exist)."""
    import ray

    refs = {n: h.resume.remote() for n in names if (h := _get_actor(n, cfg.namespace)) is not None}
    for name, ref in refs.items():
        try:
            ray.get(ref, timeout=30)
        except Exception as e:
            log.warning("resume of %s failed: %s", name, e)


def teardown_cluster(cfg: ClusterConfig, names: Sequence[str] | None = None, controller: bool = True,
                     graceful: bool = True) -> None:
    """Stop and kill the engine actors `names` (default: all of `cfg`) and the controller. `graceful` False:
    kill them at once (actors that may not be ready: a stop call waits for their start first)."""
    import ray

    for name in list(names if names is not None else cfg.actor_names):
        h = _get_actor(name, cfg.namespace)
        if h is None:
            continue
        if graceful:
            try:
                ray.get(h.shutdown.remote(), timeout=30)
            except Exception as e:
                log.warning("shutdown of %s failed: %s", name, e)
        ray.kill(h, no_restart=True)
    if controller:
        h = _get_actor(cfg.controller_name, cfg.namespace)
        if h is not None:
            if graceful:
                try:
                    ray.get(h.stop.remote(), timeout=10)
                except Exception as e:
                    log.warning("controller stop failed: %s", e)
            ray.kill(h, no_restart=True)

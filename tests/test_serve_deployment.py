"""The Ray Serve deployment as a user runs it outside `semipd serve`: `build_app`'s argument checks, and the
engine actors shared by the ingress replicas across restarts, redeploys and the app's deletion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port, wait_until

from actors.config import ConfigError
from cluster.serve_app import build_app

ENGINE = "semipd-engine-0"


@pytest.mark.parametrize("bad", [
    {"model": "/nonexistent/model"},
    {"controller_policy": "no-such-policy"},
    {"page_size": 12},
    {"mode": "disagg", "admission": "reject"},
], ids=["missing-model", "controller-policy", "page-size", "disagg-admission"])
def test_build_app_refuses_settings_the_engines_refuse(tiny_llama: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build_app({"model": str(tiny_llama), "device": "cpu", **bad})


def test_build_app_refuses_unknown_and_out_of_range_args(tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match="num_actorz"):
        build_app({"model": str(tiny_llama), "num_actorz": 2})
    with pytest.raises(ConfigError, match="num_actors"):
        build_app({"model": str(tiny_llama), "num_actors": 0})


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    from ray import serve

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 << 20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        yield ray
    finally:
        serve.shutdown()
        ray.shutdown()


def _engine_id(ray: Any) -> str | None:
    try:
        return ray.get_actor(ENGINE, namespace="semipd")._actor_id.hex()
    except ValueError:
        return None


def _engines(ray: Any) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "semipd" and a["name"].startswith("semipd-engine-")]


def _running_replicas(name: str) -> int:
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None or app.status != "RUNNING":
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def _app_args(tiny_llama: Path, **kw: Any) -> dict[str, Any]:
    return {"model": str(tiny_llama), "mode": "unified", "device": "cpu", "num_pages": 256, "num_actors": 1,
            "replica_num_cpus": 0.25, **kw}


def test_replicas_share_the_engines_and_deleting_the_app_stops_those_it_started(
        ray_serve: Any, tiny_llama: Path) -> None:
    from ray import serve

    serve.run(build_app(_app_args(tiny_llama, num_replicas=2)), name="owned", route_prefix="/owned")
    wait_until(lambda: _running_replicas("owned") == 2, 60, "2 replicas")
    assert _engines(ray_serve) == [ENGINE]  # one engine for both replicas
    first = _engine_id(ray_serve)

    # a redeploy with new args rolls the replicas over to the running engine
    serve.run(build_app(_app_args(tiny_llama, num_replicas=2, ttft_slo_ms=5000)), name="owned",
              route_prefix="/owned")
    wait_until(lambda: _running_replicas("owned") == 2, 60, "2 redeployed replicas")
    assert _engine_id(ray_serve) == first

    serve.delete("owned")
    wait_until(lambda: _engine_id(ray_serve) is None, 60, "the app's engine actor to stop")


def test_deleting_the_app_leaves_engines_it_found_running(ray_serve: Any, tiny_llama: Path) -> None:
    from ray import serve

    from cluster.bootstrap import ensure_cluster, teardown_cluster
    from cluster.serve_app import ServeArgs, cluster_config

    cfg = cluster_config(ServeArgs.parse(_app_args(tiny_llama)), None)
    ensure_cluster(cfg)
    try:
        found = _engine_id(ray_serve)
        serve.run(build_app(_app_args(tiny_llama)), name="guest", route_prefix="/guest")
        serve.delete("guest")
        assert serve.status().applications.get("guest") is None
        assert _engine_id(ray_serve) == found
    finally:
        teardown_cluster(cfg, graceful=False)

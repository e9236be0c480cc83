"""The Ray Serve deployment as a user runs it outside `semipd serve`: `build_app`'s argument checks, and the
engine actors shared by the ingress replicas across restarts, redeploys and the app's deletion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import cpu_app_args, engine_actor_id, engine_names, running_replicas, wait_until

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


def test_replicas_share_the_engines_and_deleting_the_app_stops_those_it_started(
        ray_serve: str, tiny_llama: Path) -> None:
    from ray import serve

    serve.run(build_app(cpu_app_args(tiny_llama, num_replicas=2)), name="owned", route_prefix="/owned")
    wait_until(lambda: running_replicas("owned") == 2, 60, "2 replicas")
    assert engine_names() == [ENGINE]  # one engine for both replicas
    first = engine_actor_id()

    # a redeploy that changes no engine setting rolls the replicas over to the running engine
    serve.run(build_app(cpu_app_args(tiny_llama, num_replicas=2, router_policy="prefix-affinity")), name="owned",
              route_prefix="/owned")
    wait_until(lambda: running_replicas("owned") == 2, 60, "2 redeployed replicas")
    assert engine_actor_id() == first

    serve.delete("owned")
    wait_until(lambda: engine_actor_id() is None, 60, "the app's engine actor to stop")


def test_the_app_leaves_engines_it_found_running_as_they_are(ray_serve: str, tiny_llama: Path) -> None:
    from ray import serve

    from cluster.bootstrap import ensure_cluster, teardown_cluster
    from cluster.serve_app import ServeArgs, cluster_config

    cfg = cluster_config(ServeArgs.parse(cpu_app_args(tiny_llama)), None)
    ensure_cluster(cfg)
    try:
        found = engine_actor_id()
        # another prefill order than the engine's: the app uses the engine it did not start as it runs
        serve.run(build_app(cpu_app_args(tiny_llama, prefill_order="edf")), name="guest", route_prefix="/guest")
        assert engine_actor_id() == found
        serve.delete("guest")
        assert serve.status().applications.get("guest") is None
        assert engine_actor_id() == found
    finally:
        teardown_cluster(cfg, graceful=False)

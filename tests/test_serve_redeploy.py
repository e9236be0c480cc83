"""A redeploy of the Ray Serve app applies its config to the engine actors the app started: those whose settings
it changes are drained and replaced (by one replica while the others wait), those beyond its `num_actors` stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from support import ENGINE_NAMESPACE, cpu_app_args, engine_actor_id, engine_names, running_replicas, wait_until

from cluster.serve_app import build_app

MODEL = "tiny"
ENGINE = "semipd-engine-0"


def _engine_info(name: str = ENGINE) -> dict[str, Any]:
    import ray

    info: dict[str, Any] = ray.get(ray.get_actor(name, namespace=ENGINE_NAMESPACE).info.remote(), timeout=60)
    return info


def _deploy(app: str, replicas: int, args: dict[str, Any]) -> None:
    from ray import serve

    serve.run(build_app(args), name=app, route_prefix=f"/{app}")
    wait_until(lambda: running_replicas(app) == replicas, 60, f"{replicas} replica(s) of {app}")


def _delete(app: str) -> None:
    from ray import serve

    serve.delete(app)
    wait_until(lambda: not engine_names(), 60, f"the engines of {app} to stop")


def test_a_redeploy_that_changes_an_engine_setting_replaces_the_engine(ray_serve: str, tiny_llama: Path) -> None:
    _deploy("reorder", 2, cpu_app_args(tiny_llama, num_replicas=2, served_model_name=MODEL))
    first = engine_actor_id()
    assert _engine_info()["prefill_order"] == "fcfs"

    _deploy("reorder", 2, cpu_app_args(tiny_llama, num_replicas=2, served_model_name=MODEL, prefill_order="edf"))
    assert engine_names() == [ENGINE]  # the two new replicas share one new engine
    assert engine_actor_id() != first
    assert _engine_info()["prefill_order"] == "edf"
    oa = openai.OpenAI(base_url=f"{ray_serve}/reorder/v1", api_key="unused", max_retries=0, timeout=120)
    r = oa.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 3

    _delete("reorder")  # the replacement is recorded as the app's, so it stops with it


def test_a_redeploy_with_fewer_engines_stops_those_beyond_them(ray_serve: str, tiny_llama: Path) -> None:
    _deploy("shrink", 1, cpu_app_args(tiny_llama, num_actors=2))
    assert engine_names() == [ENGINE, "semipd-engine-1"]
    kept = engine_actor_id()

    _deploy("shrink", 1, cpu_app_args(tiny_llama, num_actors=1))
    assert engine_names() == [ENGINE]
    assert engine_actor_id() == kept  # its settings did not change: it runs on

    _delete("shrink")


def test_the_start_lock_has_one_holder_at_a_time(ray_serve: str, tiny_llama: Path) -> None:
    from cluster.bootstrap import start_lock
    from cluster.serve_app import ServeArgs, cluster_config

    cfg = cluster_config(ServeArgs.parse(cpu_app_args(tiny_llama)), None)
    with start_lock(cfg, timeout_s=60):
        with pytest.raises(TimeoutError, match="still held"), start_lock(cfg, timeout_s=0.5):
            pass
    with start_lock(cfg, timeout_s=60):  # released on leaving the block
        pass

"""`semipd status`: engines, their splits, queues, KV usage, SLO attainment and the last decisions.

Reads either Redis (`--redis URL`: what engines publish and the controller decides) or
the Ray cluster (`--address ADDR`: asks the engine actors directly). Without either it
uses SEMIPD_REDIS_URL or RAY_ADDRESS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from actors.slo.types import SLOTargets
from cluster.router import ACTOR_PREFIX, NAMESPACE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the cluster's engines, splits and SLO decisions")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--redis", metavar="URL", help="Redis URL the cluster uses (redis://host:port/db)")
    src.add_argument("--address", metavar="ADDR", help="Ray cluster address (host:port or 'auto')")
    p.add_argument("--cluster-name", default="default", help="Redis key namespace of the cluster")
    p.add_argument("--namespace", default=NAMESPACE, help="Ray namespace of the engine actors")
    p.add_argument("--actor-prefix", default=ACTOR_PREFIX)
    p.add_argument("--decisions", type=int, default=10, help="how many recent decisions to show")
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="TTFT target (default: the controller's)")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="TPOT target (default: the controller's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def attainment(samples: Sequence[float], target: float) -> float | None:
    """Fraction of samples within `target`; None without samples."""
    return sum(1 for s in samples if s <= target) / len(samples) if samples else None


def engine_row(view: Mapping[str, Any], targets: SLOTargets) -> dict[str, Any]:
    """One table row from an engine's published view or its load (same shape: engine_id, stats, ...)."""
    s = view.get("stats", {})
    state = "dead" if s.get("error") else ("draining" if view.get("draining") else
                                            ("ok" if view.get("healthy", True) else "unhealthy"))
    redis = s.get("redis") or {}
    return dict(
        engine_id=view["engine_id"], node_id=str(view.get("node_id", "")), state=state,
        prefill_sms=s.get("prefill_sms"), total_sms=s.get("total_sms"),
        num_waiting=s.get("num_waiting", 0), waiting_prefill_tokens=s.get("waiting_prefill_tokens", 0),
        num_prefilling=s.get("num_prefilling", 0), num_decoding=s.get("num_decoding", 0),
        in_flight=view.get("in_flight", 0), kv_usage=s.get("kv_usage", 0.0),
        ttft_attainment=attainment(s.get("ttft_ms", ()), targets.ttft_ms),
        tpot_attainment=attainment(s.get("tpot_ms", ()), targets.tpot_ms),
        num_samples=len(s.get("ttft_ms", ())), num_switches=s.get("num_switches", 0),
        redis_ok=redis.get("redis_ok"), switches=s.get("switches", []),
        kv_transfer_bytes=s.get("kv_transfer_bytes"),  # disagg engines only ...
        kv_handoff_ms=_mean_ms(s.get("kv_handoff_seconds")),  # ... prefill's first token to the decode batch
    )


def _mean_ms(durations: Mapping[str, Any] | None) -> float | None:
    """The mean of an engine's `Durations` snapshot, in ms; None without any."""
    count = sum(durations["counts"]) if durations else 0
    return 1e3 * durations["sum"] / count if durations and count else None


def _targets(args: argparse.Namespace, controller: Mapping[str, Any] | None) -> SLOTargets:
    base = SLOTargets(**controller["targets"]) if controller and controller.get("targets") else SLOTargets()
    return SLOTargets(args.ttft_slo_ms or base.ttft_ms, args.tpot_slo_ms or base.tpot_ms, base.attainment)


async def _from_redis(url: str, cluster: str, n: int) -> dict[str, Any]:
    from cluster.redis_store import RedisStore

    store = RedisStore(url, cluster, timeout_s=3.0)
    try:
        views = await store.read_views()
        return dict(source=url, views=list(views.values()), decisions=await store.decisions(n),
                    controller=await store.controller_status(), leader=await store.leader(),
                    pins=await store.pins())
    finally:
        await store.aclose()


def _from_ray(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from cluster.router import Router

    try:
        ray.init(address=args.address, namespace=args.namespace, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as e:
        if "Authentication" in repr(e.__cause__):
            raise ValueError(f"{args.address} uses Ray token authentication: set RAY_AUTH_MODE=token (the token is "
                             "read from ~/.ray/auth_token or RAY_AUTH_TOKEN), or use --address auto") from None
        raise ValueError(f"cannot reach the Ray cluster at {args.address}: {e}") from None
    try:
        router = Router.connect(namespace=args.namespace, prefix=args.actor_prefix, timeout_s=30)
        loads = asyncio.run(router.loads())
        views = [load.to_dict() for load in loads]
        decisions = sorted(
            ({"time": sw["time"], "engine_id": v["engine_id"], "from": sw["from_sms"], "to": sw["to_sms"],
              "reason": sw["reason"], "leader": ""} for v in views for sw in v["stats"].get("switches", [])),
            key=lambda d: -d["time"])[: args.decisions]
        controller = None
        try:
            handle = ray.get_actor(f"{args.actor_prefix}-controller", namespace=args.namespace)
            controller = ray.get(handle.status.remote(), timeout=10)
        except Exception:  # no controller (no Redis) or it is restarting
            pass
        return dict(source=args.address, views=views, decisions=decisions, controller=controller,
                    leader=controller["id"] if controller and controller.get("is_leader") else None)
    finally:
        ray.shutdown()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _kv_moved(n: int | None, handoff_ms: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / (1 << 20):.1f} MiB" + ("" if handoff_ms is None else f", {handoff_ms:.1f} ms each")


def render(report: Mapping[str, Any], rows: list[dict[str, Any]], targets: SLOTargets) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"semipd engines ({report['source']})")
    for col in ("engine", "node", "state", "split P/T", "waiting (tok)", "prefill", "decode", "in-flight", "KV",
                f"TTFT<={targets.ttft_ms:g}ms", f"TPOT<={targets.tpot_ms:g}ms", "switches", "KV moved", "redis"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["engine_id"], r["node_id"][:12], r["state"], f"{r['prefill_sms']}/{r['total_sms']}",
            f"{r['num_waiting']} ({r['waiting_prefill_tokens']})", str(r["num_prefilling"]), str(r["num_decoding"]),
            str(r["in_flight"]), f"{100 * r['kv_usage']:.1f}%", _pct(r["ttft_attainment"]),
            _pct(r["tpot_attainment"]), str(r["num_switches"]), _kv_moved(r["kv_transfer_bytes"], r["kv_handoff_ms"]),
            "-" if r["redis_ok"] is None else ("ok" if r["redis_ok"] else "down"),
        )
    console.print(table)
    console.print(f"leader: {report.get('leader') or 'none'}")
    if report.get("pins"):
        console.print("pinned (semipd pin): " + ", ".join(f"{k}={v}" for k, v in sorted(report["pins"].items())))
    dec = Table(title="last split decisions")
    for col in ("time", "engine", "from", "to", "leader", "why"):
        dec.add_column(col)
    for d in report["decisions"]:
        dec.add_row(time.strftime("%H:%M:%S", time.localtime(d["time"])), d["engine_id"], str(d["from"]),
                    str(d["to"]), d.get("leader", ""), d.get("reason", ""))
    console.print(dec)


def run(args: argparse.Namespace) -> int:
    from cluster.bootstrap import env_defaults

    env = env_defaults()
    redis_url = args.redis or (None if args.address else env.get("redis_url"))
    if redis_url:
        from cluster.redis_store import redis_reachable

        with redis_reachable():
            report = asyncio.run(_from_redis(redis_url, args.cluster_name, args.decisions))
    else:
        args.address = args.address or env.get("ray_address")
        if not args.address:
            raise ValueError("give --redis URL or --address ADDR (or set SEMIPD_REDIS_URL / RAY_ADDRESS)")
        report = _from_ray(args)
    targets = _targets(args, report.get("controller"))
    rows = sorted((engine_row(v, targets) for v in report["views"]), key=lambda r: r["engine_id"])
    if args.json:
        print(json.dumps(dict(engines=rows, decisions=report["decisions"], controller=report.get("controller"),
                              leader=report.get("leader"), pins=report.get("pins"), source=report["source"]),
                         default=str))
    else:
        render(report, rows, targets)
    return 0

"""`semipd pin`: hold engines at an SM split, overriding the SLO controller's policy, or let go.

The controller applies a pin at its next tick (no dwell, no warm-up) and keeps it until
`--clear`; each engine takes the available split nearest the pinned prefill SM count.
"""

from __future__ import annotations

import argparse
import asyncio


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pin", help="pin engines to a prefill SM count (operator override), or unpin them")
    p.add_argument("--redis", metavar="URL", help="Redis URL the cluster uses (default: $SEMIPD_REDIS_URL)")
    p.add_argument("--cluster-name", default="default", help="Redis key namespace of the cluster")
    p.add_argument("--engine", default="*", help="engine id (default '*': every engine without a pin of its own)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prefill-sms", type=int, help="SMs for prefill; the nearest available split is used")
    what.add_argument("--clear", action="store_true", help="remove the pin; the split policy decides again")
    p.set_defaults(func=run)


async def _set_pin(url: str, cluster: str, target: str, prefill_sms: int | None) -> dict[str, int]:
    from cluster.redis_store import RedisStore

    store = RedisStore(url, cluster, timeout_s=3.0)
    try:
        await store.set_pin(target, prefill_sms)
        return await store.pins()
    finally:
        await store.aclose()


def run(args: argparse.Namespace) -> int:
    from cluster.bootstrap import env_defaults

    if args.prefill_sms is not None and args.prefill_sms < 1:
        raise ValueError(f"--prefill-sms must be a positive SM count, got {args.prefill_sms}")
    url = args.redis or env_defaults().get("redis_url")
    if not url:
        raise ValueError("give --redis URL (or set SEMIPD_REDIS_URL)")
    pins = asyncio.run(_set_pin(url, args.cluster_name, args.engine, None if args.clear else args.prefill_sms))
    print("pins: " + (", ".join(f"{k}={v}" for k, v in sorted(pins.items())) or "none"))
    return 0

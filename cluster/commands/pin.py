"""`semipd pin`: hold engines at an SM split, overriding the SLO controller's policy, or let go.

The controller applies a pin at its next tick (no dwell, no warm-up) and keeps it until
`--clear`; each engine takes the available split nearest the pinned prefill SM count (an
engine that will run another count than its pin is named on stderr). `--exact` sets no pin that
some engine has no split of exactly (exit 1): a fixed-split deployment has only its own split.
A pin for an engine id that publishes no view (a typo) is not set (exit 1).
`--wait S` returns only once every pinned engine runs its split (exit 1 after S seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from actors.slo.types import nearest_split

if TYPE_CHECKING:
    from cluster.redis_store import RedisStore

POLL_S = 0.2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pin", help="pin engines to a prefill SM count (operator override), or unpin them")
    p.add_argument("--redis", metavar="URL", help="Redis URL the cluster uses (default: $SEMIPD_REDIS_URL)")
    p.add_argument("--cluster-name", default="default", help="Redis key namespace of the cluster")
    p.add_argument("--engine", default="*", help="engine id (default '*': every engine without a pin of its own)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prefill-sms", type=int, help="SMs for prefill; the nearest available split is used")
    what.add_argument("--clear", action="store_true", help="remove the pin; the split policy decides again")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait until every pinned engine runs its pinned split; exit 1 if not within SECONDS")
    p.add_argument("--exact", action="store_true",
                   help="set the pin only if every engine it holds has a split of exactly --prefill-sms "
                        "(else exit 1, pins unchanged), instead of taking the nearest")
    p.set_defaults(func=run)


def _tick_mark(status: Mapping[str, Any] | None) -> tuple[Any, Any] | None:
    """What changes with every controller tick: its leader and the tick's time (None: no controller)."""
    return None if status is None else (status.get("leader"), status.get("time"))


class PinTarget(NamedTuple):
    """A pinned engine's pin, the split it gets (the nearest available), and the split it runs now."""

    pin: int
    split: int
    running: int


def pin_targets(views: Mapping[str, Mapping[str, Any]], pins: Mapping[str, int],
                prefill_sm_fraction: tuple[float, float] = (0.0, 1.0)) -> dict[str, PinTarget | None]:
    """Each pinned engine's `PinTarget`: the split it gets is the nearest its pin among those the controller may
    set (`prefill_sm_fraction`, as it bounds them). Draining engines are left out, as the controller leaves them;
    one whose view is malformed maps to None (the controller skips it)."""
    from cluster.controller import bounded_view, view_from_dict

    out: dict[str, PinTarget | None] = {}
    for eid, published in sorted(views.items()):
        pin = pins.get(eid, pins.get("*"))
        if pin is None or published.get("draining"):
            continue
        try:
            view = bounded_view(view_from_dict(published), prefill_sm_fraction)
        except ValueError:
            out[eid] = None
            continue
        out[eid] = PinTarget(pin, nearest_split(view.splits, pin), view.prefill_sms)
    return out


def engines_off_pin(views: Mapping[str, Mapping[str, Any]], pins: Mapping[str, int],
                    pending: Mapping[str, Mapping[str, Any] | None],
                    prefill_sm_fraction: tuple[float, float] = (0.0, 1.0)) -> list[str]:
    """Pinned engines not yet settled on their split (`pin_targets`): either running another split, or with a last
    decision (`pending`) for another one still to take. One whose view is malformed is off: it never settles."""
    off = []
    for eid, target in pin_targets(views, pins, prefill_sm_fraction).items():
        last = pending.get(eid)
        if target is None or target.running != target.split \
                or (last is not None and int(last["prefill_sms"]) != target.split):
            off.append(eid)
    return off


def pins_not_exact(views: Mapping[str, Mapping[str, Any]], pins: Mapping[str, int],
                   prefill_sm_fraction: tuple[float, float] = (0.0, 1.0)) -> list[str]:
    """One line for each pinned engine whose split will not be its pin: the split it gets instead."""
    return [f"{eid} has no split of {t.pin} prefill SMs: it runs the nearest, {t.split}"
            for eid, t in pin_targets(views, pins, prefill_sm_fraction).items()
            if t is not None and t.pin != t.split]


async def _wait_applied(store: RedisStore, named: str | None, before: tuple[Any, Any] | None,
                        timeout_s: float) -> str | None:
    """None once the controller has ticked since `before` (read after the pin was set, so that tick read the
    pin) and every pinned engine runs its split, the `named` engine (if any) among them; else why not."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await store.controller_status()
        ticked = _tick_mark(status) not in (None, before)
        lo, hi = (status or {}).get("prefill_sm_fraction", (0.0, 1.0))  # a controller from before it: unbounded
        views = await store.read_views()
        off = engines_off_pin(views, await store.pins(), {eid: await store.get_split(eid) for eid in views},
                              (float(lo), float(hi)))
        if named is not None and (named not in views or views[named].get("draining")):
            off.append(f"{named} (draining, or no view published)")
        if ticked and not off:
            return None
        if time.monotonic() >= deadline:
            return (f"not on their pinned split after {timeout_s:g} s: {', '.join(off)}" if ticked
                    else f"no controller tick within {timeout_s:g} s (is the SLO controller running?)")
        await asyncio.sleep(POLL_S)


async def _set_pin(url: str, cluster: str, target: str, prefill_sms: int | None, wait_s: float,
                   exact: bool = False) -> tuple[dict[str, int], list[str], str | None]:
    """The pins after the change, the pinned engines that get another split than their pin (`pins_not_exact`),
    and why the change failed (None: it did not): a pin for an engine that publishes no view (a mistyped id), or
    `exact` and such an engine (in both the pins are left as they were), or, with `wait_s` > 0, the pins not
    applied in time. Clearing a pin always goes ahead."""
    from cluster.redis_store import RedisStore

    store = RedisStore(url, cluster, timeout_s=3.0)
    try:
        status = await store.controller_status()
        lo, hi = (status or {}).get("prefill_sm_fraction", (0.0, 1.0))  # a controller from before it: unbounded
        pins = dict(await store.pins())
        if prefill_sms is not None:
            pins[target] = prefill_sms
        else:
            pins.pop(target, None)
        views = await store.read_views()
        if prefill_sms is not None and target != "*" and target not in views:
            engines = ", ".join(sorted(views)) or "none"
            return await store.pins(), [], (f"no engine {target!r} publishes a view in cluster {cluster!r} "
                                            f"(engines: {engines}); pins left as they were")
        not_exact = pins_not_exact(views, pins, (float(lo), float(hi)))
        if exact and not_exact:
            return await store.pins(), not_exact, "--exact: pins left as they were"
        await store.set_pin(target, prefill_sms)
        before = _tick_mark(await store.controller_status())  # a tick that wrote this may have read the old pins
        pins = await store.pins()
        if wait_s <= 0:
            return pins, not_exact, None
        named = target if prefill_sms is not None and target != "*" else None
        return pins, not_exact, await _wait_applied(store, named, before, wait_s)
    finally:
        await store.aclose()


def run(args: argparse.Namespace) -> int:
    from cluster.bootstrap import env_defaults

    if args.prefill_sms is not None and args.prefill_sms < 1:
        raise ValueError(f"--prefill-sms must be a positive SM count, got {args.prefill_sms}")
    if not args.wait >= 0:  # NaN too
        raise ValueError(f"--wait must be >= 0 seconds, got {args.wait}")
    if args.exact and args.clear:
        raise ValueError("--exact goes with --prefill-sms, not --clear")
    url = args.redis or env_defaults().get("redis_url")
    if not url:
        raise ValueError("give --redis URL (or set SEMIPD_REDIS_URL)")
    from cluster.redis_store import redis_reachable

    with redis_reachable():
        pins, not_exact, failed = asyncio.run(_set_pin(url, args.cluster_name, args.engine,
                                                       None if args.clear else args.prefill_sms, args.wait,
                                                       args.exact))
    print("pins: " + (", ".join(f"{k}={v}" for k, v in sorted(pins.items())) or "none"))
    for line in not_exact:
        print(f"semipd pin: {line}", file=sys.stderr)
    if failed is not None:
        print(f"semipd pin: {failed}", file=sys.stderr)
        return 1
    return 0

"""The split policy in simulation over a fixed set of loads: the mean share of requests within both targets.

    .venv/bin/python bench/policy_suite.py PROFILE.json [--seeds N] [--device "NVIDIA H100 80GB HBM3"]

Each case is a load (chat 35-50 req/s, documents 3-5, documents then chat after a pause, a 4 s lull between
two bursts of chat or of documents) under TTFT <= 1 s and TPOT <= 12 or 15 ms, plus documents at 4-6 req/s
under TTFT <= 1.5 s and TPOT <= 15 ms, and long documents giving way to reasoning (long outputs), a load that no
split held throughout serves (since 2026-12-04 evening: 50 cases, of which the first 46 are the earlier suite's).
Each runs on an engine whose prefill is as fast as the profile says and 15% slower (the policy always holds the
profile), starting on 64 prefill SMs, `--seeds` times. Prints one line per case and prefill speed, the mean of
each kind of load, the policy's switches per minute, and the mean of all. CPU only, about 25 s.
`--fixed` also holds every split of the profile through each case and prints the best one beside the policy
(issue 4 asks the policy to sustain at least what the best fixed split does), and the best single split held
through every case, about 13 times as long. `--policy reactive` runs the semi-PD paper's rule instead (P90 TTFT
or TPOT over its target moves one split step, `ReactivePolicy`), at the same decision interval. `--stalls RATE:S`
stops decode now and then while prompts wait (a fresh server's first windows on the H100, run 30), `--hide stalls`
leaves the TPOT so far without stalls out of the view (the policy then takes a stall for a slow step).
`--admission reject|queue` runs admission control (slack 1, or `--admission-slack`) in front of the engine, as
`semipd serve --admission` (with `reject` the engine's view says it refuses late prompts, as a GPU actor's does).
`--decode-factor F` times the engine's decode steps at F times the profile's (the policy still holds the
profile): serving's documents on the H100 decoded at about 0.8 of it on 80 prefill SMs (run 42).
The figures quoted in docs/perf/serve-h200.md (run 19 on) are this script's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this checkout's code, also when another checkout of it is the one installed in the venv (comparing two commits)
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine_sim import Phase, SimResult, simulate, with_decode_factor, with_prefill_factor  # noqa: E402

from actors.slo.admission import ADMISSION_ACTIONS, AdmissionConfig, AdmissionController  # noqa: E402
from actors.slo.latency_model import LatencyModel, load_models  # noqa: E402
from actors.slo.policy import make_policy  # noqa: E402
from actors.slo.types import SLOTargets  # noqa: E402

PREFILL_FACTORS = (1.0, 1.15)


def chat(rate: float, seconds: float = 15.0) -> Phase:
    return Phase(seconds, rate, 495, 92, prompt_cv=1.0)


def documents(rate: float, seconds: float = 15.0) -> Phase:
    return Phase(seconds, rate, 4236, 180, prompt_cv=0.8)


def reasoning(rate: float, seconds: float = 20.0) -> Phase:
    return Phase(seconds, rate, 110, 2500, prompt_cv=0.5)


def pause(seconds: float) -> Phase:
    return Phase(seconds, 0.01, 500, 92)


def cases() -> list[tuple[str, str, list[Phase], SLOTargets]]:
    """(kind, name, phases, targets) of every case."""
    out = []
    for tpot in (12.0, 15.0):
        targets, t = SLOTargets(ttft_ms=1000.0, tpot_ms=tpot), f"{tpot:g}"
        out += [("chat", f"chat {r} / {t}", [chat(r)], targets) for r in (35, 40, 45, 50)]
        out += [("documents", f"documents {r} / {t}", [documents(r)], targets) for r in (3, 4, 5)]
        out.append(("shift", f"documents 7.5, pause, chat 50 / {t}",
                    [Phase(15.0, 7.5, 3700, 200, prompt_cv=0.8), pause(10.0), Phase(15.0, 50.0, 500, 92, prompt_cv=1.0)],
                    targets))
        out.append(("lull", f"chat 45, lull, chat 40 / {t}", [chat(45), pause(4.0), chat(40)], targets))
        out.append(("lull", f"documents 4, lull, documents 4 / {t}", [documents(4), pause(4.0), documents(4)], targets))
    doc_targets = SLOTargets(ttft_ms=1500.0, tpot_ms=15.0)
    out += [("documents at 1.5 s / 15 ms", f"documents {r} / 1500+15", [documents(r)], doc_targets) for r in (4, 5, 6)]
    long_documents = Phase(20.0, 3.0, 5905, 180, prompt_cv=0.35)
    out += [("documents then reasoning", f"long documents 3, reasoning {r} / {t.ttft_ms:g}+{t.tpot_ms:g}",
             [long_documents, reasoning(r)], t)
            for r, t in ((4.5, SLOTargets(ttft_ms=1000.0, tpot_ms=12.0)), (6.0, doc_targets))]
    return out


def _pair(text: str, names: tuple[str, str], lows: tuple[float, float]) -> tuple[float, float]:
    """A:B -> (A, B), each at least its `lows` bound (NaN refused), or argparse's error naming `names`."""
    first, sep, second = text.partition(":")
    try:
        value = (float(first), float(second))
    except ValueError:
        value = (math.nan, math.nan)
    if not sep or not (value[0] >= lows[0] and value[1] >= lows[1]):
        raise argparse.ArgumentTypeError(f"expected {names[0]}:{names[1]} with {names[0]} >= {lows[0]:g} and "
                                         f"{names[1]} >= {lows[1]:g}, got {text!r}")
    return value


def _transient(text: str) -> tuple[float, float]:
    """--switch-transient S:FACTOR -> (S, FACTOR), as `simulate`'s `switch_transient` takes it."""
    return _pair(text, ("S", "FACTOR"), (0.0, 1.0))


def _stalls(text: str) -> tuple[float, float]:
    """--stalls RATE:S -> (RATE, S), as `simulate`'s `stalls` takes it."""
    return _pair(text, ("RATE", "S"), (0.0, 0.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="a saved latency profile")
    parser.add_argument("--device", default="NVIDIA H200",
                        help="the device whose profile to simulate, when the file holds several (default NVIDIA H200)")
    parser.add_argument("--seeds", type=int, default=6, help="arrival seeds per case (default 6)")
    parser.add_argument("--switch-transient", type=_transient, default=(0.0, 1.0), metavar="S:FACTOR",
                        help="decode's steps FACTOR times slower for S seconds after each switch toward prefill "
                             "(default none; 0.5:2 is what runs 20-21 on the H200 streamed)")
    parser.add_argument("--stalls", type=_stalls, default=(0.0, 0.0), metavar="RATE:S",
                        help="decode stands still for S seconds, RATE times a second while prompts wait (default "
                             "none; about 0.7:0.2 is what a fresh server's first windows at a new load showed on the "
                             "H100, run 30)")
    parser.add_argument("--hide", nargs="*", default=[], choices=("arrivals", "lengths", "budgets", "speed", "stalls"),
                        help="leave these out of the engine's view (as `simulate` takes them), e.g. stalls (the TPOT "
                             "so far without stalls): the policy then reads a stall as a slow decode step")
    parser.add_argument("--policy", choices=("model", "reactive"), default="model",
                        help="the split policy to run: ours (default) or the semi-PD paper's reactive rule")
    parser.add_argument("--admission", choices=("off", *ADMISSION_ACTIONS), default="off",
                        help="admission control, as `semipd serve --admission` sets it (slack: --admission-slack): "
                             "`reject` refuses a request predicted past its TTFT target (a miss), `queue` serves it "
                             "after the others")
    parser.add_argument("--admission-slack", type=float, default=1.0, metavar="S",
                        help="admit while the predicted TTFT is at most S times its target (default 1, as "
                             "`semipd serve --admission-slack`)")
    parser.add_argument("--decode-factor", type=float, default=1.0, metavar="F",
                        help="the engine's decode steps take F times what the profile says (default 1)")
    parser.add_argument("--aging-s", type=float, default=None, metavar="S",
                        help="with --admission queue: a request held back goes ahead of younger ones after S seconds "
                             "(default twice the TTFT target, as `semipd serve --aging-s`)")
    parser.add_argument("--fixed", action="store_true",
                        help="also hold each split of the profile fixed, and print each case's best beside the policy")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if not (args.admission_slack > 0 and args.decode_factor > 0):
        parser.error(f"--admission-slack and --decode-factor must be positive, got {args.admission_slack} and "
                     f"{args.decode_factor}")
    if args.aging_s is not None and not args.aging_s > 0:
        parser.error(f"--aging-s must be positive, got {args.aging_s}")
    models = list(load_models(args.profile).values())
    chosen = [m for m in models if m.device == args.device] if len(models) > 1 else models
    if len(chosen) != 1:
        parser.error(f"{args.profile} holds {len(chosen)} profiles of {args.device!r} "
                     f"(devices: {', '.join(sorted(m.device for m in models)) or 'none'})")
    (model,) = chosen
    by_kind: dict[str, list[float]] = {}
    best_fixed_by_kind: dict[str, list[float]] = {}
    by_split: dict[int, list[float]] = {}  # each split held through every case (what an operator who cannot know
    # the load ahead would pick from)

    def runs(engine: LatencyModel, phases: list[Phase], targets: SLOTargets, start_sms: int,
             dynamic: bool) -> list[SimResult]:
        """One per seed; `dynamic`: a fresh policy for each seed (it keeps state per engine), else fixed."""
        admission = None
        if args.admission != "off":  # the engine's controller holds the profile, as the policy does
            config = AdmissionConfig(ttft_ms=targets.ttft_ms, slack=args.admission_slack, action=args.admission)
            admission = AdmissionController(model, config)
        return [simulate(engine, phases, targets, start_sms, make_policy(args.policy, model) if dynamic else None,
                         seed=s, dt=0.01, hide=frozenset(args.hide), switch_transient=args.switch_transient,
                         stalls=args.stalls, admission=admission, aging_s=args.aging_s) for s in range(args.seeds)]

    def attainment_pct(results: list[SimResult]) -> float:
        return 100.0 * sum(r.attainment for r in results) / len(results)

    switches: list[float] = []  # switches per minute of arrivals, each dynamic run
    for kind, name, phases, targets in cases():
        minutes = sum(p.seconds for p in phases) / 60.0
        for factor in PREFILL_FACTORS:
            engine = with_decode_factor(with_prefill_factor(model, factor), args.decode_factor)
            policy_runs = runs(engine, phases, targets, 64, dynamic=True)
            pct = attainment_pct(policy_runs)
            switches += [len(r.switches) / minutes for r in policy_runs]
            by_kind.setdefault(kind, []).append(pct)
            line = f"{name:40s} prefill x{factor:.2f}: {pct:5.1f}%"
            if args.fixed:
                fixed = {s: attainment_pct(runs(engine, phases, targets, s, dynamic=False)) for s in model.splits}
                best = max(fixed, key=lambda s: (fixed[s], -abs(s - 64)))
                for split, pct_fixed in fixed.items():
                    by_split.setdefault(split, []).append(pct_fixed)
                best_fixed_by_kind.setdefault(kind, []).append(fixed[best])
                line += f"   best fixed split {best}: {fixed[best]:5.1f}%"
            print(line)
    for kind, values in by_kind.items():
        fixed_note = ""
        if args.fixed:
            fixed_note = f" (best fixed split per case: {sum(best_fixed_by_kind[kind]) / len(values):.1f}%)"
        print(f"mean, {kind}: {sum(values) / len(values):.1f}%{fixed_note}")
    print(f"switches per minute of arrivals: mean {sum(switches) / len(switches):.1f}, most {max(switches):.1f}")
    every = [v for values in by_kind.values() for v in values]
    print(f"mean of {len(every)} cases x {args.seeds} seeds: {sum(every) / len(every):.2f}%")
    if args.fixed:
        every_fixed = [v for values in best_fixed_by_kind.values() for v in values]
        print(f"best fixed split per case, mean: {sum(every_fixed) / len(every_fixed):.2f}%")
        single = {split: sum(v) / len(v) for split, v in by_split.items()}
        best_single = max(single, key=lambda split: single[split])
        print(f"best single split held through every case: {best_single}, {single[best_single]:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

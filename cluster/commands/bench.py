"""`semipd bench ...`: benchmarks. `bench serve` (load against an OpenAI-compatible server),
`bench plot` (SLO attainment and P90 TTFT/TPOT against rate for several runs; bars for one window of several).

Further `bench` subcommands live in their own modules listed in BENCH_MODULES (for
example `bench engine` in cluster/commands/bench_engine.py); each defines
`register(bench_subparsers)` (or `register_engine(bench_subparsers)`) like the top-level
command modules, and is skipped when the module does not exist.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from cluster.bench.arrivals import RampUp
    from cluster.bench.serve_bench import ServeBenchConfig
    from cluster.bench.structured import StructuredOutput
    from cluster.bench.workloads import Phase

T = TypeVar("T")

BENCH_MODULES = ("cluster.commands.bench_engine",)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: serve (HTTP load generator), plot, ...")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    _register_serve(bench_sub)
    _register_plot(bench_sub)
    _register_timeline(bench_sub)
    _register_keep(bench_sub)
    for name in BENCH_MODULES:
        if importlib.util.find_spec(name) is not None:
            module = importlib.import_module(name)
            hook = getattr(module, "register", None) or getattr(module, "register_engine")
            hook(bench_sub)


# ---------------------------------------------------------------- argument types


def _type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Wrap a parser raising ValueError so argparse reports it (exit 2)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a positive number, got {text}")
    return value


def _burstiness(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"must be a positive number or inf, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"must be in [0, 1), got {text}")
    return value


def _attainment(text: str) -> float:
    value = float(text)
    if not (0.0 < value <= 100.0):
        raise ValueError(f"must be a percentage in (0, 100], got {text}")
    return value


def _slo_item(text: str) -> str:
    from cluster.bench.metrics import SLOs

    SLOs.parse([text])
    return text


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _rates(text: str) -> tuple[float, ...]:
    from cluster.bench.arrivals import parse_rates

    return parse_rates(text)


def _phases(text: str) -> tuple[Phase, ...]:
    from cluster.bench.workloads import parse_phases

    return parse_phases(text)


def _percentiles(text: str) -> tuple[float, ...]:
    from cluster.bench.metrics import parse_percentiles

    return parse_percentiles(text)


def _metric_names(text: str) -> tuple[str, ...]:
    from cluster.bench.metrics import parse_metric_names

    return parse_metric_names(text)


# ---------------------------------------------------------------- serve


def _register_serve(sub: argparse._SubParsersAction) -> None:
    from cluster.bench.arrivals import RAMP_STRATEGIES
    from cluster.bench.client import ENDPOINTS
    from cluster.bench.structured import BUILTIN_CHOICES, BUILTIN_REGEX, KINDS
    from cluster.bench.workloads import WORKLOAD_NAMES

    p = sub.add_parser(
        "serve", help="open-loop load against an OpenAI-compatible server (vllm bench serve style)",
        description="Send a synthetic workload to an OpenAI-compatible server at a request rate (or a sweep) "
                    "and report TTFT, TPOT, ITL, E2EL, throughput and goodput like `vllm bench serve`.",
    )
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    g.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    g.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="local HF tokenizer directory, for prompts of exact token length")
    g.add_argument("--request-timeout", type=_type(_positive_float), default=600.0, metavar="S",
                   help="seconds before one request counts as failed (default 600)")

    g = p.add_argument_group("workload")
    g.add_argument("--workload", "--dataset-name", dest="workload", default="sharegpt", choices=WORKLOAD_NAMES)
    g.add_argument("--dataset-path", metavar="FILE",
                   help="take the requests from a file: ShareGPT's JSON (sharegpt) or JSON Lines of "
                        '{"prompt": ..., "output_tokens": N} (custom)')
    g.add_argument("--num-prompts", type=_type(_positive_int), default=1000)
    g.add_argument("--phases", type=_type(_phases), default=None, metavar="NAME[:FRAC][@SCALE],...",
                   help="phases of --workload shifting, in order, each for FRAC of the run's time at SCALE times "
                        "--request-rate (default sharegpt:0.5,long-doc:0.5)")
    g.add_argument("--input-len", "--random-input-len", dest="input_len", type=_type(_positive_int), default=1024,
                   help="random workload: mean input tokens")
    g.add_argument("--output-len", "--random-output-len", dest="output_len", type=_type(_positive_int), default=128,
                   help="random workload: mean output tokens; custom: the output of a line that names none")
    g.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=_type(_ratio), default=0.0,
                   help="random workload: lengths uniform in [len*(1-r), len*(1+r)]")
    g.add_argument("--seed", type=_type(_non_negative_int), default=0,
                   help="same seed, same requests; in a sweep each rate draws its own (seed, run) so that no run "
                        "finds an earlier run's prompts in the server's prefix cache")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop at EOS (default: ignore_eos so outputs have the drawn length)")
    g.add_argument("--temperature", type=float, default=0.0)

    g = p.add_argument_group("traffic")
    g.add_argument("--request-rate", type=_type(_rates), default=(math.inf,), metavar="RATE[,RATE...]",
                   help="requests/s (inf: all at once); a comma list runs a sweep, one result per rate")
    g.add_argument("--burstiness", type=_type(_burstiness), default=1.0,
                   help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier, >1 more regular, inf constant")
    g.add_argument("--ramp-up-strategy", choices=RAMP_STRATEGIES, default=None,
                   help="instead of --request-rate, raise the rate from --ramp-up-start-rps to --ramp-up-end-rps "
                        "over the run's requests, linearly or exponentially in their index (vLLM's ramp-up)")
    g.add_argument("--ramp-up-start-rps", type=_type(_positive_float), default=None, metavar="RPS")
    g.add_argument("--ramp-up-end-rps", type=_type(_positive_float), default=None, metavar="RPS")
    g.add_argument("--max-concurrency", type=_type(_positive_int), default=None)

    g = p.add_argument_group("structured outputs (vLLM's benchmark_serving_structured_output)")
    g.add_argument("--structured-output", default=None, choices=KINDS, metavar="KIND",
                   help=f"one of {', '.join(KINDS)}: every request's output must match it (the body's "
                        "structured_outputs) and the result adds the correct rate, the share of completed outputs "
                        "that ended with 'stop' and match. Built in: json a small schema (enum, boolean, bounded "
                        f"integer, short string), regex {BUILTIN_REGEX.replace('%', '%%')}, choice "
                        f"{', '.join(BUILTIN_CHOICES)}")
    g.add_argument("--structured-spec", default=None, metavar="FILE_OR_TEXT",
                   help="replaces the built-in spec: a JSON schema (json), a pattern (regex) or a JSON list of "
                        "strings (choice), in a file or given as text")
    g.add_argument("--no-whitespace", action="store_true",
                   help='send "disable_any_whitespace": true (JSON without whitespace between its tokens)')

    g = p.add_argument_group("metrics and results")
    g.add_argument("--goodput", nargs="+", type=_type(_slo_item), default=None, metavar="KEY:MS",
                   help="SLOs for goodput, any of ttft:MS tpot:MS e2el:MS")
    g.add_argument("--percentile-metrics", type=_type(_metric_names), default=("ttft", "tpot", "itl", "e2el"),
                   help="metrics to report percentiles of (default ttft,tpot,itl,e2el)")
    g.add_argument("--metric-percentiles", type=_type(_percentiles), default=(90.0, 99.0),
                   help="percentiles to report (default 90,99)")
    g.add_argument("--label", default=None, help="name of this run in results and plots (default: the model)")
    g.add_argument("--save-result", action="store_true", help="write the result JSON (implied by --result-*)")
    g.add_argument("--result-dir", default=None)
    g.add_argument("--result-filename", default=None, help="file name; '{rate}' is replaced in a sweep")
    g.add_argument("--metadata", nargs="*", type=_type(_key_value), default=[], metavar="KEY=VALUE")
    g.add_argument("--no-server-metrics", dest="server_metrics", action="store_false",
                   help="do not read the server's /metrics and /splits (SM split changes) around each run")
    g.add_argument("--disable-tqdm", action="store_true")
    p.set_defaults(func=run_serve)


def serve_config(args: argparse.Namespace) -> ServeBenchConfig:
    """The ServeBenchConfig of parsed `bench serve` arguments (`cluster.cli.main` records the command line in
    them), with the commit measured."""
    from cluster.bench.metrics import SLOs
    from cluster.bench.provenance import git_commit
    from cluster.bench.serve_bench import SERVER_METRIC_PREFIXES, ServeBenchConfig
    from cluster.bench.workloads import DEFAULT_PHASES, WorkloadConfig

    if args.phases is not None and args.workload != "shifting":
        raise ValueError("--phases applies to --workload shifting only")
    structured = structured_output(args)
    ramp = ramp_up(args)
    workload = WorkloadConfig(
        name=args.workload, num_prompts=args.num_prompts, seed=args.seed, phases=args.phases or DEFAULT_PHASES,
        input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
        dataset_path=args.dataset_path,
    )
    return ServeBenchConfig(
        base_url=args.base_url, model=args.model, endpoint=args.endpoint, api_key=args.api_key,
        tokenizer=args.tokenizer, workload=workload, request_rates=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, slos=SLOs.parse(args.goodput or []),
        percentile_metrics=args.percentile_metrics, metric_percentiles=args.metric_percentiles,
        ignore_eos=args.ignore_eos, temperature=args.temperature, request_timeout_s=args.request_timeout,
        label=args.label, save_result=args.save_result, result_dir=args.result_dir,
        result_filename=args.result_filename,
        server_metric_prefixes=SERVER_METRIC_PREFIXES if args.server_metrics else (),
        disable_tqdm=args.disable_tqdm, metadata=dict(args.metadata), structured_output=structured, ramp_up=ramp,
        commit=git_commit(), command=args.command_line,
    )


def ramp_up(args: argparse.Namespace) -> RampUp | None:
    """The RampUp of `--ramp-up-strategy`, `--ramp-up-start-rps` and `--ramp-up-end-rps` (ValueError when one is
    given without the others, or with `--request-rate`)."""
    from cluster.bench.arrivals import RampUp

    rps = (args.ramp_up_start_rps, args.ramp_up_end_rps)
    if args.ramp_up_strategy is None:
        if rps != (None, None):
            raise ValueError("--ramp-up-start-rps and --ramp-up-end-rps need --ramp-up-strategy")
        return None
    if None in rps:
        raise ValueError("--ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps")
    if args.request_rate != (math.inf,):
        raise ValueError("--ramp-up-strategy sets the request rate: do not give --request-rate with it")
    return RampUp(args.ramp_up_strategy, args.ramp_up_start_rps, args.ramp_up_end_rps)


def structured_output(args: argparse.Namespace) -> StructuredOutput | None:
    """The StructuredOutput of `--structured-output`, `--structured-spec` and `--no-whitespace` (ValueError when
    the spec is bad or given without a kind)."""
    from cluster.bench.structured import StructuredOutput, parse_spec

    if args.structured_output is None:
        if args.structured_spec is not None or args.no_whitespace:
            raise ValueError("--structured-spec and --no-whitespace need --structured-output")
        return None
    spec = None if args.structured_spec is None else parse_spec(args.structured_output, args.structured_spec)
    return StructuredOutput(args.structured_output, spec, args.no_whitespace)


def run_serve(args: argparse.Namespace) -> int:
    """0 when every run had at least one successful request, 1 otherwise (or when unreachable)."""
    from cluster.bench.client import ServerError
    from cluster.bench.serve_bench import run_serve_bench

    config = serve_config(args)
    try:
        results = run_serve_bench(config)
    except ServerError as e:
        print(f"semipd bench serve: {e}", file=sys.stderr)
        return 1
    return 0 if all(r.metrics.completed > 0 for r in results) else 1


# ---------------------------------------------------------------- plot


def _register_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot SLO attainment and P90 TTFT/TPOT against request rate "
                                   "(bars per run when every run is one window at the same rate)")
    p.add_argument("results", nargs="+", metavar="RESULT.json", help="result files of `bench serve` (any labels)")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--goodput", nargs="+", type=_type(_slo_item), default=None, metavar="KEY:MS",
                   help="SLOs for attainment (default: those stored in each result)")
    p.add_argument("--percentile", type=_type(_percentiles), default=(90.0,), help="latency percentile (default 90)")
    p.add_argument("--attainment", type=_type(_attainment), default=90.0, metavar="PCT",
                   help="print each run's highest request rate with at least PCT%% of requests within the SLOs")
    p.add_argument("--rate-axis", choices=("configured", "offered"), default="configured",
                   help="x axis and sustained rates: the configured request rate, or the rate each run's requests "
                        "were actually sent at (a short Poisson window can be 10%% off its configured rate)")
    p.add_argument("--label-by-dir", action="store_true",
                   help="append each result's folder to its label, e.g. 'vllm (call3)': the same configuration "
                        "measured apart (another machine or session) stays a line of its own")
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from cluster.bench.metrics import SLOs
    from cluster.bench.plot import plot_results
    from cluster.bench.result import load_result
    from cluster.bench.sweep import format_sustained_rates, sustained_rates

    results = [load_result(path) for path in args.results]
    if args.label_by_dir:
        results = [replace(r, label=f"{r.label} ({Path(path).resolve().parent.name})")
                   for r, path in zip(results, args.results)]
    slos = SLOs.parse(args.goodput) if args.goodput else None
    try:
        path = plot_results(results, args.out, slos, percentile=args.percentile[0], rate_axis=args.rate_axis)
        rates = (sustained_rates(results, slos, args.attainment, args.rate_axis)
                 if slos is not None or all(r.slos.active for r in results) else None)
    except ValueError as e:
        print(f"semipd bench plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    if rates is not None:
        print(format_sustained_rates(rates))
    return 0


def _register_timeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("timeline", help="one run second by second: arrivals, streaming, misses, split changes")
    p.add_argument("result", metavar="RESULT.json", help="a result file of `bench serve`")
    p.add_argument("--bin-s", type=_type(_positive_float), default=1.0, metavar="S", help="bin width (default 1 s)")
    p.add_argument("--goodput", nargs="+", type=_type(_slo_item), default=None, metavar="KEY:MS",
                   help="targets for the miss columns (default: those stored in the result)")
    p.add_argument("--gap-ms", type=_type(_positive_float), default=30.0, metavar="MS",
                   help="a gap of MS or more a token is long: a TPOT miss counts as the gaps' when it is within "
                        "the target with its long gaps cut to its median, and each long gap is told by whether the "
                        "other streams got chunks meanwhile (default 30)")
    p.set_defaults(func=run_timeline)


def run_timeline(args: argparse.Namespace) -> int:
    from cluster.bench.metrics import SLOs
    from cluster.bench.result import load_result
    from cluster.bench.timeline import (format_gap_sources, format_timeline, format_tpot_misses,
                                        format_unplaced_changes, gap_sources, timeline, tpot_misses)

    result = load_result(args.result)
    slos = SLOs.parse(args.goodput) if args.goodput else result.slos
    print(f"{result.label} at {result.request_rate:g} req/s configured, {len(result.records)} requests")
    print(format_timeline(timeline(result, slos, args.bin_s), args.bin_s, slos))
    misses = tpot_misses(result, slos, args.gap_ms / 1000.0)
    if misses is not None:
        print(format_tpot_misses(misses))
    if result.records:
        print(format_gap_sources(gap_sources(result, args.gap_ms / 1000.0)))
    unplaced = format_unplaced_changes(result)
    if unplaced:
        print(unplaced)
    return 0


def _register_keep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keep", help="what docs/perf keeps of a GPU call's results: no per-request records, "
                                    "servers' stall lines instead of their logs, no machine paths")
    p.add_argument("results", type=Path, metavar="RESULTS", help="a results folder, or a .tgz of one (compare.tgz)")
    p.add_argument("dest", type=Path, metavar="DEST", help="the folder to write, e.g. docs/perf/DATE-DEVICE/RUN")
    p.set_defaults(func=run_keep)


def run_keep(args: argparse.Namespace) -> int:
    from cluster.bench.keep import KeepError, keep_results

    try:
        kept = keep_results(args.results, args.dest)
    except KeepError as e:
        print(f"semipd bench keep: {e}", file=sys.stderr)
        return 2
    print(f"{args.dest}: {kept.summary()}")
    return 0

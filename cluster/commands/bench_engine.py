"""`semipd bench engine`: in-process GPU benchmarks of one engine, recorded in docs/perf/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PARTS = ("decode", "decode-loop", "prefill", "switch", "contention", "offline")


def register_engine(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("engine", help="GPU engine benchmarks: decode roofline, prefill, split switch, offline job")
    p.add_argument("--model", required=True, help="checkpoint dir (config + tokenizer; weights are drawn at random)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--decode-attention", default="fa2", metavar="KERNELS",
                   help="comma-separated flashinfer decode kernels (fa2, fa3, cuda-cores): the decode table and the "
                        "unified offline job run with each")
    p.add_argument("--vllm-json", help="result of bench/vllm_offline.py from the same machine, to put beside ours")
    p.add_argument("--out", default="docs/perf/engine.md", help="markdown report (a .json is written beside it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from actors.config import DECODE_ATTENTION

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown --parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    kernels = tuple(k.strip() for k in args.decode_attention.split(",") if k.strip())
    bad = set(kernels) - set(DECODE_ATTENTION)
    if not kernels or bad:
        raise ValueError(f"--decode-attention takes a comma-separated subset of {', '.join(DECODE_ATTENTION)}")
    if not torch.cuda.is_available():
        raise ValueError("bench engine needs a CUDA GPU")
    from cluster.bench.engine_bench import format_table, run_engine_bench

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.write_text(format_table(result) + "\n")

    result = run_engine_bench(args.model, parts, args.vllm_json, checkpoint=save, decode_attention=kernels,
                              command=args.command_line)
    save(result)
    print(format_table(result))
    return 0

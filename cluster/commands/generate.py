"""`semipd generate`: one prompt through a local engine (or a gRPC server with --grpc)."""

from __future__ import annotations

import argparse
import json
import sys

from actors.request import SamplingParams


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local HF checkpoint directory (runs the engine in-process)")
    src.add_argument("--grpc", metavar="ADDR", help="address of a semipd gRPC server (host:port)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--mode", default="unified", choices=["unified", "semi-pd"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    if args.grpc:
        from cluster.grpc_client import generate_once

        result = generate_once(args.grpc, args.prompt, params)
    else:
        from actors.engine.frontend import LLM

        with LLM(args.model, mode=args.mode) as llm:
            out = llm.generate([args.prompt], params)[0]
        result = {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                  "num_prompt_tokens": len(out.prompt_token_ids)}
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write(result["text"] + "\n")
    return 0

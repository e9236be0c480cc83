"""`semipd generate`: one prompt through a local engine (or a gRPC server with --grpc)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from actors.request import SamplingParams, StructuredOutputsParams
from cluster.commands.files import text_or_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local HF checkpoint directory (runs the engine in-process)")
    src.add_argument("--grpc", metavar="ADDR", help="address of a semipd gRPC server (host:port)")
    p.add_argument("--prompt", required=True)
    sampling = p.add_argument_group(
        "sampling", "a flag left out takes the model's default, as over the APIs: its generation_config.json (the "
        "server's model with --grpc), else the engine's")
    sampling.add_argument("--max-tokens", type=int,
                          help="most tokens to generate (default: generation_config.json's max_new_tokens, else "
                               f"{SamplingParams.max_tokens}; with --grpc capped by the room the prompt leaves)")
    sampling.add_argument("--temperature", type=float,
                          help=f"0 is greedy (default: generation_config.json's, else {SamplingParams.temperature})")
    sampling.add_argument("--top-p", type=float,
                          help="draw from the most likely tokens that make up this probability mass (default: "
                               f"generation_config.json's, else {SamplingParams.top_p})")
    sampling.add_argument("--seed", type=int, help="seeds this request's draws (default: none)")
    sampling.add_argument("--ignore-eos", action="store_true", help="generate past EOS, up to --max-tokens")
    p.add_argument("--mode", default="unified", choices=["unified", "semi-pd"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    so = p.add_argument_group("structured output (at most one of the first five)")
    kind = so.add_mutually_exclusive_group()
    kind.add_argument("--json-schema", metavar="FILE_OR_JSON",
                      help="the output matches this JSON schema: a .json file, or inline JSON starting with '{'")
    kind.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")
    kind.add_argument("--choice", action="append", metavar="TEXT",
                      help="the output is exactly one of these (repeat: --choice A --choice B)")
    kind.add_argument("--grammar", metavar="FILE_OR_TEXT",
                      help="the output matches this grammar (Lark or GBNF): a file if one exists there, else the text")
    kind.add_argument("--json-object", action="store_true", help="the output is any JSON object")
    so.add_argument("--no-whitespace", action="store_true",
                    help="JSON without whitespace between its tokens (with --json-schema / --json-object)")
    p.set_defaults(func=run)


def read_json_schema(value: str) -> str:
    """The schema's text: the file `value` names, or `value` itself (inline JSON); a ValueError naming it when that
    is not JSON (the CLI exits 2)."""
    text, is_file = text_or_file(value)
    source = f"schema file {value!r}" if is_file else f"{value!r} (neither a readable file nor inline JSON)"
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--json-schema: {source} is not valid JSON: {e}") from None
    return text


def structured_outputs(args: argparse.Namespace) -> StructuredOutputsParams | None:
    """StructuredOutputsParams from the structured-output flags, None if none was given."""
    ws = args.no_whitespace
    if args.json_schema is not None:
        return StructuredOutputsParams(json=read_json_schema(args.json_schema), disable_any_whitespace=ws)
    if args.regex is not None:
        return StructuredOutputsParams(regex=args.regex, disable_any_whitespace=ws)
    if args.choice is not None:
        return StructuredOutputsParams(choice=tuple(args.choice), disable_any_whitespace=ws)
    if args.grammar is not None:
        return StructuredOutputsParams(grammar=text_or_file(args.grammar)[0], disable_any_whitespace=ws)
    if args.json_object:
        return StructuredOutputsParams(json_object=True, disable_any_whitespace=ws)
    if ws:
        raise ValueError("--no-whitespace needs a structured output (--json-schema, --json-object, ...)")
    return None


def given_params(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling parameters the command line sets (SamplingParams field names), checked (SamplingParamsError):
    only the flags given, so that the model's defaults apply to the rest."""
    given: dict[str, Any] = {name: getattr(args, name) for name in ("max_tokens", "temperature", "top_p", "seed")
                             if getattr(args, name) is not None}
    if args.ignore_eos:
        given["ignore_eos"] = True
    spec = structured_outputs(args)
    if spec is not None:
        given["structured_outputs"] = spec
    SamplingParams(**given)
    return given


def run(args: argparse.Namespace) -> int:
    given = given_params(args)
    if args.grpc:
        import grpc

        from cluster.grpc_client import GrpcCallError, generate_once, given_params_to_proto

        try:
            result = generate_once(args.grpc, args.prompt, given_params_to_proto(given))
        except GrpcCallError as e:
            if isinstance(e, ValueError):  # INVALID_ARGUMENT: the CLI's usual exit 2
                raise
            if e.code == grpc.StatusCode.UNAVAILABLE:  # a wrong --grpc address, or a server going down
                raise ValueError(f"the gRPC server at {args.grpc} is unavailable: {e}") from None
            print(f"semipd generate: error: the gRPC server at {args.grpc} failed the request: {e}", file=sys.stderr)
            return 1
    else:
        from actors.engine.frontend import LLM

        with LLM(args.model, mode=args.mode) as llm:
            out = llm.generate([args.prompt], replace(llm.default_params, **given))[0]
        result = {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                  "num_prompt_tokens": len(out.prompt_token_ids)}
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write(result["text"] + "\n")
    return 0

"""`semipd` command line: one subcommand per module in `cluster.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. User errors (bad flags, missing files, invalid values) print a
message and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "cluster.commands.make_model",
    "cluster.commands.generate",
    "cluster.commands.bench",
    "cluster.commands.serve",
    "cluster.commands.status",
    "cluster.commands.pin",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semipd", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, SamplingParamsError, PromptTooLongError
        print(f"semipd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

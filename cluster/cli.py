"""`semipd` command line: one subcommand per module in `cluster.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. User errors (bad flags, missing files, invalid values) print a
message and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

from cluster.redis_server import RedisServerError

COMMAND_MODULES = (
    "cluster.commands.make_model",
    "cluster.commands.generate",
    "cluster.commands.run_batch",
    "cluster.commands.bench",
    "cluster.commands.serve",
    "cluster.commands.status",
    "cluster.commands.pin",
)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Python logging at `level` (a name such as "INFO") to stderr, for this process."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def configure_worker_logging() -> None:
    """Ray's `worker_process_setup_hook` for the processes of a `semipd serve` job (engine actors, the SLO
    controller, Serve replicas): the job's `--log-level` (`SEMIPD_LOG_LEVEL`), so that what they log at it
    reaches the job's output as the driver's own lines do. Without it a Ray worker keeps Python's default
    (WARNING): the controller's split decisions and holds, logged at INFO, never showed."""
    from cluster.bootstrap import env_defaults

    level = env_defaults().get("log_level")
    if level:
        configure_logging(level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semipd", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    parser.set_defaults(command_line="")  # the command as typed, which `main` sets and benchmarks record
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["semipd", *(sys.argv[1:] if argv is None else argv)])
    configure_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, SamplingParamsError, PromptTooLongError
        print(f"semipd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RedisServerError as e:  # not installed, or it did not come up: the machine's problem, not the flags'
        print(f"semipd {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

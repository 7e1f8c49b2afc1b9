"""memplan's command line: parse, dispatch to one module per command, print errors as one line.

Each module in memplan/commands/ adds its sub-command with `register(subparsers)` and keeps its heavy imports
(torch, transformers, pandas, matplotlib) inside the function that runs it: `memplan estimate` stays torch-free.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from memplan.errors import MemplanError

# Sub-command modules, in the order `memplan --help` lists them.
COMMANDS = ["estimate", "models", "trace", "validate", "profile", "env", "fit", "gpus", "sweep", "calibrate", "serve",
            "report", "replay"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` the parser of that one sub-command (start-up time: each command module
    registers its flags on import, and `memplan estimate` need not import the other twelve)."""
    parser = _Parser(
        prog="memplan",
        description="GPU-memory planner and profiler for QLoRA / LoRA fine-tuning. Sizes are GiB (2^30 bytes).",
    )
    from memplan import __version__

    parser.add_argument("--version", action="version", version=f"memplan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in [only] if only in COMMANDS else COMMANDS:
        importlib.import_module(f"memplan.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except MemplanError as e:
        print(f"memplan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memplan {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

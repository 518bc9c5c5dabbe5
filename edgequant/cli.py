"""`edgequant` console script: one subcommand per module in edgequant.commands.

Every subcommand module exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
A UserError (bad input) becomes one line on stderr and exit code 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import UserError

COMMANDS = ["build", "inspect", "run", "eval", "bench", "verify", "parity"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgequant", description="Hugging Face checkpoint -> llama.cpp GGUF, GPTQ on K-quant grids.")
    p.add_argument("--version", action="version", version=f"edgequant {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"edgequant.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a command that starts copies of itself
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"edgequant {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 0
    except KeyboardInterrupt:
        print(f"edgequant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``peft-hcp`` command. Each subcommand lives in a module of :mod:`peft_hcp.commands`, which registers its
parser; building the parser imports neither torch nor PEFT, so ``--help`` answers at once.

One error policy for every subcommand: bad input (a peft-hcp error, any ``ValueError``, a file that cannot be
read or written) ends the command with exit code 2 and one line on stderr, ``peft-hcp: error: ...``, as
argparse reports a bad option; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Optional


COMMAND_MODULES = (
    "peft_hcp.commands.train",
    "peft_hcp.commands.sample",
    "peft_hcp.commands.pretrain",
    "peft_hcp.commands.hub",
)
PROG = "peft-hcp"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="HCP-Diffusion model plugins on PEFT.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the input is bad (rather than that peft-hcp has a bug)."""
    if isinstance(exc, (ValueError, OSError)):
        return True
    from peft_hcp.errors import PeftHcpError  # imported already when ``exc`` is one

    return isinstance(exc, PeftHcpError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if not is_input_error(exc):
            raise
        print(f"{PROG}: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

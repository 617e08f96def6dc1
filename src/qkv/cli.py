"""The `qkv` command line (also `python -m qkv`).

Each subcommand is one `_add_<name>(subparsers)` function that registers its parser and sets
`func`, the handler called with the parsed arguments; the handler returns an exit code.
Errors a user can fix (bad arguments, missing files) are printed as one line, without a
traceback, and exit with status 2 (set QKV_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import __version__


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="reproduce the seed article's numpy sample through qkv and explain the defaults",
        description="Reproduce the numpy sample of the seed article (5 tokens, 64 dimensions, "
        "np.random.seed(42), no scaling) through qkv.reference_attention(scale=1.0), check that "
        "the numbers match, and explain what qkv does differently by default.",
    )
    p.add_argument("--columns", type=int, default=64, metavar="N",
                   help="columns of the final output to print (default: all 64)")

    def run(args) -> int:
        from .demo import run as demo_run

        if not 1 <= args.columns <= 64:
            raise UserError(f"--columns must be between 1 and 64; got {args.columns}")
        print(demo_run(show_output_columns=args.columns))
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkv",
        description="Transformer attention, exactly: compute it, run models on it, and see it.",
    )
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, TypeError, FileNotFoundError) as exc:
        if os.environ.get("QKV_DEBUG"):
            raise
        print(f"qkv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qkv {args.command}: interrupted", file=sys.stderr)
        return 130

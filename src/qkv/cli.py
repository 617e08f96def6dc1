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


def _add_similarity(sub) -> None:
    p = sub.add_parser(
        "similarity",
        help="cosine similarity of the first sentence with each of the others (sentence embeddings)",
        description="Embed the sentences with a sentence-embedding model (default: the bundled "
        "all-MiniLM-L6-v2, mean pooling and normalisation as its folder prescribes) and print the "
        "cosine similarity of the first sentence with each of the others.",
    )
    p.add_argument("sentences", nargs="+", metavar="SENTENCE", help="the first sentence, then the others")
    p.add_argument("--model", default="minilm", metavar="NAME_OR_PATH",
                   help="a bundled model name or a BERT-family Hugging Face folder (default: minilm)")
    p.add_argument("--truncate", action="store_true", help="cut sentences longer than the model's limit")

    def run(args) -> int:
        from .models import BertModel, load

        if len(args.sentences) < 2:
            raise UserError("give at least two sentences: the first is compared with each of the others")
        model = load(args.model)
        if not isinstance(model, BertModel):
            raise UserError(f"{args.model!r} is a {type(model).__name__}; similarity needs a BERT-family encoder")
        sims = model.similarity(args.sentences[0], args.sentences[1:], truncate=args.truncate)
        print(f"similarity to: {args.sentences[0]}")
        for s, text in zip(sims.tolist(), args.sentences[1:]):
            print(f"{s:7.4f}  {text}")
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
    _add_similarity(sub)
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

"""The `qkv` command line (also `python -m qkv`).

Each subcommand is one function registered with `@_command(name, help=...)`: given its parser,
it adds the arguments and returns the handler, which is called with the parsed arguments and
returns an exit code (None for 0); the function's docstring is the subcommand's --help
description. A new subcommand is one such function.

Errors a user can fix are one line on stderr, without a traceback (set QKV_DEBUG=1 to see
it), and exit status 2. They are found as early as possible:

- by argparse, with the `type=` functions below: a number that is not finite or out of its
  range (`--temperature nan`, `--top-p 2`, `--port 70000`), an output file with an empty
  name or in a folder that does not exist;
- then by the handler, before any model runs: the text (`check_texts`, the one check of user
  text: empty, or bytes that are not UTF-8), combinations of flags, and, once the model is
  loaded, what depends on it (a layer or head it lacks, a focus word not in the text, a
  --compare sentence of another length, text longer than its positions).

Handlers compute everything and write the files they were asked for before they print, so
output to a pipe closed early (`qkv explain ... --json f | head -1`) cannot stop a file from
being written; the command then stops quietly with status 141 (128 + SIGPIPE), as Unix tools
do. Exit statuses: 0 success, 1 `qkv bench` found a wrong result, 2 a user error, 130
interrupted (Ctrl+C), 141 stdout closed early.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Optional, Sequence

from . import __version__

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE (13): what a shell reports for a tool stopped by a closed pipe


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


class _ArgumentError(Exception):
    """A command line argparse refused; `main` prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised to `main` (one line, status 2) instead of printing the
    usage and exiting; subcommand parsers are of this class too."""

    def error(self, message: str):
        # argparse says "argument --top-p: must be ..."; say "--top-p must be ...", as the handlers do
        m = re.fullmatch(r"argument ([^\s:]+): (.*)", message, re.S)
        if m:
            message = f"{m[1]} {m[2]}" if m[2].startswith("must ") else f"{m[1]}: {m[2]}"
        raise _ArgumentError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# --------------------------------------------------------------------------- argument types


def _bounds(lo, hi, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"above {lo} and at most {hi}" if lo_open else f"between {lo} and {hi}"
    if lo is not None:
        return f"above {lo}" if lo_open else f"{lo} or more"
    return f"at most {hi}"


def _whole(lo: Optional[int] = None, hi: Optional[int] = None):
    """An argparse type: a whole number from lo to hi (either may be None)."""

    def whole(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            what = "a positive whole number" if (lo == 1 and hi is None) else _bounds(lo, hi)
            raise argparse.ArgumentTypeError(f"must be {what}; got {n}")
        return n

    return whole


def _number(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False):
    """An argparse type: a finite number from lo to hi (above lo when lo_open); nan and inf are refused."""

    def number(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        low = lo is not None and (x < lo or (lo_open and x == lo))
        if not math.isfinite(x) or low or (hi is not None and x > hi):
            raise argparse.ArgumentTypeError(f"must be a finite number, {_bounds(lo, hi, lo_open)}; got {text!r}")
        return x

    return number


_SEED = _whole(0, 2**63 - 1)


def _output_file(text: str) -> str:
    """An argparse type: the path of a file to write, checked as the writer (qkv._files) will
    check it, before any work: a name, not a folder, FIFO or device, in a writable folder."""
    from ._files import FileWriteError, check_target

    if not text.strip():
        raise argparse.ArgumentTypeError("the file name is empty; give a path, e.g. out.json")
    try:
        final = check_target(text, what="the file")
    except FileWriteError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not os.access(final.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: its folder '{final.parent}' is not writable")
    return text


def _output_folder(text: str) -> str:
    """An argparse type: a folder to write into (it may not exist yet); never an empty name."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the folder name is empty; give a path, e.g. --out my-model")
    return text


def _text(value, what: str) -> str:
    """A text from the command line, through the one check of user text (qkv.models.tokenizer)."""
    from .models.tokenizer import check_texts

    try:
        return check_texts(value, what=what)[0]
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def _distinct_files(args, flags: Sequence[str]) -> None:
    seen: dict = {}
    for flag in flags:
        path = getattr(args, flag)
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise UserError(f"--{seen[key]} and --{flag} name the same file {path!r}; give each its own")
        seen[key] = flag


def _check_length(tok, text: str, what: str, model_name: str, limit: Optional[int], truncate: bool) -> None:
    """Text longer than the model's positions, said with the CLI's flag (the library says truncate=True)."""
    if limit is None or truncate:
        return
    n = len(tok.encode(text))
    if n > limit:
        raise UserError(f"{what} has {n} tokens but {model_name!r} takes at most {limit}; shorten it, "
                        f"or add --truncate to keep the first {limit}")

def _sentences(values: Sequence[str], single: str = "sentence 1") -> list[str]:
    """The SENTENCE arguments through `_text`, each named "sentence N" in errors (`single` when alone)."""
    return [_text(s, single if len(values) == 1 else f"sentence {i + 1}") for i, s in enumerate(values)]


def _load(name: str, fits=None, needs: str = ""):
    """`qkv.load(name)`, refused ("'NAME' is a CLASS; NEEDS") where `fits(model)` is false."""
    from .models import load

    model = load(name)
    if fits is not None and not fits(model):
        raise UserError(f"{name!r} is a {type(model).__name__}; {needs}")
    return model


def _load_for_explain(name: str):
    """`qkv.load(name)`, or for an architecture qkv has no native implementation of, the
    transformers model (`qkv.models.loading.load_for_explain`), after one line on stderr; without
    transformers installed, a user error saying how to install it."""
    from .models.loading import load_for_explain

    try:
        return load_for_explain(name, note=lambda line: print(line, file=sys.stderr, flush=True))
    except ImportError as exc:
        raise UserError(str(exc)) from None


def _write_files(args, writers: dict) -> list[str]:
    """Write each file asked for (flag -> writer(path)), in order; returns the lines "wrote PATH"."""
    lines = []
    for flag, write in writers.items():
        path = getattr(args, flag)
        if path:
            try:
                write(path)
            except ImportError as exc:  # --png without matplotlib
                raise UserError(str(exc)) from None
            lines.append(f"wrote {path}")
    return lines


# --------------------------------------------------------------------------- subcommands

_COMMANDS: list = []  # (name, help, add) in the order of `qkv --help`, filled by @_command


def _command(name: str, help: str):
    """Register the decorated function as the subcommand `name`: given its parser, it adds the
    arguments and returns the handler (the parsed arguments -> exit status, None for 0). Its
    docstring is the subcommand's --help description."""

    def register(add):
        _COMMANDS.append((name, help, add))
        return add

    return register


def _model_option(p, default: str, help: str) -> None:
    p.add_argument("--model", default=default, metavar="NAME_OR_PATH", help=help)


def _file_option(p, flag: str, help: str) -> None:
    p.add_argument(f"--{flag}", type=_output_file, metavar="FILE", help=help)


@_command("demo", help="reproduce the seed article's numpy sample through qkv and explain the defaults")
def _demo(p):
    """Reproduce the numpy sample of the seed article (5 tokens, 64 dimensions, np.random.seed(42),
    no scaling) through qkv.reference_attention(scale=1.0), check that the numbers match, and
    explain what qkv does differently by default."""
    p.add_argument("--columns", type=_whole(1, 64), default=64, metavar="N",
                   help="columns of the final output to print, 1 to 64 (default: all 64)")

    def run(args):
        from .demo import run as demo_run

        print(demo_run(show_output_columns=args.columns))

    return run


@_command("similarity", help="cosine similarity of the first sentence with each of the others (sentence embeddings)")
def _similarity(p):
    """Embed the sentences with a sentence-embedding model (default: the bundled all-MiniLM-L6-v2,
    mean pooling and normalisation as its folder prescribes) and print the cosine similarity of
    the first sentence with each of the others."""
    p.add_argument("sentences", nargs="+", metavar="SENTENCE", help="the first sentence, then the others")
    _model_option(p, "minilm", "a bundled model name or a BERT-family Hugging Face folder (default: minilm)")
    p.add_argument("--truncate", action="store_true", help="cut sentences longer than the model's limit")

    def run(args):
        from .models import EncoderModel

        sentences = _sentences(args.sentences)
        if len(sentences) < 2:
            raise UserError("give at least two sentences: the first is compared with each of the others")
        model = _load(args.model, lambda m: isinstance(m, EncoderModel), "similarity needs a BERT-family encoder")
        limit = model.pooling.max_length(model)
        for i, s in enumerate(sentences):
            _check_length(model.tokenizer, s, f"sentence {i + 1}", args.model, limit, args.truncate)
        sims = model.similarity(sentences[0], sentences[1:], truncate=args.truncate)
        lines = [f"similarity to: {sentences[0]}"]
        lines += [f"{s:7.4f}  {text}" for s, text in zip(sims.tolist(), sentences[1:])]
        print("\n".join(lines))

    return run


@_command("explain", help="which words a word attends to inside a model, per layer and head")
def _explain(p):
    """Run a model on TEXT and show its attention: for the --focus word, the weights it gives each
    word per layer (mean over heads, or one --head) with a heat strip, and the heads that attend
    most sharply; without --focus, the map of one layer. With --image FILE instead of TEXT, a
    vision transformer (default: the bundled digits) reads the image and its attention is drawn
    over the patch grid: the prediction, then the class token's attention (or the --focus patch's,
    e.g. r1c2) in every layer plus the attention rollout of the last layer, or every head of one
    --layer. --png, --html and --json write the same result as a picture, one offline HTML page,
    or data. Every option is checked before the model runs, and the files are written before
    anything is printed."""
    p.add_argument("text", nargs="?", help="the sentence to explain, e.g. \"The cat sat on the mat.\" "
                   "(or --image FILE)")
    p.add_argument("--image", metavar="FILE", help="explain an image (PNG, JPEG, BMP, GIF) with a vision transformer "
                   "instead of a text; its units are the class token 'cls' and the patches r<row>c<column>")
    p.add_argument("--focus", metavar="WORD", help="the word whose attention to show (first match, case-insensitive); "
                   "with --image, 'cls' (the class token, the default) or a patch such as r1c2")
    _model_option(p, None, "a bundled model name, a Hugging Face model folder, or a Hub id org/name from "
                  "the Hugging Face cache (default: minilm, and digits with --image); architectures qkv has no "
                  "native implementation of run through transformers (pip install 'qkv[hf]'); with --image, "
                  "a vision transformer: digits or a ViT folder")
    p.add_argument("--interpolate", action="store_true",
                   help="with --image: run an image of another size than the model's on resampled position "
                   "embeddings instead of refusing it")
    p.add_argument("--steps", metavar="LAYER,HEAD", type=_layer_head,
                   help="also print the three steps (scores q.k*scale, softmax weights, weighted sum of the "
                   "values) of one head for the --focus word's first token (with --image: the class token "
                   "unless --focus names a patch)")
    p.add_argument("--layer", type=_whole(0), metavar="L", help="show only this layer (0-based)")
    p.add_argument("--head", type=_whole(0), metavar="H", help="show this head instead of the mean over heads")
    p.add_argument("--method", choices=["raw", "rollout", "value-norm"], default="raw",
                   help="raw weights; attention rollout (Abnar & Zuidema 2020); value-weighted norms "
                   "(Kobayashi et al. 2020). Default: raw")
    p.add_argument("--aggregate", choices=["mean", "max"], default="mean",
                   help="how the table combines the heads of a layer (default: mean)")
    p.add_argument("--level", choices=["word", "token"], default="word",
                   help="merge sub-word tokens into words (default) or show tokens (an image's patches are both)")
    p.add_argument("--hide-special", action="store_true",
                   help="hide [CLS], [SEP], BOS and renormalise the rows to 1 (with --image: the class token, "
                   "so give a patch with --focus)")
    p.add_argument("--rows", choices=["auto", "all", "focus"], default="auto",
                   help="auto (default): record every query row, and write full maps while they are small "
                   "(layers x heads x words^2 <= 4,194,304), else the compact view of a long input (summaries, "
                   "a minimap, the focus row's top keys); all: full maps at any length; focus: record only "
                   "the focus word's rows (not with --method rollout)")
    p.add_argument("--top-k", type=_whole(1), default=None, metavar="K",
                   help="keys kept per row in the compact view of a long input, in the table and the files "
                   "(default: 8; with --image every patch, so a row draws whole)")
    p.add_argument("--compare", metavar="TEXT", help="a second sentence of the same length: per-head "
                   "Jensen-Shannon divergence of the focus rows and the largest change (not with --image)")
    _file_option(p, "png", "write a PNG (needs matplotlib: pip install 'qkv[viz]')")
    _file_option(p, "html", "write one self-contained, offline HTML page")
    _file_option(p, "json", "write the result as JSON (format qkv.explain/1)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="shade table cells (default: when printing to a terminal and NO_COLOR is unset)")
    p.add_argument("--truncate", action="store_true", help="cut text longer than the model accepts (not with --image)")

    def run(args):
        if (args.image is None) == (args.text is None):
            raise UserError("give TEXT or --image FILE, not both" if args.text is not None else
                            "give the TEXT to explain, or --image FILE to explain an image")
        if args.model is None:
            args.model = "digits" if args.image is not None else "minilm"
        if args.image is not None:
            return _explain_image(args)
        if args.interpolate:
            raise UserError("--interpolate is for images: drop it, or explain an image with --image FILE")
        return _explain_text(args)

    return run


def _explain_text(args) -> None:
    """`qkv explain TEXT`."""
    from .inspect import explain
    from .inspect.png import save_png
    from .inspect.terminal import render_alignment, render_compare, render_focus, render_overview

    # 1. everything that needs no model
    text = _text(args.text, "the text")
    top_k = 8 if args.top_k is None else args.top_k
    other = None if args.compare is None else _text(args.compare, "the --compare text")
    _check_explain_flags(args)
    # 2. the model, loaded but not run, and what depends on it (through transformers when qkv
    # has no native implementation of its architecture, saying so in one line on stderr)
    model = _load_for_explain(args.model)
    _check_explain_model(args, model, text, other)
    # 3. run, draw, write the files, and only then print
    result = explain(text, model, focus=args.focus, rows=args.rows, truncate=args.truncate, name=args.model)
    color = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    view = dict(method=args.method, level=args.level, hide_special=args.hide_special)
    table = dict(layer=args.layer, head=args.head, color=color, aggregate=args.aggregate)
    if args.focus:
        out = [render_focus(result, args.focus, **table, **view, top_k=top_k)]
    elif result.cross_layers:  # encoder-decoder: the alignment of target words over source words
        out = [render_alignment(result, level=args.level, layer=args.layer, head=args.head, color=color)]
    else:
        out = [render_overview(result, **table, **view, top_k=top_k)]
    if other is not None:
        # every row of the second text is recorded (linear in length) unless --rows all asks for full maps:
        # with --rows focus its focus unit may sit at another token, and the comparison needs only that row
        second = explain(other, model, rows="all" if args.rows == "all" else "auto", truncate=args.truncate,
                         name=args.model)
        a, b = len(result.labels(args.level)), len(second.labels(args.level))
        if a != b:  # an encoder-decoder's translations: their lengths are known only now
            raise UserError(f"--compare: the translations differ in length ({a} and {b} {args.level}s with "
                            "the source); the comparison needs the same number, e.g. one word swapped")
        cmp = result.compare(second, args.focus, args.level)
        out.append(render_compare(result, second, cmp, args.focus, args.level))
    options = dict(view, focus=args.focus, top_k=top_k)
    out += _write_files(args, {"json": lambda f: result.save_json(f, **options),
                               "html": lambda f: result.save_html(f, **options),
                               "png": lambda f: save_png(result, f, layer=args.layer, head=args.head, **options)})
    if args.steps is not None:
        out.append(_steps_text(result, args.focus, args.steps))
    print("\n".join(out))


def _layer_head(text: str) -> tuple[int, int]:
    """An argparse type: "LAYER,HEAD", two whole numbers >= 0 (e.g. 3,1)."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"must be LAYER,HEAD, two whole numbers such as 3,1; got {text!r}")
    return int(parts[0]), int(parts[1])


def _steps_text(result, focus, steps: tuple[int, int]) -> str:
    """The three steps of one head (`ExplainResult.steps`) for the focus unit, after a blank line."""
    layer, head = steps
    try:
        return "\n" + str(result.steps(focus, layer, head))
    except ValueError as exc:
        raise UserError(f"--steps: {exc}") from None


# flags of explain that a text needs and an image cannot use: (flag, is it set, why)
_TEXT_ONLY = (("--compare", lambda a: a.compare is not None, "compares two sentences"),
              ("--truncate", lambda a: a.truncate, "cuts text; an image is taken whole, at the model's size"))


def _explain_image(args) -> None:
    """`qkv explain --image FILE`: a vision transformer's attention over the patch grid (the class
    token's by default), printed as block-character grids, written as PNG, HTML and JSON."""
    from .inspect import explain
    from .inspect.explain import model_shape
    from .inspect.image import is_image_model
    from .inspect.png import save_png
    from .inspect.terminal import render_image
    from .models.images import ImageError, open_image

    # 1. everything that needs no model: the flags, then the file (readable, an image Pillow opens)
    for flag, given, why in _TEXT_ONLY:
        if given(args):
            raise UserError(f"{flag} {why}; drop it with --image")
    focus = args.focus
    if args.hide_special and (focus is None or focus.strip().lower() in ("cls", "[cls]", "class", "class token")):
        raise UserError("--hide-special hides the class token, whose attention is shown by default; give a patch "
                        "with --focus (e.g. --focus r1c2), or drop --hide-special")
    _check_view_flags(args, "unit")
    try:
        picture = open_image(args.image)
    except ImportError as exc:  # no Pillow
        raise UserError(str(exc)) from None
    except ImageError as exc:
        raise UserError(str(exc)) from None
    # 2. the model, loaded but not run: a vision transformer, with the layers and heads asked for
    model = _load_for_explain(args.model)
    if not is_image_model(model):
        raise UserError(f"{args.model!r} reads text; --image needs a vision transformer (--model digits or a "
                        "ViT folder)")
    if model.config.num_channels == 3 and picture.mode in ("1", "L", "LA"):  # accepted, but said in one line
        print(f"qkv explain: note: {args.image!r} is a grayscale image; {args.model!r} reads colour (RGB) images, "
              "so its grey is repeated over the three channels (as transformers does)", file=sys.stderr)
    n_layers, n_heads = model_shape(model)
    for flag, value, count, what in (("--layer", args.layer, n_layers, "layers"),
                                     ("--head", args.head, n_heads, "heads"),
                                     ("--steps", None if args.steps is None else args.steps[0], n_layers, "layers"),
                                     ("--steps", None if args.steps is None else args.steps[1], n_heads, "heads")):
        if value is not None and value >= count:
            shown = ",".join(map(str, args.steps)) if flag == "--steps" else value
            raise UserError(f"{flag} {shown}: {what[:-1]} {value} does not exist: the model has {what} "
                            f"0..{count - 1}")
    # 3. run (the image's size and channels, and the focus patch, are checked before the model runs)
    try:
        result = explain(image=args.image, model=model, focus=focus, rows=args.rows, name=args.model,
                         interpolate_pos_encoding=args.interpolate)
    except ImageError as exc:
        raise UserError(str(exc).replace("pass interpolate_pos_encoding=True", "add --interpolate")) from None
    color = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    out = [render_image(result, focus, method=args.method, hide_special=args.hide_special, layer=args.layer,
                        head=args.head, color=color, aggregate=args.aggregate)]
    options = dict(method=args.method, level=args.level, hide_special=args.hide_special, focus=focus,
                   top_k=args.top_k)
    out += _write_files(args, {"json": lambda f: result.save_json(f, **options),
                               "html": lambda f: result.save_html(f, **options),
                               "png": lambda f: save_png(result, f, layer=args.layer, head=args.head, **options)})
    if args.steps is not None:
        out.append(_steps_text(result, "cls" if focus is None else focus, args.steps))
    print("\n".join(out))


def _check_explain_flags(args) -> None:
    """The combinations of explain's flags that cannot work, found before a model is loaded."""
    if args.rows == "focus" and not args.focus:
        raise UserError("--rows focus needs --focus WORD")
    if args.compare is not None and not args.focus:
        raise UserError("--compare needs --focus WORD (the word whose rows are compared)")
    if args.steps is not None and not args.focus:
        raise UserError("--steps needs --focus WORD (the word whose query is stepped through)")
    _check_view_flags(args, "word")


def _check_view_flags(args, unit: str) -> None:
    """The flags of explain's views that cannot work together, for a text or an image (`unit`: what
    the focus is, "word" or "unit"), and the files asked for (distinct, PNG's matplotlib there)."""
    if args.head is not None and args.method == "rollout":
        raise UserError("--method rollout averages the heads, so --head cannot pick one; drop --head, "
                        "or use --method raw or value-norm")
    if args.rows == "focus" and args.method == "rollout":
        raise UserError("--method rollout needs every row of every layer, and --rows focus records only the "
                        f"focus {unit}'s; use --rows auto (the default) or --rows all")
    _distinct_files(args, ("json", "html", "png"))
    if args.png:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--png needs matplotlib: pip install 'qkv[viz]'")


def _check_explain_model(args, model, text: str, other: Optional[str]) -> None:
    """What depends on the loaded model, checked before it runs: its kind, layers and heads,
    the length of the text(s), the focus word, and --compare's length."""
    from .inspect import foreign
    from .inspect.explain import attention_layers, model_shape, prepare

    name = args.model
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        from .inspect.image import is_image_model

        if is_image_model(model):
            raise UserError(f"{name!r} reads images: pass --image FILE (e.g. qkv explain --image digit.png "
                            f"--model {name})")
        raise UserError(f"{name!r} has no tokenizer files; explain needs them to turn text into tokens")
    through_transformers = foreign.is_transformers_model(model)
    if through_transformers:
        foreign.check_model(model, name)  # encoder-decoders, attention transformers cannot switch
        layers = []
    else:
        layers = attention_layers(model)
        if not layers:
            raise UserError(f"{name!r} has no qkv attention layers to inspect")
    seq2seq = not through_transformers and bool(getattr(model, "is_encoder_decoder", False))
    if seq2seq:
        if args.rows == "focus":
            raise UserError(f"--rows focus is for encoder or decoder models, and {name!r} is an "
                            "encoder-decoder; drop --rows focus")
        if args.method != "raw":
            raise UserError(f"--method {args.method} is defined for one stack of layers; for an "
                            "encoder-decoder model use --method raw (the default)")
    n_layers, n_heads = model_shape(model)
    if args.layer is not None and args.layer >= n_layers:
        raise UserError(f"--layer {args.layer} does not exist: the model has layers 0..{n_layers - 1}")
    if args.head is not None and args.head >= n_heads:
        raise UserError(f"--head {args.head} does not exist: the model has heads 0..{n_heads - 1}")
    if args.steps is not None:
        if seq2seq:
            raise UserError(f"--steps is for encoder or decoder models, and {name!r} is an encoder-decoder; "
                            "drop --steps")
        layer, head = args.steps
        if layer >= n_layers or head >= n_heads:
            raise UserError(f"--steps {layer},{head}: the model has layers 0..{n_layers - 1} and heads "
                            f"0..{n_heads - 1}")
    if seq2seq and not args.focus and args.layer is not None:
        cross = [i for i, (n, _) in enumerate(layers) if model.attention_role(n) == "cross"]
        if args.layer not in cross:
            raise UserError(f"--layer {args.layer} is not a cross-attention layer; those are "
                            f"{', '.join(map(str, cross))} (without --focus, an encoder-decoder model shows "
                            "its cross-attention)")
    limit = foreign.max_tokens(model, tok) if through_transformers else getattr(tok, "max_length", None)
    probes = []
    for t, what in ((text, "the text"), (other, "the --compare text")):
        if t is not None:
            _check_length(tok, t, what, name, limit, args.truncate)
            probes.append(prepare(t, model, name, truncate=args.truncate)[0])
    if args.focus and not seq2seq:  # an encoder-decoder's focus may be a word of its translation
        try:
            probes[0].focus_index(args.focus, "word")
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if other is not None:
        a, b = (len(p.labels(args.level)) for p in probes)
        if a != b:
            shown = [len(p.labels(args.level, hide_special=True)) for p in probes]
            if shown[0] == shown[1]:
                shown = [a, b]
            unit = f"{'source ' if seq2seq else ''}{args.level}s"
            raise UserError(f"--compare needs a sentence as long as the text: the text has {shown[0]} {unit} and "
                            f"the --compare text {shown[1]}; swap a word instead, e.g. 'cat' for 'dog'")

@_command("serve", help="the attention explorer: a local web page and JSON API (needs pip install 'qkv[web]')")
def _serve(p):
    """Serve the attention explorer on this machine: type a sentence, see the head view, model
    view and focus view, click a word, step through one head, compare two sentences. Binds
    127.0.0.1 unless --host says otherwise; the page loads nothing from other servers."""
    p.add_argument("--port", type=_whole(0, 65535), default=8000,
                   help="TCP port (default: 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--model-dir", metavar="DIR",
                   help="also offer each Hugging Face model folder under DIR, by its folder name (folders "
                   "qkv cannot load are skipped, with the reason on stderr; architectures qkv has no native "
                   "implementation of run through transformers, pip install 'qkv[hf]')")
    p.add_argument("--max-queue", type=_whole(0), default=8, metavar="N",
                   help="requests that may wait for the model; one more gets 503 (default: 8)")
    p.add_argument("--max-chars", type=_whole(1), default=40_000, metavar="N",
                   help="the longest sentence accepted, in characters (default: 40000, about 7,000 words; the "
                   "cost limits below are the real ones)")
    p.add_argument("--max-cost", type=_whole(1), default=2**30, metavar="N",
                   help="attention weights one request may make the model form, tokens^2 x layers x heads "
                   "(default: 1073741824); more gets 413 too_costly")
    p.add_argument("--max-answer-mb", type=_whole(1), default=64, metavar="MB",
                   help="the largest JSON answer, estimated before the work (default: 64)")
    p.add_argument("--max-memory-mb", type=_whole(1), default=2048, metavar="MB",
                   help="memory the running requests may hold together, by their estimates; a request that "
                   "does not fit waits (default: 2048)")
    p.add_argument("--max-session-mb", type=_whole(1), default=1024, metavar="MB",
                   help="recorded results kept for /api/weights, the oldest dropped first (default: 1024)")
    p.add_argument("--max-pick", type=_whole(1), default=64, metavar="N",
                   help="layers, heads and rows one /api/weights request may name, each (default: 64)")
    p.add_argument("--max-image-mb", type=_whole(1), default=8, metavar="MB",
                   help="the largest uploaded image file, checked before it is decoded (default: 8)")
    p.add_argument("--max-image-pixels", type=_whole(1), default=4096 * 4096, metavar="N",
                   help="the most pixels (width x height) of an uploaded image, read from its header before it "
                   "is decoded (default: 16777216)")

    def run(args):
        try:
            from .web.server import serve
        except ImportError as exc:
            raise UserError(f"qkv serve needs fastapi and uvicorn ({exc.name or exc} is missing): "
                            "pip install 'qkv[web]'") from None
        if args.model_dir is not None and not os.path.isdir(args.model_dir):
            raise UserError(f"--model-dir {args.model_dir!r} is not a folder")
        serve(host=args.host, port=args.port, model_dir=args.model_dir, max_queue=args.max_queue,
              max_chars=args.max_chars, max_cost=args.max_cost, max_answer_mb=args.max_answer_mb,
              max_memory_mb=args.max_memory_mb, max_session_mb=args.max_session_mb, max_pick=args.max_pick,
              max_image_mb=args.max_image_mb, max_image_pixels=args.max_image_pixels)

    return run


def _check_vocabulary(model, name: str, text: str) -> None:
    """Refuse words a word-level model has never seen (they would become [UNK])."""
    tok = model.tokenizer
    unk = getattr(tok.backend.model, "unk_token", None)
    unk_id = tok.token_to_id(unk) if unk else None
    if unk_id is None:
        return
    enc = tok.backend.encode(text, add_special_tokens=False)
    bad = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk_id]
    if bad:
        known = sorted(t for t in tok.backend.get_vocab() if not t.startswith("["))
        shown = " ".join(known) if len(known) <= 80 else f"{len(known)} words"
        raise UserError(f"{', '.join(map(repr, dict.fromkeys(bad)))} not in the vocabulary of {name!r}; "
                        f"it knows: {shown}")

@_command("train", help="train one of qkv's small models (recall, translate, digits) and save it as a "
          "Hugging Face folder")
def _train(p):
    """Train a small model through qkv's own attention and save config.json, model.safetensors and
    tokenizer.json (digits: preprocessor_config.json) to --out. Deterministic for a seed; a progress
    bar on stderr; checkpoints every few hundred steps, and a run stopped early resumes from its
    last checkpoint when the same command is run again."""
    p.add_argument("task", choices=["recall", "translate", "digits"],
                   help="recall: a three-layer GPT-2 looks keys up in its prompt; translate: an "
                   "encoder-decoder reorders words through cross-attention; digits: a small vision "
                   "transformer reads scikit-learn's 8x8 handwritten digits")
    p.add_argument("--out", type=_output_folder, metavar="DIR",
                   help="output folder (default: ./qkv-TASK): new, empty, or one "
                   "that qkv train wrote; a folder holding other files is refused (status 2)")
    p.add_argument("--size", choices=["shipped", "tiny"], default="shipped",
                   help="shipped: the bundled model's size and run (default); tiny: a small model trained "
                   "in seconds, the test suite's check of the same code")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the weights and the data (default 0)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default: the size's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args):
        import time
        from pathlib import Path

        import torch

        from .train import check_folder, digits, interrupted_note, recall, translate

        module = {"recall": recall, "translate": translate, "digits": digits}[args.task]
        steps = module.SIZES[args.size].steps if args.steps is None else args.steps
        if steps <= 0:
            raise UserError(f"--steps must be a positive number of optimizer steps; got {steps}")
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0; got {args.seed}")
        out = args.out or f"qkv-{args.task}"
        if os.path.exists(out) and not os.path.isdir(out):
            raise UserError(f"--out {out!r} is a file; give a folder")
        check_folder(Path(out), args.task)  # someone else's files, or another task's run: refused up front
        # One thread: these models are so small that a second thread mostly waits at barriers,
        # and on a busy machine its spinning makes a step many times slower (measured).
        torch.set_num_threads(1)
        start = time.perf_counter()
        try:
            model = module.train(out, size=args.size, seed=args.seed, steps=steps, progress=not args.quiet)
        except KeyboardInterrupt:
            # Read from the folder: true whether the interrupt came before the first checkpoint or after one.
            print(f"qkv train: interrupted; {interrupted_note(Path(out))}", file=sys.stderr)
            return EXIT_INTERRUPTED
        seconds = time.perf_counter() - start
        acc = module.evaluate(model)
        print(f"trained {args.task} in {seconds:.0f} s ({steps} steps, seed {args.seed}); "
              f"held-out {module.METRIC} {100 * acc:.2f}%; saved to {out}")

    return run


@_command("generate", help="extend a prompt with a decoder (GPT-2 or Llama family), greedy or sampled, with a KV cache")
def _generate(p):
    """Extend PROMPT with a decoder model: greedy by default, or sampled with
    --temperature/--top-k/--top-p. The prompt runs once, then one cached step per new token."""
    p.add_argument("prompt", help='the prompt, e.g. "c3 a7 k2 ? a" for the recall model')
    _model_option(p, "recall", "a bundled decoder or a Hugging Face folder (default: recall)")
    p.add_argument("--max-new-tokens", type=_whole(1), metavar="N",
                   help="tokens to add (default: the folder's generation_config.json, else 20; "
                   "fewer when the model's positions end sooner)")
    p.add_argument("--temperature", type=_number(0), default=0.0, metavar="T",
                   help="0 = greedy (default); above 0 samples")
    p.add_argument("--top-k", type=_whole(1), metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=_number(0, 1, lo_open=True), metavar="P",
                   help="sample among the most likely tokens whose probabilities reach P (0 < P <= 1)")
    p.add_argument("--seed", type=_SEED, metavar="N", help="seed for sampling (0 or more)")

    def run(args):
        prompt = _text(args.prompt, "the prompt")
        model = _load(args.model, lambda m: hasattr(m, "complete") and getattr(m, "tokenizer", None) is not None,
                      "generate needs a decoder with a tokenizer")
        _check_vocabulary(model, args.model, prompt)
        limit = model.max_positions  # a decoder (qkv.models.CausalLM)
        n = len(model.tokenizer.encode(prompt))
        if n >= limit:
            raise UserError(f"the prompt has {n} tokens but {args.model!r} has {limit} positions, "
                            f"so prompts of at most {limit - 1} tokens; shorten it")
        new = args.max_new_tokens
        if new is None:  # the folder's generation_config.json (Hugging Face's file), else 20
            new = min(20, limit - n)
            gen_file = os.path.join(str(getattr(model, "folder", "")), "generation_config.json")
            if os.path.isfile(gen_file):
                import json

                with open(gen_file, encoding="utf-8") as f:
                    new = min(int(json.load(f).get("max_new_tokens", new)), limit - n)
        elif n + new > limit:
            raise UserError(f"--max-new-tokens {new} is too many: the prompt has {n} tokens and {args.model!r} "
                            f"has {limit} positions, so at most {limit - n} new tokens")
        print(model.complete(prompt, max_new_tokens=new, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed).strip())

    return run


@_command("translate", help="translate English-like sentences into Qish with the bundled encoder-decoder")
def _translate(p):
    """Translate each SENTENCE with an encoder-decoder model (default: the bundled 'translate',
    trained by `qkv train translate`): greedy decoding, a KV cache for the decoder's
    self-attention. Its words: see docs/trained-models.md."""
    p.add_argument("sentences", nargs="+", metavar="SENTENCE", help='e.g. "the big red cat sees a small dog"')
    _model_option(p, "translate", "a bundled name or a QkvSeq2Seq folder (default: translate)")

    def run(args):
        sentences = _sentences(args.sentences, single="a sentence")
        model = _load(args.model, lambda m: getattr(m, "is_encoder_decoder", False),
                      "translate needs an encoder-decoder model")
        for text in sentences:
            _check_vocabulary(model, args.model, text)
            n = len(model.tokenizer.encode(text))
            if n > model.config.max_position_embeddings:
                raise UserError(f"{text!r} has {n} words but {args.model!r} was trained on at most "
                                f"{model.config.max_position_embeddings}; shorten it")
        outs = model.translate(sentences)
        print("\n".join(out if len(sentences) == 1 else f"{text}  ->  {out}" for text, out in zip(sentences, outs)))

    return run


@_command("classify", help="the most probable classes of images with a vision transformer (ViT)")
def _classify(p):
    """Classify each IMAGE (a PNG, JPEG, ... file) with a vision transformer (default: the bundled
    'digits', trained by `qkv train digits`; or a Hugging Face ViTForImageClassification folder,
    whose preprocessor_config.json resizes and normalises) and print its --top classes with their
    probabilities. What images are accepted and refused: docs/models.md, "Vision transformers"."""
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, BMP, GIF)")
    _model_option(p, "digits", "a bundled name or a ViTForImageClassification folder (default: digits)")
    p.add_argument("--top", type=_whole(1), default=3, metavar="K", help="classes shown per image (default: 3)")

    def run(args):
        from .models.images import open_image
        from .models.vit import ViTForImageClassification

        try:
            images = [open_image(path) for path in args.images]  # unreadable files fail before the model loads
        except ImportError as exc:
            raise UserError(str(exc)) from None
        model = _load(args.model, lambda m: isinstance(m, ViTForImageClassification),
                      "classify needs an image classifier (ViTForImageClassification)")
        k = min(args.top, model.config.num_labels)
        lines = []
        for path, image in zip(args.images, images):
            try:
                (top,) = model.top([image], k=k)
            except ValueError as exc:  # the image, named by its path
                raise UserError(f"{path}: {exc}") from None
            if len(args.images) > 1:
                lines.append(f"{path}:")
            lines += [f"{'  ' if len(args.images) > 1 else ''}{prob:7.4f}  {label}" for label, prob in top]
        print("\n".join(lines))

    return run


@_command("bench", help="time qkv's attention against torch SDPA (and FlexAttention): table, JSON, PNG")
def _bench(p):
    """Run the benchmark suite: dense, causal, sliding-window, grouped-query and decode attention
    through qkv.attention, against torch's scaled_dot_product_attention (and compiled
    FlexAttention with --flex) on the same inputs in the same run. Every qkv result is checked
    against the float64 reference before it is timed. Prints a Markdown table of times and
    ratios (peer time / qkv time) to stdout; --json writes every measurement, --png draws time
    against length on log-log axes with L and L^2 guides. Peers are skipped ("-") where they
    would exceed --max-memory-gib or --max-seconds. Exit status 1 if a qkv result is wrong."""
    from .bench import CASES, DTYPES

    positive = _whole(1)
    p.add_argument("--cases", nargs="+", default=list(CASES), metavar="CASE",
                   help=f"which cases, of: {' '.join(CASES)} (default: all)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], metavar="DTYPE",
                   help=f"of: {' '.join(DTYPES)} (default: float32 bfloat16)")
    p.add_argument("--lengths", nargs="+", type=positive, default=[1024, 4096, 16384], metavar="L",
                   help="sequence lengths (default: 1024 4096 16384)")
    p.add_argument("--decode-lengths", nargs="+", type=positive, metavar="L",
                   help="cache lengths of the decode case (default: --lengths)")
    p.add_argument("--batch", type=positive, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--heads", type=positive, default=8, metavar="H", help="query heads (default 8)")
    p.add_argument("--kv-heads", type=positive, metavar="H",
                   help="key/value heads of the gqa and decode cases (default: heads / 4)")
    p.add_argument("--dim", type=positive, default=64, metavar="D", help="head size (default 64)")
    p.add_argument("--window", type=_whole(0), default=256, metavar="W",
                   help="keys before each query in the window case (default 256)")
    p.add_argument("--repeats", type=positive, default=3, metavar="N", help="timed samples per method; "
                   "the table shows the best (default 3)")
    p.add_argument("--threads", type=positive, metavar="N", help="torch threads (default: torch's own choice)")
    p.add_argument("--backend", default="auto", metavar="NAME",
                   help="the qkv backend to time (default: auto, the one a user gets)")
    p.add_argument("--flex", action="store_true",
                   help="also time torch.compile(flex_attention); skipped with a note where torch.compile "
                   "cannot run. Compilation is reported apart from the steady-state time")
    p.add_argument("--max-seconds", type=_number(0, lo_open=True), default=60.0, metavar="S",
                   help="skip a peer whose call, predicted from the previous length, would take longer (default 60)")
    p.add_argument("--max-memory-gib", type=_number(0, lo_open=True), default=4.0, metavar="G",
                   help="skip a peer that would need more memory for an L x L grid (default 4)")
    p.add_argument("--check-rows", type=positive, default=128, metavar="N",
                   help="query rows of each result compared with the float64 reference (default 128)")
    p.add_argument("--seed", type=_SEED, default=0, metavar="N", help="seed of the random inputs (default 0)")
    _file_option(p, "json", "write every measurement, the machine and the command as JSON")
    _file_option(p, "png", "draw time against length, log-log (needs matplotlib: pip install 'qkv[viz]')")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is drawn on stderr only when stderr is a terminal)")

    def run(args):
        from . import bench

        cfg = bench.BenchConfig(
            cases=tuple(args.cases), dtypes=tuple(args.dtypes), lengths=tuple(args.lengths),
            decode_lengths=None if args.decode_lengths is None else tuple(args.decode_lengths),
            batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim, window=args.window,
            repeats=args.repeats, backend=args.backend, flex=args.flex, max_seconds=args.max_seconds,
            max_memory_gib=args.max_memory_gib, check_rows=args.check_rows, seed=args.seed, threads=args.threads,
        ).validate()
        _distinct_files(args, ("json", "png"))
        if args.png:
            try:
                bench.require_matplotlib()
            except ImportError as exc:
                raise UserError(str(exc)) from None
        result = bench.run(cfg, progress=not args.no_progress and sys.stderr.isatty())
        # the files first, then the table: see the module docstring
        files = _write_files(args, {"json": lambda f: bench.write_json(result, f),
                                    "png": lambda f: bench.write_png(result, f)})
        print("\n".join([bench.format_table(result)] + ([""] + files if files else [])))
        if not result.ok:
            print("qkv bench: a qkv result is outside the tolerance rule against the float64 reference "
                  "(see the table's check column)", file=sys.stderr)
            return 1

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qkv",
        description="Transformer attention, exactly: compute it, run models on it, and see it.",
    )
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help, add in _COMMANDS:
        p = sub.add_parser(name, help=help, description=" ".join((add.__doc__ or "").split()))
        p.set_defaults(func=add(p))
    return parser


def _stdout_closed() -> int:
    """stdout's reader has gone (`qkv explain ... | head -1`): stop quietly, as Unix tools do when
    SIGPIPE ends them. What is still buffered for stdout (and Python's flush at exit) goes to
    /dev/null, so no "Exception ignored ... BrokenPipeError" follows."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. a test's capture)
        pass
    return EXIT_PIPE_CLOSED


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USER_ERROR
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here when the output was buffered
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except (UserError, ValueError, TypeError, OSError) as exc:
        if os.environ.get("QKV_DEBUG"):
            raise
        print(f"qkv {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"qkv {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

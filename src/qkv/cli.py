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


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="which words a word attends to inside a model, per layer and head",
        description="Run a model on TEXT and show its attention: for the --focus word, the weights "
        "it gives each word per layer (mean over heads, or one --head) with a heat strip, and the heads "
        "that attend most sharply; without --focus, the map of one layer. --png, --html and --json "
        "write the same result as a picture, one offline HTML page, or data.",
    )
    p.add_argument("text", help="the sentence to explain, e.g. \"The cat sat on the mat.\"")
    p.add_argument("--focus", metavar="WORD", help="the word whose attention to show (first match, case-insensitive)")
    p.add_argument("--model", default="minilm", metavar="NAME_OR_PATH",
                   help="a bundled model name or a Hugging Face model folder (default: minilm)")
    p.add_argument("--layer", type=int, metavar="L", help="show only this layer (0-based)")
    p.add_argument("--head", type=int, metavar="H", help="show this head instead of the mean over heads")
    p.add_argument("--method", choices=["raw", "rollout", "value-norm"], default="raw",
                   help="raw weights; attention rollout (Abnar & Zuidema 2020); value-weighted norms "
                   "(Kobayashi et al. 2020). Default: raw")
    p.add_argument("--aggregate", choices=["mean", "max"], default="mean",
                   help="how the table combines the heads of a layer (default: mean)")
    p.add_argument("--level", choices=["word", "token"], default="word",
                   help="merge sub-word tokens into words (default) or show tokens")
    p.add_argument("--hide-special", action="store_true",
                   help="hide [CLS], [SEP], BOS and renormalise the rows to 1")
    p.add_argument("--rows", choices=["all", "focus"], default="all",
                   help="record every query row (default) or only the focus word's: for long inputs")
    p.add_argument("--compare", metavar="TEXT", help="a second sentence of the same length: per-head "
                   "Jensen-Shannon divergence of the focus rows and the largest change")
    p.add_argument("--png", metavar="FILE", help="write a PNG (needs matplotlib: pip install 'qkv[viz]')")
    p.add_argument("--html", metavar="FILE", help="write one self-contained, offline HTML page")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON (format qkv.explain/1)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="shade table cells (default: when printing to a terminal and NO_COLOR is unset)")
    p.add_argument("--truncate", action="store_true", help="cut text longer than the model accepts")

    def run(args) -> int:
        from .inspect import explain
        from .inspect.terminal import render_compare, render_focus, render_overview

        if not args.text.strip():
            raise UserError('the text is empty; give a sentence, e.g. qkv explain "The cat sat on the mat." --focus cat')
        if args.rows == "focus" and not args.focus:
            raise UserError("--rows focus needs --focus WORD")
        if args.compare is not None and not args.focus:
            raise UserError("--compare needs --focus WORD (the word whose rows are compared)")
        for flag in ("png", "html", "json"):
            path = getattr(args, flag)
            if path is not None:
                folder = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                    raise UserError(f"cannot write --{flag} {path!r}: the folder {folder!r} does not exist or is not writable")
        result = explain(args.text, args.model, focus=args.focus, rows=args.rows, truncate=args.truncate)
        if args.layer is not None and not 0 <= args.layer < result.num_layers:
            raise UserError(f"--layer {args.layer} does not exist: the model has layers 0..{result.num_layers - 1}")
        if args.head is not None and not 0 <= args.head < result.num_heads:
            raise UserError(f"--head {args.head} does not exist: the model has heads 0..{result.num_heads - 1}")
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
        view = dict(method=args.method, level=args.level, hide_special=args.hide_special)
        table = dict(layer=args.layer, head=args.head, color=color, aggregate=args.aggregate)
        if args.focus:
            print(render_focus(result, args.focus, **table, **view))
        elif result.cross_layers:  # encoder-decoder: the alignment of target words over source words
            from .inspect.terminal import render_alignment

            if args.method != "raw":
                raise UserError(f"--method {args.method} is defined for one stack of layers; for an "
                                "encoder-decoder model use method 'raw'")

            print(render_alignment(result, level=args.level, layer=args.layer, head=args.head, color=color))
        else:
            print(render_overview(result, **table, **view))
        if args.compare is not None:
            other = explain(args.compare, args.model, truncate=args.truncate)
            print(render_compare(result, other, result.compare(other, args.focus, args.level), args.focus, args.level))
        options = dict(view, focus=args.focus)
        if args.json:
            result.save_json(args.json, **options)
            print(f"wrote {args.json}")
        if args.html:
            result.save_html(args.html, **options)
            print(f"wrote {args.html}")
        if args.png:
            try:
                result.save_png(args.png, layer=args.layer, head=args.head, **options)
            except ImportError as exc:
                raise UserError(str(exc)) from None
            print(f"wrote {args.png}")
        return 0

    p.set_defaults(func=run)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the attention explorer: a local web page and JSON API (needs pip install 'qkv[web]')",
        description="Serve the attention explorer on this machine: type a sentence, see the head view, "
        "model view and focus view, click a word, step through one head, compare two sentences. "
        "Binds 127.0.0.1 unless --host says otherwise; the page loads nothing from other servers.",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--model-dir", metavar="DIR",
                   help="also offer each Hugging Face model folder under DIR, by its folder name")
    p.add_argument("--max-queue", type=int, default=8, metavar="N",
                   help="requests that may wait for the model; one more gets 503 (default: 8)")
    p.add_argument("--max-chars", type=int, default=1000, metavar="N",
                   help="the longest sentence accepted, in characters (default: 1000)")

    def run(args) -> int:
        try:
            from .web.server import serve
        except ImportError as exc:
            raise UserError(f"qkv serve needs starlette and uvicorn ({exc.name or exc} is missing): "
                            "pip install 'qkv[web]'") from None
        if not 0 <= args.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535; got {args.port}")
        if args.max_queue < 0:
            raise UserError(f"--max-queue must be 0 or more; got {args.max_queue}")
        if args.max_chars < 1:
            raise UserError(f"--max-chars must be at least 1; got {args.max_chars}")
        if args.model_dir is not None and not os.path.isdir(args.model_dir):
            raise UserError(f"--model-dir {args.model_dir!r} is not a folder")
        serve(host=args.host, port=args.port, model_dir=args.model_dir, max_queue=args.max_queue,
              max_chars=args.max_chars)
        return 0

    p.set_defaults(func=run)


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
        raise UserError(f"{', '.join(map(repr, dict.fromkeys(bad)))} not in the vocabulary of {name!r}; it knows: {shown}")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train one of qkv's small models (recall, translate) and save it as a Hugging Face folder",
        description="Train a small model through qkv's own attention and save config.json, "
        "model.safetensors and tokenizer.json to --out. Deterministic for a seed; a progress bar "
        "on stderr; checkpoints every few hundred steps, and a run stopped early resumes from its "
        "last checkpoint when the same command is run again.",
    )
    p.add_argument("task", choices=["recall", "translate"],
                   help="recall: a two-layer GPT-2 looks keys up in its prompt; translate: an "
                   "encoder-decoder reorders words through cross-attention")
    p.add_argument("--out", metavar="DIR", help="output folder (default: ./qkv-TASK): new, empty, or one "
                   "that qkv train wrote; a folder holding other files is refused (status 2)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the weights and the data (default 0)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default: the task's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args) -> int:
        import time

        import torch

        from .train import recall, translate

        module = {"recall": recall, "translate": translate}[args.task]
        steps = module.RUN.steps if args.steps is None else args.steps
        if steps <= 0:
            raise UserError(f"--steps must be a positive number of optimizer steps; got {steps}")
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0; got {args.seed}")
        out = args.out or f"qkv-{args.task}"
        if os.path.exists(out) and not os.path.isdir(out):
            raise UserError(f"--out {out!r} is a file; give a folder")
        from pathlib import Path

        from .train._loop import check_folder, interrupted_note

        check_folder(Path(out))  # a folder of someone else's files: refused (a TrainingError, status 2) up front
        # One thread: these models are so small that a second thread mostly waits at barriers,
        # and on a busy machine its spinning makes a step many times slower (measured).
        torch.set_num_threads(1)
        start = time.perf_counter()
        try:
            model = module.train(out, seed=args.seed, steps=steps, progress=not args.quiet)
        except KeyboardInterrupt:
            # Read from the folder: true whether the interrupt came before the first checkpoint or after one.
            print(f"qkv train: interrupted; {interrupted_note(Path(out))}", file=sys.stderr)
            return 130
        seconds = time.perf_counter() - start
        acc = module.evaluate(model)
        print(f"trained {args.task} in {seconds:.0f} s ({steps} steps, seed {args.seed}); "
              f"held-out {module.METRIC} {100 * acc:.2f}%; saved to {out}")
        return 0

    p.set_defaults(func=run)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="extend a prompt with a decoder (GPT-2 or Llama family), greedy or sampled, with a KV cache",
        description="Extend PROMPT with a decoder model: greedy by default, or sampled with "
        "--temperature/--top-k/--top-p. The prompt runs once, then one cached step per new token.",
    )
    p.add_argument("prompt", help='the prompt, e.g. "c3 a7 k2 ? a" for the recall model')
    p.add_argument("--model", default="recall", metavar="NAME_OR_PATH",
                   help="a bundled decoder or a Hugging Face folder (default: recall)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to add (default: the folder's generation_config.json, else 20; "
                   "fewer when the model's positions end sooner)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, metavar="K")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--seed", type=int, metavar="N", help="seed for sampling")

    def run(args) -> int:
        from .models import load

        if not args.prompt.strip():
            raise UserError('the prompt is empty; e.g. qkv generate "c3 a7 k2 ? a"')
        model = load(args.model)
        if not hasattr(model, "complete") or getattr(model, "tokenizer", None) is None:
            raise UserError(f"{args.model!r} is a {type(model).__name__}; generate needs a decoder with a tokenizer")
        _check_vocabulary(model, args.model, args.prompt)
        limit = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
        n = len(model.tokenizer.encode(args.prompt))
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
        print(model.complete(args.prompt, max_new_tokens=new, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed).strip())
        return 0

    p.set_defaults(func=run)


def _add_translate(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="translate English-like sentences into Qish with the bundled encoder-decoder",
        description="Translate each SENTENCE with an encoder-decoder model (default: the bundled "
        "'translate', trained by `qkv train translate`): greedy decoding, a KV cache for the "
        "decoder's self-attention. Its words: see docs/trained-models.md.",
    )
    p.add_argument("sentences", nargs="+", metavar="SENTENCE", help='e.g. "the big red cat sees a small dog"')
    p.add_argument("--model", default="translate", metavar="NAME_OR_PATH",
                   help="a bundled name or a QkvSeq2Seq folder (default: translate)")

    def run(args) -> int:
        from .models import load

        model = load(args.model)
        if not getattr(model, "is_encoder_decoder", False):
            raise UserError(f"{args.model!r} is a {type(model).__name__}; translate needs an encoder-decoder model")
        for text in args.sentences:
            if not text.strip():
                raise UserError('a sentence is empty; e.g. qkv translate "the red cat sees a dog"')
            _check_vocabulary(model, args.model, text)
            n = len(model.tokenizer.encode(text))
            if n > model.config.max_position_embeddings:
                raise UserError(f"{text!r} has {n} words but {args.model!r} was trained on at most "
                                f"{model.config.max_position_embeddings}; shorten it")
        for text, out in zip(args.sentences, model.translate(list(args.sentences))):
            print(out if len(args.sentences) == 1 else f"{text}  ->  {out}")
        return 0

    p.set_defaults(func=run)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time qkv's attention against torch SDPA (and FlexAttention): table, JSON, PNG",
        description="Run the benchmark suite: dense, causal, sliding-window, grouped-query and decode "
        "attention through qkv.attention, against torch's scaled_dot_product_attention (and compiled "
        "FlexAttention with --flex) on the same inputs in the same run. Every qkv result is checked "
        "against the float64 reference before it is timed. Prints a Markdown table of times and "
        "ratios (peer time / qkv time) to stdout; --json writes every measurement, --png draws time "
        "against length on log-log axes with L and L^2 guides. Peers are skipped (\"-\") where they "
        "would exceed --max-memory-gib or --max-seconds. Exit status 1 if a qkv result is wrong.",
    )
    from .bench import CASES, DTYPES

    p.add_argument("--cases", nargs="+", default=list(CASES), metavar="CASE",
                   help=f"which cases, of: {' '.join(CASES)} (default: all)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], metavar="DTYPE",
                   help=f"of: {' '.join(DTYPES)} (default: float32 bfloat16)")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384], metavar="L",
                   help="sequence lengths (default: 1024 4096 16384)")
    p.add_argument("--decode-lengths", nargs="+", type=int, metavar="L",
                   help="cache lengths of the decode case (default: --lengths)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--heads", type=int, default=8, metavar="H", help="query heads (default 8)")
    p.add_argument("--kv-heads", type=int, metavar="H",
                   help="key/value heads of the gqa and decode cases (default: heads / 4)")
    p.add_argument("--dim", type=int, default=64, metavar="D", help="head size (default 64)")
    p.add_argument("--window", type=int, default=256, metavar="W",
                   help="keys before each query in the window case (default 256)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="timed samples per method; "
                   "the table shows the best (default 3)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's own choice)")
    p.add_argument("--backend", default="auto", metavar="NAME",
                   help="the qkv backend to time (default: auto, the one a user gets)")
    p.add_argument("--flex", action="store_true",
                   help="also time torch.compile(flex_attention); skipped with a note where torch.compile "
                   "cannot run. Compilation is reported apart from the steady-state time")
    p.add_argument("--max-seconds", type=float, default=60.0, metavar="S",
                   help="skip a peer whose call, predicted from the previous length, would take longer (default 60)")
    p.add_argument("--max-memory-gib", type=float, default=4.0, metavar="G",
                   help="skip a peer that would need more memory for an L x L grid (default 4)")
    p.add_argument("--check-rows", type=int, default=128, metavar="N",
                   help="query rows of each result compared with the float64 reference (default 128)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random inputs (default 0)")
    p.add_argument("--json", metavar="FILE", help="write every measurement, the machine and the command as JSON")
    p.add_argument("--png", metavar="FILE",
                   help="draw time against length, log-log (needs matplotlib: pip install 'qkv[viz]')")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is drawn on stderr only when stderr is a terminal)")

    def run(args) -> int:
        from . import bench

        cfg = bench.BenchConfig(
            cases=tuple(args.cases), dtypes=tuple(args.dtypes), lengths=tuple(args.lengths),
            decode_lengths=None if args.decode_lengths is None else tuple(args.decode_lengths),
            batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim, window=args.window,
            repeats=args.repeats, backend=args.backend, flex=args.flex, max_seconds=args.max_seconds,
            max_memory_gib=args.max_memory_gib, check_rows=args.check_rows, seed=args.seed, threads=args.threads,
        ).validate()
        for flag in ("json", "png"):
            path = getattr(args, flag)
            if path is not None:
                folder = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                    raise UserError(f"cannot write --{flag} {path!r}: the folder {folder!r} does not exist or is not writable")
        if args.png:
            try:
                bench.require_matplotlib()
            except ImportError as exc:
                raise UserError(str(exc)) from None
        progress = not args.no_progress and sys.stderr.isatty()
        result = bench.run(cfg, progress=progress)
        print(bench.format_table(result))
        if args.json or args.png:
            print()
        if args.json:
            bench.write_json(result, args.json)
            print(f"wrote {args.json}")
        if args.png:
            bench.write_png(result, args.png)
            print(f"wrote {args.png}")
        if not result.ok:
            print("qkv bench: a qkv result is outside the tolerance rule against the float64 reference "
                  "(see the table's check column)", file=sys.stderr)
            return 1
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
    _add_explain(sub)
    _add_serve(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_translate(sub)
    _add_bench(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, TypeError, OSError) as exc:
        if os.environ.get("QKV_DEBUG"):
            raise
        print(f"qkv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qkv {args.command}: interrupted", file=sys.stderr)
        return 130

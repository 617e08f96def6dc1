"""Explain at long lengths: size, time and peak memory of `qkv explain` at 512, 2048 and 8192 tokens.

Three ways a user gets an explanation, each measured at each --lengths:

- `cli-html`: `qkv explain TEXT --model FOLDER --focus WORD --html F` (size: the file F)
- `cli-json`: the same with `--json F`
- `web`: POST /api/explain {"text", "model", "focus"} to `create_app(model_dir=...)` through
  starlette's TestClient, in process (size: the answer's body). The model is loaded before the
  clock starts, as a running server has it. max_chars and max_body are raised for the long texts;
  the server's other limits (the cost budget of issue 19) keep their defaults unless --open-limits.

The model is a tiny random long-context decoder built offline at the start into a temporary
folder: a transformers LlamaForCausalLM with max_position_embeddings=8192 (4 layers, 4 heads,
hidden 64, seeded), saved as safetensors, with a word-level tokenizer over the benchmark's own
words that puts <s> first (as Llama's does). The text is N-1 distinct made-up words, so an input of
N tokens is N-1 words plus <s>. The focus word is the middle one (--no-focus: none).

Every measurement runs in its own Python process, with PYTHONPATH=SRC/src for each --src (the
checkout measured; default: the one this script is in). The process imports torch and qkv, then
the clock runs over one call: `qkv.cli.main([...])` (model load, explain, the file written, the
table printed to /dev/null) or the POST. Peak memory is that process's ru_maxrss (os.wait4),
so it includes the imports (the "baseline" printed in the header: a process that only imports).
A process that runs past --timeout seconds, or whose resident set passes --memory-guard MiB
(polled every 50 ms), is killed, and its cell says so ("> 180 s", "> 6144 MiB") rather than a
figure.

    python benchmarks/explain_long.py                                 # this checkout, 512 2048 8192
    python benchmarks/explain_long.py --before /work/wt-before        # old checkout, then this one, ratios
    python benchmarks/explain_long.py --src OLD --src NEW --json out.json
    python benchmarks/explain_long.py --lengths 512 --kinds web       # quick
    python benchmarks/explain_long.py --before OLD --reuse old.json   # OLD's rows from an earlier --json run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2 ** 20
HERE = Path(__file__).resolve().parent
KINDS = ("cli-html", "cli-json", "web")
MODEL = "longllama"  # the folder's name under the temporary model_dir

# ---------------------------------------------------------------------------- the model and text


def words(n: int, seed: int = 0) -> list[str]:
    """n distinct made-up lowercase words of 2 or 3 syllables (n <= 20,000), in a seeded order."""
    onsets = "b d f g k l m n p r s t v z ch sh th br tr pl".split()
    vowels = "a e i o u".split()
    syll = [c + v for c in onsets for v in vowels]  # 100 syllables
    two = [a + b for a in syll for b in syll]  # 10,000 words
    three = [a + b + "n" for a in syll[:20] for b in syll]  # 2,000 more, with a final n
    pool = two + three
    if n > len(pool):
        raise ValueError(f"at most {len(pool)} distinct words; got {n}")
    rng = random.Random(seed)
    rng.shuffle(pool)
    return pool[:n]


def build_model(folder: Path, vocab: list[str], positions: int, seed: int = 0) -> None:
    """A random LlamaForCausalLM (4 layers, 4 heads of 16, hidden 64, `positions` positions, seeded)
    saved into folder as safetensors, with a word-level tokenizer over `vocab` that adds <s> first."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    transformers.utils.logging.disable_progress_bar()

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    cfg = transformers.LlamaConfig(vocab_size=len(specials) + len(vocab), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=positions, bos_token_id=2, eos_token_id=3,
                                   pad_token_id=1, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so the heads differ from each other visibly
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    vocab_ids = {w: i for i, w in enumerate(specials + vocab)}
    tok = Tokenizer(models.WordLevel(vocab=vocab_ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
         "add_bos_token": True, "model_max_length": positions}))


def text_of(tokens: int, vocab: list[str]) -> tuple[str, str]:
    """(a text of tokens-1 words, so tokens with <s>; its middle word, the focus)."""
    ws = vocab[:tokens - 1]
    return " ".join(ws), ws[len(ws) // 2]


# ---------------------------------------------------------------------------- the child processes


def child(kind: str, spec_file: str) -> int:
    """One measurement in this process; prints one JSON line."""
    spec = json.loads(Path(spec_file).read_text())
    import torch

    import qkv
    import qkv.cli

    info = {"qkv_file": qkv.__file__, "threads": torch.get_num_threads()}
    if kind == "baseline":
        pass
    elif kind in ("cli-html", "cli-json"):
        flag = "--html" if kind == "cli-html" else "--json"
        argv = ["explain", spec["text"], "--model", spec["model"], flag, spec["out"]]
        if spec["focus"]:
            argv += ["--focus", spec["focus"]]
        with open(os.devnull, "w") as sink:
            old, sys.stdout = sys.stdout, sink
            try:
                t0 = time.perf_counter()
                rc = qkv.cli.main(argv)
                seconds = time.perf_counter() - t0
            finally:
                sys.stdout = old
        info.update(rc=rc, seconds=seconds, bytes=os.path.getsize(spec["out"]) if os.path.exists(spec["out"]) else None)
    else:  # web
        import inspect

        from starlette.testclient import TestClient

        from qkv.web.app import create_app

        limits = dict(max_chars=10 ** 7, max_body=10 ** 8)
        if spec["open_limits"]:  # every other max_* limit of this version's create_app raised too
            for name, p in inspect.signature(create_app).parameters.items():
                if name.startswith("max_") and name not in limits and name != "max_queue" \
                        and isinstance(p.default, int) and not isinstance(p.default, bool):
                    limits[name] = 2 ** 62
        app = create_app(model_dir=spec["model_dir"], **limits)
        app.state.service.registry.get(MODEL)  # loaded before the clock, as in a running server
        body = {"text": spec["text"], "model": MODEL}
        if spec["focus"]:
            body["focus"] = spec["focus"]
        with TestClient(app) as client:
            t0 = time.perf_counter()
            r = client.post("/api/explain", json=body)
            seconds = time.perf_counter() - t0
        info.update(rc=0 if r.status_code == 200 else r.status_code, seconds=seconds, bytes=len(r.content),
                    status=r.status_code, limits=sorted(limits), error=None if r.status_code == 200 else r.text[:300])
    print(json.dumps(info), flush=True)
    return 0


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(kind: str, spec: dict, src: Path, workdir: Path, timeout: float, guard_mib: int) -> dict:
    """Run one measurement in a fresh process with PYTHONPATH=src/src; returns its row: the child's
    figures plus wall seconds, peak_mib (ru_maxrss) and `killed` ("timeout" / "memory") or `failed`."""
    spec_file = workdir / f"spec-{kind}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(src / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out_file, err_file = workdir / "child.out", workdir / "child.err"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(spec_file)],
                                stdout=out, stderr=err, env=env, cwd=workdir)
    t0 = time.monotonic()
    killed, status, usage = None, None, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - t0 > timeout:
            killed = "timeout"
        elif _rss_kib(proc.pid) > guard_mib * 1024:
            killed = "memory"
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    row = {"kind": kind, "wall_s": time.monotonic() - t0, "peak_mib": usage.ru_maxrss / 1024, "timeout_s": timeout,
           "guard_mib": guard_mib}
    lines = out_file.read_text().strip().splitlines()
    if killed:
        row["killed"] = killed
    elif proc.returncode != 0 or not lines:
        row["failed"] = f"exit {proc.returncode}: " + " | ".join(err_file.read_text().strip().splitlines()[-3:])
    else:
        row.update(json.loads(lines[-1]))
        if not row["qkv_file"].startswith(str(src / "src")):
            raise SystemExit(f"the child imported qkv from {row['qkv_file']}, not from {src / 'src'}")
        if row.get("rc"):
            row["failed"] = f"exit {row['rc']}: " + (row.get("error") or err_file.read_text().strip()[-300:])
    return row


# ---------------------------------------------------------------------------- tables


def size_text(b) -> str:
    if b is None:
        return "-"
    if b >= 10 * MiB:
        return f"{b / MiB:.0f} MiB"
    if b >= MiB:
        return f"{b / MiB:.1f} MiB"
    return f"{b / 1024:.0f} KiB"


def cells(row: dict, timeout: float, guard: int) -> tuple[str, str, str]:
    """(size, time, peak memory) as the table prints them (the row's own timeout and guard when it has them)."""
    timeout, guard = row.get("timeout_s", timeout), row.get("guard_mib", guard)
    if row.get("killed") == "timeout":
        return "-", f"> {timeout:.0f} s", f"{row['peak_mib']:.0f} MiB so far"
    if row.get("killed") == "memory":
        return "-", f"killed at {row['wall_s']:.0f} s", f"> {guard} MiB"
    if row.get("status") not in (None, 200):  # the server refused it (e.g. 413 over a cost limit)
        code = (row.get("error") or "").split('"code":"', 1)[-1].split('"', 1)[0] if row.get("error") else ""
        return f"refused {row['status']} {code}".strip(), f"{row['seconds']:.2f} s", f"{row['peak_mib']:.0f} MiB"
    if row.get("failed"):
        return "failed", "-", f"{row['peak_mib']:.0f} MiB"
    return size_text(row["bytes"]), f"{row['seconds']:.2f} s", f"{row['peak_mib']:.0f} MiB"


def table(rows: list[dict], timeout: float, guard: int) -> str:
    out = ["| view | tokens | size | time | peak memory |", "|---|---|---|---|---|"]
    for r in rows:
        size, t, mem = cells(r, timeout, guard)
        out.append(f"| {r['kind']} | {r['tokens']} | {size} | {t} | {mem} |")
    notes = [f"- {r['kind']} at {r['tokens']}: {r['failed']}" for r in rows if r.get("failed")]
    return "\n".join(out + notes)


def ratio(old: dict, new: dict, key: str, bound: float | None) -> str:
    """old / new as 'N.Nx'; '> N.Nx' when old was cut short at `bound` (a lower bound for old)."""

    def x(r: float) -> str:
        return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 1 else f"{r:.2f}x"

    if new.get("killed") or new.get("failed") or old.get("failed"):
        return "-"
    b = new[key]
    if old.get("killed"):
        return f"> {x(bound / b)}" if bound and b else "-"
    a = old[key]
    return x(a / b) if b else "-"


def ratio_table(old_rows: list[dict], new_rows: list[dict], timeout: float, guard: int) -> str:
    out = ["| view | tokens | size before / after | time before / after | peak before / after |",
           "|---|---|---|---|---|"]
    for a, b in zip(old_rows, new_rows):
        size = "-" if a.get("killed") else ratio(a, b, "bytes", None)
        t = ratio(a, b, "seconds", a.get("timeout_s", timeout) if a.get("killed") == "timeout" else None)
        mem = ratio(a, b, "peak_mib", a.get("guard_mib", guard) if a.get("killed") == "memory" else None)
        if a.get("killed") == "timeout":
            mem = "-"  # a timed-out run's peak is only what it had reached
        out.append(f"| {a['kind']} | {a['tokens']} | {size} | {t} | {mem} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's), as `qkv bench` reports it."""
    from qkv.bench.report import machine_info

    return machine_info()["cpu"]


def git_head(src: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, timeout=10).stdout.strip()[:90]
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", action="append", type=Path, default=None, metavar="CHECKOUT",
                   help="a qkv checkout to measure (its src/ goes on PYTHONPATH); repeat for before and after "
                   "(default: the checkout this script is in)")
    p.add_argument("--before", type=Path, metavar="CHECKOUT",
                   help="shorthand for --src CHECKOUT --src <this script's checkout>")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="tokens, <s> included")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--no-focus", action="store_true", help="explain without a focus word")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per measurement (default 180)")
    p.add_argument("--memory-guard", type=int, default=6144, metavar="MIB",
                   help="kill a measurement whose resident set passes this (default 6144 MiB)")
    p.add_argument("--open-limits", action="store_true",
                   help="web: raise every max_* limit of create_app (default: only max_chars and max_body, which "
                   "an 8k-token text passes; the cost limits keep the server's defaults)")
    p.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    p.add_argument("--reuse", metavar="FILE",
                   help="take the rows of a source measured before from this --json file instead of measuring "
                   "it again (same lengths and views; e.g. the old checkout's, which takes minutes)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)
    srcs = list(args.src or [])
    if args.before:
        srcs = [args.before, *(srcs or [HERE.parent])]
    srcs = [s.resolve() for s in (srcs or [HERE.parent])]
    for s in srcs:
        if not (s / "src" / "qkv" / "__init__.py").is_file():
            raise SystemExit(f"{s} is not a qkv checkout (no src/qkv/__init__.py)")
    if max(args.lengths) > 8192 or min(args.lengths) < 8:
        raise SystemExit("--lengths: each between 8 and 8192 (the model's positions)")

    import torch

    load = os.getloadavg()[0]
    print(f"explain at long lengths: CPU {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"python {platform.python_version()}, load average {load:.2f} at the start")
    print(f"model: random LlamaForCausalLM, 4 layers x 4 heads (head dim 16), hidden 64, 8192 positions; "
          f"focus: {'none' if args.no_focus else 'the middle word'}; timeout {args.timeout:.0f} s, "
          f"memory guard {args.memory_guard} MiB per measurement")
    results, reused = {}, {}
    if args.reuse:
        reused = json.loads(Path(args.reuse).read_text())["results"]
    with tempfile.TemporaryDirectory(prefix="qkv-explain-long-") as tmp:
        tmp = Path(tmp)
        vocab = words(max(args.lengths))
        model_dir = tmp / "models"
        folder = model_dir / MODEL
        folder.mkdir(parents=True)
        build_model(folder, vocab, positions=8192)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        for n in args.lengths:  # the tokens are the words and <s>, as the tables say
            assert len(tok.encode(text_of(n, vocab)[0]).ids) == n, n
        for src in srcs:
            if str(src) in reused:
                rows = sorted((r for r in reused[str(src)] if r["tokens"] in args.lengths and r["kind"] in args.kinds),
                              key=lambda r: (args.lengths.index(r["tokens"]), args.kinds.index(r["kind"])))
                if len(rows) != len(args.lengths) * len(args.kinds):
                    raise SystemExit(f"--reuse {args.reuse}: {src} lacks some of these lengths and views")
                results[str(src)] = rows
                print(f"\nsource: {src}: rows from {args.reuse}, not measured again")
                print(table(rows, args.timeout, args.memory_guard))
                continue
            base = run_child("baseline", {}, src, tmp, args.timeout, args.memory_guard)
            if base.get("failed") or base.get("killed"):
                raise SystemExit(f"{src}: a process that only imports qkv failed: {base}")
            print(f"\nsource: {src} ({git_head(src)}); {base['threads']} torch threads; "
                  f"a process that only imports torch and qkv peaks at {base['peak_mib']:.0f} MiB")
            rows = []
            for n in args.lengths:
                text, focus = text_of(n, vocab)
                for kind in args.kinds:
                    out = tmp / ("out.html" if kind == "cli-html" else "out.json")
                    out.unlink(missing_ok=True)
                    spec = {"text": text, "focus": None if args.no_focus else focus, "model": str(folder),
                            "model_dir": str(model_dir), "out": str(out), "open_limits": args.open_limits}
                    row = run_child(kind, spec, src, tmp, args.timeout, args.memory_guard)
                    row["tokens"] = n
                    rows.append(row)
                    size, t, mem = cells(row, args.timeout, args.memory_guard)
                    print(f"  {kind:9} {n:6} tokens: {size:>8}  {t:>16}  {mem:>14}  (process {row['wall_s']:.1f} s)",
                          flush=True)
                    out.unlink(missing_ok=True)
            results[str(src)] = rows
            print()
            print(table(rows, args.timeout, args.memory_guard))
    if len(srcs) > 1:
        for old, new in zip(srcs, srcs[1:]):
            print(f"\nratios, {old.name} / {new.name} (above 1: {new.name} smaller or faster):\n")
            print(ratio_table(results[str(old)], results[str(new)], args.timeout, args.memory_guard))
    if args.json:
        part = Path(args.json + ".part")  # written whole, then renamed
        part.write_text(json.dumps({"cpu": cpu_name(), "torch": torch.__version__, "results": results}, indent=1))
        os.replace(part, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

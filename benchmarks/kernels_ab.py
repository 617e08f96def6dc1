"""A/B of qkv's native kernels: two builds timed in turns in one process.

What a change to qkv/core/csrc costs, measured without the noise between processes: the kernels of
a git revision (--before, e.g. main or a commit) and of another revision or this working tree
(--after, default the tree) are built with -march=native (qkv.bench.kernels.build_for; -D macros
per side with --define-before / --define-after), each in turn made the native backend's kernels
(FA-2 forward and backward) or, with --decode, the decode backend's kernel, checked against the
float64 reference by the tolerance rule (out, --check-rows query rows spread over the length), and timed in turns,
best of --repeats (qkv.bench.timing), so that load from elsewhere hits both alike. Both builds must
have the same interface version (a version change cannot be swapped in one process).

    python benchmarks/kernels_ab.py --before main
    python benchmarks/kernels_ab.py --before main --lengths 2048 --dim 128 --backward
    python benchmarks/kernels_ab.py --before main --decode --lengths 4096 32768
    python benchmarks/kernels_ab.py --before HEAD --define-after QKV_SC=16    # one setting against the tree
    python benchmarks/kernels_ab.py --before main --dtypes bfloat16 --lengths 16384 --window 256

Shapes: B=1, H=--heads (8), D=--dim (64), no band and causal (with --window W, a causal window: each
query sees itself and the W keys before it); with --decode one query, Hq=32, Hkv=8, D=128, against
caches of --lengths keys.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

import qkv
from qkv.bench.kernels import build_for
from qkv.bench.report import cpu_name
from qkv.bench.timing import best_times
from qkv.bench.verify import check_rows, verify
from qkv.core import _kernels
from qkv.core.engines import native_flash, native_flash_bwd

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CSRC = "src/qkv/core/csrc"
REPO = Path(__file__).resolve().parents[1]


def sources(rev: str, folder: Path) -> Path:
    """The kernels' sources of `rev` ("tree": this working tree's) in `folder`; exits naming a bad rev."""
    if rev == "tree":
        return REPO / CSRC
    listed = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}:{CSRC}"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        sys.exit(f"{rev!r} is not a revision of this repository with {CSRC}: {listed.stderr.strip()}")
    for name in listed.stdout.split():
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{CSRC}/{name}"], capture_output=True,
                              check=True).stdout
        (folder / name).write_bytes(text)
    return folder


def build(rev: str, defines, names, folder: Path) -> dict:
    """{kernel name: loaded library} of `rev`, built with -march=native and `defines`."""
    src = sources(rev, folder)
    try:
        return {n: build_for(n, "native", src_dir=src, defines=defines) for n in names}
    except RuntimeError as e:
        sys.exit(f"{rev}: {e}")


def use(libs: dict) -> None:
    """Make `libs` the kernels _kernels.load hands out (the bindings type each library once)."""
    _kernels.load = lambda name: libs.get(name)


def check(fn, q, k, v, causal: bool, n_rows: int, window=None) -> bool:
    """fn's output within the tolerance rule on n_rows sampled query rows (qkv.bench.verify); causal with
    `window` (an int): each row sees itself and the `window` keys before it."""
    rows = check_rows(q.shape[2], n_rows)
    Lq, Lk = q.shape[2], k.shape[2]
    j, diag = torch.arange(Lk)[None], rows[:, None] + (Lk - Lq)  # (1, Lk), (R, 1): bottom-right
    allowed = (j <= diag) & (j >= diag - (window if window is not None else Lk)) if causal else None  # (R, Lk)
    with torch.inference_mode():
        return bool(verify(q, k, v, {"fast": fn()}, rows, allowed)["fast_within_rule"])


def step(q, k, v, g, causal: bool, backend: str, backward: bool, window=None) -> None:
    if not backward:
        with torch.inference_mode():
            qkv.attention(q, k, v, causal=causal, window=window, backend=backend)
        return
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.autograd.grad(qkv.attention(*xs, causal=causal, window=window, backend=backend), xs, g)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="a git revision (main, a commit, HEAD~1) or 'tree'")
    p.add_argument("--after", default="tree", help="a git revision or 'tree' (this working tree; default)")
    p.add_argument("--define-before", action="append", default=[], metavar="MACRO[=VALUE]")
    p.add_argument("--define-after", action="append", default=[], metavar="MACRO[=VALUE]")
    p.add_argument("--decode", action="store_true", help="the decode kernel, one query against a cache")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--backward", action="store_true", help="forward + backward (not with --decode)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check-rows", type=int, default=64)
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="the causal rows as a causal window of W keys before each query (not with --decode)")
    args = p.parse_args(argv)
    if args.decode and args.backward:
        p.error("--decode times one decode step: no backward")
    if args.decode and args.window is not None:
        p.error("--decode times one query against a whole cache: no window")
    if args.window is not None and args.window < 0:
        p.error(f"--window must be 0 or more, not {args.window}")

    names = ["decode_kernel"] if args.decode else ["flash_fwd_kernel", "flash_bwd_kernel"]
    load = _kernels.load
    with tempfile.TemporaryDirectory(prefix="qkv-ab-") as tmp:
        sides = {}
        for side, rev, defines in (("before", args.before, args.define_before),
                                   ("after", args.after, args.define_after)):
            (Path(tmp) / side).mkdir()
            sides[side] = build(rev, defines, names, Path(tmp) / side)
        try:  # each build typed once, here, so a version mismatch stops before any timing
            for libs in sides.values():
                use(libs)
                if args.decode:
                    from qkv.core.engines import decode_native
                    decode_native.lib()
                else:
                    native_flash.lib(), native_flash_bwd.lib()
        except RuntimeError as e:
            sys.exit(f"the two builds cannot be swapped in one process: {e}")
        finally:
            _kernels.load = load

        def label(side):
            rev = args.before if side == "before" else args.after
            defs = args.define_before if side == "before" else args.define_after
            return rev + "".join(f" -D{d}" for d in defs)

        print(f"# {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; before = "
              f"{label('before')}, after = {label('after')}; {'decode step' if args.decode else 'native FA-2'}"
              f"{', forward + backward' if args.backward else ''}; best of {args.repeats} in turns; every "
              f"output checked against float64 ({args.check_rows} sampled rows) under the tolerance rule first\n")
        print("| dtype | L | causal | before | after | after / before |")
        print("|---|---|---|---|---|---|")
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for L in args.lengths:
                for causal in ((False,) if args.decode else (False, True)):
                    g = torch.Generator().manual_seed(L)
                    if args.decode:
                        q = torch.randn(1, 32, 1, 128, generator=g).to(dtype)
                        k, v = (torch.randn(1, 8, L, 128, generator=g).to(dtype) for _ in range(2))
                    else:
                        q, k, v = (torch.randn(1, args.heads, L, args.dim, generator=g).to(dtype) for _ in range(3))
                    up = torch.randn(q.shape, generator=g).to(dtype)
                    backend = "decode" if args.decode else "native"
                    fns, failed = {}, []
                    window = args.window if causal else None
                    for side, libs in sides.items():
                        fn = partial(step, q, k, v, up, causal, backend, args.backward, window)

                        def run(fn=fn, libs=libs):
                            use(libs)
                            try:
                                fn()
                            finally:
                                _kernels.load = load
                        use(libs)
                        try:
                            if not check(partial(qkv.attention, q, k, v, causal=causal, window=window,
                                                 backend=backend), q, k, v, causal, args.check_rows, window):
                                failed.append(side)
                        finally:
                            _kernels.load = load
                        fns[side] = run
                    if failed:  # not timed: a result outside the rule has no speed worth comparing
                        cells = f"{' and '.join(failed)} outside the tolerance rule | | "
                    else:
                        t = best_times(fns, repeats=args.repeats)
                        b, a = t["before"], t["after"]
                        cells = f"{b * 1e3:.2f} ms | {a * 1e3:.2f} ms | {a / b:.3f}"
                    band = (f"window {window}" if window is not None else "yes") if causal else "no"
                    print(f"| {dname} | {L} | {band} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

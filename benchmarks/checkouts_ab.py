"""A/B of two checkouts of qkv: the same calls timed from each, in turns, each run in its own process.

benchmarks/kernels_ab.py swaps two builds of the native kernels inside one process, which needs both to
speak the binding's version; a change to the kernels' interface (an argument, a version) or to the Python
around them cannot be swapped so. This script runs a child process per checkout (PYTHONPATH = its src/),
`--rounds` times in turns (A, B, A, B, ...), each timing `qkv.attention(q, k, v, backend=..., ...)` on the
same seeded inputs (best of `--repeats`, qkv.bench.timing), after checking the output against float64 on
sampled rows under the tolerance rule (qkv.bench.verify); and prints each case's best time per checkout
over the rounds and their ratio. The whole call is timed, the non-finite guard and dispatch included.

    git worktree add /tmp/qkv-before 87fad06
    python benchmarks/checkouts_ab.py --before /tmp/qkv-before --lengths 1024 4096 --window 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch, qkv
from qkv.bench.timing import best_times
from qkv.bench.verify import check_rows, verify
cases, repeats, backend = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = {}
with torch.inference_mode():
    for name, dtype, L, kw in cases:
        g = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(1, 8, L, 64, generator=g).to(getattr(torch, dtype)) for _ in range(3))
        fn = lambda: qkv.attention(q, k, v, backend=backend, **kw)
        rows = check_rows(L, 32)
        j, diag = torch.arange(L)[None], rows[:, None]
        allowed = None
        if kw.get("causal"):
            allowed = (j <= diag) & (j >= diag - kw.get("window", L))
        if not verify(q, k, v, {"fast": fn()}, rows, allowed)["fast_within_rule"]:
            out[name] = None
            continue
        out[name] = best_times({"x": fn}, repeats=repeats)["x"]
print(json.dumps(out))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="a checkout of qkv (a folder holding src/qkv)")
    p.add_argument("--after", default=str(REPO), help="a checkout of qkv (default: this one)")
    p.add_argument("--backend", default="native")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--window", type=int, default=None, help="also a causal window of W keys at each length")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    sides = {"before": Path(args.before), "after": Path(args.after)}
    for side, root in sides.items():
        if not (root / "src" / "qkv" / "__init__.py").is_file():
            p.error(f"--{side} {root} is not a checkout of qkv (no src/qkv/__init__.py)")
    cases = []
    for dtype in args.dtypes:
        for L in args.lengths:
            bands = [("no band", {}), ("causal", {"causal": True})]
            if args.window is not None:
                bands.append((f"window {args.window}", {"causal": True, "window": args.window}))
            cases += [(f"{dtype} {L} {band}", dtype, L, kw) for band, kw in bands]
    best: dict = {side: {} for side in sides}
    for _ in range(args.rounds):
        for side, root in sides.items():
            env = dict(os.environ, PYTHONPATH=str(root / "src"))
            run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases), str(args.repeats), args.backend],
                                 capture_output=True, text=True, env=env)
            if run.returncode != 0:
                sys.exit(f"the {side} checkout ({root}) failed:\n{run.stderr[-2000:]}")
            for name, t in json.loads(run.stdout.splitlines()[-1]).items():
                prev = best[side].get(name, float("inf"))
                best[side][name] = None if t is None or prev is None else min(prev, t)
    import torch

    from qkv.bench.report import cpu_name
    print(f"# {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; before = {args.before}, "
          f"after = {args.after}; backend={args.backend}, B=1, H=8, D=64; best of {args.repeats} x {args.rounds} "
          "rounds, the checkouts in turns; every output checked against float64 (32 sampled rows) first\n")
    print("| case | before | after | after / before |")
    print("|---|---|---|---|")
    for name, *_ in cases:
        b, a = best["before"].get(name), best["after"].get(name)
        if b is None or a is None:
            print(f"| {name} | outside the tolerance rule | | |")
        else:
            print(f"| {name} | {b * 1e3:.2f} ms | {a * 1e3:.2f} ms | {a / b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

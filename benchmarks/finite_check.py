"""Benchmark of the non-finite guard (qkv/core/finite.py): what honest NaN handling costs.

Every call of qkv.attention first reads the extremes of q, k and v (one aminmax each, one
synchronisation) to learn that they hold no NaN or infinity and that no score can overflow;
the decode backend, whose whole step reads the cache once, checks what its kernel reads
instead, and the guard checks only q there (one sum: `finite.queries_finite`); the native
backend's FA-2 kernel takes the extremes of q, k and v as it loads and packs them
(`finite.extremes_suspect`), and the guard checks nothing there. Compared in the same run,
forward only (inference mode), B=1:

- unguarded: the backend's forward called directly on a prepared spec (what qkv did before);
- guarded: qkv.attention(..., backend=...), the guard included;
- scan: the guard's check alone on the same tensors (`finite.scan`; for decode `finite.queries_finite`);
- full scan (decode and native rows only): what scanning k and v as well would cost there (the
  native rows: what the guard's scan cost the native backend before its kernel took the extremes;
  their "scan" is "-": the kernel checks q too, so the guard scans nothing).

overhead = scan / unguarded: the guard's own share of the call, measured apart from the
attention so the machine's noise (often more than 1% between turns) does not swamp it;
guarded/unguarded is printed too. Each method runs once to warm up, then --repeats times in
turns, best time kept (qkv.bench.timing).

    python benchmarks/finite_check.py
    python benchmarks/finite_check.py --lengths 4096 --repeats 5
    python benchmarks/finite_check.py --lengths 1024 4096 16384 --backends native --window 256
"""

from __future__ import annotations

import argparse

import torch

import qkv
from qkv.bench import machine_info
from qkv.bench.timing import best_times
from qkv.core import finite, get_backend
from qkv.core.spec import build_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _row(name, dtype, L, backend, q, k, v, kw, repeats, self_checking=False):
    """One table row; self_checking: the backend checks k and v itself (the "scan" column is then the guard's
    check of q, or nothing ("-") where the backend checks q too: `Backend.checks_queries`)."""
    spec = build_spec(q, k, v, **kw)
    impl = get_backend(backend)
    scans_q = self_checking and not impl.checks_queries
    fns = {
        "unguarded": lambda: impl.forward(q, k, v, spec, need_lse=False),
        "guarded": lambda: qkv.attention(q, k, v, backend=backend, **kw),
    }
    if not self_checking:
        fns["scan"] = lambda: finite.scan((q, k, v), spec)
    elif scans_q:
        fns["scan"] = lambda: finite.queries_finite(q, spec)
    if self_checking:
        fns["full scan"] = lambda: finite.scan((q, k, v), spec)
    t = best_times(fns, repeats=repeats)
    full = f"{1e3 * t['full scan']:.3f} ({100 * t['full scan'] / t['unguarded']:.1f}%)" if self_checking else "-"
    scan = f"{1e3 * t['scan']:.3f} | {100 * t['scan'] / t['unguarded']:.2f}%" if "scan" in t else "- | -"
    return (f"| {name} | {dtype} | {L} | {backend} | {1e3 * t['unguarded']:.2f} | {1e3 * t['guarded']:.2f} | "
            f"{t['guarded'] / t['unguarded']:.3f} | {scan} | {full} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--cache", type=int, default=32768, help="cache length of the decode rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=["sdpa", "decode"], choices=["sdpa", "decode", "native"],
                    help="sdpa: dense and causal rows on the scan; decode: its one-query row; native: dense, causal "
                         "(and --window) rows on the kernel's own extremes")
    ap.add_argument("--window", type=int, default=None, help="native rows: also a causal window of W keys")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"# CPU: {machine_info()['cpu']}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    print("| case | dtype | L | backend | unguarded ms | guarded ms | guarded/unguarded | scan ms | overhead "
          "| full scan ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    H, D = args.heads, args.dim
    with torch.inference_mode():
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for L in args.lengths:
                q, k, v = (torch.randn(1, H, L, D, dtype=dtype) for _ in range(3))
                cases = [("dense", {}), ("causal", {"causal": True})]
                if "sdpa" in args.backends:
                    for case, kw in cases:
                        print(_row(case, dname, L, "sdpa", q, k, v, kw, args.repeats), flush=True)
                if "native" in args.backends:  # the kernel takes the extremes of q, k and v as it reads them
                    if args.window is not None:
                        cases.append((f"causal window {args.window}", {"causal": True, "window": args.window}))
                    for case, kw in cases:
                        print(_row(case, dname, L, "native", q, k, v, kw, args.repeats, self_checking=True),
                              flush=True)
            if "decode" in args.backends:  # one query against a long grouped-query cache: decode checks itself
                q1 = torch.randn(1, 32, 1, 128, dtype=dtype)
                kc, vc = (torch.randn(1, 8, args.cache, 128, dtype=dtype) for _ in range(2))
                print(_row("decode 1 query, Hq=32 Hkv=8 D=128", dname, args.cache, "decode", q1, kc, vc, {},
                           args.repeats, self_checking=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

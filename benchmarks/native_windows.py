"""Causal windows on the native FlashAttention-2 kernels against what ran them before (issue 21).

Two tables, each method timed in turns in the same run (best of N, qkv.bench.timing), every
output checked first against the float64 reference on sampled rows under the tolerance rule
(qkv.bench.verify):

1. wide causal windows (more than a quarter of the keys: not the sparse backend's), where `auto`
   chose `backend="sdpa"` (torch's SDPA with the window as an explicit mask) before the native
   rule claimed them: SDPA against `backend="native"`, forward and forward+backward, 8 query heads and
   --kv-heads key/value heads (8: one per query head);
2. grouped-query heads (8 query heads, 2 kv heads) under a causal window of 256, where the sparse
   backend ran the gathered engine before its rule sent bands to the kernel: gathered against
   native, forward and forward+backward.

    python benchmarks/native_windows.py
    python benchmarks/native_windows.py --repeats 5
    python benchmarks/native_windows.py --dim 128
    python benchmarks/native_windows.py --kv-heads 2 --wide-only
"""

from __future__ import annotations

import argparse

import torch

import qkv
from qkv.bench.report import cpu_name
from qkv.bench.timing import best_times
from qkv.bench.verify import check_band
from qkv.core.engines import gathered
from qkv.core.spec import build_spec


def _checked(q, k, v, outputs: dict, spec) -> None:
    """Stops the run where any output is outside the tolerance rule against float64 (check_band)."""
    bad, got = check_band(q, k, v, outputs, spec)
    if bad:
        raise SystemExit(f"outside the tolerance rule: {', '.join(bad)} ({got})")


def _train(fn, q, k, v, up):
    def step():
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        torch.autograd.grad(fn(qs, ks, vs), (qs, ks, vs), up)
    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64, help="head size (D = Dv)")
    ap.add_argument("--kv-heads", type=int, default=8,
                    help="key/value heads of the wide windows' table (it has 8 query heads; default 8)")
    ap.add_argument("--wide-only", action="store_true", help="only the wide windows' table")
    args = ap.parse_args(argv)
    if args.dim < 1:
        ap.error(f"--dim must be at least 1, got {args.dim}")
    if args.kv_heads < 1 or 8 % args.kv_heads:
        ap.error(f"--kv-heads must divide the 8 query heads, got {args.kv_heads}")
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; B=1, D={args.dim}; "
          f"best of {args.repeats} in turns; outputs checked against float64 first")
    print("\n| dtype | L | window | Hq/Hkv | sdpa fwd ms | native fwd ms | sdpa/native | sdpa fwd+bwd ms | "
          "native fwd+bwd ms | sdpa/native |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for dt in (torch.float32, torch.bfloat16):
        for L, w in ((2048, 1024), (4096, 1024), (4096, 2048)):
            print(wide_row(dt, L, w, args.repeats, args.dim, args.kv_heads), flush=True)
    if args.wide_only:
        return
    print("\n| dtype | L | window | Hq/Hkv | gathered fwd ms | native fwd ms | gathered/native | gathered fwd+bwd ms | "
          "native fwd+bwd ms | gathered/native |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for dt in (torch.float32, torch.bfloat16):
        for L in (4096, 16384):
            print(gqa_row(dt, L, args.repeats, args.dim), flush=True)


def _row(dt, L, w, heads, names, fns, q, k, v, up, spec, repeats) -> str:
    """One table row: both methods checked against float64, then timed in turns, forward and training step."""
    _checked(q, k, v, {"qkv": fns[1](q, k, v), names[0]: fns[0](q, k, v)}, spec)
    f = best_times({n: (lambda fn=fn: fn(q, k, v)) for n, fn in zip(names, fns)}, repeats=repeats)
    b = best_times({n: _train(fn, q, k, v, up) for n, fn in zip(names, fns)}, repeats=max(2, repeats - 1))
    a, n = names
    return (f"| {str(dt)[6:]} | {L} | {w} | {heads} | {f[a] * 1e3:.1f} | {f[n] * 1e3:.1f} | {f[a] / f[n]:.2f}x | "
            f"{b[a] * 1e3:.1f} | {b[n] * 1e3:.1f} | {b[a] / b[n]:.2f}x |")


def wide_row(dt, L: int, w: int, repeats: int, D: int = 64, Hkv: int = 8) -> str:
    """SDPA (the window as a mask: what `auto` ran before) against the native kernel, 8 query heads and Hkv
    key/value heads of size D."""
    q = torch.randn(1, 8, L, D, dtype=dt)  # (B, Hq, L, D); drawn in the order before --kv-heads: q, k, v, up
    k, v = (torch.randn(1, Hkv, L, D, dtype=dt) for _ in range(2))  # (B, Hkv, L, D)
    up = torch.randn(1, 8, L, D, dtype=dt)  # (B, Hq, L, D), the output's gradient
    kw = dict(causal=True, window=w)

    def sdpa(q, k, v):
        return qkv.attention(q, k, v, backend="sdpa", **kw)

    def native(q, k, v):
        return qkv.attention(q, k, v, backend="native", **kw)

    spec = build_spec(q, k, v, **kw)
    return _row(dt, L, w, f"8/{Hkv}", ("sdpa", "native"), (sdpa, native), q, k, v, up, spec, repeats)


def gqa_row(dt, L: int, repeats: int, D: int = 64) -> str:
    """The gathered engine (what the sparse backend ran before) against the native kernel, 8/2 heads of
    size D."""
    q, up = (torch.randn(1, 8, L, D, dtype=dt) for _ in range(2))
    k, v = (torch.randn(1, 2, L, D, dtype=dt) for _ in range(2))
    kw = dict(causal=True, window=256)
    spec = build_spec(q, k, v, **kw)

    def gath(q, k, v):
        return gathered.run(q, k, v, spec, None, need_lse=False)[0]

    def native(q, k, v):
        return qkv.attention(q, k, v, backend="native", **kw)

    return _row(dt, L, 256, "8/2", ("gathered", "native"), (gath, native), q, k, v, up, spec, repeats)

if __name__ == "__main__":
    main()

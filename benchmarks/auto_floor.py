"""Where `auto`'s native rule starts: the native FlashAttention-2 kernels against SDPA on short sequences.

`auto` hands self-attention to the native kernels (backend/native.py) from a number of query-key pairs that
was measured per CPU kind; below it SDPA runs. This script times both on the shapes around that floor,
forward and (with --backward) forward and backward, for each band (none, causal, a causal window of half
the keys) and head grouping, and prints next to each ratio whether `auto` claims the shape on this CPU, so
a rule that claims a losing shape (or leaves a clearly winning one) shows in one table.

Each row's two forward outputs are checked against the float64 reference (qkv.bench.verify, the tolerance
rule) before they are timed, and with --backward their gradients of q, k and v too, whole, against float64
autograd of the reference (bounded by GRAD_FACTOR x the plain same-dtype reference's error); a row outside
the rule stops the run. Then both are timed in turns in the same run (best of N, qkv.bench.timing), a fast
call repeated until a sample lasts --min-sample-ms, so sub-millisecond calls are not read off one clock tick.

    python benchmarks/auto_floor.py                          # float32 and bfloat16, D=64, forward
    python benchmarks/auto_floor.py --dims 128 --backward    # training steps at head size 128
    python benchmarks/auto_floor.py --kv-heads 2 --bands causal window
"""

from __future__ import annotations

import argparse

import torch

import qkv
from qkv.bench.report import cpu_name
from qkv.bench.timing import best_times
from qkv.bench.verify import check_band
from qkv.core.api import choose_backend
from qkv.core.spec import build_spec
from qkv.testing import GRAD_FACTOR, within_rule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BANDS = ("none", "causal", "window")


def _kwargs(band: str, L: int) -> dict:
    """qkv.attention's band arguments: none, causal, or a causal window of half the keys."""
    if band == "none":
        return {}
    return dict(causal=True) if band == "causal" else dict(causal=True, window=max(1, L // 2))


def _checked(q, k, v, outputs: dict, spec) -> None:
    """Stops the run where any output is outside the tolerance rule against float64 (check_band)."""
    bad, got = check_band(q, k, v, outputs, spec)
    if bad:
        raise SystemExit(f"outside the tolerance rule: {', '.join(bad)} ({got})")


def _checked_grads(q, k, v, up, fns: dict, kw: dict) -> None:
    """Stops the run where any method's gradients of q, k, v are outside the rule against float64 autograd
    of the reference."""
    def grads(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        return torch.autograd.grad(out, xs, up.to(out.dtype))

    def ref(a, b, c):
        return qkv.attention(a, b, c, backend="reference", **kw)

    exact, plain = grads(ref, q.double(), k.double(), v.double()), grads(ref, q, k, v)
    bad = [n for n, fn in fns.items()
           if not all(within_rule(x, p, e, factor=GRAD_FACTOR)[0] for x, p, e in zip(grads(fn, q, k, v), plain, exact))]
    if bad:
        raise SystemExit(f"gradients outside the tolerance rule: {', '.join(bad)}")


def _train(fn, q, k, v, up):
    def step():
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        torch.autograd.grad(fn(qs, ks, vs), (qs, ks, vs), up)
    return step


def row(dt: torch.dtype, D: int, Hkv: int, L: int, band: str, backward: bool, repeats: int,
        min_sample_s: float = 0.0) -> str:
    """One table row: SDPA and the native kernels on B=1, 8 query heads, Hkv key/value heads, L tokens of
    head size D, checked against float64, then timed in turns; `auto` is what `auto` runs for the shape."""
    q = torch.randn(1, 8, L, D, dtype=dt)  # (B, Hq, L, D)
    k, v = (torch.randn(1, Hkv, L, D, dtype=dt) for _ in range(2))  # (B, Hkv, L, D)
    up = torch.randn(1, 8, L, D, dtype=dt)  # (B, Hq, L, D), the output's gradient
    kw = _kwargs(band, L)
    fns = {name: (lambda q, k, v, name=name: qkv.attention(q, k, v, backend=name, **kw)) for name in ("sdpa", "native")}
    spec = build_spec(q, k, v, **kw)
    _checked(q, k, v, {"qkv": fns["native"](q, k, v), "sdpa": fns["sdpa"](q, k, v)}, spec)
    if backward:
        _checked_grads(q, k, v, up, fns, kw)
        calls = {n: _train(fn, q, k, v, up) for n, fn in fns.items()}
    else:
        calls = {n: (lambda fn=fn: fn(q, k, v)) for n, fn in fns.items()}
    t = best_times(calls, repeats=repeats, min_sample_s=min_sample_s)
    q_run = q.detach().requires_grad_(backward)  # as the timed calls see it
    chosen = choose_backend(build_spec(q_run, k, v, **kw), q_run, False)
    return (f"| {str(dt)[6:]} | {D} | 8/{Hkv} | {L} | {L * L} | {band} | {t['sdpa'] * 1e3:.3f} | "
            f"{t['native'] * 1e3:.3f} | {t['sdpa'] / t['native']:.2f}x | {chosen} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    ap.add_argument("--dims", nargs="+", type=int, default=[64], help="head sizes (D = Dv)")
    ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads for the 8 query heads (default 8)")
    ap.add_argument("--lengths", nargs="+", type=int, default=[64, 96, 128, 192, 256, 384, 512])
    ap.add_argument("--bands", nargs="+", choices=BANDS, default=["none", "causal"])
    ap.add_argument("--backward", action="store_true", help="time forward and backward (a training step)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-sample-ms", type=float, default=20.0,
                    help="repeat a fast call until a sample lasts this long (default 20)")
    args = ap.parse_args(argv)
    if args.kv_heads < 1 or 8 % args.kv_heads:
        ap.error(f"--kv-heads must divide the 8 query heads, got {args.kv_heads}")
    if min(args.dims) < 1 or min(args.lengths) < 1:
        ap.error("--dims and --lengths must be at least 1")
    if max(args.dims) > 256:
        ap.error(f"--dims: the native kernels take head sizes up to 256, got {max(args.dims)}")
    if args.repeats < 1 or args.min_sample_ms < 0:
        ap.error("--repeats must be at least 1 and --min-sample-ms at least 0")
    torch.manual_seed(0)
    what = "forward and backward" if args.backward else "forward"
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; B=1, {what}; best of "
          f"{args.repeats} in turns (samples of at least {args.min_sample_ms:g} ms); outputs checked against "
          "float64 first; window: a causal window of L/2 keys")
    print("\n| dtype | D | Hq/Hkv | L | pairs | band | sdpa ms | native ms | sdpa/native | auto runs |\n"
          "|---|---:|---|---:|---:|---|---:|---:|---:|---|")
    for name in args.dtypes:
        for D in args.dims:
            for band in args.bands:
                for L in args.lengths:
                    print(row(DTYPES[name], D, args.kv_heads, L, band, args.backward, args.repeats,
                              args.min_sample_ms / 1e3), flush=True)


if __name__ == "__main__":
    main()

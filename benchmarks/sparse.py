"""Block-sparse attention on CPU: qkv's sparse backend vs dense SDPA with a bool mask vs
FlexAttention, measured in one run (issues 5 and 21).

    .venv/bin/python benchmarks/sparse.py                 # the table of docs/benchmarks.md
    .venv/bin/python benchmarks/sparse.py --quick         # 4k and 8k only, no FlexAttention
    .venv/bin/python benchmarks/sparse.py --force-native  # the native path where the first kind's rule would run it

B=1, H=8, D=64 (--dim). Times are medians of a few repetitions after one warm-up call (qkv.bench.timing); "first
call" is what a user waits for the first result: building the block mask plus the first
forward, including torch.compile for FlexAttention. FlexAttention has no backward on CPU
(and runs unfused, materialising every score, without torch.compile), so only its
compiled forward is timed. "qkv" is `backend="sparse"` (its engine is named: the native
FlashAttention-2 kernel or the gathered engine, backend/sparse.py's `native_pays`); "gathered"
is the gathered engine run directly in the same run, so the two engines' ratio is measured
side by side; "SDPA causal fwd+bwd" is SDPA's full causal attention without a mask (issue 21's
reference for the window's training step). Before anything is timed, qkv's and the gathered
engine's outputs are checked against the float64 reference on sampled rows under the tolerance
rule (qkv.bench.verify); a failure stops the run. Prints a Markdown table and writes JSON (--json).
With --force-native the sparse backend's rule is that of the first CPU kind it was measured on, with
whatever build this machine's kernels have (its narrow tiles on a CPU without AVX-512): how a rule for
another CPU kind is measured (docs/benchmarks.md, the ninth and twelfth parts).
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.nn.functional as F

import qkv
from qkv import masks as M
from qkv._files import write_text
from qkv.bench.report import cpu_name
from qkv.bench.timing import best_of, clock
from qkv.bench.verify import check_rows, verify
from qkv.core import _kernels
from qkv.core.backend import sparse as sparse_backend
from qkv.core.engines import gathered, native_flash, native_flash_bwd
from qkv.core.spec import build_spec

B, H, D = 1, 8, 64


def median_time(fn, reps: int, warmup: bool = True) -> float:
    """The median of `reps` timed calls (qkv.bench.timing), after one warm-up call unless `warmup` is False."""
    return best_of(fn, repeats=reps, warmup=warmup)["median_s"]


def patterns(L: int) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < L:  # documents of 512..4096 tokens packed into one row
        n = min(int(torch.randint(512, 4097, (1,), generator=g)), L - total)
        lengths.append(n)
        total += n
    return {
        "causal window 256": M.causal_sliding_window(256),
        "global 16 + window 256": M.longformer(256, 16),
        "packed documents, causal": M.document(lengths, causal=True),
    }


def gathered_attention(q, k, v, bm):
    """The gathered engine alone on q, k, v under `bm` (what backend="sparse" ran before the native kernel)."""
    spec = build_spec(q, k, v, mask=bm)
    return gathered.run(q, k, v, spec, bm, need_lse=False)[0]


def check(q, k, v, bm, outputs: dict, n_rows: int = 48) -> dict:
    """Each output against float64 on `n_rows` sampled rows under the tolerance rule; raises on a failure."""
    rows = check_rows(q.shape[2], n_rows)
    allowed = torch.cat([bm.dense_block(int(r), int(r) + 1, 0, k.shape[2]).reshape(1, -1) for r in rows])  # (R, Lk)
    got = verify(q, k, v, outputs, rows, allowed)
    bad = [m for m in outputs if not got["ok" if m == "qkv" else f"{m}_within_rule"]]
    if bad:
        raise SystemExit(f"outside the tolerance rule: {', '.join(bad)} ({got})")
    return got


def run_case(name, fn, L, dtype, reps, sdpa_max, sdpa_bwd_max, flex_at, flex_state, causal_at=(), dim=D) -> dict:
    row = {"pattern": name, "L": L, "dtype": str(dtype).replace("torch.", "")}
    gen = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(B, H, L, dim, generator=gen).to(dtype) for _ in range(3))
    up = torch.randn(B, H, L, dim, generator=gen).to(dtype)

    t = clock()
    bm = qkv.block_mask(fn, None, None, L, L, block_size=128)
    row["build_s"] = clock() - t
    first = qkv.attention(q, k, v, mask=bm, backend="sparse")
    row["qkv_first_s"] = clock() - t
    row["sparsity_%"] = bm.sparsity()
    spec = build_spec(q, k, v, mask=bm)
    row["engine"] = "native" if sparse_backend.native_pays(spec, q, k, v, bm) else "gathered"
    row["max_err"] = check(q, k, v, bm, {"qkv": first, "gathered": gathered_attention(q, k, v, bm)})["qkv_max_err"]
    row["qkv_fwd_s"] = median_time(lambda: qkv.attention(q, k, v, mask=bm, backend="sparse"), reps)
    row["gathered_fwd_s"] = median_time(lambda: gathered_attention(q, k, v, bm), reps)

    def qkv_fb():
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        torch.autograd.grad(qkv.attention(qs, ks, vs, mask=bm, backend="sparse"), (qs, ks, vs), up)

    def gathered_fb():
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        torch.autograd.grad(gathered_attention(qs, ks, vs, bm), (qs, ks, vs), up)

    row["qkv_fwdbwd_s"] = median_time(qkv_fb, max(1, reps // 2))
    row["gathered_fwdbwd_s"] = median_time(gathered_fb, max(1, reps // 2))
    if name in BANDS:  # the same pattern as a band (causal=, window=): no block lists at all
        band = BANDS[name]
        got = qkv.attention(q, k, v, **band)
        check(q, k, v, bm, {"qkv": got})
        row["band_fwd_s"] = median_time(lambda: qkv.attention(q, k, v, **band), reps)

        def band_fb():
            qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
            torch.autograd.grad(qkv.attention(qs, ks, vs, **band), (qs, ks, vs), up)

        row["band_fwdbwd_s"] = median_time(band_fb, max(1, reps // 2))
    if L in causal_at:
        def causal_fb():
            qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
            torch.autograd.grad(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), (qs, ks, vs), up)

        row["sdpa_causal_fwdbwd_s"] = median_time(causal_fb, 2, warmup=False)

    if L <= sdpa_max:
        dense = M.dense_mask(fn, 1, 1, L, L)  # (1, 1, L, L) bool
        # one cold call each: the dense kernels run for seconds, so warm-up matters little
        row["sdpa_fwd_s"] = median_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), 1,
                                        warmup=False)
        if L <= sdpa_bwd_max:
            def sdpa_fb():
                qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=dense)
                torch.autograd.grad(out, (qs, ks, vs), up)

            row["sdpa_fwdbwd_s"] = median_time(sdpa_fb, 1, warmup=False)
        del dense

    if L in flex_at and flex_state.get("ok", True):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            if "fn" not in flex_state:
                flex_state["fn"] = torch.compile(flex_attention)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = clock()
                fbm = create_block_mask(fn, None, None, L, L, device="cpu")
                flex_state["fn"](q, k, v, block_mask=fbm)
                row["flex_first_s"] = clock() - t
                row["flex_fwd_s"] = median_time(lambda: flex_state["fn"](q, k, v, block_mask=fbm), reps)
        except Exception as exc:  # compile unavailable: report, do not hide
            flex_state["ok"] = False
            flex_state["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


BANDS = {"causal window 256": {"causal": True, "window": 256}}  # patterns that are a band, as attention() takes it
SHORT = {"window": "causal window 256", "longformer": "global 16 + window 256", "documents": "packed documents, causal"}


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(a, b, digits=1):
    return "-" if a is None or b is None else f"{a / b:.{digits}f}x"


def table(rows) -> str:
    lines = [
        "| pattern | L | dtype | sparsity | qkv engine | qkv fwd s | gathered fwd s | gathered/qkv | SDPA fwd s | "
        "SDPA/qkv | Flex fwd s | Flex/qkv | qkv fwd+bwd s | gathered fwd+bwd s | gathered/qkv | SDPA fwd+bwd s | "
        "SDPA/qkv | SDPA causal fwd+bwd s | SDPA causal/qkv | qkv first call s | Flex first call s |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r.get
        lines.append(
            f"| {r['pattern']} | {r['L']} | {r['dtype']} | {r['sparsity_%']:.1f}% | {r['engine']} | "
            f"{fmt(g('qkv_fwd_s'))} | {fmt(g('gathered_fwd_s'))} | {ratio(g('gathered_fwd_s'), g('qkv_fwd_s'), 2)} | "
            f"{fmt(g('sdpa_fwd_s'))} | {ratio(g('sdpa_fwd_s'), g('qkv_fwd_s'))} | {fmt(g('flex_fwd_s'))} | "
            f"{ratio(g('flex_fwd_s'), g('qkv_fwd_s'), 2)} | {fmt(g('qkv_fwdbwd_s'))} | {fmt(g('gathered_fwdbwd_s'))} | "
            f"{ratio(g('gathered_fwdbwd_s'), g('qkv_fwdbwd_s'), 2)} | {fmt(g('sdpa_fwdbwd_s'))} | "
            f"{ratio(g('sdpa_fwdbwd_s'), g('qkv_fwdbwd_s'))} | {fmt(g('sdpa_causal_fwdbwd_s'))} | "
            f"{ratio(g('sdpa_causal_fwdbwd_s'), g('qkv_fwdbwd_s'))} | {fmt(g('qkv_first_s'))} | "
            f"{fmt(g('flex_first_s'), 1)} |"
        )
    return "\n".join(lines)


def band_table(rows) -> str:
    """The window rows again, run as a band (`causal=True, window=256`, auto: the sparse backend's band
    path) rather than a BlockMask."""
    lines = ["| pattern | L | dtype | qkv band fwd s | Flex fwd s | Flex/qkv band | qkv band fwd+bwd s | "
             "SDPA causal fwd+bwd s | SDPA causal/qkv band |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r.get
        if g("band_fwd_s") is None:
            continue
        lines.append(f"| {r['pattern']} (band) | {r['L']} | {r['dtype']} | {fmt(g('band_fwd_s'))} | "
                     f"{fmt(g('flex_fwd_s'))} | {ratio(g('flex_fwd_s'), g('band_fwd_s'), 2)} | "
                     f"{fmt(g('band_fwdbwd_s'))} | {fmt(g('sdpa_causal_fwdbwd_s'))} | "
                     f"{ratio(g('sdpa_causal_fwdbwd_s'), g('band_fwdbwd_s'))} |")
    return "\n".join(lines)


def force_native() -> None:
    """--force-native: the sparse backend takes this CPU for the first kind its rule was measured on,
    whatever build its kernels have for the one measured there, and any head size the kernels take for
    the sizes measured (for this process only)."""
    _kernels.measured_cpu = lambda: True
    sparse_backend.NATIVE_MAX_DIM = native_flash.MAX_DIM  # the kernels' own limit
    sparse_backend._kernels_built = lambda grad, narrow: (native_flash.lib() is not None
                                                          and (not grad or native_flash_bwd.lib() is not None))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sdpa-max", type=int, default=16384, help="longest L for dense SDPA forward")
    ap.add_argument("--sdpa-bwd-max", type=int, default=8192, help="longest L for dense SDPA forward+backward")
    ap.add_argument("--flex-at", type=int, nargs="*", default=[16384], help="lengths at which FlexAttention runs")
    ap.add_argument("--bf16-at", type=int, nargs="*", default=[16384], help="lengths with bfloat16 rows")
    ap.add_argument("--sdpa-causal-at", type=int, nargs="*", default=[16384],
                    help="lengths at which SDPA's full causal forward+backward (no mask) is timed, window rows only")
    ap.add_argument("--patterns", nargs="*", default=None,
                    help="only these patterns (window, longformer, documents); default all")
    ap.add_argument("--quick", action="store_true", help="4k and 8k, no FlexAttention")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 avoids OpenMP spin-wait stalls when the cores are oversubscribed)")
    ap.add_argument("--dim", type=int, default=D, help=f"head size (D = Dv; default {D})")
    ap.add_argument("--force-native", action="store_true",
                    help="the sparse backend's native path wherever the first CPU kind's rule sends a case to it, "
                         "with this machine's build (to measure a rule on another CPU kind)")
    args = ap.parse_args(argv)
    if args.dim < 1:
        ap.error(f"--dim must be at least 1, got {args.dim}")
    if args.force_native:
        force_native()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.flex_at, args.bf16_at = [4096, 8192], [], []

    torch.manual_seed(0)
    t = clock()
    bm = qkv.block_mask(M.causal_sliding_window(256), None, None, 131072, block_size=128)
    build_128k = clock() - t
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, D={args.dim}"
          + ("; --force-native: the first CPU kind's rule for the sparse backend's native path" if args.force_native
             else ""))
    print(f"BlockMask build, causal window 256 at L=131072: {build_128k * 1000:.1f} ms "
          f"({bm.num_blocks[0]}x{bm.num_blocks[1]} blocks, sparsity {bm.sparsity():.2f}%)")

    rows, flex_state = [], {}
    for L in args.lengths:
        for name, fn in patterns(L).items():
            only_window = name.startswith("causal window")
            if L > 32768 and not only_window:
                continue  # the growth series runs to 64k for the window only
            if args.patterns and not any(SHORT[p] == name for p in args.patterns):
                continue
            causal_at = args.sdpa_causal_at if only_window else ()
            row = run_case(name, fn, L, torch.float32, args.reps, args.sdpa_max, args.sdpa_bwd_max,
                           args.flex_at, flex_state, causal_at, dim=args.dim)
            rows.append(row)
            print(row, flush=True)
            if L in args.bf16_at:
                row = run_case(name, fn, L, torch.bfloat16, args.reps, args.sdpa_max, 0, args.flex_at, flex_state,
                               causal_at, dim=args.dim)
                rows.append(row)
                print(row, flush=True)
    if "error" in flex_state:
        print("FlexAttention compile failed:", flex_state["error"])
    print()
    print(table(rows))
    print()
    print(band_table(rows))
    win = [r for r in rows if r["pattern"].startswith("causal window") and r["dtype"] == "float32"]
    growth = [f"{b['L'] // 1024}k/{a['L'] // 1024}k {b['qkv_fwd_s'] / a['qkv_fwd_s']:.2f}x"
              for a, b in zip(win, win[1:])]
    print("\nqkv forward time per doubling of L (causal window 256):", ", ".join(growth))
    if args.json:
        write_text(args.json, json.dumps({"build_128k_s": build_128k, "rows": rows,
                                          "flex": flex_state.get("error", "ok")}, indent=1))


if __name__ == "__main__":
    main()

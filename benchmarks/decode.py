"""Benchmark of one decode step: a few new queries against a long KV cache.

For each dtype and cache length: the best-of-N time of torch's SDPA (enable_gqa=True), of
qkv's decode backend and of qkv's auto, as speed ratios against SDPA measured in the same
run, and the bandwidth each reaches reading the cache (bytes of K and V / time). The
machine's own memory-read bandwidth is measured in the same run (a sum over a buffer of
the cache's size), so each figure is also given as a fraction of it.

    python benchmarks/decode.py
    python benchmarks/decode.py --lengths 4096 32768 --queries 1 4
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import qkv

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def best(fn, repeats):
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--queries", type=int, nargs="+", default=[1])
    p.add_argument("--heads", type=int, default=32, help="query heads (Hq)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (Hkv)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    print(f"Decode step, B=1, Hq={args.heads}, Hkv={args.kv_heads}, D={args.dim}; ratio = SDPA time / qkv time; "
          f"GB/s = bytes of K and V / time (best of {args.repeats}; {torch.get_num_threads()} threads, torch {torch.__version__})\n")
    print("| dtype | Lq | cache | memory read GB/s | torch SDPA | qkv decode | qkv auto (picks) |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name in args.dtypes:
            dtype = DTYPES[name]
            for L in args.lengths:
                k = torch.randn(1, args.kv_heads, L, args.dim).to(dtype)
                v = torch.randn(1, args.kv_heads, L, args.dim).to(dtype)
                nbytes = (k.numel() + v.numel()) * k.element_size()
                flat = torch.cat([k.flatten(), v.flatten()]).float()  # the same bytes, read by a plain sum
                t_read = best(lambda: flat.sum(), args.repeats)
                read_gbs = flat.numel() * 4 / t_read / 1e9
                for lq in args.queries:
                    q = torch.randn(1, args.heads, lq, args.dim).to(dtype)
                    causal = lq > 1
                    t_sdpa = best(lambda: F.scaled_dot_product_attention(
                        q, k, v, enable_gqa=True, attn_mask=_mask(lq, L) if causal else None), args.repeats)
                    t_dec = best(lambda: qkv.attention(q, k, v, causal=causal, backend="decode"), args.repeats)
                    t_auto = best(lambda: qkv.attention(q, k, v, causal=causal), args.repeats)
                    picked = qkv.core.choose_backend(qkv.core._spec.build_spec(q, k, v, causal=causal), q, False)

                    def cell(t):
                        gbs = nbytes / t / 1e9
                        return f"{t * 1e3:.2f} ms, {gbs:.1f} GB/s ({gbs / read_gbs:.0%})"

                    print(f"| {name} | {lq} | {L} | {read_gbs:.1f} | {cell(t_sdpa)} | {cell(t_dec)} {t_sdpa / t_dec:.2f}x "
                          f"| {cell(t_auto)} {t_sdpa / t_auto:.2f}x ({picked}) |", flush=True)
    return 0


def _mask(lq: int, L: int) -> torch.Tensor:
    """Bottom-right causal mask of a chunk of lq new tokens against a cache of L."""
    return torch.arange(L)[None, :] <= torch.arange(lq)[:, None] + (L - lq)


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of one decode step: a few new queries against a long KV cache.

For each dtype, number of new queries and cache length: the time of torch's SDPA
(enable_gqa=True), of qkv's decode backend and of qkv's auto, with speed ratios against SDPA
measured in the same run, and the bandwidth each reaches reading the cache (bytes of K and
V / time). The machine's memory-read bandwidth is measured in the same run, interleaved
with the methods: a float32 sum over a buffer of as many bytes as the cache. Each figure is
also given as a fraction of it. Every method, and the read, runs once to warm up, then
`--repeats` times in turns, and keeps its best time (qkv.bench.timing), so a burst of load
from elsewhere hits all of them alike. With `--warm`, qkv's decode is also timed alone, call
after call with no read between: on a cache that fits in the last-level cache (4096 keys of
bfloat16 at Hkv=8, D=128 is 16.8 MB) that is the kernel's own rate, what it could reach were
memory no limit.

    python benchmarks/decode.py
    python benchmarks/decode.py --lengths 4096 32768 --queries 1 4
    python benchmarks/decode.py --lengths 4096 --dtypes bfloat16 --warm
    python benchmarks/decode.py --lengths 64 128 256 512 --queries 1 8 --qkv-sdpa

With `--qkv-sdpa` qkv's own SDPA backend is timed too, the path `auto` runs below the decode
backend's floor (torch's SDPA behind the non-finite guard's scan of q, k and v, qkv.core.finite),
and the last column is its time over qkv's decode: the decode floor's referee, where torch's
SDPA alone would understate what a short cache costs through qkv.

With `--march TARGET` the decode kernel is built for that target instead of the machine
(-march=native), e.g. x86-64-v3 (AVX2: the kernel's 8-float tiles) or x86-64-v2 (SSE4.2: 4
floats), to measure on this CPU what a CPU without AVX-512 runs; set ATEN_CPU_CAPABILITY (avx2,
default) to run torch's own kernels, SDPA among them, with the same instructions:

    ATEN_CPU_CAPABILITY=avx2 python benchmarks/decode.py --march x86-64-v3 --queries 1 8 16
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

import qkv
import qkv.core.spec
from qkv.bench.kernels import build_for
from qkv.bench.timing import best_times
from qkv.core import _kernels
from qkv.core.engines import decode_native

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def causal_mask(lq: int, L: int) -> torch.Tensor:
    """Bottom-right causal mask of a chunk of lq new tokens against a cache of L (for SDPA)."""
    return torch.arange(L)[None, :] <= torch.arange(lq)[:, None] + (L - lq)


def use_kernel_built_for(march: str) -> None:
    """Make the decode kernel built for `march` (qkv.bench.kernels.build_for) the decode kernel of this
    process; exits with the compiler's message when the build fails (an unknown target, no compiler)."""
    try:
        built = build_for("decode_kernel", march)
    except RuntimeError as e:
        sys.exit(f"--march {march}: {e}")
    load = _kernels.load
    _kernels.load = lambda name: built if name == "decode_kernel" else load(name)
    decode_native._typed.clear()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--queries", type=int, nargs="+", default=[1])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads (Hq)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (Hkv)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warm", action="store_true",
                   help="also time qkv's decode alone, call after call (no read between): on a cache that fits in "
                        "the last-level cache, the kernel's own rate")
    p.add_argument("--qkv-sdpa", action="store_true",
                   help="also time qkv's SDPA backend (what auto runs below the decode floor: torch's SDPA behind the "
                        "non-finite guard), with its time over qkv's decode")
    p.add_argument("--march", metavar="TARGET",
                   help="build the decode kernel for this -march target (e.g. x86-64-v3, x86-64-v2) instead of the "
                        "machine's (native): the tiles of a CPU without AVX-512, measured on this one")
    args = p.parse_args(argv)
    if args.march:
        use_kernel_built_for(args.march)
    kernel = decode_native.lib()
    built = ("none: the eager segments" if kernel is None else
             f"-march={args.march or 'native'}, {kernel.vector_width}-float vectors, bfloat16 dot product: "
             f"{'yes' if kernel.bf16_dot else 'no'}")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Decode step, B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.dim}; Lq > 1 is causal "
          f"(bottom-right). ratio = SDPA time / qkv time; GB/s = bytes of K and V / time, and its share of the "
          f"memory read (float32 sum over as many bytes) measured in the same run. Best of {args.repeats} turns; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__} (its CPU kernels: "
          f"{torch.backends.cpu.get_cpu_capability()}), load average {load:.2f} at start. Decode kernel: {built}.\n")
    warm_head, warm_rule = (" qkv decode, warm |", "---|") if args.warm else ("", "")
    if args.qkv_sdpa:
        warm_head, warm_rule = warm_head + " qkv sdpa (its time / qkv decode's) |", warm_rule + "---|"
    print(f"| dtype | Lq | cache | memory read | torch SDPA | qkv decode | qkv auto (picks) |{warm_head}")
    print(f"|---|---|---|---|---|---|---|{warm_rule}")
    B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.dim
    with torch.inference_mode():
        for name in args.dtypes:
            dtype = DTYPES[name]
            for L in args.lengths:
                k = torch.randn(B, Hkv, L, D).to(dtype)
                v = torch.randn(B, Hkv, L, D).to(dtype)
                nbytes = (k.numel() + v.numel()) * k.element_size()
                flat = torch.randn(nbytes // 4)  # float32, as many bytes as the cache
                for lq in args.queries:
                    q = torch.randn(B, Hq, lq, D).to(dtype)
                    causal = lq > 1
                    sdpa_mask = causal_mask(lq, L) if causal else None
                    decode_fn = partial(qkv.attention, q, k, v, causal=causal, backend="decode")
                    methods = {
                        "read": flat.sum,
                        "sdpa": partial(F.scaled_dot_product_attention, q, k, v, attn_mask=sdpa_mask, enable_gqa=True),
                        "decode": decode_fn,
                        "auto": partial(qkv.attention, q, k, v, causal=causal),
                    }
                    if args.qkv_sdpa:
                        methods["qkv_sdpa"] = partial(qkv.attention, q, k, v, causal=causal, backend="sdpa")
                    times = best_times(methods, repeats=args.repeats)
                    picked = qkv.core.choose_backend(qkv.core.spec.build_spec(q, k, v, causal=causal), q, False)
                    read_gbs = nbytes / times["read"] / 1e9

                    def cell(t, nbytes=nbytes, read_gbs=read_gbs):
                        gbs = nbytes / t / 1e9
                        return f"{t * 1e3:.2f} ms, {gbs:.1f} GB/s ({gbs / read_gbs:.0%})"

                    t_sdpa, t_dec, t_auto = times["sdpa"], times["decode"], times["auto"]
                    warm = ""
                    if args.warm:  # alone, call after call: the cache stays wherever the last call left it
                        t_warm = best_times({"decode": decode_fn}, repeats=args.repeats)["decode"]
                        warm = f" {cell(t_warm)} |"
                    if args.qkv_sdpa:
                        warm += f" {cell(times['qkv_sdpa'])} {times['qkv_sdpa'] / t_dec:.2f}x |"
                    print(f"| {name} | {lq} | {L} | {read_gbs:.1f} GB/s | {cell(t_sdpa)} | {cell(t_dec)} "
                          f"{t_sdpa / t_dec:.2f}x | {cell(t_auto)} {t_sdpa / t_auto:.2f}x ({picked}) |{warm}",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

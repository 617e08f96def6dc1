"""Benchmark of chunked prefill's attention: a chunk of new queries against a long KV cache.

The chunk's Lq queries attend causally, aligned bottom right, to Lk keys (the cache, the chunk's
own keys last). torch's SDPA aligns `is_causal` top left, so it needs the band as a dense bool
mask (Lq, Lk); qkv's sdpa backend instead splits the chunk into the prefix keys without a mask
and the square causal block, merged by lse (qkv.core.backend.sdpa.split_causal). Compared in the same
run, forward only (inference mode):

- torch SDPA with the dense bottom-right mask (enable_gqa=True): the peer; skipped where the
  mask SDPA converts to q's dtype would exceed --max-mask-mib;
- qkv auto (the backend it picks is named; "before" names what it picked before the split,
  when the dense mask's Lq * Lk entries above 2^24 sent a chunk to tiled);
- qkv split: sdpa.split_causal called directly;
- qkv tiled: the linear-memory engine auto used before for the largest chunks;
- qkv native: the native FlashAttention-2 kernels (`backend="native"`), the chunk's rows banded
  bottom right in the kernel.

Before anything is timed, every qkv method's output is checked against float64 on --check-rows
sampled query rows under the tolerance rule (qkv.bench.verify); a failure stops the run. That check is
each qkv method's first call; then each method runs --repeats times in turns (no further warm-up) and keeps
its best time (qkv.bench.timing), so a burst of load from elsewhere hits all of them alike. ratio =
SDPA-with-mask time / time.

    python benchmarks/prefill_chunk.py
    python benchmarks/prefill_chunk.py --configs small --chunks 512 --caches 8192 --repeats 3
    python benchmarks/prefill_chunk.py --methods sdpa-mask auto split native
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch
import torch.nn.functional as F
from decode import causal_mask  # benchmarks/decode.py: this script's folder is on sys.path

import qkv
from qkv.bench.timing import best_times
from qkv.bench.verify import check_rows, verify
from qkv.core import choose_backend
from qkv.core.backend import sdpa
from qkv.core.spec import build_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# name -> (Hq, Hkv, D), B = 1
CONFIGS = {"large": (32, 8, 128), "small": (8, 2, 64), "mha": (8, 8, 64)}
METHODS = ["sdpa-mask", "auto", "split", "tiled", "native"]


def _cell(m, times, base, picked, before, mask_mib) -> str:
    """One table cell: method m's time, its ratio to sdpa-mask, and for auto the backend it picked."""
    if m not in times:
        return f"skipped (mask {mask_mib:.0f} MiB)"
    t = times[m]
    s = f"{t * 1e3:.0f} ms" if t >= 0.1 else f"{t * 1e3:.1f} ms"
    if base is not None and m != "sdpa-mask":
        s += f" ({base / t:.2f}x)"
    if m == "auto":
        s += f" ({picked}; before: {before})"
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["large", "small"], choices=list(CONFIGS),
                   help="large: Hq=32, Hkv=8, D=128; small: Hq=8, Hkv=2, D=64; mha: Hq=Hkv=8, D=64 (B=1)")
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 2048], help="queries per chunk (Lq)")
    p.add_argument("--caches", type=int, nargs="+", default=[8192, 32768], help="keys (Lk), the chunk's own included")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-mask-mib", type=float, default=1024.0,
                   help="skip SDPA-with-mask where its mask in q's dtype would be larger")
    p.add_argument("--check-rows", type=int, default=16, help="query rows checked against float64 before timing")
    args = p.parse_args(argv)
    if args.check_rows < 1:
        p.error(f"--check-rows must be at least 1, got {args.check_rows}")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Chunked prefill attention, B=1, forward: a chunk of Lq queries against Lk keys, causal (bottom right). "
          f"ratio = torch SDPA (dense bool mask) time / time. Best of {args.repeats} turns; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {load:.2f} at start.\n")
    cols = {"sdpa-mask": "torch SDPA + mask", "auto": "qkv auto (picks; before)", "split": "qkv split",
            "tiled": "qkv tiled", "native": "qkv native"}
    print("| config | dtype | Lq | Lk | " + " | ".join(cols[m] for m in args.methods) + " |")
    print("|---|---|---|---|" + "---|" * len(args.methods))
    with torch.inference_mode():
        for cname in args.configs:
            Hq, Hkv, D = CONFIGS[cname]
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                for Lk in args.caches:
                    k = torch.randn(1, Hkv, Lk, D).to(dtype)  # (B, Hkv, Lk, D)
                    v = torch.randn(1, Hkv, Lk, D).to(dtype)
                    for Lq in args.chunks:
                        if Lq >= Lk:
                            continue
                        q = torch.randn(1, Hq, Lq, D).to(dtype)  # (B, Hq, Lq, D)
                        spec = build_spec(q, k, v, causal=True)
                        picked = choose_backend(spec, q, False)
                        before = "sdpa+mask" if sdpa.mask_entries(spec) <= sdpa.AUTO_MAX_MASK_ENTRIES else "tiled"
                        mask_mib = Lq * Lk * q.element_size() / 2**20
                        mask = causal_mask(Lq, Lk) if mask_mib <= args.max_mask_mib else None
                        fns = {
                            "sdpa-mask": partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask,
                                                 enable_gqa=True),
                            "auto": partial(qkv.attention, q, k, v, causal=True),
                            "split": partial(sdpa.split_causal, q, k, v, spec.scale),
                            "tiled": partial(qkv.attention, q, k, v, causal=True, backend="tiled"),
                            "native": partial(qkv.attention, q, k, v, causal=True, backend="native"),
                        }
                        fns = {m: fns[m] for m in args.methods if not (m == "sdpa-mask" and mask is None)}
                        rows = check_rows(Lq, args.check_rows)  # (R,)
                        allowed = torch.arange(Lk)[None, :] <= rows[:, None] + (Lk - Lq)  # (R, Lk) bottom right
                        ours = {m: fn() for m, fn in fns.items() if m != "sdpa-mask"}  # {method: (1, Hq, Lq, D)}
                        check = verify(q, k, v, ours, rows, allowed)
                        bad = [m for m in ours if not check[f"{m}_within_rule"]]
                        if bad:
                            raise SystemExit(f"{', '.join(bad)} outside the tolerance rule at {cname} {dname} "
                                             f"Lq={Lq} Lk={Lk}: {check}")
                        times = best_times(fns, repeats=args.repeats, warmup=False)  # the check was qkv's warm-up
                        base = times.get("sdpa-mask")

                        cells = (_cell(m, times, base, picked, before, mask_mib) for m in args.methods)
                        print(f"| {cname} Hq={Hq} Hkv={Hkv} D={D} | {dname} | {Lq} | {Lk} | "
                              + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the attention core against torch's own SDPA, measured in the same run.

For each dtype, causal or not, and length: the best-of-N forward time (with --backward,
forward plus backward) of torch's F.scaled_dot_product_attention and of qkv's backends
(qkv.bench.timing: a warm-up call, then N samples of each method in turns), each also as a
speed ratio (torch SDPA time / backend time: 1.0 = as fast as torch, 0.5 = half as fast).

Before anything is timed, every method's output is checked against the float64 reference on
--check-rows query rows spread over the sequence, under the tolerance rule of qkv.testing
(qkv.bench.verify, as `qkv bench` checks); with --backward the gradients of q, k and v are
checked too, whole, against float64 autograd of the reference (up to --check-grad-max-l: the
reference's L x L scores in float64 are 8 x H x L^2 bytes). A result outside the rule is
printed as such and its time is not reported as a ratio. Then the peak memory of the tiled
backend, measured in a fresh subprocess as the growth of the process's resident set beyond its
inputs and output. Prints tables (naming the CPU: its model and the flags that matter) and
writes JSON.

    python benchmarks/attention.py                       # the table in docs/benchmarks.md
    python benchmarks/attention.py --lengths 1024 2048 --repeats 2 --memory-lengths 16384
    python benchmarks/attention.py --backends native auto --lengths 4096 16384 --memory-lengths
    python benchmarks/attention.py --backward --backends native tiled --lengths 4096 --memory-lengths
    python benchmarks/attention.py --tiles               # block-size sweep of the tiled backend
    python benchmarks/attention.py --backends native --kv-length 2048 --lengths 256 1024   # cross-attention
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/attention.py --march x86-64-v3 --backends native --memory-lengths

With `--kv-length N` every query length attends to N keys (cross-attention: a decoder's queries against an
encoder's output), without a causal band (SDPA's is_causal aligns top left, qkv bottom right: not the same
attention once Lq != Lk).

With `--march TARGET` the native FA-2 kernels (forward and backward) are built for that target
instead of the machine (-march=native), e.g. x86-64-v3 (AVX2: the kernels' 8-float tiles), to
measure on one CPU what another runs (ATEN_CPU_CAPABILITY=avx2 holds torch's own kernels to AVX2
too). `backend="native"` runs them; `auto` and the sparse backend never pick such a build.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from functools import partial

import torch
import torch.nn.functional as F

import qkv
from qkv._files import write_text
from qkv.bench.kernels import build_for
from qkv.bench.report import cpu_name
from qkv.bench.timing import best_of, best_times, clock
from qkv.bench.verify import check_rows, verify
from qkv.core.engines import flash, native_flash, native_flash_bwd
from qkv.testing import GRAD_FACTOR, within_rule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _methods(q, k, v, causal: bool, backends) -> dict:
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}  # grouped-query heads (--kv-heads)
    return {"torch": partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal, **gqa),
            **{b: partial(qkv.attention, q, k, v, causal=causal, backend=b) for b in backends}}


def _allowed(rows: torch.Tensor, L: int, causal: bool):
    """(R, L) bool: the keys each checked row sees (None: all)."""
    return (torch.arange(L)[None] <= rows[:, None]) if causal else None


def _check_forward(q, k, v, causal: bool, fns: dict, n_rows: int) -> dict:
    """{method: within the rule} of each method's forward output on n_rows sampled rows."""
    rows = check_rows(q.shape[2], n_rows)
    with torch.inference_mode():
        outputs = {name: fn() for name, fn in fns.items()}
    check = verify(q, k, v, {("qkv" if n == "torch" else n): o for n, o in outputs.items()}, rows,
                   _allowed(rows, q.shape[2], causal))
    return {n: bool(check["ok" if n == "torch" else f"{n}_within_rule"]) for n in fns}


def _check_backward(q, k, v, causal: bool, fns: dict) -> dict:
    """{method: within the rule} of each method's gradients of q, k, v (whole) against float64 autograd
    of the reference, bounded by GRAD_FACTOR x the plain same-dtype reference's error."""
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)

    def grads(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        return torch.autograd.grad(out, xs, g.to(out.dtype))

    exact = grads(lambda a, b, c: qkv.attention(a, b, c, causal=causal, backend="reference"),
                  q.double(), k.double(), v.double())
    plain = grads(lambda a, b, c: qkv.attention(a, b, c, causal=causal, backend="reference"), q, k, v)
    ok = {}
    for name in fns:
        if name == "torch":
            got = grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal,
                                                                       enable_gqa=b.shape[1] != a.shape[1]), q, k, v)
        else:
            got = grads(lambda a, b, c, name=name: qkv.attention(a, b, c, causal=causal, backend=name), q, k, v)
        ok[name] = all(within_rule(x, p, e, factor=GRAD_FACTOR)[0] for x, p, e in zip(got, plain, exact))
    return ok


def _train_step(fn, q, k, v, g):
    """One forward and backward of `fn` (a partial over q, k, v made to require grad)."""
    out = fn()
    out.backward(g)
    q.grad = k.grad = v.grad = None


def bench_speed(args) -> list[dict]:
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for causal in (False,) if args.kv_length else (False, True):
            for L in args.lengths:
                gen = torch.Generator().manual_seed(0)
                Lk = args.kv_length or L  # keys: cross-attention's N, else the queries' own
                q, k, v = (torch.randn(args.batch, heads, n, args.dim, generator=gen).to(dtype)  # (B, heads, n, D)
                           for heads, n in ((args.heads, L), (args.kv_heads, Lk), (args.kv_heads, Lk)))
                repeats = args.repeats if L <= 8192 else max(1, args.repeats - 1)
                fns = _methods(q, k, v, causal, args.backends)
                ok = _check_forward(q, k, v, causal, fns, args.check_rows)
                if args.backward:
                    if max(L, Lk) <= args.check_grad_max_l:
                        grad_ok = _check_backward(q, k, v, causal, fns)
                        ok = {n: ok[n] and grad_ok[n] for n in ok}
                    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                    g = torch.randn(qg.shape, generator=gen).to(dtype)
                    fns = {n: partial(_train_step, f, qg, kg, vg, g)
                           for n, f in _methods(qg, kg, vg, causal, args.backends).items()}
                    t = best_times(fns, repeats=repeats)
                else:
                    with torch.inference_mode():
                        t = best_times(fns, repeats=repeats)
                t_torch = t["torch"]
                row = {"dtype": dtype_name, "causal": causal, "L": L, "Lk": Lk, "torch_sdpa_s": t_torch,
                       "torch_within_rule": ok["torch"],
                       "grads_checked": bool(args.backward and max(L, Lk) <= args.check_grad_max_l)}
                for backend in args.backends:
                    row[f"{backend}_s"] = t[backend]
                    row[f"{backend}_ratio"] = t_torch / t[backend]
                    row[f"{backend}_within_rule"] = ok[backend]
                rows.append(row)
                cells = "  ".join(f"{b} {row[b + '_s']:.4f}s ({row[b + '_ratio']:.2f}x"
                                  f"{'' if ok[b] else ', OUTSIDE THE RULE'})" for b in args.backends)
                print(f"  measured {dtype_name} causal={causal} L={L}: torch {t_torch:.4f}s  {cells}",
                      file=sys.stderr, flush=True)
    return rows


_MEMORY_CHILD = r"""
import resource, sys, torch, qkv
L, H, D = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
causal, backend, dtype = sys.argv[4] == "1", sys.argv[5], getattr(torch, sys.argv[6])
torch.manual_seed(0)
q, k, v = (torch.randn(1, H, L, D, dtype=dtype) for _ in range(3))
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
base = rss()
with torch.inference_mode():
    out = qkv.attention(q, k, v, causal=causal, backend=backend)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
extra = peak - base - out.numel() * out.element_size()
print(extra, q.numel() * q.element_size() * 4)
"""


def bench_memory(args) -> list[dict]:
    rows = []
    for L in args.memory_lengths:
        for backend in ("tiled", "sdpa"):
            t0 = clock()
            proc = subprocess.run(
                [sys.executable, "-c", _MEMORY_CHILD, str(L), str(args.heads), str(args.dim), "1", backend, "float32"],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"memory run failed for L={L} backend={backend}")
            extra, io_bytes = (int(x) for x in proc.stdout.split())
            rows.append({"L": L, "backend": backend, "causal": True, "dtype": "float32",
                         "extra_bytes": extra, "inputs_and_output_bytes": io_bytes,
                         "seconds": clock() - t0})
            print(f"  memory L={L} {backend}: {extra / 2**20:.0f} MiB beyond inputs and output",
                  file=sys.stderr, flush=True)
    return rows


def bench_tiles(args) -> None:
    L = args.lengths[0] if args.lengths else 4096
    q, k, v = (torch.randn(args.batch, args.heads, L, args.dim) for _ in range(3))
    print(f"\nTiled block-size sweep, L={L}, float32: speed ratio against torch SDPA\n")
    print("| causal | " + " | ".join(f"{bq}x{bk}" for bq, bk in TILE_GRID) + " |")
    print("|---|" + "---|" * len(TILE_GRID))
    for causal in (False, True):
        with torch.inference_mode():
            t_torch = best_of(lambda causal=causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                              repeats=args.repeats)
            cells = []
            for bq, bk in TILE_GRID:
                with flash.block_sizes(bq, bk):
                    t = best_of(lambda causal=causal: qkv.attention(q, k, v, causal=causal, backend="tiled"),
                                repeats=args.repeats)
                cells.append(t_torch["seconds"] / t["seconds"])
        print(f"| {causal} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


TILE_GRID = [(64, 512), (128, 256), (128, 512), (256, 256), (256, 512), (512, 512), (256, 1024), (1024, 1024)]


def use_kernels_built_for(march: str) -> None:
    """Make the FA-2 kernels built for `march` (qkv.bench.kernels.build_for) the native backend's in this
    process; exits with the compiler's message when a build fails (an unknown target, no compiler)."""
    try:
        fwd = native_flash.typed(build_for("flash_fwd_kernel", march))
        bwd = native_flash_bwd.typed(build_for("flash_bwd_kernel", march))
    except RuntimeError as e:
        sys.exit(f"--march {march}: {e}")
    if not fwd.fma:
        sys.exit(f"--march {march}: the kernels built for it have no fused multiply-add (FMA), and backend='native' "
                 "refuses such a build (its products miss the tolerance rule); choose a target with FMA: x86-64-v3")
    native_flash.lib = lambda: fwd
    native_flash_bwd.lib = lambda: bwd


def kernel_build(march) -> str:
    """What the native FA-2 kernels of this process were built for, in words."""
    kernel, bwd = native_flash.lib(), native_flash_bwd.lib()
    if kernel is None:
        return "unavailable"
    return (f"-march={march or 'native'}, {kernel.vector_width}-float vectors, FMA: {'yes' if kernel.fma else 'no'}, "
            f"bfloat16 dot product: {'yes' if kernel.bf16_dot else 'no'}, bfloat16 on AMX tiles: forward "
            f"{_AMX_WORDS.get(kernel.amx, kernel.amx)}, backward "
            f"{_AMX_WORDS.get(bwd.amx, bwd.amx) if bwd is not None else 'unavailable'}")


# A kernel's amx (qkv.core._kernels.amx_state, csrc/qkv_amx.h) in words.
_AMX_WORDS = {2: "yes", 1: "a software model (a test build)", 0: "no", -1: "no (Linux refused the tile data)",
              -2: "no (the tiles failed the self-check)"}


def print_tables(speed: list[dict], memory: list[dict], args) -> None:
    what = "Forward + backward" if args.backward else "Forward"
    kv = f", Hkv={args.kv_heads}" if args.kv_heads != args.heads else ""
    kv += f", keys Lk={args.kv_length} for every query length L (cross-attention)" if args.kv_length else ""
    print(f"\n{what} time, B={args.batch}, H={args.heads}{kv}, D={args.dim}; ratio = torch SDPA time / qkv time "
          f"(best of {args.repeats}; {torch.get_num_threads()} threads, torch {torch.__version__} (its CPU kernels: "
          f"{torch.backends.cpu.get_cpu_capability()}); {cpu_name()}; native kernels: {kernel_build(args.march)}). "
          f"Every output checked against float64 on {args.check_rows} rows under the tolerance rule before timing"
          + (f"; gradients checked whole up to L={args.check_grad_max_l}" if args.backward else "") + "\n")
    head = "| dtype | causal | L | torch SDPA | " + " | ".join(f"qkv {b}" for b in args.backends) + " |"
    print(head)
    print("|" + "---|" * (3 + 1 + len(args.backends)))
    for r in speed:
        cells = " | ".join(f"{r[b + '_s'] * 1e3:.1f} ms " + (f"({r[b + '_ratio']:.2f}x)" if r[b + "_within_rule"]
                                                              else "(outside the tolerance rule)")
                           for b in args.backends)
        print(f"| {r['dtype']} | {r['causal']} | {r['L']} | {r['torch_sdpa_s'] * 1e3:.1f} ms | {cells} |")
    if memory:
        print(f"\nPeak memory beyond inputs and output, causal float32 forward, B=1, H={args.heads}, D={args.dim}\n")
        print("| L | backend | extra memory | inputs + output |")
        print("|---|---|---|---|")
        for r in memory:
            print(f"| {r['L']} | {r['backend']} | {r['extra_bytes'] / 2**20:.0f} MiB | "
                  f"{r['inputs_and_output_bytes'] / 2**20:.0f} MiB |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--backends", nargs="+", default=["auto", "tiled"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads, grouped-query attention (default: --heads); the speed tables only")
    p.add_argument("--kv-length", type=int, default=None, metavar="N",
                   help="cross-attention: N keys for every query length, no causal rows; the speed tables only")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-lengths", type=int, nargs="*", default=[16384, 65536])
    p.add_argument("--json", default="benchmarks/results/attention.json", help="where to write the results")
    p.add_argument("--tiles", action="store_true", help="only sweep the tiled backend's block sizes")
    p.add_argument("--backward", action="store_true", help="time forward + backward (a training step's attention)")
    p.add_argument("--check-rows", type=int, default=64, help="query rows checked against float64 before timing")
    p.add_argument("--check-grad-max-l", type=int, default=4096,
                   help="with --backward, check the gradients whole against float64 up to this length")
    p.add_argument("--march", metavar="TARGET",
                   help="build the native kernels for this -march target (e.g. x86-64-v3: AVX2 and FMA) instead of the "
                        "machine's (native): the tiles of a CPU without AVX-512, measured on this one")
    args = p.parse_args(argv)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.kv_heads < 1 or args.heads % args.kv_heads:
        p.error(f"--kv-heads must divide --heads ({args.heads}), got {args.kv_heads}")
    if args.kv_length is not None and args.kv_length < 1:
        p.error(f"--kv-length must be at least 1, got {args.kv_length}")
    if args.march:
        use_kernels_built_for(args.march)
    if args.tiles:
        bench_tiles(args)
        return 0
    speed = bench_speed(args)
    memory = bench_memory(args) if args.memory_lengths else []
    print_tables(speed, memory, args)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    write_text(args.json, json.dumps({"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                                      "machine": cpu_name(), "native_kernels": kernel_build(args.march),
                                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                                      "speed": speed, "memory": memory}, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

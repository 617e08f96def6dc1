"""Long context on one machine: peak memory of attention at length 131072, and of chunked prefill.

1. `qkv.attention(q, k, v, causal=True)` with B=1, H=8, D=64, float32 at each --lengths
   (default 131072), backend "auto" and "tiled": the peak memory beyond inputs and output
   (issue 6's target: at most 1 GiB) and the time of one forward.
2. A prompt of each --prefill-lengths tokens (default 32768) run through a small random
   Llama-family decoder into its KV cache, in chunks of --chunks tokens (0 = one pass): the
   peak memory beyond the weights and the filled cache, and the time.

Every case runs in a fresh Python process. It allocates its inputs (and the model and an
empty cache), records its resident set, resets the kernel's peak-RSS mark (writing 5 to
/proc/self/clear_refs), runs once, and reads the peak (VmHWM in /proc/self/status). Peak
memory beyond inputs and output = peak - resident set before the call - the bytes of the
result (the attention output; for prefill the cache's keys and values, which the call fills).
If the kernel refuses the reset, the process's lifetime peak (ru_maxrss) is used instead, an
upper bound. The time is one call's, on the clock of qkv.bench.timing. Processes run with
MALLOC_MMAP_THRESHOLD_=131072 unless --malloc-default, so
glibc gives freed tiles back instead of keeping them in its heap.

    python benchmarks/long_context.py                     # the figures in docs/benchmarks.md (several minutes)
    python benchmarks/long_context.py --lengths 16384 --prefill-lengths 8192     # quick
    python benchmarks/long_context.py --no-prefill --backends tiled
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

GiB = 2 ** 30
MiB = 2 ** 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_attention(L: int, heads: int, dim: int, backend: str) -> dict:
    import torch

    import qkv
    from qkv.bench.timing import clock

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, L, dim) for _ in range(3))  # (B, H, L, D) each
    with torch.inference_mode():
        qkv.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=True, backend=backend)  # load kernels
    base = _rss()
    reset = _reset_peak()
    t0 = clock()
    with torch.inference_mode():
        out = qkv.attention(q, k, v, causal=True, backend=backend)  # (B, H, L, D)
    seconds = clock() - t0
    peak = _peak(reset)
    out_bytes = out.numel() * out.element_size()
    from qkv.core.api import choose_backend
    from qkv.core.spec import build_spec

    chosen = choose_backend(build_spec(q, k, v, causal=True), q, False) if backend == "auto" else backend
    return {"case": "attention", "L": L, "backend": backend, "ran": chosen, "seconds": seconds,
            "extra_bytes": peak - base - out_bytes, "inputs_bytes": 3 * out_bytes, "output_bytes": out_bytes,
            "peak_reset": reset}


def child_prefill(L: int, chunk: int, layers: int) -> dict:
    import torch

    from qkv.bench.timing import clock
    from qkv.models import LlamaConfig, LlamaForCausalLM
    from qkv.models.generation import prefill_chunks

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=L + 8,
                      rope_theta=500000.0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (1, L))  # (1, L)
    with torch.inference_mode():
        model.hidden(ids[:, :64], cache=model.new_cache(1, 64))  # load kernels
        cache = model.new_cache(1, capacity=L)  # untouched until filled
        cache_bytes = 2 * layers * L * cfg.kv_heads * cfg.dim_per_head * 4
        base = _rss()
        reset = _reset_peak()
        t0 = clock()
        if chunk:
            for chunk_h in prefill_chunks(model, ids, chunk, cache=cache):
                h = chunk_h  # as generate: only the last chunk's states are kept
        else:
            h = model.hidden(ids, cache=cache)  # (1, L, E)
        token = model.logits(h[:, -1]).argmax(-1)
        seconds = clock() - t0
    peak = _peak(reset)
    assert cache.length == L and token.shape == (1,)
    return {"case": "prefill", "L": L, "chunk": chunk, "layers": layers, "seconds": seconds,
            "extra_bytes": peak - base - cache_bytes, "cache_bytes": cache_bytes, "peak_reset": reset,
            "config": f"Llama-family, {layers} layers x 1024, 16 q / 4 kv heads (D=64), SwiGLU 2816, vocab 32000, "
                      "random weights"}


def run_child(args_list: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args_list],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"case {args_list} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=[131072], help="attention lengths")
    p.add_argument("--backends", nargs="+", default=["auto", "tiled"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=[32768])
    p.add_argument("--chunks", type=int, nargs="+", default=[2048, 0], help="prefill chunk sizes (0 = one pass)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers for the prefill cases")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--malloc-default", action="store_true", help="leave glibc's mmap threshold alone")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        row = (child_attention(int(rest[0]), int(rest[1]), int(rest[2]), rest[3]) if kind == "attention"
               else child_prefill(int(rest[0]), int(rest[1]), int(rest[2])))
        print(json.dumps(row))
        return 0

    env = dict(os.environ)
    if not args.malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    import torch

    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
              f"load average {os.getloadavg()[0]:.2f} at the start")
    rows = []
    for L in args.lengths:
        for backend in args.backends:
            rows.append(run_child(["attention", str(L), str(args.heads), str(args.dim), backend], env))
            r = rows[-1]
            print(f"  attention L={L} {backend} ({r['ran']}): {r['extra_bytes'] / MiB:.0f} MiB, {r['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
    if not args.no_prefill:
        for L in args.prefill_lengths:
            for chunk in args.chunks:
                rows.append(run_child(["prefill", str(L), str(chunk), str(args.layers)], env))
                r = rows[-1]
                print(f"  prefill L={L} chunk={chunk or 'one pass'}: {r['extra_bytes'] / MiB:.0f} MiB, "
                      f"{r['seconds']:.1f} s",
                      file=sys.stderr, flush=True)

    print(f"\n{header}")
    att = [r for r in rows if r["case"] == "attention"]
    if att:
        print(f"\nqkv.attention, causal, float32, B=1, H={args.heads}, D={args.dim}: one forward, each in a fresh "
              f"process; peak memory beyond inputs and output (target <= 1 GiB)\n")
        print("| L | backend | ran on | peak beyond inputs + output | inputs + output | time | <= 1 GiB |")
        print("|---:|---|---|---:|---:|---:|---|")
        for r in att:
            print(f"| {r['L']:,} | {r['backend']} | {r['ran']} | {r['extra_bytes'] / MiB:.0f} MiB | "
                  f"{(r['inputs_bytes'] + r['output_bytes']) / MiB:.0f} MiB | {r['seconds']:.1f} s | "
                  f"{'yes' if r['extra_bytes'] <= GiB else 'NO'} |")
    pre = [r for r in rows if r["case"] == "prefill"]
    if pre:
        print(f"\nPrefill of a random prompt into the KV cache: {pre[0]['config']}; float32, batch 1; "
              "peak memory beyond the weights and the filled cache\n")
        print("| prompt | prefill | peak beyond weights + cache | cache | time |")
        print("|---:|---|---:|---:|---:|")
        for r in pre:
            how = f"chunks of {r['chunk']}" if r["chunk"] else "one pass"
            print(f"| {r['L']:,} | {how} | {r['extra_bytes'] / MiB:.0f} MiB | {r['cache_bytes'] / MiB:.0f} MiB | "
                  f"{r['seconds']:.1f} s |")
    if not all(r["peak_reset"] for r in rows):
        print("\n(the kernel refused to reset the peak-RSS mark: figures are lifetime peaks, upper bounds)")
    if args.json:
        from qkv._files import write_text

        kept = {k: v for k, v in vars(args).items() if k != "child"}
        write_text(args.json, json.dumps({"header": header, "args": kept, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ring attention demo: one long sequence split across the processes of torchrun.

    torchrun --nproc-per-node 4 -m qkv.distributed.demo --seq-len 65536
    python -m qkv.distributed.demo --seq-len 4096        # one process, same code path

Each rank makes only its own shard of q, k and v (zigzag layout by default), runs ring
attention (Liu et al., 2023; zigzag after ring-flash-attention / Striped Attention), and
rank 0 prints every rank's time, attended pairs and peak memory, and, when the length
allows one (--check-max-len), the error against a single-process qkv.attention on the
gathered sequence. gloo on CPU, NCCL when CUDA is available.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

import qkv
import qkv.distributed as qd
from qkv.distributed._layout import attended_pairs
from qkv.distributed.memory import PeakRSS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qkv.distributed.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=65536, help="global sequence length (multiple of 2P for zigzag)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA: only these travel)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layout", choices=qd.LAYOUTS, default="zigzag")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="bidirectional attention")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32")
    p.add_argument("--backward", action="store_true", help="also time the backward pass")
    p.add_argument("--check-max-len", type=int, default=8192,
                   help="compare with single-process qkv.attention when --seq-len is at most this")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / local ranks)")
    p.add_argument("--timeout", type=float, default=qd.DEFAULT_TIMEOUT, help="seconds before a silent peer is an error")
    p.add_argument("--seed", type=int, default=0)
    return p


def _init(timeout: float) -> None:
    if "RANK" in os.environ:  # under torchrun: the environment carries the rendezvous
        qd.init_process_group(timeout=timeout)
        return
    with socket.socket() as s:  # plain `python -m`: a group of one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    qd.init_process_group(init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0, timeout=timeout)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _init(args.timeout)
    rank, P = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", P))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local))
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    N, B, Hq, Hkv, D = args.seq_len, args.batch, args.heads, args.kv_heads, args.head_dim
    pieces = 2 * P if args.layout == "zigzag" else P
    if N % pieces:
        if rank == 0:
            print(f"--seq-len {N} must be a multiple of {pieces} for layout={args.layout} with P={P}", file=sys.stderr)
        return 2
    L = N // P

    # Each rank makes only its shard: the global sequence is the unshard of all of them.
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    q, k, v = (torch.randn(B, h, L, D, generator=gen).to(device=device, dtype=dtype) for h in (Hq, Hkv, Hkv))
    q.requires_grad_(args.backward), k.requires_grad_(args.backward), v.requires_grad_(args.backward)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    dist.barrier()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = qd.ring_attention(q, k, v, causal=args.causal, layout=args.layout, timeout=args.timeout)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_fwd = time.perf_counter() - t0
        t_bwd = float("nan")
        if args.backward:
            t0 = time.perf_counter()
            out.backward(torch.ones_like(out))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_bwd = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else mem.peak
    stats = [None] * P
    dist.all_gather_object(stats, (rank, t_fwd, t_bwd, peak))
    pairs = attended_pairs(args.layout, args.causal, P, L)

    err_line = f"single-process check skipped (--seq-len {N} > --check-max-len {args.check_max_len})"
    if N <= args.check_max_len:
        with torch.no_grad():
            shards = [torch.empty_like(t) for t in (q, k, v, out) for _ in range(P)]
            for i, t in enumerate((q, k, v, out)):
                dist.all_gather(shards[i * P:(i + 1) * P], t.detach().contiguous())
        if rank == 0:
            fq, fk, fv, fout = (qd.unshard(shards[i * P:(i + 1) * P], layout=args.layout) for i in range(4))
            single = qkv.attention(fq, fk, fv, causal=args.causal)
            err = (fout.double() - single.double()).abs().max().item()
            err_line = f"max |ring - single-process qkv.attention| = {err:.3e} ({args.dtype})"

    if rank == 0:
        print(f"ring attention: P={P} ({dist.get_backend()}), seq-len {N} = {P} x {L} local tokens, "
              f"layout={args.layout}, causal={args.causal}, B={B} Hq={Hq} Hkv={Hkv} D={D} {args.dtype}, "
              f"{torch.get_num_threads()} thread(s)/rank")
        mem_name = "peak GPU MiB" if device.type == "cuda" else "peak RSS +MiB"
        print(f"{'rank':>4} {'attended pairs':>15} {'forward s':>10} {'backward s':>11} {mem_name:>14}")
        for r, tf, tb, pk in stats:
            tb_s = f"{tb:11.3f}" if tb == tb else f"{'-':>11}"
            print(f"{r:>4} {pairs[r]:>15,} {tf:10.3f} {tb_s} {pk / 2**20:14.1f}")
        print(err_line)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

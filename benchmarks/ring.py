"""Ring attention (issue 7): the longest sequence P processes handle in a fixed memory per process.

For P = 1, 2, 4 gloo processes on this machine (127.0.0.1, one torch thread each), the
sequence length doubles from --start until a rank's peak RSS increase passes --budget-mib
(a watchdog thread stops that run at once) or --cap is reached, then 1.5x the last length
that fitted is tried once. Each (P, length) runs in
fresh processes, so one measurement cannot inherit another's allocator state. Reported:
the longest length within the budget, the forward time there (slowest rank; one call, on the
clock of qkv.bench.timing), the peak RSS
increase per rank there (largest rank; shards, receive buffers, accumulators and the tiled
engine's tiles), and both at one common length (--common-len) to show memory per rank
falling as ~1/P. Prints a markdown table and writes JSON.

    python benchmarks/ring.py                           # the table in docs/benchmarks.md
    python benchmarks/ring.py --procs 1 2 --budget-mib 64 --cap 16384   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue as queue_mod
import signal
import socket
import sys
import time

import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, P, port, N, cfg, results):
    torch.set_num_threads(1)
    import torch.distributed as dist

    import qkv.distributed as qd
    from qkv.bench.timing import clock
    from qkv.distributed.memory import PeakRSS

    qd.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=P, rank=rank, timeout=600)
    B, H, Hkv, D = cfg["B"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    warm = torch.randn(1, 1, 2 * P * 4, 8)
    qd.ring_attention(warm, warm, warm, causal=True)  # gloo pairs and code paths warm

    def over_budget(peak):
        results.put((rank, "over", peak))
        results.close()
        results.join_thread()
        os._exit(0)

    L = N // P
    dist.barrier()
    with torch.no_grad(), PeakRSS(limit=cfg["budget"], on_exceed=over_budget) as mem:
        gen = torch.Generator().manual_seed(rank)
        q = torch.randn(B, H, L, D, generator=gen)  # (B, H, L_local, D), this rank's shard only
        k = torch.randn(B, Hkv, L, D, generator=gen)  # (B, Hkv, L_local, D)
        v = torch.randn(B, Hkv, L, D, generator=gen)
        dist.barrier()
        t0 = clock()
        out = qd.ring_attention(q, k, v, causal=True, layout="zigzag", timeout=600)
        seconds = clock() - t0
        del out, q, k, v
    if mem.peak > cfg["budget"]:
        over_budget(mem.peak)
    results.put((rank, "ok", (seconds, mem.peak)))
    results.close()
    results.join_thread()
    dist.barrier()
    os._exit(0)


def run_one(P: int, N: int, cfg: dict, timeout: float = 900.0):
    """(status, slowest forward s, largest peak RSS increase in bytes) of one launch."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, P, port, N, cfg, results), daemon=True) for r in range(P)]
    for p in procs:
        p.start()
    got, status = {}, "ok"
    deadline = time.monotonic() + timeout
    try:
        while len(got) < P:
            try:
                rank, st, payload = results.get(timeout=1.0)
            except queue_mod.Empty:
                if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                    status = "failed"
                    break
                continue
            if st == "over":  # one rank passed the budget: the length does not fit
                status, got = "over", {rank: (float("nan"), payload)}
                break
            got[rank] = payload
    finally:
        for p in procs:
            if status != "ok" and p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=30)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
    times = [t for t, _ in got.values()]
    peaks = [m for _, m in got.values()]
    return status, (max(times) if times else float("nan")), (max(peaks) if peaks else 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--budget-mib", type=float, default=128.0, help="peak RSS increase allowed per process")
    p.add_argument("--start", type=int, default=2048, help="first sequence length (doubled each time)")
    p.add_argument("--cap", type=int, default=65536, help="longest length tried")
    p.add_argument("--common-len", type=int, default=8192, help="length at which every P is compared")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2, help="GQA: only these heads travel")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--json", default="benchmarks/results/ring.json")
    p.add_argument("--mmap-threshold", type=int, default=131072,
                   help="glibc MALLOC_MMAP_THRESHOLD_ for the ranks (0: glibc's dynamic default, which "
                        "keeps freed tiles in the heap and inflates RSS by tens of MiB)")
    args = p.parse_args(argv)
    if args.mmap_threshold:  # read by glibc when each spawned rank starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    cfg = {"B": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
           "budget": int(args.budget_mib * 2**20), "malloc_mmap_threshold": args.mmap_threshold}
    print(f"ring attention, causal, zigzag, float32, B={args.batch} Hq={args.heads} Hkv={args.kv_heads} "
          f"D={args.head_dim}; budget {args.budget_mib:g} MiB peak RSS increase per process; gloo on "
          f"127.0.0.1, 1 thread per process, {os.cpu_count()} cores, MALLOC_MMAP_THRESHOLD_="
          f"{args.mmap_threshold or 'glibc default'}")
    rows, runs = [], []
    for P in args.procs:
        N, best, common, refined = args.start, None, None, False
        while N <= args.cap:
            t_start = time.monotonic()
            status, sec, peak = run_one(P, N, cfg)
            runs.append({"P": P, "N": N, "status": status, "forward_s": sec, "peak_rss_mib": peak / 2**20})
            print(f"  P={P} N={N:>7}: {status:>6}  forward {sec:8.3f} s  peak RSS +{peak / 2**20:7.1f} MiB/rank"
                  f"  ({time.monotonic() - t_start:.0f} s with start-up)", flush=True)
            if status == "ok":
                best = (N, sec, peak)
                if N == args.common_len:
                    common = (sec, peak)
            if refined or best is None:
                break
            if status != "ok":  # one step of refinement between the last fit and the first miss
                N, refined = best[0] * 3 // 2, True
                continue
            N *= 2
        capped = best is not None and best[0] * 2 > args.cap
        rows.append({"P": P, "longest": best[0] if best else 0, "capped": capped,
                     "forward_s": best[1] if best else float("nan"),
                     "peak_rss_mib": best[2] / 2**20 if best else float("nan"),
                     "common_forward_s": common[0] if common else float("nan"),
                     "common_peak_rss_mib": common[1] / 2**20 if common else float("nan")})

    _print_tables(rows, runs, args.budget_mib, args.common_len)
    from qkv._files import write_text

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    write_text(args.json, json.dumps({"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                      "config": cfg, "common_len": args.common_len, "rows": rows, "runs": runs},
                                     indent=1))
    print(f"\nwrote {args.json}")
    return 0


def _print_tables(rows, runs, budget_mib, n0) -> None:
    print()
    print(f"| P | longest length within {budget_mib:g} MiB/process | tokens per rank | forward s (slowest rank) "
          f"| peak RSS +MiB per rank | at N={n0}: forward s | at N={n0}: peak RSS +MiB per rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        longest = f"{r['longest']:,}" + (" (cap)" if r["capped"] else "")
        print(f"| {r['P']} | {longest} | {r['longest'] // r['P']:,} | {r['forward_s']:.2f} | "
              f"{r['peak_rss_mib']:.0f} | {r['common_forward_s']:.2f} | {r['common_peak_rss_mib']:.0f} |")
    # Every measured (P, N): memory per rank at one length, read down a column, falls with P.
    lengths = sorted({r["N"] for r in runs})
    procs = sorted({r["P"] for r in runs})
    cell = {(r["P"], r["N"]): r for r in runs}
    print()
    print("peak RSS increase per rank, MiB (forward s, slowest rank); 'over' = stopped past the budget")
    print("| P | " + " | ".join(f"N={n:,}" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for P in procs:
        cells = []
        for n in lengths:
            r = cell.get((P, n))
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(f"{r['peak_rss_mib']:.0f} ({r['forward_s']:.2f} s)")
            else:
                cells.append(f"{r['status']} (>{r['peak_rss_mib']:.0f})" if r["status"] == "over" else r["status"])
        print(f"| {P} | " + " | ".join(cells) + " |")
    # The part of a rank's memory that grows with the sequence: the slope between the two
    # longest lengths that fit, in KiB per token of the *whole* sequence (ideal: falls as 1/P).
    print()
    print("| P | memory per rank that grows with the sequence: KiB per token of the whole sequence | x P |")
    print("|---|---|---|")
    for P in procs:
        ok = sorted(r["N"] for r in runs if r["P"] == P and r["status"] == "ok")
        if len(ok) >= 2:
            a, b = cell[(P, ok[-2])], cell[(P, ok[-1])]
            slope = (b["peak_rss_mib"] - a["peak_rss_mib"]) * 1024 / (b["N"] - a["N"])
            print(f"| {P} | {slope:.2f} (from N={a['N']:,} to {b['N']:,}) | {slope * P:.2f} |")


def reprint(path: str) -> int:
    """Print the tables of a saved JSON again (python benchmarks/ring.py --reprint FILE)."""
    with open(path) as f:
        saved = json.load(f)
    print(f"# {saved['command']}  ({saved['machine']}, torch {saved['torch']})")
    budget = saved["config"]["budget"] / 2**20
    _print_tables(saved["rows"], saved["runs"], budget, saved.get("common_len", 8192))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reprint":
        sys.exit(reprint(sys.argv[2]))
    sys.exit(main())

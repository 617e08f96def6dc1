"""Packed documents of mixed lengths: qkv.varlen_attention vs a padded batch through torch SDPA (issue 18).

    .venv/bin/python benchmarks/varlen.py                  # the table of docs/benchmarks.md
    .venv/bin/python benchmarks/varlen.py --total 4096 --max-len 512 --repeats 2   # a quick look

Documents of mixed lengths, `--total` tokens in all, the longest `--max-len`; H=8, D=64,
float32, on the CPU. The padded batch is what code without a varlen kernel does: every
document padded to the longest, shape (n_docs, H, max_len, D), through
torch.nn.functional.scaled_dot_product_attention (causal: `is_causal=True`, which for right
padding is exact on the real rows; not causal: a (n_docs, 1, 1, max_len) key-padding mask);
the padded rows' outputs are thrown away. The padding share is 1 - total / (n_docs *
max_len); the lengths are drawn (seeded) to reach it. qkv packs the documents into one
sequence and calls varlen_attention: its block mask is rebuilt inside every timed call (as
when each training batch brings new offsets). Before timing, each case checks the two agree on
every real row. Two qkv columns: varlen_attention's default (backend="auto": documents of
256 tokens or more alone through attention(), the rest packed on the block-sparse engine)
and backend="sparse" (every document in one packed row on the block-sparse engine). Times:
the best of `--repeats` samples taken in turns (qkv.bench.timing); "fwd+bwd" includes the
gradients of q, k and v. ratio = SDPA time / qkv time (> 1: qkv faster).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

import qkv
from qkv._files import write_text
from qkv.bench.timing import best_times
from qkv.core import calls

H, D = 8, 64


def doc_lengths(total: int, max_len: int, padding: float, seed: int = 0) -> list[int]:
    """Lengths summing to about `total`, the longest max_len, whose padded batch pads `padding` of it.

    u ~ uniform(0, 1] raised to a power a, bisected so that mean(u^a) = 1 - padding; one
    document has the full max_len, so the padded width is max_len.
    """
    g = torch.Generator().manual_seed(seed)
    n = max(2, round(total / ((1 - padding) * max_len)))
    u = torch.rand(n, generator=g, dtype=torch.float64).clamp(min=1e-3)
    u[0] = 1.0
    lo, hi = 1e-3, 1e3
    for _ in range(100):  # mean(u^a) falls as a grows
        a = (lo * hi) ** 0.5
        lo, hi = (a, hi) if float((u ** a).mean()) > 1 - padding else (lo, a)
    lengths = (u ** a * max_len).round().clamp(1, max_len).long().tolist()
    lengths[0] = max_len
    return lengths


def padded(x: torch.Tensor, lengths: list[int], max_len: int) -> torch.Tensor:
    """(total, H, D) packed -> (n, H, max_len, D), zeros after each document."""
    out = x.new_zeros(len(lengths), max_len, *x.shape[1:])  # (n, max_len, H, D)
    start = 0
    for i, n in enumerate(lengths):
        out[i, :n] = x[start:start + n]
        start += n
    return out.transpose(1, 2)  # (n, H, max_len, D)


def unpadded(y: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(n, H, max_len, D) -> (total, H, D): the real rows, packed."""
    return torch.cat([y[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])  # (total, H, D)


def run_case(total: int, max_len: int, padding: float, causal: bool, repeats: int) -> dict:
    lengths = doc_lengths(total, max_len, padding)
    tot = sum(lengths)
    share = 1 - tot / (len(lengths) * max_len)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    q, k, v, up = (torch.randn(tot, H, D, generator=gen) for _ in range(4))
    keep = torch.zeros(len(lengths), 1, 1, max_len, dtype=torch.bool)  # (n, 1, 1, max_len) key padding
    for i, n in enumerate(lengths):
        keep[i, ..., :n] = True
    up_p = padded(up, lengths, max_len)

    def varlen(backend):
        def ours(qs, ks, vs):
            calls._VARLEN_MASKS.clear()  # a new batch: the block mask is built inside the timed call
            return qkv.varlen_attention(qs, ks, vs, cu, cu, max_len, max_len, causal=causal, backend=backend)
        return ours

    ours, packed = varlen("auto"), varlen("sparse")

    def theirs(qs, ks, vs):
        # padding is part of what the padded path costs: done inside the timed call
        qp, kp, vp = (padded(x, lengths, max_len) for x in (qs, ks, vs))
        if causal:
            return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep)

    # correctness first: both agree on every real row (float32 rounding only)
    ref = unpadded(theirs(q, k, v), lengths)
    err = max((fn(q, k, v) - ref).abs().max().item() for fn in (ours, packed))
    assert err < 1e-4, f"varlen and padded SDPA disagree by {err:.2e}"

    def fwdbwd(fn, padded_out):
        def run():
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            out = fn(*xs)
            torch.autograd.grad(out, xs, up_p if padded_out else up)
        return run

    with torch.no_grad():
        fwd = best_times({"qkv": lambda: ours(q, k, v), "packed": lambda: packed(q, k, v),
                          "sdpa": lambda: theirs(q, k, v)}, repeats=repeats)
    both = best_times({"qkv": fwdbwd(ours, False), "packed": fwdbwd(packed, False), "sdpa": fwdbwd(theirs, True)},
                      repeats=repeats)
    return {"total": tot, "docs": len(lengths), "max_len": max_len, "padding_%": 100 * share, "causal": causal,
            "check_max_abs_err": err, "qkv_fwd_s": fwd["qkv"], "packed_fwd_s": fwd["packed"],
            "sdpa_fwd_s": fwd["sdpa"], "qkv_fwdbwd_s": both["qkv"], "packed_fwdbwd_s": both["packed"],
            "sdpa_fwdbwd_s": both["sdpa"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total", type=int, default=16384, help="tokens in all (default 16384)")
    ap.add_argument("--max-len", type=int, default=2048, help="the longest document (default 2048)")
    ap.add_argument("--padding", type=float, nargs="+", default=[0.1, 0.3, 0.45, 0.6])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; H={H}, D={D}, float32, "
          f"total ~{args.total} tokens, longest {args.max_len}")
    print()
    print("| causal | padding | docs | fwd: varlen auto | fwd: varlen sparse | fwd: padded SDPA | ratio auto "
          "| ratio sparse | fwd+bwd: varlen auto | fwd+bwd: varlen sparse | fwd+bwd: padded SDPA | ratio auto "
          "| ratio sparse |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for causal in (True, False):
        for p in args.padding:
            r = run_case(args.total, args.max_len, p, causal, args.repeats)
            rows.append(r)
            cells = [f"{'yes' if causal else 'no'}", f"{r['padding_%']:.0f}%", str(r["docs"])]
            for mode in ("fwd", "fwdbwd"):
                t_auto, t_packed, t_sdpa = (r[f"{w}_{mode}_s"] for w in ("qkv", "packed", "sdpa"))
                cells += [f"{t_auto:.3f} s", f"{t_packed:.3f} s", f"{t_sdpa:.3f} s", f"{t_sdpa / t_auto:.2f}x",
                          f"{t_sdpa / t_packed:.2f}x"]
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        write_text(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

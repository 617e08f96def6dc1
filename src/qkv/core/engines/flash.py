"""The FlashAttention-2 block engine: tiled exact attention in PyTorch, and its lse merge.

Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", Algorithms 1 (forward) and 2 (backward). Queries are cut into blocks of
`block_q` rows, keys and values into blocks of `block_k`; for each query block a running
row maximum `row_max`, running denominator `row_sum` and output accumulator `acc` are
updated block by block (online softmax, Milakov & Gimelshein, 2018), so memory grows
linearly in length. The backward pass recomputes each block's probabilities from the saved
lse instead of storing them, so training memory is linear too.

Blocks that the causal/window band excludes are skipped; blocks it covers whole are
computed without any mask. All arithmetic is float32 (float64 for float64 inputs).
Grouped-query heads are handled by folding the G query heads of one key/value head into
the rows of a block, so keys and values are never copied per query head.

Partial results over disjoint keys are merged through their running max in one place,
`merge_states` (the online softmax of Milakov & Gimelshein, 2018, "Online normalizer
calculation for softmax"), which the decode engines, the sdpa backend's causal split and
ring attention use through it (`merge_lse_` for results already normalised). A `Plan` says
which key blocks each query block visits: the tiled backend's band, the sparse backend's
BlockMask, the decode backend's one query block. Layout: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

from .. import _memory
from ..spec import AttentionSpec, compute_dtype, index_grid

# Target number of score entries (B x heads x rows x keys) in one block: large enough that
# each matrix product is efficient and Python's per-block cost is amortised, small enough
# (4 MiB in float32) that a block stays near the cache. Measured on a 2-core AVX-512 CPU
# (block-size sweep in docs/benchmarks.md).
_BLOCK_ENTRIES = 1 << 20
_MAX_BLOCK_Q = 256
_override: Optional[tuple[int, int]] = None


@contextlib.contextmanager
def block_sizes(block_q: int, block_k: int) -> Iterator[None]:
    """Force the tile sizes (tests use tiny tiles to exercise many blocks and ragged edges)."""
    global _override
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1; got block_q={block_q}, block_k={block_k}")
    previous, _override = _override, (int(block_q), int(block_k))
    try:
        yield
    finally:
        _override = previous


def choose_blocks(spec: AttentionSpec) -> tuple[int, int]:
    """(block_q, block_k) for these sizes.

    Keys in blocks of 512, or 256 under a causal/window band (narrower blocks waste less
    work on the diagonal); query rows as many as fill the block budget, a power of two
    between 16 and 256.
    """
    if _override is not None:
        return _override
    rows = spec.B * spec.Hq
    block_k = max(1, min(spec.Lk, 256 if spec.banded else 512))
    block_q = max(16, min(_MAX_BLOCK_Q, _BLOCK_ENTRIES // max(1, rows * block_k)))
    block_q = 1 << (block_q.bit_length() - 1)  # round down to a power of two
    return max(1, min(block_q, spec.Lq)), block_k


@dataclass(frozen=True)
class Plan:
    """Which key blocks each query block visits.

    `kv_blocks(qb, i0, i1)` yields (j0, j1, check_block_mask) for query block number qb,
    rows [i0, i1): the key columns [j0, j1) to visit, and whether a BlockMask (if any) must
    be evaluated there (False where the block is known to be full). Blocks not yielded
    are skipped: the caller guarantees every score there is masked out.
    """

    block_q: int
    block_k: int
    kv_blocks: Callable[[int, int, int], Iterable[tuple[int, int, bool]]]


def band_plan(spec: AttentionSpec, block_q: Optional[int] = None, block_k: Optional[int] = None) -> Plan:
    """The plan of the tiled backend: every key block the causal/window band reaches."""
    if block_q is None or block_k is None:
        block_q, block_k = choose_blocks(spec)

    def kv_blocks(qb: int, i0: int, i1: int):
        lo, hi = spec.kv_range(i0, i1)
        for j0 in range(max(lo, 0) // block_k * block_k, hi, block_k):
            yield j0, min(j0 + block_k, spec.Lk), True

    return Plan(block_q, block_k, kv_blocks)


def _dropout_keep(seed: int, qb: int, kb: int, shape, p: float, device) -> Tensor:
    """The same keep-mask for block (qb, kb) in forward and backward, from one seed."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + qb * 65_537 + kb) % (1 << 63))
    return torch.rand(shape, generator=gen, device=device) >= p


def _scores(
    spec: AttentionSpec, q_blk: Tensor, k_blk: Tensor, i0: int, i1: int, j0: int, j1: int, grad_mod: bool,
    check_block_mask: bool = True,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Scaled, modified and masked scores of one block.

    q_blk (B, Hkv, G*bq, D) already multiplied by scale, k_blk (B, Hkv, bk, D)
    -> scores (B, Hkv, G*bq, bk), and for the backward pass (raw, modified) so the score
    function's gradient can be taken.
    """
    B, Hkv, G = spec.B, spec.Hkv, spec.groups
    bq, bk = i1 - i0, j1 - j0
    s = torch.matmul(q_blk, k_blk.transpose(-1, -2))  # (B, Hkv, G*bq, bk)
    raw = modded = None
    if spec.score_mod is not None:
        s4 = s.view(B, Hkv * G, bq, bk)  # (B, Hq, bq, bk); head h = hkv * G + g
        if grad_mod:
            raw = s4.detach().requires_grad_()
            with torch.enable_grad():
                modded = spec.apply_score_mod(raw, i0, j0)
            # A copy: the softmax below works in place, and autograd still needs `modded`.
            s = modded.detach().reshape(B, Hkv, G * bq, bk).clone()
        else:
            s = spec.apply_score_mod(s4, i0, j0).reshape(B, Hkv, G * bq, bk)
    allowed, bias = spec.constraints(i0, i1, j0, j1, s.device, use_block_mask=check_block_mask)
    if bias is not None or allowed is not None:
        s4 = s.view(B, Hkv * G, bq, bk)  # (B, Hq, bq, bk)
        if bias is not None:
            s4 += bias.to(s.dtype)
        if allowed is not None:
            s4.masked_fill_(~allowed, float("-inf"))
    return s, raw, modded


def _q_block(q: Tensor, spec: AttentionSpec, i0: int, i1: int, ct: torch.dtype) -> Tensor:
    """q[:, :, i0:i1] scaled, as (B, Hkv, G*bq, D): the G query heads of each kv head stacked."""
    blk = q[:, :, i0:i1].to(ct) * spec.scale  # (B, Hq, bq, D)
    return blk.reshape(spec.B, spec.Hkv, spec.groups * (i1 - i0), spec.D)  # (B, Hkv, G*bq, D)


def block_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, seed: int = 0,
                  plan: Optional[Plan] = None) -> tuple[Tensor, Tensor]:
    """The forward pass without autograd (FA-2, Alg. 1).

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv) in q's
    dtype, lse (B, Hq, Lq) in the compute dtype. `plan` defaults to `band_plan(spec)`.
    """
    out, lse, _ = _forward(q, k, v, spec, seed, plan, need_lo=False)
    return out, lse


def forward_for_backward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, seed: int = 0,
                         plan: Optional[Plan] = None) -> tuple[Tensor, Tensor, Tensor]:
    """`block_forward`'s out and lse, and lse_lo (B, Hq, Lq) in the compute dtype: lse's low part
    (`split_lse`), which `block_backward` takes (what `Recomputed` keeps)."""
    out, lse, lo = _forward(q, k, v, spec, seed, plan, need_lo=True)
    assert lo is not None  # made when need_lo
    return out, lse, lo


def _forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, seed: int, plan: Optional[Plan],
             need_lo: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """block_forward, with lse_lo (B, Hq, Lq) when need_lo (else None)."""
    ct = compute_dtype(q.dtype)
    B, Hq, Hkv, G, Lq, Dv = spec.B, spec.Hq, spec.Hkv, spec.groups, spec.Lq, spec.Dv
    plan = plan or band_plan(spec)
    block_q, block_k = plan.block_q, plan.block_k
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=ct, device=q.device)
    lse_lo = torch.empty(B, Hq, Lq, dtype=ct, device=q.device) if need_lo else None
    keep_scale = 1.0 / (1.0 - spec.dropout_p)
    # With several query blocks every key block is read many times, so k and v are upcast
    # once, and (without dropout) the row sum rides along as a column of ones appended to v:
    # one product p @ [v, 1] gives the weighted values and the row sum, saving a pass over p.
    # With a single query block (decoding) each key block is read once: upcasting per block
    # and summing p directly avoid a full extra pass over the cache.
    single = Lq <= block_q
    ride_along = spec.dropout_p == 0.0 and not single
    k_c = k if single else k.to(ct)  # (B, Hkv, Lk, D)
    v_c = v if single else v.to(ct)  # (B, Hkv, Lk, Dv)
    if ride_along:
        v_c = torch.cat([v_c, v_c.new_ones(B, Hkv, spec.Lk, 1)], dim=-1)  # (B, Hkv, Lk, Dv+1)
    for qb, i0 in enumerate(range(0, Lq, block_q)):
        i1 = min(i0 + block_q, Lq)
        rows = G * (i1 - i0)
        q_blk = _q_block(q, spec, i0, i1, ct)  # (B, Hkv, G*bq, D)
        row_max = torch.full((B, Hkv, rows, 1), float("-inf"), dtype=ct, device=q.device)
        row_sum = None if ride_along else torch.zeros(B, Hkv, rows, 1, dtype=ct, device=q.device)
        acc = torch.zeros(B, Hkv, rows, v_c.shape[-1], dtype=ct, device=q.device)
        for j0, j1, check in plan.kv_blocks(qb, i0, i1):
            k_blk = k_c[:, :, j0:j1].to(ct)  # (B, Hkv, bk, D); a no-op unless upcasting per block
            v_blk = v_c[:, :, j0:j1].to(ct)  # (B, Hkv, bk, Dv[+1])
            s, _, _ = _scores(spec, q_blk, k_blk, i0, i1, j0, j1, grad_mod=False, check_block_mask=check)
            new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))  # (B, Hkv, rows, 1)
            # Rows that have seen only -inf keep a reference of 0 so exp() gives 0, not NaN.
            safe_max = new_max.masked_fill(torch.isneginf(new_max), 0.0)
            alpha = torch.exp(row_max - safe_max)  # rescales what was accumulated so far
            p = s.sub_(safe_max).exp_()  # (B, Hkv, rows, bk), in place over the scores
            if not ride_along:
                assert row_sum is not None  # made above when not riding along
                row_sum.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            if spec.dropout_p > 0.0:
                keep = _dropout_keep(seed, qb, j0 // block_k, p.shape, spec.dropout_p, q.device)
                p = p * keep * keep_scale
            acc.mul_(alpha).add_(torch.matmul(p, v_blk))  # (B, Hkv, rows, Dv[+1])
            row_max = new_max
        if ride_along:
            acc, row_sum = acc[..., :Dv], acc[..., Dv:]  # (B, Hkv, rows, Dv), (B, Hkv, rows, 1)
        assert row_sum is not None
        out_blk, blk_lse = finish(row_max, row_sum, acc)  # (B, Hkv, rows, Dv), (B, Hkv, rows, 1)
        out[:, :, i0:i1] = out_blk.view(B, Hkv, G, i1 - i0, Dv).reshape(B, Hq, i1 - i0, Dv).to(q.dtype)
        lse[:, :, i0:i1] = blk_lse.view(B, Hkv, G, i1 - i0).reshape(B, Hq, i1 - i0)
        if lse_lo is not None:
            lo = split_lse(row_max, torch.log(row_sum), blk_lse)  # (B, Hkv, rows, 1)
            lse_lo[:, :, i0:i1] = lo.view(B, Hkv, G, i1 - i0).reshape(B, Hq, i1 - i0)
    return out, lse, lse_lo


def block_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, d_lse: Optional[Tensor],
    spec: AttentionSpec, lse_lo: Optional[Tensor] = None, *, seed: int = 0, plan: Optional[Plan] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) with each block's probabilities recomputed from lse (FA-2, Alg. 2).

    out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) are those of the whole softmax row: passing the
    merged out and lse of several key shards gives each shard's exact share of the
    gradient (ring attention). d_out like out; d_lse like lse, or None. lse_lo like lse, or
    None: lse's low part from the forward (`split_lse`), so that P = exp((s - lse) - lse_lo)
    is as fine as the scores; without it P is only as fine as lse's ulp (0.002 at an lse of
    26000: dv went 11x past the tolerance rule at scale 1000, docs/benchmarks.md).
    """
    ct = compute_dtype(q.dtype)
    B, Hq, Hkv, G, Lq, D, Dv = spec.B, spec.Hq, spec.Hkv, spec.groups, spec.Lq, spec.D, spec.Dv
    plan = plan or band_plan(spec)
    block_q, block_k = plan.block_q, plan.block_k
    dq = torch.zeros(B, Hq, Lq, D, dtype=ct, device=q.device)
    dk = torch.zeros(B, Hkv, spec.Lk, D, dtype=ct, device=q.device)
    dv = torch.zeros(B, Hkv, spec.Lk, Dv, dtype=ct, device=q.device)
    # delta_i = rowsum(dO_i * O_i) - dlse_i: the softmax Jacobian's row term, lse's gradient folded in.
    delta = (d_out.to(ct) * out.to(ct)).sum(dim=-1)  # (B, Hq, Lq)
    if d_lse is not None:
        delta = delta - d_lse.to(ct)
    # Rows with lse = -inf attended to nothing; +inf makes their recomputed probabilities 0.
    lse_safe = lse.masked_fill(torch.isneginf(lse), float("inf"))
    keep_scale = 1.0 / (1.0 - spec.dropout_p)
    k_c, v_c = k.to(ct), v.to(ct)  # upcast once, not once per query block
    for qb, i0 in enumerate(range(0, Lq, block_q)):
        i1 = min(i0 + block_q, Lq)
        bq, rows = i1 - i0, G * (i1 - i0)
        q_blk = _q_block(q, spec, i0, i1, ct)  # (B, Hkv, rows, D), scaled
        do_blk = d_out[:, :, i0:i1].to(ct).reshape(B, Hkv, rows, Dv)  # (B, Hkv, rows, Dv)
        lse_blk = lse_safe[:, :, i0:i1].reshape(B, Hkv, rows, 1)  # (B, Hkv, rows, 1)
        lo_blk = None if lse_lo is None else lse_lo[:, :, i0:i1].to(ct).reshape(B, Hkv, rows, 1)  # (B, Hkv, rows, 1)
        delta_blk = delta[:, :, i0:i1].reshape(B, Hkv, rows, 1)  # (B, Hkv, rows, 1)
        dq_blk = torch.zeros(B, Hkv, rows, D, dtype=ct, device=q.device)
        for j0, j1, check in plan.kv_blocks(qb, i0, i1):
            k_blk, v_blk = k_c[:, :, j0:j1], v_c[:, :, j0:j1]  # (B, Hkv, bk, D), (B, Hkv, bk, Dv)
            s, raw, modded = _scores(spec, q_blk, k_blk, i0, i1, j0, j1, grad_mod=True, check_block_mask=check)
            p = probabilities_(s, lse_blk, lo_blk)  # (B, Hkv, rows, bk): the forward's probabilities
            dp = torch.matmul(do_blk, v_blk.transpose(-1, -2))  # (B, Hkv, rows, bk)
            if spec.dropout_p > 0.0:
                keep = _dropout_keep(seed, qb, j0 // block_k, p.shape, spec.dropout_p, q.device)
                z = keep * keep_scale
                dv[:, :, j0:j1] += torch.matmul((p * z).transpose(-1, -2), do_blk)
                dp.mul_(z)
            else:
                dv[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), do_blk)  # (B, Hkv, bk, Dv)
            ds = p.mul_(dp.sub_(delta_blk))  # (B, Hkv, rows, bk): dL/d(scores after the mods)
            if raw is not None:
                assert modded is not None  # _scores returns both or neither
                (ds_raw,) = torch.autograd.grad(modded, raw, ds.view(B, Hq, bq, j1 - j0))
                ds = ds_raw.reshape(B, Hkv, rows, j1 - j0)
            dq_blk += torch.matmul(ds, k_blk)  # (B, Hkv, rows, D)
            dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), q_blk)  # q_blk carries the scale
        dq[:, :, i0:i1] = dq_blk.view(B, Hkv, G, bq, D).reshape(B, Hq, bq, D) * spec.scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge_states(row_max: Tensor, row_sum: Tensor, acc: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """S partial softmax states over disjoint keys, stacked along `dim`, -> their union.

    A state is (row max m, row sum l = sum exp(s - m), acc = sum exp(s - m) v) of its keys;
    row_max and row_sum (..., S, ...) and acc (..., S, ..., Dv) share `dim`. Each part is
    rescaled to the common max: l = sum_s l_s exp(m_s - m), likewise acc. Parts that saw no
    key (m = -inf) weigh 0, and a row no part saw stays m = -inf, l = 0, acc = 0, never NaN.
    """
    m = row_max.amax(dim=dim, keepdim=True)
    w = torch.exp(row_max - m.masked_fill(torch.isneginf(m), 0.0))  # (..., S, ...): 0 where a part saw nothing
    w_acc = w.unsqueeze(-1) if acc.dim() > w.dim() else w
    return m.squeeze(dim), (row_sum * w).sum(dim=dim), (acc * w_acc).sum(dim=dim)


def finish(row_max: Tensor, row_sum: Tensor, acc: Tensor) -> tuple[Tensor, Tensor]:
    """A softmax state -> (out = acc / row_sum, lse = row_max + log(row_sum)), shapes kept:
    a row that saw no key (row_sum 0) gets out 0 and lse -inf."""
    out = acc / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return out, row_max.masked_fill(torch.isneginf(row_max), 0.0) + torch.log(row_sum)


def split_lse(hi: Tensor, log_sum: Tensor, lse: Tensor) -> Tensor:
    """lse's low part: (hi + log_sum) - lse, where lse = fl(hi + log_sum) (`finish`'s sum, with hi the
    row max, or 0 where the row max is -inf), exact by Knuth's TwoSum (TAOCP vol. 2, 4.2.2), so
    lse + lo is max + log(sum) to log's own rounding; 0 where lse or the low part is not finite.

    At large scores lse's ulp dwarfs a probability's (at an lse of 26000 a float32 lse is 0.002
    coarse), and exp(s - lse) carries that error into every recomputed probability; the backward
    subtracts lo after lse (the native kernel's lse_lo is the same low part). Shapes: all alike.
    """
    a = hi.masked_fill(~torch.isfinite(hi), 0.0)
    bb = lse - a  # plain torch ops, each rounded once: TwoSum's steps exactly
    lo = (a - (lse - bb)) + (log_sum - bb)
    return lo.masked_fill(~torch.isfinite(lse) | ~torch.isfinite(lo), 0.0)


def probabilities_(s: Tensor, lse: Tensor, lo: Optional[Tensor]) -> Tensor:
    """In place over the scores s (..., rows, keys): exp((s - lse) - lo), the forward's probabilities,
    lse and lo (..., rows, 1) (lo: split_lse's low part, or None). s - lse is exact near a row's top
    scores (Sterbenz), where the low part matters; lo is subtracted after it, not added to lse first."""
    s.sub_(lse)
    if lo is not None:
        s.sub_(lo)
    return s.exp_()


def merge_lse_(out_acc: Tensor, lse_acc: Tensor, out_s: Tensor, lse_s: Tensor) -> None:
    """In place: fold a partial result over other keys (out_s, lse_s) into (out_acc, lse_acc).

    `merge_states` for results already normalised (the state (lse, 1, out)), written in its
    log-sum-exp form so that it works in place without stacking copies: ring attention and the
    sdpa backend's causal split fold each piece in as it arrives. out (B, H, n, Dv), lse
    (B, H, n), all in the compute dtype. Rows that have seen nothing yet (lse -inf on both
    sides) stay 0 / -inf, never NaN.
    """
    lse_new = torch.logaddexp(lse_acc, lse_s)  # (B, H, n)
    safe = lse_new.masked_fill(torch.isneginf(lse_new), 0.0)
    w_old = torch.exp(lse_acc - safe).unsqueeze(-1)  # (B, H, n, 1)
    w_new = torch.exp(lse_s - safe).unsqueeze(-1)  # (B, H, n, 1)
    out_acc.mul_(w_old).addcmul_(out_s, w_new)
    lse_acc.copy_(lse_new)


class Recomputed(torch.autograd.Function):
    """An engine's (out, lse) made differentiable, FlashAttention-2 style (Dao, 2023, Alg. 2):
    the forward keeps only q, k, v, out and lse; the backward recomputes the probabilities.

    apply(q, k, v, spec, forward, backward): forward(q, k, v, spec) -> (out (B, Hq, Lq, Dv),
    lse (B, Hq, Lq), *extra) without autograd; backward(q, k, v, out, lse, d_out, d_lse, spec,
    *extra) -> (dq, dk, dv). `extra`: tensors the engine's backward also needs, kept with the rest
    (lse_lo, lse's low part: this engine's, the gathered-rows engine's and the native kernel's).
    """

    @staticmethod
    def forward(ctx, q, k, v, spec, forward, backward):
        out, lse, *extra = forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse, *extra)
        ctx.spec, ctx.engine_backward = spec, backward
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, *extra = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(out)
        dq, dk, dv = ctx.engine_backward(q, k, v, out, lse, d_out, d_lse, ctx.spec, *extra)
        return dq, dk, dv, None, None, None


def _score_mod_uses_grad(spec: AttentionSpec, q: Tensor) -> bool:
    """True if the score function reads a tensor that requires grad (a learned bias, say).

    One probe call on a single score that does not require grad: its result requires grad
    only if some tensor the function uses does, wherever that tensor lives (closure, global,
    attribute), so the check cannot be fooled by how the function was written.
    """
    if spec.Lq == 0 or spec.Lk == 0:
        return False
    assert spec.score_mod is not None  # the caller checks
    probe = torch.zeros(1, 1, 1, 1, dtype=compute_dtype(q.dtype), device=q.device)
    with torch.enable_grad():
        out = spec.score_mod(probe, *index_grid(1, 1, 0, 1, 0, 1, q.device))
    return isinstance(out, Tensor) and out.requires_grad


def memory(spec: AttentionSpec, q: Tensor, need_lse: bool) -> tuple[int, str]:
    """(bytes, what): linear in length (see _memory.linear)."""
    return _memory.linear(spec, q, _BLOCK_ENTRIES), "upcast inputs, gradients and blocks, linear in length"


def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    """Why this engine (and so the tiled backend) cannot honour these arguments, or None if it can."""
    if torch.is_grad_enabled():
        if spec.float_mask is not None and spec.float_mask.requires_grad:
            return (
                "the tiled backend does not compute gradients for a float mask that requires grad; "
                "use backend='reference' or 'sdpa', or pass mask.detach()"
            )
        if spec.score_mod is not None and _score_mod_uses_grad(spec, q):
            return (
                "the tiled backend does not compute gradients for tensors captured by score_mod "
                "(a learned bias, say); use backend='reference', or detach them"
            )
    return None


def run(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, plan: Plan, *,
        need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Differentiable FA-2 attention following `plan` (the tiled, sparse and decode backends' engine)."""
    seed = 0
    if spec.dropout_p > 0.0:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = Recomputed.apply(q, k, v, spec,
                                    functools.partial(forward_for_backward, seed=seed, plan=plan),
                                    functools.partial(block_backward, seed=seed, plan=plan))
    else:
        out, lse = block_forward(q, k, v, spec, seed, plan)
    return out, (lse if need_lse else None)


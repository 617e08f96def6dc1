"""Exact ring attention across processes, with gradients.

Liu, Zaharia & Abbeel, 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context": each rank holds one shard of the sequence; the key/value shards travel around
the ring of ranks while every rank attends its queries to the shard it holds, so no rank
ever holds more than two key/value shards. The partial results of the shards are merged
exactly through their log-sum-exp (the online softmax of FlashAttention), in float32
(float64 for float64 inputs). The zigzag layout balances causal work (ring-flash-attention;
Brandon et al., 2023, "Striped Attention").

Per ring step each rank first posts the send of the shard it holds and the receive of the
next one (torch.distributed.batch_isend_irecv), then computes on the shard it holds with
the FlashAttention-2 engine (qkv.core.engines.flash.block_forward / block_backward), merges
by its `merge_lse_`, then waits: the transfer overlaps the computation.

Backward: the keys and values travel the ring again; each rank recomputes its blocks from
the merged lse and adds this shard's share of dk/dv into an accumulator that travels with
them (one step behind), so after P steps every rank receives the full gradient of its own
shard. Grouped-query heads: only the Hkv key/value heads travel.

`RingAttention` is a backend object (qkv.core.Backend's protocol): a layer selects it as
it selects any backend, `attention(..., backend=RingAttention(group, layout))`. Layout:
docs/architecture.md.

NaN and infinity follow the core's rule (qkv.core.finite): each piece runs under the same
guard as qkv.attention, so a row that sees a non-finite key on any shard ends NaN (the lse
merge carries it), and the backward cleans a piece that holds one, giving NaN exactly in dq
of poisoned rows and in dk/dv of the keys they see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from qkv.core import attention, finite
from qkv.core.engines.flash import block_backward, block_forward, merge_lse_
from qkv.core.mods import fmt_shape
from qkv.core.spec import AttentionSpec, build_spec, compute_dtype

from ._comm import DEFAULT_TIMEOUT, Ring, all_gather_meta, make_ring
from ._layout import LAYOUTS, check_layout, shard_positions, step_work

# Partial outputs of one ring step are produced and merged in pieces of at most this many
# entries (B * Hq * rows * Dv), so they never cost a second copy of the output.
_PIECE_ENTRIES = 1 << 19
_GRAD_TAG = 2  # message tags: 0, 1 for k, v; 2, 3 for dk, dv
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Opts:
    ring: Ring
    layout: str
    causal: bool
    scale: float


def _check_local(q: Tensor, k: Tensor, v: Tensor, layout: str, ring: Ring) -> None:
    # The single-rank checks (dtypes, 4-D, heads, head_dim) are the core's.
    build_spec(q, k, v)
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"ring attention shards q, k and v of one sequence alike; got local lengths "
            f"Lq={q.shape[2]} (q {fmt_shape(q)}) and Lk={k.shape[2]} (k {fmt_shape(k)}). Shard all three "
            f"with qkv.distributed.shard(x, rank, world_size, layout=...)"
        )
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(
            f"the zigzag layout gives each rank two equal chunks, so the local length must be "
            f"even; got {q.shape[2]} on rank {ring.rank}. Cut a sequence whose length is a "
            f"multiple of 2P={2 * ring.size}, or use layout='contiguous'"
        )


_META_NAMES = ("B", "Hq", "Hkv", "L_local", "D", "Dv", "dtype", "causal", "layout", "scale")


def _check_across_ranks(q: Tensor, k: Tensor, v: Tensor, o: _Opts) -> None:
    """All ranks must pass shards of one shape and the same options, or the ring would hang."""
    meta = [*q.shape[:2], k.shape[1], q.shape[2], q.shape[3], v.shape[3], _DTYPES.index(q.dtype),
            float(o.causal), LAYOUTS.index(o.layout), o.scale]
    every = all_gather_meta(o.ring, meta, q.device)
    for r, theirs in enumerate(every):
        if theirs != every[0]:
            diff = [
                f"{n}: rank 0 has {_show(n, a)}, rank {r} has {_show(n, b)}"
                for n, a, b in zip(_META_NAMES, every[0], theirs) if a != b
            ]
            raise ValueError(
                "ring attention needs the same shard shapes and options on every rank; "
                + "; ".join(diff)
                + ". Shard one sequence with qkv.distributed.shard(...) and pass the same "
                "causal/layout/scale everywhere"
            )


def _show(name: str, x: float):
    if name == "dtype":
        return str(_DTYPES[int(x)])
    if name == "layout":
        return repr(LAYOUTS[int(x)])
    if name == "causal":
        return bool(x)
    return x if name == "scale" else int(x)


def _row_pieces(w, rows: int):
    """Split a step's block into pieces of at most `rows` query rows: (q0, q1, k0, k1, causal).

    Merging piece by piece keeps the partial output of a step at `rows` rows instead of the
    whole shard. A piece [a, b) of a causal (diagonal) block keeps the keys up to b, so
    bottom-right alignment still puts query a on key a.
    """
    if w is None:
        return
    for a in range(w.q0, w.q1, rows):
        b = min(a + rows, w.q1)
        if w.causal:
            yield a, b, w.k0, w.k0 + (b - w.q0), True
        else:
            yield a, b, w.k0, w.k1, False


def _receive_buffers(k: Tensor, v: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    """Two (k, v) buffers received into on alternate steps, never the caller's k and v.

    At step s a rank sends the shard it holds and receives into buffer s % 2, which is
    not the one being sent; the caller's tensors are only ever sent (autograd saves them).
    """
    n = min(size - 1, 2)
    return [(torch.empty_like(k), torch.empty_like(v)) for _ in range(n)]


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, o: _Opts) -> tuple[Tensor, Tensor]:
    """Local shards -> (out, lse) of the local queries against the whole sequence, compute dtype."""
    ring, ct = o.ring, compute_dtype(q.dtype)
    B, Hq, L, _ = q.shape
    q_ct = q.to(ct)  # (B, Hq, L, D)
    out = torch.zeros(B, Hq, L, v.shape[3], dtype=ct, device=q.device)  # (B, Hq, L, Dv)
    lse = torch.full((B, Hq, L), float("-inf"), dtype=ct, device=q.device)  # (B, Hq, L)
    k_cur, v_cur = k.contiguous(), v.contiguous()
    bufs = _receive_buffers(k_cur, v_cur, ring.size)
    rows = max(1, _PIECE_ENTRIES // (B * Hq * v.shape[3]))
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        works = None
        if step < ring.size - 1:  # post the next transfer before computing on this shard
            k_nxt, v_nxt = bufs[step % 2]
            works = ring.exchange([k_cur, v_cur], [k_nxt, v_nxt])
        w = step_work(o.layout, o.causal, ring.rank, src, ring.size, L)
        for q0, q1, k0, k1, causal in _row_pieces(w, rows):
            qs = q_ct[:, :, q0:q1]  # (B, Hq, lq, D)
            ks = k_cur[:, :, k0:k1].to(ct)  # (B, Hkv, lk, D)
            vs = v_cur[:, :, k0:k1].to(ct)  # (B, Hkv, lk, Dv)
            spec = build_spec(qs, ks, vs, causal=causal, scale=o.scale)
            out_s, lse_s = finite.guarded(_tiled_piece, qs, ks, vs, spec, True)  # (B, Hq, lq, Dv), (B, Hq, lq)
            merge_lse_(out[:, :, q0:q1], lse[:, :, q0:q1], out_s, lse_s)
        if works is not None:
            ring.wait(works, f"exchanging key/value shards with ranks {ring.prev_peer} (from) and "
                             f"{ring.next_peer} (to) at forward step {step + 1} of {ring.size}")
            k_cur, v_cur = k_nxt, v_nxt
    return out, lse


def _ring_backward(q, k, v, out, lse, d_out, d_lse, o: _Opts) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the local shards from the merged out/lse (compute dtype) and upstream grads."""
    ring, ct = o.ring, compute_dtype(q.dtype)
    B, Hq, L, D = q.shape
    q_ct, d_out = q.to(ct), d_out.to(ct)
    dq = torch.zeros(B, Hq, L, D, dtype=ct, device=q.device)  # (B, Hq, L, D)
    k_cur, v_cur = k.contiguous(), v.contiguous()
    bufs = _receive_buffers(k_cur, v_cur, ring.size)
    # The travelling dk/dv accumulators (compute dtype), double buffered: one is being sent
    # while the other receives.
    dk_acc = torch.zeros(k.shape, dtype=ct, device=k.device)  # (B, Hkv, L, D)
    dv_acc = torch.zeros(v.shape, dtype=ct, device=v.device)  # (B, Hkv, L, Dv)
    dk_in, dv_in = torch.empty_like(dk_acc), torch.empty_like(dv_acc)
    grad_works = None
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        kv_works = None
        if step < ring.size - 1:
            k_nxt, v_nxt = bufs[step % 2]
            kv_works = ring.exchange([k_cur, v_cur], [k_nxt, v_nxt])
        w = step_work(o.layout, o.causal, ring.rank, src, ring.size, L)
        dk_s = dv_s = None
        if w is not None:
            sl = slice(w.q0, w.q1)
            qs = q_ct[:, :, sl]  # (B, Hq, lq, D)
            ks = k_cur[:, :, w.k0:w.k1].to(ct)  # (B, Hkv, lk, D)
            vs = v_cur[:, :, w.k0:w.k1].to(ct)  # (B, Hkv, lk, Dv)
            spec = build_spec(qs, ks, vs, causal=w.causal, scale=o.scale)
            dl = None if d_lse is None else d_lse[:, :, sl]
            dq_s, dk_s, dv_s = _piece_backward(qs, ks, vs, out[:, :, sl], lse[:, :, sl], d_out[:, :, sl], dl, spec)
            dq[:, :, sl] += dq_s
        if step > 0:  # the accumulator for shard `src`, holding the shares of the ranks before us
            ring.wait(grad_works, f"exchanging key/value gradient accumulators with ranks {ring.prev_peer} "
                                  f"(from) and {ring.next_peer} (to) at backward step {step + 1} of {ring.size}")
            dk_acc, dk_in, dv_acc, dv_in = dk_in, dk_acc, dv_in, dv_acc
        if dk_s is not None:
            dk_acc[:, :, w.k0:w.k1] += dk_s
            dv_acc[:, :, w.k0:w.k1] += dv_s
        if ring.size > 1:  # pass the accumulator on; the last hop brings our own shard's total home
            grad_works = ring.exchange([dk_acc, dv_acc], [dk_in, dv_in], tag=_GRAD_TAG)
        if kv_works is not None:
            ring.wait(kv_works, f"exchanging key/value shards with ranks {ring.prev_peer} (from) and "
                                f"{ring.next_peer} (to) at backward step {step + 1} of {ring.size}")
            k_cur, v_cur = k_nxt, v_nxt
    if ring.size > 1:
        ring.wait(grad_works, f"receiving this shard's key/value gradients back from rank {ring.prev_peer} "
                              f"(end of backward)")
        dk_acc, dv_acc = dk_in, dv_in
    return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


def _tiled_piece(q: Tensor, k: Tensor, v: Tensor, spec, *, need_lse: bool) -> tuple[Tensor, Tensor]:
    """The tiled engine's forward in a backend's shape, for the non-finite guard."""
    return block_forward(q, k, v, spec)


def _piece_backward(qs, ks, vs, out_s, lse_s, do_s, dl_s, spec) -> tuple[Tensor, Tensor, Tensor]:
    """block_backward of one piece (shapes as there), by the core's rule for non-finite values:
    rows whose merged lse is NaN (poisoned in the forward) pass no gradient through the clean
    computation and get NaN in dq; the keys they may see get NaN in dk and dv."""
    poisoned = torch.isnan(lse_s)  # (B, Hq, lq)
    if finite.all_finite(qs, ks, vs) and not bool(poisoned.any()):
        return block_backward(qs, ks, vs, out_s, lse_s, do_s, dl_s, spec)
    clean = [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (qs, ks, vs)]
    rows = poisoned.unsqueeze(-1)  # (B, Hq, lq, 1)
    dq, dk, dv = block_backward(*clean, out_s.masked_fill(rows, 0.0), lse_s.masked_fill(poisoned, float("inf")),
                                do_s.masked_fill(rows, 0.0), None if dl_s is None else dl_s.masked_fill(poisoned, 0.0),
                                spec)
    seen = finite.keys_seen(spec, poisoned).unsqueeze(-1)  # (B, Hkv, lk, 1)
    nan = float("nan")
    return dq.masked_fill(rows, nan), dk.masked_fill(seen, nan), dv.masked_fill(seen, nan)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, opts):
        out, lse = _ring_forward(q, k, v, opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(q, k, v, out, lse, d_out, d_lse, ctx.opts)
        return dq, dk, dv, None


def ring_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, group=None, layout: str = "zigzag",
    scale: Optional[float] = None, timeout: float = DEFAULT_TIMEOUT, check_shards: bool = True,
) -> tuple[Tensor, Tensor]:
    """Like `ring_attention`, also returning lse (B, Hq, L_local) of the local rows (float32,
    float64 for float64 inputs), differentiable."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    check_layout(layout)
    ring = make_ring(group, timeout)
    _check_local(q, k, v, layout, ring)
    spec = build_spec(q, k, v, scale=scale)
    opts = _Opts(ring, layout, causal, spec.scale)
    if check_shards and ring.size > 1:
        _check_across_ranks(q, k, v, opts)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _RingAttention.apply(q, k, v, opts)
    out, lse = _ring_forward(q, k, v, opts)
    return out.to(q.dtype), lse


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, group=None, layout: str = "zigzag",
    scale: Optional[float] = None, timeout: float = DEFAULT_TIMEOUT, check_shards: bool = True,
) -> Tensor:
    """Exact attention over a sequence sharded across the ranks of `group`, differentiable.

    Every rank of the group calls this collectively with its own shard:

    - q (B, Hq, L_local, D), k (B, Hkv, L_local, D), v (B, Hkv, L_local, Dv); Hq a multiple
      of Hkv (grouped-query heads: only the Hkv heads travel). The same shapes on every rank.
    - causal: each token sees itself and the tokens before it in the *global* sequence.
    - group: the process group whose ranks, in group-rank order, hold the sequence (None =
      the default group).
    - layout: "zigzag" (rank r holds chunks r and 2P-1-r of 2P; L_local even; balanced
      causal work) or "contiguous" (rank r holds piece r of P). Shard and unshard with
      `qkv.distributed.shard` / `unshard`.
    - scale: score scale, default 1/sqrt(D).
    - timeout: seconds any wait on a peer may take before raising RingAttentionError.
    - check_shards: one small all_gather that checks every rank passes the same shapes and
      options (a clear ValueError instead of a hang); turn off to save a collective.

    Returns out (B, Hq, L_local, Dv) in q's dtype: this rank's rows of
    attention(full_q, full_k, full_v, causal=causal), in this rank's layout.
    """
    out, _ = ring_attention_with_lse(q, k, v, causal=causal, group=group, layout=layout, scale=scale,
                                     timeout=timeout, check_shards=check_shards)
    return out


@dataclass(frozen=True)
class RingAttention:
    """Ring attention as a backend object (qkv.core.Backend's protocol), and a function with
    `qkv.attention`'s signature.

    The adapter for layers: `MultiHeadAttention.distribute(group, layout)` sets it as the
    layer's backend, so the layer's q, k, v (already sharded by the caller) are attended
    across the whole sequence through `qkv.attention(..., backend=ring)`, like any backend.
    Arguments the ring does not support raise, never ignored.

        ring = RingAttention(group=None, layout="zigzag")
        out = qkv.attention(q, k, v, causal=True, backend=ring)  # q, k, v: (B, H, L_local, D) shards
        out = ring(q, k, v, causal=True)                          # the same
        pos = ring.positions(q.shape[2])           # global positions, for rotary embeddings
    """

    group: object = None
    layout: str = "zigzag"
    timeout: float = DEFAULT_TIMEOUT
    # The Backend protocol: never chosen by auto; each ring piece runs under the non-finite
    # guard itself (a guard around the whole call could not see the other ranks' keys).
    name = "ring"
    memory = None
    self_checking = None
    auto = None
    priority = 0
    guarded = False

    def __post_init__(self):
        check_layout(self.layout)

    def unsupported(self, spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
        """Why ring attention cannot honour these arguments (it takes causal and scale only), or None."""
        window = spec.left is not None or spec.right not in (None, 0) or (spec.right == 0 and not spec.causal)
        got = [f"{n}={x}" for n, x, bad in (
            ("mask", _mask_text(spec), spec.has_dense_constraints),
            ("window", _window_text(spec), window),
            ("score_mod", spec.score_mod, spec.score_mod is not None),
            ("dropout_p", spec.dropout_p, spec.dropout_p > 0.0),
        ) if bad]
        return _unsupported_message(got)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool):
        """Local shards q (B, Hq, L_local, D), k, v (B, Hkv, L_local, D|Dv) -> out (B, Hq, L_local, Dv), lse."""
        out, lse = ring_attention_with_lse(q, k, v, causal=spec.causal, group=self.group, layout=self.layout,
                                           scale=spec.scale, timeout=self.timeout)
        return out, (lse if need_lse else None)

    def __call__(self, q, k, v, *, mask=None, causal=False, window=None, scale=None, score_mod=None,
                 dropout_p=0.0, backend="auto"):
        if not (backend is self or (isinstance(backend, str) and backend in ("auto", "ring"))):
            raise ValueError(_unsupported_message([f"backend={backend!r}"]))
        return attention(q, k, v, mask=mask, causal=causal, window=window, scale=scale, score_mod=score_mod,
                         dropout_p=dropout_p, backend=self)

    def positions(self, local_len: int) -> Tensor:
        """Global positions (L_local,) of this rank's tokens, for position embeddings."""
        ring = make_ring(self.group, self.timeout)
        return shard_positions(local_len * ring.size, ring.rank, ring.size, layout=self.layout)


def _window_text(spec: AttentionSpec) -> str:
    """The window as a user writes it: w for (w, w) or a causal (w, 0), else (left, right); the reach as
    given (spec.reach_given), not as clamped to the shard's Lq + Lk."""
    left, right = spec.reach_given if spec.reach_given is not None else (spec.left, spec.right)
    if left == right or (spec.causal and right == 0):
        return f"{left}"
    return f"({left}, {right})"


def _mask_text(spec: AttentionSpec) -> str:
    """The mask a spec holds, in a few words: a tensor by dtype and shape, else its type."""
    for m in (spec.bool_mask, spec.float_mask):
        if m is not None:
            return f"<{str(m.dtype).replace('torch.', '')} {tuple(m.shape)}>"
    given = spec.block_mask if spec.block_mask is not None else spec.mask_mod
    return f"<{type(given).__name__}>"


def _unsupported_message(got: list) -> Optional[str]:
    if not got:
        return None
    return (f"ring attention supports causal and scale only; got {', '.join(got)}. "
            f"Use qkv.attention on one process for masks, windows, score_mod or dropout")

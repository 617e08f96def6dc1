"""The decode eager engine: a few queries against a long KV cache, segment by segment.

A decode step reads every cached key and value once, so its speed limit is memory
bandwidth, not arithmetic. The grouped-query heads of each key/value head are folded into
the rows of one problem (Ainslie et al., 2023, GQA), so keys and values are read once per
key/value head and never copied per query head. The cache is cut into segments whose
partial softmax states are merged through their running max (`flash.merge_states`: the
online softmax of FlashAttention-2, Dao 2023, over the cache as in Flash-Decoding, Dao,
Haziza, Massa and Sizov, 2023).

It runs where the native kernel (decode_native.py) does not: float16 and float64 caches,
mask functions, and machines where the kernel cannot be compiled. Matrix products per
segment, in float32 (float64 for float64 inputs) as in the reference. bfloat16 and float16
caches are upcast one kv head and 4 MiB of float32 at a time into a reused buffer that stays
in the processor's cache, so no float32 copy of the cache is ever made. With at most 4 rows
per key/value head, one batched product of the keys with the queries (MKL is fast for that
shape); with more rows, and for the weights times the values, oneDNN's matrix product
(`torch.ops.mkldnn._linear_pointwise`, one call per key/value head). Without oneDNN, or in
float64, `torch.matmul` does everything. It checks the raw scores it computes for NaN and
infinity as it goes, for the non-finite guard (core/finite.py). Layout: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..spec import AttentionSpec, rows_overlap
from .flash import finish, merge_states

_SEGMENT_ENTRIES = 1 << 20  # score entries per segment (see _sizes), 4 MiB in float32
_UPCAST_BYTES = 1 << 22  # float32 bytes of one upcast chunk of one kv head's keys (or values)
_KQ_MAX_ROWS = 4  # up to this many rows per kv head, scores come from one batched k @ q^T
_override: Optional[tuple[int, int]] = None


@contextlib.contextmanager
def split_sizes(segment: int, upcast: int) -> Iterator[None]:
    """Force the keys per segment and per upcast chunk (tests use tiny ones to exercise merging)."""
    global _override
    if segment < 1 or upcast < 1:
        raise ValueError(f"split sizes must be >= 1; got segment={segment}, upcast={upcast}")
    previous, _override = _override, (int(segment), int(upcast))
    try:
        yield
    finally:
        _override = previous


def forced_sizes() -> Optional[tuple[int, int]]:
    """(segment, upcast) as forced by `split_sizes`, or None (the native kernel cuts its splits by it too)."""
    return _override


def _sizes(spec: AttentionSpec, batched: bool) -> tuple[int, int]:
    """(keys per segment, keys per upcast chunk) for these sizes.

    A segment's scores hold up to 2^20 entries: those of all heads where they are computed
    all at once (`batched`), those of one kv head where heads go one at a time.
    """
    if _override is not None:
        return _override
    rows = spec.B * spec.Hq * spec.Lq if batched else spec.groups * spec.Lq
    segment = max(1024, _SEGMENT_ENTRIES // max(1, rows))
    upcast = max(256, _UPCAST_BYTES // (4 * max(spec.D, spec.Dv)))
    return segment, upcast


def _batched(M: int, k: Tensor, ct: torch.dtype) -> bool:
    """Whether a segment's scores come from one product over all heads (else one per kv head)."""
    return k.dtype == ct and (M <= _KQ_MAX_ROWS or not _use_onednn(k))


def _onednn_linear():
    """oneDNN's x @ w^T for 2-D float32 CPU tensors of any strides, or None where absent."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(5, 3)
        if not torch.equal(op(x, w.t().contiguous().t(), None, "none", [], ""), torch.full((2, 5), 3.0)):
            return None
    except (AttributeError, RuntimeError):
        return None
    return lambda x, w: op(x, w, None, "none", [], "")


_LINEAR = _onednn_linear()


def _use_onednn(x: Tensor) -> bool:
    """oneDNN for float32 CPU tensors whose rows do not overlap (it refuses such strides)."""
    return _LINEAR is not None and x.dtype == torch.float32 and x.device.type == "cpu" and not rows_overlap(x)


def _rows_view(t: Optional[Tensor], Hkv: int, G: int) -> Optional[Tensor]:
    """A constraint broadcastable to (B, Hq, Lq, n) as one broadcastable to (B, Hkv, G, Lq, n)."""
    if t is None:
        return None
    t = t.view((1,) * (4 - t.dim()) + tuple(t.shape))  # (b|1, Hq|1, Lq|1, n|1)
    return t.unsqueeze(2) if t.shape[1] == 1 else t.unflatten(1, (Hkv, G))


def _softmax_stats(s: Tensor, blocked: Optional[Tensor], bias: Optional[Tensor], G: int, Lq: int):
    """Scores s (..., M, n) with M = G*Lq rows, modified in place -> (row max (..., M, 1),
    row sum (..., M, 1), p = exp(s - row max) (..., M, n)). `blocked` (True = masked out) and
    `bias` broadcast to (..., G, Lq, n)."""
    if bias is not None or blocked is not None:
        s5 = s.unflatten(-2, (G, Lq))  # (..., G, Lq, n): row g*Lq + i is query head g, query i
        if bias is not None:
            s5 += bias
        if blocked is not None:
            s5.masked_fill_(blocked, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)  # (..., M, 1)
    # Rows that see no key here keep a reference of 0 so exp() gives 0, not NaN.
    p = s.sub_(row_max.masked_fill(torch.isneginf(row_max), 0.0)).exp_()  # (..., M, n)
    return row_max, p.sum(dim=-1, keepdim=True), p


def _segment(q_rows: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, j0: int, j1: int,
             upcast_keys: int, raw: list) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax statistics of keys [j0, j1): row max (B, Hkv, M, 1), row sum (B, Hkv, M, 1) and
    weighted values (B, Hkv, M, Dv), all relative to the row max (zeros where it is -inf).

    Appends to `raw` the sum of the raw scores (before any mask): NaN or infinite when a key
    is (or a score overflows), for the non-finite check (core/finite.py)."""
    ct = q_rows.dtype
    B, Hkv, M, _ = q_rows.shape
    G, Lq = spec.groups, spec.Lq
    allowed, bias = spec.constraints(0, Lq, j0, j1, q_rows.device)
    blocked = _rows_view(None if allowed is None else ~allowed, Hkv, G)  # (b|1, Hkv|1, G|1, Lq|1, n|1)
    bias = _rows_view(None if bias is None else bias.to(ct), Hkv, G)
    k, v = k[:, :, j0:j1], v[:, :, j0:j1]  # (B, Hkv, n, D), (B, Hkv, n, Dv)
    if _batched(M, k, ct):
        # All heads at once. (B, Hkv, n, D) @ (B, Hkv, D, M): MKL's fast shape for a few rows.
        s = torch.matmul(k, q_rows.transpose(-1, -2)).transpose(-1, -2).contiguous()  # (B, Hkv, M, n)
        raw.append(s.sum())
        row_max, row_sum, p = _softmax_stats(s, blocked, bias, G, Lq)
        if _use_onednn(v):
            o = torch.stack([torch.stack([_LINEAR(p[b, h], v[b, h].t()) for h in range(Hkv)]) for b in range(B)])
        else:
            o = torch.matmul(p, v)  # (B, Hkv, M, Dv)
        return row_max, row_sum, o
    # One kv head at a time: oneDNN's products take one matrix each, and the scores of a
    # head stay small (no big temporaries, whose fresh pages cost more than the arithmetic).
    upcast = k.dtype != ct
    s_buf = torch.empty(M, k.shape[2], dtype=ct, device=k.device) if upcast else None
    parts = []
    for b in range(B):
        for h in range(Hkv):
            s = _head_scores(q_rows[b, h], k[b, h], s_buf, upcast_keys)  # (M, n)
            raw.append(s.sum())
            row_max, row_sum, p = _softmax_stats(s, _pick(blocked, b, h), _pick(bias, b, h), G, Lq)
            parts.append((row_max, row_sum, _head_values(p, v[b, h], upcast_keys)))
    return tuple(torch.stack(t).unflatten(0, (B, Hkv)) for t in zip(*parts))  # (B, Hkv, M, ...) each


def _pick(t: Optional[Tensor], b: int, h: int) -> Optional[Tensor]:
    """Batch row b, kv head h of a (b|1, Hkv|1, ...) constraint."""
    return None if t is None else t[b if t.shape[0] > 1 else 0, h if t.shape[1] > 1 else 0]


def _head_scores(q: Tensor, k: Tensor, out: Optional[Tensor], upcast_keys: int) -> Tensor:
    """q (M, D) in the compute dtype, k (n, D) -> q @ k^T (M, n). A k of another dtype is upcast
    a chunk at a time into a buffer that stays in the processor's cache, and `out` is filled."""
    if out is None:
        return _LINEAR(q, k) if _use_onednn(k) else q @ k.t()
    buf = torch.empty(min(k.shape[0], upcast_keys), k.shape[1], dtype=q.dtype, device=q.device)
    for c0 in range(0, k.shape[0], upcast_keys):
        c1 = min(k.shape[0], c0 + upcast_keys)
        k_c = buf[: c1 - c0].copy_(k[c0:c1])  # (c, D)
        if q.shape[0] > _KQ_MAX_ROWS and _use_onednn(k_c):
            out[:, c0:c1] = _LINEAR(q, k_c)
        else:
            out[:, c0:c1] = torch.mm(k_c, q.t()).t()  # (c, D) @ (D, M): MKL's fast shape for a few rows
    return out


def _head_values(p: Tensor, v: Tensor, upcast_keys: int) -> Tensor:
    """p (M, n) in the compute dtype, v (n, Dv) -> p @ v (M, Dv), v upcast a chunk at a time."""
    if v.dtype == p.dtype:
        return _LINEAR(p, v.t()) if _use_onednn(v) else p @ v
    o = torch.zeros(p.shape[0], v.shape[1], dtype=p.dtype, device=p.device)
    buf = torch.empty(min(v.shape[0], upcast_keys), v.shape[1], dtype=p.dtype, device=p.device)
    for c0 in range(0, v.shape[0], upcast_keys):
        c1 = min(v.shape[0], c0 + upcast_keys)
        v_c = buf[: c1 - c0].copy_(v[c0:c1])  # (c, Dv)
        o += _LINEAR(p[:, c0:c1], v_c.t()) if _use_onednn(v_c) else p[:, c0:c1] @ v_c
    return o


def _pieces(spec: AttentionSpec, lo: int, hi: int, segment: int) -> list[tuple[int, int]]:
    """Keys [lo, hi) as segments of at most `segment` keys.

    The keys every query sees under the causal/window band (the core) are cut apart from
    the few at its edges (the last Lq - 1 under causal), so only the edge segments build and
    apply a band mask.
    """
    row_lo, row_hi = spec.band_edges(torch.tensor([spec.Lq - 1, 0]))  # (2,) each: the last row, the first
    core_lo = min(hi, max(lo, int(row_lo[0])))  # every query sees keys [core_lo, core_hi)
    core_hi = max(core_lo, min(hi, int(row_hi[1])))
    pieces = [(lo, core_lo)] if core_lo > lo else []
    pieces += [(j0, min(core_hi, j0 + segment)) for j0 in range(core_lo, core_hi, segment)]
    pieces += [(j0, min(hi, j0 + segment)) for j0 in range(core_hi, hi, segment)]
    return pieces


def forward(q_rows: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, lo: int,
            hi: int) -> tuple[Tensor, Tensor, Tensor]:
    """The segmented decode step without autograd over keys [lo, hi) (lo < hi): q_rows
    (B, Hkv, G*Lq, D) in the compute dtype and scaled, k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)
    -> out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) in the compute dtype, and a 0-d bool tensor:
    whether a raw score (before masks) was NaN or infinite."""
    B, Hkv, M, _ = q_rows.shape
    segment, upcast_keys = _sizes(spec, _batched(M, k, q_rows.dtype))
    state: Optional[tuple[Tensor, Tensor, Tensor]] = None
    raw: list[Tensor] = []
    for j0, j1 in _pieces(spec, lo, hi, segment):
        part = _segment(q_rows, k, v, spec, j0, j1, upcast_keys, raw)  # (B, Hkv, M, 1), (B, Hkv, M, 1), (B, Hkv, M, Dv)
        if state is None:
            state = part
        else:
            row_max, row_sum, acc = (torch.stack(pair) for pair in zip(state, part))  # (2, ...) each
            state = merge_states(row_max, row_sum, acc, dim=0)
    assert state is not None  # lo < hi: at least one piece
    out, lse = finish(*state)  # (B, Hkv, M, Dv), (B, Hkv, M, 1)
    suspect = ~torch.isfinite(torch.stack(raw).sum())
    return out.view(B, spec.Hq, spec.Lq, spec.Dv), lse.view(B, spec.Hq, spec.Lq), suspect

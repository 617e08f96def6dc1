"""Decode backend: a few new queries against a long KV cache.

A decode step reads every cached key and value once, so its speed limit is memory
bandwidth, not arithmetic. The grouped-query heads of each key/value head are folded into
the rows of one matrix product (Ainslie et al., 2023, GQA), so keys and values are read
once per key/value head and never copied per query head. The cache is cut into segments
whose partial softmax results (row max, row sum, weighted values) are merged through their
running max, the FlashAttention-2 online softmax (Dao, 2023) applied over the cache as in
Flash-Decoding (Dao, Haziza, Massa and Sizov, 2023, "Flash-Decoding for long-context
inference"); a short cache is one segment, a long one with many query rows several, so the
scores of one segment stay small.

The arithmetic is float32 (float64 for float64 inputs), as in the reference. bfloat16 and
float16 caches are upcast a few thousand keys at a time into a reused float32 buffer that
stays in the processor's cache, so no float32 copy of the cache is ever made. Which matrix
product runs is chosen by measurement on a 2-core AVX-512 CPU (benchmarks/decode.py,
docs/benchmarks.md): with at most 4 rows per key/value head, one batched product of the
keys with the queries (MKL is fast for that shape); with more rows, and for the weights
times the values, oneDNN's matrix product (`torch.ops.mkldnn._linear_pointwise`, one call
per key/value head), which MKL's small-row products trail by up to 3x. Without oneDNN, or
in float64, `torch.matmul` does everything.

This fast path runs without autograd, dropout or score functions (the inference case:
optionally causal, windowed or masked, e.g. by a key-padding mask for rows of different
cache lengths). Anything else runs on the tiled engine with a one-query-block plan, so the
backward pass, dropout and score functions are the tiled backend's.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import tiled
from ._spec import AttentionSpec
from .api import register_backend
from .reference import compute_dtype

MAX_QUERIES = 16  # more new tokens than this per sequence: use the tiled backend
AUTO_MIN_KEYS = 2048  # below this the cache is too short for the bandwidth to matter
_CHUNK_ENTRIES = 1 << 20  # tiled fallback: score entries (B x Hq x Lq x chunk) per cache chunk
_SEGMENT_ENTRIES = 1 << 22  # fast path: score entries (B x Hq x Lq x keys) per segment, 16 MiB in float32
_UPCAST_BYTES = 1 << 22  # fast path: float32 bytes of one upcast chunk of keys (or values), all heads
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


def _sizes(spec: AttentionSpec) -> tuple[int, int]:
    """(keys per segment, keys per upcast chunk) for these sizes."""
    if _override is not None:
        return _override
    segment = max(1024, _SEGMENT_ENTRIES // max(1, spec.B * spec.Hq * spec.Lq))
    upcast = max(256, _UPCAST_BYTES // (4 * spec.B * spec.Hkv * max(spec.D, spec.Dv)))
    return segment, upcast


# ------------------------------------------------------------------ the tiled fallback
def plan(spec: AttentionSpec) -> tiled.Plan:
    """All queries in one block; the cache in chunks of up to 2^20 score entries."""
    rows = max(1, spec.B * spec.Hq * spec.Lq)
    chunk = max(1024, _CHUNK_ENTRIES // rows)
    return tiled.band_plan(spec, block_q=max(1, spec.Lq), block_k=max(1, min(chunk, spec.Lk)))


# ------------------------------------------------------------------ the fast path
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


def _per_head(fn, a: Tensor, b: Tensor) -> Tensor:
    """fn(a[i, j], b[i, j]) for every (batch row, kv head), stacked: (B, Hkv, ...)."""
    B, H = a.shape[:2]
    return torch.stack([torch.stack([fn(a[i, j], b[i, j]) for j in range(H)]) for i in range(B)])


def _use_onednn(x: Tensor) -> bool:
    return _LINEAR is not None and x.dtype == torch.float32 and x.device.type == "cpu"


def _scores(q_rows: Tensor, k: Tensor, ct: torch.dtype, upcast_keys: int) -> Tensor:
    """q_rows (B, Hkv, M, D) scaled, k (B, Hkv, n, D) in any float dtype -> (B, Hkv, M, n) in ct, row-major."""
    B, Hkv, M, _ = q_rows.shape
    n = k.shape[2]
    if k.dtype == ct:
        return _scores_of(q_rows, k).contiguous()
    # Upcast a chunk at a time into a buffer that stays in the processor's cache.
    s = torch.empty(B, Hkv, M, n, dtype=ct, device=k.device)
    buf = torch.empty(B, Hkv, min(n, upcast_keys), k.shape[3], dtype=ct, device=k.device)
    for c0 in range(0, n, upcast_keys):
        c1 = min(n, c0 + upcast_keys)
        k_c = buf[:, :, : c1 - c0].copy_(k[:, :, c0:c1])  # (B, Hkv, c, D)
        s[..., c0:c1] = _scores_of(q_rows, k_c)
    return s


def _scores_of(q_rows: Tensor, k: Tensor) -> Tensor:
    """q_rows (B, Hkv, M, D), k (B, Hkv, n, D) of one dtype -> q_rows @ k^T (B, Hkv, M, n), maybe a transposed view."""
    if q_rows.shape[2] > _KQ_MAX_ROWS and _use_onednn(k):
        return _per_head(_LINEAR, q_rows, k)  # (B, Hkv, M, n)
    # (B, Hkv, n, D) @ (B, Hkv, D, M) -> (B, Hkv, n, M): MKL's fast shape for a few rows
    return torch.matmul(k, q_rows.transpose(-1, -2)).transpose(-1, -2)


def _weighted_values(p: Tensor, v: Tensor, ct: torch.dtype, upcast_keys: int) -> Tensor:
    """p (B, Hkv, M, n) in ct, v (B, Hkv, n, Dv) in any float dtype -> p @ v (B, Hkv, M, Dv) in ct."""
    if v.dtype != ct:
        B, Hkv, M, n = p.shape
        o = torch.zeros(B, Hkv, M, v.shape[3], dtype=ct, device=v.device)
        buf = torch.empty(B, Hkv, min(n, upcast_keys), v.shape[3], dtype=ct, device=v.device)
        for c0 in range(0, n, upcast_keys):
            c1 = min(n, c0 + upcast_keys)
            v_c = buf[:, :, : c1 - c0].copy_(v[:, :, c0:c1])  # (B, Hkv, c, Dv)
            o += _weighted_values(p[..., c0:c1], v_c, ct, upcast_keys)
        return o
    if _use_onednn(v):
        return _per_head(lambda p_h, v_h: _LINEAR(p_h, v_h.t()), p, v)  # (B, Hkv, M, Dv)
    return torch.matmul(p, v)


def _rows_view(t: Tensor, Hkv: int, G: int) -> Tensor:
    """A constraint broadcastable to (B, Hq, Lq, n) as one broadcastable to (B, Hkv, G, Lq, n)."""
    t = t.view((1,) * (4 - t.dim()) + tuple(t.shape))  # (b|1, Hq|1, Lq|1, n|1)
    return t.unsqueeze(2) if t.shape[1] == 1 else t.unflatten(1, (Hkv, G))


def _segment(q_rows: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, j0: int, j1: int,
             upcast_keys: int) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax statistics of keys [j0, j1): row max (B, Hkv, M, 1), row sum (B, Hkv, M, 1) and
    weighted values (B, Hkv, M, Dv), all relative to the row max (zeros where it is -inf)."""
    ct = q_rows.dtype
    s = _scores(q_rows, k[:, :, j0:j1], ct, upcast_keys)  # (B, Hkv, M, n), row-major
    allowed, bias = spec.constraints(0, spec.Lq, j0, j1, s.device)
    if bias is not None or allowed is not None:
        s5 = s.unflatten(2, (spec.groups, spec.Lq))  # (B, Hkv, G, Lq, n): row g*Lq + i is head g, query i
        if bias is not None:
            s5 += _rows_view(bias, spec.Hkv, spec.groups).to(ct)
        if allowed is not None:
            s5.masked_fill_(~_rows_view(allowed, spec.Hkv, spec.groups), float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)  # (B, Hkv, M, 1)
    # Rows that see no key here keep a reference of 0 so exp() gives 0, not NaN.
    p = s.sub_(row_max.masked_fill(torch.isneginf(row_max), 0.0)).exp_()  # (B, Hkv, M, n)
    row_sum = p.sum(dim=-1, keepdim=True)  # (B, Hkv, M, 1)
    return row_max, row_sum, _weighted_values(p, v[:, :, j0:j1], ct, upcast_keys)


def _merge(state, part):
    """Two partial results over disjoint keys -> their union (the lse merge, in max/sum form)."""
    if state is None:
        return part
    (m0, l0, o0), (m1, l1, o1) = state, part
    row_max = torch.maximum(m0, m1)
    ref = row_max.masked_fill(torch.isneginf(row_max), 0.0)
    a0, a1 = torch.exp(m0 - ref), torch.exp(m1 - ref)  # (B, Hkv, M, 1) each
    return row_max, l0 * a0 + l1 * a1, o0 * a0 + o1 * a1


def _fast_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """The segmented decode step without autograd: q (B, Hq, Lq, D), k (B, Hkv, Lk, D),
    v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) in the compute dtype."""
    ct = compute_dtype(q.dtype)
    B, Hq, Hkv, G, Lq, D, Dv = spec.B, spec.Hq, spec.Hkv, spec.groups, spec.Lq, spec.D, spec.Dv
    M = G * Lq
    lo, hi = spec.kv_range(0, Lq)  # the keys the causal/window band lets any query see
    lo, hi = max(lo, 0), min(hi, spec.Lk)
    if hi <= lo or Lq == 0:
        out = torch.zeros(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
        return out, torch.full((B, Hq, Lq), float("-inf"), dtype=ct, device=q.device)
    q_rows = (q.to(ct) * spec.scale).reshape(B, Hkv, M, D)  # (B, Hkv, G*Lq, D): row g*Lq + i
    segment, upcast_keys = _sizes(spec)
    state = None
    for j0 in range(lo, hi, segment):
        state = _merge(state, _segment(q_rows, k, v, spec, j0, min(hi, j0 + segment), upcast_keys))
    row_max, row_sum, acc = state
    out = acc / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))  # (B, Hkv, M, Dv)
    lse = row_max.masked_fill(torch.isneginf(row_max), 0.0) + torch.log(row_sum)  # (B, Hkv, M, 1)
    return out.view(B, Hq, Lq, Dv).to(q.dtype), lse.view(B, Hq, Lq)


def _fast_path_applies(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> bool:
    if spec.dropout_p > 0.0 or spec.score_mod is not None:
        return False
    if torch.is_grad_enabled():
        mask = spec.float_mask
        if q.requires_grad or k.requires_grad or v.requires_grad or (mask is not None and mask.requires_grad):
            return False
    return True


# ------------------------------------------------------------------ the backend
def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    if spec.Lq > MAX_QUERIES:
        return (f"the decode backend takes at most {MAX_QUERIES} queries per sequence; got Lq={spec.Lq}. "
                "Use backend='tiled' (or 'auto') for prefill")
    return tiled.unsupported(spec, q, need_lse)


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq<=16, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""
    if _fast_path_applies(q, k, v, spec):
        out, lse = _fast_forward(q, k, v, spec)
        return out, (lse if need_lse else None)
    return tiled.run(q, k, v, spec, plan(spec), need_lse=need_lse)


def auto_rule(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    """`auto` sends single-token decode steps against a long cache here.

    Measured with benchmarks/decode.py (docs/benchmarks.md): with one query per sequence the
    decode backend beat SDPA at every cache length, float32 and bfloat16; with 8 queries the
    results were mixed, so chunks of several queries stay with SDPA under `auto`.
    """
    if spec.Lq == 1 and spec.Lk >= AUTO_MIN_KEYS and spec.dropout_p == 0.0:
        return "decode"
    return None


register_backend("decode", forward, unsupported, auto_rule)

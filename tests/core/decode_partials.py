"""The native decode kernel's work items (qkv_decode_partials) merged and finished by torch
(flash.merge_states, flash.finish): the float32 result of the kernel's products before the
whole step (qkv_decode) merges in C++ and rounds out to the cache's dtype. Shared by the
decode kernel's tests as a cross-check of the C++ merge and as the float32 result to bound."""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from qkv.core.engines import decode_native
from qkv.core.engines.flash import finish, merge_states
from qkv.core.spec import build_spec


def partials_merged_by_torch(q, k, v, S: Optional[int] = None, threads: int = 2, **kw):
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), float32 or bfloat16, under a causal
    or window band (no masks) -> out (B, Hq, Lq, Dv) and lse (B, Hq, Lq), both float32, from S
    splits (default: the kernel's own count on `threads` threads)."""
    spec = build_spec(q, k, v, **kw)
    assert spec.bool_mask is None and spec.float_mask is None, "masks are not passed to the partials here"
    B, Hq, Hkv, G, Lq, D, Dv = spec.B, spec.Hq, spec.Hkv, spec.groups, spec.Lq, spec.D, spec.Dv
    lo, hi = spec.kv_range(0, Lq)
    lo, hi = max(lo, 0), min(hi, spec.Lk)
    kernel = decode_native.lib()
    S = decode_native.splits(B * Hkv, hi - lo, threads) if S is None else S
    M = G * Lq
    q_rows = (q.float() * spec.scale).reshape(B, Hkv, M, D).contiguous()  # (B, Hkv, M, D): row g*Lq + i
    q16 = q.reshape(B, Hkv, M, D).contiguous() if q.dtype == torch.bfloat16 and kernel.bf16_dot else None
    band = torch.cat(spec.band_edges(torch.arange(Lq))).contiguous()  # (2 * Lq,): row_lo then row_hi
    m, lsum, acc = torch.empty(B, Hkv, S, M), torch.empty(B, Hkv, S, M), torch.empty(B, Hkv, S, M, Dv)
    bad = torch.zeros(B, Hkv, S, dtype=torch.int32)
    p = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
    i64 = decode_native._i64
    rc = kernel.qkv_decode_partials(
        1 if k.dtype == torch.bfloat16 else 0, p(q_rows), p(q16), spec.scale, p(k), p(v),
        i64(k.stride()[:3]), i64(v.stride()[:3]), B, Hkv, G, Lq, D, Dv, p(band),
        ctypes.c_void_p(band.data_ptr() + 8 * Lq), None, i64((0,) * 4), None, i64((0,) * 4), lo, hi, S,
        p(m), p(lsum), p(acc), p(bad), threads)
    assert rc == 0 and not bool(bad.any()), "the partials failed or flagged finite inputs"
    row_max, row_sum, acc = merge_states(m, lsum, acc, dim=2)  # (B, Hkv, M), (B, Hkv, M), (B, Hkv, M, Dv)
    out, lse = finish(row_max.unsqueeze(-1), row_sum.unsqueeze(-1), acc)
    return out.view(B, Hq, Lq, Dv), lse.view(B, Hq, Lq)

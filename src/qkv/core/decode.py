"""Decode backend: a few new queries against a long KV cache.

A decode step reads every cached key and value once, so its speed limit is memory
bandwidth, not arithmetic. The grouped-query heads of each key/value head are folded into
the rows of one problem (Ainslie et al., 2023, GQA), so keys and values are read once per
key/value head and never copied per query head. The cache is cut into splits whose partial
softmax results (row max, row sum, weighted values) are merged through their running max,
the FlashAttention-2 online softmax (Dao, 2023) applied over the cache as in Flash-Decoding
(Dao, Haziza, Massa and Sizov, 2023, "Flash-Decoding for long-context inference").

Two engines compute the same thing:

- The native kernel (csrc/decode_kernel.cpp, compiled on first use by `_kernels`) takes
  float32 and bfloat16 caches: one pass over each split in blocks of 64 keys, the scores
  of a block, its online-softmax update and its weighted values all in registers and L1,
  bfloat16 widened in registers (or multiplied by the AVX512-BF16 dot product where the
  processor has one), the next block's keys prefetched while this one's values are
  summed; work items (batch row, kv head, split) on torch's OpenMP threads. On a 2-core
  AVX-512 CPU it reads the cache at 73-88% of the memory-read bandwidth measured in the
  same run while memory reads at about 45 GB/s, and at 59-76% when it reads at about
  75 GB/s, where its arithmetic (64 512-bit multiply-adds per key for 4 float32 rows of
  128) is the limit (benchmarks/decode.py, docs/benchmarks.md).
- The eager segments, for float16 and float64 caches, mask functions, and machines where
  the kernel cannot be compiled (with a warning once): matrix products per segment, in
  float32 (float64 for float64 inputs) as in the reference. bfloat16 and float16 caches
  are upcast one kv head and 4 MiB of float32 at a time into a reused buffer that stays in
  the processor's cache, so no float32 copy of the cache is ever made. With at most 4 rows
  per key/value head, one batched product of the keys with the queries (MKL is fast for
  that shape); with more rows, and for the weights times the values, oneDNN's matrix
  product (`torch.ops.mkldnn._linear_pointwise`, one call per key/value head). Without
  oneDNN, or in float64, `torch.matmul` does everything.

Both engines check what they read for NaN and infinity as they go (a non-finite raw score,
before any mask, or a non-finite result), so that the dispatch's non-finite guard
(core/_finite.py) scans only the queries here: scanning the cache as well would cost as much
as the step itself. When they see one, the guard recomputes the step by its rule.

This fast path runs without autograd, dropout or score functions (the inference case:
optionally causal, windowed or masked, e.g. by a key-padding mask for rows of different
cache lengths). Anything else runs on the tiled engine with a one-query-block plan, so the
backward pass, dropout and score functions are the tiled backend's.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import _finite, _kernels, tiled
from .spec import AttentionSpec
from .api import register_backend
from .reference import compute_dtype

MAX_QUERIES = 16  # more new tokens than this per sequence: use the tiled backend
AUTO_MIN_KEYS = 2048  # below this the cache is too short for the bandwidth to matter
AUTO_MIN_KEYS_CHUNK = 8192  # the same for a chunk of 2 to 16 new queries
# With the native kernel: bytes of keys and values read, (one query, a chunk of 2 to 16); see auto_rule
KERNEL_AUTO_MIN_BYTES = {torch.float32: (3 << 20, 2 << 20), torch.bfloat16: (128 << 10, 512 << 10)}
_CHUNK_ENTRIES = 1 << 20  # tiled fallback: score entries (B x Hq x Lq x chunk) per cache chunk
_SEGMENT_ENTRIES = 1 << 20  # fast path: score entries per segment (see _sizes), 4 MiB in float32
_UPCAST_BYTES = 1 << 22  # fast path: float32 bytes of one upcast chunk of one kv head's keys (or values)
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


def _use_onednn(x: Tensor) -> bool:
    return _LINEAR is not None and x.dtype == torch.float32 and x.device.type == "cpu"


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
    is (or a score overflows), for the non-finite check (core/_finite.py)."""
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


def _merge(state, part):
    """Two partial results over disjoint keys -> their union (the lse merge, in max/sum form)."""
    if state is None:
        return part
    (m0, l0, o0), (m1, l1, o1) = state, part
    row_max = torch.maximum(m0, m1)
    ref = row_max.masked_fill(torch.isneginf(row_max), 0.0)
    a0, a1 = torch.exp(m0 - ref), torch.exp(m1 - ref)  # (B, Hkv, M, 1) each
    return row_max, l0 * a0 + l1 * a1, o0 * a0 + o1 * a1


def _pieces(spec: AttentionSpec, lo: int, hi: int, segment: int) -> list[tuple[int, int]]:
    """Keys [lo, hi) as segments of at most `segment` keys.

    The keys every query sees under the causal/window band (the core) are cut apart from
    the few at its edges (the last Lq - 1 under causal), so only the edge segments build and
    apply a band mask.
    """
    core_lo = lo if spec.left is None else min(hi, max(lo, spec.Lq - 1 + spec.offset - spec.left))
    core_hi = hi if spec.right is None else max(core_lo, min(hi, spec.offset + spec.right + 1))
    pieces = [(lo, core_lo)] if core_lo > lo else []
    pieces += [(j0, min(core_hi, j0 + segment)) for j0 in range(core_lo, core_hi, segment)]
    pieces += [(j0, min(hi, j0 + segment)) for j0 in range(core_hi, hi, segment)]
    return pieces


def _fast_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor, Tensor]:
    """The segmented decode step without autograd: q (B, Hq, Lq, D), k (B, Hkv, Lk, D),
    v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) in the compute dtype,
    and a 0-d bool tensor: whether a raw score (before masks) was NaN or infinite."""
    ct = compute_dtype(q.dtype)
    B, Hq, Hkv, G, Lq, D, Dv = spec.B, spec.Hq, spec.Hkv, spec.groups, spec.Lq, spec.D, spec.Dv
    M = G * Lq
    lo, hi = spec.kv_range(0, Lq)  # the keys the causal/window band lets any query see
    lo, hi = max(lo, 0), min(hi, spec.Lk)
    if hi <= lo or Lq == 0:
        out = torch.zeros(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
        return out, torch.full((B, Hq, Lq), float("-inf"), dtype=ct, device=q.device), torch.tensor(False)
    q_rows = (q.to(ct) * spec.scale).reshape(B, Hkv, M, D)  # (B, Hkv, G*Lq, D): row g*Lq + i
    if _kernel_applies(q, k, v, spec):
        lib = _kernel_lib()
        if lib is not None:
            q16 = q.reshape(B, Hkv, M, D).contiguous() if q.dtype == torch.bfloat16 and lib.bf16_dot else None
            out, lse, suspect = _kernel_forward(lib, q_rows, q16, k, v, spec, lo, hi)
            return out.to(q.dtype), lse, suspect
        _kernels.warn_unavailable("decode_kernel", "the decode backend runs its slower eager path")
    segment, upcast_keys = _sizes(spec, _batched(M, k, ct))
    state, raw = None, []
    for j0, j1 in _pieces(spec, lo, hi, segment):
        state = _merge(state, _segment(q_rows, k, v, spec, j0, j1, upcast_keys, raw))
    row_max, row_sum, acc = state
    out = acc / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))  # (B, Hkv, M, Dv)
    lse = row_max.masked_fill(torch.isneginf(row_max), 0.0) + torch.log(row_sum)  # (B, Hkv, M, 1)
    suspect = ~torch.isfinite(torch.stack(raw).sum())
    return out.view(B, Hq, Lq, Dv).to(q.dtype), lse.view(B, Hq, Lq), suspect


# ------------------------------------------------------------------ the native kernel
_KERNEL_KINDS = {torch.float32: 0, torch.bfloat16: 1}
_KERNEL_MIN_KEYS_PER_SPLIT = 1024


def _kernel_applies(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> bool:
    """The fused kernel (csrc/decode_kernel.cpp) takes float32 and bfloat16 CPU caches whose
    rows are contiguous, under the band and dense masks; mask and block-mask functions, and
    other dtypes, run the eager segments."""
    return (q.device.type == "cpu" and k.dtype in _KERNEL_KINDS and v.dtype == k.dtype
            and k.stride(-1) == 1 and v.stride(-1) == 1
            and spec.mask_mod is None and spec.block_mask is None)


def _kernel_splits(items: int, keys: int, threads: int) -> int:
    """Splits of the cache per (batch row, kv head): enough work items to keep the threads
    busy, each of at least _KERNEL_MIN_KEYS_PER_SPLIT keys; under `split_sizes`, pieces of
    at most its segment length."""
    if _override is not None:
        return max(1, -(-keys // _override[0]))
    return max(1, min(-(-4 * threads // items), keys // _KERNEL_MIN_KEYS_PER_SPLIT))


def _i64(values) -> "ctypes.Array":
    return (ctypes.c_int64 * len(values))(*[int(x) for x in values])


def _kernel_forward(lib, q_rows: Tensor, q16: Optional[Tensor], k: Tensor, v: Tensor, spec: AttentionSpec,
                    lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """The decode step in one fused pass over the cache: q_rows (B, Hkv, M, D) float32 and
    scaled; q16 the same rows unscaled in bfloat16 for a bfloat16 cache where the processor
    has a bfloat16 dot product (else None); k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out
    (B, Hq, Lq, Dv) float32, lse (B, Hq, Lq) float32, and a 0-d bool tensor: whether a raw
    score was NaN or infinite. Keys [lo, hi) are cut into S splits, run as B*Hkv*S work items
    on torch's thread count, whose partial states are merged here through their row max."""
    B, Hq, Hkv, G, Lq, Lk, D, Dv = spec.B, spec.Hq, spec.Hkv, spec.groups, spec.Lq, spec.Lk, spec.D, spec.Dv
    M = G * Lq
    threads = max(1, torch.get_num_threads())
    S = _kernel_splits(B * Hkv, hi - lo, threads)
    q_rows = q_rows.contiguous()
    # Each query's band of keys [row_lo, row_hi), from its diagonal key offset + i, in one
    # (2 * Lq,) tensor: few small torch calls, as a decode step is short.
    lows = [0 if spec.left is None else min(max(spec.offset + i - spec.left, 0), Lk) for i in range(Lq)]
    highs = [Lk if spec.right is None else min(max(spec.offset + i + spec.right + 1, 0), Lk) for i in range(Lq)]
    band = torch.tensor(lows + highs, dtype=torch.long)  # (2 * Lq,): row_lo then row_hi
    shape = (B, Hq, Lq, Lk)
    allow = None if spec.bool_mask is None else spec.bool_mask.expand(shape)  # strides 0 where broadcast
    bias = None if spec.float_mask is None else spec.float_mask.to(torch.float32).expand(shape)
    out_m, out_l, out_acc = torch.empty(B, Hkv, S, M), torch.empty(B, Hkv, S, M), torch.empty(B, Hkv, S, M, Dv)
    out_bad = torch.zeros(B, Hkv, S, dtype=torch.int32)  # 1 where a raw score was not finite
    ptr = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = lib.qkv_decode_partials(
        _KERNEL_KINDS[k.dtype], ptr(q_rows), ptr(q16), spec.scale, ptr(k), ptr(v), _i64(k.stride()[:3]), _i64(v.stride()[:3]),
        B, Hkv, G, Lq, D, Dv, ptr(band), ctypes.c_void_p(band.data_ptr() + 8 * Lq),
        ptr(allow), _i64(allow.stride() if allow is not None else (0,) * 4),
        ptr(bias), _i64(bias.stride() if bias is not None else (0,) * 4),
        lo, hi, S, ptr(out_m), ptr(out_l), ptr(out_acc), ptr(out_bad), threads)
    if rc != 0:
        raise RuntimeError(f"qkv decode kernel failed with code {rc}")
    if S == 1:
        row_max, row_sum, acc = out_m[:, :, 0], out_l[:, :, 0], out_acc[:, :, 0]  # (B, Hkv, M[, Dv])
    else:  # merge the splits through their row max
        row_max = out_m.amax(dim=2)  # (B, Hkv, M)
        ref = row_max.masked_fill(torch.isneginf(row_max), 0.0)
        w = torch.exp(out_m - ref.unsqueeze(2))  # (B, Hkv, S, M); 0 where a split saw nothing
        row_sum = (out_l * w).sum(dim=2)  # (B, Hkv, M)
        acc = (out_acc * w.unsqueeze(-1)).sum(dim=2)  # (B, Hkv, M, Dv)
    # A row that saw a key has row_sum >= 1 (its largest score contributes exp(0)); one that
    # saw none has row_sum = 0 and acc = 0, so dividing by max(row_sum, 1) gives it zeros,
    # and its lse is -inf + log(0) = -inf.
    out = acc / row_sum.clamp_min(1.0).unsqueeze(-1)  # (B, Hkv, M, Dv)
    lse = row_max + torch.log(row_sum)  # (B, Hkv, M)
    return out.view(B, Hq, Lq, Dv), lse.view(B, Hq, Lq), out_bad.any()


_typed: set[int] = set()


def _kernel_lib():
    """The compiled csrc/decode_kernel.cpp with its ctypes signatures, or None (see _kernels)."""
    lib = _kernels.load("decode_kernel")
    if lib is None or id(lib) in _typed:
        return lib
    p, i64, i64p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    lib.qkv_decode_partials.restype = ctypes.c_int
    lib.qkv_decode_partials.argtypes = [
        ctypes.c_int, p, p, ctypes.c_float, p, p, i64p, i64p, i64, i64, i64, i64, i64, i64, p, p, p, i64p, p, i64p,
        i64, i64, i64, p, p, p, p, ctypes.c_int]
    lib.qkv_decode_has_bf16_dot.restype = ctypes.c_int
    lib.bf16_dot = bool(lib.qkv_decode_has_bf16_dot())
    _typed.add(id(lib))
    return lib


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
        out, lse, suspect = _fast_forward(q, k, v, spec)
        # A non-finite key or value read here, or a masked value's NaN leaking through 0 * NaN,
        # shows as a non-finite raw score or result: the guard then recomputes by the rule.
        # (An lse of -inf is a row that sees no key, which is honest; NaN or +inf is not.)
        _finite.report(suspect | ~torch.isfinite(out.sum()) | torch.isnan(lse.sum()))
        return out, (lse if need_lse else None)
    return tiled.run(q, k, v, spec, plan(spec), need_lse=need_lse)


def auto_rule(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    """`auto` sends decode steps against a long cache here.

    With the native kernel (float32 or bfloat16 on the CPU, no mask function, no gradient
    for q), by the bytes of keys and values a step reads. Measured twice each with `python
    benchmarks/decode.py --lengths 256 1024 2048 4096 --queries 1 8 16 --repeats 5`, at
    B=1, Hq=32, Hkv=8, D=128 and with `--heads 8 --kv-heads 2 --dim 64` (docs/benchmarks.md),
    as SDPA time / decode time: float32, one query: 0.83x-1.03x at 2 MiB of cache, 1.42x-1.55x
    at 4 MiB, 1.76x at 8 MiB; float32, 8 or 16 queries: 0.96x-1.12x at 1 MiB, 1.08x-1.34x at
    2 MiB; bfloat16, where SDPA is slow for one query: 1.78x-1.92x at 128 KiB; bfloat16, 8 or
    16 queries: 0.71x-0.91x at 128 KiB, 1.38x-1.47x at 512 KiB. Hence KERNEL_AUTO_MIN_BYTES.

    Without the kernel (eager segments), measured with `python benchmarks/decode.py
    --lengths 4096 32768 131072 --queries 1 8 16` before the kernel: one query beat SDPA
    from 4096 keys on (2.2x-4.7x float32, 5.1x-9.0x bfloat16); 8 and 16 causal queries by
    2.2x-2.7x from 32768 keys on, but only 0.98x-1.34x at 4096. So: one query from
    AUTO_MIN_KEYS cached keys on; up to MAX_QUERIES from AUTO_MIN_KEYS_CHUNK on, when the
    no-grad fast path applies.
    """
    if spec.dropout_p > 0.0 or spec.Lq > MAX_QUERIES or spec.Lk == 0:
        return None
    fast = spec.score_mod is None and not (torch.is_grad_enabled() and q.requires_grad)
    by_length = (spec.Lq == 1 and spec.Lk >= AUTO_MIN_KEYS) or (fast and spec.Lk >= AUTO_MIN_KEYS_CHUNK)
    if (fast and q.device.type == "cpu" and q.dtype in KERNEL_AUTO_MIN_BYTES and spec.mask_mod is None
            and spec.block_mask is None):
        nbytes = spec.B * spec.Hkv * spec.Lk * (spec.D + spec.Dv) * q.element_size()
        one, chunk = KERNEL_AUTO_MIN_BYTES[q.dtype]
        by_bytes = nbytes >= (one if spec.Lq == 1 else chunk)
        # The kernel is looked up (compiled on first use) only where it changes the answer,
        # so short self-attention (an encoder's sentence of <= 16 tokens) never builds it.
        if (by_bytes or by_length) and _kernel_lib() is not None:
            return "decode" if by_bytes else None
    return "decode" if by_length else None


register_backend("decode", forward, unsupported, auto_rule, memory=tiled.memory,
                 self_checking=lambda spec, q, k, v: _fast_path_applies(q, k, v, spec))

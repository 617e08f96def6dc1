"""Decode backend: a few new queries against a long KV cache.

A decode step reads every cached key and value once, so its speed limit is memory
bandwidth, not arithmetic. The grouped-query heads of each key/value head are folded into
the rows of one problem (Ainslie et al., 2023, GQA), so keys and values are read once per
key/value head and never copied per query head. The cache is cut into splits whose partial
softmax results (row max, row sum, weighted values) are merged through their running max,
the FlashAttention-2 online softmax (Dao, 2023) applied over the cache as in Flash-Decoding
(Dao, Haziza, Massa and Sizov, 2023, "Flash-Decoding for long-context inference").

Two engines compute the same thing: the native kernel (engines/decode_native.py, float32
and bfloat16 caches on the CPU) and the eager segments (engines/decode_eager.py: float16 and
float64 caches, mask functions, and machines where the kernel cannot be compiled, with a
warning once). Both check what they read for NaN and infinity as they go (a non-finite raw
score, before any mask, or a non-finite result), so that the dispatch's non-finite guard
(core/finite.py) checks only the queries (one sum) and a float mask here: scanning the
cache as well would cost as much as the step itself. When they see one, the guard
recomputes the step by its rule.

This fast path runs without autograd, dropout or score functions (the inference case:
optionally causal, windowed or masked, e.g. by a key-padding mask for rows of different
cache lengths). Anything else runs on the tiled engine with a one-query-block plan, so the
backward pass, dropout and score functions are the tiled backend's. Layout:
docs/architecture.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _kernels, finite
from ..engines import decode_eager, decode_native, flash
from ..spec import AttentionSpec, compute_dtype
from .base import Backend

MAX_QUERIES = 16  # more new tokens than this per sequence: use the tiled backend
AUTO_MIN_KEYS = 2048  # below this the cache is too short for the bandwidth to matter
AUTO_MIN_KEYS_CHUNK = 8192  # the same for a chunk of 2 to 16 new queries
# With the native kernel: bytes of keys and values read, (one query, a chunk of 2 to 16); see auto.
# An AVX-512 build (vector width 16); the least of every width's, so it is checked first.
KERNEL_AUTO_MIN_BYTES = {torch.float32: (3 << 20, 2 << 20), torch.bfloat16: (128 << 10, 512 << 10)}
# On Zen 5 (`_kernels.zen5_cpu`), measured against qkv's SDPA backend, what `auto` runs below the floor (see
# auto): (one query, a chunk of 2 to 16 with at least ZEN5_CHUNK_KEYS_PER_QUERY cached keys per query).
ZEN5_KERNEL_AUTO_MIN_BYTES = {torch.float32: (256 << 10, 16 << 10), torch.bfloat16: (16 << 10, 8 << 10)}
ZEN5_CHUNK_KEYS_PER_QUERY = 2  # a chunk as long as its cache (Lq = Lk = 16) lost there: 0.75x-0.96x
# Builds without AVX-512, by vector width (8: AVX2, with FMA; 4: SSE, NEON, and AVX without FMA);
# None: not measured to win.
NARROW_KERNEL_AUTO_MIN_BYTES: dict[int, dict[torch.dtype, tuple[int, Optional[int]]]] = {
    8: {torch.float32: (4 << 20, 16 << 20), torch.bfloat16: (256 << 10, 8 << 20)},
    4: {torch.float32: (8 << 20, None), torch.bfloat16: (256 << 10, None)},
}
_CHUNK_ENTRIES = 1 << 20  # tiled fallback: score entries (B x Hq x Lq x chunk) per cache chunk


def plan(spec: AttentionSpec) -> flash.Plan:
    """All queries in one block; the cache in chunks of up to 2^20 score entries."""
    rows = max(1, spec.B * spec.Hq * spec.Lq)
    chunk = max(1024, _CHUNK_ENTRIES // rows)
    return flash.band_plan(spec, block_q=max(1, spec.Lq), block_k=max(1, min(chunk, spec.Lk)))


def _fast_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor, Tensor]:
    """The decode step without autograd, on the native kernel where it applies, else eager:
    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv) in q's dtype,
    lse (B, Hq, Lq) in the compute dtype, and a 0-d bool tensor, the non-finite guard's flag:
    whether a raw score (before masks) was NaN or infinite, or a result is (an output NaN or
    infinite, an lse NaN: a masked value's NaN leaking through 0 * NaN). The native kernel
    checks all of it as it finishes the rows; the eager engine's results are checked here."""
    ct = compute_dtype(q.dtype)
    B, Hq, Hkv, G, Lq, D, Dv = spec.B, spec.Hq, spec.Hkv, spec.groups, spec.Lq, spec.D, spec.Dv
    M = G * Lq
    lo, hi = spec.kv_range(0, Lq)  # the keys the causal/window band lets any query see
    lo, hi = max(lo, 0), min(hi, spec.Lk)
    if hi <= lo or Lq == 0:
        out = torch.zeros(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
        return out, torch.full((B, Hq, Lq), float("-inf"), dtype=ct, device=q.device), torch.tensor(False)
    if decode_native.applies(q, k, v, spec):
        kernel = decode_native.lib()
        if kernel is not None:  # out in q's dtype; suspect: queries, scores, outputs and lse checked by the kernel
            return decode_native.forward(kernel, q, k, v, spec, lo, hi)
        _kernels.warn_unavailable("decode_kernel", "the decode backend runs its slower eager path")
    q_rows = (q.to(ct) * spec.scale).reshape(B, Hkv, M, D)  # (B, Hkv, G*Lq, D): row g*Lq + i
    out, lse, suspect = decode_eager.forward(q_rows, k, v, spec, lo, hi)  # (B, Hq, Lq, Dv), (B, Hq, Lq)
    out = out.to(q.dtype)
    return out, lse, suspect | ~torch.isfinite(out.sum()) | torch.isnan(lse.sum())


def _fast_path_applies(spec: AttentionSpec) -> bool:
    """The inference case: no autograd (through q, k, v or a float mask), dropout or score function."""
    return spec.dropout_p == 0.0 and spec.score_mod is None and not spec.grad


_SEGMENT_BYTES = 16 << 20  # the eager engine's scores and upcast keys and values of one segment (decode_eager)


def memory(spec: AttentionSpec, q: Tensor, need_lse: bool) -> tuple[int, str]:
    """(bytes, what). The fast path reads the cache where it lies: the scaled queries, the output
    (and its cast), the lse, the native kernel's partial states per split, and the eager engine's
    one segment at a time; not the cache's size, so a long step does not read the free memory
    (`_memory.available`) on every call. Otherwise the tiled engine's estimate."""
    if not _fast_path_applies(spec):
        return flash.memory(spec, q, need_lse)
    rows = spec.B * spec.Hq * spec.Lq  # query rows
    parts = decode_native.splits(spec.B * spec.Hkv, max(spec.Lk, 1), torch.get_num_threads())
    need = 4 * rows * (spec.D + 2 * spec.Dv + 1 + parts * (spec.Dv + 2)) + _SEGMENT_BYTES
    if spec.float_mask is not None and spec.float_mask.dtype != torch.float32:
        need += 4 * spec.float_mask.numel()  # the kernel reads the mask as float32: one copy
    return need, "the queries, the output and the partial states of the cache's splits"


def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    if spec.Lq > MAX_QUERIES:
        return (f"the decode backend takes at most {MAX_QUERIES} queries per sequence; got Lq={spec.Lq}. "
                "Use backend='tiled' (or 'auto') for prefill")
    return flash.unsupported(spec, q, need_lse)


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq<=16, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""
    if _fast_path_applies(spec):
        out, lse, suspect = _fast_forward(q, k, v, spec)
        # A non-finite key or value read here, or a masked value's NaN leaking through 0 * NaN,
        # shows as a non-finite raw score or result (`suspect`): the guard then recomputes by the
        # rule. (An lse of -inf is a row that sees no key, which is honest; NaN is not.)
        finite.report(suspect)
        return out, (lse if need_lse else None)
    return flash.run(q, k, v, spec, plan(spec), need_lse=need_lse)


def auto(spec: AttentionSpec, q: Tensor, need_lse: bool) -> bool:
    """`auto` sends decode steps against a long cache here.

    With the native kernel (float32 or bfloat16 on the CPU, no mask function, no gradient
    for q), by the bytes of keys and values a step reads. Measured twice each with `python
    benchmarks/decode.py --lengths 256 1024 2048 4096 --queries 1 8 16 --repeats 5`, at
    B=1, Hq=32, Hkv=8, D=128 and with `--heads 8 --kv-heads 2 --dim 64` (docs/benchmarks.md),
    as SDPA time / decode time: float32, one query: 0.83x-1.03x at 2 MiB of cache, 1.42x-1.55x
    at 4 MiB, 1.76x at 8 MiB; float32, 8 or 16 queries: 0.96x-1.12x at 1 MiB, 1.08x-1.34x at
    2 MiB; bfloat16, where SDPA is slow for one query: 1.78x-1.92x at 128 KiB; bfloat16, 8 or
    16 queries: 0.71x-0.91x at 128 KiB, 1.38x-1.47x at 512 KiB. Hence KERNEL_AUTO_MIN_BYTES.

    That SDPA was torch's alone; below the floor `auto` runs qkv's SDPA backend, which first scans q,
    k and v for non-finite values (qkv.core.finite), a pass over the cache that costs most where the
    cache is short. Measured against it on Zen 5 (`_kernels.zen5_cpu`: AMD family 26, 2026-12-02;
    docs/benchmarks.md, "The native kernels, fourteenth part") with `python benchmarks/decode.py
    --lengths 16 32 64 128 256 384 512 1024 --queries 1 8 16 --qkv-sdpa --repeats 7` at Hq/Hkv/D of
    32/8/128, 8/2/64 and 12/12/64 (144 rows), as qkv SDPA time / qkv decode time: float32, one query,
    0.90x-1.21x up to 128 KiB, 1.24x-1.41x at 192 and 256 KiB, 1.26x-3.00x above; bfloat16, one query,
    1.18x at 8 KiB, 1.24x-14.99x from 16 KiB; chunks of 8 and 16 queries 1.39x-2.90x from 8 KiB except a
    chunk as long as its cache (16 queries on 16 keys: 0.75x-0.96x). Hence ZEN5_KERNEL_AUTO_MIN_BYTES and
    ZEN5_CHUNK_KEYS_PER_QUERY there (`_wide_min_bytes`).

    Builds without AVX-512 run narrower tiles (csrc/decode_kernel.cpp), measured on the same AMD
    EPYC, twice each (once through a throwaway script loading the same builds, once by this
    command), with `ATEN_CPU_CAPABILITY=avx2 python benchmarks/decode.py --march x86-64-v3
    --lengths 64 128 256 512 1024 2048 4096 32768 --queries 1 8 16 --repeats 5` (AVX2: 8 floats,
    against SDPA held to AVX2) and the same with `ATEN_CPU_CAPABILITY=default` and `--march
    x86-64-v2` (SSE4.2: 4 floats). AVX2: float32, one query, 0.92x-0.95x at 2 MiB, 1.35x-1.37x at
    4 MiB; 8 or 16 queries 0.65x-0.87x at 2-4 MiB, 0.93x-1.02x at 8 MiB, 1.03x-1.45x at 16 MiB;
    bfloat16, one query, 2.7x-3.1x from 64 keys (256 KiB); 8 or 16 queries 0.60x-1.10x up to 4
    MiB, 1.08x-1.21x at 8 MiB. SSE: float32, one query, 0.78x-0.97x at 4 MiB, 1.40x-1.50x at 8
    MiB; 8 or 16 queries 0.47x-1.01x up to 32 MiB (0.97x-1.37x at 256 MiB); bfloat16, one query,
    2.4x-2.7x from 64 keys; 8 or 16 queries 0.60x-0.93x up to 16 MiB (0.88x-1.18x at 128 MiB). Hence
    NARROW_KERNEL_AUTO_MIN_BYTES (kernel_min_bytes); a NEON build (ARM, 4 floats) takes the SSE
    build's rule, which was not measured on ARM. So does an AVX build without FMA (8 floats, e.g.
    Sandy Bridge), measured once with `ATEN_CPU_CAPABILITY=default ... --march sandybridge
    --lengths 64 256 512 1024 2048 4096 --queries 1 8 16`: the AVX2 rule would have sent it chunks
    that lost (bfloat16 0.79x-0.92x at 8 MiB, float32 0.93x-1.04x at 16 MiB); the SSE rule's claims
    won there (float32, one query, 1.58x at 8 MiB; bfloat16, one query, 2.8x-7.8x).

    Without the kernel (eager segments), measured with `python benchmarks/decode.py
    --lengths 4096 32768 131072 --queries 1 8 16` before the kernel: one query beat SDPA
    from 4096 keys on (2.2x-4.7x float32, 5.1x-9.0x bfloat16); 8 and 16 causal queries by
    2.2x-2.7x from 32768 keys on, but only 0.98x-1.34x at 4096. So: one query from
    AUTO_MIN_KEYS cached keys on; up to MAX_QUERIES from AUTO_MIN_KEYS_CHUNK on, when the
    no-grad fast path applies.
    """
    if spec.dropout_p > 0.0 or spec.Lq > MAX_QUERIES or spec.Lk == 0:
        return False
    fast = spec.score_mod is None and not spec.grad
    by_length = (spec.Lq == 1 and spec.Lk >= AUTO_MIN_KEYS) or (fast and spec.Lk >= AUTO_MIN_KEYS_CHUNK)
    if (fast and q.device.type == "cpu" and q.dtype in KERNEL_AUTO_MIN_BYTES and spec.mask_mod is None
            and spec.block_mask is None):
        nbytes = spec.B * spec.Hkv * spec.Lk * (spec.D + spec.Dv) * q.element_size()
        one, chunk = _wide_min_bytes(q.dtype, spec)
        by_bytes = nbytes >= (one if spec.Lq == 1 else chunk)
        # The kernel is looked up (compiled on first use) only where it changes the answer,
        # so short self-attention (an encoder's sentence of <= 16 tokens) never builds it.
        if (by_bytes or by_length) and (kernel := decode_native.lib()) is not None:
            least = kernel_min_bytes(q.dtype, kernel.vector_width, kernel.fma, spec)[0 if spec.Lq == 1 else 1]
            return least is not None and nbytes >= least
    return by_length


def _wide_min_bytes(dtype: torch.dtype, spec: Optional[AttentionSpec] = None) -> tuple[int, int]:
    """The AVX-512 build's (one query, chunk) bytes on this CPU: Zen 5's (ZEN5_KERNEL_AUTO_MIN_BYTES) where
    `_kernels.zen5_cpu` and the step (spec; None: any) is one query or a chunk with at least
    ZEN5_CHUNK_KEYS_PER_QUERY cached keys per query, else KERNEL_AUTO_MIN_BYTES."""
    zen5 = _kernels.zen5_cpu() and (spec is None or spec.Lq == 1 or spec.Lk >= ZEN5_CHUNK_KEYS_PER_QUERY * spec.Lq)
    return (ZEN5_KERNEL_AUTO_MIN_BYTES if zen5 else KERNEL_AUTO_MIN_BYTES)[dtype]


def kernel_min_bytes(dtype: torch.dtype, width: int, fma: bool,
                     spec: Optional[AttentionSpec] = None) -> tuple[int, Optional[int]]:
    """(one query, a chunk of 2 to 16): the bytes of keys and values from which `auto` sends a step
    to the native kernel of this vector width (16, 8 or 4 floats), with or without fused
    multiply-adds; None: never (see auto). Width 8 without FMA (AVX alone) takes the rule of 4. On
    Zen 5 the AVX-512 build's bytes for the step `spec` (None: any) are `_wide_min_bytes`'."""
    if width >= 16:
        return _wide_min_bytes(dtype, spec)
    return NARROW_KERNEL_AUTO_MIN_BYTES[8 if width >= 8 and fma else 4][dtype]


BACKEND = Backend("decode", forward, unsupported, memory=memory, auto=auto, priority=30,
                  self_checking=lambda spec, q, k, v: _fast_path_applies(spec))

"""The decode native engine: the ctypes binding of the C++ decode kernel.

The kernel (csrc/decode_kernel.cpp, compiled on first use by `qkv.core._kernels`) takes
float32 and bfloat16 caches: one pass over each split in blocks of 64 keys, the scores of a
block, its online-softmax update (Milakov & Gimelshein, 2018; FlashAttention-2, Dao 2023)
and its weighted values all in registers and L1, bfloat16 widened in registers (or, where
the processor has AVX512-BF16, both products on its bfloat16 dot product: the weights
rounded to bfloat16 before P V, as FlashAttention-2 does on GPUs), each piece of the cache
prefetched into L2 as the same piece 64 keys earlier is read; work items (batch row, kv
head, split) handed to torch's OpenMP threads as they come free. The kernel merges the
splits' partial states through their row max, as in Flash-Decoding (Dao, Haziza, Massa and
Sizov, 2023), and returns out and lse (`flash.merge_states` and `flash.finish` in C++). Its share
of the memory-read bandwidth on a 2-core AVX-512 CPU: benchmarks/decode.py and
docs/benchmarks.md. For the non-finite guard (core/finite.py) it flags a non-finite raw score,
as the eager engine does, and also a non-finite output, a NaN row max or a NaN or +inf lse
(which the eager engine's caller checks with torch). Layout: docs/architecture.md.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .. import _kernels
from ..spec import AttentionSpec
from . import decode_eager

_KERNEL_KINDS = {torch.float32: 0, torch.bfloat16: 1}
# qkv_decode_version(): 5 takes q as the caller holds it and writes out in the cache's dtype; 6 also says
# its vector width and whether it has FMA (qkv_decode_vector_width, qkv_decode_has_fma).
VERSION = 6
_KERNEL_MIN_KEYS_PER_SPLIT = 1024


def applies(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> bool:
    """The fused kernel (csrc/decode_kernel.cpp) takes float32 and bfloat16 CPU caches (and
    queries of the same dtype) whose rows are contiguous, under the band and dense masks; mask
    and block-mask functions, and other dtypes, run the eager segments."""
    return (q.device.type == "cpu" and k.dtype in _KERNEL_KINDS and v.dtype == k.dtype and q.dtype == k.dtype
            and k.stride(-1) == 1 and v.stride(-1) == 1
            and spec.mask_mod is None and spec.block_mask is None)


def splits(items: int, keys: int, threads: int) -> int:
    """Splits of the cache per (batch row, kv head): about 16 work items per thread, which the
    kernel hands to whichever thread is free, so that a thread that reads its part of the
    cache more slowly does not hold the step up; each of at least _KERNEL_MIN_KEYS_PER_SPLIT
    keys; under `split_sizes`, pieces of at most its segment length. (bfloat16, 32768 keys,
    B=1, Hkv=8, G=4, D=128, 2 threads, qkv.attention against a float32 read in turns, best of
    11, twice: 1 split 5.62-6.13 ms, 2 to 8 splits 5.43-5.84 ms; 131072 keys 20.68 against
    20.23 ms with 4; float32 at 32768 10.84 against 10.47 ms.)"""
    forced = decode_eager.forced_sizes()
    if forced is not None:
        return max(1, -(-keys // forced[0]))
    return max(1, min(-(-16 * threads // items), keys // _KERNEL_MIN_KEYS_PER_SPLIT))


def _i64(values) -> "ctypes.Array":
    return (ctypes.c_int64 * len(values))(*[int(x) for x in values])


def forward(kernel, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, lo: int,
            hi: int) -> tuple[Tensor, Tensor, Tensor]:
    """The decode step in one fused pass over the cache (`kernel` from `lib()`): q (B, Hq, Lq, D),
    k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), all float32 or all bfloat16 -> out (B, Hq, Lq, Dv) in
    their dtype, lse (B, Hq, Lq) float32, and a 0-d bool tensor: whether a query entry or a raw
    score was NaN or infinite, or an output is, or an lse is NaN or +inf. The kernel gathers the
    queries (scaled float32 rows, and the bfloat16 rows where the processor has a bfloat16 dot
    product) and writes out in the cache's dtype itself. Keys [lo, hi) are cut into S splits, run
    as B*Hkv*S work items on torch's thread count, whose partial states the kernel merges through
    their row max (as `flash.merge_states` and `flash.finish` do). Few torch operations here:
    after a long cache has streamed through the caches each one runs cold. At 32768 keys
    (bfloat16, B=1, Hkv=8, G=4, D=128, after a float32 read of as many bytes) the step spent
    0.50 ms outside the kernel with the merge, the finish and the band in torch, then 0.13 ms
    here plus 0.08-0.10 ms for the caller's scaled queries and the output's cast, which the
    kernel now does (a 5-6 ms step)."""
    B, Hq, Hkv, G, Lq, Lk, D, Dv = spec.B, spec.Hq, spec.Hkv, spec.groups, spec.Lq, spec.Lk, spec.D, spec.Dv
    threads = max(1, torch.get_num_threads())
    S = splits(B * Hkv, hi - lo, threads)
    if q.stride(-1) != 1:
        q = q.contiguous()
    # Each query's band of keys [row_lo, row_hi) in one (2 * Lq,) tensor: row_lo then row_hi;
    # without a causal or window band, none (every query sees all of [lo, hi)).
    band = torch.cat(spec.band_edges(torch.arange(Lq))).contiguous() if spec.banded else None  # (2 * Lq,) int64
    shape = (B, Hq, Lq, Lk)
    allow = None if spec.bool_mask is None else spec.bool_mask.expand(shape)  # strides 0 where broadcast
    bias = None if spec.float_mask is None else spec.float_mask.to(torch.float32).expand(shape)
    # (B, Hkv, M, Dv) and (B, Hkv, M) with row m = g*Lq + i, query head h*G + g: (B, Hq, Lq[, Dv])
    out, lse = torch.empty(B, Hq, Lq, Dv, dtype=k.dtype), torch.empty(B, Hq, Lq)
    bad = torch.empty((), dtype=torch.bool)  # the kernel writes it: a query, raw score, output or lse not finite
    ptr = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = kernel.qkv_decode(
        _KERNEL_KINDS[k.dtype], ptr(q), _i64(q.stride()[:3]), int(kernel.bf16_dot), spec.scale, ptr(k), ptr(v),
        _i64(k.stride()[:3]), _i64(v.stride()[:3]),
        B, Hkv, G, Lq, D, Dv, ptr(band), None if band is None else ctypes.c_void_p(band.data_ptr() + 8 * Lq),
        ptr(allow), _i64(allow.stride() if allow is not None else (0,) * 4),
        ptr(bias), _i64(bias.stride() if bias is not None else (0,) * 4),
        lo, hi, S, ptr(out), ptr(lse), ptr(bad), threads)
    if rc != 0:
        raise RuntimeError(f"qkv decode kernel failed with code {rc}")
    return out, lse, bad


_typed: set[int] = set()


def lib():
    """The compiled csrc/decode_kernel.cpp with its ctypes signatures, or None (see _kernels)."""
    kernel = _kernels.load("decode_kernel")
    if kernel is None or id(kernel) in _typed:
        return kernel
    p, i64, i64p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    kernel.qkv_decode_partials.restype = ctypes.c_int
    kernel.qkv_decode_partials.argtypes = [
        ctypes.c_int, p, p, ctypes.c_float, p, p, i64p, i64p, i64, i64, i64, i64, i64, i64, p, p, p, i64p, p, i64p,
        i64, i64, i64, p, p, p, p, ctypes.c_int]
    kernel.qkv_decode.restype = ctypes.c_int  # q as held, its strides, bf16_dot; then as above; out, lse, bad, threads
    kernel.qkv_decode.argtypes = [
        ctypes.c_int, p, i64p, ctypes.c_int, ctypes.c_float, p, p, i64p, i64p, i64, i64, i64, i64, i64, i64, p, p, p,
        i64p, p, i64p, i64, i64, i64, p, p, p, ctypes.c_int]
    kernel.qkv_decode_has_bf16_dot.restype = ctypes.c_int
    kernel.qkv_decode_version.restype = ctypes.c_int
    if kernel.qkv_decode_version() != VERSION:
        raise RuntimeError(f"qkv decode_kernel has version {kernel.qkv_decode_version()}, expected {VERSION}")
    kernel.bf16_dot = bool(kernel.qkv_decode_has_bf16_dot())
    kernel.qkv_decode_vector_width.restype = ctypes.c_int
    kernel.vector_width = int(kernel.qkv_decode_vector_width())  # 16 (AVX-512), 8 (AVX, AVX2) or 4
    kernel.qkv_decode_has_fma.restype = ctypes.c_int
    kernel.fma = bool(kernel.qkv_decode_has_fma())
    _typed.add(id(kernel))
    return kernel

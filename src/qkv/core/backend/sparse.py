"""The block-sparse backend: attention that touches only the non-empty blocks of a BlockMask.

The layout follows FlexAttention's BlockMask (Dong et al., 2024, "Flex Attention: A
Programming Model for Generating Optimized Attention Kernels"). Two exact engines run it:

- `gathered` (qkv/core/engines/gathered.py) when the BlockMask (with an optional causal/window
  band) is the only constraint: each group of query rows takes the key columns of its
  non-empty blocks in one batched product and one fused softmax;
- the FlashAttention-2 engine (Dao, 2023; qkv/core/engines/flash.py), reused unchanged
  through a `flash.Plan`, for everything else (score functions, dropout):

- tiles are the BlockMask's blocks (block_q x block_k);
- for query block i the plan visits the key blocks that are non-empty for some (b, h);
  a block full for every (b, h) is computed without evaluating the mask function
  (`check_block_mask=False`), any other visited block evaluates it there (`dense_block`);
- blocks empty for every (b, h) are never touched, in forward or backward, so time and
  the backward's recomputation grow with the number of non-empty blocks, not Lq * Lk.

When the layout differs between batch rows or heads, the plan visits the union over (b, h)
and evaluates the mask wherever a block is not full for all of them: still exact, since
the mask function decides each element; only the skipped work is smaller than it could be.

Every other argument (causal, window, bool and float masks, score_mod, dropout, grouped
heads, lse) is honoured by the engine itself through the spec. A mask function passed with
backend="sparse" is turned into a BlockMask first (cached per function and shape); its tile
plan is kept in the BlockMask's layout cache. Layout: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from .. import _kernels, finite
from ..block_mask import BlockMask, block_mask, is_pure, unknown_fraction
from ..engines import flash, gathered, native_blocks, native_flash, native_flash_bwd
from ..spec import AttentionSpec
from .base import Backend

# `auto` sends a mask function to this backend when it is at least this long (Lq * Lk) and
# at least this share of blocks is empty; a BlockMask always goes here.
AUTO_MIN_ENTRIES = 1 << 20
AUTO_MIN_SPARSITY = 50.0
AUTO_MAX_BAND_SHARE = 4  # a band alone goes here when each query sees at most 1/4 of the keys
AUTO_MAX_UNKNOWN = 0.05  # share of blocks a pattern's classifier may leave to evaluation
DEFAULT_BLOCK = 128

_BUILT: "OrderedDict[tuple, BlockMask]" = OrderedDict()  # pure pattern + shape -> BlockMask
_BUILT_MAX = 16


def block_mask_for(spec: AttentionSpec, device=None):
    """The BlockMask of the spec: the one given, or one built from a mask function.

    A pure qkv.masks pattern's (Pattern.pure) is cached by identity across calls. A plain function may
    read state that changes between calls (a closure, a global), so its layout is built once per call:
    kept on the spec, which auto's rule and the backend it picks share, and never reused by a later
    call (reusing it by identity gave the old mask's result, silently). Pass qkv.block_mask(fn, ...)
    to lay a plain function out once for many calls.
    """
    if spec.block_mask is not None:
        return spec.block_mask
    if spec.mask_mod is None:
        return None
    fn = spec.mask_mod
    if not is_pure(fn):
        memo = spec.__dict__.get("_built_block_mask")  # (device, BlockMask) built earlier in this call
        if memo is not None and memo[0] == str(device):
            return memo[1]
        bm = block_mask(fn, spec.B, spec.Hq, spec.Lq, spec.Lk, block_size=DEFAULT_BLOCK, device=device)
        object.__setattr__(spec, "_built_block_mask", (str(device), bm))  # not a field: eq and hash ignore it
        return bm
    # Cached by identity (the BlockMask keeps the pattern alive, so the id stays unique).
    key = (id(fn), spec.B, spec.Hq, spec.Lq, spec.Lk, str(device))
    hit = _BUILT.get(key)
    if hit is not None and hit.mask_mod is fn:
        _BUILT.move_to_end(key)
        return hit
    bm = block_mask(fn, spec.B, spec.Hq, spec.Lq, spec.Lk, block_size=DEFAULT_BLOCK, device=device)
    _BUILT[key] = bm
    while len(_BUILT) > _BUILT_MAX:
        _BUILT.popitem(last=False)
    return bm


def _rows(bm) -> list[list[tuple[int, bool]]]:
    """Per query block: [(key block, full for every (b, h))] of the blocks non-empty for some (b, h)."""
    return bm.cached("rows", lambda: _build_rows(bm))


def _build_rows(bm) -> list[list[tuple[int, bool]]]:
    states = bm.block_states()  # (Bm, Hm, nq, nk): 0 empty, 1 partial, 2 full
    visit = (states != 0).flatten(0, 1).any(0)  # (nq, nk)
    full_all = (states == 2).flatten(0, 1).all(0)  # (nq, nk)
    rows: list[list[tuple[int, bool]]] = [[] for _ in range(states.shape[2])]
    for (qb, kb), full in zip(visit.nonzero().tolist(), full_all[visit].tolist()):
        rows[qb].append((kb, full))
    return rows


def make_plan(spec: AttentionSpec, bm) -> flash.Plan:
    """The tiled engine's plan for this BlockMask, intersected with the causal/window band."""
    rows = _rows(bm)
    bq, bk = bm.block_q, bm.block_k
    Lk = spec.Lk

    def kv_blocks(qb: int, i0: int, i1: int):
        lo, hi = spec.kv_range(i0, i1)  # the band: keys outside it are masked anyway
        for kb, full in rows[qb]:
            j0, j1 = kb * bk, min(kb * bk + bk, Lk)
            if j1 <= lo or j0 >= hi:
                continue
            yield j0, j1, not full

    return flash.Plan(bq, bk, kv_blocks)


def sparse_spec(spec: AttentionSpec, bm) -> AttentionSpec:
    """The spec with the mask function replaced by its BlockMask (so full blocks skip it)."""
    if spec.block_mask is bm and spec.mask_mod is None:
        return spec
    return dataclasses.replace(spec, mask_mod=None, block_mask=bm)


def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    """Why the sparse backend cannot honour these arguments, or None if it can."""
    if spec.block_mask is None and spec.mask_mod is None and not (spec.banded and gathered.supports(spec)):
        return (
            "the sparse backend needs mask= a qkv.BlockMask or a mask function (see qkv.masks), "
            "or a causal/window band with no other mask, score_mod or dropout; "
            "for tensor masks use backend='tiled' or 'sdpa'"
        )
    reason = flash.unsupported(spec, q, need_lse)
    if reason is not None:
        return reason.replace("the tiled backend", "the sparse backend (the tiled engine)")
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""
    reason = unsupported(spec, q, need_lse)
    if reason is not None:
        raise ValueError(reason)
    bm = block_mask_for(spec, device=q.device)
    if bm is not None:
        spec = sparse_spec(spec, bm)
    if native_pays(spec, q, k, v, bm):  # the kernel takes the extremes of q, k and v (self_checking below)
        seen: list = []
        out, lse = native_flash.run(q, k, v, spec, need_lse=need_lse, seen=seen)
        finite.report_extremes(seen, spec, q.dtype)
        return out, lse
    if bm is None:  # a causal/window band alone
        return gathered.run(q, k, v, spec, None, need_lse=need_lse)
    if gathered.supports(spec):
        return gathered.run(q, k, v, spec, bm, need_lse=need_lse)
    return flash.run(q, k, v, spec, make_plan(spec, bm), need_lse=need_lse)


# The sparse backend's blocks on the native FlashAttention-2 kernels (csrc/flash_fwd_kernel.cpp,
# csrc/flash_bwd_kernel.cpp, block lists from engines/native_blocks.py), measured against the
# gathered engine on one CPU kind (_kernels.measured_cpu: AMD EPYC, AVX512-BF16, no AMX), 2 threads,
# B=1, D=64, with `python benchmarks/sparse.py --lengths 2048 4096 8192 --flex-at --bf16-at 2048 4096 8192
# --sdpa-max 0 --sdpa-bwd-max 0 --sdpa-causal-at --reps 3`, the same at 16384 with FlexAttention, and
# `python benchmarks/native_windows.py` (docs/benchmarks.md, "The native kernel, second part"):
# causal window 256, global 16 + window 256 and packed causal documents, H=8, 2048 to 16384 tokens,
# gathered time / native time: forward 1.04x-1.99x in float32 and 1.77x-3.21x in bfloat16, forward and
# backward 1.48x-2.38x and 2.04x-3.96x; grouped heads 8/2 under a causal window of 256 at 4096 and 16384
# tokens, forward 1.63x-3.05x, forward and backward 1.51x-3.23x. Elsewhere the gathered engine runs, as
# before; neither Lq != Lk, other block sizes nor head sizes above 64 were measured then (128: below).
# On a second CPU kind (_kernels.amx_cpu: an Intel Xeon with AMX-BF16, the kernels' bfloat16 on AMX tiles;
# a 2-core KVM guest, family 6 model 207, 2026-12-01), the same command at 4096 and 16384 tokens with
# the rule forced on (docs/benchmarks.md, "The native kernels, ninth part"), gathered time / native time:
# bfloat16 forward 1.58x-5.73x, forward and backward 2.00x-4.90x; float32 forward and backward
# 1.70x-3.41x, float32 forward 0.79x-1.71x (a causal window of 256: 0.79x at 4096, 1.03x at 16384);
# grouped heads 8/2 under a causal window of 256 (`python benchmarks/native_windows.py`): bfloat16
# forward 2.38x-2.96x, forward and backward 2.02x-2.46x in either dtype. So there it claims bfloat16
# (while the tiles run) and float32 when autograd records, at D = Dv = 64 (the only head size timed there).
# On a third CPU kind (_kernels.avx2_cpu: an AMD Zen 3 EPYC, AVX2 only, the kernels' narrow tiles; a
# 2-core KVM guest, family 25 model 1, 2026-12-01), `python benchmarks/native_windows.py` (docs/benchmarks.md,
# "The native kernels, eleventh part"), grouped heads 8/2 under a causal window of 256 at 4096 and 16384
# tokens, gathered time / native time: forward 1.11x-1.81x (float32) and 1.54x-1.86x (bfloat16), forward and
# backward 1.66x-2.18x; at D = Dv = 128 (`python benchmarks/native_windows.py --dim 128`, twice, "The
# native kernels, twelfth part"): forward 1.30x-1.60x (float32) and 1.46x-2.42x (bfloat16), forward and
# backward 1.34x-1.93x. BlockMasks of 128 x 128 blocks there (a causal window of 256, global 16 + window
# 256, packed documents), with the first kind's rule forced on (`python benchmarks/sparse.py --force-native
# --lengths 4096 16384 --bf16-at 4096 16384 --sdpa-max 0 --sdpa-bwd-max 0 --reps 3 --flex-at
# --sdpa-causal-at`, and `--dim 128`), twice each: forward 1.03x-2.84x at D = 64 (the least: float32, the
# window at 16384 tokens, 1.03x-1.10x) and 1.10x-2.34x at 128, forward and backward 1.80x-4.30x and
# 1.91x-3.15x. So there it claims a causal band alone and a BlockMask at D = Dv = 64 and 128, either dtype,
# forward or training.
# At D = Dv = 128 on the first kind (a 2-core AMD EPYC, Zen 4, family 25 model 17, 2026-12-02; docs/benchmarks.md,
# "The native kernels, thirteenth part"): `python benchmarks/sparse.py --force-native --dim 128 --lengths 4096
# 16384 --bf16-at 4096 16384 --sdpa-max 0 --sdpa-bwd-max 0 --reps 3` (the three BlockMasks above, H=8),
# gathered time / native time: forward 1.29x-2.45x in float32 (the least: the window at 16384 tokens) and
# 2.70x-4.28x in bfloat16, forward and backward 1.70x-3.31x and 2.58x-5.51x; grouped heads 8/2 under a causal
# window of 256 (`python benchmarks/native_windows.py --dim 128`): forward 1.62x-4.34x, forward and backward
# 1.91x-3.42x. So there D = Dv = 128 is claimed too (NATIVE_WIDE_DIMS); 65-127 were not timed.
NATIVE_MAX_DIM = 64  # measured at D = 64 (the first and second kinds)
NATIVE_WIDE_DIMS = (128,)  # head sizes above NATIVE_MAX_DIM measured on the first kind (D = Dv)
AMX_NATIVE_DIMS = (64,)  # the head sizes measured on the second kind
AVX2_NATIVE_DIMS = (64, 128)  # the head sizes measured on the third kind (a causal band alone, a BlockMask)
NATIVE_GQA = True  # grouped-query heads, measured under a causal window


def native_pays(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, bm: Optional[BlockMask]) -> bool:
    """Whether the sparse backend runs these arguments on the native kernels rather than the gathered
    engine: within what was measured (above): float32 or bfloat16 CPU tensors, self-attention (Lq = Lk),
    NATIVE_GQA, head sizes up to NATIVE_MAX_DIM and on the first kind D = Dv in NATIVE_WIDE_DIMS (the third
    kind: its own), a BlockMask of 128 x 128 blocks
    (with any band) or a causal band alone, nothing else, on the CPU kind measured, where the kernels build
    (the backward too when autograd records) with the tiles measured (native_flash.MEASURED_WIDTH); on the second kind
    (`_kernels.amx_cpu`), bfloat16 while the AMX tiles run, or float32 when autograd records, at the head
    sizes of AMX_NATIVE_DIMS; on the third (`_kernels.avx2_cpu`), a causal band alone or such a BlockMask
    (with any band) at D = Dv among AVX2_NATIVE_DIMS, where the kernels build AVX2's narrow tiles."""
    if q.device.type != "cpu" or q.dtype not in native_flash.KINDS or not gathered.supports(spec):
        return False
    if spec.Lq != spec.Lk or (spec.Hq != spec.Hkv and not NATIVE_GQA):
        return False
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not _kernels.measured_cpu() and _kernels.avx2_cpu():  # the third kind's rule (above NATIVE_MAX_DIM)
        if spec.D != spec.Dv or spec.D not in AVX2_NATIVE_DIMS:
            return False
        claimed = spec.right == 0 if bm is None else _native_blocks(bm)  # a band alone: causal
        return claimed and native_flash.why_not(q, k, v, spec) is None and _kernels_built(grad, narrow=True)
    amx_kind = not _kernels.measured_cpu()
    wide = not amx_kind and spec.D == spec.Dv and spec.D in NATIVE_WIDE_DIMS  # the first kind's 128
    if max(spec.D, spec.Dv) > NATIVE_MAX_DIM and not wide:
        return False
    if amx_kind and not (_kernels.amx_cpu() and (q.dtype == torch.bfloat16 or grad) and spec.D in AMX_NATIVE_DIMS
                         and spec.Dv in AMX_NATIVE_DIMS):
        return False  # the second kind's rule (above NATIVE_MAX_DIM): bfloat16, or float32 with gradients
    if bm is not None and not _native_blocks(bm):
        return False
    if bm is None and spec.right != 0:  # a band alone: causal windows were measured, two-sided ones not
        return False
    if native_flash.why_not(q, k, v, spec) is not None:
        return False
    if not _kernels_built(grad, narrow=False):
        return False
    if amx_kind and q.dtype == torch.bfloat16 and not native_flash.tiles_run(grad):
        return False  # measured with the processor's tiles running
    return True


def _native_blocks(bm: BlockMask) -> bool:
    """Whether the kernels' block lists take this BlockMask: 128 x 128 blocks, lists they can hold."""
    return (bm.block_size == (native_blocks.KEY_BLOCK, native_blocks.KEY_BLOCK)
            and native_blocks.why_not(bm) is None)


def _kernels_built(grad: bool, narrow: bool) -> bool:
    """Whether the native kernels build (the backward too when autograd records; where one does not, a
    warning names it and the gathered engine runs) with the tiles the rule measured: 16-float vectors, or
    with `narrow` AVX2's 8-float ones with fused multiply-adds."""
    missing = ("flash_fwd_kernel" if native_flash.lib() is None
               else "flash_bwd_kernel" if grad and native_flash_bwd.lib() is None else None)
    if missing is not None:  # no compiler: the gathered engine, as on every other CPU kind
        _kernels.warn_unavailable(missing, "block-sparse attention runs on the gathered engine")
        return False
    kernel = native_flash.lib()
    if narrow:
        return kernel.vector_width == 8 and kernel.fma
    return kernel.vector_width == native_flash.MEASURED_WIDTH  # the build measured (AVX-512)


def band_pays(spec: AttentionSpec) -> bool:
    """A causal/window band alone, long and narrow: at least 2^20 query-key pairs, more than 16
    queries (fewer are decode steps), and each query sees at most a quarter of the keys."""
    if not (spec.banded and spec.block_mask is None and gathered.supports(spec)):
        return False
    if spec.Lq * spec.Lk < AUTO_MIN_ENTRIES or spec.Lq <= 16 or spec.left is None or spec.right is None:
        return False
    return spec.left + spec.right + 1 <= spec.Lk // AUTO_MAX_BAND_SHARE


def auto(spec: AttentionSpec, q: Tensor, need_lse: bool) -> bool:
    """auto: a BlockMask always runs here; a named mask pattern when long and sparse enough."""
    if spec.block_mask is not None or band_pays(spec):
        return True
    fn = spec.mask_mod
    if fn is None or getattr(fn, "classify", None) is None or spec.Lq * spec.Lk < AUTO_MIN_ENTRIES:
        return False  # only patterns with a block classifier are cheap to lay out on the fly
    if unknown_fraction(fn, spec.B, spec.Hq, spec.Lq, spec.Lk, DEFAULT_BLOCK) > AUTO_MAX_UNKNOWN:
        return False  # most blocks would need evaluating the function element by element
    return block_mask_for(spec, device=q.device).sparsity() >= AUTO_MIN_SPARSITY


def self_checking(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `forward` runs these arguments on the native kernel, which takes the extremes of the queries,
    keys and values it reads (the non-finite guard then scans nothing, core/finite.py; checks_queries); the
    gathered and tiled engines are scanned."""
    bm = block_mask_for(spec, device=q.device)
    return native_pays(spec if bm is None else sparse_spec(spec, bm), q, k, v, bm)


BACKEND = Backend("sparse", forward, unsupported, memory=flash.memory, auto=auto, priority=40,
                  self_checking=self_checking, checks_queries=True)

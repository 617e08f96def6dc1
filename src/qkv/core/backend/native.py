"""The native backend: qkv's C++ FlashAttention-2 kernel for float32 and bfloat16 CPU tensors.

Dao, 2023, "FlashAttention-2": the forward runs in csrc/flash_fwd_kernel.cpp (compiled on
first use, engines/native_flash.py), causal and windowed bands included, GQA without copying
keys, the lse out; gradients through an autograd Function that keeps q, k, v, out and lse and
recomputes the probabilities (the native backward kernel where it exists, else the tiled
engine's backward). Masks, score functions, dropout, other dtypes and devices are refused by
name, with the backend that can. `auto` chooses it only where it was measured to win (`auto`
below); everywhere else `backend="native"` asks for it. Layout: docs/architecture.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _kernels, _memory, finite
from ..engines import flash, native_blocks, native_flash, native_flash_bwd
from ..spec import AttentionSpec
from . import sparse
from .base import Backend

_NAME = "flash_fwd_kernel"


def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    """Why the native backend cannot run these arguments, and which backend can; None if it can."""
    if q.device.type != "cpu":
        return (f"the native backend runs on CPU tensors; on {q.device.type} use backend='sdpa' or 'tiled'")
    if q.dtype not in native_flash.KINDS:
        return (f"the native backend takes float32 and bfloat16 tensors; got {q.dtype}: "
                "use backend='tiled' or 'reference'")
    if spec.bool_mask is not None or spec.float_mask is not None:
        return ("the native backend takes causal and window bands and block masks (a qkv.BlockMask or a mask "
                "function), not a tensor mask; use backend='tiled' or 'sdpa'")
    if spec.block_mask is not None:  # a mask function is laid out by `forward` (never here: this runs
        why = native_blocks.why_not(spec.block_mask)  # for every backend when memory is short)
        if why is not None:
            return f"the native backend cannot take {why}; or use backend='sparse'"
    if spec.score_mod is not None:
        return "the native backend cannot apply a score_mod; use backend='tiled' or 'sparse'"
    if spec.dropout_p > 0.0:
        return "the native backend has no dropout; use backend='tiled' or 'sparse'"
    if not (1 <= spec.D <= native_flash.MAX_DIM and 1 <= spec.Dv <= native_flash.MAX_DIM):
        return (f"the native backend takes head sizes 1 to {native_flash.MAX_DIM}; got D={spec.D}, "
                f"Dv={spec.Dv}: use backend='tiled'")
    kernel = native_flash.lib()
    if kernel is None:
        return (f"the native backend's kernel is unavailable ({_kernels.status(_NAME)}); "
                "use backend='tiled' or 'sdpa'")
    if not kernel.fma:
        return ("the native backend's kernel was built without fused multiply-add (FMA; x86 CPUs without AVX2 "
                "have none): rounded before they are added, its products miss the tolerance rule at large logits "
                "and head sizes near 256; use backend='sdpa' or 'tiled'")
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""
    if q.dtype == torch.float64 and q.device.type == "cpu":
        # Only the non-finite guard's wide run gets here (float64 is refused to a caller): finite
        # scores that could overflow float32 are recomputed in float64 by the FA-2 engine.
        return flash.run(q, k, v, spec, flash.band_plan(spec), need_lse=need_lse)
    reason = unsupported(spec, q, need_lse)
    if reason:  # never hand the kernel what it cannot take (a CUDA tensor above all)
        raise ValueError(reason)
    if k.device != q.device or v.device != q.device:
        raise ValueError("the native backend runs on CPU tensors; q, k and v must all be on the CPU")
    if spec.mask_mod is not None:  # a mask function runs as its BlockMask (built once, cached)
        bm = sparse.block_mask_for(spec, device=q.device)
        spec = sparse.sparse_spec(spec, bm)
        why = native_blocks.why_not(bm)
        if why is not None:
            raise ValueError(f"the native backend cannot take {why}; or use backend='sparse'")
    # The kernel takes the extremes of the queries, keys and values as it reads them (every query row it loads,
    # the keys and values of every key block it packs), so the non-finite guard (core/finite.py) makes no pass
    # of its own over q, k and v (self_checking and checks_queries below).
    seen: list = []
    out, lse = native_flash.run(q, k, v, spec, need_lse=need_lse, seen=seen)
    finite.report_extremes(seen, spec, q.dtype)
    return out, lse


def memory(spec: AttentionSpec, q: Tensor, need_lse: bool) -> tuple[int, str]:
    """(bytes, what): the keys and values packed in float32 once per call, the output, and (when
    autograd records) the gradients; linear in length."""
    return _memory.linear(spec, q, 1 << 16), "packed keys and values, output and gradients, linear in length"


# `auto`'s rule, measured on one CPU kind: an AMD EPYC (Zen 4: AVX-512 with AVX512-BF16, no AMX),
# 2 threads, B=1, H=8, with `python benchmarks/attention.py --backends native --lengths 64 128 256
# 512 1024 2048 --repeats 7`, `--dim 128 --lengths 1024 4096`, `--lengths 4096` and `16384`, and
# `--backward --lengths 512 1024` and `4096`, twice (docs/benchmarks.md, "The native kernel"). As SDPA
# time / native time, forward: float32 D=64 0.35x-0.80x up to 128 tokens, 0.93x-1.16x at 256,
# 1.04x-1.71x at 512, 1.05x-1.80x from 1024 on; float32 D=128 0.81x-0.91x without a band and
# 0.87x-1.15x causal (so not claimed); bfloat16 0.49x-1.16x up to 128 tokens, 1.10x-2.04x from 256
# on, D=128 1.28x-1.88x. Forward and backward (D=64): 1.17x-2.30x at 512, 1024 and 4096 tokens. On a
# second CPU kind, an Intel Xeon with AMX, the rule of AMX_AUTO_MIN_CELLS below; on others it claims
# nothing, and neither does it for shapes not measured: a query block other than the whole sequence
# (Lq != Lk; until AUTO_CHUNK_DIMS and AUTO_CROSS_DIMS), windows open to the right, grouped-query heads (until
# AUTO_GQA_DIMS). After bfloat16 P V moved to vdpbf16ps (the second part of issue 21, same CPU, same
# commands): bfloat16 1.88x-2.07x at 4096 and 16384 tokens, D=128 1.76x-2.29x; float32 unchanged.
# Causal windows (window=w with causal=True; the narrow ones, at most a quarter of the keys, go to the
# sparse backend first, which runs them on this kernel too), `python benchmarks/native_windows.py`
# (docs/benchmarks.md): against what `auto` chose before (SDPA with the window as a mask), windows of
# 1024 and 2048 at 2048 and 4096 tokens ran 3.31x-6.14x (float32) and 5.45x-8.71x (bfloat16) faster,
# forward and backward 3.20x-7.23x. float32 at D=128 after its scores ran in pieces of 64 terms over
# all the rows of an item and P V in 64 value columns (same CPU, `--dim 128 --dtypes float32 --lengths
# 1024 4096` and `16384`, alternated with the kernel before): causal 1.09x-1.35x (1024 to 16384 tokens),
# so float32 causal attention is claimed at D = Dv = 128 (sizes 65-127 were not timed); without a band
# 0.98x-1.03x, parity, so not.
AUTO_MIN_CELLS = {torch.float32: 1 << 20, torch.bfloat16: 1 << 18}  # Lq x Lk from which it wins
AUTO_MAX_DIM = {torch.float32: 64, torch.bfloat16: 128}  # head sizes measured to win
AUTO_CAUSAL_DIMS = {torch.float32: (128,)}  # head sizes above AUTO_MAX_DIM measured to win causal
# Head size 128 with gradients, and grouped-query heads, on the same CPU kind (a 2-core AMD EPYC, Zen 4,
# family 25 model 17, 2026-12-02; docs/benchmarks.md, "The native kernels, thirteenth part"), H=8.
# Forward and backward, `python benchmarks/attention.py --backends native --dim 128 --backward --lengths
# 1024 4096 --memory-lengths` (twice) and `--dtypes bfloat16 --lengths 256 512`: float32 1.05x-1.20x
# without a band, 1.15x-1.63x causal; bfloat16 1.54x-1.85x and 1.80x-2.81x (256 to 4096 tokens); causal
# windows of 1024 and 2048 (`python benchmarks/native_windows.py --dim 128`) 2.90x-7.75x. So autograd's
# head sizes take 128 (D = Dv) too (65-127 were not timed).
# Grouped heads (8 query heads, 2 kv heads, SDPA with enable_gqa), `--kv-heads 2 --dim 64` and `--dim
# 128`, `--lengths 1024 4096` (twice; bfloat16 at 512 once), forward and `--backward`: forward float32
# 1.14x-1.56x at D = 64 and 1.08x-1.58x at 128, bfloat16 1.82x-3.38x; forward and backward float32
# 1.05x-1.68x (one 0.81x at D = 64, 4096 tokens, without a band, timed while tests ran on the same two
# cores: 1.23x alone), bfloat16 1.48x-3.03x; 8 query heads on one kv head (`--kv-heads 1`, forward,
# D = 64, 1024 and 4096 tokens): 1.12x-3.15x. Under causal windows (`python benchmarks/native_windows.py
# --kv-heads 2 --wide-only` and `--dim 128`, twice each; windows of 1024 and 2048 at 2048 and 4096
# tokens, against SDPA with the window as a mask): forward 3.44x-11.32x, forward and backward
# 2.62x-7.89x. So grouped heads, any grouping, are claimed at D = Dv = 64 and 128 wherever the rule
# above claims the same shape with one kv head per query head, windows included (float32's forward at
# 128 under a window is not claimed with one kv head per query head either: AUTO_CAUSAL_DIMS is for
# plain causal attention).
AUTO_GRAD_DIMS = (128,)  # head sizes above 64 measured to win forward + backward (D = Dv)
AUTO_GQA_DIMS = (64, 128)  # grouped-query heads: the head sizes measured (D = Dv), causal windows too
# A chunk of queries against a longer cache (chunked prefill: Lq < Lk, causal aligned bottom right),
# forward only: `python benchmarks/prefill_chunk.py --methods sdpa-mask auto split native` (chunks of 512
# and 2048 queries against 8192 and 32768 keys; Hq=32, Hkv=8, D=128 and Hq=8, Hkv=2, D=64),
# `--chunks 128 256 --caches 8192`, and `--configs mha small large --chunks 128 512 --caches 2048` (mha:
# Hq = Hkv = 8, D=64), where `auto` ran sdpa's causal split. From the rule's pairs, against SDPA with the
# bottom-right mask, native float32 1.27x-2.08x at D = 64 and 1.22x-1.60x at 128 (two runs), bfloat16
# 1.58x-2.97x and 1.98x-2.53x; against the split (what `auto` ran), float32 1.12x-1.41x at 64 but 1.01x-1.26x at 128
# (1.00x at 256 queries: parity, not claimed), bfloat16 1.73x-2.32x at 64 and 128.
AUTO_CHUNK_DIMS = {torch.float32: (64,), torch.bfloat16: (64, 128)}  # D = Dv measured to win on a chunk
AUTO_CHUNK_MIN_QUERIES = 128  # the shortest chunk timed (fewer than 17 queries go to the decode backend)
# Cross-attention (Lq != Lk, no band: a decoder's queries against an encoder's output), one kv head per
# query head: `python benchmarks/attention.py --backends native --kv-length N --lengths 256 1024 4096
# --memory-lengths` for N = 256, 1024 and 4096 keys (forward twice, 512 queries once), `--backward` (N =
# 256, 1024 and 4096), and N = 1024 and 4096 at `--dim 128` once. SDPA time / native time, from the rule's
# pairs (2^20 in float32, 2^18 in bfloat16): forward float32 1.05x-1.28x at D = 64 and 1.03x-1.59x at
# 128, bfloat16 1.54x-2.02x and 1.58x-2.16x; forward and backward float32 1.18x-1.44x and 1.06x-1.31x,
# bfloat16 1.38x-2.18x and 1.38x-1.79x. A few lopsided shapes outside that range lost (a throwaway script
# in review, D = 64: 8 queries against 32768 keys with gradients 0.49x-0.56x in bfloat16; 32 queries
# against 32768 keys 0.85x-0.90x and 65536 queries against 16 keys 0.87x-0.88x in float32). So it is
# claimed at D = Dv = 64 and 128 where both lengths are at least AUTO_CROSS_MIN_LENGTH, by the
# self-attention rule's pairs and head sizes (float32's forward at 128, as without a band there: not);
# grouped heads in cross-attention were not timed.
AUTO_CROSS_DIMS = (64, 128)  # cross-attention: the head sizes measured (D = Dv)
AUTO_CROSS_MIN_LENGTH = 256  # cross-attention: the shortest query and key lengths timed

# The first kind's Zen 5 (`zen5_cpu`: an AMD EPYC of family 26, whose AVX-512 units are 512 bits wide where
# Zen 4's run each instruction in two halves; the session's was a 2-core KVM guest, family 26 model 2,
# 2026-12-02; docs/benchmarks.md, "The native kernels, fourteenth part"), 2 threads, B=1, H=8. The shapes
# the rules above claim were timed again there, with the commands above, and every one wins by more: SDPA
# time / native time, forward at D = 64 (4096 and 16384 tokens) float32 1.70x-1.96x, bfloat16 2.70x-3.16x;
# forward and backward (1024, 4096) 1.96x-2.65x and 2.35x-2.87x; D = 128 forward 1.62x-2.01x (float32,
# without a band too) and 2.80x-3.39x, with gradients (256 to 4096) 1.39x-2.40x and 1.93x-2.97x; 8/2
# grouped heads 1.22x-4.07x forward, 1.29x-3.15x forward and backward; causal windows (native_windows.py)
# 4.12x-14.65x and 5.10x-11.53x; chunks (prefill_chunk.py) float32 at D = 128 1.58x-1.84x the split `auto`
# ran; cross-attention 1.38x-3.17x forward, 1.99x-2.62x with gradients. And the kernels win on shorter
# sequences than the pairs above: `python benchmarks/auto_floor.py` (qkv's SDPA against native, a fast
# call repeated until a sample lasts 20 ms) with `--dims 32`, `64` and `128`, `--backward`, `--kv-heads 2
# --bands none causal window` and `--kv-heads 1`, forward and backward, 64 to 512 tokens (13 runs, 212
# rows): float32 0.55x-1.75x at 64 tokens, 0.95x-2.52x at 96, 1.02x-3.13x at 128 and 192 (D = 128 forward
# without a band 1.02x-1.19x: parity), from 2^16 pairs (256 tokens) 1.27x-4.58x (attention.py: 1.25x at
# D = 128); bfloat16 0.99x-2.51x at 64 tokens, from 96 (over 2^13 pairs) 1.45x-6.92x.
# So on Zen 5 `auto` claims self-attention from ZEN5_AUTO_MIN_CELLS pairs at the head sizes timed there
# (ZEN5_FLOOR_DIMS, D = Dv; the rules' other conditions unchanged: grouped heads, windows, gradients), and
# chunks of queries from those pairs against caches of ZEN5_CHUNK_MIN_KEYS or more; cross-attention and other
# head sizes keep AUTO_MIN_CELLS. float32's forward takes head size 128 with any band (ZEN5_AUTO_DIMS:
# without one 1.62x-1.69x above, causal windows `native_windows.py --dim 128` 4.12x-7.61x), and chunks take
# float32 at 128 (ZEN5_CHUNK_DIMS).
ZEN5_AUTO_MIN_CELLS = {torch.float32: 1 << 16, torch.bfloat16: 1 << 13}  # Lq x Lk from which it wins on Zen 5
ZEN5_FLOOR_DIMS = (32, 64, 128)  # the head sizes (D = Dv) timed there from those pairs; others: AUTO_MIN_CELLS
ZEN5_CHUNK_MIN_KEYS = 2048  # chunks from ZEN5_AUTO_MIN_CELLS pairs: the shortest cache timed there
ZEN5_AUTO_DIMS = {torch.float32: (128,)}  # head sizes above AUTO_MAX_DIM measured to win on Zen 5, any band
ZEN5_CHUNK_DIMS = {torch.float32: (64, 128), torch.bfloat16: (64, 128)}  # chunks of queries on Zen 5 (D = Dv)

# The second CPU kind (`amx_cpu`: an Intel Xeon with AMX-BF16; the session's was a 2-core KVM guest,
# family 6 model 207, 2026-12-01), where the kernels run bfloat16's products on AMX tiles and torch's
# SDPA runs bfloat16 on oneDNN's: 2 threads, B=1, H=8, D=64, `python benchmarks/attention.py --backends
# native --dtypes float32 bfloat16 --lengths 256 1024 4096 16384` and `--backward --lengths 1024 4096`,
# twice (docs/benchmarks.md, "The native kernels, ninth part"). SDPA time / native time, forward: bfloat16
# 0.46x-0.92x up to 1024 tokens, 1.05x-1.26x at 4096 and 16384; float32 0.70x-1.16x, 0.77x-0.78x at 16384
# without a band (not claimed). Forward and backward: bfloat16 1.42x-2.11x at 1024 and 4096 tokens (after
# the backward's products went straight to and from C; 1.09x-1.33x before); float32 causal 1.15x-1.54x,
# without a band 0.97x-1.15x (not claimed). Only D = Dv = 64 was measured there, so no other head size
# is claimed. Causal windows of 1024 and 2048 at 2048 and 4096 tokens (`python
# benchmarks/native_windows.py`, where SDPA takes the window as a mask): 2.64x-5.98x forward and
# 2.86x-4.88x forward and backward, float32 and bfloat16, so claimed from 2^22 pairs in both. The
# bfloat16 claims hold where the tiles run (the kernels report 2; where Linux refuses them the kernels
# run 4x slower). On a second AMX host (family 6 model 167, 2026-12-02; docs/benchmarks.md, the fifteenth
# part), with that part's faster bfloat16 forward, every claimed shape won again (bfloat16 forward 1.31x-1.78x
# at 4096 and 16384 tokens, with gradients 1.62x-1.87x, float32 causal with gradients 1.18x-1.33x, causal
# windows 2.35x-6.94x) and the shapes left out still lost or tied (bfloat16 forward at 1024 causal
# 0.84x-0.94x, float32 forward 0.69x-0.95x), so the rules stood; that kernel was not timed on model 207. In
# the sixteenth part (the same model-167 host), with P from one multiply-add, the standing step checked on P's
# words and masked lanes without microcode assists, the bfloat16 forward won from 1024 tokens (`python
# benchmarks/auto_floor.py --dtypes bfloat16 float32 --lengths 512 1024 2048 4096`: 1.39x and 1.60x at 1024,
# 1.57x and 1.81x at 2048, no band and causal; 0.96x at 512 without a band), so it is claimed from 2^20 pairs
# as with gradients. float32's forward was about even (0.95x-1.01x without a band, causal 1.03x-1.43x up to
# 4096 but 0.92x-0.96x at 16384), and after that part's two-pass softmax 1.00x-1.08x at 4096 and 16384 but
# 0.93x-0.94x at 1024 without a band: margins too thin, on one host, to claim. Model 207 did not time this
# kernel either.
AMX_AUTO_MIN_CELLS = {  # (dtype, autograd records) -> Lq x Lk from which it wins on the AMX kind
    (torch.bfloat16, False): 1 << 20,
    (torch.bfloat16, True): 1 << 20,
    (torch.float32, True): 1 << 20,  # causal only
}
AMX_AUTO_WINDOW_CELLS = 1 << 22  # causal windows, either dtype, with or without gradients
AMX_AUTO_DIMS = (64,)  # head sizes measured on the AMX kind


# The third CPU kind (`avx2_cpu`: an AMD Zen 3 EPYC whose widest vectors are AVX2's; the session's was a
# 2-core KVM guest, family 25 model 1, 2026-12-01), where the kernels build their narrow tiles (8-float
# vectors, bfloat16 widened to float32) and torch's SDPA runs its AVX2 kernels: 2 threads, B=1, H=8, D=64,
# `python benchmarks/attention.py --backends native --lengths 256 512 1024 4096 16384 --repeats 3
# --memory-lengths` and `--backward --lengths 256 512 1024 2048 4096`, each twice (docs/benchmarks.md, "The
# native kernels, eleventh part"). SDPA time / native time, forward: float32 0.78x-0.97x without a band,
# 0.96x-1.38x causal; bfloat16 0.83x-1.11x without a band, 0.96x-1.58x causal: about parity, not claimed.
# Forward and backward: bfloat16 4.08x-9.64x (torch's bfloat16 backward is slow on this CPU); float32 causal
# 1.08x-1.73x, without a band 0.97x-1.16x (not claimed). Causal windows of 1024 and 2048 at 2048 and 4096
# tokens (`python benchmarks/native_windows.py`, SDPA with the window as a mask): 2.95x-5.76x forward,
# 3.01x-31.96x forward and backward, both dtypes, so claimed from 2^22 pairs. At D = Dv = 128 (the same
# machine, 2026-12-01, `python benchmarks/attention.py --backends native --dim 128 --backward --lengths 256
# 512 1024 2048 4096 --memory-lengths` and `python benchmarks/native_windows.py --dim 128`, each twice; the
# twelfth part): forward and backward bfloat16 4.58x-7.85x from 256 tokens, float32 causal 1.14x-1.74x up
# to 2048 tokens but 0.88x-1.18x at 4096 (not claimed at 128), without a band 0.92x-1.07x; causal windows
# 2.00x-3.97x forward, 2.44x-23.61x forward and backward. So bfloat16 training and causal windows are
# claimed at D = Dv = 64 and 128, float32 causal training at 64 only; no other head size was measured.
AVX2_AUTO_MIN_CELLS = {  # (dtype, autograd records) -> Lq x Lk from which it wins on the AVX2 kind
    (torch.bfloat16, True): 1 << 18,
    (torch.float32, True): 1 << 20,  # causal only
}
AVX2_AUTO_WINDOW_CELLS = 1 << 22  # causal windows, either dtype, with or without gradients
# Grouped-query heads there (8 query heads, 2 kv heads; `python benchmarks/attention.py --backends native
# --heads 8 --kv-heads 2 --dim 64 --backward --dtypes bfloat16 --lengths 256 512 1024 2048 4096
# --memory-lengths`, and `--dim 128`, twice each; SDPA with enable_gqa): bfloat16 forward and backward
# 3.89x-10.60x at D = 64 and 4.73x-11.12x at 128. So on this kind bfloat16 training without a window claims
# grouped heads too (AVX2_AUTO_GQA); grouped heads were not timed against SDPA in float32, forward alone or
# under a window (the sparse backend's bands were: backend/sparse.py).
AVX2_AUTO_DIMS = (64, 128)  # head sizes measured on the AVX2 kind: bfloat16 training, causal windows
AVX2_AUTO_FLOAT32_DIMS = (64,)  # float32 causal training (0.88x-1.18x SDPA at D = 128 and 4096 tokens)
AVX2_AUTO_GQA = True  # bfloat16 training without a window with grouped-query heads, on the AVX2 kind
AVX2_WIDTH = 8  # the kernels' vector width there: the narrow tiles measured


def amx_cpu() -> bool:
    """Whether this CPU is of the second kind `auto`'s rule was measured on (`_kernels.amx_cpu`)."""
    return _kernels.amx_cpu()


def tiles_run(grad: bool) -> bool:
    """Whether the native kernels run bfloat16 on the processor's AMX tiles (`native_flash.tiles_run`)."""
    return native_flash.tiles_run(grad)


def _kind_claims(spec: AttentionSpec, dtype: torch.dtype, dims: tuple, min_cells: dict, window_cells: int) -> bool:
    """The shape part of the second and third kinds' rules: D = Dv, among `dims` (the sizes measured); a
    causal window (the only band with a left edge `auto` admits) from `window_cells` query-key pairs;
    otherwise from min_cells[(dtype, autograd records)] pairs, float32 causal only."""
    if spec.D != spec.Dv or spec.D not in dims:
        return False
    if spec.left is not None:
        return spec.Lq * spec.Lk >= window_cells
    least = min_cells.get((dtype, spec.grad))
    if least is None or spec.Lq * spec.Lk < least:
        return False
    return dtype != torch.float32 or spec.right == 0  # float32: causal training only


def amx_auto(spec: AttentionSpec, q: Tensor) -> bool:
    """auto on the AMX kind (`amx_cpu`), for the self-attention shapes `auto` admits: the rule of
    AMX_AUTO_MIN_CELLS (the measurements are in the comment above it)."""
    dtype, grad = q.dtype, spec.grad
    if not _kind_claims(spec, dtype, AMX_AUTO_DIMS, AMX_AUTO_MIN_CELLS, AMX_AUTO_WINDOW_CELLS):
        return False
    if dtype == torch.float32:
        kernel = native_flash.lib()
        return kernel is not None and kernel.vector_width == native_flash.MEASURED_WIDTH
    return tiles_run(grad)


def avx2_cpu() -> bool:
    """Whether this CPU is of the third kind `auto`'s rule was measured on (`_kernels.avx2_cpu`)."""
    return _kernels.avx2_cpu()


def avx2_auto(spec: AttentionSpec, q: Tensor) -> bool:
    """auto on the AVX2 kind (`avx2_cpu`), for the self-attention shapes `auto` admits: the rule of
    AVX2_AUTO_MIN_CELLS and AVX2_AUTO_WINDOW_CELLS at the head sizes of AVX2_AUTO_DIMS (float32 causal
    training: AVX2_AUTO_FLOAT32_DIMS) (the measurements are in the comment above them), where
    both kernels build the narrow tiles measured (AVX2_WIDTH floats, fused multiply-adds; the backward too
    when autograd records)."""
    dims = AVX2_AUTO_FLOAT32_DIMS if q.dtype == torch.float32 and spec.left is None else AVX2_AUTO_DIMS
    if not _kind_claims(spec, q.dtype, dims, AVX2_AUTO_MIN_CELLS, AVX2_AUTO_WINDOW_CELLS):
        return False
    kernel = native_flash.lib()  # built on first use, only for a call the rule claims
    if kernel is None or kernel.vector_width != AVX2_WIDTH or not kernel.fma:
        return False
    return not spec.grad or native_flash_bwd.lib() is not None


def _grouped_claimed(spec: AttentionSpec, dtype: torch.dtype) -> bool:
    """Whether `auto` may claim grouped-query heads (Hq a multiple of Hkv): on the first kind, at the head
    sizes of AUTO_GQA_DIMS (D = Dv); on the AVX2 kind, bfloat16 training without a window
    (AVX2_AUTO_GQA); on the AMX kind, never (not measured). The kind's own rule checks the rest of the shape."""
    if measured_cpu():  # causal windows included (AUTO_GQA_DIMS' comment)
        return spec.D == spec.Dv and spec.D in AUTO_GQA_DIMS
    return AVX2_AUTO_GQA and dtype == torch.bfloat16 and spec.grad and spec.left is None and avx2_cpu()


def _chunk_claimed(spec: AttentionSpec, dtype: torch.dtype) -> bool:
    """Whether `auto` may claim a chunk of queries against a longer cache (Lq < Lk, causal aligned bottom
    right, no window, one kv head per query head or grouped heads), forward only: on the first kind, from
    AUTO_CHUNK_MIN_QUERIES queries at the head sizes of AUTO_CHUNK_DIMS (D = Dv; on Zen 5 ZEN5_CHUNK_DIMS);
    `auto` checks the rest."""
    dims = (ZEN5_CHUNK_DIMS if _zen5() else AUTO_CHUNK_DIMS).get(dtype, ())
    return (measured_cpu() and not spec.grad and spec.Lk > spec.Lq >= AUTO_CHUNK_MIN_QUERIES
            and spec.right == 0 and spec.left is None and spec.D == spec.Dv and spec.D in dims)


def _cross_claimed(spec: AttentionSpec) -> bool:
    """Whether `auto` may claim cross-attention (Lq != Lk, no band, one kv head per query head): on the first
    kind, both lengths from AUTO_CROSS_MIN_LENGTH, at the head sizes of AUTO_CROSS_DIMS (D = Dv); `auto`
    checks the pairs and the head size's rule."""
    return (measured_cpu() and spec.Hq == spec.Hkv and spec.right is None and spec.left is None
            and min(spec.Lq, spec.Lk) >= AUTO_CROSS_MIN_LENGTH and spec.D == spec.Dv and spec.D in AUTO_CROSS_DIMS)


def measured_cpu() -> bool:
    """Whether this CPU is of the kind `auto`'s rule was measured on (`_kernels.measured_cpu`)."""
    return _kernels.measured_cpu()


def zen5_cpu() -> bool:
    """Whether this CPU is the first kind's Zen 5 (`_kernels.zen5_cpu`), where the rule claims more."""
    return _kernels.zen5_cpu()


def _zen5() -> bool:
    """The first kind (`measured_cpu`), on its Zen 5 (`zen5_cpu`): the wider rule of ZEN5_AUTO_MIN_CELLS."""
    return measured_cpu() and zen5_cpu()


def _min_cells(spec: AttentionSpec, dtype: torch.dtype, zen5: bool, chunk: bool) -> int:
    """The query-key pairs from which `auto` claims: ZEN5_AUTO_MIN_CELLS on Zen 5 for the shapes timed there
    from so few (self-attention or a chunk against ZEN5_CHUNK_MIN_KEYS keys or more, at ZEN5_FLOOR_DIMS with
    D = Dv), else AUTO_MIN_CELLS (the kind's own rule may ask for more)."""
    timed = (spec.Lq == spec.Lk or (chunk and spec.Lk >= ZEN5_CHUNK_MIN_KEYS)) and spec.D == spec.Dv
    if zen5 and timed and spec.D in ZEN5_FLOOR_DIMS:
        return ZEN5_AUTO_MIN_CELLS[dtype]
    return AUTO_MIN_CELLS[dtype]


def auto(spec: AttentionSpec, q: Tensor, need_lse: bool) -> bool:
    """auto: self-attention of at least AUTO_MIN_CELLS query-key pairs (on Zen 5, `zen5_cpu`, `_min_cells`),
    unbanded, causal or a causal window, or on the first kind a chunk of queries
    against a longer cache (`_chunk_claimed`) or cross-attention (`_cross_claimed`), one kv head per query
    head or grouped heads where measured (`_grouped_claimed`), head sizes up to AUTO_MAX_DIM (plain causal:
    also AUTO_CAUSAL_DIMS; on Zen 5 also ZEN5_AUTO_DIMS; with gradients: 64, and AUTO_GRAD_DIMS), on the
    first CPU kind measured (`measured_cpu`), where the kernel builds with the tiles measured (16 floats:
    native_flash.MEASURED_WIDTH); on the second (`amx_cpu`), `amx_auto`; on the third (`avx2_cpu`),
    `avx2_auto`. The measurements are in the comments above."""
    dtype = q.dtype
    if q.device.type != "cpu" or dtype not in AUTO_MIN_CELLS:
        return False
    if spec.has_dense_constraints or spec.score_mod is not None or spec.dropout_p > 0.0:
        return False
    chunk = spec.Lq != spec.Lk and _chunk_claimed(spec, dtype)  # chunked prefill, grouped heads included
    if spec.Lq != spec.Lk and not chunk and not _cross_claimed(spec):
        return False
    if spec.Hq != spec.Hkv and not chunk and not _grouped_claimed(spec, dtype):
        return False
    if spec.right not in (None, 0) or (spec.right is None and spec.left is not None):  # measured: unbanded,
        return False  # causal and causal windows; not windows open to the right
    zen5 = _zen5()
    if spec.Lq * spec.Lk < _min_cells(spec, dtype, zen5, chunk) or min(spec.D, spec.Dv) < 1:
        return False
    if not measured_cpu():
        if avx2_cpu():
            return avx2_auto(spec, q)
        return amx_cpu() and amx_auto(spec, q)
    max_dim = AUTO_MAX_DIM[dtype]
    if spec.right == 0 and spec.left is None and spec.D == spec.Dv and spec.D in AUTO_CAUSAL_DIMS.get(dtype, ()):
        max_dim = spec.D  # plain causal attention at a head size measured to win
    if zen5 and spec.D == spec.Dv and spec.D in ZEN5_AUTO_DIMS.get(dtype, ()):
        max_dim = spec.D  # on Zen 5, with or without a band
    if spec.grad:  # autograd records (q, k or v requires grad): forward + backward measured at 64 and 128
        max_dim = spec.D if spec.D == spec.Dv and spec.D in AUTO_GRAD_DIMS else 64
    if max(spec.D, spec.Dv) > max_dim:
        return False
    kernel = native_flash.lib()  # built on first use, only for a call the rule claims
    return kernel is not None and kernel.vector_width == native_flash.MEASURED_WIDTH


# priority: under a user's (25); self-checking: the kernel takes the extremes of q, k and v (`forward`)
BACKEND = Backend("native", forward, unsupported, memory=memory, auto=auto, priority=22,
                  self_checking=lambda spec, q, k, v: True, checks_queries=True)

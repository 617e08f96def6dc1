"""FlexAttention's own `BlockMask`, read as qkv's: `mask=` accepts what `create_block_mask` returns.

PyTorch's FlexAttention (Dong et al., 2024, "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels"; `torch.nn.attention.flex_attention`) describes a
mask as a block layout plus a mask function. Its meaning, element by element, is what its
kernels compute:

- a key block listed as full (`full_kv_num_blocks`, `full_kv_indices`) is attended whole,
  without calling the mask function;
- a key block listed as partial (`kv_num_blocks`, `kv_indices`) calls `mask_mod(b, h, q_idx,
  kv_idx)` on each element;
- a key block in neither list is skipped (masked out).

`from_flex` turns such an object into a `qkv.core.block_mask.BlockMask` with the same lists
and block sizes and a mask function that says exactly the above (a lookup of the block's
state, the user's `mask_mod` where the block is partial), so every qkv backend, the
reference included, computes what FlexAttention computes, with gradients and without a
compiler. For a mask made by `create_block_mask` (the layout is the exact classification of
`mask_mod`) that is simply `mask_mod`. For a layout written by hand (`from_kv_blocks`) qkv
follows the lists as FlexAttention's compiled kernels do; FlexAttention's eager path (the
unfused fallback without torch.compile) applies `mask_mod` alone and ignores the lists, so
there the two FlexAttention paths differ and qkv agrees with the compiled one
(tests/core/test_flex_blockmask.py). The conversion is cached per FlexAttention mask
(weakly, so it dies with it) and per attention size, so the sparse backend's tile plans,
kept in the converted mask's layout cache, are built once.

The module of FlexAttention is never imported here: an object can only be one of its
BlockMasks if the user has imported it already. Layout: docs/architecture.md.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch import Tensor

from .block_mask import BlockMask, Pattern, pattern_name

__all__ = ["is_flex_block_mask", "from_flex"]

_FLEX_MODULE = "torch.nn.attention.flex_attention"
_EMPTY, _PARTIAL, _FULL = 0, 1, 2  # as BlockMask.block_states
# FlexAttention mask -> {(B, Hq, Lq, Lk): qkv BlockMask}; weak keys, so the entry dies with the mask.
_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def is_flex_block_mask(obj) -> bool:
    """True if obj is a `torch.nn.attention.flex_attention.BlockMask`."""
    module = sys.modules.get(_FLEX_MODULE)
    flex_class = getattr(module, "BlockMask", None) if module is not None else None
    return flex_class is not None and isinstance(obj, flex_class)


def from_flex(fbm, B: int, Hq: int, Lq: int, Lk: int) -> BlockMask:
    """The qkv BlockMask meaning exactly what FlexAttention's mask `fbm` means, for attention
    of sizes (B, Hq, Lq, Lk); raises ValueError naming the sizes when they do not fit.

    Args:
        fbm: a `torch.nn.attention.flex_attention.BlockMask` (from `create_block_mask` or
            `BlockMask.from_kv_blocks`); its kv_num_blocks is (Bf, Hf, nq) with Bf in (1, B)
            and Hf in (1, Hq), its seq_lengths must be (Lq, Lk).
        B, Hq, Lq, Lk: the attention's batch, query heads, query and key lengths.
    """
    try:
        per_size = _CACHE.setdefault(fbm, {})
    except TypeError:  # not weak-referenceable or not hashable: convert every time
        per_size = {}
    key = (B, Hq, Lq, Lk)
    got = per_size.get(key)
    if got is None:
        got = per_size[key] = _convert(fbm, B, Hq, Lq, Lk)
    return got


def _convert(fbm, B: int, Hq: int, Lq: int, Lk: int) -> BlockMask:
    fq, fk = (int(n) for n in fbm.seq_lengths)
    size = fbm.BLOCK_SIZE
    bq, bk = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    num = fbm.kv_num_blocks  # (Bf, Hf, nq_f) int32
    Bf, Hf = int(num.shape[0]), int(num.shape[1])
    problems = []
    if (fq, fk) != (Lq, Lk):
        problems.append(f"it was built for Q_LEN={fq}, KV_LEN={fk} but q/k have Lq={Lq}, Lk={Lk}")
    if Bf not in (1, B):
        problems.append(f"its batch is {Bf} but q has B={B} (build it with B={B} or B=None)")
    if Hf not in (1, Hq):
        problems.append(f"its heads are {Hf} but q has Hq={Hq} query heads (build it with H={Hq} or H=None)")
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    if not problems and num.shape[-1] < nq:
        problems.append(f"it lists {num.shape[-1]} query blocks of {bq} rows; Lq={Lq} needs {nq}")
    if problems:
        raise ValueError(
            f"FlexAttention BlockMask of shape {tuple(fbm.shape)} does not fit attention of (B, Hq, Lq, Lk) = "
            f"{(B, Hq, Lq, Lk)}: " + "; ".join(problems)
            + f". Build it with create_block_mask(mask_mod, B, H, {Lq}, {Lk})"
        )

    def lists(num: Tensor, idx: Tensor, what: str) -> tuple[Tensor, Tensor]:
        num = num[..., :nq].to("cpu", torch.int32)  # (Bf, Hf, nq)
        idx = idx[..., :nq, :].to("cpu", torch.int32)  # (Bf, Hf, nq, width)
        valid = torch.arange(idx.shape[-1]).view(1, 1, 1, -1) < num.unsqueeze(-1)  # (Bf, Hf, nq, width)
        if bool((num < 0).any()) or bool((num > idx.shape[-1]).any()) or bool(((idx < 0) | (idx >= nk))[valid].any()):
            raise ValueError(f"FlexAttention BlockMask has {what} block lists that name key blocks outside "
                             f"0..{nk - 1} (Lk={Lk}, KV_BLOCK={bk}); rebuild it with create_block_mask")
        return num, idx

    kv_num, kv_idx = lists(fbm.kv_num_blocks, fbm.kv_indices, "partial")
    if fbm.full_kv_num_blocks is not None and fbm.full_kv_indices is not None:
        full_num, full_idx = lists(fbm.full_kv_num_blocks, fbm.full_kv_indices, "full")
    else:
        full_num, full_idx = torch.zeros_like(kv_num), torch.zeros(*kv_num.shape, 0, dtype=torch.int32)
    bm = BlockMask(None, B, Hq, Lq, Lk, bq, bk, kv_num, kv_idx, full_num, full_idx)  # type: ignore[arg-type]
    states = bm.block_states()  # (Bf, Hf, nq, nk) int8: 0 empty, 1 partial, 2 full
    bm.mask_mod = Pattern(_element_mask(fbm.mask_mod, states, bq, bk), None,
                          f"flex_attention.BlockMask(mask_mod={pattern_name(fbm.mask_mod)})", pure=False)
    return bm


def _element_mask(mask_mod, states: Tensor, bq: int, bk: int):
    """FlexAttention's meaning of its mask, element by element: True in full blocks, mask_mod's
    value in partial ones, False elsewhere. states (Bf, Hf, nq, nk) int8."""
    Bf, Hf = states.shape[:2]
    on_device: dict = {}

    def fn(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        st = on_device.get(q_idx.device)
        if st is None:
            st = on_device[q_idx.device] = states.to(q_idx.device)
        # Size-1 indices where the states do not depend on b (h): the result then broadcasts over them
        # unless mask_mod itself tells them apart (native_blocks sizes its tiles by that shape).
        bi = b.clamp(max=Bf - 1) if Bf > 1 else b.new_zeros((1,) * b.dim())
        hi = h.clamp(max=Hf - 1) if Hf > 1 else h.new_zeros((1,) * h.dim())
        s = st[bi, hi, torch.div(q_idx, bq, rounding_mode="floor"),
               torch.div(kv_idx, bk, rounding_mode="floor")]  # broadcast of the indices' shapes
        out = s == _FULL
        partial = s == _PARTIAL
        if mask_mod is None:  # from_kv_blocks without a mask function: listed blocks are whole
            return out | partial
        if bool(partial.any()):
            out = out | (partial & mask_mod(b, h, q_idx, kv_idx))
        return out

    return fn

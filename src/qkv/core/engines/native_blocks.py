"""Block lists of a BlockMask, in the form the native FlashAttention-2 kernels read.

FlexAttention (Dong et al., 2024) hands its kernels, per query block, the indices of the key
blocks to visit (`kv_indices`, `full_kv_indices`) and, for the backward, the same lists
transposed (per key block, the query blocks: `q_indices`). The native kernels
(csrc/flash_fwd_kernel.cpp, csrc/flash_bwd_kernel.cpp) take the same information as one
C struct, `QkvBlockLists`, built here once per BlockMask and kept in its layout cache:

- the union over batch rows and heads of the non-empty blocks, in CSR form both ways:
  query-major (q_ptr, q_kb, q_tile) for the forward's walk over key blocks and key-major
  (k_ptr, k_qb, k_tile) for the backward's walk over query blocks, each list ascending;
- per entry, -1 where the block is full for every (b, h) (no mask is applied), else the index
  of its tile: the block's mask as bits, per (b, h) of the mask, evaluated once here by the
  mask function (`BlockMask.dense_block`) with the BlockMask's full/partial/empty labels
  applied exactly as `BlockMask.to_dense` applies them;
- tiles: uint8 (Bm, Hm, ntiles, bq, bk / 8), bit (c & 7) of byte (c >> 3) of row r set when
  query qb * bq + r may see key kb * bk + c (rows and keys past the ends are 0). Bm is 1
  (neither the block states nor the mask function's values in partial blocks depend on the
  batch row) or B; Hm likewise 1 or Hq, indexed by the query head.

The causal/window band of the call still applies on top: the kernels intersect it.
The kernels take key blocks of `KEY_BLOCK` (128) keys, the default of `qkv.block_mask` and
of FlexAttention; `why_not` says so for any other. Layout: docs/architecture.md.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..block_mask import BlockMask
from ..spec import AttentionSpec
from . import flash

KEY_BLOCK = 128  # keys per block the kernels take (their packed key block)
MAX_TILE_BYTES = 1 << 28  # 256 MiB of tile bits: beyond that the mask is refused by name


class QkvBlockLists(ctypes.Structure):
    """The C struct of both kernels (same field order as in csrc/qkv_block_lists.h)."""

    _fields_ = [
        ("bq", ctypes.c_int64), ("bk", ctypes.c_int64),  # rows and keys per mask block
        ("nq", ctypes.c_int64), ("nk", ctypes.c_int64),  # query blocks, key blocks
        ("q_ptr", ctypes.c_void_p), ("q_kb", ctypes.c_void_p), ("q_tile", ctypes.c_void_p),  # int32
        ("k_ptr", ctypes.c_void_p), ("k_qb", ctypes.c_void_p), ("k_tile", ctypes.c_void_p),  # int32
        ("tiles", ctypes.c_void_p),  # uint8 (Bm, Hm, ntiles, bq, bk / 8)
        ("Bm", ctypes.c_int64), ("Hm", ctypes.c_int64), ("ntiles", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class BlockLists:
    """A BlockMask's block lists (see the module docstring). All tensors are contiguous CPU tensors,
    kept alive by this object for as long as `struct` is in use."""

    bq: int
    bk: int
    nq: int
    nk: int
    q_ptr: Tensor  # int32 (nq + 1,)
    q_kb: Tensor  # int32 (nnz,)
    q_tile: Tensor  # int32 (nnz,)
    k_ptr: Tensor  # int32 (nk + 1,)
    k_qb: Tensor  # int32 (nnz,)
    k_tile: Tensor  # int32 (nnz,)
    tiles: Tensor  # uint8 (Bm, Hm, ntiles, bq, bk // 8)

    @property
    def nnz(self) -> int:
        """Blocks visited (the union over batch rows and heads)."""
        return int(self.q_kb.numel())

    @property
    def ntiles(self) -> int:
        return int(self.tiles.shape[2])

    def struct(self) -> QkvBlockLists:
        """The ctypes struct pointing into this object's tensors (keep this object alive while it is used)."""
        p = lambda t: ctypes.c_void_p(t.data_ptr()) if t.numel() else None  # noqa: E731
        return QkvBlockLists(self.bq, self.bk, self.nq, self.nk, p(self.q_ptr), p(self.q_kb), p(self.q_tile),
                             p(self.k_ptr), p(self.k_qb), p(self.k_tile), p(self.tiles),
                             self.tiles.shape[0], self.tiles.shape[1], self.tiles.shape[2])


def _tile_heads(bm: BlockMask, states: Tensor, i: int, j: int) -> tuple[int, int]:
    """(Bt, Ht): the batch rows and heads the tiles need, from the block states' shape and the shape of
    the mask function's values on the partial block (i, j): 1 where neither depends on them (the
    function's shape is structural, the same on every block; `_build` checks it on each)."""
    Bm, Hm = states.shape[:2]
    blk = bm.dense_block(i * bm.block_q, min(i * bm.block_q + bm.block_q, bm.Lq),
                         j * bm.block_k, min(j * bm.block_k + bm.block_k, bm.Lk))
    blk = blk.reshape((1,) * (4 - blk.dim()) + tuple(blk.shape))  # (b, h, rows, cols), b and h 1 or full
    return (bm.B if Bm > 1 or blk.shape[0] > 1 else 1), (bm.H if Hm > 1 or blk.shape[1] > 1 else 1)


def _partial_blocks(states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(qb, kb, needs_tile): the visited blocks query-major, and which are not full for every (b, h)."""
    visit = (states != 0).flatten(0, 1).any(0)  # (nq, nk): non-empty for some (b, h)
    full_all = (states == 2).flatten(0, 1).all(0)  # (nq, nk): full for every (b, h)
    qb, kb = visit.nonzero(as_tuple=True)  # (nnz,) each
    return qb, kb, ~full_all[qb, kb]


def tile_bytes(bm: BlockMask) -> int:
    """Bytes the tiles of `bm` take: its partial blocks, one tile per batch row and head the block states
    or the mask function's values tell apart (probed on one partial block). Cached with the mask."""
    def count() -> int:
        states = bm.block_states()  # (Bm, Hm, nq, nk)
        qb, kb, needs = _partial_blocks(states)
        n = int(needs.sum())
        if n == 0:
            return 0
        Bt, Ht = _tile_heads(bm, states, int(qb[needs][0]), int(kb[needs][0]))
        return n * Bt * Ht * bm.block_q * (bm.block_k // 8)

    return bm.cached(("native_tile_bytes", KEY_BLOCK), count)


def why_not(bm: BlockMask) -> Optional[str]:
    """What about `bm` the native kernels cannot take (a phrase naming the fix), or None."""
    if bm.block_k != KEY_BLOCK:
        return (f"a BlockMask with key blocks of {bm.block_k} (the native kernels take {KEY_BLOCK}: build it with "
                f"block_size={KEY_BLOCK} or (block_q, {KEY_BLOCK}))")
    need = tile_bytes(bm)
    if need > MAX_TILE_BYTES:
        return (f"a BlockMask whose partial blocks would need {need / 2**20:.0f} MiB of tile bits (the native "
                f"kernels take up to {MAX_TILE_BYTES >> 20} MiB; a mask that varies per head multiplies it)")
    return None


def block_lists(bm: BlockMask) -> BlockLists:
    """The block lists of `bm` (cached with it). Raises ValueError where `why_not(bm)` names a reason."""
    reason = why_not(bm)
    if reason is not None:
        raise ValueError(f"the native kernels cannot take {reason}")
    return bm.cached(("native_block_lists", KEY_BLOCK), lambda: _build(bm))


def _bits(mask: Tensor) -> Tensor:
    """bool (..., bk) -> uint8 (..., bk // 8): bit c & 7 of byte c >> 3 is mask[..., c]."""
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (mask.unflatten(-1, (-1, 8)).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def _build(bm: BlockMask) -> BlockLists:
    states = bm.block_states()  # int8 (Bm, Hm, nq, nk): 0 empty, 1 partial, 2 full
    Bm, Hm, nq, nk = states.shape
    bq, bk = bm.block_q, bm.block_k
    qb, kb, needs_tile = _partial_blocks(states)  # query-major, key blocks ascending
    if qb.numel() >= 2**31:
        raise ValueError(f"a BlockMask with {qb.numel()} visited blocks (the native kernels index them in int32)")
    tile_of = torch.full(qb.shape, -1, dtype=torch.int32)
    tile_of[needs_tile] = torch.arange(int(needs_tile.sum()), dtype=torch.int32)
    parts = list(zip(qb[needs_tile].tolist(), kb[needs_tile].tolist()))
    # The mask function may depend on the batch row or head inside a partial block even where the block
    # states are shared (a FlexAttention mask built with B=None or H=None): the tiles have as many batch
    # rows and heads as the states or the function's values, whichever is more; each block is packed
    # into bits as soon as it is evaluated.
    Bt, Ht = _tile_heads(bm, states, *parts[0]) if parts else (1, 1)
    tiles = torch.zeros(Bt, Ht, len(parts), bq, bk // 8, dtype=torch.uint8)
    for t, (i, j) in enumerate(parts):
        i0, i1, j0, j1 = i * bq, min(i * bq + bq, bm.Lq), j * bk, min(j * bk + bk, bm.Lk)
        blk = bm.dense_block(i0, i1, j0, j1)
        blk = blk.reshape((1,) * (4 - blk.dim()) + tuple(blk.shape))  # (b, h, rows, cols)
        if (blk.shape[0] > Bt) or (blk.shape[1] > Ht):
            raise ValueError("a mask function whose values depend on the batch row or head in some blocks only "
                             "(the native kernels need one shape for all of them); use backend='sparse' or 'tiled'")
        s = states[:, :, i, j].view(Bm, Hm, 1, 1).expand(Bt, Ht, 1, 1)  # (Bt, Ht, 1, 1)
        allowed = torch.zeros(Bt, Ht, bq, bk, dtype=torch.bool)
        allowed[:, :, : i1 - i0, : j1 - j0] = (s == 2) | ((s == 1) & blk.expand(Bt, Ht, i1 - i0, j1 - j0))
        tiles[:, :, t] = _bits(allowed)  # (Bt, Ht, bq, bk // 8)
    q_ptr = torch.zeros(nq + 1, dtype=torch.int32)
    q_ptr[1:] = torch.bincount(qb, minlength=nq).cumsum(0)
    order = torch.argsort(kb * nq + qb)  # key-major, query blocks ascending
    k_ptr = torch.zeros(nk + 1, dtype=torch.int32)
    k_ptr[1:] = torch.bincount(kb, minlength=nk).cumsum(0)
    return BlockLists(bq=bq, bk=bk, nq=nq, nk=nk, q_ptr=q_ptr, q_kb=kb.to(torch.int32).contiguous(),
                      q_tile=tile_of.contiguous(), k_ptr=k_ptr, k_qb=qb[order].to(torch.int32).contiguous(),
                      k_tile=tile_of[order].contiguous(), tiles=tiles.contiguous())


def plan(lists: BlockLists, spec: AttentionSpec) -> flash.Plan:
    """The PyTorch FA-2 engine's tile plan over the listed blocks (intersected with the band): what
    the native backward's stand-in runs where that kernel is unavailable, so the work still grows
    with the listed blocks, not Lq * Lk. The engine evaluates the mask on every tile it is told is
    not full."""

    def kv_blocks(qb: int, i0: int, i1: int):
        lo, hi = spec.kv_range(i0, i1)
        for e in range(int(lists.q_ptr[qb]), int(lists.q_ptr[qb + 1])):
            j0 = int(lists.q_kb[e]) * lists.bk
            j1 = min(j0 + lists.bk, spec.Lk)
            if j1 > lo and j0 < hi:
                yield j0, j1, int(lists.q_tile[e]) >= 0

    return flash.Plan(lists.bq, lists.bk, kv_blocks)


def dense(lists: BlockLists, B: int, Hq: int, Lq: int, Lk: int) -> Tensor:
    """The mask the lists describe, bool (B, Hq, Lq, Lk): for tests, and to read the format by."""
    out = torch.zeros(B, Hq, lists.nq * lists.bq, lists.nk * lists.bk, dtype=torch.bool)
    bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    for i in range(lists.nq):
        for e in range(int(lists.q_ptr[i]), int(lists.q_ptr[i + 1])):
            j, t = int(lists.q_kb[e]), int(lists.q_tile[e])
            rows, cols = slice(i * lists.bq, i * lists.bq + lists.bq), slice(j * lists.bk, j * lists.bk + lists.bk)
            if t < 0:
                out[:, :, rows, cols] = True
            else:
                tile = (lists.tiles[:, :, t].unsqueeze(-1) & bits) != 0  # (Bm, Hm, bq, bk // 8, 8)
                out[:, :, rows, cols] = tile.flatten(-2).expand(B, Hq, -1, -1)  # (Bm, Hm, bq, bk) -> (B, Hq, bq, bk)
    return out[:, :, :Lq, :Lk]

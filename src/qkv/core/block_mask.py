"""Block-sparse layouts: `BlockMask` and the exact block classification that builds it.

The layout follows PyTorch's FlexAttention (Dong et al., 2024, "Flex Attention: A
Programming Model for Generating Optimized Attention Kernels"): per query block, the key
blocks that are full (no mask needed), partial (the mask function is evaluated there) or
empty (skipped). It is a data structure of the core, which the sparse backend reads; the
user-facing mask functions that carry exact classifiers live in `qkv.masks`.

How a BlockMask is built exactly and fast: every named pattern (`Pattern`) carries an exact
block classifier (interval arithmetic on the block's index ranges, prefix sums over lookup
tables), so it labels each block full, partial or empty without evaluating its elements;
combinators combine these labels soundly; any block whose label is still unknown (a plain
user function, or two partial blocks under AND/OR) is decided by evaluating the mask
function on exactly that block. So a BlockMask is always exact, and costs O(number of
blocks) for named patterns, O(Lq * Lk) evaluations once for an arbitrary function.

Backends keep what they derive from a mask (tile plans, gathered layouts) in its layout
cache, `BlockMask.cached(key, build)`. See docs/architecture.md.
"""

from __future__ import annotations

import numbers
from typing import Callable, Hashable, Optional, Union

import torch
from torch import Tensor

from .mods import MaskMod, call_mask_mod, index_grid

__all__ = ["BlockMask", "block_mask", "unknown_fraction", "Pattern", "Classes", "classes_of", "check_mask_fn",
           "check_int", "pattern_name"]

# (full, empty, partial): bool tensors broadcastable to (B, H, nq, nk); a block where none
# is True is "unknown" and gets evaluated.
Classes = tuple[Tensor, Tensor, Tensor]
Classifier = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Classes]


class Pattern:
    """A mask function with an exact (or sound) block classifier.

    Call it like any mask function. `classify(b, h, q0, q1, k0, k1)` receives block starts
    and exclusive ends, q0/q1 (1, 1, nq, 1) and k0/k1 (1, 1, 1, nk), and returns
    (full, empty, partial) bool tensors broadcastable to (B, H, nq, nk); a block may be
    labelled only if the label is certain. `pure`: the function depends on its arguments alone
    (qkv.masks' patterns, which copy the tensors they are given, and combinations of pure patterns
    only), so its layout may be cached by identity across calls; a pattern that reads outside state
    (a plain function it calls, a FlexAttention mask_mod) is not, the default.
    """

    __slots__ = ("fn", "classify", "name", "pure")

    def __init__(self, fn: MaskMod, classify: Optional[Classifier], name: str, pure: bool = False):
        self.fn, self.classify, self.name, self.pure = fn, classify, name, pure

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return self.name


def is_pure(fn) -> bool:
    """Whether fn is a `Pattern` that depends on its arguments alone (see Pattern.pure)."""
    return isinstance(fn, Pattern) and fn.pure


def pattern_name(fn) -> str:
    """A pattern's name, or a plain function's qualified name and id (for reprs)."""
    if isinstance(fn, Pattern):
        return fn.name
    return f"<{getattr(fn, '__qualname__', type(fn).__name__)} at {id(fn):#x}>"


def classes_of(fn, b, h, q0, q1, k0, k1) -> Optional[Classes]:
    """The labels of `fn`'s classifier on these blocks (arguments as `Pattern.classify`), or None."""
    if isinstance(fn, Pattern) and fn.classify is not None:
        return fn.classify(b, h, q0, q1, k0, k1)
    return None


def check_mask_fn(fn, where: str) -> None:
    """Raise TypeError, naming `where`, unless fn is callable."""
    if not callable(fn):
        raise TypeError(
            f"{where} expects mask functions mask_mod(b, h, q_idx, kv_idx) -> bool tensor; got "
            f"{type(fn).__name__}"
        )


def check_int(name: str, x, minimum: int = 0) -> int:
    """x as an int >= minimum; TypeError or ValueError naming `name` otherwise."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {x!r}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {x}")
    return int(x)


# ------------------------------------------------------------------ BlockMask
_EMPTY, _PARTIAL, _FULL = 0, 1, 2
# Elements (B * H * rows * keys) evaluated per call when a mask function must be evaluated.
_EVAL_ENTRIES = 1 << 22


class BlockMask:
    """Which (query block, key block) tiles of attention are full, partial or empty.

    Built by `block_mask(...)`. Per batch row b, head h and query block i it stores, as
    FlexAttention does, the number and indices of partial key blocks (the mask must be
    evaluated there) and of full key blocks (every score allowed, no mask needed); key
    blocks in neither list are empty and skipped:

        kv_num_blocks (Bm, Hm, nq) int32, kv_indices (Bm, Hm, nq, max_partial) int32
        full_kv_num_blocks (Bm, Hm, nq), full_kv_indices (Bm, Hm, nq, max_full)

    Bm is 1 when the mask does not depend on b (it broadcasts over the batch), else B; Hm
    likewise for heads. Entries of an index row past its count are padding. The mask
    function itself is kept: `dense_block` re-evaluates it on any block, so a BlockMask
    never means anything different from its function.
    """

    def __init__(self, mask_mod: MaskMod, B: int, H: int, Lq: int, Lk: int, block_q: int, block_k: int,
                 kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor, full_kv_indices: Tensor):
        self.mask_mod = mask_mod
        self.B, self.H, self.Lq, self.Lk = B, H, Lq, Lk
        self.block_q, self.block_k = block_q, block_k
        self.kv_num_blocks, self.kv_indices = kv_num_blocks, kv_indices
        self.full_kv_num_blocks, self.full_kv_indices = full_kv_num_blocks, full_kv_indices
        # What backends derive from this mask (tile plans, gathered layouts), by key: see `cached`.
        self.layouts: dict = {}

    def cached(self, key: Hashable, build: Callable[[], object]):
        """The layout stored under `key`, built by `build()` on first use and kept with the mask."""
        got = self.layouts.get(key)
        if got is None:
            got = self.layouts[key] = build()
        return got

    # ---------------------------------------------------------------- shape
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Lq, Lk) as given to `block_mask` (B or H of 1 broadcasts)."""
        return (self.B, self.H, self.Lq, self.Lk)

    @property
    def block_size(self) -> tuple[int, int]:
        return (self.block_q, self.block_k)

    @property
    def num_blocks(self) -> tuple[int, int]:
        """(nq, nk): query blocks and key blocks."""
        return (-(-self.Lq // self.block_q), -(-self.Lk // self.block_k))

    def check_compatible(self, B: int, Hq: int, Lq: int, Lk: int) -> None:
        """Raise ValueError unless this mask fits attention of shape (B, Hq, Lq, Lk)."""
        problems = []
        if self.B not in (1, B):
            problems.append(f"batch {self.B} (attention has B={B}; build it with B={B} or B=1 to broadcast)")
        if self.H not in (1, Hq):
            problems.append(f"heads {self.H} (attention has Hq={Hq}; build it with H={Hq} or H=1 to broadcast)")
        if self.Lq != Lq:
            problems.append(f"query length {self.Lq} (attention has Lq={Lq})")
        if self.Lk != Lk:
            problems.append(f"key length {self.Lk} (attention has Lk={Lk})")
        if problems:
            raise ValueError(
                f"BlockMask of shape {self.shape} does not fit q/k of (B, Hq, Lq, Lk) = {(B, Hq, Lq, Lk)}: "
                + "; ".join(problems) + ". Build it with qkv.block_mask(mask_mod, B, H, Lq, Lk)"
            )

    # ---------------------------------------------------------------- evaluation
    def _grid(self, i0: int, i1: int, j0: int, j1: int, device):
        return index_grid(self.B, self.H, i0, i1, j0, j1, device)

    def dense_block(self, i0: int, i1: int, j0: int, j1: int, device=None) -> Tensor:
        """The mask function evaluated on rows [i0, i1), columns [j0, j1): bool,
        broadcastable to (B, H, i1 - i0, j1 - j0)."""
        return call_mask_mod(self.mask_mod, *self._grid(i0, i1, j0, j1, device))

    def block_states(self) -> Tensor:
        """int8 (Bm, Hm, nq, nk): 0 empty, 1 partial, 2 full, from the stored indices."""
        nq, nk = self.num_blocks
        Bm, Hm = self.kv_num_blocks.shape[:2]
        states = torch.zeros(Bm, Hm, nq, nk + 1, dtype=torch.int8)  # last column: padding sink
        for num, idx, val in ((self.kv_num_blocks, self.kv_indices, _PARTIAL),
                              (self.full_kv_num_blocks, self.full_kv_indices, _FULL)):
            valid = torch.arange(idx.shape[-1]).view(1, 1, 1, -1) < num.unsqueeze(-1)  # (Bm, Hm, nq, m)
            cols = torch.where(valid, idx.long(), torch.full_like(idx.long(), nk))
            states.scatter_(-1, cols, torch.full(cols.shape, val, dtype=torch.int8))
        return states[..., :nk]

    def to_dense(self, device=None) -> Tensor:
        """The dense bool mask (B, H, Lq, Lk): True in full blocks, False in empty ones, the
        mask function's values in partial ones."""
        states = self.block_states()
        out = torch.zeros(self.B, self.H, self.Lq, self.Lk, dtype=torch.bool, device=device)
        bq, bk = self.block_size
        st = states.expand(self.B, self.H, *states.shape[2:])  # (B, H, nq, nk)
        for qb, kb in (states != _EMPTY).any(0).any(0).nonzero().tolist():
            i0, i1, j0, j1 = qb * bq, min(qb * bq + bq, self.Lq), kb * bk, min(kb * bk + bk, self.Lk)
            s = st[:, :, qb, kb].to(device).view(self.B, self.H, 1, 1)  # (B, H, 1, 1)
            blk = self.dense_block(i0, i1, j0, j1, device=device).expand(self.B, self.H, i1 - i0, j1 - j0)
            out[:, :, i0:i1, j0:j1] = (s == _FULL) | ((s == _PARTIAL) & blk)
        return out

    # ---------------------------------------------------------------- reports
    def counts(self) -> dict:
        """Numbers of full, partial and empty blocks over all (b, h) stored."""
        nq, nk = self.num_blocks
        Bm, Hm = self.kv_num_blocks.shape[:2]
        full = int(self.full_kv_num_blocks.sum())
        partial = int(self.kv_num_blocks.sum())
        return {"full": full, "partial": partial, "empty": Bm * Hm * nq * nk - full - partial}

    def sparsity(self) -> float:
        """Percentage of blocks that are empty (skipped entirely)."""
        c = self.counts()
        total = sum(c.values())
        return 100.0 * c["empty"] / total if total else 0.0

    def picture(self, b: int = 0, h: int = 0, max_size: int = 32) -> str:
        """A text picture of the block layout of batch row b, head h.

        '█' full, '░' partial, '·' empty; when there are more than `max_size` blocks a side,
        each character stands for a group of blocks (full if all are, empty if all are).
        """
        states = self.block_states()
        s = states[min(b, states.shape[0] - 1), min(h, states.shape[1] - 1)]  # (nq, nk)
        nq, nk = s.shape
        gq, gk = max(1, -(-nq // max_size)), max(1, -(-nk // max_size))
        lines = []
        for r in range(0, nq, gq):
            row = []
            for c in range(0, nk, gk):
                cell = s[r : r + gq, c : c + gk]
                row.append("█" if bool((cell == _FULL).all()) else "·" if bool((cell == _EMPTY).all()) else "░")
            lines.append("".join(row))
        return "\n".join(lines)

    def __repr__(self) -> str:
        nq, nk = self.num_blocks
        c = self.counts()
        return (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, blocks={nq}x{nk}, "
            f"full={c['full']}, partial={c['partial']}, empty={c['empty']}, sparsity={self.sparsity():.1f}%, "
            f"mask_mod={pattern_name(self.mask_mod)})\n" + self.picture()
        )


def _block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, numbers.Integral) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise TypeError(f"block_size must be an int or a (block_q, block_k) pair; got {block_size!r}")
    return check_int("block_size[0]", block_size[0], 1), check_int("block_size[1]", block_size[1], 1)


def block_mask(mask_mod: MaskMod, B: Optional[int] = 1, H: Optional[int] = 1, Lq: int = 0, Lk: Optional[int] = None,
               *, block_size: Union[int, tuple[int, int]] = 128, device=None) -> BlockMask:
    """Build the block-sparse layout of a mask function.

    Args:
        mask_mod: mask_mod(b, h, q_idx, kv_idx) -> bool tensor (True = may attend).
        B: batch size, or 1/None if the mask is the same for every batch row.
        H: query heads, or 1/None if the mask is the same for every head.
        Lq: query length. Lk: key length (defaults to Lq).
        block_size: int or (block_q, block_k); also the tile size of the sparse backend.
        device: where the mask function is evaluated (the layout itself stays on the CPU).

    Returns:
        A BlockMask. Named patterns are classified from their block ranges (no element is
        evaluated where the label is certain); every other block is decided by evaluating
        `mask_mod` on it, query-block row by query-block row, so the layout is exact and
        the whole Lq x Lk grid is never held at once.
    """
    check_mask_fn(mask_mod, "block_mask")
    B = 1 if B is None else check_int("B", B, 1)
    H = 1 if H is None else check_int("H", H, 1)
    Lq = check_int("Lq", Lq)
    Lk = Lq if Lk is None else check_int("Lk", Lk)
    bq, bk = _block_size(block_size)

    full, empty, partial = _classify(mask_mod, B, H, Lq, Lk, bq, bk)  # (Bc, Hc, nq, nk) each
    unknown = ~(full | empty | partial)
    if bool(unknown.any()):
        full, empty, partial = _evaluate_unknown(mask_mod, unknown, full, empty, partial, B, H, Lq, Lk, bq, bk, device)

    # compact layout, FlexAttention style: counts and the indices first in each row
    def compact(flag: Tensor) -> tuple[Tensor, Tensor]:
        num = flag.sum(-1, dtype=torch.int32)  # (Bm, Hm, nq)
        width = int(num.max()) if num.numel() else 0
        order = torch.sort((~flag).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        return num, order.to(torch.int32)  # (Bm, Hm, nq, width)

    kv_num, kv_idx = compact(partial)
    full_num, full_idx = compact(full)
    return BlockMask(mask_mod, B, H, Lq, Lk, bq, bk, kv_num, kv_idx, full_num, full_idx)


def _classify(mask_mod, B: int, H: int, Lq: int, Lk: int, bq: int, bk: int) -> Classes:
    """Stage 1: the labels a pattern's classifier is certain of, without evaluating elements.

    Returns (full, empty, partial) bool (Bc, Hc, nq, nk); blocks with no label are unknown.
    """
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    b = torch.arange(B).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    h = torch.arange(H).view(1, -1, 1, 1)  # (1, H, 1, 1)
    q0 = (torch.arange(nq) * bq).view(1, 1, -1, 1)  # (1, 1, nq, 1)
    k0 = (torch.arange(nk) * bk).view(1, 1, 1, -1)  # (1, 1, 1, nk)
    q1, k1 = (q0 + bq).clamp(max=Lq), (k0 + bk).clamp(max=Lk)
    zero = torch.zeros(1, 1, nq, nk, dtype=torch.bool)
    got = classes_of(mask_mod, b, h, q0, q1, k0, k1)
    full, empty, partial = torch.broadcast_tensors(*(got if got is not None else (zero, zero, zero)), zero)[:3]
    return full.clone(), empty.clone(), partial.clone()


def unknown_fraction(mask_mod: MaskMod, B: int, H: int, Lq: int, Lk: int, block_size=128) -> float:
    """Share of blocks whose label needs evaluating the function (0 for exact named patterns).

    Cheap (no element is evaluated); `auto` uses it to decide whether building a BlockMask
    on the fly pays.
    """
    bq, bk = _block_size(block_size)
    full, empty, partial = _classify(mask_mod, B, H, Lq, Lk, bq, bk)
    unknown = ~(full | empty | partial)
    return float(unknown.float().mean()) if unknown.numel() else 0.0


def _evaluate_unknown(mask_mod, unknown, full, empty, partial, B, H, Lq, Lk, bq, bk, device):
    """Decide the unknown blocks by evaluating mask_mod on them, one query-block row at a time."""
    nq, nk = unknown.shape[-2:]
    rows = unknown.any(0).any(0)  # (nq, nk): unknown for some (b, h)
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)  # (1, H, 1, 1)
    per_call = max(1, _EVAL_ENTRIES // (B * H * bq * bk))
    results = []  # (qb, cols, all, any) with all/any of shape (b', h', n)
    for qb in rows.any(1).nonzero().flatten().tolist():
        i0, i1 = qb * bq, min(qb * bq + bq, Lq)
        cols = rows[qb].nonzero().flatten()
        q = torch.arange(i0, i1, device=device).view(1, 1, -1, 1)  # (1, 1, rows, 1)
        for c in range(0, len(cols), per_call):
            js = cols[c : c + per_call]
            # columns of these key blocks side by side; a ragged last block repeats its last key
            kv = (js.view(-1, 1) * bk + torch.arange(bk).view(1, -1)).clamp(max=Lk - 1)  # (n, bk)
            kv = kv.to(device).view(1, 1, 1, -1)  # (1, 1, 1, n*bk)
            got = call_mask_mod(mask_mod, b, h, q, kv)
            if got.dim() > 4:
                raise ValueError(f"mask function returned shape {tuple(got.shape)}; "
                                 "it must broadcast to (B, H, bq, bk)")
            got = got.reshape((1,) * (4 - got.dim()) + tuple(got.shape))
            got = got.expand(got.shape[0], got.shape[1], i1 - i0, kv.shape[-1])  # (b', h', rows, n*bk)
            g = got.reshape(*got.shape[:2], i1 - i0, len(js), bk)  # (b', h', rows, n, bk)
            results.append((qb, js, g.all(4).all(2).cpu(), g.any(4).any(2).cpu()))
    Bm = B if any(r[2].shape[0] != 1 for r in results) or full.shape[0] != 1 else 1
    Hm = H if any(r[2].shape[1] != 1 for r in results) or full.shape[1] != 1 else 1
    full, empty, partial, unknown = (t.expand(Bm, Hm, nq, nk).clone() for t in (full, empty, partial, unknown))
    for qb, js, all_, any_ in results:
        u = unknown[:, :, qb, js]  # (Bm, Hm, n)
        all_, any_ = all_.expand(Bm, Hm, -1), any_.expand(Bm, Hm, -1)
        full[:, :, qb, js] |= u & all_
        empty[:, :, qb, js] |= u & ~any_
        partial[:, :, qb, js] |= u & any_ & ~all_
    return full, empty, partial

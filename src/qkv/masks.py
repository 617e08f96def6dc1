"""Mask functions, score functions, their combinators, and the block-sparse `BlockMask`.

A mask function says which key each query may attend to; it is written once with tensor
operations and evaluated by qkv wherever it is needed (the dense oracle, the block-sparse
layout, the partial blocks of the sparse backend), so its meaning cannot differ between
paths. The idea and the `BlockMask` layout follow PyTorch's FlexAttention (Dong et al., 2024,
"Flex Attention: A Programming Model for Generating Optimized Attention Kernels").

Contract (README.md, "The attention core"):

    mask_mod(b, h, q_idx, kv_idx) -> bool tensor            True = may attend
    score_mod(score, b, h, q_idx, kv_idx) -> score tensor    changes scores before softmax

The index arguments are broadcastable integer tensors: b (B, 1, 1, 1), h (1, H, 1, 1),
q_idx (1, 1, bq, 1), kv_idx (1, 1, 1, bk); the result must broadcast to (B, H, bq, bk). Use
tensor operations (`&`, `|`, `~`, `torch.where`, indexing a lookup table), never Python `if`
on their values. q_idx and kv_idx are raw positions, aligned to the top left: pass
`offset=Lk - Lq` to `causal`/windows to align them to the bottom right as `causal=True` does.

Named patterns (each returns a mask function):

- `causal`: Vaswani et al., 2017, "Attention Is All You Need" (decoder self-attention).
- `sliding_window`, `causal_sliding_window`: Beltagy et al., 2020, "Longformer"; Jiang et
  al., 2023, "Mistral 7B" (causal window).
- `dilated_sliding_window`: Longformer's dilated window (Beltagy et al., 2020, sec. 3.1).
- `strided`, `fixed`: Child et al., 2019, "Generating Long Sequences with Sparse Transformers".
- `global_tokens`, `longformer`: global tokens plus a local window (Beltagy et al., 2020).
- `bigbird`: global, window and random blocks (Zaheer et al., 2020, "Big Bird").
- `document`: block-diagonal packing of several sequences into one row (as in Krell et al.,
  2021, "Efficient Sequence Packing without Cross-contamination").
- `prefix_lm`: bidirectional prefix, causal rest (Raffel et al., 2020, "T5", sec. 3.2.1).

Score functions: `alibi` (Press et al., 2022, "Train Short, Test Long"), `soft_cap`
(Bello et al., 2016; Gemma 2 Team, 2024), `relative_position_bias` (Shaw et al., 2018,
"Self-Attention with Relative Position Representations"; Raffel et al., 2020).

How a BlockMask is built exactly and fast: every named pattern carries an exact block
classifier (interval arithmetic on the block's index ranges: the set of q - kv differences
in a block is one integer interval; prefix sums over lookup tables), so it labels each
block full, partial or empty without evaluating its elements. Combinators combine these
labels soundly (AND of full and full is full, AND with empty is empty, ...); any block whose
label is still unknown (a plain user function, or two partial blocks under AND/OR) is
decided by evaluating the mask function on exactly that block. So a BlockMask is always
exact, and costs O(number of blocks) for named patterns, O(Lq * Lk) evaluations once for an
arbitrary function (and much less when it is AND-ed with a named pattern).
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .core._spec import MaskMod, ScoreMod, _call_mask_mod, index_grid

__all__ = [
    "BlockMask",
    "block_mask",
    "dense_mask",
    "unknown_fraction",
    "and_masks",
    "or_masks",
    "not_mask",
    "causal",
    "sliding_window",
    "causal_sliding_window",
    "dilated_sliding_window",
    "strided",
    "fixed",
    "global_tokens",
    "longformer",
    "bigbird",
    "document",
    "prefix_lm",
    "alibi",
    "alibi_slopes",
    "soft_cap",
    "relative_position_bias",
]

# (full, empty, partial): bool tensors broadcastable to (B, H, nq, nk); a block where none
# is True is "unknown" and gets evaluated.
Classes = tuple[Tensor, Tensor, Tensor]
Classifier = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Classes]


class _Pattern:
    """A mask function with an exact (or sound) block classifier.

    Call it like any mask function. `classify(b, h, q0, q1, k0, k1)` receives block starts
    and exclusive ends, q0/q1 (1, 1, nq, 1) and k0/k1 (1, 1, 1, nk), and returns
    (full, empty, partial) bool tensors broadcastable to (B, H, nq, nk); a block may be
    labelled only if the label is certain.
    """

    __slots__ = ("fn", "classify", "name")

    def __init__(self, fn: MaskMod, classify: Optional[Classifier], name: str):
        self.fn, self.classify, self.name = fn, classify, name

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return self.name


def _name(fn) -> str:
    if isinstance(fn, _Pattern):
        return fn.name
    return f"<{getattr(fn, '__qualname__', type(fn).__name__)} at {id(fn):#x}>"


def _classes_of(fn, b, h, q0, q1, k0, k1) -> Optional[Classes]:
    if isinstance(fn, _Pattern) and fn.classify is not None:
        return fn.classify(b, h, q0, q1, k0, k1)
    return None


def _check_mask_fn(fn, where: str) -> None:
    if not callable(fn):
        raise TypeError(
            f"{where} expects mask functions mask_mod(b, h, q_idx, kv_idx) -> bool tensor; got "
            f"{type(fn).__name__}"
        )


# ------------------------------------------------------------------ combinators
def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask function that allows (b, h, q, kv) where every given function allows it.

    With no functions it allows everything.
    """
    for m in mask_mods:
        _check_mask_fn(m, "and_masks")

    def fn(b, h, q_idx, kv_idx):
        out = torch.ones((), dtype=torch.bool, device=q_idx.device)
        for m in mask_mods:
            out = out & _call_mask_mod(m, b, h, q_idx, kv_idx)
        return out

    def classify(b, h, q0, q1, k0, k1):
        full = torch.ones((), dtype=torch.bool)
        empty = torch.zeros((), dtype=torch.bool)
        partial_sure = torch.zeros((), dtype=torch.bool)
        for m in mask_mods:
            c = _classes_of(m, b, h, q0, q1, k0, k1)
            if c is None:  # unknown everywhere: only an empty label elsewhere stays certain
                partial_sure = torch.zeros((), dtype=torch.bool)
                full = torch.zeros((), dtype=torch.bool)
                continue
            f, e, p = c
            # full AND partial is partial; partial AND partial is unknown
            partial_sure = (full & p) | (partial_sure & f)
            full = full & f
            empty = empty | e
        return full, empty, partial_sure & ~empty

    return _Pattern(fn, classify, "and_masks(" + ", ".join(_name(m) for m in mask_mods) + ")")


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask function that allows (b, h, q, kv) where any given function allows it.

    With no functions it allows nothing.
    """
    for m in mask_mods:
        _check_mask_fn(m, "or_masks")

    def fn(b, h, q_idx, kv_idx):
        out = torch.zeros((), dtype=torch.bool, device=q_idx.device)
        for m in mask_mods:
            out = out | _call_mask_mod(m, b, h, q_idx, kv_idx)
        return out

    def classify(b, h, q0, q1, k0, k1):
        full = torch.zeros((), dtype=torch.bool)
        empty = torch.ones((), dtype=torch.bool)
        partial_sure = torch.zeros((), dtype=torch.bool)
        for m in mask_mods:
            c = _classes_of(m, b, h, q0, q1, k0, k1)
            if c is None:
                partial_sure = torch.zeros((), dtype=torch.bool)
                empty = torch.zeros((), dtype=torch.bool)
                continue
            f, e, p = c
            # empty OR partial is partial; partial OR partial is unknown
            partial_sure = (empty & p) | (partial_sure & e)
            full = full | f
            empty = empty & e
        return full, empty, partial_sure & ~full

    return _Pattern(fn, classify, "or_masks(" + ", ".join(_name(m) for m in mask_mods) + ")")


def not_mask(mask_mod: MaskMod) -> MaskMod:
    """A mask function that allows exactly what `mask_mod` forbids."""
    _check_mask_fn(mask_mod, "not_mask")

    def fn(b, h, q_idx, kv_idx):
        return ~_call_mask_mod(mask_mod, b, h, q_idx, kv_idx)

    def classify(b, h, q0, q1, k0, k1):
        c = _classes_of(mask_mod, b, h, q0, q1, k0, k1)
        if c is None:
            z = torch.zeros((), dtype=torch.bool)
            return z, z, z
        f, e, p = c
        return e, f, p

    return _Pattern(fn, classify, f"not_mask({_name(mask_mod)})")


# ------------------------------------------------------- building blocks (exact)
def _int(name: str, x, minimum: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {x!r}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {x}")
    return int(x)


def _diff_band(lo: Optional[int], hi: Optional[int], name: str) -> _Pattern:
    """Allows lo <= q - kv <= hi (None = unbounded). Exact classifier: in a block the
    differences q - kv take every integer in [q0 - (k1-1), (q1-1) - k0]."""

    def fn(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        out = torch.ones((), dtype=torch.bool, device=q_idx.device)
        if lo is not None:
            out = out & (d >= lo)
        if hi is not None:
            out = out & (d <= hi)
        return out

    def classify(b, h, q0, q1, k0, k1):
        dmin, dmax = q0 - (k1 - 1), (q1 - 1) - k0  # (1, 1, nq, nk)
        full = torch.ones_like(dmin, dtype=torch.bool)
        empty = torch.zeros_like(dmin, dtype=torch.bool)
        if lo is not None:
            full &= dmin >= lo
            empty |= dmax < lo
        if hi is not None:
            full &= dmax <= hi
            empty |= dmin > hi
        return full, empty, ~full & ~empty

    return _Pattern(fn, classify, name)


def _diff_mod(m: int, r: int, name: str) -> _Pattern:
    """Allows (q - kv) % m == r. Exact: a block with two or more distinct differences
    contains two consecutive integers, so for m > 1 it is never full."""

    def fn(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) % m == r

    def classify(b, h, q0, q1, k0, k1):
        dmin, dmax = q0 - (k1 - 1), (q1 - 1) - k0
        first = dmin + (r - dmin) % m  # smallest difference >= dmin that matches
        empty = first > dmax
        full = ~empty & ((dmin == dmax) | (m == 1))
        return full, empty, ~full & ~empty

    return _Pattern(fn, classify, name)


def _lookup(table: Tensor, idx: Tensor, fill) -> Tensor:
    """table[idx] for integer idx of any shape; `fill` where idx is outside [0, len)."""
    n = table.shape[-1]
    t = table.to(idx.device)
    if n == 0:
        return torch.full(idx.shape, fill, dtype=t.dtype, device=idx.device)
    got = t[idx.clamp(0, n - 1)]
    return torch.where((idx >= 0) & (idx < n), got, torch.tensor(fill, dtype=t.dtype, device=idx.device))


def _count_true(lut: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Number of True entries of the 1-D `lut` at positions [lo, hi) (beyond its end: False)."""
    cs = torch.cat([torch.zeros(1, dtype=torch.int64), lut.to(torch.int64).cumsum(0)])  # (n+1,)
    n = lut.shape[0]
    return cs[hi.clamp(0, n)] - cs[lo.clamp(0, n)]


def _position_set(lut: Tensor, axis: str, name: str) -> _Pattern:
    """Allows every (q, kv) whose q (axis="q") or kv (axis="kv") is in the set `lut` (bool (n,))."""
    lut = lut.to(torch.bool).cpu()

    def fn(b, h, q_idx, kv_idx):
        return _lookup(lut, q_idx if axis == "q" else kv_idx, False)

    def classify(b, h, q0, q1, k0, k1):
        lo, hi = (q0, q1) if axis == "q" else (k0, k1)
        count = _count_true(lut, lo, hi)
        full, empty = count == hi - lo, count == 0
        return full, empty, ~full & ~empty

    return _Pattern(fn, classify, name)


def _block_table(table: Tensor, cell_q: int, cell_k: int, name: str) -> _Pattern:
    """Allows (q, kv) where table[q // cell_q, kv // cell_k] (False beyond the table).

    Exact classifier from 2-D prefix sums: a block is full iff every cell it touches is True
    (cells beyond the table count as False), empty iff none is.
    """
    table = table.to(torch.bool).cpu()
    R, C = table.shape
    pre = torch.zeros(R + 1, C + 1, dtype=torch.int64)
    pre[1:, 1:] = table.to(torch.int64).cumsum(0).cumsum(1)  # (R+1, C+1)

    def fn(b, h, q_idx, kv_idx):
        rq, ck = torch.div(q_idx, cell_q, rounding_mode="floor"), torch.div(kv_idx, cell_k, rounding_mode="floor")
        inside = (rq >= 0) & (rq < R) & (ck >= 0) & (ck < C)
        t = table.to(q_idx.device)
        return inside & t[rq.clamp(0, max(R - 1, 0)), ck.clamp(0, max(C - 1, 0))]

    def classify(b, h, q0, q1, k0, k1):
        r0, r1 = q0 // cell_q, (q1 - 1) // cell_q + 1  # cells touched, unclamped
        c0, c1 = k0 // cell_k, (k1 - 1) // cell_k + 1
        r0c, r1c, c0c, c1c = r0.clamp(0, R), r1.clamp(0, R), c0.clamp(0, C), c1.clamp(0, C)
        count = pre[r1c, c1c] - pre[r0c, c1c] - pre[r1c, c0c] + pre[r0c, c0c]  # (1, 1, nq, nk)
        full = count == (r1 - r0) * (c1 - c0)
        empty = count == 0
        return full, empty, ~full & ~empty

    return _Pattern(fn, classify, name)


# ------------------------------------------------------------------ named patterns
def causal(offset: int = 0) -> MaskMod:
    """Query q may attend to key kv when kv <= q + offset.

    offset=0 aligns to the top left (FlexAttention's convention); offset=Lk - Lq gives the
    bottom-right alignment of `causal=True`. Vaswani et al., 2017 (decoder self-attention).
    """
    offset = _int("offset", offset, minimum=-(1 << 62))
    return _diff_band(-offset, None, f"causal(offset={offset})")


def sliding_window(left: int, right: Optional[int] = None, *, offset: int = 0) -> MaskMod:
    """Query q may attend to keys q + offset - left .. q + offset + right (inclusive).

    `sliding_window(w)` is the symmetric window of Longformer (Beltagy et al., 2020);
    `right=0` is the causal window of Mistral 7B (Jiang et al., 2023). The same band as
    `window=(left, right)` of qkv.attention when offset = Lk - Lq.

    Args:
        left: keys before the query's position it may see (>= 0).
        right: keys after it (>= 0); defaults to `left`.
        offset: key position of query 0's diagonal.
    """
    left = _int("left", left)
    right = left if right is None else _int("right", right)
    offset = _int("offset", offset, minimum=-(1 << 62))
    return _diff_band(-offset - right, -offset + left, f"sliding_window(left={left}, right={right}, offset={offset})")


def causal_sliding_window(window: int, *, offset: int = 0) -> MaskMod:
    """Each query sees itself and the `window` keys before it (Mistral 7B, Jiang et al., 2023)."""
    return sliding_window(window, 0, offset=offset)


def dilated_sliding_window(window: int, dilation: int, *, causal: bool = False) -> MaskMod:
    """Keys at distances 0, d, 2d, ..., window*d from the query (Longformer's dilated window).

    Beltagy et al., 2020, sec. 3.1: a window of `window` keys on each side (only before the
    query with causal=True) with gaps of `dilation - 1` between them, so the receptive field
    grows with depth without more keys per query.
    """
    window, dilation = _int("window", window), _int("dilation", dilation, minimum=1)
    reach = window * dilation
    band = _diff_band(0 if causal else -reach, reach, f"band({reach})")
    return _named(and_masks(band, _diff_mod(dilation, 0, f"every({dilation})")),
                  f"dilated_sliding_window(window={window}, dilation={dilation}, causal={causal})")


def strided(stride: int) -> MaskMod:
    """The strided pattern of the Sparse Transformer (Child et al., 2019, sec. 4.1), causal.

    Query q attends to the previous `stride` positions (kv in (q - stride, q]) and to every
    earlier position at a multiple of `stride` from it ((q - kv) % stride == 0): the union of
    the paper's two heads A(1) and A(2) in one mask.
    """
    stride = _int("stride", stride, minimum=1)
    local = _diff_band(0, stride - 1, f"band(0, {stride - 1})")
    every = and_masks(_diff_band(0, None, "causal"), _diff_mod(stride, 0, f"every({stride})"))
    return _named(or_masks(local, every), f"strided(stride={stride})")


def fixed(block: int, c: int = 1) -> MaskMod:
    """The fixed pattern of the Sparse Transformer (Child et al., 2019, sec. 4.1), causal.

    Query q attends to earlier keys of its own block of `block` positions
    (floor(kv / block) == floor(q / block)) and to the last `c` positions of every block
    (kv % block >= block - c), the "summary" cells.
    """
    block, c = _int("block", block, minimum=1), _int("c", c)
    if c > block:
        raise ValueError(f"fixed: c must be <= block; got c={c}, block={block}")

    def same_fn(b, h, q_idx, kv_idx):
        return torch.div(q_idx, block, rounding_mode="floor") == torch.div(kv_idx, block, rounding_mode="floor")

    def same_cls(b, h, q0, q1, k0, k1):
        sq0, sq1, sk0, sk1 = q0 // block, (q1 - 1) // block, k0 // block, (k1 - 1) // block
        full = (sq0 == sq1) & (sk0 == sk1) & (sq0 == sk0)
        empty = (sq1 < sk0) | (sk1 < sq0)  # segments are contiguous: disjoint ranges
        return full, empty, ~full & ~empty

    def summary_fn(b, h, q_idx, kv_idx):
        return kv_idx % block >= block - c

    def summary_cls(b, h, q0, q1, k0, k1):
        def below(x):  # positions in [0, x) that are summary cells
            return (x // block) * c + (x % block - (block - c)).clamp(min=0)

        count = below(k1) - below(k0)
        full, empty = count == k1 - k0, count == 0
        return full, empty, ~full & ~empty

    same = _Pattern(same_fn, same_cls, f"same_block({block})")
    summary = _Pattern(summary_fn, summary_cls, f"summary({block}, {c})")
    return _named(and_masks(_diff_band(0, None, "causal"), or_masks(same, summary)), f"fixed(block={block}, c={c})")


def _positions(name: str, positions) -> Tensor:
    """A bool lookup vector from an int n (the first n positions) or a sequence of positions."""
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        n = _int(name, positions)
        return torch.ones(n, dtype=torch.bool)
    if isinstance(positions, Tensor):
        positions = positions.flatten().tolist()
    try:
        idx = [int(p) for p in positions]
    except TypeError:
        raise TypeError(f"{name} must be an int n (the first n positions) or a list of positions; got {positions!r}") from None
    if any(p < 0 for p in idx):
        raise ValueError(f"{name} must be non-negative positions; got {idx}")
    lut = torch.zeros(max(idx, default=-1) + 1, dtype=torch.bool)
    lut[idx] = True
    return lut


def global_tokens(positions) -> MaskMod:
    """Global tokens attend to everything and everything attends to them (Longformer).

    Args:
        positions: an int n (the first n tokens, e.g. [CLS]) or a list of token positions.
    """
    lut = _positions("positions", positions)
    desc = f"global_tokens({positions if isinstance(positions, numbers.Integral) else lut.nonzero().flatten().tolist()})"
    gq, gk = _position_set(lut, "q", "global_q"), _position_set(lut, "kv", "global_kv")

    def fn(b, h, q_idx, kv_idx):
        return gq(b, h, q_idx, kv_idx) | gk(b, h, q_idx, kv_idx)

    def classify(b, h, q0, q1, k0, k1):
        # exact: a block is full iff all its rows or all its columns are global, empty iff
        # none is; otherwise a non-global row meets a non-global column (False) and a global
        # row or column gives a True.
        fq, eq, _ = gq.classify(b, h, q0, q1, k0, k1)
        fk, ek, _ = gk.classify(b, h, q0, q1, k0, k1)
        full, empty = fq | fk, eq & ek
        return full, empty, ~full & ~empty

    return _Pattern(fn, classify, desc)


def longformer(window: int, global_positions) -> MaskMod:
    """Longformer's attention (Beltagy et al., 2020): a symmetric sliding window of `window`
    keys on each side plus global tokens that see and are seen by every position."""
    return _named(or_masks(sliding_window(window), global_tokens(global_positions)),
                  f"longformer(window={window}, global={global_positions!r})")


def bigbird(seq_len: int, *, block: int = 64, num_global_blocks: int = 1, num_window_blocks: int = 3,
            num_random_blocks: int = 3, seed: int = 0) -> MaskMod:
    """BigBird's block-sparse pattern (Zaheer et al., 2020, sec. 2 and App. D, "ITC").

    Positions are grouped into blocks of `block` tokens. The first `num_global_blocks` blocks
    attend to all blocks and all blocks attend to them; every query block sees the
    `num_window_blocks` blocks centred on itself and `num_random_blocks` other key blocks
    drawn at random (without repetition, from a generator seeded with `seed`, so the same
    arguments give the same mask). Positions at or beyond `seq_len` see nothing.
    """
    seq_len, block = _int("seq_len", seq_len), _int("block", block, minimum=1)
    g, w, r = (_int("num_global_blocks", num_global_blocks), _int("num_window_blocks", num_window_blocks),
               _int("num_random_blocks", num_random_blocks))
    n = -(-seq_len // block)
    idx = torch.arange(n)
    table = (idx.view(-1, 1) - idx.view(1, -1)).abs() <= w // 2  # (n, n) window band
    table[:g, :] = True
    table[:, :g] = True
    gen = torch.Generator().manual_seed(_int("seed", seed))
    for row in range(g, n):
        candidates = (~table[row]).nonzero().flatten()
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:r]]
        table[row, pick] = True
    # positions beyond seq_len: the table covers n*block >= seq_len positions; cut exactly.
    pat = _block_table(table, block, block, "bigbird_table")
    valid = _diff_band(None, None, "all")
    if n * block != seq_len:
        lut = torch.ones(seq_len, dtype=torch.bool)
        valid = and_masks(_position_set(lut, "q", "valid_q"), _position_set(lut, "kv", "valid_kv"))
    return _named(and_masks(pat, valid), f"bigbird(seq_len={seq_len}, block={block}, num_global_blocks={g}, "
                                         f"num_window_blocks={w}, num_random_blocks={r}, seed={seed})")


_PAD_DOC = (1 << 62)  # document id of positions after the last document (larger than any id)


def _doc_table(lengths) -> Tensor:
    """Document id of every position, (Bd, Ltot): one row per batch row (Bd = 1: shared)."""
    if isinstance(lengths, Tensor):
        lengths = lengths.tolist()
    if not isinstance(lengths, (list, tuple)) or len(lengths) == 0:
        raise TypeError(f"document lengths must be a non-empty list of ints (or one list per batch row); got {lengths!r}")
    rows = lengths if isinstance(lengths[0], (list, tuple)) else [lengths]
    tables = []
    for row in rows:
        lens = torch.tensor([_int(f"document length {i}", n) for i, n in enumerate(row)], dtype=torch.int64)
        lens = lens[lens > 0]  # zero-length documents take no id, so ids step by one
        tables.append(torch.repeat_interleave(torch.arange(len(lens)), lens))  # (Ltot_row,)
    width = max(len(t) for t in tables)
    out = torch.full((len(tables), width), _PAD_DOC, dtype=torch.int64)  # (Bd, Ltot)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


def document(lengths, *, causal: bool = False) -> MaskMod:
    """Block-diagonal mask of sequences packed into one row: tokens see only their own document.

    Packing several documents into one sequence avoids padding; this mask stops attention
    from crossing document boundaries (Krell et al., 2021, "Efficient Sequence Packing
    without Cross-contamination"). Positions after the last document see nothing.

    Args:
        lengths: document lengths in order, e.g. [100, 37, 250]; or one such list per batch
            row (indexed by b).
        causal: also forbid attending to later tokens inside each document.
    """
    table = _doc_table(lengths)  # (Bd, Ltot)
    Bd, width = table.shape

    def ids(b: Tensor, pos: Tensor) -> Tensor:
        t = table.to(pos.device)
        got = t[b.clamp(0, Bd - 1) if Bd > 1 else 0, pos.clamp(0, max(width - 1, 0))]
        return torch.where((pos >= 0) & (pos < width), got, torch.full_like(got, _PAD_DOC))

    def fn(b, h, q_idx, kv_idx):
        dq = ids(b, q_idx)
        return (dq == ids(b, kv_idx)) & (dq != _PAD_DOC)

    def classify(b, h, q0, q1, k0, k1):
        bb = b if Bd > 1 else torch.zeros(1, 1, 1, 1, dtype=torch.int64)
        dq0, dq1, dk0, dk1 = ids(bb, q0), ids(bb, q1 - 1), ids(bb, k0), ids(bb, k1 - 1)
        # ids are non-decreasing and step by one, so a block holds every id in its range
        full = (dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0) & (dq0 != _PAD_DOC)
        empty = (dq1 < dk0) | (dk1 < dq0) | (dq0 == _PAD_DOC) | (dk0 == _PAD_DOC)
        return full, empty, ~full & ~empty

    docs = _Pattern(fn, classify, "docs")
    desc = f"document(lengths={lengths!r}, causal={causal})"
    if causal:
        return _named(and_masks(docs, _diff_band(0, None, "causal")), desc)
    return _named(docs, desc)


def prefix_lm(prefix_length) -> MaskMod:
    """Prefix-LM: every query sees the whole prefix, the rest is causal (T5, Raffel et al., 2020).

    Args:
        prefix_length: an int, or a 1-D int tensor/list with one prefix length per batch row.
    """
    if isinstance(prefix_length, numbers.Integral) and not isinstance(prefix_length, bool):
        P = torch.tensor([_int("prefix_length", prefix_length)])
    else:
        P = torch.as_tensor(prefix_length).to(torch.int64).flatten()
        if P.numel() == 0 or bool((P < 0).any()):
            raise ValueError(f"prefix_length must be non-negative ints, one per batch row; got {prefix_length!r}")

    def lookup(b: Tensor, device) -> Tensor:
        t = P.to(device)
        return t[b.clamp(0, len(P) - 1)] if len(P) > 1 else t[0]

    def fn(b, h, q_idx, kv_idx):
        return kv_idx < lookup(b, kv_idx.device)

    def classify(b, h, q0, q1, k0, k1):
        p = lookup(b, k0.device)
        full, empty = k1 - 1 < p, k0 >= p
        return full, empty, ~full & ~empty

    prefix = _Pattern(fn, classify, "prefix")
    return _named(or_masks(prefix, _diff_band(0, None, "causal")), f"prefix_lm({prefix_length!r})")


def _named(p: _Pattern, name: str) -> _Pattern:
    return _Pattern(p.fn, p.classify, name)


def dense_mask(mask_mod: MaskMod, B: int, H: int, Lq: int, Lk: int, *, device=None) -> Tensor:
    """Evaluate a mask function on the whole grid: bool (B, H, Lq, Lk). Memory Lq * Lk."""
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)  # (1, H, 1, 1)
    q = torch.arange(Lq, device=device).view(1, 1, -1, 1)  # (1, 1, Lq, 1)
    kv = torch.arange(Lk, device=device).view(1, 1, 1, -1)  # (1, 1, 1, Lk)
    return _call_mask_mod(mask_mod, b, h, q, kv).expand(B, H, Lq, Lk)


# ------------------------------------------------------------------ score functions
def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's head slopes (Press et al., 2022): the geometric sequence 2^(-8i/n), i = 1..n,
    for n a power of two; otherwise those of the nearest lower power of two followed by every
    other slope of the next power (the paper's reference code). float32 (num_heads,)."""
    num_heads = _int("num_heads", num_heads, minimum=1)

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 1 << (num_heads.bit_length() - 1)
    slopes = power_of_two(p)
    if p != num_heads:
        slopes += power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi(num_heads: int, *, slopes: Optional[Tensor] = None) -> ScoreMod:
    """Attention with Linear Biases (Press et al., 2022): score - slope[h] * |q - kv|.

    With a causal mask this is the paper's -m * (i - j); without one it is the symmetric
    variant. `slopes` (num_heads,) overrides `alibi_slopes(num_heads)`.
    """
    s = alibi_slopes(num_heads) if slopes is None else torch.as_tensor(slopes, dtype=torch.float32).flatten()
    if s.numel() != num_heads:
        raise ValueError(f"alibi: got {s.numel()} slopes for num_heads={num_heads}; give one slope per head")

    def score_mod(score, b, h, q_idx, kv_idx):
        m = s.to(score.device, score.dtype)[h]  # (1, H, 1, 1)
        return score - m * (q_idx - kv_idx).abs().to(score.dtype)

    return score_mod


def soft_cap(cap: float) -> ScoreMod:
    """tanh soft-capping, cap * tanh(score / cap): scores stay in (-cap, cap) smoothly.

    Bello et al., 2016 ("Neural Combinatorial Optimization", logit clipping); used on
    attention logits by Gemma 2 (Gemma Team, 2024) with cap = 50.
    """
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not cap > 0:
        raise ValueError(f"soft_cap: cap must be a positive number; got {cap!r}")
    cap = float(cap)

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return score_mod


def relative_position_bias(table: Tensor, max_distance: int) -> ScoreMod:
    """A learned bias per head and clipped relative position (Shaw et al., 2018; T5 style).

    score + table[h, clamp(kv - q, -max_distance, max_distance) + max_distance].

    Args:
        table: (H, 2 * max_distance + 1) bias per head and relative position; detach it for
            the tiled and sparse backends (which do not differentiate captured tensors).
        max_distance: relative positions beyond it share the edge entry.
    """
    max_distance = _int("max_distance", max_distance)
    if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[1] != 2 * max_distance + 1:
        got = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(
            f"relative_position_bias: table must be (H, 2*max_distance+1) = (H, {2 * max_distance + 1}); got {got}"
        )

    def score_mod(score, b, h, q_idx, kv_idx):
        rel = (kv_idx - q_idx).clamp(-max_distance, max_distance) + max_distance  # (1, 1, bq, bk)
        return score + table.to(score.device, score.dtype)[h, rel]  # (1, H, bq, bk)

    return score_mod


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
        self._cache: dict = {}

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
        return _call_mask_mod(self.mask_mod, *self._grid(i0, i1, j0, j1, device))

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
            f"mask_mod={_name(self.mask_mod)})\n" + self.picture()
        )


def _block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, numbers.Integral) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise TypeError(f"block_size must be an int or a (block_q, block_k) pair; got {block_size!r}")
    return _int("block_size[0]", block_size[0], 1), _int("block_size[1]", block_size[1], 1)


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
    _check_mask_fn(mask_mod, "block_mask")
    B = 1 if B is None else _int("B", B, 1)
    H = 1 if H is None else _int("H", H, 1)
    Lq = _int("Lq", Lq)
    Lk = Lq if Lk is None else _int("Lk", Lk)
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
    got = _classes_of(mask_mod, b, h, q0, q1, k0, k1)
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
            got = _call_mask_mod(mask_mod, b, h, q, kv)
            if got.dim() > 4:
                raise ValueError(f"mask function returned shape {tuple(got.shape)}; it must broadcast to (B, H, bq, bk)")
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

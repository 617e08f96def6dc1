"""Mask combinators and the exact building blocks of the named patterns.

`and_masks`, `or_masks` and `not_mask` combine mask functions, and their block labels
soundly (AND of full and full is full, AND with empty is empty, ...), as FlexAttention's
combinators do (Dong et al., 2024). The building blocks below carry exact block classifiers:
in a block of rows [q0, q1) and keys [k0, k1) the differences q - kv take every integer in
[q0 - (k1-1), (q1-1) - k0]; position sets and block tables are counted by prefix sums. See
`qkv.core.block_mask` for how the labels build a BlockMask, and docs/architecture.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.block_mask import Pattern, check_mask_fn, classes_of, is_pure, pattern_name
from ..core.mods import MaskMod, call_mask_mod

__all__ = ["and_masks", "or_masks", "not_mask", "diff_band", "diff_mod", "position_set", "block_table", "named"]


# ------------------------------------------------------------------ combinators
def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask function that allows (b, h, q, kv) where every given function allows it.

    With no functions it allows everything.
    """
    for m in mask_mods:
        check_mask_fn(m, "and_masks")

    def fn(b, h, q_idx, kv_idx):
        out = torch.ones((), dtype=torch.bool, device=q_idx.device)
        for m in mask_mods:
            out = out & call_mask_mod(m, b, h, q_idx, kv_idx)
        return out

    def classify(b, h, q0, q1, k0, k1):
        full = torch.ones((), dtype=torch.bool)
        empty = torch.zeros((), dtype=torch.bool)
        partial_sure = torch.zeros((), dtype=torch.bool)
        for m in mask_mods:
            c = classes_of(m, b, h, q0, q1, k0, k1)
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

    return Pattern(fn, classify, "and_masks(" + ", ".join(pattern_name(m) for m in mask_mods) + ")",
                   pure=all(is_pure(m) for m in mask_mods))


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask function that allows (b, h, q, kv) where any given function allows it.

    With no functions it allows nothing.
    """
    for m in mask_mods:
        check_mask_fn(m, "or_masks")

    def fn(b, h, q_idx, kv_idx):
        out = torch.zeros((), dtype=torch.bool, device=q_idx.device)
        for m in mask_mods:
            out = out | call_mask_mod(m, b, h, q_idx, kv_idx)
        return out

    def classify(b, h, q0, q1, k0, k1):
        full = torch.zeros((), dtype=torch.bool)
        empty = torch.ones((), dtype=torch.bool)
        partial_sure = torch.zeros((), dtype=torch.bool)
        for m in mask_mods:
            c = classes_of(m, b, h, q0, q1, k0, k1)
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

    return Pattern(fn, classify, "or_masks(" + ", ".join(pattern_name(m) for m in mask_mods) + ")",
                   pure=all(is_pure(m) for m in mask_mods))


def not_mask(mask_mod: MaskMod) -> MaskMod:
    """A mask function that allows exactly what `mask_mod` forbids."""
    check_mask_fn(mask_mod, "not_mask")

    def fn(b, h, q_idx, kv_idx):
        return ~call_mask_mod(mask_mod, b, h, q_idx, kv_idx)

    def classify(b, h, q0, q1, k0, k1):
        c = classes_of(mask_mod, b, h, q0, q1, k0, k1)
        if c is None:
            z = torch.zeros((), dtype=torch.bool)
            return z, z, z
        f, e, p = c
        return e, f, p

    return Pattern(fn, classify, f"not_mask({pattern_name(mask_mod)})", pure=is_pure(mask_mod))



# ------------------------------------------------------- building blocks (exact)
def diff_band(lo: Optional[int], hi: Optional[int], name: str) -> Pattern:
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

    return Pattern(fn, classify, name, pure=True)


def diff_mod(m: int, r: int, name: str) -> Pattern:
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

    return Pattern(fn, classify, name, pure=True)


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


def position_set(lut: Tensor, axis: str, name: str) -> Pattern:
    """Allows every (q, kv) whose q (axis="q") or kv (axis="kv") is in the set `lut` (bool (n,))."""
    lut = lut.to(torch.bool).cpu().clone()  # a copy: the pattern is pure (its layout cached by identity)

    def fn(b, h, q_idx, kv_idx):
        return _lookup(lut, q_idx if axis == "q" else kv_idx, False)

    def classify(b, h, q0, q1, k0, k1):
        lo, hi = (q0, q1) if axis == "q" else (k0, k1)
        count = _count_true(lut, lo, hi)
        full, empty = count == hi - lo, count == 0
        return full, empty, ~full & ~empty

    return Pattern(fn, classify, name, pure=True)


def block_table(table: Tensor, cell_q: int, cell_k: int, name: str) -> Pattern:
    """Allows (q, kv) where table[q // cell_q, kv // cell_k] (False beyond the table).

    Exact classifier from 2-D prefix sums: a block is full iff every cell it touches is True
    (cells beyond the table count as False), empty iff none is.
    """
    table = table.to(torch.bool).cpu().clone()  # a copy: the pattern is pure (its layout cached by identity)
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

    return Pattern(fn, classify, name, pure=True)



def named(p: Pattern, name: str) -> Pattern:
    """The pattern p under another name (for reprs)."""
    return Pattern(p.fn, p.classify, name, p.pure)


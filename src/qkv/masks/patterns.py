"""The named mask patterns: each returns a mask function with an exact block classifier.

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

`dense_mask` evaluates any mask function on the whole grid. See docs/architecture.md.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from ..core.block_mask import Pattern, check_int
from ..core.mods import MaskMod, call_mask_mod, index_grid
from .combinators import and_masks, block_table, diff_band, diff_mod, named, or_masks, position_set

__all__ = ["causal", "sliding_window", "causal_sliding_window", "dilated_sliding_window", "strided", "fixed",
           "global_tokens", "longformer", "bigbird", "document", "prefix_lm", "dense_mask"]


def causal(offset: int = 0) -> MaskMod:
    """Query q may attend to key kv when kv <= q + offset.

    offset=0 aligns to the top left (FlexAttention's convention); offset=Lk - Lq gives the
    bottom-right alignment of `causal=True`. Vaswani et al., 2017 (decoder self-attention).
    """
    offset = check_int("offset", offset, minimum=-(1 << 62))
    return diff_band(-offset, None, f"causal(offset={offset})")


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
    left = check_int("left", left)
    right = left if right is None else check_int("right", right)
    offset = check_int("offset", offset, minimum=-(1 << 62))
    return diff_band(-offset - right, -offset + left, f"sliding_window(left={left}, right={right}, offset={offset})")


def causal_sliding_window(window: int, *, offset: int = 0) -> MaskMod:
    """Each query sees itself and the `window` keys before it (Mistral 7B, Jiang et al., 2023)."""
    return sliding_window(window, 0, offset=offset)


def dilated_sliding_window(window: int, dilation: int, *, causal: bool = False) -> MaskMod:
    """Keys at distances 0, d, 2d, ..., window*d from the query (Longformer's dilated window).

    Beltagy et al., 2020, sec. 3.1: a window of `window` keys on each side (only before the
    query with causal=True) with gaps of `dilation - 1` between them, so the receptive field
    grows with depth without more keys per query.
    """
    window, dilation = check_int("window", window), check_int("dilation", dilation, minimum=1)
    reach = window * dilation
    band = diff_band(0 if causal else -reach, reach, f"band({reach})")
    return named(and_masks(band, diff_mod(dilation, 0, f"every({dilation})")),
                  f"dilated_sliding_window(window={window}, dilation={dilation}, causal={causal})")


def strided(stride: int) -> MaskMod:
    """The strided pattern of the Sparse Transformer (Child et al., 2019, sec. 4.1), causal.

    Query q attends to the previous `stride` positions (kv in (q - stride, q]) and to every
    earlier position at a multiple of `stride` from it ((q - kv) % stride == 0): the union of
    the paper's two heads A(1) and A(2) in one mask.
    """
    stride = check_int("stride", stride, minimum=1)
    local = diff_band(0, stride - 1, f"band(0, {stride - 1})")
    every = and_masks(diff_band(0, None, "causal"), diff_mod(stride, 0, f"every({stride})"))
    return named(or_masks(local, every), f"strided(stride={stride})")


def fixed(block: int, c: int = 1) -> MaskMod:
    """The fixed pattern of the Sparse Transformer (Child et al., 2019, sec. 4.1), causal.

    Query q attends to earlier keys of its own block of `block` positions
    (floor(kv / block) == floor(q / block)) and to the last `c` positions of every block
    (kv % block >= block - c), the "summary" cells.
    """
    block, c = check_int("block", block, minimum=1), check_int("c", c)
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

    same = Pattern(same_fn, same_cls, f"same_block({block})", pure=True)
    summary = Pattern(summary_fn, summary_cls, f"summary({block}, {c})", pure=True)
    return named(and_masks(diff_band(0, None, "causal"), or_masks(same, summary)), f"fixed(block={block}, c={c})")


def _positions(name: str, positions) -> Tensor:
    """A bool lookup vector from an int n (the first n positions) or a sequence of positions."""
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        n = check_int(name, positions)
        return torch.ones(n, dtype=torch.bool)
    if isinstance(positions, Tensor):
        positions = positions.flatten().tolist()
    try:
        idx = [int(p) for p in positions]
    except TypeError:
        raise TypeError(f"{name} must be an int n (the first n positions) or a list of positions; "
                        f"got {positions!r}") from None
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
    shown = positions if isinstance(positions, numbers.Integral) else lut.nonzero().flatten().tolist()
    desc = f"global_tokens({shown})"
    gq, gk = position_set(lut, "q", "global_q"), position_set(lut, "kv", "global_kv")

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

    return Pattern(fn, classify, desc, pure=True)


def longformer(window: int, global_positions) -> MaskMod:
    """Longformer's attention (Beltagy et al., 2020): a symmetric sliding window of `window`
    keys on each side plus global tokens that see and are seen by every position."""
    return named(or_masks(sliding_window(window), global_tokens(global_positions)),
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
    seq_len, block = check_int("seq_len", seq_len), check_int("block", block, minimum=1)
    g, w, r = (check_int("num_global_blocks", num_global_blocks), check_int("num_window_blocks", num_window_blocks),
               check_int("num_random_blocks", num_random_blocks))
    n = -(-seq_len // block)
    idx = torch.arange(n)
    table = (idx.view(-1, 1) - idx.view(1, -1)).abs() <= w // 2  # (n, n) window band
    table[:g, :] = True
    table[:, :g] = True
    gen = torch.Generator().manual_seed(check_int("seed", seed))
    for row in range(g, n):
        candidates = (~table[row]).nonzero().flatten()
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:r]]
        table[row, pick] = True
    # positions beyond seq_len: the table covers n*block >= seq_len positions; cut exactly.
    pat = block_table(table, block, block, "bigbird_table")
    valid = diff_band(None, None, "all")
    if n * block != seq_len:
        lut = torch.ones(seq_len, dtype=torch.bool)
        valid = and_masks(position_set(lut, "q", "valid_q"), position_set(lut, "kv", "valid_kv"))
    return named(and_masks(pat, valid), f"bigbird(seq_len={seq_len}, block={block}, num_global_blocks={g}, "
                                         f"num_window_blocks={w}, num_random_blocks={r}, seed={seed})")


_PAD_DOC = (1 << 62)  # document id of positions after the last document (larger than any id)


def _doc_table(lengths) -> Tensor:
    """Document id of every position, (Bd, Ltot): one row per batch row (Bd = 1: shared)."""
    if isinstance(lengths, Tensor):
        lengths = lengths.tolist()
    if not isinstance(lengths, (list, tuple)) or len(lengths) == 0:
        raise TypeError("document lengths must be a non-empty list of ints (or one list per batch row); "
                        f"got {lengths!r}")
    rows = lengths if isinstance(lengths[0], (list, tuple)) else [lengths]
    tables = []
    for row in rows:
        lens = torch.tensor([check_int(f"document length {i}", n) for i, n in enumerate(row)], dtype=torch.int64)
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
    if table.shape[1] == 0:  # only empty documents: no position belongs to one (a table of width 0 cannot be indexed)
        table = torch.full((table.shape[0], 1), _PAD_DOC, dtype=table.dtype)
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

    docs = Pattern(fn, classify, "docs", pure=True)
    desc = f"document(lengths={lengths!r}, causal={causal})"
    if causal:
        return named(and_masks(docs, diff_band(0, None, "causal")), desc)
    return named(docs, desc)


def prefix_lm(prefix_length) -> MaskMod:
    """Prefix-LM: every query sees the whole prefix, the rest is causal (T5, Raffel et al., 2020).

    Args:
        prefix_length: an int, or a 1-D int tensor/list with one prefix length per batch row.
    """
    if isinstance(prefix_length, numbers.Integral) and not isinstance(prefix_length, bool):
        P = torch.tensor([check_int("prefix_length", prefix_length)])
    else:
        P = torch.as_tensor(prefix_length).to(torch.int64).flatten().clone()  # a copy: the pattern is pure
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

    prefix = Pattern(fn, classify, "prefix", pure=True)
    return named(or_masks(prefix, diff_band(0, None, "causal")), f"prefix_lm({prefix_length!r})")


def dense_mask(mask_mod: MaskMod, B: int, H: int, Lq: int, Lk: int, *, device=None) -> Tensor:
    """Evaluate a mask function on the whole grid: bool (B, H, Lq, Lk). Memory Lq * Lk."""
    grid = index_grid(B, H, 0, Lq, 0, Lk, device)  # b (B,1,1,1), h (1,H,1,1), q (1,1,Lq,1), kv (1,1,1,Lk)
    return call_mask_mod(mask_mod, *grid).expand(B, H, Lq, Lk)  # (B, H, Lq, Lk)

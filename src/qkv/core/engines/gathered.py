"""The gathered-rows engine of the sparse backend: each row group's keys in one product.

The tiled engine (FlashAttention-2, Dao 2023) walks a query block's key blocks one at a
time and merges them with the online softmax, paying several elementwise passes per block
(max, rescale, exp, sum). When a BlockMask leaves each query block only a few key blocks,
as local windows (Longformer, Beltagy et al. 2020; Mistral, Jiang et al. 2023), global
tokens and packed documents do, all of a row group's keys fit in cache at once. This
engine therefore takes, for every group of R query rows, the key columns its blocks
allow (trimmed at both ends to the columns some row may see), computes all their scores
in one batched matrix product, adds the mask as a 0/-inf bias over the columns where
something is masked, applies one fused softmax, and multiplies by the values: the plain
three-step attention of Vaswani et al. (2017) restricted to the columns that matter, with
no online rescaling.

Row groups with the same mask pattern whose key runs move by a constant stride (a sliding
window) are batched, the keys read through strided views without any copy; a row group
with no such neighbours is computed for all heads at once. Mask patterns are deduplicated,
so a window of any length stores a handful of R x W bias tiles. The layout (which columns,
which pattern) depends only on the BlockMask and the causal/window band; it is cached on
the BlockMask, or for a band alone in a small module-level cache.

The backward pass recomputes the probabilities from the saved log-sum-exp as FlashAttention
does (Dao 2023, Alg. 2), row group by row group, and adds key and value gradients back at
the gathered columns. Grouped-query heads are folded into the rows (Ainslie et al., 2023).
Dropout, score functions and tensor masks are left to the tiled engine
(qkv/core/engines/flash.py). Layout: docs/architecture.md.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..spec import AttentionSpec, call_mask_mod, compute_dtype
from .flash import Recomputed, probabilities_, split_lse

_MAX_ROWS = 32  # query rows per row group: narrower groups waste fewer masked columns
_CHUNK_ENTRIES = 1 << 19  # score entries (rows x keys) per batched product: 2 MiB in float32
_FP_WEIGHTS: dict = {}
_BAND_ROWS = 128  # query block of a band-only layout (no BlockMask)
_BAND_LAYOUTS: "OrderedDict[tuple, Layout]" = OrderedDict()  # band-only layouts by shape and band
_BAND_LAYOUTS_MAX = 16


def supports(spec: AttentionSpec) -> bool:
    """True when this engine honours every argument (else the tiled engine runs): a BlockMask
    and/or a causal/window band, and nothing else."""
    return (
        (spec.block_mask is not None or spec.banded)
        and spec.mask_mod is None
        and spec.bool_mask is None
        and spec.float_mask is None
        and spec.score_mod is None
        and spec.dropout_p == 0.0
        and spec.Lq > 0
    )


def row_height(block_q: int) -> int:
    """Rows per group: the BlockMask's query block halved down to at most 64 rows."""
    r = block_q
    while r > _MAX_ROWS and r % 2 == 0:
        r //= 2
    return r


@dataclass
class Chunk:
    """Row groups computed by one batched product per key/value head, or one row group for all heads.

    rows: row-group indices (n,); r0: the first when they are consecutive, else None.
    runs: per contiguous run of key columns, (start, step, width): the run of row group i
    (i-th in `rows`) is columns start + i*step + [0, width), read through a strided view.
    pattern: index into Layout.patterns. by_heads: n == 1 and the batch of the products is
    the B*Hkv key/value heads instead of the row groups.
    """

    rows: Tensor
    r0: Optional[int]
    runs: tuple
    pattern: int
    by_heads: bool

    @property
    def n(self) -> int:
        return self.rows.numel()

    def columns(self, run: int, device) -> Tensor:
        """(n*W_run,) key indices of run `run`, row group after row group."""
        start, step, width = self.runs[run]
        base = start + step * torch.arange(self.n, device=device).view(-1, 1)  # (n, 1)
        return (base + torch.arange(width, device=device).view(1, -1)).flatten()  # (n*W,)


@dataclass
class Pattern:
    """The mask of row groups that share it: columns [lo, hi) hold some masked score,
    `allowed` (Bm, Hm, R, hi-lo) says which (True = may attend); every other column is
    allowed for every row. empty: bool (Bm, Hm, R) rows that see no key, or None."""

    lo: int
    hi: int
    allowed: Tensor
    empty: Optional[Tensor]


@dataclass
class Layout:
    """Row groups of R query rows, their key runs and mask patterns for one BlockMask + band.

    Rows of the last, ragged row group beyond Lq repeat row Lq-1. any_empty_group: some
    row group sees no key at all (it has no chunk; its output is 0 and its lse -inf).
    """

    R: int
    n_groups: int
    chunks: list
    patterns: list
    any_empty_group: bool
    _cache: dict = field(default_factory=dict)

    def _per_head(self, t: Tensor, B: int, Hkv: int, G: int) -> Tensor:
        """(Bm, Hm, R, X) -> (1 or B*Hkv, G*R, X): the G query heads of each kv head stacked as rows."""
        Bm, Hm, R, X = t.shape
        if Hm > 1:
            t = t.view(Bm, Hkv, G, R, X)  # (Bm, Hkv, G, R, X); query head = hkv * G + g
        else:
            t = t.unsqueeze(2).expand(Bm, 1, G, R, X)  # (Bm, 1, G, R, X)
        t = t.reshape(Bm, t.shape[1], G * R, X)  # (Bm, Hkv or 1, G*R, X)
        if Bm == 1 and t.shape[1] == 1:
            return t.reshape(1, G * R, X)
        return t.expand(B, Hkv, G * R, X).reshape(B * Hkv, G * R, X)

    def bias(self, p: int, B: int, Hkv: int, G: int, dtype) -> Optional[Tensor]:
        """Additive mask of pattern p over its columns [lo, hi): (1 or B*Hkv, G*R, hi-lo), or None."""
        key = ("bias", p, B, Hkv, G, dtype)
        if key not in self._cache:
            pat = self.patterns[p]
            got = None
            if pat.hi > pat.lo:
                a = self._per_head(pat.allowed, B, Hkv, G)
                got = torch.zeros(a.shape, dtype=dtype, device=a.device).masked_fill_(~a, float("-inf"))
            self._cache[key] = got
        return self._cache[key]

    def empty(self, p: int, B: int, Hkv: int, G: int) -> Optional[Tensor]:
        """Rows of pattern p that see no key: bool (1 or B*Hkv, G*R, 1), or None."""
        key = ("empty", p, B, Hkv, G)
        if key not in self._cache:
            e = self.patterns[p].empty
            self._cache[key] = None if e is None else self._per_head(e.unsqueeze(-1), B, Hkv, G)
        return self._cache[key]


def _fingerprint(t: Tensor) -> tuple:
    """A cheap hash of a bool tensor (shape + weighted sum); equality is checked on collision."""
    n = t.numel()
    w = _FP_WEIGHTS.get(n)
    if w is None:
        w = torch.randint(1, 1 << 40, (n,), generator=torch.Generator().manual_seed(n))
        _FP_WEIGHTS[n] = w
    return (tuple(t.shape), int((t.reshape(-1).long() * w.to(t.device)).sum()))


def layout(spec: AttentionSpec, bm, device) -> Layout:
    """The cached Layout of BlockMask `bm` (None: the band alone) under the spec's causal/window band."""
    key: tuple = ("gathered", spec.left, spec.right, spec.offset, spec.groups, str(device))
    if bm is not None:
        return bm.cached(key, lambda: _build_layout(spec, bm, device))
    key = key + (spec.Lq, spec.Lk)
    got = _BAND_LAYOUTS.get(key)
    if got is None:
        got = _BAND_LAYOUTS[key] = _build_layout(spec, bm, device)
        while len(_BAND_LAYOUTS) > _BAND_LAYOUTS_MAX:
            _BAND_LAYOUTS.popitem(last=False)
    else:
        _BAND_LAYOUTS.move_to_end(key)
    return got


def _runs(cols: Tensor) -> list:
    """Sorted columns -> [(start, width)] of their contiguous runs."""
    breaks = ((cols[1:] - cols[:-1]) != 1).nonzero().flatten().tolist()
    edges = [0] + [b + 1 for b in breaks] + [cols.numel()]
    return [(int(cols[a]), b - a) for a, b in zip(edges, edges[1:])]


def _build_layout(spec: AttentionSpec, bm, device) -> Layout:
    Lq, Lk = spec.Lq, spec.Lk
    if bm is None:  # the causal/window band alone: one run of keys per query block
        bq, bk, nq = _BAND_ROWS, None, -(-Lq // _BAND_ROWS)
    else:
        bq, bk = bm.block_q, bm.block_k
        states = bm.block_states()  # (Bm, Hm, nq, nk): 0 empty, 1 partial, 2 full
        visit = (states != 0).flatten(0, 1).any(0)  # (nq, nk)
        full_all = (states == 2).flatten(0, 1).all(0)  # (nq, nk)
        nq = visit.shape[0]
    R = row_height(bq)
    n_groups = -(-Lq // R)
    # The mask function is evaluated for every batch row and head of the mask (bm.B x bm.H), not only
    # the block states' (Bm x Hm): it may tell heads apart inside a partial block where the states do
    # not (a FlexAttention mask built with H=None); `allowed` then has its own (Bm', Hm').
    Bf, Hf = (1, 1) if bm is None else (bm.B, bm.H)
    b_idx = torch.arange(Bf, device=device).view(-1, 1, 1, 1)  # (Bf, 1, 1, 1)
    h_idx = torch.arange(Hf, device=device).view(1, -1, 1, 1)  # (1, Hf, 1, 1)

    groups = []  # (row group, runs [(start, width)], allowed (Bm', Hm', R, W))
    empty_group = False
    for qb in range(nq):
        i0, i1 = qb * bq, min(qb * bq + bq, Lq)
        lo, hi = spec.kv_range(i0, i1)
        if bm is None:
            spans = [(max(lo, 0), min(hi, Lk), True)]
        else:
            spans = [(max(kb * bk, lo), min(kb * bk + bk, Lk, hi), bool(full_all[qb, kb]))
                     for kb in visit[qb].nonzero().flatten().tolist()]
        cols, full_cols = [], []
        for j0, j1, full in spans:
            if j0 < j1:
                cols.append(torch.arange(j0, j1))
                full_cols.append(torch.full((j1 - j0,), full))
        n_rg = -(-(i1 - i0) // R)
        if not cols:
            empty_group = True
            continue
        cols_t = torch.cat(cols)  # (C,) sorted key columns this query block may see
        full_t = torch.cat(full_cols)  # (C,) True where the block is full for every (b, h)
        block_of = torch.cat([torch.full((c.numel(),), i) for i, c in enumerate(cols)])  # (C,) block number
        rows = torch.arange(i0, i0 + n_rg * R).clamp(max=Lq - 1)  # (n_rg*R,): ragged rows repeat the last
        allowed = torch.ones(1, 1, rows.numel(), cols_t.numel(), dtype=torch.bool, device=device)
        part = (~full_t).nonzero().flatten()
        if part.numel():
            got = call_mask_mod(bm.mask_mod, b_idx, h_idx, rows.to(device).view(1, 1, -1, 1),
                                 cols_t[part].to(device).view(1, 1, 1, -1))
            got = got.reshape((1,) * (4 - got.dim()) + tuple(got.shape))
            allowed = allowed.expand(got.shape[0], got.shape[1], -1, -1).clone()
            allowed[..., part.to(device)] = got.expand(-1, -1, rows.numel(), part.numel())
        if spec.banded:
            row_lo, row_hi = spec.band_edges(rows.to(device).view(-1, 1))  # (rows, 1) each
            kv = cols_t.to(device).view(1, -1)  # (1, C)
            allowed = allowed & (kv >= row_lo) & (kv < row_hi)  # (Bm', Hm', rows, C)
        for g in range(n_rg):
            a = allowed[:, :, g * R:(g + 1) * R]  # (Bm', Hm', R, C)
            seen = a.any(2).flatten(0, 1).any(0)  # (C,): some row of some (b, h) may see the column
            if not bool(seen.any()):
                empty_group = True
                continue
            # drop columns nobody in the group sees, but only whole key blocks or the two ends,
            # so the remaining runs stay few and wide
            blk_seen = torch.zeros(len(cols), dtype=torch.int32).index_add_(0, block_of, seen.cpu().int())  # (blocks,)
            keep = (blk_seen > 0)[block_of]  # (C,): the whole key block if any of it is seen
            nz = seen.nonzero().flatten()
            keep[: int(nz[0])] = False
            keep[int(nz[-1]) + 1:] = False
            kidx = keep.nonzero().flatten()
            groups.append(((i0 // R) + g, _runs(cols_t[kidx]), a[..., kidx.to(device)].contiguous()))

    patterns: list[Tensor] = []
    by_fp: dict[tuple, list[int]] = {}
    pattern_of: list[int] = []
    for _, _, a in groups:  # deduplicate the masks
        fp = _fingerprint(a)
        cands = by_fp.setdefault(fp, [])
        for p in cands:
            if torch.equal(patterns[p], a):
                break
        else:
            p = len(patterns)
            patterns.append(a)
            cands.append(p)
        pattern_of.append(p)
    compact = []
    for a in patterns:
        masked = (~a).flatten(0, 2).any(0).nonzero().flatten()  # columns with some masked score
        lo, hi = (int(masked[0]), int(masked[-1]) + 1) if masked.numel() else (0, 0)
        e = ~a.any(-1)  # (Bm', Hm', R)
        compact.append(Pattern(lo, hi, a[..., lo:hi].contiguous(), e if bool(e.any()) else None))

    buckets: dict = {}
    for (rg, runs, _), p in zip(groups, pattern_of):
        buckets.setdefault((p, tuple(w for _, w in runs)), []).append((rg, [s for s, _ in runs]))
    chunks = []
    for (p, widths), members in buckets.items():
        per = max(1, _CHUNK_ENTRIES // max(1, R * sum(widths) * spec.groups))
        i = 0
        while i < len(members):  # maximal sequences whose runs all move by constant strides
            j = i + 1
            steps = None
            if j < len(members):
                steps = [b - a for a, b in zip(members[i][1], members[j][1])]
                if min(steps) >= 0:
                    while j < len(members) and all(
                        b - a == s for a, b, s in zip(members[j - 1][1], members[j][1], steps)
                    ):
                        j += 1
                else:
                    steps = None
            for m0 in range(i, j, per):
                m1 = min(m0 + per, j)
                rows = torch.tensor([rg for rg, _ in members[m0:m1]])
                chunk_runs = tuple((st, steps[r] if steps and m1 - m0 > 1 else 0, widths[r])
                                   for r, st in enumerate(members[m0][1]))
                chunks.append(Chunk(rows, _r0(rows), chunk_runs, p, by_heads=(m1 - m0 == 1)))
            i = j
    return Layout(R, n_groups, chunks, compact, empty_group)


def _r0(rows: Tensor) -> Optional[int]:
    """The first row group if the groups are consecutive, else None."""
    if rows.numel() == 1 or bool((rows[1:] - rows[:-1] == 1).all()):
        return int(rows[0])
    return None


# ---------------------------------------------------------------------- compute
def _to_groups(x: Tensor, spec: AttentionSpec, R: int, n_groups: int, ct, zero_pad: bool = False) -> Tensor:
    """(B, Hq, Lq, E) -> (B*Hkv, n_groups, G*R, E) in dtype ct: row groups of the G heads of each kv head.

    Rows past Lq (the last group's padding) repeat row Lq-1, or are zero with zero_pad."""
    B, Hkv, G, Lq, E = spec.B, spec.Hkv, spec.groups, x.shape[2], x.shape[-1]
    pad = n_groups * R - Lq
    if G == 1 and pad == 0:
        return x.to(ct).reshape(B * Hkv, n_groups, R, E)  # a view when x's rows are contiguous
    if pad:
        fill = x[:, :, -1:].expand(B, x.shape[1], pad, E)
        x = torch.cat([x, torch.zeros_like(fill) if zero_pad else fill], dim=2)  # (B, Hq, n_groups*R, E)
    # reshape, not view: a model's q is (B, L, H, D).transpose(1, 2), whose heads are not contiguous
    x = x.to(ct).reshape(B * Hkv, G, n_groups, R, E).transpose(1, 2)  # (B*Hkv, n_groups, G, R, E)
    return x.reshape(B * Hkv, n_groups, G * R, E)


def _from_groups(x: Tensor, spec: AttentionSpec, R: int, n_groups: int) -> Tensor:
    """(B*Hkv, n_groups, G*R, E) -> (B, Hq, Lq, E)."""
    B, Hkv, G, E = spec.B, spec.Hkv, spec.groups, x.shape[-1]
    x = x.view(B, Hkv, n_groups, G, R, E).transpose(2, 3)  # (B, Hkv, G, n_groups, R, E)
    return x.reshape(B, spec.Hq, n_groups * R, E)[:, :, : spec.Lq]


def _run_view(x: Tensor, ch: Chunk, r: int, head: Optional[int]) -> Tensor:
    """Keys or values of run r: x (X, Lk, E) -> (n, W, E) for one head, or (X, W, E) by heads."""
    start, step, width = ch.runs[r]
    if head is None:  # one row group, every head
        return x[:, start: start + width]
    xh = x[head]  # (Lk, E)
    return xh.as_strided((ch.n, width, xh.shape[1]), (step * xh.stride(0), xh.stride(0), xh.stride(1)),
                         xh.storage_offset() + start * xh.stride(0))


def _dst(x: Tensor, ch: Chunk, head: Optional[int]) -> Optional[Tensor]:
    """The chunk's rows of x (X, n_groups, M, E) as a view: (n, M, E) of one head, or (X, M, E)
    of its row group; None if the row groups are scattered."""
    if head is None:
        return x[:, ch.r0]
    if ch.r0 is not None:
        return x[head, ch.r0: ch.r0 + ch.n]
    return None


def _rows(x: Tensor, ch: Chunk, head: Optional[int]) -> Tensor:
    """The chunk's rows of x (X, n_groups, M, E): a view, or a gathered copy when scattered."""
    view = _dst(x, ch, head)
    return view if view is not None else x[head].index_select(0, ch.rows.to(x.device))


def _put_rows(x: Tensor, ch: Chunk, head: Optional[int], val: Tensor, add: bool = False) -> None:
    """Write (or add) val as the chunk's rows of x (X, n_groups, M, E)."""
    view = _dst(x, ch, head)
    if view is not None:
        view.add_(val) if add else view.copy_(val)
    elif add:
        x[head].index_add_(0, ch.rows.to(x.device), val)
    else:
        x[head].index_copy_(0, ch.rows.to(x.device), val)


def _for_head(t: Optional[Tensor], head: Optional[int]) -> Optional[Tensor]:
    """A per-pattern tensor (1 or X, ...) restricted to kv head `head` (None: all heads)."""
    if t is None or head is None or t.shape[0] == 1:
        return t
    return t[head: head + 1]


def _scores(lay: Layout, ch: Chunk, qc: Tensor, kc: Tensor, head: Optional[int], spec: AttentionSpec, ct) -> Tensor:
    """Scaled, masked scores of the chunk: (n or X, G*R, W), keys of all runs side by side."""
    zero = qc.new_zeros(())
    parts = [torch.baddbmm(zero, qc, _run_view(kc, ch, r, head).transpose(1, 2), beta=0.0, alpha=spec.scale)
             for r in range(len(ch.runs))]  # each (n or X, G*R, W_r)
    s = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    bias = _for_head(lay.bias(ch.pattern, spec.B, spec.Hkv, spec.groups, ct), head)
    if bias is not None:
        pat = lay.patterns[ch.pattern]
        s[..., pat.lo: pat.hi].add_(bias)
    return s


def _empty(lay: Layout, ch: Chunk, head: Optional[int], spec: AttentionSpec) -> Optional[Tensor]:
    """Rows of the chunk that see no key: bool (1 or X, G*R, 1), or None."""
    return _for_head(lay.empty(ch.pattern, spec.B, spec.Hkv, spec.groups), head)


def _bmm_runs(p: Tensor, vc: Tensor, ch: Chunk, head: Optional[int], out: Optional[Tensor] = None) -> Tensor:
    """p (n or X, M, W) @ the values of every run -> (n or X, M, Dv), written into `out` if given."""
    w0 = 0
    res = out
    for r, (_, _, width) in enumerate(ch.runs):
        pr = p[..., w0: w0 + width]
        vr = _run_view(vc, ch, r, head)
        if r == 0:
            res = torch.bmm(pr, vr) if out is None else torch.bmm(pr, vr, out=out)
        else:
            assert res is not None  # set by run 0
            res.baddbmm_(pr, vr)
        w0 += width
    assert res is not None  # a chunk has at least one run
    return res



def _heads(ch: Chunk, X: int):
    return [None] if ch.by_heads else range(X)


def layout_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, lay: Layout,
                   need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """No autograd. q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv)
    in q's dtype, and lse (B, Hq, Lq) in the compute dtype when need_lse."""
    out, lse, _ = _layout_forward(q, k, v, spec, lay, need_lse, need_lo=False)
    return out, lse


def forward_for_backward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec,
                         lay: Layout) -> tuple[Tensor, Tensor, Tensor]:
    """`layout_forward`'s out and lse, and lse_lo (B, Hq, Lq) in the compute dtype: lse's low part
    (flash.split_lse), which `layout_backward` takes (what `Recomputed` keeps)."""
    out, lse, lo = _layout_forward(q, k, v, spec, lay, need_lse=True, need_lo=True)
    assert lse is not None and lo is not None  # made when asked for
    return out, lse, lo


def _layout_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, lay: Layout, need_lse: bool,
                    need_lo: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """layout_forward, with lse_lo (B, Hq, Lq) when need_lo (which needs need_lse), else None."""
    ct = compute_dtype(q.dtype)
    X, G, Dv, R, NG = spec.B * spec.Hkv, spec.groups, spec.Dv, lay.R, lay.n_groups
    qg = _to_groups(q, spec, R, NG, ct)  # (X, NG, G*R, D)
    kc = k.to(ct).contiguous().view(X, spec.Lk, spec.D)  # (X, Lk, D)
    vc = v.to(ct).contiguous().view(X, spec.Lk, Dv)  # (X, Lk, Dv)
    alloc = torch.zeros if lay.any_empty_group else torch.empty
    out = alloc(X, NG, G * R, Dv, dtype=ct, device=q.device)
    lse = torch.full((X, NG, G * R, 1), float("-inf"), dtype=ct, device=q.device) if need_lse else None
    lse_lo = torch.zeros(X, NG, G * R, 1, dtype=ct, device=q.device) if need_lo else None
    for ch in lay.chunks:
        for head in _heads(ch, X):
            s = _scores(lay, ch, _rows(qg, ch, head), kc, head, spec, ct)  # (n or X, G*R, W)
            m = s.amax(-1, keepdim=True) if need_lse else None  # (n or X, G*R, 1)
            p = torch.softmax(s, dim=-1)
            dst = _dst(out, ch, head)
            o = _bmm_runs(p, vc, ch, head, out=dst)  # (n or X, G*R, Dv), in place when the rows are a view
            empty = _empty(lay, ch, head, spec)
            if empty is not None:
                o.masked_fill_(empty, 0.0)
            if dst is None or o.data_ptr() != dst.data_ptr():
                _put_rows(out, ch, head, o)
            if need_lse:
                assert m is not None and lse is not None  # both made when need_lse
                log_sum = -torch.log(p.amax(-1, keepdim=True))  # the largest probability is exp(max - lse)
                l_ = m + log_sum  # (n or X, G*R, 1)
                if empty is not None:
                    l_.masked_fill_(empty, float("-inf"))
                _put_rows(lse, ch, head, l_)
                if lse_lo is not None:
                    _put_rows(lse_lo, ch, head, split_lse(m, log_sum, l_))
    out = _from_groups(out, spec, R, NG).to(q.dtype)
    if need_lse:
        assert lse is not None
        lse = _from_groups(lse, spec, R, NG).squeeze(-1)
    if lse_lo is not None:
        lse_lo = _from_groups(lse_lo, spec, R, NG).squeeze(-1)
    return out, lse, lse_lo


def layout_backward(q, k, v, out, lse, d_out, d_lse, spec: AttentionSpec, lse_lo: Optional[Tensor] = None, *,
                    lay: Layout) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), the probabilities recomputed from lse and its low part lse_lo (B, Hq, Lq)
    (FA-2, Alg. 2; flash.block_backward says why the low part)."""
    ct = compute_dtype(q.dtype)
    X, R, NG, D, Dv = spec.B * spec.Hkv, lay.R, lay.n_groups, spec.D, spec.Dv
    delta = (d_out.to(ct) * out.to(ct)).sum(-1, keepdim=True)  # (B, Hq, Lq, 1): rowsum(dO * O)
    if d_lse is not None:
        delta = delta - d_lse.to(ct).unsqueeze(-1)
    lse_safe = lse.masked_fill(torch.isneginf(lse), float("inf")).unsqueeze(-1)  # empty rows: p = 0
    qg = _to_groups(q, spec, R, NG, ct)  # (X, NG, G*R, D)
    # padding rows get dO = 0 and delta = 0, so they add nothing to dk and dv
    dog = _to_groups(d_out, spec, R, NG, ct, zero_pad=True)  # (X, NG, G*R, Dv)
    lseg = _to_groups(lse_safe, spec, R, NG, ct)  # (X, NG, G*R, 1)
    # lse's low part like lseg, but 0 in the padding rows (their dO and delta are 0: they add nothing)
    lo_g = None if lse_lo is None else _to_groups(lse_lo.unsqueeze(-1), spec, R, NG, ct, zero_pad=True)
    deltag = _to_groups(delta, spec, R, NG, ct, zero_pad=True)  # (X, NG, G*R, 1)
    kc = k.to(ct).contiguous().view(X, spec.Lk, D)
    vc = v.to(ct).contiguous().view(X, spec.Lk, Dv)
    dqg = torch.zeros(qg.shape, dtype=ct, device=q.device)
    dk = torch.zeros(X, spec.Lk, D, dtype=ct, device=q.device)
    dv = torch.zeros(X, spec.Lk, Dv, dtype=ct, device=q.device)
    for ch in lay.chunks:
        for head in _heads(ch, X):
            qc, doc = _rows(qg, ch, head), _rows(dog, ch, head)  # (n or X, G*R, D), (n or X, G*R, Dv)
            s = _scores(lay, ch, qc, kc, head, spec, ct)
            lo = None if lo_g is None else _rows(lo_g, ch, head)
            p = probabilities_(s, _rows(lseg, ch, head), lo)  # (n or X, G*R, W): the forward's probabilities
            w0, dps = 0, []
            for r, (_, _, width) in enumerate(ch.runs):
                pr = p[..., w0: w0 + width]
                vr = _run_view(vc, ch, r, head)  # (n or X, W_r, Dv)
                _add_keys(dv, ch, r, head, torch.bmm(pr.transpose(1, 2), doc))
                dps.append(torch.bmm(doc, vr.transpose(1, 2)))  # (n or X, G*R, W_r)
                w0 += width
            dp = dps[0] if len(dps) == 1 else torch.cat(dps, dim=-1)
            ds = p.mul_(dp.sub_(_rows(deltag, ch, head)))  # (n or X, G*R, W): dL/dscores
            _put_rows(dqg, ch, head, _bmm_runs(ds, kc, ch, head), add=True)
            w0 = 0
            for r, (_, _, width) in enumerate(ch.runs):
                _add_keys(dk, ch, r, head, torch.bmm(ds[..., w0: w0 + width].transpose(1, 2), qc))
                w0 += width
    dq = _from_groups(dqg, spec, R, NG) * spec.scale
    dk = dk.view(spec.B, spec.Hkv, spec.Lk, D) * spec.scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.view(spec.B, spec.Hkv, spec.Lk, Dv).to(v.dtype)


def _add_keys(dx: Tensor, ch: Chunk, r: int, head: Optional[int], val: Tensor) -> None:
    """Add val ((n or X), W_r, E) to the key rows of run r in dx (X, Lk, E)."""
    start, _, width = ch.runs[r]
    if head is None:
        dx[:, start: start + width] += val
    else:  # the windows of the row groups may overlap
        dx[head].index_add_(0, ch.columns(r, dx.device), val.reshape(-1, dx.shape[-1]))


def run(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, bm, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Differentiable attention under BlockMask `bm` (None: the band alone) and the spec's band."""
    lay = layout(spec, bm, q.device)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = Recomputed.apply(q, k, v, spec, functools.partial(forward_for_backward, lay=lay),
                                    functools.partial(layout_backward, lay=lay))
        return out, (lse if need_lse else None)
    return layout_forward(q, k, v, spec, lay, need_lse)

"""The call shapes people already write, on qkv's core: torch SDPA, FlashAttention varlen, merges.

- `sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
  enable_gqa=False)`: the signature and semantics of PyTorch's
  `torch.nn.functional.scaled_dot_product_attention`, leading dimensions broadcast as its
  math path does, `is_causal` aligned to the top left (query i sees key j <= i), `enable_gqa`
  repeating each key/value head over its group of query heads. Rows that may attend to
  nothing give zeros, as torch 2.13 does on the CPU (every kernel) and as qkv does. It runs
  on `qkv.attention` (backend "auto" unless `backend=` names one).
- `varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)`:
  FlashAttention-2's variable-length call (Dao, 2023; `flash_attn_varlen_func`): sequences
  packed end to end in (total, H, D) tensors with int32 cumulative offsets, causal aligned to
  the bottom right of each sequence, `window_size=(left, right)` with -1 unbounded,
  `softcap` as `softcap * tanh(score / softcap)` of the scaled score. The sequences run as
  one packed row (batch 1) under a document mask (Krell et al., 2021, "Efficient Sequence
  Packing without Cross-contamination") laid out as a BlockMask whose blocks are classified
  exactly from the offsets (interval arithmetic; core/block_mask.py), never materialised as
  a total x total matrix, on the block-sparse backend (core/backend/sparse.py), forward and
  backward. With backend="auto" (the default) a sequence of at least `_VARLEN_ALONE` queries
  and keys is instead computed alone by `attention()`, where torch's fused CPU kernel beats
  the block engine on long dense blocks (benchmarks/varlen.py); the short ones stay packed.
- `merge_attention(partials)`: (out, lse) pairs computed over disjoint key sets -> the exact
  (out, lse) over their union: lse = log sum_r exp(lse_r), out = sum_r exp(lse_r - lse) out_r,
  the merge of partial softmax results of blockwise and ring attention (Milakov & Gimelshein,
  2018, "Online normalizer calculation for softmax"; Liu, Zaharia and Abbeel, 2023, "Ring
  Attention with Blockwise Transformers"; the same formula as `engines.flash.merge_states`),
  written to be differentiable and NaN-free where every part saw nothing.

Layout: docs/architecture.md; usage: docs/integrations.md.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .api import attention
from .backend import Backend
from .block_mask import BlockMask, Pattern, block_mask
from .mods import fmt_shape
from .spec import compute_dtype

__all__ = ["sdpa", "varlen_attention", "merge_attention"]


# ===================================================================== torch SDPA
def _check_sdpa_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., L, E), as torch's "
                         f"scaled_dot_product_attention; got shape {fmt_shape(t)}")


def _pad(t: Tensor, n: int) -> Tensor:
    """t with leading dimensions of 1 up to n dimensions (matmul broadcasting)."""
    return t.reshape((1,) * (n - t.dim()) + tuple(t.shape))


def _heads(name: str, t: Tensor, H: int, enable_gqa: bool, Hq: int) -> Tensor:
    """t (..., Ht, S, E) with Ht made compatible with qkv's Hkv rule (Hq % Hkv == 0)."""
    Ht = t.shape[-3]
    if enable_gqa:
        if Ht == 0 or Hq % Ht != 0:
            raise ValueError(f"enable_gqa=True needs the heads of {name} to divide the query heads: {name} "
                             f"{fmt_shape(t)} has {Ht}, query has {Hq} (dimension -3)")
        return t
    if Ht not in (1, H):
        raise ValueError(f"{name} has {Ht} heads (dimension -3 of {fmt_shape(t)}) but the query has {Hq}: without "
                         f"enable_gqa they must be equal or 1; pass enable_gqa=True for grouped-query attention "
                         f"(query heads a multiple of {name}'s)")
    return t


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
         backend: Union[str, Backend] = "auto") -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, computed by qkv.

    Args:
        query: (N, ..., Hq, L, E); at least 2-D (a 2-D or 3-D query has no batch/head
            dimensions of its own: dimension -3, when present, is the heads).
        key: (N, ..., H, S, E); value: (N, ..., H, S, Ev). Leading dimensions (batch and
            heads) broadcast against the query's, as in torch's math kernel.
        attn_mask: bool (True = takes part) or float (added to the scores; float32 or the
            query's dtype), broadcastable to (N, ..., Hq, L, S), at least 2-D.
        dropout_p: probability of dropping each attention weight (kept ones scaled by
            1/(1-p)); 1.0 drops all (zeros). Applied whenever > 0, as torch's function does.
        is_causal: query i sees key j <= i (aligned to the top left, unlike
            `qkv.attention(causal=True)`); not allowed together with attn_mask.
        scale: multiplies the scores; default 1/sqrt(E).
        enable_gqa: the key/value heads may divide the query heads (grouped-query: query
            head h uses key/value head h // (Hq / H)); without it they must be equal or 1.
        backend: (keyword only, qkv's) "auto", a registered name or a backend object.

    Returns:
        (N, ..., Hq, L, Ev) in the query's dtype. A row that may attend to nothing is zeros
        (torch 2.13 returns zeros on the CPU too).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_sdpa_tensor(name, t)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be True or False; got {is_causal!r}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be True or False; got {enable_gqa!r}")
    if is_causal and attn_mask is not None:
        raise ValueError("is_causal=True and attn_mask cannot be given together (as in torch): fold the causal "
                         "mask into attn_mask, e.g. attn_mask & torch.ones(L, S, dtype=torch.bool).tril()")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same length S (dimension -2): key {fmt_shape(key)}, "
                         f"value {fmt_shape(value)}")
    n = max(query.dim(), key.dim(), value.dim(), 3)
    q, k, v = (_pad(t, n) for t in (query, key, value))  # each (*lead, H?, L|S, E|Ev)
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    lead_of = {name: tuple(t.shape[:-3]) for name, t in (("query", q), ("key", k), ("value", v))}
    try:
        lead = tuple(torch.broadcast_shapes(*lead_of.values()))
    except RuntimeError:
        raise ValueError(f"the batch dimensions of query {fmt_shape(query)}, key {fmt_shape(key)} and value "
                         f"{fmt_shape(value)} (all but the last three) do not broadcast") from None
    Hq = q.shape[-3]
    Hk, Hv = k.shape[-3], v.shape[-3]
    if enable_gqa:
        H = Hq
    else:
        try:
            H = torch.broadcast_shapes((Hq,), (Hk,), (Hv,))[0]
        except RuntimeError:
            H = -1
    k = _heads("key", k, H, enable_gqa, Hq)
    v = _heads("value", v, H, enable_gqa, Hq)
    if not enable_gqa and Hq == 1 and H > 1:
        q = q.expand(*q.shape[:-3], H, L, E)  # one query head against H key heads
    Hq = q.shape[-3]
    Hkv = max(Hk, Hv) if not enable_gqa else (Hk if Hk == Hv else Hq)
    if enable_gqa and Hk != Hv:  # different key and value groupings: repeat both to the query heads
        k = k.repeat_interleave(Hq // Hk, dim=-3)
        v = v.repeat_interleave(Hq // Hv, dim=-3)
    elif not enable_gqa and Hk != Hv:  # one of them has a single head: broadcast it
        k, v = k.expand(*k.shape[:-3], Hkv, S, E), v.expand(*v.shape[:-3], Hkv, S, Ev)
    B = math.prod(lead)

    def flat(t: Tensor) -> Tensor:  # (*lead_t, H_t, l, e) -> (B, H_t, l, e)
        if tuple(t.shape[:-3]) != lead:
            t = t.expand(*lead, *t.shape[-3:])
        return t.reshape(B, *t.shape[-3:])

    q4, k4, v4 = flat(q), flat(k), flat(v)  # (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)
    mask = None if attn_mask is None else _sdpa_mask(attn_mask, query, lead, B, Hq, L, S)
    causal, window = False, None
    if is_causal:  # top left: query i sees key j <= i
        if L == S:
            causal = True
        elif L < S:  # keys j >= L are seen by no query: drop them, then top left = bottom right
            k4, v4, causal = k4[:, :, :L], v4[:, :, :L], True
        else:  # L > S: the band j <= i is (Lq - Lk) keys right of the bottom-right diagonal
            window = (None, L - S)
    if isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool) and float(dropout_p) == 1.0:
        out = attention(q4, k4, v4, mask=mask, causal=causal, window=window, scale=scale, backend=backend) * 0.0
    else:
        out = attention(q4, k4, v4, mask=mask, causal=causal, window=window, scale=scale, dropout_p=dropout_p,
                        backend=backend)  # (B, Hq, L, Ev)
    return out.reshape(*lead, Hq, L, Ev)[(0,) * (n - max(query.dim(), key.dim(), value.dim()))]


def _sdpa_mask(attn_mask, query: Tensor, lead: tuple, B: int, Hq: int, L: int, S: int) -> Tensor:
    """attn_mask broadcastable to (*lead, Hq, L, S) -> 4-D (B | 1, Hq | 1, L | 1, S | 1)."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor (bool or float); got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (torch.float32, query.dtype):
        raise TypeError(f"attn_mask has dtype {attn_mask.dtype}; torch's scaled_dot_product_attention takes a bool "
                        f"mask (True = takes part) or a float one in float32 or the query's dtype ({query.dtype})")
    full = (*lead, Hq, L, S)
    if attn_mask.dim() < 2 or attn_mask.dim() > len(full):
        raise ValueError(f"attn_mask has shape {fmt_shape(attn_mask)}; it must have 2 to {len(full)} dimensions and "
                         f"broadcast to (..., Hq, L, S) = {full}")
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, full) == torch.Size(full)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask has shape {fmt_shape(attn_mask)}, which does not broadcast to (..., Hq, L, S) = "
                         f"{full}")
    m = _pad(attn_mask, len(full))  # (*lead | 1, Hq | 1, L | 1, S | 1)
    if all(d == 1 for d in m.shape[:-3]):
        return m.reshape(1, *m.shape[-3:])
    return m.expand(*lead, *m.shape[-3:]).reshape(B, *m.shape[-3:])


# ============================================================ FlashAttention varlen
_VARLEN_BLOCK = 128
# With backend="auto", a sequence with at least this many queries and keys runs alone through
# attention() (torch's fused kernel where it honours the arguments); shorter ones are packed.
_VARLEN_ALONE = 256
_VARLEN_MASKS: "OrderedDict[tuple, BlockMask]" = OrderedDict()  # offsets + band -> BlockMask
_VARLEN_MASKS_MAX = 8


def _check_cu(name: str, cu, total: int, tensor_name: str) -> list[int]:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be an int32 tensor of cumulative sequence lengths; got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32 (as FlashAttention's); got {cu.dtype}. "
                        f"Use {name}.to(torch.int32)")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D (n_sequences + 1,), starting at 0; got shape {fmt_shape(cu)}")
    offsets = cu.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0; got {offsets[:4]}...")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        i = next(i for i, (a, b) in enumerate(zip(offsets, offsets[1:])) if b < a)
        raise ValueError(f"{name} must be non-decreasing (cumulative lengths); {name}[{i}] = {offsets[i]} > "
                         f"{name}[{i + 1}] = {offsets[i + 1]}")
    if offsets[-1] != total:
        raise ValueError(f"{name} ends at {offsets[-1]} but {tensor_name} packs {total} tokens (dimension 0): the "
                         f"last offset must equal the total")
    return offsets


def _check_max(name: str, given, lengths: list[int]) -> None:
    if isinstance(given, Tensor) and given.numel() == 1:
        given = given.item()
    if isinstance(given, bool) or not isinstance(given, numbers.Integral):
        raise TypeError(f"{name} must be an int (the longest sequence); got {given!r}")
    longest = max(lengths, default=0)
    if given < longest:
        raise ValueError(f"{name}={given} is less than the longest sequence, {longest} tokens: pass "
                         f"{name}=max of the sequence lengths (FlashAttention would read past it)")


def _varlen_band(causal: bool, window) -> tuple[Optional[int], Optional[int]]:
    """(left, right) reach around each sequence's bottom-right diagonal; None = unbounded."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    if window is None:
        left = right = None
    elif isinstance(window, numbers.Integral) and not isinstance(window, bool):
        if window < 0:
            raise ValueError(f"window must be >= 0 (or a (left, right) pair with -1 = unbounded); got {window}")
        left, right = int(window), int(window)
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        sides = []
        for side, w in zip(("left", "right"), window):
            if w is not None and (isinstance(w, bool) or not isinstance(w, numbers.Integral)):
                raise TypeError(f"window {side} must be an int (-1 or None = unbounded); got {w!r}")
            if w is not None and w < -1:
                raise ValueError(f"window {side} must be >= 0, or -1 for unbounded (FlashAttention's window_size); "
                                 f"got {window!r}")
            sides.append(None if w is None or w == -1 else int(w))
        left, right = sides
    else:
        raise TypeError(f"window must be an int w or FlashAttention's window_size pair (left, right) "
                        f"(-1 = unbounded); got {window!r}")
    if causal:
        right = 0
    return left, right


def _document_pattern(cu_q: list[int], cu_k: list[int], left: Optional[int], right: Optional[int]) -> Pattern:
    """The varlen mask over the packed positions, with an exact block classifier.

    Query q of sequence d (cu_q[d] <= q < cu_q[d+1]) may see key kv of the same sequence
    when the band allows it: with rel = kv - q - (cu_k[d+1] - cu_q[d+1]) (its offset from the
    bottom-right diagonal of sequence d), -left <= rel <= right.
    """
    n = len(cu_q) - 1
    lq = torch.tensor([b - a for a, b in zip(cu_q, cu_q[1:])], dtype=torch.int64)  # (n,)
    lk = torch.tensor([b - a for a, b in zip(cu_k, cu_k[1:])], dtype=torch.int64)  # (n,)
    doc_q = torch.repeat_interleave(torch.arange(n), lq)  # (total_q,) sequence of each query
    doc_k = torch.repeat_interleave(torch.arange(n), lk)  # (total_k,) sequence of each key
    diag = torch.tensor(cu_k[1:], dtype=torch.int64) - torch.tensor(cu_q[1:], dtype=torch.int64)  # (n,)
    tables: dict = {}

    def on(device):
        got = tables.get(device)
        if got is None:
            got = tables[device] = (doc_q.to(device), doc_k.to(device), diag.to(device))
        return got

    def fn(b, h, q_idx, kv_idx):
        dq_t, dk_t, diag_t = on(q_idx.device)
        dq = dq_t[q_idx]  # (.., rows, 1)
        allowed = dq == dk_t[kv_idx]  # (.., rows, keys)
        if left is not None or right is not None:
            rel = kv_idx - q_idx - diag_t[dq]
            if left is not None:
                allowed = allowed & (rel >= -left)
            if right is not None:
                allowed = allowed & (rel <= right)
        return allowed

    def classify(b, h, q0, q1, k0, k1):
        # sequence ids are non-decreasing along the packed positions
        dq0, dq1, dk0, dk1 = doc_q[q0], doc_q[q1 - 1], doc_k[k0], doc_k[k1 - 1]  # (1, 1, nq|1, nk|1)
        single = (dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0)  # one sequence on both sides
        full, empty = single.clone(), (dq1 < dk0) | (dk1 < dq0)  # no sequence in common: empty
        if left is not None or right is not None:
            d = diag[dq0]
            rel_min, rel_max = k0 - (q1 - 1) - d, (k1 - 1) - q0 - d  # every value between occurs
            if left is not None:
                full = full & (rel_min >= -left)
                empty = empty | (single & (rel_max < -left))
            if right is not None:
                full = full & (rel_max <= right)
                empty = empty | (single & (rel_min > right))
        # several sequences in a block: some row misses some key, so never full; whether any
        # pair is allowed is left unknown, and decided by evaluating the block
        partial = single & ~full & ~empty
        return full, empty, partial

    return Pattern(fn, classify, f"varlen(n={n}, window=({left}, {right}))", pure=True)


def varlen_mask(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *, causal: bool = False, window=None,
                block_size: int = _VARLEN_BLOCK) -> BlockMask:
    """The BlockMask (B=1, H=1, total_q, total_k) of a varlen call (cached for the last few offsets).

    Arguments as `varlen_attention`'s; cu_seqlens int32 (n + 1,). Exposed for inspection
    (`print(varlen_mask(...))` draws its blocks) and benchmarks.
    """
    left, right = _varlen_band(causal, window)
    cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, int(cu_seqlens_q[-1]) if cu_seqlens_q.numel() else 0, "q")
    cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, int(cu_seqlens_k[-1]) if cu_seqlens_k.numel() else 0, "k")
    return _varlen_mask(cu_q, cu_k, left, right, block_size)


def _varlen_mask(cu_q: list[int], cu_k: list[int], left, right, block_size: int) -> BlockMask:
    key = (tuple(cu_q), tuple(cu_k), left, right, block_size)
    hit = _VARLEN_MASKS.get(key)
    if hit is not None:
        _VARLEN_MASKS.move_to_end(key)
        return hit
    bm = block_mask(_document_pattern(cu_q, cu_k, left, right), 1, 1, cu_q[-1], cu_k[-1], block_size=block_size)
    _VARLEN_MASKS[key] = bm
    while len(_VARLEN_MASKS) > _VARLEN_MASKS_MAX:
        _VARLEN_MASKS.popitem(last=False)
    return bm


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, causal: bool = False, window=None, scale: Optional[float] = None,
                     softcap: Optional[float] = None, dropout_p: float = 0.0,
                     backend: Union[str, Backend] = "auto") -> Tensor:
    """FlashAttention's variable-length attention (`flash_attn_varlen_func`) on qkv's block-sparse engine.

    Args:
        q: (total_q, H, D), the queries of n sequences packed end to end.
        k: (total_k, Hkv, D); v: (total_k, Hkv, Dv); H a multiple of Hkv (grouped-query).
        cu_seqlens_q: int32 (n + 1,), cumulative query lengths: 0, l_1, l_1 + l_2, ..., total_q;
            sequence d is rows cu_seqlens_q[d] .. cu_seqlens_q[d + 1] - 1 (may be empty).
        cu_seqlens_k: int32 (n + 1,), likewise for keys and values (ending at total_k).
        max_seqlen_q, max_seqlen_k: ints at least the longest query / key sequence (checked).
        causal: query i of a sequence with lq queries and lk keys sees key j <= i + lk - lq
            (aligned to the bottom right of each sequence, as FlashAttention's).
        window: FlashAttention's window_size (left, right): query i sees keys from
            i + lk - lq - left to i + lk - lq + right, -1 (or None) = unbounded; or an int w =
            (w, w). With causal, right is 0.
        scale: multiplies the scores; default 1/sqrt(D).
        softcap: if > 0, scores s (already scaled) become softcap * tanh(s / softcap); 0 or
            None: off.
        dropout_p: probability of dropping each attention weight (kept ones scaled 1/(1-p)).
        backend: (qkv's) "auto" (the default): each sequence with at least 256 queries and
            256 keys runs alone through `qkv.attention` (torch's fused kernel where it honours
            the arguments: a long document gains more from it than from sharing a call), the
            others packed into one row on the block-sparse engine. Any other value runs all
            sequences packed in one row on that backend: "sparse" (the block-sparse engine
            alone), "tiled", or "reference" (the plain specification).

    Returns:
        (total_q, H, Dv) in q's dtype. A query that sees no key (an empty key sequence, or
        causal rows before the first key when lq > lk) gives zeros, as FlashAttention's.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim), sequences packed end to end; got "
                             f"shape {fmt_shape(t)}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have the same tokens and heads: k {fmt_shape(k)}, v {fmt_shape(v)}")
    cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
    cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_q) - 1} sequences but cu_seqlens_k has {len(cu_k) - 1}: "
                         "each query sequence needs its key sequence")
    _check_max("max_seqlen_q", max_seqlen_q, [b - a for a, b in zip(cu_q, cu_q[1:])])
    _check_max("max_seqlen_k", max_seqlen_k, [b - a for a, b in zip(cu_k, cu_k[1:])])
    left, right = _varlen_band(causal, window)
    score_mod = None
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) \
                or softcap < 0:
            raise ValueError(f"softcap must be a finite number >= 0 (0 = off); got {softcap!r}")
        if softcap > 0:
            cap = float(softcap)

            def score_mod(score, b, h, q_idx, kv_idx):
                return cap * torch.tanh(score / cap)

    kw: dict[str, Any] = dict(scale=scale, score_mod=score_mod, dropout_p=dropout_p)
    if backend != "auto":
        return _packed(q, k, v, cu_q, cu_k, left, right, backend, kw)
    # auto: each long sequence alone through attention() (torch's fused kernel where it honours
    # the arguments), the short ones packed together through the block-sparse engine
    n = len(cu_q) - 1
    lq = [cu_q[d + 1] - cu_q[d] for d in range(n)]
    lk = [cu_k[d + 1] - cu_k[d] for d in range(n)]
    alone = [min(lq[d], lk[d]) >= _VARLEN_ALONE for d in range(n)]
    if not any(alone):
        return _packed(q, k, v, cu_q, cu_k, left, right, "sparse", kw)
    pieces: list[Optional[Tensor]] = [None] * n
    for d in (d for d in range(n) if alone[d]):
        qd, kd, vd = (t[a:b].permute(1, 0, 2).unsqueeze(0) for t, a, b in  # (1, heads, l, dim)
                      ((q, cu_q[d], cu_q[d + 1]), (k, cu_k[d], cu_k[d + 1]), (v, cu_k[d], cu_k[d + 1])))
        pieces[d] = attention(qd, kd, vd, causal=causal, window=(left, right), **kw)[0].permute(1, 0, 2)
    short = [d for d in range(n) if not alone[d]]
    if short:
        rows_q = torch.cat([torch.arange(cu_q[d], cu_q[d + 1]) for d in short]).to(q.device)  # (short_q,)
        rows_k = torch.cat([torch.arange(cu_k[d], cu_k[d + 1]) for d in short]).to(k.device)  # (short_k,)
        sub_q = [0] + torch.tensor([lq[d] for d in short]).cumsum(0).tolist()
        sub_k = [0] + torch.tensor([lk[d] for d in short]).cumsum(0).tolist()
        got = _packed(q[rows_q], k[rows_k], v[rows_k], sub_q, sub_k, left, right, "sparse", kw)  # (short_q, H, Dv)
        for d, part in zip(short, got.split([lq[d] for d in short])):
            pieces[d] = part
    return torch.cat([p for p in pieces if p is not None])  # (total_q, H, Dv), sequences in order


def _packed(q: Tensor, k: Tensor, v: Tensor, cu_q: list[int], cu_k: list[int], left, right, backend,
            kw: dict) -> Tensor:
    """Sequences packed in one row (batch 1) under their document BlockMask: (total_q, H, Dv)."""
    total_q, H, _ = q.shape
    if total_q == 0 or k.shape[0] == 0:  # nothing to compute: every row sees no key
        out = q.new_zeros(total_q, H, v.shape[-1])
        return out + 0.0 * (q.sum() + k.sum() + v.sum()) if out.numel() else out
    bm = _varlen_mask(cu_q, cu_k, left, right, _VARLEN_BLOCK)
    q4 = q.permute(1, 0, 2).unsqueeze(0)  # (1, H, total_q, D)
    k4 = k.permute(1, 0, 2).unsqueeze(0)  # (1, Hkv, total_k, D)
    v4 = v.permute(1, 0, 2).unsqueeze(0)  # (1, Hkv, total_k, Dv)
    out = attention(q4, k4, v4, mask=bm, backend=backend, **kw)  # (1, H, total_q, Dv)
    return out[0].permute(1, 0, 2)  # (total_q, H, Dv)


# ======================================================================= merge
def merge_attention(partials: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge attention results over disjoint key sets into the exact result over their union.

    Args:
        partials: a sequence of (out, lse) pairs, e.g. from `qkv.attention_with_lse` over
            each key shard: out (..., Dv) (usually (B, H, L, Dv)), lse (...) (usually
            (B, H, L)), the natural log of each row's softmax denominator, -inf where that
            part saw no key (its out is then ignored; qkv's convention: FlashAttention's
            CUDA kernels write +inf there, replace it with -inf first). Every pair has the
            same shapes.

    Returns:
        (out, lse): lse = log sum_r exp(lse_r), out = sum_r exp(lse_r - lse) out_r. out in
        the outs' dtype (they must share one), lse float64 if any out or lse is float64 (so
        float64 merges lose nothing), else float32; the arithmetic is in that dtype.
        (`qkv.attention_with_lse` returns lse in float32 even for float64 inputs, which
        limits a float64 merge to about 1e-7; `qkv.core.api.attention_with_lse_exact` keeps
        it in float64.) A row
        that no part saw gives out 0 and lse -inf, with finite gradients. Differentiable in
        every out and lse.
    """
    if isinstance(partials, (Tensor, str)) or not isinstance(partials, Sequence):
        raise TypeError(f"partials must be a list of (out, lse) pairs; got {type(partials).__name__}")
    if len(partials) == 0:
        raise ValueError("merge_attention needs at least one (out, lse) pair; got an empty list")
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    for i, pair in enumerate(partials):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"partials[{i}] must be an (out, lse) pair; got {type(pair).__name__}")
        out, lse = pair
        for name, t in (("out", out), ("lse", lse)):
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"partials[{i}]: {name} must be a floating-point tensor; got {got}")
        if out.dim() < 1 or tuple(out.shape[:-1]) != tuple(lse.shape):
            raise ValueError(f"partials[{i}]: out {fmt_shape(out)} and lse {fmt_shape(lse)} do not match: lse must "
                             f"be out's shape without the last dimension, e.g. out (B, H, L, Dv) and lse (B, H, L)")
        if i and (out.shape != outs[0].shape or out.dtype != outs[0].dtype or out.device != outs[0].device):
            raise ValueError(f"partials[{i}]: out is {fmt_shape(out)} {out.dtype} on {out.device} but partials[0]'s is "
                             f"{fmt_shape(outs[0])} {outs[0].dtype} on {outs[0].device}; every part must cover the "
                             f"same rows in one dtype and on one device")
        if lse.device != out.device:
            raise ValueError(f"partials[{i}]: lse is on {lse.device} but out on {out.device}")
        outs.append(out)
        lses.append(lse)
    wide = any(t.dtype == torch.float64 for t in outs + lses)
    ct = torch.float64 if wide else compute_dtype(outs[0].dtype)
    lse_all = torch.stack([t.to(ct) for t in lses])  # (P, ...)
    m = lse_all.amax(dim=0).detach()  # (...): the result does not depend on it
    m = m.masked_fill(torch.isneginf(m), 0.0)  # rows no part saw: weights exp(-inf) = 0
    w = torch.exp(lse_all - m)  # (P, ...) each part's unnormalised weight
    total = w.sum(dim=0)  # (...)
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, m + torch.log(safe), torch.full_like(total, float("-inf")))  # (...)
    out = torch.zeros(outs[0].shape, dtype=ct, device=outs[0].device)  # (..., Dv)
    for r, part in enumerate(outs):  # a part that saw nothing (weight 0) adds 0, whatever its out holds
        part = torch.where((w[r] > 0).unsqueeze(-1), part.to(ct), 0.0)  # before the product: no 0 * NaN
        out = out + (w[r] / safe).unsqueeze(-1) * part
    return out.to(outs[0].dtype), lse

"""Validation of attention arguments and the one shared meaning of every constraint.

`build_spec` checks the public arguments once, at the boundary, and returns an
`AttentionSpec`. Every backend asks the spec the same two questions for a block of query
rows [i0, i1) and key columns [j0, j1):

- `kv_range(i0, i1)`: which keys can any of these rows see at all (causal and window
  bands, so backends skip empty blocks);
- `constraints(i0, i1, j0, j1)`: the bool "may attend" mask and the additive bias of the
  block, both broadcastable to (B, Hq, i1 - i0, j1 - j0), or None where nothing applies;

and `apply_score_mod` for score functions. The reference evaluates them on the whole
grid, the tiled backend block by block, so the meaning of a mask cannot differ between
backends.

Conventions (docs/architecture.md, "The contract of the core"): causal and windows are
aligned to the bottom right, so query i sits at key position i + (Lk - Lq); mask functions
and score functions receive raw indices b, h, q_idx, kv_idx as broadcastable integer tensors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .block_mask import BlockMask
from .flex_mask import from_flex, is_flex_block_mask
from .mods import MaskMod, ScoreMod, call_mask_mod, call_score_mod, fmt_shape, index_grid

__all__ = ["AttentionSpec", "build_spec", "index_grid", "call_mask_mod", "call_score_mod", "slice_block",
           "compute_dtype", "MaskMod", "ScoreMod"]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class AttentionSpec:
    """Validated attention arguments. Shapes: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)."""

    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    scale: float
    causal: bool
    # (left, right) reach of the band around each query's diagonal; None = unbounded.
    left: Optional[int]
    right: Optional[int]
    bool_mask: Optional[Tensor]  # 4-D, broadcastable to (B, Hq, Lq, Lk), True = may attend
    float_mask: Optional[Tensor]  # 4-D, broadcastable to (B, Hq, Lq, Lk), added to scores
    mask_mod: Optional[MaskMod]
    block_mask: Optional[BlockMask]  # block-sparse layout (core/block_mask.py), or None
    score_mod: Optional[ScoreMod]
    dropout_p: float
    # Whether autograd records the call through its tensors: grad mode on and q, k, v or a float
    # mask requiring grad (tensors a score function captures are not seen here: the tiled engine
    # checks those itself). Backends' rules and memory estimates read it (not q.requires_grad alone).
    grad: bool = False
    # (left, right) as given, before a reach of Lq + Lk or more was clamped to Lq + Lk (the same band):
    # for messages that name the window (ring attention's refusal); None where build_spec did not make it.
    reach_given: Optional[tuple] = None

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 = multi-head, Hq = multi-query)."""
        return self.Hq // self.Hkv

    @property
    def offset(self) -> int:
        """Key position of query 0's diagonal (bottom-right alignment)."""
        return self.Lk - self.Lq

    @property
    def banded(self) -> bool:
        return self.left is not None or self.right is not None

    @property
    def has_dense_constraints(self) -> bool:
        """True if any constraint other than the causal/window band applies."""
        return (
            self.bool_mask is not None
            or self.float_mask is not None
            or self.mask_mod is not None
            or self.block_mask is not None
        )

    # ----------------------------------------------------------------- the band
    def kv_range(self, i0: int, i1: int) -> tuple[int, int]:
        """Keys [lo, hi) that rows [i0, i1) may see under causal/window; lo >= hi if none."""
        lo, hi = 0, self.Lk
        if self.left is not None:
            lo = max(lo, i0 + self.offset - self.left)
        if self.right is not None:
            hi = min(hi, i1 - 1 + self.offset + self.right + 1)
        return lo, hi

    def band_edges(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(lo, hi), int64 like rows: query row i sees keys [lo_i, hi_i) under causal/window,
        clamped to [0, Lk] with hi >= lo (lo == hi: none). The one place the band's per-row
        arithmetic lives: engines, the non-finite guard and the native kernel's arguments use it."""
        pos = rows + self.offset  # key position of each row's diagonal
        lo = (pos - self.left).clamp(0, self.Lk) if self.left is not None else torch.zeros_like(pos)
        hi = (pos + self.right + 1).clamp(0, self.Lk) if self.right is not None else torch.full_like(pos, self.Lk)
        return lo, torch.maximum(hi, lo)

    def band_mask(self, i0: int, i1: int, j0: int, j1: int, device) -> Optional[Tensor]:
        """Bool (i1-i0, j1-j0) band mask of the block, or None if the band covers it whole."""
        if not self.banded:
            return None
        full = True
        if self.left is not None and j0 < i1 - 1 + self.offset - self.left:
            full = False
        if self.right is not None and j1 - 1 > i0 + self.offset + self.right:
            full = False
        if full:
            return None
        lo, hi = self.band_edges(torch.arange(i0, i1, device=device).unsqueeze(1))  # (bq, 1) each
        kv = torch.arange(j0, j1, device=device).unsqueeze(0)  # (1, bk)
        return (kv >= lo) & (kv < hi)  # (bq, bk)

    # ------------------------------------------------------------ block queries
    def index_grid(self, i0: int, i1: int, j0: int, j1: int, device):
        """Broadcastable (b, h, q_idx, kv_idx) index tensors of a block, for mask and score functions."""
        return index_grid(self.B, self.Hq, i0, i1, j0, j1, device)

    def constraints(
        self, i0: int, i1: int, j0: int, j1: int, device, use_block_mask: bool = True
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(allowed, bias) of the block; each broadcastable to (B, Hq, i1-i0, j1-j0) or None.

        use_block_mask=False skips the BlockMask where the caller knows the block is full.
        """
        allowed = self.band_mask(i0, i1, j0, j1, device)
        if self.bool_mask is not None:
            allowed = _and(allowed, slice_block(self.bool_mask, i0, i1, j0, j1))
        if self.mask_mod is not None:
            got = call_mask_mod(self.mask_mod, *self.index_grid(i0, i1, j0, j1, device))
            allowed = _and(allowed, got)
        if self.block_mask is not None and use_block_mask:
            got = self.block_mask.dense_block(i0, i1, j0, j1, device=device)
            allowed = _and(allowed, got)
        bias = None
        if self.float_mask is not None:
            bias = slice_block(self.float_mask, i0, i1, j0, j1)
        return allowed, bias

    def rows_mask(self, rows: Tensor, heads: Optional[Tensor], device) -> Tensor:
        """The constraints of any set of query rows, as one float mask over every key.

        rows: int64 (nr,) query rows; heads: int64 (nh,) query heads, or None for all Hq.
        Returns float32 (B or 1, nh or 1, nr, Lk): the float mask's bias where a row may attend,
        -inf where it may not (band, bool mask, mask function, BlockMask), so that
        `attention_weights(q[:, heads][:, :, rows], k[:, heads // groups], mask=this)` means what
        the full call meant for those rows. What `constraints` gives for a block, for rows that
        need not be contiguous: explain's recorder and the transformers integration's selected
        weights use it.
        """
        rows = rows.to(device=device, dtype=torch.long)
        kv = torch.arange(self.Lk, device=device)
        allowed = None
        if self.banded:
            lo, hi = self.band_edges(rows.unsqueeze(1))  # (nr, 1) each
            allowed = (kv >= lo) & (kv < hi)  # (nr, Lk)
        if self.bool_mask is not None:
            m = self.bool_mask
            allowed = _and(allowed, m if m.shape[2] == 1 else m.index_select(2, rows))  # (.., nr or 1, Lk)
        if self.mask_mod is not None:
            b, h, _, kv_idx = self.index_grid(0, 1, 0, self.Lk, device)
            allowed = _and(allowed, call_mask_mod(self.mask_mod, b, h, rows.view(1, 1, -1, 1), kv_idx))
        if self.block_mask is not None:
            got = torch.cat([self.block_mask.dense_block(r, r + 1, 0, self.Lk, device=device).expand(-1, -1, 1, -1)
                             for r in rows.tolist()], dim=2) if rows.numel() else None  # (B|1, H|1, nr, Lk)
            allowed = _and(allowed, got)
        out = torch.zeros(1, 1, rows.numel(), self.Lk, device=device)  # (1, 1, nr, Lk)
        if self.float_mask is not None:
            m = self.float_mask
            out = out + (m if m.shape[2] == 1 else m.index_select(2, rows)).to(torch.float32)
        if allowed is not None:
            allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))  # 4-D
            out = out.masked_fill(~allowed, float("-inf"))
        if heads is not None and out.shape[1] != 1:
            out = out.index_select(1, heads.to(device))  # (B|1, nh, nr, Lk)
        return out

    def apply_score_mod(self, scores: Tensor, i0: int, j0: int) -> Tensor:
        """scores (B, Hq, bq, bk) of the block starting at (i0, j0) -> modified scores."""
        if self.score_mod is None:
            return scores
        bq, bk = scores.shape[-2], scores.shape[-1]
        grid = self.index_grid(i0, i0 + bq, j0, j0 + bk, scores.device)
        out = call_score_mod(self.score_mod, scores, *grid)
        if out.shape != scores.shape:
            out = out.expand(scores.shape).contiguous()
        return out.to(scores.dtype)


def rows_overlap(t: Tensor) -> bool:
    """Whether the (rows, last dimension) matrices of t share memory between elements (an as_strided or
    unfold view, a stride of 0): oneDNN's products (torch's SDPA backward, the decode eager engine's
    linear) refuse such strides deep inside ("could not construct a memory descriptor")."""
    n, d = t.shape[-2], t.shape[-1]
    s0, s1 = t.stride(-2), t.stride(-1)
    if n <= 1:
        return d > 1 and s1 == 0
    if d <= 1:
        return s0 == 0
    return not ((s1 >= 1 and s0 >= s1 * d) or (s0 >= 1 and s1 >= s0 * n))


def slice_block(m: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """Rows [i0, i1) and columns [j0, j1) of a 4-D mask whose last two dims may be 1."""
    if m.shape[-2] != 1:
        m = m[..., i0:i1, :]
    if m.shape[-1] != 1:
        m = m[..., j0:j1]
    return m


def _and(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a & b

# ------------------------------------------------------------------ validation
def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; attention needs float64, float32, bfloat16 or "
            f"float16. Convert it first, e.g. {name}.float()"
        )
    if t.dim() != 4:
        hint = f"; for one sequence and one head use {name}[None, None]" if t.dim() == 2 else ""
        hint = f"; add a batch dimension with {name}.unsqueeze(0)" if t.dim() == 3 else hint
        raise ValueError(
            f"{name} must be 4-D (batch, heads, seq, head_dim); got shape {fmt_shape(t)}{hint}"
        )


def _normalise_mask(mask: Tensor, target: tuple[int, int, int, int]) -> Tensor:
    if mask.dim() > 4:
        raise ValueError(
            f"mask has shape {fmt_shape(mask)}; it must broadcast to (B, Hq, Lq, Lk) = {target}"
        )
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for i, (got, want) in enumerate(zip(m.shape, target)):
        if got != want and got != 1:
            names = ("B", "Hq", "Lq", "Lk")
            raise ValueError(
                f"mask has shape {fmt_shape(mask)}, which does not broadcast to (B, Hq, Lq, Lk) = "
                f"{target}: dimension {names[i]} is {got}, expected {want} or 1. A key-padding "
                f"mask has shape (B, 1, 1, Lk)"
            )
    return m


def _normalise_window(window, causal: bool) -> tuple[Optional[int], Optional[int]]:
    if window is None:
        left = right = None
    elif isinstance(window, numbers.Integral) and not isinstance(window, bool):
        left, right = int(window), (0 if causal else int(window))
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        left, right = window
        for name, w in (("left", left), ("right", right)):
            if w is not None and (not isinstance(w, numbers.Integral) or isinstance(w, bool)):
                raise TypeError(f"window {name} must be an int or None; got {w!r}")
        left = None if left is None else int(left)
        right = None if right is None else int(right)
    else:
        raise TypeError(
            f"window must be an int w or a (left, right) pair of ints; got {window!r}"
        )
    for name, w in (("left", left), ("right", right)):
        if w is not None and w < 0:
            raise ValueError(
                f"window {name} must be >= 0; got {window!r}. window=(left, right) counts keys "
                "before and after each query's position"
            )
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def build_spec(
    q,
    k,
    v,
    *,
    mask=None,
    causal: bool = False,
    window=None,
    scale=None,
    score_mod=None,
    dropout_p: float = 0.0,
) -> AttentionSpec:
    """Check the public arguments and return their normalised form (raises ValueError/TypeError)."""
    _check_tensor("q", q)
    _check_tensor("k", k)
    if v is not None:
        _check_tensor("v", v)
    tensors = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    dtypes = {t.dtype for _, t in tensors}
    if len(dtypes) != 1:
        got = ", ".join(f"{n}={t.dtype}" for n, t in tensors)
        raise TypeError(f"q, k and v must share one dtype; got {got}. Cast them to the same dtype")
    devices = {t.device for _, t in tensors}
    if len(devices) != 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ValueError(f"q, k and v must be on one device; got {got}")

    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"q has batch {B} but k has batch {Bk}: q {fmt_shape(q)}, k {fmt_shape(k)}")
    if Dk != D:
        raise ValueError(
            f"q and k must share head_dim (the last dimension) to be dot-multiplied; got "
            f"q {fmt_shape(q)} and k {fmt_shape(k)}"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"got Hq={Hq} query heads and Hkv={Hkv} key/value heads; Hq must be a multiple of "
            f"Hkv (Hkv == Hq: multi-head, Hkv < Hq: grouped-query, Hkv == 1: multi-query)"
        )
    Dv = D
    if v is not None:
        if tuple(v.shape[:3]) != (B, Hkv, Lk):
            raise ValueError(
                f"v must match k in batch, heads and length: k {fmt_shape(k)}, v {fmt_shape(v)}; "
                f"expected v of shape ({B}, {Hkv}, {Lk}, Dv)"
            )
        Dv = v.shape[3]
    if min(B, Hq, D) == 0:
        raise ValueError(f"q has an empty dimension: {fmt_shape(q)}")

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a number; got {type(scale).__name__}")
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite; got {scale}")
    scale = float(scale)

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    left, right = _normalise_window(window, causal)
    reach_given = (left, right)
    # A reach of Lq + Lk or more passes every key (a query's diagonal is within Lk - 1 keys of key 0 and
    # Lq - 1 of the last): it is clamped to Lq + Lk, the same band, before any engine or kernel adds it to
    # an int64 position (sys.maxsize as "unbounded" overflowed there: out 0 or wrong rows, silently). Not
    # None: a backend that sees only a shard (ring attention) must still see that a window was given.
    left, right = (None if w is None else min(w, Lq + Lk) for w in (left, right))

    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")

    if score_mod is not None and not callable(score_mod):
        raise TypeError(
            f"score_mod must be a function (score, b, h, q_idx, kv_idx) -> score; got "
            f"{type(score_mod).__name__}"
        )

    target = (B, Hq, Lq, Lk)
    bool_mask = float_mask = mask_mod = block_mask = None
    if mask is None:
        pass
    elif isinstance(mask, Tensor):
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}; move it with .to(q.device)")
        if mask.dtype == torch.bool:
            bool_mask = _normalise_mask(mask, target)
        elif mask.dtype.is_floating_point:
            float_mask = _normalise_mask(mask, target)
        else:
            raise TypeError(
                f"mask has dtype {mask.dtype}; use a bool mask (True = may attend) or a float "
                "mask added to the scores (0 or -inf). For 0/1 integers use mask.bool()"
            )
    elif isinstance(mask, BlockMask):
        block_mask = mask
        mask.check_compatible(B, Hq, Lq, Lk)
    elif is_flex_block_mask(mask):  # FlexAttention's own BlockMask: read as qkv's (core/flex_mask.py)
        block_mask = from_flex(mask, B, Hq, Lq, Lk)
    elif callable(mask):
        mask_mod = mask
    else:
        raise TypeError(
            f"mask must be a bool or float tensor, a qkv.BlockMask, a FlexAttention BlockMask or a mask "
            f"function mask_mod(b, h, q_idx, kv_idx); got {type(mask).__name__}"
        )

    return AttentionSpec(
        B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, scale=scale, causal=causal,
        left=left, right=right, bool_mask=bool_mask, float_mask=float_mask,
        mask_mod=mask_mod, block_mask=block_mask, score_mod=score_mod,
        dropout_p=float(dropout_p),
        grad=torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, float_mask)),
        reach_given=reach_given,
    )


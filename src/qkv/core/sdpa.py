"""PyTorch's fused `scaled_dot_product_attention` behind qkv's signature.

torch.nn.functional.scaled_dot_product_attention dispatches to a fused FlashAttention-style
kernel (on CPU: a tiled C++ kernel), so it is the fastest exact path wherever it can honour
the arguments. Two differences from qkv's contract are bridged here:

- its `is_causal` is aligned to the top left; qkv aligns to the bottom right, so when
  Lq != Lk the causal band is passed as an explicit mask;
- a row that may attend to nothing must give zeros: such rows are given one harmless key
  and their output is zeroed afterwards, which keeps gradients finite too.

It cannot apply score functions or return the lse; asking for either raises and names the
tiled backend.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._spec import AttentionSpec

# `auto` uses SDPA with a materialised mask only up to this many mask entries (Lq * Lk per
# batch and head actually stored); above it the tiled backend keeps memory linear.
AUTO_MAX_MASK_ENTRIES = 1 << 24


def _needs_dense_mask(spec: AttentionSpec) -> bool:
    band_only_causal = spec.causal and spec.left is None and spec.Lq == spec.Lk
    return spec.has_dense_constraints or (spec.banded and not band_only_causal)


def mask_entries(spec: AttentionSpec) -> int:
    """Entries of the mask SDPA would need: 0 when it needs none."""
    if not _needs_dense_mask(spec):
        return 0
    b = spec.B if _varies(spec, 0) else 1
    h = spec.Hq if _varies(spec, 1) else 1
    return b * h * spec.Lq * spec.Lk


def _varies(spec: AttentionSpec, dim: int) -> bool:
    for m in (spec.bool_mask, spec.float_mask):
        if m is not None and m.shape[dim] != 1:
            return True
    return spec.mask_mod is not None or spec.block_mask is not None


def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    if spec.score_mod is not None:
        return "the sdpa backend cannot apply a score_mod; use backend='tiled' or 'reference'"
    if need_lse:
        return "the sdpa backend does not return the lse; use backend='tiled' or 'reference'"
    if spec.Lk == 0:
        return "the sdpa backend needs at least one key; use backend='tiled' or 'reference'"
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), None."""
    reason = unsupported(spec, q, need_lse)
    if reason:
        raise ValueError(reason)
    gqa = spec.Hkv != spec.Hq
    if not _needs_dense_mask(spec):
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=spec.dropout_p, is_causal=spec.causal, scale=spec.scale, enable_gqa=gqa
        )
        return out, None
    allowed, bias = spec.constraints(0, spec.Lq, 0, spec.Lk, q.device)
    if allowed is None and bias is None:  # the band covers every (query, key) pair
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=spec.dropout_p, scale=spec.scale, enable_gqa=gqa)
        return out, None
    if bias is not None:
        # SDPA wants a float mask in q's dtype; the bool constraints become -inf in it.
        attn_mask = bias.to(q.dtype)
        if allowed is not None:
            attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
        empty_rows = torch.isneginf(attn_mask).all(dim=-1, keepdim=True)  # (.., Lq, 1)
    else:
        attn_mask = allowed.expand(*allowed.shape[:-2], spec.Lq, spec.Lk)  # (.., Lq, Lk)
        empty_rows = ~attn_mask.any(dim=-1, keepdim=True)  # (.., Lq, 1)
    # An empty row is shown every key (finite output and gradients) and zeroed afterwards.
    if bool(empty_rows.any()):
        attn_mask = attn_mask.masked_fill(empty_rows, True if attn_mask.dtype == torch.bool else 0.0)
    else:
        empty_rows = None
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=spec.dropout_p, scale=spec.scale, enable_gqa=gqa
    )
    if empty_rows is not None and bool(empty_rows.any()):
        out = out.masked_fill(empty_rows, 0.0)
    return out, None

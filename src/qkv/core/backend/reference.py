"""The reference: attention exactly as the seeds describe it, and the specification of qkv.

scores = q . k^T * scale (Vaswani et al., 2017, "Attention Is All You Need", eq. 1), then the
score function, the additive mask and the bool constraints, then a max-subtracted softmax
and the weighted sum of values. It materialises the full score matrix, so it refuses
sizes above `MAX_SCORE_BYTES` and names the tiled backend instead of exhausting memory.

Low precision (bfloat16, float16) is computed in float32 and rounded once at the end;
float64 stays float64. A row that may attend to nothing gets weights 0, output 0, lse -inf.
Never chosen by `auto`. Layout: docs/architecture.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _memory
from ..spec import AttentionSpec, compute_dtype
from .base import Backend

# The reference refuses to build a score matrix larger than this (bytes, in compute dtype).
MAX_SCORE_BYTES = 2 * 1024**3


def size_error(spec: AttentionSpec, dtype: torch.dtype, what: str = "the reference backend") -> Optional[str]:
    """Why a score matrix of these sizes is refused (above MAX_SCORE_BYTES), or None."""
    itemsize = torch.finfo(compute_dtype(dtype)).bits // 8
    nbytes = spec.B * spec.Hq * spec.Lq * spec.Lk * itemsize
    if nbytes <= MAX_SCORE_BYTES:
        return None
    return (
        f"{what} would build a score matrix of B*Hq*Lq*Lk = {spec.B}*{spec.Hq}*{spec.Lq}*"
        f"{spec.Lk} entries ({nbytes / 1024**3:.1f} GiB, limit {MAX_SCORE_BYTES / 1024**3:.0f} "
        "GiB). Use backend='tiled' (memory linear in length) or fewer query rows"
    )


def softmax_stats(q: Tensor, k: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """Probabilities and lse of the whole grid.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D) -> probs (B, Hq, Lq, Lk), lse (B, Hq, Lq), both in the
    compute dtype. Differentiable in q and k through ordinary autograd.
    """
    ct = compute_dtype(q.dtype)
    k = k.repeat_interleave(spec.groups, dim=1)  # (B, Hq, Lk, D): query head h uses kv head h // G
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * spec.scale  # (B, Hq, Lq, Lk)
    scores = spec.apply_score_mod(scores, 0, 0)
    allowed, bias = spec.constraints(0, spec.Lq, 0, spec.Lk, q.device)
    if bias is not None:
        scores = scores + bias.to(ct)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if spec.Lk == 0:  # nothing to attend to: weights of zero width, lse -inf
        return scores, torch.full(scores.shape[:-1], float("-inf"), dtype=ct, device=q.device)
    row_max = scores.amax(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
    # A row with nothing to attend to has max -inf; subtract 0 instead so it stays -inf, not NaN.
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max).detach()
    unnorm = torch.exp(scores - row_max)  # (B, Hq, Lq, Lk)
    row_sum = unnorm.sum(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
    probs = unnorm / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    lse = (torch.log(row_sum) + row_max).squeeze(-1)  # (B, Hq, Lq); -inf where row_sum == 0
    return probs, lse


def dropout(probs: Tensor, p: float) -> Tensor:
    """Drop each weight with probability p and scale the kept ones by 1/(1-p)."""
    if p == 0.0:
        return probs
    keep = torch.rand(probs.shape, device=probs.device) >= p
    return probs * keep / (1.0 - p)


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq).

    The size limit is checked by the caller, before anything runs (`unsupported`)."""
    probs, lse = softmax_stats(q, k, spec)
    probs = dropout(probs, spec.dropout_p)
    v = v.repeat_interleave(spec.groups, dim=1)  # (B, Hq, Lk, Dv)
    out = torch.matmul(probs, v.to(probs.dtype))  # (B, Hq, Lq, Dv)
    return out.to(q.dtype), (lse if need_lse else None)


def weights(q: Tensor, k: Tensor, spec: AttentionSpec) -> Tensor:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D) -> probs (B, Hq, Lq, Lk) in q's dtype (the caller
    checks `size_error` first). Without autograd, the same probabilities in place (`_weights_in_place`)."""
    if spec.Lk == 0 or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        probs, _ = softmax_stats(q, k, spec)
        return probs.to(q.dtype)
    return _weights_in_place(q, k, spec).to(q.dtype)


def _weights_in_place(q: Tensor, k: Tensor, spec: AttentionSpec) -> Tensor:
    """softmax_stats's probabilities when nothing needs gradients, at a third of the memory traffic:
    grouped query heads share their key head by stacking the queries (no repeated keys), and the
    scale, bias and constraints are applied in place on the one score matrix before a fused
    (max-subtracted) softmax. Rows that may attend to nothing are zeros, as in softmax_stats.
    q (B, Hq, Lq, D), k (B, Hkv, Lk, D) -> (B, Hq, Lq, Lk) in the compute dtype."""
    ct = compute_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    qg = q.to(ct).reshape(B, Hkv, spec.groups * Lq, D)  # (B, Hkv, G*Lq, D): query head h = kv head h // G
    scores = torch.matmul(qg, k.to(ct).transpose(-1, -2)).view(B, Hq, Lq, Lk)  # (B, Hq, Lq, Lk)
    scores.mul_(spec.scale)
    scores = spec.apply_score_mod(scores, 0, 0)
    allowed, bias = spec.constraints(0, spec.Lq, 0, spec.Lk, q.device)
    if bias is not None:
        scores = scores.add_(bias.to(ct)) if torch.broadcast_shapes(bias.shape, scores.shape) == scores.shape \
            else scores + bias.to(ct)
    if allowed is not None:
        scores = scores.masked_fill_(~allowed, float("-inf")) \
            if torch.broadcast_shapes(allowed.shape, scores.shape) == scores.shape \
            else scores.masked_fill(~allowed, float("-inf"))
    dead = torch.isneginf(scores.amax(dim=-1, keepdim=True))  # (B, Hq, Lq, 1): rows that see no key
    probs = torch.softmax(scores, dim=-1)  # NaN in dead rows (exp(-inf - -inf))
    if bool(dead.any()):
        probs.masked_fill_(dead, 0.0)
    return probs


def memory(spec: AttentionSpec, q: Tensor, need_lse: bool) -> tuple[int, str]:
    """(bytes, what): the score matrix, its exponentials and the probabilities (kept once more
    for the backward when autograd records), and k and v repeated per query head."""
    c = _memory.compute_size(q.dtype)
    copies = 5 if spec.grad else 3
    repeated = spec.B * spec.Hq * spec.Lk * (spec.D + spec.Dv) * c
    need = _memory.quadratic(spec, copies, c) + repeated
    return need, (f"a score matrix of B*Hq*Lq*Lk = {spec.B}*{spec.Hq}*{spec.Lq}*{spec.Lk} entries "
                  f"in {compute_dtype(q.dtype)}, materialised {copies} times")


def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    """The reference honours every argument; only size can stop it."""
    return size_error(spec, q.dtype)


BACKEND = Backend("reference", forward, unsupported, memory=memory)

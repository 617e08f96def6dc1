"""Score functions (score_mod): biases and caps applied to the scores before the softmax.

`alibi` (Press et al., 2022, "Train Short, Test Long"), `soft_cap` (Bello et al., 2016;
Gemma 2 Team, 2024), `relative_position_bias` (Shaw et al., 2018, "Self-Attention with
Relative Position Representations"; Raffel et al., 2020). See docs/architecture.md.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from ..core.block_mask import check_int
from ..core.mods import ScoreMod

__all__ = ["alibi", "alibi_slopes", "soft_cap", "relative_position_bias"]


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's head slopes (Press et al., 2022): the geometric sequence 2^(-8i/n), i = 1..n,
    for n a power of two; otherwise those of the nearest lower power of two followed by every
    other slope of the next power (the paper's reference code). float32 (num_heads,)."""
    num_heads = check_int("num_heads", num_heads, minimum=1)

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
    max_distance = check_int("max_distance", max_distance)
    if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[1] != 2 * max_distance + 1:
        got = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(
            f"relative_position_bias: table must be (H, 2*max_distance+1) = (H, {2 * max_distance + 1}); got {got}"
        )

    def score_mod(score, b, h, q_idx, kv_idx):
        rel = (kv_idx - q_idx).clamp(-max_distance, max_distance) + max_distance  # (1, 1, bq, bk)
        return score + table.to(score.device, score.dtype)[h, rel]  # (1, H, bq, bk)

    return score_mod

"""Mask functions, score functions, their combinators, and the block-sparse `BlockMask`.

A mask function says which key each query may attend to; it is written once with tensor
operations and evaluated by qkv wherever it is needed (the dense oracle, the block-sparse
layout, the partial blocks of the sparse backend), so its meaning cannot differ between
paths. The idea and the `BlockMask` layout follow PyTorch's FlexAttention (Dong et al., 2024,
"Flex Attention: A Programming Model for Generating Optimized Attention Kernels").

Contract (docs/architecture.md, "The contract of the core"):

    mask_mod(b, h, q_idx, kv_idx) -> bool tensor            True = may attend
    score_mod(score, b, h, q_idx, kv_idx) -> score tensor    changes scores before softmax

The index arguments are broadcastable integer tensors: b (B, 1, 1, 1), h (1, H, 1, 1),
q_idx (1, 1, bq, 1), kv_idx (1, 1, 1, bk); the result must broadcast to (B, H, bq, bk). Use
tensor operations (`&`, `|`, `~`, `torch.where`, indexing a lookup table), never Python `if`
on their values. q_idx and kv_idx are raw positions, aligned to the top left: pass
`offset=Lk - Lq` to `causal`/windows to align them to the bottom right as `causal=True` does.

Named patterns (each returns a mask function, with its paper in `patterns`): `causal`,
`sliding_window`, `causal_sliding_window`, `dilated_sliding_window`, `strided`, `fixed`,
`global_tokens`, `longformer`, `bigbird`, `document`, `prefix_lm`. Score functions (in
`scores`): `alibi`, `soft_cap`, `relative_position_bias`.

The package's parts: `combinators` (and/or/not and the exact building blocks), `patterns`
(the named patterns and `dense_mask`), `scores` (score functions); `BlockMask`,
`block_mask` and `unknown_fraction` are the core's (`qkv.core.block_mask`), re-exported here.
How a BlockMask is built exactly from the patterns' block classifiers: docs/architecture.md.
"""

from __future__ import annotations

from ..core.block_mask import BlockMask, block_mask, unknown_fraction
from .combinators import and_masks, not_mask, or_masks
from .patterns import (
    bigbird,
    causal,
    causal_sliding_window,
    dense_mask,
    dilated_sliding_window,
    document,
    fixed,
    global_tokens,
    longformer,
    prefix_lm,
    sliding_window,
    strided,
)
from .scores import alibi, alibi_slopes, relative_position_bias, soft_cap

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

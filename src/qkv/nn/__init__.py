"""Attention layers built on the functional core (models -> nn -> core).

- `MultiHeadAttention`: self/cross-attention, fused QKV, GQA/MQA, RoPE, KV cache.
- `KVCache`: preallocated, growing per-layer key/value buffers for decoding.
- Positions: `RotaryEmbedding` + `apply_rotary` (RoPE), `alibi_slopes` / `alibi_bias` /
  `alibi_score_mod` (ALiBi), `LearnedPositions` (BERT/GPT-2 absolute positions).
"""

from .attention import MultiHeadAttention
from .cache import KVCache
from .positions import (
    LearnedPositions,
    RotaryEmbedding,
    alibi_bias,
    alibi_score_mod,
    alibi_slopes,
    apply_rotary,
    rope_inv_freq,
)

__all__ = [
    "MultiHeadAttention",
    "KVCache",
    "RotaryEmbedding",
    "apply_rotary",
    "rope_inv_freq",
    "alibi_slopes",
    "alibi_bias",
    "alibi_score_mod",
    "LearnedPositions",
]

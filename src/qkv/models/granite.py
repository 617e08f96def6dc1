"""Granite decoder (IBM 2024, "Granite 3.0 Language Models"; the multipliers come from the
Power scheduler, Shen et al. 2024, "Power Scheduler: A Batch Size and Token Number Agnostic
Learning Rate Scheduler", after muP, Yang et al. 2021), loading Hugging Face `GraniteForCausalLM`
folders.

What differs from Llama (llama.py): four scalars. The token embeddings are multiplied by
`embedding_multiplier`; each sublayer's output by `residual_multiplier` before it is added to
the residual (x + m * attn(norm(x))); the attention scores are scaled by `attention_multiplier`
instead of 1/sqrt(D); and the logits are divided by `logits_scaling`. Modules, weight names and
plan are Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..nn import KVCache, MultiHeadAttention
from .common import Family
from .fields import POSITIVE_REAL
from .llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, hf_ignored, hf_layers, hf_plan


@dataclass(frozen=True)
class GraniteConfig(LlamaConfig):
    # transformers' GraniteConfig defaults are Llama's, with every multiplier 1 (no change)
    embedding_multiplier: float = 1.0  # token embeddings * this
    residual_multiplier: float = 1.0  # each sublayer's output * this, before the residual sum
    attention_multiplier: float = 1.0  # the attention score scale (Llama: 1/sqrt(head_dim))
    logits_scaling: float = 1.0  # logits / this

    LIMITS = {**LlamaConfig.LIMITS, "embedding_multiplier": POSITIVE_REAL, "residual_multiplier": POSITIVE_REAL,
              "attention_multiplier": POSITIVE_REAL, "logits_scaling": POSITIVE_REAL}


class GraniteDecoderLayer(LlamaDecoderLayer):
    """Llama's block with scores scaled by attention_multiplier and sublayer outputs by residual_multiplier."""

    def __init__(self, c: GraniteConfig, layer_idx: int):
        super().__init__(c, layer_idx)
        self.residual_multiplier = c.residual_multiplier

    def make_attention(self, c: GraniteConfig, **extra) -> MultiHeadAttention:
        return super().make_attention(c, scale=c.attention_multiplier, **extra)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        x = x + self.attend(self.input_layernorm(x), mask, rotary, cache) * self.residual_multiplier  # (B, L, E)
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier


class GraniteForCausalLM(LlamaForCausalLM):
    """A Granite decoder with its LM head: Llama's skeleton and hooks, with the four multipliers."""

    layer_class = GraniteDecoderLayer

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, rotary = super().embed(input_ids, positions)  # (B, L, E); cos, sin
        return x * self.config.embedding_multiplier, rotary

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., E) -> (..., V), divided by logits_scaling."""
        return self.lm_head(hidden) / self.config.logits_scaling


FAMILY = Family(architectures=("GraniteForCausalLM",), model_type="granite", config=GraniteConfig,
                model=GraniteForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

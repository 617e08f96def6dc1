"""Helium decoder (Kyutai 2025, "Helium 1"), loading Hugging Face `HeliumForCausalLM` folders.

What differs from Llama (llama.py), read from transformers 5.24's modeling_helium.py:
- RoPE in the interleaved layout (RoFormer's pairs of features (2i, 2i+1), Su et al. 2021)
  instead of Llama's halves: `RotaryEmbedding(interleaved=True)` and
  `MultiHeadAttention(interleaved_rotary=True)`;
- the output projection never has a bias (`attention_bias` puts one on q, k and v only) and is
  (hidden_size, hidden_size), so num_attention_heads * head_dim must equal hidden_size;
- RMSNorm multiplies by its weight in float32 before casting back (Llama casts first; the same
  in float32), with eps 1e-8 by default;
- defaults: head_dim 128, RoPE base 100000.
Blocks, MLP (with `mlp_bias`), weight names and plan are Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .checkpoint import ModelError
from .common import Family
from .llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaRMSNorm, hf_ignored, hf_layers, hf_plan


@dataclass(frozen=True)
class HeliumConfig(LlamaConfig):
    # transformers' HeliumConfig defaults (Helium 1 2B), for fields a config.json leaves out
    vocab_size: int = 48000
    hidden_size: int = 2560
    intermediate_size: int = 7040
    num_hidden_layers: int = 24
    num_attention_heads: int = 20
    num_key_value_heads: Optional[int] = 20
    head_dim: Optional[int] = 128  # D; null = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-8
    rope_theta: float = 100000.0  # Helium's default RoPE base

    def check(self, source) -> None:
        super().check(source)
        if self.num_attention_heads * self.dim_per_head != self.hidden_size:
            raise ModelError(
                f"{source}: num_attention_heads={self.num_attention_heads} heads of head_dim={self.dim_per_head} make "
                f"{self.num_attention_heads * self.dim_per_head} features, but Helium's output projection is "
                f"(hidden_size, hidden_size) with hidden_size={self.hidden_size} (transformers fails on it too); "
                f"correct head_dim or hidden_size")

    out_bias = property(lambda self: False)  # o_proj has no bias, whatever attention_bias says


class HeliumRMSNorm(LlamaRMSNorm):
    """RMSNorm in float32, the weight too, cast back to the input's dtype at the end."""

    def forward(self, x: Tensor) -> Tensor:
        h = x if x.dtype == torch.float64 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(h.dtype) * h).to(x.dtype)


class HeliumDecoderLayer(LlamaDecoderLayer):
    """Llama's block with interleaved RoPE and Helium's RMSNorm (the final norm's too)."""

    interleaved_rotary = True

    @classmethod
    def make_norm(cls, c: HeliumConfig, dim) -> nn.Module:
        return HeliumRMSNorm(dim, c.rms_norm_eps)


class HeliumForCausalLM(LlamaForCausalLM):
    """A Helium decoder with its LM head: Llama's skeleton and hooks, with Helium's layers."""

    layer_class = HeliumDecoderLayer


FAMILY = Family(architectures=("HeliumForCausalLM",), model_type="helium", config=HeliumConfig,
                model=HeliumForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

"""Qwen3 decoder (Qwen Team 2025, "Qwen3 Technical Report"), loading Hugging Face
`Qwen3ForCausalLM` folders.

What differs from Llama (llama.py): each attention head's queries and keys go through an
RMSNorm over the head size before RoPE (`self_attn.q_norm`, `self_attn.k_norm`; QK-norm, Henry
et al. 2020, run by `MultiHeadAttention`'s `q_norm=`/`k_norm=`); `attention_bias` puts biases on
all four projections as in Llama (Qwen2's fixed q/k/v biases are gone); the MLP has no biases.
Layers may slide as Qwen2's do (qwen2.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..nn import MultiHeadAttention
from .checkpoint import Plan
from .common import Family
from .llama import LlamaDecoderLayer, LlamaForCausalLM, hf_ignored, hf_layers, per_layer
from .llama import hf_plan as llama_plan
from .qwen2 import Qwen2Config


@dataclass(frozen=True)
class Qwen3Config(Qwen2Config):
    # transformers' Qwen3Config defaults (Qwen3-8B), for fields a config.json leaves out; the
    # sliding-window fields and their reading are Qwen2's
    num_key_value_heads: Optional[int] = 32
    head_dim: Optional[int] = 128  # D; null = hidden_size // num_attention_heads
    max_position_embeddings: int = 32768

    # attention_bias puts biases on all four projections, as in Llama (Qwen2's fixed q/k/v biases are gone)
    qkv_bias = property(lambda self: self.attention_bias)
    out_bias = property(lambda self: self.attention_bias)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """Llama's block, whose attention normalises each query and key head (RMSNorm over D) before RoPE."""

    def make_attention(self, c: Qwen3Config, **extra) -> MultiHeadAttention:
        D = c.dim_per_head  # the q/k norms run on (B, L, H, D), over each head
        return super().make_attention(c, q_norm=self.make_norm(c, D), k_norm=self.make_norm(c, D), **extra)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """A Qwen3 decoder with its LM head: Llama's skeleton and hooks, with Qwen3's layers."""

    layer_class = Qwen3DecoderLayer


def hf_plan(c: Qwen3Config) -> Plan:
    """Llama's plan (llama.hf_plan) and each layer's q/k norm weights (D,)."""
    D = c.dim_per_head
    return {**llama_plan(c), **per_layer(c, {"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})}


FAMILY = Family(architectures=("Qwen3ForCausalLM",), model_type="qwen3", config=Qwen3Config,
                model=Qwen3ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

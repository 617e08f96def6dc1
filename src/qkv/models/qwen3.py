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

from torch import nn

from ..nn import MultiHeadAttention, RotaryEmbedding
from .checkpoint import Piece, Plan
from .common import Family
from .decoder import CausalLM
from .llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaRMSNorm, hf_ignored, hf_layers
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

    def __init__(self, c: Qwen3Config, layer_idx: int):
        super().__init__(c, layer_idx)
        D = c.dim_per_head
        self.self_attn = MultiHeadAttention(
            c.hidden_size, c.num_attention_heads, num_kv_heads=c.kv_heads, head_dim=D, bias=c.qkv_bias,
            out_bias=c.out_bias, dropout=c.attention_dropout,
            q_norm=LlamaRMSNorm(D, c.rms_norm_eps), k_norm=LlamaRMSNorm(D, c.rms_norm_eps),  # on (B, L, H, D)
        )


class Qwen3Model(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(c.dim_per_head, c.rope_theta, rope_scaling=c.rope_scaling)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """A Qwen3 decoder with its LM head: Llama's skeleton and hooks, with Qwen3's layers."""

    def __init__(self, config: Qwen3Config):
        CausalLM.__init__(self, config)
        self.model = Qwen3Model(config)
        self.add_lm_head(config.hidden_size, config.vocab_size)


def hf_plan(c: Qwen3Config) -> Plan:
    """Llama's plan (llama.hf_plan) and each layer's q/k norm weights (D,)."""
    plan = dict(llama_plan(c))
    for i in range(c.num_hidden_layers):
        for norm in ("q_norm", "k_norm"):
            key = f"model.layers.{i}.self_attn.{norm}.weight"
            plan[key] = (Piece(key, (c.dim_per_head,)),)
    return plan


FAMILY = Family(architectures=("Qwen3ForCausalLM",), model_type="qwen3", config=Qwen3Config,
                model=Qwen3ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

"""Cohere decoder (Command R, Cohere 2024: "Command R: Retrieval-Augmented Generation at
Production Scale"; Aya 23, Aryabumi et al. 2024), loading Hugging Face `CohereForCausalLM`
folders.

Grouped-query attention, a SwiGLU MLP (no biases) and RoPE as Llama's. What differs from Llama:

- parallel blocks (GPT-J, Wang & Komatsuzaki 2021): attention and MLP both read the same
  normed input, x + attn(ln(x)) + mlp(ln(x)), with one norm per block;
- Cohere's LayerNorm: mean-centred and scaled, with a weight and no bias, computed in float32;
- RoPE in RoFormer's interleaved layout: features (2i, 2i+1) rotate together
  (`interleaved_rotary=True`), not i and i + D/2;
- `use_qk_norm` (Command R+): queries and keys normalised per head before RoPE by Cohere's
  LayerNorm with an (H, D) weight, one row per head;
- the logits multiplied by `logit_scale` (0.0625 for Command R);
- the LM head tied to the embeddings by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..nn import KVCache, MultiHeadAttention
from .checkpoint import Dim, Plan
from .common import Family
from .fields import EPS, Fields
from .llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, hf_layers, kept
from .llama import hf_plan as llama_plan
from .llama import tied_head_ignored as hf_ignored


@dataclass(frozen=True)
class CohereConfig(LlamaConfig):
    # transformers' CohereConfig defaults (Command R), for fields a config.json leaves out
    vocab_size: int = 256000
    hidden_size: int = 8192
    intermediate_size: int = 22528
    num_hidden_layers: int = 40
    num_attention_heads: int = 64
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0  # transformers' default_theta for Cohere
    layer_norm_eps: float = 1e-5  # Cohere's LayerNorm eps (rms_norm_eps is not a Cohere field)
    logit_scale: float = 0.0625  # the logits are multiplied by it
    use_qk_norm: bool = False  # per-head LayerNorm on queries and keys
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 5
    eos_token_id: Optional[Union[int, list[int]]] = 255001

    LIMITS = {**LlamaConfig.LIMITS, "layer_norm_eps": EPS}

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        out = super().read_fields(f)
        # not a Cohere field: transformers' Cohere MLP never has biases, whatever a config.json says
        out.pop("mlp_bias", None)
        return out


class CohereLayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight over the last dimension, no bias, computed in float32
    (float64 inputs stay float64). `shape` is (E,) for the blocks, (H, D) for the per-head q/k
    norms, whose input is (B, L, H, D)."""

    def __init__(self, shape: Union[int, tuple[int, ...]], eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x if x.dtype == torch.float64 else x.float()
        h = h - h.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(h.dtype) * h).to(x.dtype)


class CohereDecoderLayer(LlamaDecoderLayer):
    """A parallel block: x + attn(ln(x)) + mlp(ln(x))."""

    interleaved_rotary = True

    def __init__(self, c: CohereConfig, layer_idx: int):
        super().__init__(c, layer_idx)
        del self.post_attention_layernorm  # one norm per block

    @classmethod
    def make_norm(cls, c: CohereConfig, dim) -> nn.Module:
        return CohereLayerNorm(dim, c.layer_norm_eps)

    def make_attention(self, c: CohereConfig, **extra) -> MultiHeadAttention:
        H, Hkv, D = c.num_attention_heads, c.kv_heads, c.dim_per_head
        return super().make_attention(c, q_norm=self.make_norm(c, (H, D)) if c.use_qk_norm else None,
                                      k_norm=self.make_norm(c, (Hkv, D)) if c.use_qk_norm else None,
                                      rotary_dtype=torch.float32, **extra)  # rotated in float32, as Cohere does

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        h = self.input_layernorm(x)
        return x + self.attend(h, mask, rotary, cache) + self.mlp(h)


class CohereForCausalLM(LlamaForCausalLM):
    """A Cohere decoder with its LM head: Llama's skeleton and hooks over Cohere's layers; logits scaled."""

    layer_class = CohereDecoderLayer

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., E) -> (..., V), multiplied by logit_scale."""
        return self.lm_head(hidden) * self.config.logit_scale


def hf_plan(c: CohereConfig) -> Plan:
    """Checkpoint names of a Hugging Face CohereForCausalLM -> qkv parameter names (pure): Llama's
    (llama.hf_plan), without post_attention_layernorm, and with q_norm, k_norm (H, D) under their
    names when use_qk_norm."""
    plan = dict(llama_plan(c))
    H, D = Dim(c.num_attention_heads, "num_attention_heads"), c.dim_per_head
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        del plan[p + "post_attention_layernorm.weight"]
        if c.use_qk_norm:
            plan.update(kept(p + "self_attn.", {"q_norm.weight": (H, D), "k_norm.weight": (c.kv_heads, D)}))
    return plan


FAMILY = Family(architectures=("CohereForCausalLM",), model_type="cohere", config=CohereConfig,
                model=CohereForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

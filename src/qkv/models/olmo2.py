"""OLMo 2 decoder (Team OLMo 2024, "2 OLMo 2 Furious"), loading Hugging Face `Olmo2ForCausalLM`
folders.

What differs from Llama (llama.py): no norm before attention or the MLP; instead each sublayer's
output is normalised inside the residual (x + norm(attn(x)), then x + norm(mlp(x)):
`post_attention_layernorm`, `post_feedforward_layernorm`), and the queries and keys are
normalised over the whole projection, all heads at once, before RoPE (`self_attn.q_norm` over
Hq*D, `self_attn.k_norm` over Hkv*D; `MultiHeadAttention(qk_norm_per_head=False)`).
`attention_bias` puts biases on all four projections as in Llama; the MLP has none. OLMo 2's
RMSNorm multiplies by its weight before casting back (Llama casts first); the same in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..nn import KVCache, MultiHeadAttention
from .checkpoint import Plan
from .common import Family
from .fields import Fields
from .llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaRMSNorm, hf_ignored, hf_layers, per_layer
from .llama import hf_plan as llama_plan


@dataclass(frozen=True)
class Olmo2Config(LlamaConfig):
    # transformers' Olmo2Config defaults (OLMo 2 7B), for fields a config.json leaves out
    vocab_size: int = 50304
    rms_norm_eps: float = 1e-5
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = 50279

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        out = super().read_fields(f)
        out.pop("mlp_bias", None)  # not an OLMo 2 field: its MLP never has biases
        return out


class Olmo2RMSNorm(LlamaRMSNorm):
    """RMSNorm in float32, multiplied by the weight before casting back to the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        h = x if x.dtype == torch.float64 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class Olmo2DecoderLayer(LlamaDecoderLayer):
    """x + post_attention_layernorm(attn(x)), then x + post_feedforward_layernorm(mlp(x))."""

    def __init__(self, c: Olmo2Config, layer_idx: int):
        super().__init__(c, layer_idx)
        del self.input_layernorm  # no norm before the sublayers
        self.post_feedforward_layernorm = self.make_norm(c, c.hidden_size)

    @classmethod
    def make_norm(cls, c: Olmo2Config, dim) -> nn.Module:
        return Olmo2RMSNorm(dim, c.rms_norm_eps)

    def make_attention(self, c: Olmo2Config, **extra) -> MultiHeadAttention:
        q_size, kv_size = c.num_attention_heads * c.dim_per_head, c.kv_heads * c.dim_per_head
        # the norms see (B, L, Hq*D), (B, L, Hkv*D); q and k are rotated in float32 by float32 tables
        return super().make_attention(c, q_norm=self.make_norm(c, q_size), k_norm=self.make_norm(c, kv_size),
                                      qk_norm_per_head=False, rotary_dtype=torch.float32, **extra)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        x = x + self.post_attention_layernorm(self.attend(x, mask, rotary, cache))  # (B, L, E)
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2ForCausalLM(LlamaForCausalLM):
    """An OLMo 2 decoder with its LM head: Llama's skeleton and hooks, with OLMo 2's layers."""

    layer_class = Olmo2DecoderLayer
    rotary_table_dtype = torch.float32  # cos/sin stay float32, as OLMo 2's rotary embedding returns them


def hf_plan(c: Olmo2Config) -> Plan:
    """Llama's plan (llama.hf_plan) without input_layernorm, with post_feedforward_layernorm and
    each layer's q/k norm weights over the whole projection (Hq*D,), (Hkv*D,)."""
    plan = {k: v for k, v in llama_plan(c).items() if not k.endswith(".input_layernorm.weight")}
    return {**plan, **per_layer(c, {"post_feedforward_layernorm.weight": (c.hidden_size,),
                                    "self_attn.q_norm.weight": (c.num_attention_heads * c.dim_per_head,),
                                    "self_attn.k_norm.weight": (c.kv_heads * c.dim_per_head,)})}


FAMILY = Family(architectures=("Olmo2ForCausalLM",), model_type="olmo2", config=Olmo2Config,
                model=Olmo2ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

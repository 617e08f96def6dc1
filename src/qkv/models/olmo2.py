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

from ..nn import KVCache, MultiHeadAttention, RotaryEmbedding
from .checkpoint import Piece, Plan
from .common import Family
from .decoder import CausalLM
from .fields import Fields
from .llama import LlamaConfig, LlamaForCausalLM, LlamaMLP, LlamaRMSNorm, hf_ignored, hf_layers
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


class Olmo2DecoderLayer(nn.Module):
    """x + post_attention_layernorm(attn(x)), then x + post_feedforward_layernorm(mlp(x))."""

    def __init__(self, c: Olmo2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        q_size, kv_size = c.num_attention_heads * c.dim_per_head, c.kv_heads * c.dim_per_head
        self.self_attn = MultiHeadAttention(
            c.hidden_size, c.num_attention_heads, num_kv_heads=c.kv_heads, head_dim=c.dim_per_head,
            bias=c.qkv_bias, out_bias=c.out_bias, dropout=c.attention_dropout,
            q_norm=Olmo2RMSNorm(q_size, c.rms_norm_eps), k_norm=Olmo2RMSNorm(kv_size, c.rms_norm_eps),
            qk_norm_per_head=False,  # the norms see (B, L, Hq*D) and (B, L, Hkv*D)
        )
        self.window = c.window(layer_idx)
        self.mlp = LlamaMLP(c)
        self.post_attention_layernorm = Olmo2RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = Olmo2RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        a = self.self_attn(x, mask=mask, causal=True, window=self.window, rotary=rotary, cache=cache,
                           layer=self.layer_idx)  # (B, L, E)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2Model(nn.Module):
    def __init__(self, c: Olmo2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Olmo2DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = Olmo2RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(c.dim_per_head, c.rope_theta, rope_scaling=c.rope_scaling)


class Olmo2ForCausalLM(LlamaForCausalLM):
    """An OLMo 2 decoder with its LM head: Llama's skeleton and hooks, with OLMo 2's layers."""

    def __init__(self, config: Olmo2Config):
        CausalLM.__init__(self, config)
        self.model = Olmo2Model(config)
        self.add_lm_head(config.hidden_size, config.vocab_size)


def hf_plan(c: Olmo2Config) -> Plan:
    """Llama's plan (llama.hf_plan) without input_layernorm, with post_feedforward_layernorm and
    each layer's q/k norm weights over the whole projection (Hq*D,), (Hkv*D,)."""
    plan = dict(llama_plan(c))
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        del plan[p + "input_layernorm.weight"]
        norms = {"post_feedforward_layernorm": c.hidden_size,
                 "self_attn.q_norm": c.num_attention_heads * c.dim_per_head,
                 "self_attn.k_norm": c.kv_heads * c.dim_per_head}
        for name, size in norms.items():
            plan[p + f"{name}.weight"] = (Piece(p + f"{name}.weight", (size,)),)
    return plan


FAMILY = Family(architectures=("Olmo2ForCausalLM",), model_type="olmo2", config=Olmo2Config,
                model=Olmo2ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

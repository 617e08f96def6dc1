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

from ..nn import KVCache, MultiHeadAttention, RotaryEmbedding
from .checkpoint import Dim, Piece, Plan
from .common import Family
from .decoder import CausalLM
from .fields import EPS, Fields
from .llama import LlamaConfig, LlamaForCausalLM, LlamaMLP


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


class CohereDecoderLayer(nn.Module):
    """A parallel block: x + attn(ln(x)) + mlp(ln(x))."""

    def __init__(self, c: CohereConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = CohereLayerNorm(c.hidden_size, c.layer_norm_eps)
        H, Hkv, D = c.num_attention_heads, c.kv_heads, c.dim_per_head
        self.self_attn = MultiHeadAttention(
            c.hidden_size, H, num_kv_heads=Hkv, head_dim=D, bias=c.qkv_bias, out_bias=c.out_bias,
            dropout=c.attention_dropout, interleaved_rotary=True,
            q_norm=CohereLayerNorm((H, D), c.layer_norm_eps) if c.use_qk_norm else None,
            k_norm=CohereLayerNorm((Hkv, D), c.layer_norm_eps) if c.use_qk_norm else None,
        )
        self.window = None  # Cohere attends to every earlier token
        self.mlp = LlamaMLP(c)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        h = self.input_layernorm(x)
        a = self.self_attn(h, mask=mask, causal=True, window=self.window, rotary=rotary, cache=cache,
                           layer=self.layer_idx)
        return x + a + self.mlp(h)


class CohereModel(nn.Module):
    def __init__(self, c: CohereConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(CohereDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = CohereLayerNorm(c.hidden_size, c.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(c.dim_per_head, c.rope_theta, rope_scaling=c.rope_scaling, interleaved=True)


class CohereForCausalLM(LlamaForCausalLM):
    """A Cohere decoder with its LM head: Llama's hooks over Cohere's body; logits scaled."""

    def __init__(self, config: CohereConfig):
        CausalLM.__init__(self, config)  # not Llama's body: Cohere's
        self.model = CohereModel(config)
        self.add_lm_head(config.hidden_size, config.vocab_size)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., E) -> (..., V), multiplied by logit_scale."""
        return self.lm_head(hidden) * self.config.logit_scale


def hf_plan(c: CohereConfig) -> Plan:
    """Checkpoint names of a Hugging Face CohereForCausalLM -> qkv parameter names (pure).

    q_proj, k_proj, v_proj are concatenated (rows q | k | v) into `self_attn.qkv_proj`; o_proj
    becomes `self_attn.out_proj`; everything else keeps its name (q_norm, k_norm are (H, D)).
    """
    E, FF = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size")
    V, D = Dim(c.vocab_size, "vocab_size"), c.dim_per_head
    H, Hkv = Dim(c.num_attention_heads, "num_attention_heads"), c.kv_heads
    q_out, kv_out = c.num_attention_heads * D, c.kv_heads * D
    plan: dict[str, tuple[Piece, ...]] = {
        "model.embed_tokens.weight": (Piece("model.embed_tokens.weight", (V, E)),),
        "model.norm.weight": (Piece("model.norm.weight", (E,)),),
    }
    if not c.tie_word_embeddings:
        plan["lm_head.weight"] = (Piece("lm_head.weight", (V, E)),)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        plan[p + "self_attn.qkv_proj.weight"] = (
            Piece(p + "self_attn.q_proj.weight", (q_out, E)),
            Piece(p + "self_attn.k_proj.weight", (kv_out, E)),
            Piece(p + "self_attn.v_proj.weight", (kv_out, E)),
        )
        plan[p + "self_attn.out_proj.weight"] = (Piece(p + "self_attn.o_proj.weight", (E, q_out)),)
        if c.qkv_bias:
            plan[p + "self_attn.qkv_proj.bias"] = (
                Piece(p + "self_attn.q_proj.bias", (q_out,)),
                Piece(p + "self_attn.k_proj.bias", (kv_out,)),
                Piece(p + "self_attn.v_proj.bias", (kv_out,)),
            )
            plan[p + "self_attn.out_proj.bias"] = (Piece(p + "self_attn.o_proj.bias", (E,)),)
        if c.use_qk_norm:
            plan[p + "self_attn.q_norm.weight"] = (Piece(p + "self_attn.q_norm.weight", (H, D)),)
            plan[p + "self_attn.k_norm.weight"] = (Piece(p + "self_attn.k_norm.weight", (Hkv, D)),)
        for name, shape in (("gate_proj", (FF, E)), ("up_proj", (FF, E)), ("down_proj", (E, FF))):
            plan[p + f"mlp.{name}.weight"] = (Piece(p + f"mlp.{name}.weight", shape),)
        plan[p + "input_layernorm.weight"] = (Piece(p + "input_layernorm.weight", (E,)),)
    return plan


def hf_layers(c: CohereConfig) -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning."""
    return [("num_hidden_layers", c.num_hidden_layers, "model.layers.")]


def hf_ignored(c: CohereConfig) -> dict:
    """A tied lm_head.weight may be saved as a copy of the embeddings."""
    return {"lm_head.weight": (c.vocab_size, c.hidden_size)} if c.tie_word_embeddings else {}


FAMILY = Family(architectures=("CohereForCausalLM",), model_type="cohere", config=CohereConfig,
                model=CohereForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

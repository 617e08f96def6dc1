"""StarCoder2 decoder (Lozhkov et al. 2024, "StarCoder 2 and The Stack v2: The Next
Generation"), loading Hugging Face `Starcoder2ForCausalLM` folders.

Attention is Mistral's (mistral.py): grouped-query attention with RoPE in Llama's half-split
layout and an optional sliding window. What differs from Llama: LayerNorm with a bias
(`norm_epsilon`) instead of RMSNorm; a plain two-layer MLP `c_fc` -> activation (`hidden_act`,
gelu_pytorch_tanh) -> `c_proj` instead of SwiGLU; biases on every projection when `use_bias`
(q, k, v, o, c_fc, c_proj); dropout on the embeddings and on each residual branch (training
only); the LM head tied to the embeddings by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import KVCache, MultiHeadAttention, RotaryEmbedding
from .checkpoint import Dim, Piece, Plan
from .common import Family, activation
from .decoder import CausalLM
from .fields import EPS, PROBABILITY
from .llama import LlamaForCausalLM
from .mistral import MistralConfig


@dataclass(frozen=True)
class Starcoder2Config(MistralConfig):
    # transformers' Starcoder2Config defaults (StarCoder2 7B), for fields a config.json leaves out
    vocab_size: int = 49152
    hidden_size: int = 3072
    intermediate_size: int = 12288  # the MLP's inner size
    num_hidden_layers: int = 30
    num_attention_heads: int = 24
    num_key_value_heads: Optional[int] = 2
    hidden_act: str = "gelu_pytorch_tanh"  # the MLP's activation
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5  # LayerNorm eps (rms_norm_eps is not a StarCoder2 field)
    sliding_window: Optional[int] = None  # a token attends to itself and the sliding_window - 1 before it
    use_bias: bool = True  # bias on q/k/v/o and on c_fc/c_proj
    residual_dropout: float = 0.0  # dropout on each block's attention and MLP output, training only
    embedding_dropout: float = 0.0  # dropout on the token embeddings, training only
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[Union[int, list[int]]] = 50256

    LIMITS = {**MistralConfig.LIMITS, "norm_epsilon": EPS, "residual_dropout": PROBABILITY,
              "embedding_dropout": PROBABILITY}

    # use_bias, not Llama's attention_bias, sets the projections' biases
    qkv_bias = property(lambda self: self.use_bias)
    out_bias = property(lambda self: self.use_bias)


class Starcoder2MLP(nn.Module):
    """c_proj(act(c_fc(x))), then residual dropout (training only)."""

    def __init__(self, c: Starcoder2Config):
        super().__init__()
        self.c_fc = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.use_bias)
        self.c_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.use_bias)
        self._act = activation(c.hidden_act)
        self.residual_dropout = c.residual_dropout

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, E) -> (B, L, E)."""
        return F.dropout(self.c_proj(self._act(self.c_fc(x))), self.residual_dropout, self.training)


class Starcoder2DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(x)), with LayerNorms."""

    def __init__(self, c: Starcoder2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_epsilon)
        self.self_attn = MultiHeadAttention(
            c.hidden_size, c.num_attention_heads, num_kv_heads=c.kv_heads, head_dim=c.dim_per_head,
            bias=c.use_bias, dropout=c.attention_dropout,
        )
        self.window = c.window(layer_idx)
        self.residual_dropout = c.residual_dropout
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_epsilon)
        self.mlp = Starcoder2MLP(c)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        a = self.self_attn(self.input_layernorm(x), mask=mask, causal=True, window=self.window, rotary=rotary,
                           cache=cache, layer=self.layer_idx)
        x = x + F.dropout(a, self.residual_dropout, self.training)
        return x + self.mlp(self.post_attention_layernorm(x))


class Starcoder2Model(nn.Module):
    def __init__(self, c: Starcoder2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Starcoder2DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.norm_epsilon)
        self.rotary_emb = RotaryEmbedding(c.dim_per_head, c.rope_theta, rope_scaling=c.rope_scaling)
        self.embedding_dropout = c.embedding_dropout


class Starcoder2ForCausalLM(LlamaForCausalLM):
    """A StarCoder2 decoder with its LM head: Llama's hooks over StarCoder2's body."""

    def __init__(self, config: Starcoder2Config):
        CausalLM.__init__(self, config)  # not Llama's body: StarCoder2's
        self.model = Starcoder2Model(config)
        self.add_lm_head(config.hidden_size, config.vocab_size)

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = self.model.embed_tokens(input_ids)  # (B, L, E)
        x = F.dropout(x, self.model.embedding_dropout, self.training)
        return x, self.model.rotary_emb(positions, dtype=x.dtype)  # cos, sin (L, D) or (B, 1, L, D)


def hf_plan(c: Starcoder2Config) -> Plan:
    """Checkpoint names of a Hugging Face Starcoder2ForCausalLM -> qkv parameter names (pure).

    q_proj, k_proj, v_proj (weights and biases) are concatenated (rows q | k | v) into
    `self_attn.qkv_proj`; o_proj becomes `self_attn.out_proj`; everything else keeps its name.
    """
    E, FF = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size")
    V, D = Dim(c.vocab_size, "vocab_size"), c.dim_per_head
    q_out, kv_out = c.num_attention_heads * D, c.kv_heads * D
    plan: dict[str, tuple[Piece, ...]] = {
        "model.embed_tokens.weight": (Piece("model.embed_tokens.weight", (V, E)),),
        "model.norm.weight": (Piece("model.norm.weight", (E,)),),
        "model.norm.bias": (Piece("model.norm.bias", (E,)),),
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
        plan[p + "mlp.c_fc.weight"] = (Piece(p + "mlp.c_fc.weight", (FF, E)),)
        plan[p + "mlp.c_proj.weight"] = (Piece(p + "mlp.c_proj.weight", (E, FF)),)
        if c.use_bias:
            plan[p + "self_attn.qkv_proj.bias"] = (
                Piece(p + "self_attn.q_proj.bias", (q_out,)),
                Piece(p + "self_attn.k_proj.bias", (kv_out,)),
                Piece(p + "self_attn.v_proj.bias", (kv_out,)),
            )
            plan[p + "self_attn.out_proj.bias"] = (Piece(p + "self_attn.o_proj.bias", (E,)),)
            plan[p + "mlp.c_fc.bias"] = (Piece(p + "mlp.c_fc.bias", (FF,)),)
            plan[p + "mlp.c_proj.bias"] = (Piece(p + "mlp.c_proj.bias", (E,)),)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for part in ("weight", "bias"):
                plan[p + f"{norm}.{part}"] = (Piece(p + f"{norm}.{part}", (E,)),)
    return plan


def hf_layers(c: Starcoder2Config) -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning."""
    return [("num_hidden_layers", c.num_hidden_layers, "model.layers.")]


def hf_ignored(c: Starcoder2Config) -> dict:
    """A tied lm_head.weight may be saved as a copy of the embeddings."""
    return {"lm_head.weight": (c.vocab_size, c.hidden_size)} if c.tie_word_embeddings else {}


FAMILY = Family(architectures=("Starcoder2ForCausalLM",), model_type="starcoder2", config=Starcoder2Config,
                model=Starcoder2ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

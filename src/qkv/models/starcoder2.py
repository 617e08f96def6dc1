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

from ..nn import KVCache
from .checkpoint import Dim, Plan
from .common import Family, activation
from .fields import EPS, PROBABILITY
from .llama import LlamaDecoderLayer, LlamaForCausalLM, attention_plan, hf_layers, kept, norms_plan, outer_plan
from .llama import tied_head_ignored as hf_ignored
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


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(x)), with LayerNorms."""

    def __init__(self, c: Starcoder2Config, layer_idx: int):
        super().__init__(c, layer_idx)
        self.residual_dropout = c.residual_dropout

    @classmethod
    def make_norm(cls, c: Starcoder2Config, dim) -> nn.Module:
        return nn.LayerNorm(dim, eps=c.norm_epsilon)

    def make_mlp(self, c: Starcoder2Config) -> nn.Module:
        return Starcoder2MLP(c)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        x = x + F.dropout(self.attend(self.input_layernorm(x), mask, rotary, cache), self.residual_dropout,
                          self.training)
        return x + self.mlp(self.post_attention_layernorm(x))  # the MLP drops out its own output


class Starcoder2ForCausalLM(LlamaForCausalLM):
    """A StarCoder2 decoder with its LM head: Llama's skeleton and hooks over StarCoder2's layers."""

    layer_class = Starcoder2DecoderLayer

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, rotary = super().embed(input_ids, positions)  # (B, L, E); cos, sin
        return F.dropout(x, self.config.embedding_dropout, self.training), rotary


def hf_plan(c: Starcoder2Config) -> Plan:
    """Checkpoint names of a Hugging Face Starcoder2ForCausalLM -> qkv parameter names (pure).

    q_proj, k_proj, v_proj (weights and biases) are concatenated (rows q | k | v) into
    `self_attn.qkv_proj`; o_proj becomes `self_attn.out_proj`; everything else keeps its name.
    """
    E, FF = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size")
    plan = outer_plan(c, norm_bias=True)
    mlp = {"c_fc.weight": (FF, E), "c_proj.weight": (E, FF)}
    if c.use_bias:
        mlp.update({"c_fc.bias": (FF,), "c_proj.bias": (E,)})
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.update(attention_plan(p, c, E, qkv_bias=c.use_bias, out_bias=c.use_bias))
        plan.update(kept(p + "mlp.", mlp))
        plan.update(norms_plan(p, E, bias=True))
    return plan


FAMILY = Family(architectures=("Starcoder2ForCausalLM",), model_type="starcoder2", config=Starcoder2Config,
                model=Starcoder2ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

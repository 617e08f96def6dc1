"""GLM decoders (Team GLM 2024, "ChatGLM: A Family of Large Language Models from GLM-130B to
GLM-4 All Tools"), loading Hugging Face `GlmForCausalLM` (GLM-4-9B, model_type "glm") and
`Glm4ForCausalLM` (GLM-4-0414, model_type "glm4") folders.

What differs from Llama (llama.py):
- partial rotary in the interleaved layout: only the first R = int(head_dim *
  `partial_rotary_factor`) features of each head are rotated (0.5 by default), as RoFormer's
  pairs (2i, 2i+1), Su et al. 2021; the other D - R pass through. `RotaryEmbedding(R,
  interleaved=True)`, whose tables `apply_rotary` applies to the first R features;
- biases on q, k and v by default (`attention_bias`, true by default), never on the output projection;
- the SwiGLU MLP's gate and up projections are one stored matrix, `mlp.gate_up_proj` (2 FF, E),
  gate rows first: down(act(gate) * up), no biases.
GLM-4 (`Glm4ForCausalLM`) adds two norms inside the residual: x + post_self_attn_layernorm(attn(
input_layernorm(x))), then x + post_mlp_layernorm(mlp(post_attention_layernorm(x))).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor, nn

from ..nn import KVCache
from .checkpoint import Dim, ModelError, Piece, Plan
from .common import Family
from .fields import Fields
from .llama import GateUpMLP, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, hf_ignored, hf_layers, per_layer
from .llama import hf_plan as llama_plan

GLM_EOS = [151329, 151336, 151338]  # transformers' GlmConfig stop ids when eos_token_id is null


@dataclass(frozen=True)
class GlmConfig(LlamaConfig):
    # transformers' GlmConfig defaults (GLM-4-9B), for fields a config.json leaves out
    vocab_size: int = 151552
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_key_value_heads: Optional[int] = 2
    head_dim: Optional[int] = 128  # D; null = hidden_size // num_attention_heads
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1.5625e-07
    attention_bias: bool = True  # biases on q, k and v (never on o_proj)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None  # null = GLM_EOS, as transformers sets it
    partial_rotary_factor: float = 0.5  # the rotated fraction of each head (in rope_parameters, or top level)

    PARTIAL_ROTARY = True  # partial_rotary_factor: rope dict's (rope_scaling, else rope_parameters), top level, 0.5

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        out = super().read_fields(f)
        out.pop("mlp_bias", None)  # not a GLM field: its MLP never has biases
        if out.get("eos_token_id") is None:
            out["eos_token_id"] = list(GLM_EOS)
        return out

    def check(self, source) -> None:
        super().check(source)
        R = self.rotary_dim
        if R < 2 or R % 2:
            raise ModelError(
                f"{source}: partial_rotary_factor={self.partial_rotary_factor:g} of head_dim={self.dim_per_head} "
                f"rotates int({self.dim_per_head} * {self.partial_rotary_factor:g}) = {R} features; rotary "
                f"embeddings rotate pairs of features, so that must be even and at least 2; correct it")

    @property
    def rotary_dim(self) -> int:
        """R: the rotated features at the start of each head."""
        return int(self.dim_per_head * self.partial_rotary_factor)

    out_bias = property(lambda self: False)  # o_proj has no bias, whatever attention_bias says


GlmMLP = GateUpMLP  # SwiGLU with gate and up in one matrix, gate_up_proj (rows gate | up), as Phi-3's


class GlmDecoderLayer(LlamaDecoderLayer):
    """Llama's block with interleaved partial RoPE (tables of the first R features), q/k/v biases
    and the fused MLP."""

    interleaved_rotary = True

    def make_mlp(self, c: GlmConfig) -> nn.Module:
        return GlmMLP(c)


class Glm4DecoderLayer(GlmDecoderLayer):
    """GLM's block with a norm on each sublayer's output, inside the residual."""

    def __init__(self, c: GlmConfig, layer_idx: int):
        super().__init__(c, layer_idx)
        self.post_self_attn_layernorm = self.make_norm(c, c.hidden_size)
        self.post_mlp_layernorm = self.make_norm(c, c.hidden_size)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        x = x + self.post_self_attn_layernorm(self.attend(self.input_layernorm(x), mask, rotary, cache))  # (B, L, E)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class GlmForCausalLM(LlamaForCausalLM):
    """A GLM decoder with its LM head: Llama's skeleton and hooks, with GLM's layers."""

    layer_class = GlmDecoderLayer


@dataclass(frozen=True)
class Glm4Config(GlmConfig):
    """transformers' Glm4Config: GlmConfig's fields and defaults."""


class Glm4ForCausalLM(GlmForCausalLM):
    """A GLM-4 decoder with its LM head: GLM's, with post-sublayer norms."""

    layer_class = Glm4DecoderLayer


def hf_plan(c: GlmConfig) -> Plan:
    """Llama's plan (llama.hf_plan) with the MLP's stored gate_up_proj (2 FF, E) instead of
    gate_proj and up_proj."""
    plan = dict(llama_plan(c))
    E, FF = Dim(c.hidden_size, "hidden_size"), c.intermediate_size
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        del plan[p + "gate_proj.weight"], plan[p + "up_proj.weight"]
        plan[p + "gate_up_proj.weight"] = (Piece(p + "gate_up_proj.weight", (2 * FF, E)),)
    return plan


def glm4_plan(c: GlmConfig) -> Plan:
    """GLM's plan and the post-sublayer norms of each layer."""
    E = Dim(c.hidden_size, "hidden_size")
    return {**hf_plan(c), **per_layer(c, {"post_self_attn_layernorm.weight": (E,), "post_mlp_layernorm.weight": (E,)})}


FAMILY = Family(architectures=("GlmForCausalLM",), model_type="glm", config=GlmConfig,
                model=GlmForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)
GLM4_FAMILY = Family(architectures=("Glm4ForCausalLM",), model_type="glm4", config=Glm4Config,
                     model=Glm4ForCausalLM, plan=glm4_plan, layers=hf_layers, ignored=hf_ignored)

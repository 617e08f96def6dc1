"""Gemma decoder (Gemma Team 2024, "Gemma: Open Models Based on Gemini Research and
Technology"), loading Hugging Face `GemmaForCausalLM` folders; the pieces Gemma 2 and Gemma 3
(gemma2.py, gemma3.py) build on.

A Llama (llama.py) with four twists:

- token embeddings are multiplied by sqrt(hidden_size), rounded to the model's dtype first, as
  transformers does (in bfloat16, sqrt(3072) = 55.43 becomes 55.5);
- RMSNorm scales by (1 + weight), not weight, and computes in float32 up to the final cast
  (Llama casts back before scaling); a zero weight is the identity scale;
- the feed-forward is GeGLU (Shazeer 2020, "GLU Variants Improve Transformer"): gelu with the
  tanh approximation as the gate's activation;
- the head size `head_dim` is its own field (Gemma 7B: 16 heads of 256 over a hidden size of
  3072), and the LM head is tied to the embeddings.

Weight names are Llama's (no MLP biases), so `hf_plan` is Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .common import ACTIVATION, Family, activation
from .fields import Fields, read_dataclass
from .llama import (
    CLASSIC_KINDS,
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaLikeForCausalLM,
    LlamaMLP,
    LlamaModel,
    _read_rope,
    hf_ignored,
    hf_layers,
    hf_plan,
)


def refuse_bidirectional(f: Fields, family: str) -> None:
    """use_bidirectional_attention=true (EmbeddingGemma-style encoders) lets every token see the later ones."""
    if f.get("use_bidirectional_attention", Optional[bool], None):
        raise f.unsupported("use_bidirectional_attention", f"qkv's {family} is a causal decoder (each token sees "
                            f"itself and the tokens before it); bidirectional Gemma encoders are not run; set it "
                            f"to false or null")


@dataclass(frozen=True)
class GemmaConfig(LlamaConfig):
    # transformers' GemmaConfig defaults (Gemma 7B), for fields a config.json leaves out
    vocab_size: int = 256000  # SentencePiece vocabulary
    hidden_size: int = 3072  # E
    intermediate_size: int = 24576  # GeGLU inner size
    num_hidden_layers: int = 28  # decoder blocks
    num_attention_heads: int = 16  # Hq
    num_key_value_heads: Optional[int] = 16  # Hkv (Gemma 2B: 1, multi-query)
    head_dim: Optional[int] = 256  # D, not hidden_size / num_attention_heads (3072 / 16 = 192)
    hidden_act: str = "gelu_pytorch_tanh"  # the GeGLU gate; "gelu" means this too (transformers 5 maps it)
    max_position_embeddings: int = 8192  # the longest sequence qkv will run
    tie_word_embeddings: bool = True  # lm_head is embed_tokens' weight
    bos_token_id: Optional[int] = 2  # <bos>
    eos_token_id: Optional[Union[int, list[int]]] = 1  # <eos>
    # rms_norm_eps, rope_theta (10000), rope_scaling, attention_bias, attention_dropout: as Llama's.
    # mlp_bias is not a Gemma field: transformers' Gemma MLP has no biases, whatever config.json says.

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        refuse_bidirectional(f, "Gemma")
        out = {**read_dataclass(cls, f, limits=cls.LIMITS, skip=("rope_scaling", "mlp_bias")),
               **_read_rope(f, kinds=CLASSIC_KINDS)}
        if out.get("hidden_act") == "gelu":
            # The released Gemma configs say "gelu" but were trained with the tanh approximation;
            # transformers 5's GemmaConfig replaces it (with a warning), and so does qkv.
            out["hidden_act"] = "gelu_pytorch_tanh"
        # transformers 4 ran `hidden_activation` (null: gelu_pytorch_tanh) and ignored hidden_act;
        # transformers 5 runs hidden_act. Where both are given they must agree.
        legacy = f.get("hidden_activation", Optional[str], None, ACTIVATION)
        act = out.get("hidden_act", cls.hidden_act)
        if legacy is not None and legacy != act:
            raise f.unsupported("hidden_activation", f"it disagrees with hidden_act (the activation {act!r}): "
                                f"transformers 4 runs hidden_activation, transformers 5 runs hidden_act; set both "
                                f"to the activation the model was trained with")
        return out

    @property
    def mlp_activation(self) -> str:
        """The name of the GeGLU gate's activation."""
        return self.hidden_act


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + weight), all in float32 (float64 stays
    float64), cast to x's dtype at the end. Weights are stored as offsets from 1."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x (..., dim) -> (..., dim)."""
        h = x if x.dtype == torch.float64 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.to(h.dtype))).to(x.dtype)


class GemmaMLP(LlamaMLP):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)); Llama's projections, no biases."""

    def __init__(self, c: GemmaConfig):
        super().__init__(c)
        self._act = activation(c.mlp_activation)


class GemmaDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm block (same forward) with Gemma's norms (the final norm's too) and GeGLU."""

    @classmethod
    def make_norm(cls, c: GemmaConfig, dim) -> nn.Module:
        return GemmaRMSNorm(dim, c.rms_norm_eps)

    def make_mlp(self, c: GemmaConfig) -> nn.Module:
        return GemmaMLP(c)


class GemmaModel(LlamaModel):
    """Llama's model (embeddings, blocks `layer(config, i)`, final norm, RoPE) with Gemma's layers."""

    def __init__(self, c: GemmaConfig, layer: type = GemmaDecoderLayer):
        super().__init__(c, layer)


def scaled_embedding(embedding: nn.Embedding, input_ids: Tensor) -> Tensor:
    """Gemma's token embeddings: (B, L) -> (B, L, E) times sqrt(E). transformers keeps sqrt(E) in a
    float32 buffer and casts it to the weights' dtype before multiplying, so in bfloat16 the
    factor itself is rounded (sqrt(3072) -> 55.5); qkv rounds it the same way."""
    x = embedding(input_ids)  # (B, L, E)
    scale = torch.tensor(embedding.embedding_dim ** 0.5, dtype=torch.float32).to(x.dtype)  # ()
    return x * scale.to(x.device)


class GemmaForCausalLM(LlamaLikeForCausalLM):
    """A Gemma decoder with its (tied) LM head (`CausalLM`: `forward`, `hidden`, `generate`,
    `complete`): Llama's skeleton without length-dependent RoPE, with scaled embeddings. Gemma 2/3's
    sliding layers cache only what their window reaches (`window_cache`); global layers all."""

    layer_class: type = GemmaDecoderLayer  # the block Gemma 2 and 3 replace
    model_class: type = GemmaModel  # Gemma 3 adds the local layers' RoPE

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = scaled_embedding(self.model.embed_tokens, input_ids)  # (B, L, E)
        return x, self.model.rotary_emb(positions, dtype=x.dtype)  # cos, sin (L, D) or (B, 1, L, D)


# Checkpoint names are Llama's: q/k/v fused into self_attn.qkv_proj, o_proj -> out_proj, biases
# where attention_bias says, no MLP biases (mlp_bias keeps its default false).
FAMILY = Family(architectures=("GemmaForCausalLM",), model_type="gemma", config=GemmaConfig,
                model=GemmaForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

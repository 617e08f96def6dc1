"""StableLM decoder (Stability AI: "StableLM-3B-4E1T" technical report, Tow et al. 2023;
Bellagente et al. 2024, "Stable LM 2 1.6B Technical Report"), loading Hugging Face
`StableLmForCausalLM` folders.

Grouped-query attention and a SwiGLU MLP as Llama's. What differs from Llama:

- LayerNorm with a bias (`layer_norm_eps`) instead of RMSNorm;
- partial rotary embeddings (GPT-NeoX's, Black et al. 2022): only the first
  R = int(head_dim * partial_rotary_factor) features of each head are rotated (default 25%),
  the rest pass through (`RotaryEmbedding(R)`, which `apply_rotary` applies to the first R);
- `use_qkv_bias`: biases on the q, k, v projections (never on o_proj);
- `qk_layernorm` (Stable LM 2 12B): queries and keys are normalised per head before RoPE, each
  head with its own LayerNorm weight (no bias), stored as `q_layernorm.norms.{h}.weight`;
- `use_parallel_residual`: attention and MLP both read the same normed input,
  x + attn(ln(x)) + mlp(ln(x)) (GPT-J, Wang & Komatsuzaki 2021), with no second norm;
- head_dim is always hidden_size / num_attention_heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import KVCache, MultiHeadAttention
from .checkpoint import Dim, ModelError, Piece, Plan
from .common import ACTIVATION, Family
from .fields import (
    EPS,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_REAL,
    PROBABILITY,
    Fields,
    HFConfig,
    check_divisible,
    read_dataclass,
)
from .llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    _read_rope,
    attention_plan,
    hf_layers,
    mlp_plan,
    norms_plan,
    outer_plan,
)
from .llama import tied_head_ignored as hf_ignored


@dataclass(frozen=True)
class StableLmConfig(HFConfig):
    # transformers' StableLmConfig defaults (stablelm-3b-4e1t), for fields a config.json leaves out
    vocab_size: int = 50304
    hidden_size: int = 2560  # E
    intermediate_size: int = 6912  # SwiGLU inner size
    num_hidden_layers: int = 32  # decoder blocks
    num_attention_heads: int = 32  # Hq; head_dim = E / Hq
    num_key_value_heads: int = 32  # Hkv
    hidden_act: str = "silu"  # the gate's activation in SwiGLU
    max_position_embeddings: int = 4096  # the longest sequence qkv will run
    layer_norm_eps: float = 1e-5  # every LayerNorm's eps, the per-head q/k norms' too
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Optional[dict] = None  # rope_parameters/rope_scaling ("linear", "llama3"), as Llama's
    partial_rotary_factor: float = 0.25  # the fraction of each head that is rotated
    use_qkv_bias: bool = False  # bias on q/k/v (o_proj never has one)
    qk_layernorm: bool = False  # per-head LayerNorm on queries and keys
    use_parallel_residual: bool = False  # x + attn(ln(x)) + mlp(ln(x)), one norm per block
    hidden_dropout: float = 0.0  # dropout on the MLP's output, training only
    attention_dropout: float = 0.0  # dropout on attention weights, training only
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[Union[int, list[int]]] = 0

    LIMITS = {
        "vocab_size": POSITIVE, "hidden_size": POSITIVE, "intermediate_size": POSITIVE, "num_hidden_layers": POSITIVE,
        "num_attention_heads": POSITIVE, "num_key_value_heads": POSITIVE, "hidden_act": ACTIVATION,
        "max_position_embeddings": POSITIVE, "layer_norm_eps": EPS, "rope_theta": POSITIVE_REAL,
        "hidden_dropout": PROBABILITY, "attention_dropout": PROBABILITY,
        "bos_token_id": NON_NEGATIVE, "eos_token_id": NON_NEGATIVE,
    }

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        """As Llama's (rope_scaling if non-empty, else rope_parameters, + rope_theta), plus
        partial_rotary_factor, which transformers reads from that rope dict first, then from the
        top level (`_read_rope(partial=True)`)."""
        out = read_dataclass(cls, f, limits=cls.LIMITS, skip=("rope_scaling", "partial_rotary_factor"))
        return {**out, **_read_rope(f, cls, partial=True)}

    def check(self, source) -> None:
        check_divisible(source, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(
                f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
                f"{self.num_key_value_heads}; correct one of them (each key/value head serves a whole group of "
                f"query heads)"
            )
        R = self.rotary_dim
        if R < 2 or R % 2:
            raise ModelError(
                f"{source}: partial_rotary_factor={self.partial_rotary_factor:g} rotates int({self.dim_per_head} * "
                f"{self.partial_rotary_factor:g}) = {R} features of each head; rotary embeddings rotate pairs, so "
                f"that must be even and at least 2 (transformers cannot run it either); correct the factor"
            )

    # what the Llama modules reused here read
    kv_heads = property(lambda self: self.num_key_value_heads)
    dim_per_head = property(lambda self: self.hidden_size // self.num_attention_heads)
    mlp_bias = property(lambda self: False)  # StableLM's MLP has no biases
    qkv_bias = property(lambda self: self.use_qkv_bias)
    out_bias = property(lambda self: False)  # o_proj never has a bias

    def window(self, layer: int) -> Optional[tuple[int, int]]:
        return None  # StableLM attends to every earlier token

    @property
    def rotary_dim(self) -> int:
        """R: the features of each head that are rotated (transformers rounds down)."""
        return int(self.dim_per_head * self.partial_rotary_factor)


class StableLmLayerNormPerHead(nn.Module):
    """A LayerNorm (no bias) per head, as transformers stores them (`norms.{h}.weight`):
    x (B, L, H, D) -> (B, L, H, D), head h normalised over D with its own weight."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps, bias=False) for _ in range(num_heads))

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([norm(x[:, :, h]) for h, norm in enumerate(self.norms)], dim=2)  # (B, L, H, D)


class StableLmDecoderLayer(LlamaDecoderLayer):
    """x + attn(ln1(x)), then + mlp(ln2(x)); or, with use_parallel_residual, x + attn(ln1(x)) + mlp(ln1(x))."""

    def __init__(self, c: StableLmConfig, layer_idx: int):
        super().__init__(c, layer_idx)
        self.use_parallel_residual = c.use_parallel_residual
        if c.use_parallel_residual:
            self.post_attention_layernorm = None  # one norm per block
        self.hidden_dropout = c.hidden_dropout

    @classmethod
    def make_norm(cls, c: StableLmConfig, dim) -> nn.Module:
        return nn.LayerNorm(dim, eps=c.layer_norm_eps)

    def make_attention(self, c: StableLmConfig, **extra) -> MultiHeadAttention:
        D = c.dim_per_head
        q_norm = StableLmLayerNormPerHead(D, c.num_attention_heads, c.layer_norm_eps) if c.qk_layernorm else None
        k_norm = StableLmLayerNormPerHead(D, c.kv_heads, c.layer_norm_eps) if c.qk_layernorm else None
        return super().make_attention(c, q_norm=q_norm, k_norm=k_norm, **extra)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions, (..., R)."""
        h = self.input_layernorm(x)
        a = self.attend(h, mask, rotary, cache)
        if self.use_parallel_residual:
            return x + a + F.dropout(self.mlp(h), self.hidden_dropout, self.training)
        x = x + a
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), self.hidden_dropout, self.training)


class StableLmForCausalLM(LlamaForCausalLM):
    """A StableLM decoder with its LM head: Llama's skeleton and hooks, with StableLM's layers
    (LayerNorms; RoPE tables of the R rotated features, which apply_rotary applies to the first R
    of each head)."""

    layer_class = StableLmDecoderLayer


def hf_plan(c: StableLmConfig) -> Plan:
    """Checkpoint names of a Hugging Face StableLmForCausalLM -> qkv parameter names (pure).

    q_proj, k_proj, v_proj (and their biases) are concatenated (rows q | k | v) into
    `self_attn.qkv_proj`; o_proj becomes `self_attn.out_proj`; the per-head norms
    `self_attn.q_layernorm`/`k_layernorm` become `self_attn.q_norm`/`k_norm`.
    """
    E, D = Dim(c.hidden_size, "hidden_size"), c.dim_per_head
    plan = outer_plan(c, norm_bias=True)
    norms = ("input_layernorm",) if c.use_parallel_residual else ("input_layernorm", "post_attention_layernorm")
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.update(attention_plan(p, c, E, qkv_bias=c.use_qkv_bias, out_bias=False))
        if c.qk_layernorm:
            for ours, theirs, heads in (("q_norm", "q_layernorm", c.num_attention_heads),
                                        ("k_norm", "k_layernorm", c.kv_heads)):
                for h in range(heads):
                    plan[p + f"self_attn.{ours}.norms.{h}.weight"] = (
                        Piece(p + f"self_attn.{theirs}.norms.{h}.weight", (D,)),)
        plan.update(mlp_plan(p, c))
        plan.update(norms_plan(p, E, norms, bias=True))
    return plan


FAMILY = Family(architectures=("StableLmForCausalLM",), model_type="stablelm", config=StableLmConfig,
                model=StableLmForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

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

from ..nn import KVCache, MultiHeadAttention, RotaryEmbedding
from .checkpoint import Dim, ModelError, Piece, Plan
from .common import ACTIVATION, Family
from .decoder import CausalLM
from .fields import (
    EPS,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_REAL,
    PROBABILITY,
    Fields,
    HFConfig,
    Limit,
    check_divisible,
    read_dataclass,
)
from .llama import LlamaForCausalLM, LlamaMLP, _read_rope

FACTOR = Limit(lo=0, hi=1, lo_open=True)  # a fraction of the head that is rotated


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
        "partial_rotary_factor": FACTOR, "hidden_dropout": PROBABILITY, "attention_dropout": PROBABILITY,
        "bos_token_id": NON_NEGATIVE, "eos_token_id": NON_NEGATIVE,
    }

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        """As Llama's (rope_parameters or rope_scaling + rope_theta), plus partial_rotary_factor,
        which transformers reads from rope_parameters first, then from the top level."""
        factor = cls.partial_rotary_factor
        rope_name = "rope_parameters" if f.data.get("rope_parameters") is not None else "rope_scaling"
        rope = f.sub(rope_name)
        for g in (rope, f):  # the first that has it wins
            if g is not None and "partial_rotary_factor" in g:
                factor = g.get("partial_rotary_factor", float, limit=FACTOR)
                break
        # Llama's reader refuses a partial rotation, so it reads the rope fields without that one
        data = {k: v for k, v in f.data.items() if k != "partial_rotary_factor"}
        if rope is not None:
            data[rope_name] = {k: v for k, v in rope.data.items() if k != "partial_rotary_factor"}
        rest = Fields(data, f.source, prefix=f.prefix, fix=f.fix)
        out = read_dataclass(cls, rest, limits=cls.LIMITS, skip=("rope_scaling", "partial_rotary_factor"))
        return {**out, **_read_rope(rest), "partial_rotary_factor": factor}

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


class StableLmDecoderLayer(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(x)); or, with use_parallel_residual, x + attn(ln1(x)) + mlp(ln1(x))."""

    def __init__(self, c: StableLmConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.use_parallel_residual = c.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        D = c.dim_per_head
        q_norm = StableLmLayerNormPerHead(D, c.num_attention_heads, c.layer_norm_eps) if c.qk_layernorm else None
        k_norm = StableLmLayerNormPerHead(D, c.kv_heads, c.layer_norm_eps) if c.qk_layernorm else None
        self.self_attn = MultiHeadAttention(
            c.hidden_size, c.num_attention_heads, num_kv_heads=c.kv_heads, head_dim=D, bias=c.use_qkv_bias,
            out_bias=False, dropout=c.attention_dropout, q_norm=q_norm, k_norm=k_norm,
        )
        self.window = None  # StableLM attends to every earlier token
        self.post_attention_layernorm = (None if c.use_parallel_residual
                                         else nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps))
        self.mlp = LlamaMLP(c)
        self.hidden_dropout = c.hidden_dropout

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions, (..., R)."""
        h = self.input_layernorm(x)
        a = self.self_attn(h, mask=mask, causal=True, window=self.window, rotary=rotary, cache=cache,
                           layer=self.layer_idx)
        if self.use_parallel_residual:
            return x + a + F.dropout(self.mlp(h), self.hidden_dropout, self.training)
        x = x + a
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), self.hidden_dropout, self.training)


class StableLmModel(nn.Module):
    def __init__(self, c: StableLmConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(StableLmDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        # tables of R features: apply_rotary rotates the first R of each head, leaves the rest
        self.rotary_emb = RotaryEmbedding(c.rotary_dim, c.rope_theta, rope_scaling=c.rope_scaling)


class StableLmForCausalLM(LlamaForCausalLM):
    """A StableLM decoder with its LM head: Llama's hooks over StableLM's body."""

    def __init__(self, config: StableLmConfig):
        CausalLM.__init__(self, config)  # not Llama's body: StableLM's
        self.model = StableLmModel(config)
        self.add_lm_head(config.hidden_size, config.vocab_size)


def hf_plan(c: StableLmConfig) -> Plan:
    """Checkpoint names of a Hugging Face StableLmForCausalLM -> qkv parameter names (pure).

    q_proj, k_proj, v_proj (and their biases) are concatenated (rows q | k | v) into
    `self_attn.qkv_proj`; o_proj becomes `self_attn.out_proj`; the per-head norms
    `self_attn.q_layernorm`/`k_layernorm` become `self_attn.q_norm`/`k_norm`.
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
        if c.use_qkv_bias:
            plan[p + "self_attn.qkv_proj.bias"] = (
                Piece(p + "self_attn.q_proj.bias", (q_out,)),
                Piece(p + "self_attn.k_proj.bias", (kv_out,)),
                Piece(p + "self_attn.v_proj.bias", (kv_out,)),
            )
        plan[p + "self_attn.out_proj.weight"] = (Piece(p + "self_attn.o_proj.weight", (E, q_out)),)
        if c.qk_layernorm:
            for ours, theirs, heads in (("q_norm", "q_layernorm", c.num_attention_heads),
                                        ("k_norm", "k_layernorm", c.kv_heads)):
                for h in range(heads):
                    plan[p + f"self_attn.{ours}.norms.{h}.weight"] = (
                        Piece(p + f"self_attn.{theirs}.norms.{h}.weight", (D,)),)
        for name, shape in (("gate_proj", (FF, E)), ("up_proj", (FF, E)), ("down_proj", (E, FF))):
            plan[p + f"mlp.{name}.weight"] = (Piece(p + f"mlp.{name}.weight", shape),)
        norms = ("input_layernorm",) if c.use_parallel_residual else ("input_layernorm", "post_attention_layernorm")
        for norm in norms:
            for part in ("weight", "bias"):
                plan[p + f"{norm}.{part}"] = (Piece(p + f"{norm}.{part}", (E,)),)
    return plan


def hf_layers(c: StableLmConfig) -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning."""
    return [("num_hidden_layers", c.num_hidden_layers, "model.layers.")]


def hf_ignored(c: StableLmConfig) -> dict:
    """A tied lm_head.weight may be saved as a copy of the embeddings."""
    return {"lm_head.weight": (c.vocab_size, c.hidden_size)} if c.tie_word_embeddings else {}


FAMILY = Family(architectures=("StableLmForCausalLM",), model_type="stablelm", config=StableLmConfig,
                model=StableLmForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

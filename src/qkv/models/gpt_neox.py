"""GPT-NeoX decoder (Black et al. 2022, "GPT-NeoX-20B: An Open-Source Autoregressive Language
Model"; the Pythia suite, Biderman et al. 2023), loading Hugging Face `GPTNeoXForCausalLM` folders.

Pre-LayerNorm blocks like GPT-2's, with three differences:

- parallel residual (as GPT-J): x + attn(ln1(x)) + mlp(ln2(x)), both branches reading the same
  x; `use_parallel_residual: false` runs them one after the other, as GPT-2 does;
- rotary position embeddings (Su et al. 2021) in Llama's half-split layout on the first
  R = head_size * partial_rotary_factor features of each head only (Pythia: a quarter), the
  rest passing through unrotated; no learned positions;
- one fused projection `attention.query_key_value` stored per head, [q_h | k_h | v_h] for each
  head h, where qkv's fused `qkv_proj` holds [q | k | v]: the plan regroups its rows at load
  time (`Piece(regroup=(H, 3))`, checkpoint.py), so the attention is a plain
  `MultiHeadAttention` (`attention.qkv_proj`, `attention.out_proj` from `attention.dense`).

The LM head is its own matrix (`embed_out` in the Pythia checkpoints, `lm_head` as
transformers 5 saves it) unless `tie_word_embeddings`. Names are Hugging Face's otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor, nn

from ..nn import KVCache, MultiHeadAttention, RotaryEmbedding
from .checkpoint import Dim, ModelError, Piece, Plan
from .common import ACTIVATION, Family, activation
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
from .llama import read_classic_scaling

FRACTION = Limit(lo=0, hi=1)  # partial_rotary_factor: the share of each head that is rotated


@dataclass(frozen=True)
class GPTNeoXConfig(HFConfig):
    # transformers' GPTNeoXConfig defaults (GPT-NeoX-20B), for fields a config.json leaves out
    vocab_size: int = 50432
    hidden_size: int = 6144  # E
    num_hidden_layers: int = 44  # blocks
    num_attention_heads: int = 64  # H; the head size D = E / H
    intermediate_size: int = 24576  # MLP inner size
    hidden_act: str = "gelu"  # the MLP's activation
    attention_dropout: float = 0.0  # dropout on attention weights, training mode only
    hidden_dropout: float = 0.0  # dropout on the embeddings and on each branch's output, training mode only
    max_position_embeddings: int = 2048  # the longest sequence qkv will run
    layer_norm_eps: float = 1e-5  # LayerNorm eps
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[Union[int, list[int]]] = 2  # generation stops here (a list: at any); None = never
    tie_word_embeddings: bool = False  # the LM head shares embed_in's weight
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)); false: attention, then the MLP
    attention_bias: bool = True  # bias on query_key_value and dense
    # RoPE, read from rope_parameters (transformers 5), rope_scaling, or rotary_emb_base / rotary_pct
    rope_theta: float = 10000.0  # base (rotary_emb_base)
    partial_rotary_factor: float = 0.25  # share of each head rotated (rotary_pct)
    rope_scaling: Optional[dict] = None  # None = default RoPE; {"rope_type": "linear" | "llama3", ...}

    LIMITS = {  # config.json ranges; a field not listed has no range beyond its type
        "vocab_size": POSITIVE, "hidden_size": POSITIVE, "num_hidden_layers": POSITIVE,
        "num_attention_heads": POSITIVE, "intermediate_size": POSITIVE, "hidden_act": ACTIVATION,
        "attention_dropout": PROBABILITY, "hidden_dropout": PROBABILITY, "max_position_embeddings": POSITIVE,
        "layer_norm_eps": EPS, "bos_token_id": NON_NEGATIVE, "eos_token_id": NON_NEGATIVE,
    }

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        rope = ("rope_theta", "partial_rotary_factor", "rope_scaling")
        return {**read_dataclass(cls, f, limits=cls.LIMITS, skip=rope), **_read_rope(f)}

    def check(self, source) -> None:
        check_divisible(source, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        if self.rotary_dim % 2:
            raise ModelError(
                f"{source}: partial_rotary_factor={self.partial_rotary_factor:g} of a head of {self.head_size} "
                f"features rotates {self.rotary_dim}, an odd number; rotary embeddings rotate pairs of features, "
                f"so choose a factor that gives an even count (rotary_pct or rope_parameters.partial_rotary_factor)"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """R: the features rotated at the start of each head, int(D * partial_rotary_factor) as transformers."""
        return int(self.head_size * self.partial_rotary_factor)


def _read_rope(f: Fields) -> dict:
    """rope_theta, partial_rotary_factor and rope_scaling as transformers 5.24 reads a GPT-NeoX
    config: the `rope_scaling` object if non-empty, else `rope_parameters`; within it
    `rope_theta` and `partial_rotary_factor`, else the old top-level `rotary_emb_base` and
    `rotary_pct`, else 10000 and 0.25. A top-level `rope_theta` or `partial_rotary_factor`
    that transformers would ignore is refused when it disagrees with the value used."""
    out: dict = {}
    name = "rope_scaling" if f.data.get("rope_scaling") else "rope_parameters"
    rope = f.sub(name)
    if "rotary_emb_base" in f:
        out["rope_theta"] = f.get("rotary_emb_base", float, limit=POSITIVE_REAL)
    if "rotary_pct" in f:
        out["partial_rotary_factor"] = f.get("rotary_pct", float, limit=FRACTION)
    if rope is not None and "rope_theta" in rope:
        out["rope_theta"] = rope.get("rope_theta", float, limit=POSITIVE_REAL)
    if rope is not None and "partial_rotary_factor" in rope:
        out["partial_rotary_factor"] = rope.get("partial_rotary_factor", float, limit=FRACTION)
    for top, used in (("rope_theta", out.get("rope_theta", GPTNeoXConfig.rope_theta)),
                      ("partial_rotary_factor", out.get("partial_rotary_factor", GPTNeoXConfig.partial_rotary_factor))):
        if top in f and f.get(top, float) != used:
            where = {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}[top]
            raise f.unsupported(top, f"transformers reads GPT-NeoX's {top} from {name}.{top} or {where} (here "
                                f"{used:g}) and ignores a top-level {top}; put the value meant in {name}")
    if rope is None:
        return out
    # original_max_position_embeddings: transformers' default is max_position_embeddings
    scaling = read_classic_scaling(rope, f.get("max_position_embeddings", int, GPTNeoXConfig.max_position_embeddings,
                                               POSITIVE))
    if scaling is not None:
        out["rope_scaling"] = scaling
    return out


class GPTNeoXMLP(nn.Module):
    def __init__(self, c: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, c.intermediate_size)
        self.dense_4h_to_h = nn.Linear(c.intermediate_size, c.hidden_size)
        self._act = activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(self._act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, c: GPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.use_parallel_residual = c.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.post_attention_dropout = nn.Dropout(c.hidden_dropout)
        self.post_mlp_dropout = nn.Dropout(c.hidden_dropout)
        self.attention = MultiHeadAttention(c.hidden_size, c.num_attention_heads, bias=c.attention_bias,
                                            dropout=c.attention_dropout)
        self.mlp = GPTNeoXMLP(c)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: Optional[tuple[Tensor, Tensor]],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions, R wide."""
        attn = self.post_attention_dropout(self.attention(self.input_layernorm(x), mask=mask, causal=True,
                                                          rotary=rotary, cache=cache, layer=self.layer_idx))
        if self.use_parallel_residual:  # both branches read x
            return x + attn + self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))
        x = x + attn
        return x + self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))


class GPTNeoXModel(nn.Module):
    def __init__(self, c: GPTNeoXConfig):
        super().__init__()
        self.embed_in = nn.Embedding(c.vocab_size, c.hidden_size)
        self.emb_dropout = nn.Dropout(c.hidden_dropout)
        self.layers = nn.ModuleList(GPTNeoXLayer(c, i) for i in range(c.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        # RoPE on the first R features of each head (apply_rotary leaves the rest); R = 0: none
        self.rotary_emb = (RotaryEmbedding(c.rotary_dim, c.rope_theta, rope_scaling=c.rope_scaling)
                           if c.rotary_dim else None)


class GPTNeoXForCausalLM(CausalLM):
    """A GPT-NeoX decoder with its LM head (`CausalLM`: `forward`, `hidden`, `generate`, `complete`)."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.add_lm_head(config.hidden_size, config.vocab_size)

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
        m = self.gpt_neox
        x = m.emb_dropout(m.embed_in(input_ids))  # (B, L, E)
        rotary = m.rotary_emb(positions, dtype=x.dtype) if m.rotary_emb is not None else None
        return x, rotary  # cos, sin (L, R) or (B, 1, L, R)

    blocks = property(lambda self: self.gpt_neox.layers)
    final_norm = property(lambda self: self.gpt_neox.final_layer_norm)
    token_embedding = property(lambda self: self.gpt_neox.embed_in)

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.num_hidden_layers, c.num_attention_heads, c.head_size


def hf_plan(c: GPTNeoXConfig, head: str = "embed_out.weight") -> Plan:
    """Checkpoint names of a Hugging Face GPTNeoXForCausalLM -> qkv parameter names (pure).

    `attention.query_key_value` (3E, E), rows per head [q_h | k_h | v_h], becomes
    `attention.qkv_proj` with its rows regrouped to [q | k | v]; `attention.dense` becomes
    `attention.out_proj`. `head` is the LM head's key: "embed_out.weight" (the Pythia and
    GPT-NeoX-20B checkpoints) or "lm_head.weight" (as transformers 5 saves it).
    """
    E, FF, V = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size"), Dim(c.vocab_size,
                                                                                                   "vocab_size")
    H = c.num_attention_heads
    plan: dict[str, tuple[Piece, ...]] = {
        "gpt_neox.embed_in.weight": (Piece("gpt_neox.embed_in.weight", (V, E)),),
        "gpt_neox.final_layer_norm.weight": (Piece("gpt_neox.final_layer_norm.weight", (E,)),),
        "gpt_neox.final_layer_norm.bias": (Piece("gpt_neox.final_layer_norm.bias", (E,)),),
    }
    for i in range(c.num_hidden_layers):
        p = f"gpt_neox.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for kind in ("weight", "bias"):
                plan[p + f"{norm}.{kind}"] = (Piece(p + f"{norm}.{kind}", (E,)),)
        plan[p + "attention.qkv_proj.weight"] = (
            Piece(p + "attention.query_key_value.weight", (3 * c.hidden_size, E), regroup=(H, 3)),)
        plan[p + "attention.out_proj.weight"] = (Piece(p + "attention.dense.weight", (E, E)),)
        if c.attention_bias:
            plan[p + "attention.qkv_proj.bias"] = (
                Piece(p + "attention.query_key_value.bias", (3 * c.hidden_size,), regroup=(H, 3)),)
            plan[p + "attention.out_proj.bias"] = (Piece(p + "attention.dense.bias", (E,)),)
        for name, shape in (("dense_h_to_4h", (FF, E)), ("dense_4h_to_h", (E, FF))):
            plan[p + f"mlp.{name}.weight"] = (Piece(p + f"mlp.{name}.weight", shape),)
            plan[p + f"mlp.{name}.bias"] = (Piece(p + f"mlp.{name}.bias", (shape[0],)),)
    if not c.tie_word_embeddings:
        plan["lm_head.weight"] = (Piece(head, (V, E)),)
    return plan


def hf_layers(c: GPTNeoXConfig, head: str = "embed_out.weight") -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning."""
    return [("num_hidden_layers", c.num_hidden_layers, "gpt_neox.layers.")]


def hf_ignored(c: GPTNeoXConfig, head: str = "embed_out.weight") -> dict:
    """Keys that are not weights: older checkpoints store each layer's causal mask
    (`attention.bias`, bool), `attention.masked_bias` and RoPE's `rotary_emb.inv_freq`, and a
    tied head may be saved as a copy of embed_in."""
    out: dict = {}
    for i in range(c.num_hidden_layers):
        p = f"gpt_neox.layers.{i}.attention."
        out[p + "bias"] = None
        out[p + "masked_bias"] = None
        out[p + "rotary_emb.inv_freq"] = ((c.rotary_dim + 1) // 2,)
    if c.tie_word_embeddings:
        out[head] = (c.vocab_size, c.hidden_size)
    return out


def _adapt(c: GPTNeoXConfig, keys) -> tuple[GPTNeoXConfig, tuple]:
    """The LM head is `embed_out` in the released checkpoints and `lm_head` as transformers 5 saves it."""
    return c, ("lm_head.weight" if "lm_head.weight" in keys else "embed_out.weight",)


FAMILY = Family(architectures=("GPTNeoXForCausalLM",), model_type="gpt_neox", config=GPTNeoXConfig,
                model=GPTNeoXForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored, adapt=_adapt)

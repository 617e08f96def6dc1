"""Llama-family decoder (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language
Models"; Llama 2/3 add grouped-query attention), loading Hugging Face `LlamaForCausalLM` folders.

Pre-norm blocks with RMSNorm (Zhang & Sennrich 2019), a SwiGLU feed-forward (Shazeer 2020),
rotary position embeddings (Su et al. 2021) in the Llama half-split layout, and grouped-query
attention (Ainslie et al. 2023). Names are Hugging Face's; q_proj/k_proj/v_proj are fused into
`self_attn.qkv_proj` and o_proj is `self_attn.out_proj`, mapped by `hf_plan`. The decoder
skeleton is `CausalLM` (decoder.py); Llama-like families (mistral.py, qwen2.py) subclass the
config and change its hooks (`qkv_bias`, `out_bias`, `window`, `rotary_dim`). Families whose
blocks differ subclass `LlamaDecoderLayer` and override its construction hooks (`make_norm`,
`make_attention`, `make_mlp`, `interleaved_rotary`), set it as their model's `layer_class`, and
build their plans from the pieces of Llama's (`outer_plan`, `attention_plan`, `mlp_plan`, `kept`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
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
from .rope_length import LengthDependentRope


@dataclass(frozen=True)
class LlamaConfig(HFConfig):
    vocab_size: int = 32000  # SentencePiece vocabulary of Llama 1/2
    hidden_size: int = 4096  # E
    intermediate_size: int = 11008  # SwiGLU inner size
    num_hidden_layers: int = 32  # decoder blocks
    num_attention_heads: int = 32  # Hq
    num_key_value_heads: Optional[int] = None  # Hkv; None = Hq (no GQA)
    head_dim: Optional[int] = None  # D; None = hidden_size // num_attention_heads
    hidden_act: str = "silu"  # the gate's activation in SwiGLU
    max_position_embeddings: int = 2048  # the longest sequence qkv will run
    rms_norm_eps: float = 1e-6  # RMSNorm eps
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Optional[dict] = None  # typed rope dict (_read_rope): linear, dynamic, yarn, longrope, llama3
    attention_bias: bool = False  # bias on q/k/v/o projections
    mlp_bias: bool = False  # bias on gate/up/down projections
    attention_dropout: float = 0.0  # dropout on attention weights, training mode only
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight
    bos_token_id: Optional[int] = 1  # <s>
    eos_token_id: Optional[Union[int, list[int]]] = 2  # </s>; a list for several stop ids (Llama 3)

    LIMITS = {  # config.json ranges; a field not listed has no range beyond its type
        "vocab_size": POSITIVE, "hidden_size": POSITIVE, "intermediate_size": POSITIVE, "num_hidden_layers": POSITIVE,
        "num_attention_heads": POSITIVE, "num_key_value_heads": POSITIVE, "head_dim": POSITIVE,
        "hidden_act": ACTIVATION,
        "max_position_embeddings": POSITIVE, "rms_norm_eps": EPS, "rope_theta": POSITIVE_REAL,
        "attention_dropout": PROBABILITY, "bos_token_id": NON_NEGATIVE, "eos_token_id": NON_NEGATIVE,
    }

    # True for a family that rotates only part of each head (its config has a partial_rotary_factor
    # field, read from the rope dict first, then the top level): GLM
    PARTIAL_ROTARY = False

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        return {**read_dataclass(cls, f, limits=cls.LIMITS, skip=("rope_scaling", "partial_rotary_factor")),
                **_read_rope(f, cls, partial=cls.PARTIAL_ROTARY)}

    def check(self, source) -> None:
        if self.head_dim is None:
            check_divisible(source, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads,
                            "correct one of them, or set head_dim")
        if self.num_attention_heads % self.kv_heads:
            raise ModelError(
                f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
                f"{self.kv_heads}; correct one of them (each key/value head serves a whole group of query heads)"
            )
        if self.dim_per_head % 2:
            field = "head_dim" if self.head_dim is not None else "hidden_size / num_attention_heads"
            raise ModelError(f"{source}: {field}={self.dim_per_head} is odd; rotary embeddings rotate pairs of "
                             f"features, so the head size must be even; correct it")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """R, the rotated features of each head: Llama rotates whole heads (partial rotary families change it)."""
        return self.dim_per_head

    # What a Llama-like family changes (qwen2.py, mistral.py): biases and a sliding window.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def out_bias(self) -> bool:
        return self.attention_bias

    def window(self, layer: int) -> Optional[tuple[int, int]]:
        """`qkv.attention`'s window of a layer's causal self-attention: (left, 0), or None = all keys."""
        return None


# rope types qkv computes (nn.positions.rope_inv_freq): each key it reads -> (type, range, required),
# as transformers 5.24 reads them (modeling_rope_utils). original_max_position_embeddings, where a
# type reads it, defaults to max_position_embeddings, as transformers' standardize_rope_params does.
_ROPE_NEEDS: dict[str, dict[str, tuple]] = {
    "default": {},
    "linear": {"factor": (float, POSITIVE_REAL, True)},
    "dynamic": {"factor": (float, POSITIVE_REAL, True)},
    "yarn": {
        "factor": (Optional[float], POSITIVE_REAL, True),  # null: max_position_embeddings / original
        "original_max_position_embeddings": (int, POSITIVE, False),
        "attention_factor": (Optional[float], POSITIVE_REAL, False),  # null: from factor (and mscale)
        "beta_fast": (Optional[float], Limit(lo=0), False),  # null or 0: 32
        "beta_slow": (Optional[float], Limit(lo=0), False),  # null or 0: 1
        "mscale": (Optional[float], None, False),
        "mscale_all_dim": (Optional[float], None, False),
        "truncate": (bool, None, False),
    },
    "longrope": {
        "short_factor": (list[float], POSITIVE_REAL, True),  # one per rotated pair
        "long_factor": (list[float], POSITIVE_REAL, True),
        "original_max_position_embeddings": (int, POSITIVE, False),
        "factor": (Optional[float], POSITIVE_REAL, False),  # null: max_position_embeddings / original
        "attention_factor": (Optional[float], POSITIVE_REAL, False),  # null: from factor
    },
    "llama3": {
        "factor": (float, POSITIVE_REAL, True),
        "low_freq_factor": (float, POSITIVE_REAL, True),
        "high_freq_factor": (float, POSITIVE_REAL, True),
        "original_max_position_embeddings": (int, POSITIVE, False),
    },
}


# The rope types of the families whose rotary tables do not follow the length a pass reaches
# (not a `LengthDependentRope`: Gemma, Gemma 2, Gemma 3, GPT-NeoX), and the parameters each
# needs; dynamic, yarn and longrope are refused there.
CLASSIC_ROPE = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
CLASSIC_KINDS = {k: k for k in CLASSIC_ROPE}  # `_read_rope(kinds=)` for those families


def _read_rope(f: Fields, cls: Optional[type] = None, *, partial: bool = False,
               kinds: Optional[dict[str, str]] = None, original: Optional[int] = None) -> dict:
    """rope_theta and rope_scaling from `rope_scaling` (transformers 4, with a top-level
    rope_theta) or `rope_parameters` (transformers 5, theta inside), typed; rope types qkv does
    not compute are refused by name. As in transformers, a non-empty rope_scaling wins.

    Args:
        f: config.json.
        cls: the config class, whose defaults stand for absent size fields (default LlamaConfig).
        partial: read partial_rotary_factor (top level, or in the rope dict, which wins; else
            the class default) and return it; False refuses any value but 1 (Llama rotates whole
            heads). longrope's factor lists then hold one factor per rotated pair.
        kinds: rope type in the file -> the type qkv runs; default every type of _ROPE_NEEDS
            (Phi-3 allows default and longrope, and reads su and yarn as longrope).
        original: a top-level original_max_position_embeddings that replaces the rope dict's
            for the types llama3, yarn and longrope (Phi-3's config does this), or None.

    Returns:
        {"rope_theta"?, "rope_scaling", "partial_rotary_factor"?}: rope_scaling is None for the
        default type, else the typed dict `RotaryEmbedding` takes, with max_position_embeddings
        added where the type reads it (dynamic, yarn, longrope).
    """
    cls = cls or LlamaConfig
    kinds = kinds or {k: k for k in _ROPE_NEEDS}
    name = "rope_scaling" if f.get("rope_scaling", Optional[dict], None) else "rope_parameters"
    rope = f.sub(name)
    out: dict = {}
    # partial_rotary_factor, the share of each head that is rotated: the rope dict's, else the top level's
    holder = rope if rope is not None and "partial_rotary_factor" in rope else f
    fraction = _default(cls, "partial_rotary_factor", 1.0) if partial else 1.0  # the family's default
    rotated = holder.get("partial_rotary_factor", float, fraction, limit=Limit(lo=0, hi=1, lo_open=True))
    if rotated != 1.0 and not partial:
        raise holder.unsupported("partial_rotary_factor", "Llama rotates whole heads (transformers' Llama "
                                 "cannot run a partial rotation either); remove the field or set it to 1.0")
    if partial:
        out["partial_rotary_factor"] = rotated
    if rope is None:
        return out
    if "rope_theta" in rope:
        out["rope_theta"] = rope.get("rope_theta", float, limit=POSITIVE_REAL)
    kind_field = "rope_type" if "rope_type" in rope else "type"
    named = rope.get(kind_field, str, "default")
    if named not in kinds:
        runs = ", ".join(k for k in kinds if kinds[k] == k)
        aliases = ", ".join(f"{k} as {v}" for k, v in kinds.items() if k != v)
        raise rope.unsupported(kind_field, f"qkv runs the rope types {runs}" + (f" (and reads {aliases})" if aliases
                               else "") + "; other types (proportional, ...) compute positions in ways it does not")
    kind = kinds[named]
    if kind == "default":
        out["rope_scaling"] = None
        return out
    max_positions = f.get("max_position_embeddings", int, _default(cls, "max_position_embeddings"))
    scaling: dict = {"rope_type": kind}
    # transformers fills in original_max_position_embeddings (from max_position_embeddings, or a
    # top-level field where the config has one) for these types, not for aliases (Phi-3's su)
    standard = named in ("llama3", "yarn", "longrope")
    for key, (annotation, limit, required) in _ROPE_NEEDS[kind].items():
        if key == "original_max_position_embeddings":
            if standard and original is not None:
                scaling[key] = original
            else:
                scaling[key] = (rope.get(key, int, max_positions, limit=POSITIVE) if standard
                                else rope.get(key, int, limit=POSITIVE))
        elif required or key in rope:
            scaling[key] = rope.get(key, annotation, limit=limit)
    if kind in ("dynamic", "yarn", "longrope"):
        scaling["max_position_embeddings"] = max_positions
    _check_llama3(rope, scaling)
    if kind == "longrope":
        heads = f.get("num_attention_heads", int, _default(cls, "num_attention_heads"))
        hidden = f.get("hidden_size", int, _default(cls, "hidden_size"))
        pairs = int((f.get("head_dim", Optional[int], _default(cls, "head_dim")) or hidden // heads) * rotated) // 2
        for key in ("short_factor", "long_factor"):
            if len(scaling[key]) != pairs:
                raise rope.unsupported(key, f"longrope needs one factor per rotated pair of features, {pairs} "
                                       f"(the rotated head size / 2), but the list holds {len(scaling[key])}; use the "
                                       f"config.json saved with these weights")
    out["rope_scaling"] = scaling
    return out


def read_classic_scaling(rope: Fields, original: Optional[int] = None) -> Optional[dict]:
    """The typed rope_scaling of a family with classic RoPE (`CLASSIC_ROPE`: GPT-NeoX, Gemma 3)
    from its rope dict: None for the default type; other types are refused by name.
    `original`: original_max_position_embeddings where the dict has none (None: required)."""
    kind_field = "rope_type" if "rope_type" in rope else "type"
    kind = rope.get(kind_field, str, "default")
    if kind not in CLASSIC_ROPE:
        raise rope.unsupported(kind_field, f"qkv computes the rope types {', '.join(CLASSIC_ROPE)} only; other "
                               f"types (dynamic, yarn, longrope, ...) scale positions in ways it does not run")
    if kind == "default":
        return None
    scaling = {"rope_type": kind}
    for key in CLASSIC_ROPE[kind]:
        if key == "original_max_position_embeddings":
            scaling[key] = (rope.get(key, int, limit=POSITIVE) if original is None
                            else rope.get(key, int, original, limit=POSITIVE))
        else:
            scaling[key] = rope.get(key, float, limit=POSITIVE_REAL)
    _check_llama3(rope, scaling)
    return scaling


def _check_llama3(rope: Fields, scaling: dict) -> None:
    if scaling["rope_type"] == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise rope.unsupported("high_freq_factor", f"llama3 scaling needs high_freq_factor > low_freq_factor="
                               f"{scaling['low_freq_factor']:g} (it divides by their difference); correct them")


def _default(cls, name: str, missing=None):
    """The default of dataclass field `name` of `cls` (`missing` if the class has no such field)."""
    return next((fld.default for fld in dataclasses.fields(cls) if fld.name == name), missing)


class LlamaRMSNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in float32 as Llama does (float64
    inputs stay float64, so a float64 model is an exact reference)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x if x.dtype == torch.float64 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self._act = activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))


class GateUpMLP(nn.Module):
    """SwiGLU with gate and up in one stored matrix (Phi-3, GLM): down(act(gate) * up),
    [gate | up] = gate_up_proj(x), no biases."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self._act = activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, L, 2 FF) -> (B, L, FF) each
        return self.down_proj(up * self._act(gate))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x)).

    A family changes a piece through the construction hooks `__init__` calls, and keeps the
    attribute names, which are Hugging Face's (the plans rely on them):

    - `make_norm(c, dim)`: each norm of the block (a classmethod: it makes the model's final
      norm too);
    - `make_attention(c, **extra)`: the self-attention, Llama's `MultiHeadAttention` with the
      family's extra arguments (q/k norms, a score scale);
    - `make_mlp(c)`: the feed-forward, stored under `mlp_name` (Mixtral's is block_sparse_moe);
    - `interleaved_rotary`: RoPE in RoFormer's pairs (2i, 2i+1), for the attention and the
      model's tables, instead of Llama's halves.

    A family whose forward differs (parallel residual, norms after the sublayers, scaled or
    dropped-out branches) writes its own on `attend`, which runs the self-attention as every
    block does.
    """

    interleaved_rotary = False
    mlp_name = "mlp"
    score_mod = None  # a score function `attend` passes to qkv.attention (Gemma 2's soft-cap), or None

    def __init__(self, c: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = self.make_norm(c, c.hidden_size)
        self.self_attn = self.make_attention(c)
        self.window = c.window(layer_idx)
        self.post_attention_layernorm = self.make_norm(c, c.hidden_size)
        setattr(self, self.mlp_name, self.make_mlp(c))

    @classmethod
    def make_norm(cls, c: LlamaConfig, dim) -> nn.Module:
        return LlamaRMSNorm(dim, c.rms_norm_eps)

    def make_attention(self, c: LlamaConfig, **extra) -> MultiHeadAttention:
        """Grouped-query self-attention with the config's `qkv_bias` and `out_bias`; `extra`: more
        `MultiHeadAttention` arguments."""
        return MultiHeadAttention(
            c.hidden_size, c.num_attention_heads, num_kv_heads=c.kv_heads, head_dim=c.dim_per_head,
            bias=c.qkv_bias, out_bias=c.out_bias, dropout=c.attention_dropout,
            interleaved_rotary=self.interleaved_rotary, **extra,
        )

    def make_mlp(self, c: LlamaConfig) -> nn.Module:
        return LlamaMLP(c)

    def attend(self, h: Tensor, mask: Optional[Tensor], rotary, cache: Optional[KVCache]) -> Tensor:
        """The causal self-attention of h (B, L, E) through this layer's window and cache -> (B, L, E)."""
        return self.self_attn(h, mask=mask, causal=True, window=self.window, score_mod=self.score_mod, rotary=rotary,
                              cache=cache, layer=self.layer_idx)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        x = x + self.attend(self.input_layernorm(x), mask, rotary, cache)
        return x + getattr(self, self.mlp_name)(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, blocks (`layer(c, i)`), the final norm (the layer's `make_norm`) and RoPE
    under Hugging Face's names."""

    def __init__(self, c: LlamaConfig, layer: type = LlamaDecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(layer(c, i) for i in range(c.num_hidden_layers))
        self.norm = layer.make_norm(c, c.hidden_size)
        # cos/sin (L, R) for the first R = rotary_dim features of each head (apply_rotary leaves
        # the rest); interleaved: f0 f0 f1 f1 ..., a frequency per pair of neighbouring features
        self.rotary_emb = RotaryEmbedding(c.rotary_dim, c.rope_theta, rope_scaling=c.rope_scaling,
                                          interleaved=layer.interleaved_rotary)


class LlamaLikeForCausalLM(CausalLM):
    """The decoder of Llama and of the families built like it: `model` (a `model_class` of
    `layer_class` blocks) and the LM head, and `CausalLM`'s hooks read from them. A family sets
    its block (and model) class; `LlamaForCausalLM` adds RoPE that may depend on the length
    reached, Gemma's families (classic RoPE only) use this as it is."""

    layer_class: type = LlamaDecoderLayer
    model_class: type = LlamaModel
    # Layers with a sliding `window` (Mistral, Mixtral, Qwen2/3, Starcoder2, SmolLM3, Phi-3, Gemma
    # 2/3) cache only the tokens it reaches; layers without one keep everything.
    window_cache = True
    # dtype of the rotary cos/sin tables: None = the model's (Llama casts them); OLMo 2 keeps float32
    rotary_table_dtype: Optional[torch.dtype] = None

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = self.model_class(config, self.layer_class)
        self.add_lm_head(config.hidden_size, config.vocab_size)

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = self.model.embed_tokens(input_ids)  # (B, L, E)
        dtype = self.rotary_table_dtype or x.dtype
        return x, self.model.rotary_emb(positions, dtype=dtype)  # cos, sin (L, R) or (B, 1, L, R)

    blocks = property(lambda self: self.model.layers)
    final_norm = property(lambda self: self.model.norm)
    token_embedding = property(lambda self: self.model.embed_tokens)

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        return self.config.num_hidden_layers, self.config.kv_heads, self.config.dim_per_head


class LlamaForCausalLM(LengthDependentRope, LlamaLikeForCausalLM):
    """A Llama-family decoder with its LM head (`CausalLM`: `forward`, `hidden`, `generate`, `complete`)."""


def outer_plan(c: LlamaConfig, *, norm_bias: bool = False) -> dict[str, tuple[Piece, ...]]:
    """The entries outside the layers, all under their own names: `model.embed_tokens`, the final
    `model.norm` (and its bias, for a LayerNorm) and `lm_head` unless it is tied."""
    E, V = Dim(c.hidden_size, "hidden_size"), Dim(c.vocab_size, "vocab_size")
    plan = kept("model.", {"embed_tokens.weight": (V, E), "norm.weight": (E,)})
    if norm_bias:
        plan.update(kept("model.", {"norm.bias": (E,)}))
    if not c.tie_word_embeddings:
        plan.update(kept("", {"lm_head.weight": (V, E)}))
    return plan


def attention_plan(prefix: str, c: LlamaConfig, E: Dim, *, qkv_bias: bool,
                   out_bias: bool) -> dict[str, tuple[Piece, ...]]:
    """One layer's self-attention entries (`prefix`: the layer's, "model.layers.{i}."): q_proj,
    k_proj, v_proj concatenated (rows q | k | v) into `self_attn.qkv_proj`, the weights and, with
    `qkv_bias`, the biases; o_proj becomes `self_attn.out_proj` (its bias with `out_bias`)."""
    p, D = prefix + "self_attn.", c.dim_per_head
    q_out, kv_out = c.num_attention_heads * D, c.kv_heads * D
    rows = (("q", q_out), ("k", kv_out), ("v", kv_out))
    plan = {p + "qkv_proj.weight": tuple(Piece(p + f"{n}_proj.weight", (size, E)) for n, size in rows),
            p + "out_proj.weight": (Piece(p + "o_proj.weight", (E, q_out)),)}
    if qkv_bias:
        plan[p + "qkv_proj.bias"] = tuple(Piece(p + f"{n}_proj.bias", (size,)) for n, size in rows)
    if out_bias:
        plan[p + "out_proj.bias"] = (Piece(p + "o_proj.bias", (E,)),)
    return plan


def mlp_plan(prefix: str, c: LlamaConfig) -> dict[str, tuple[Piece, ...]]:
    """`LlamaMLP`'s entries under their own names: gate_proj, up_proj, down_proj (biases with `mlp_bias`)."""
    E, FF = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size")
    plan: dict[str, tuple[Piece, ...]] = {}
    for name, shape in (("gate_proj", (FF, E)), ("up_proj", (FF, E)), ("down_proj", (E, FF))):
        plan.update(kept(prefix + f"mlp.{name}.", {"weight": shape}))
        if c.mlp_bias:
            plan.update(kept(prefix + f"mlp.{name}.", {"bias": (shape[0],)}))
    return plan


def norms_plan(prefix: str, E: Dim, names: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm"), *,
               bias: bool = False) -> dict[str, tuple[Piece, ...]]:
    """A layer's norms under their own names: each weight (E,), and each bias with `bias` (a LayerNorm)."""
    parts = ("weight", "bias") if bias else ("weight",)
    return kept(prefix, {f"{name}.{part}": (E,) for name in names for part in parts})


def per_layer(c: LlamaConfig, shapes: dict[str, tuple]) -> dict[str, tuple[Piece, ...]]:
    """Entries of every layer under their own names: "model.layers.{i}." + name, of the given shape
    (what a family adds to a plan it builds on: q/k norms, more norms)."""
    return {key: pieces for i in range(c.num_hidden_layers)
            for key, pieces in kept(f"model.layers.{i}.", shapes).items()}


def kept(prefix: str, shapes: dict[str, tuple]) -> dict[str, tuple[Piece, ...]]:
    """Entries that keep the checkpoint's name: prefix + name -> that key, of the given shape."""
    return {prefix + name: (Piece(prefix + name, shape),) for name, shape in shapes.items()}


def hf_plan(c: LlamaConfig) -> Plan:
    """Checkpoint names of a Hugging Face LlamaForCausalLM -> qkv parameter names (pure).

    q_proj, k_proj, v_proj are concatenated (rows q | k | v) into `self_attn.qkv_proj`;
    o_proj becomes `self_attn.out_proj`; everything else keeps its name.
    """
    E = Dim(c.hidden_size, "hidden_size")
    plan = outer_plan(c)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.update(attention_plan(p, c, E, qkv_bias=c.qkv_bias, out_bias=c.out_bias))
        plan.update(mlp_plan(p, c))
        plan.update(norms_plan(p, E))
    return plan


def hf_layers(c: LlamaConfig) -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning."""
    return [("num_hidden_layers", c.num_hidden_layers, "model.layers.")]


def hf_ignored(c: LlamaConfig) -> dict:
    """Keys that are not weights: older checkpoints store RoPE's inv_freq buffer per layer (R/2,),
    and a tied lm_head.weight may be saved as a copy."""
    out: dict = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (c.rotary_dim // 2,)
                 for i in range(c.num_hidden_layers)}
    return {**out, **tied_head_ignored(c)}


def tied_head_ignored(c: LlamaConfig) -> dict:
    """A tied lm_head.weight may be saved as a copy of the embeddings."""
    return {"lm_head.weight": (c.vocab_size, c.hidden_size)} if c.tie_word_embeddings else {}


FAMILY = Family(architectures=("LlamaForCausalLM",), model_type="llama", config=LlamaConfig,
                model=LlamaForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

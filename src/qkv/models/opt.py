"""OPT decoder (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models"),
loading Hugging Face `OPTForCausalLM` folders (and `OPTModel` ones, whose head is the tied
embedding).

A GPT-2-like decoder (learned absolute positions, LayerNorm, a ReLU MLP, an LM head tied to
the token embedding) with these differences:

- the position table has two extra rows in front (an artefact of fairseq's padding index): the
  token at position p reads row p + 2, and positions count the real tokens of each row only
  (from the attention mask), so a left-padded prompt is embedded as it would be alone;
- `do_layer_norm_before`: pre-norm blocks with a final LayerNorm (125m, 1.3b and larger), or
  post-norm blocks without one, x = LN(x + attn(x)) (the 350m model);
- `word_embed_proj_dim` < hidden_size (350m): the token embedding and LM head are narrower than
  the blocks, with `project_in` / `project_out` between them;
- the attention scales q by 1/sqrt(D) after its projection, where qkv's attention scales the
  scores: the same product, equal within rounding.

Names are Hugging Face's; q_proj, k_proj and v_proj are fused into `self_attn.qkv_proj` (as
Llama's) by `hf_plan`. The released checkpoints store the body under `decoder.` (saved from
OPTModel), transformers 5 under `model.decoder.`; both load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..nn import KVCache, LearnedPositions, MultiHeadAttention
from .checkpoint import Dim, Piece, Plan
from .common import ACTIVATION, Family, activation
from .decoder import CausalLM
from .fields import NON_NEGATIVE, POSITIVE, PROBABILITY, HFConfig, check_divisible


@dataclass(frozen=True)
class OPTConfig(HFConfig):
    # transformers' OPTConfig defaults (OPT-125m), for fields a config.json leaves out
    vocab_size: int = 50272
    hidden_size: int = 768  # E, the width of the blocks
    num_hidden_layers: int = 12  # blocks
    ffn_dim: int = 3072  # MLP inner size
    max_position_embeddings: int = 2048  # learned positions (the table holds 2 more rows)
    do_layer_norm_before: bool = True  # pre-norm with a final LayerNorm; false: post-norm (350m)
    _remove_final_layer_norm: bool = False  # true: no final LayerNorm (fine-tuned before transformers 4.20.1)
    word_embed_proj_dim: Optional[int] = None  # P, the width of embeddings and LM head; None = hidden_size
    dropout: float = 0.1  # dropout after attention and after the MLP, training mode only
    attention_dropout: float = 0.0  # dropout on attention weights, training mode only
    num_attention_heads: int = 12  # H; D = E / H
    activation_function: str = "relu"  # the MLP's activation
    layerdrop: float = 0.0  # in training mode each block is skipped with this probability (Fan et al. 2019)
    enable_bias: bool = True  # bias on q/k/v/out_proj, fc1 and fc2
    layer_norm_elementwise_affine: bool = True  # LayerNorms with weight and bias; false: none
    bos_token_id: Optional[int] = 2  # </s>, which OPT prompts start with
    eos_token_id: Optional[Union[int, list[int]]] = 2  # generation stops here (a list: at any); None = never
    tie_word_embeddings: bool = True  # lm_head shares embed_tokens' weight

    LIMITS = {  # config.json ranges; a field not listed has no range beyond its type
        "vocab_size": POSITIVE, "hidden_size": POSITIVE, "num_hidden_layers": POSITIVE, "ffn_dim": POSITIVE,
        "max_position_embeddings": POSITIVE, "word_embed_proj_dim": POSITIVE, "dropout": PROBABILITY,
        "attention_dropout": PROBABILITY, "num_attention_heads": POSITIVE, "activation_function": ACTIVATION,
        "layerdrop": PROBABILITY, "bos_token_id": NON_NEGATIVE, "eos_token_id": NON_NEGATIVE,
    }

    def check(self, source) -> None:
        check_divisible(source, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)

    @property
    def embed_dim(self) -> int:
        """P: the width of the token embedding and the LM head."""
        return self.word_embed_proj_dim if self.word_embed_proj_dim is not None else self.hidden_size

    @property
    def final_layer_norm(self) -> bool:
        """Whether the decoder ends with a LayerNorm (pre-norm models, unless removed)."""
        return self.do_layer_norm_before and not self._remove_final_layer_norm


def _layer_norm(c: OPTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(c.hidden_size, elementwise_affine=c.layer_norm_elementwise_affine)  # eps 1e-5, as OPT


class OPTLearnedPositionalEmbedding(LearnedPositions):
    """OPT's position table: (max_position_embeddings + 2, E); position p reads row p + 2."""

    offset = 2

    def __init__(self, max_positions: int, dim: int):
        super().__init__(max_positions + self.offset, dim)

    def forward(self, positions: Tensor) -> Tensor:
        """positions (L,) or (B, L) int64, -1 at padding -> (L, E) or (B, L, E)."""
        return super().forward(positions + self.offset)


class OPTDecoderLayer(nn.Module):
    def __init__(self, c: OPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.do_layer_norm_before = c.do_layer_norm_before
        self.layerdrop = c.layerdrop
        self.self_attn = MultiHeadAttention(c.hidden_size, c.num_attention_heads, bias=c.enable_bias,
                                            dropout=c.attention_dropout)  # scale 1/sqrt(D), as OPT's q scaling
        self.self_attn_layer_norm = _layer_norm(c)
        self.fc1 = nn.Linear(c.hidden_size, c.ffn_dim, bias=c.enable_bias)
        self.fc2 = nn.Linear(c.ffn_dim, c.hidden_size, bias=c.enable_bias)
        self.final_layer_norm = _layer_norm(c)
        self.dropout = nn.Dropout(c.dropout)
        self._act = activation(c.activation_function)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: None, cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None; OPT has no rotary embeddings (None)."""
        if self.training and self.layerdrop > 0 and float(torch.rand([])) < self.layerdrop:
            return x  # LayerDrop: the whole block skipped (training only)
        pre = self.do_layer_norm_before
        h = self.self_attn_layer_norm(x) if pre else x
        x = x + self.dropout(self.self_attn(h, mask=mask, causal=True, cache=cache, layer=self.layer_idx))
        x = x if pre else self.self_attn_layer_norm(x)  # post-norm (350m)
        h = self.final_layer_norm(x) if pre else x
        x = x + self.dropout(self.fc2(self._act(self.fc1(h))))
        return x if pre else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, c: OPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.embed_dim)
        self.embed_positions = OPTLearnedPositionalEmbedding(c.max_position_embeddings, c.hidden_size)
        narrow = c.embed_dim != c.hidden_size
        self.project_out = nn.Linear(c.hidden_size, c.embed_dim, bias=False) if narrow else None
        self.project_in = nn.Linear(c.embed_dim, c.hidden_size, bias=False) if narrow else None
        self.final_layer_norm = _layer_norm(c) if c.final_layer_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(c, i) for i in range(c.num_hidden_layers))


class OPTModel(nn.Module):
    def __init__(self, c: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(c)


class OPTForCausalLM(CausalLM):
    """An OPT decoder with its LM head (`CausalLM`: `forward`, `hidden`, `generate`, `complete`)."""

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.model = OPTModel(config)
        self.add_lm_head(config.embed_dim, config.vocab_size)

    def hidden(self, input_ids: Tensor, *, attention_mask: Optional[Tensor] = None,
               cache: Optional[KVCache] = None, positions: Optional[Tensor] = None,
               chunk_size: Optional[int] = None) -> Tensor:
        """Final hidden states (B, L, P), as `CausalLM.hidden`, except for the default positions:
        with an attention mask (B, n + L) and no `positions`, each token's position counts the
        real tokens before it in its row (padding gets -1, OPT's "row 1"), as OPT computes them
        from the mask; a left-padded row is then embedded as it would be alone."""
        if positions is None and attention_mask is not None and attention_mask.dim() == 2:
            start = cache.length if cache is not None else 0
            real = attention_mask.long()  # (B, n + L)
            positions = (real.cumsum(dim=1) * real - 1)[:, start:]  # (B, L)
        return super().hidden(input_ids, attention_mask=attention_mask, cache=cache, positions=positions,
                              chunk_size=chunk_size)

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, None]:
        d = self.model.decoder
        x = d.embed_tokens(input_ids)  # (B, L, P)
        if d.project_in is not None:
            x = d.project_in(x)  # (B, L, E)
        return x + d.embed_positions(positions), None  # (B, L, E)

    def _finish(self, x: Tensor) -> Tensor:
        """After the last block: the final LayerNorm (pre-norm models), then project_out. (B, L, E) -> (B, L, P)."""
        d = self.model.decoder
        if d.final_layer_norm is not None:
            x = d.final_layer_norm(x)
        return d.project_out(x) if d.project_out is not None else x

    blocks = property(lambda self: self.model.decoder.layers)
    final_norm = property(lambda self: self._finish)
    token_embedding = property(lambda self: self.model.decoder.embed_tokens)

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.num_hidden_layers, c.num_attention_heads, c.hidden_size // c.num_attention_heads


def hf_plan(c: OPTConfig, prefix: str = "model.decoder.") -> Plan:
    """Checkpoint names of a Hugging Face OPTForCausalLM -> qkv parameter names (pure).

    q_proj, k_proj and v_proj are concatenated (rows q | k | v) into `self_attn.qkv_proj`;
    out_proj keeps its name, as everything else. `prefix` is "model.decoder." as transformers 5
    saves OPTForCausalLM, "decoder." in the released checkpoints (saved from OPTModel).
    """
    E, FF, V = Dim(c.hidden_size, "hidden_size"), Dim(c.ffn_dim, "ffn_dim"), Dim(c.vocab_size, "vocab_size")
    P = Dim(c.embed_dim, "word_embed_proj_dim")
    ours = "model.decoder."
    plan: dict[str, tuple[Piece, ...]] = {
        ours + "embed_tokens.weight": (Piece(prefix + "embed_tokens.weight", (V, P)),),
        ours + "embed_positions.weight": (Piece(prefix + "embed_positions.weight",
                                                (c.max_position_embeddings + 2, E)),),
    }
    if c.embed_dim != c.hidden_size:
        plan[ours + "project_out.weight"] = (Piece(prefix + "project_out.weight", (P, E)),)
        plan[ours + "project_in.weight"] = (Piece(prefix + "project_in.weight", (E, P)),)
    norms = ("weight", "bias") if c.layer_norm_elementwise_affine else ()
    if c.final_layer_norm:
        for kind in norms:
            plan[ours + f"final_layer_norm.{kind}"] = (Piece(prefix + f"final_layer_norm.{kind}", (E,)),)
    for i in range(c.num_hidden_layers):
        mine, theirs = f"{ours}layers.{i}.", f"{prefix}layers.{i}."
        kinds = ("weight", "bias") if c.enable_bias else ("weight",)
        for kind in kinds:
            shape = (E, E) if kind == "weight" else (E,)
            plan[mine + f"self_attn.qkv_proj.{kind}"] = tuple(
                Piece(theirs + f"self_attn.{x}_proj.{kind}", shape) for x in ("q", "k", "v"))
            plan[mine + f"self_attn.out_proj.{kind}"] = (Piece(theirs + f"self_attn.out_proj.{kind}", shape),)
        for name, shape in (("fc1", (FF, E)), ("fc2", (E, FF))):
            for kind in kinds:
                plan[mine + f"{name}.{kind}"] = (Piece(theirs + f"{name}.{kind}", shape if kind == "weight"
                                                       else shape[:1]),)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            for kind in norms:
                plan[mine + f"{norm}.{kind}"] = (Piece(theirs + f"{norm}.{kind}", (E,)),)
    if not c.tie_word_embeddings:
        plan["lm_head.weight"] = (Piece("lm_head.weight", (V, P)),)
    return plan


def hf_layers(c: OPTConfig, prefix: str = "model.decoder.") -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning."""
    return [("num_hidden_layers", c.num_hidden_layers, prefix + "layers.")]


def hf_ignored(c: OPTConfig, prefix: str = "model.decoder.") -> dict:
    """Keys that are not weights: a tied lm_head.weight may be saved as a copy of embed_tokens,
    and a model without a final LayerNorm (post-norm, or `_remove_final_layer_norm`) may still
    carry one, which transformers does not build either."""
    out: dict = {}
    if c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.embed_dim)
    if not c.final_layer_norm and c.layer_norm_elementwise_affine:
        for kind in ("weight", "bias"):
            out[prefix + f"final_layer_norm.{kind}"] = (c.hidden_size,)
    return out


def _adapt(c: OPTConfig, keys) -> tuple[OPTConfig, tuple]:
    """transformers 5 saves OPTForCausalLM's body under "model.decoder.", the released
    checkpoints (converted from OPTModel) under "decoder."."""
    return c, ("model.decoder." if any(k.startswith("model.decoder.") for k in keys) else "decoder.",)


FAMILY = Family(architectures=("OPTForCausalLM", "OPTModel"), model_type="opt", config=OPTConfig,
                model=OPTForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored, adapt=_adapt)

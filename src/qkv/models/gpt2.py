"""GPT-2 decoder with its language-model head (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners"), loading Hugging Face `GPT2LMHeadModel` folders.

Pre-LayerNorm blocks: x = x + Attn(LN(x)); x = x + MLP(LN(x)); learned absolute positions;
the LM head is tied to the token embedding. Module names are Hugging Face's; the attention
projections are `attn.qkv_proj` / `attn.out_proj` of a qkv MultiHeadAttention, filled from
GPT-2's transposed Conv1D weights `attn.c_attn` / `attn.c_proj` by `hf_plan`. The decoder
skeleton (cache, hidden states, logits, generation) is `CausalLM` (decoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor, nn

from ..nn import KVCache, LearnedPositions, MultiHeadAttention
from .checkpoint import Dim, Piece, Plan
from .common import ACTIVATION, Family, activation
from .decoder import CausalLM
from .fields import EPS, NON_NEGATIVE, POSITIVE, PROBABILITY, Fields, HFConfig, check_divisible, refuse_cross_attention


@dataclass(frozen=True)
class GPT2Config(HFConfig):
    vocab_size: int = 50257  # byte-level BPE vocabulary of the released GPT-2
    n_positions: int = 1024  # learned absolute positions: the longest sequence
    n_embd: int = 768  # E
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads, D = n_embd / n_head
    n_inner: Optional[int] = None  # MLP inner size; None = 4 * n_embd
    activation_function: str = "gelu_new"  # tanh-approximated GELU
    layer_norm_epsilon: float = 1e-5  # LayerNorm eps
    resid_pdrop: float = 0.1  # dropout, training mode only
    embd_pdrop: float = 0.1  # dropout on embeddings, training mode only
    attn_pdrop: float = 0.1  # dropout on attention weights, training mode only
    scale_attn_weights: bool = True  # scores scaled by 1/sqrt(D)
    scale_attn_by_inverse_layer_idx: bool = False  # and by 1/(layer + 1) (Mistral's GPT-2 runs)
    bos_token_id: Optional[int] = 50256  # <|endoftext|>
    eos_token_id: Optional[Union[int, list[int]]] = 50256  # generation stops here (a list: at any); None = never
    tie_word_embeddings: bool = True  # lm_head shares wte's weight

    LIMITS = {  # config.json ranges; a field not listed has no range beyond its type
        "vocab_size": POSITIVE, "n_positions": POSITIVE, "n_embd": POSITIVE, "n_layer": POSITIVE, "n_head": POSITIVE,
        "n_inner": POSITIVE, "activation_function": ACTIVATION, "layer_norm_epsilon": EPS, "resid_pdrop": PROBABILITY,
        "embd_pdrop": PROBABILITY, "attn_pdrop": PROBABILITY, "bos_token_id": NON_NEGATIVE,
        "eos_token_id": NON_NEGATIVE,
    }

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        # reorder_and_upcast_attn is a numerical detail of HF's eager path (scores in float32);
        # qkv.attention accumulates low precision in float32 anyway, so it needs no field.
        refuse_cross_attention(f, "GPT-2", "GPT2LMHeadModel")
        return super().read_fields(f)

    def check(self, source) -> None:
        check_divisible(source, "n_embd", self.n_embd, "n_head", self.n_head)

    @property
    def inner(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class GPT2MLP(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, c.inner)
        self.c_proj = nn.Linear(c.inner, c.n_embd)
        self.dropout = nn.Dropout(c.resid_pdrop)
        self._act = activation(c.activation_function)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self._act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, c: GPT2Config, layer_idx: int):
        super().__init__()
        D = c.n_embd // c.n_head
        scale = ((D ** -0.5 if c.scale_attn_weights else 1.0)
                 / ((layer_idx + 1) if c.scale_attn_by_inverse_layer_idx else 1))
        self.layer_idx = layer_idx
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.attn = MultiHeadAttention(c.n_embd, c.n_head, dropout=c.attn_pdrop, scale=scale)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = GPT2MLP(c)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: None, cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None; GPT-2 has no rotary embeddings (None)."""
        x = x + self.resid_dropout(self.attn(self.ln_1(x), mask=mask, causal=True, cache=cache, layer=self.layer_idx))
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = LearnedPositions(c.n_positions, c.n_embd)
        self.drop = nn.Dropout(c.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(c, i) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its LM head (`CausalLM`: `forward`, `hidden`, `generate`, `complete`)."""

    positions_field, positions_text = "n_positions", "{n} positions"

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Transformer(config)
        self.add_lm_head(config.n_embd, config.vocab_size)

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, None]:
        t = self.transformer
        return t.drop(t.wte(input_ids) + t.wpe(positions)), None  # (B, L, E)

    blocks = property(lambda self: self.transformer.h)
    final_norm = property(lambda self: self.transformer.ln_f)
    token_embedding = property(lambda self: self.transformer.wte)

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.n_layer, c.n_head, c.n_embd // c.n_head


def hf_plan(c: GPT2Config, prefix: str = "transformer.") -> Plan:
    """Checkpoint names of a Hugging Face GPT-2 -> qkv parameter names (pure).

    GPT-2 stores its projections as Conv1D, weight (in, out): each is transposed into
    nn.Linear's (out, in). `attn.c_attn` becomes `attn.qkv_proj`, `attn.c_proj` `attn.out_proj`.
    `prefix` is "transformer." for GPT2LMHeadModel checkpoints and "" for GPT2Model ones.
    """
    E, FF, V = Dim(c.n_embd, "n_embd"), Dim(c.inner, "n_inner"), Dim(c.vocab_size, "vocab_size")
    plan: dict[str, tuple[Piece, ...]] = {
        "transformer.wte.weight": (Piece(prefix + "wte.weight", (V, E)),),
        "transformer.wpe.weight": (Piece(prefix + "wpe.weight", (Dim(c.n_positions, "n_positions"), E)),),
        "transformer.ln_f.weight": (Piece(prefix + "ln_f.weight", (E,)),),
        "transformer.ln_f.bias": (Piece(prefix + "ln_f.bias", (E,)),),
    }
    for i in range(c.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"{prefix}h.{i}."
        for ln in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                plan[ours + f"{ln}.{kind}"] = (Piece(theirs + f"{ln}.{kind}", (E,)),)
        for mine, hf, n_in, n_out in (("attn.qkv_proj", "attn.c_attn", E, 3 * E),
                                      ("attn.out_proj", "attn.c_proj", E, E),
                                      ("mlp.c_fc", "mlp.c_fc", E, FF), ("mlp.c_proj", "mlp.c_proj", FF, E)):
            plan[ours + f"{mine}.weight"] = (Piece(theirs + f"{hf}.weight", (n_in, n_out), transpose=True),)
            plan[ours + f"{mine}.bias"] = (Piece(theirs + f"{hf}.bias", (n_out,)),)
    if not c.tie_word_embeddings:
        plan["lm_head.weight"] = (Piece("lm_head.weight", (V, E)),)
    return plan


def hf_layers(c: GPT2Config, prefix: str = "transformer.") -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning."""
    return [("n_layer", c.n_layer, prefix + "h.")]


def hf_ignored(c: GPT2Config, prefix: str = "transformer.") -> dict:
    """Keys that are not weights: older checkpoints store the causal mask buffers, and a tied
    lm_head.weight may be saved as a copy of wte."""
    out: dict = {}
    for i in range(c.n_layer):
        out[f"{prefix}h.{i}.attn.bias"] = None
        out[f"{prefix}h.{i}.attn.masked_bias"] = None
    if c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.n_embd)
    return out


def _adapt(c: GPT2Config, keys) -> tuple[GPT2Config, tuple]:
    """GPT2LMHeadModel checkpoints prefix the body's keys with "transformer.", GPT2Model ones do not."""
    return c, ("transformer." if any(k.startswith("transformer.") for k in keys) else "",)


# GPT2Model folders load as GPT2LMHeadModel: the head is tied to the embedding
FAMILY = Family(architectures=("GPT2LMHeadModel", "GPT2Model"), model_type="gpt2", config=GPT2Config,
                model=GPT2LMHeadModel, plan=hf_plan, layers=hf_layers, ignored=hf_ignored, adapt=_adapt)

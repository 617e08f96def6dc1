"""Gemma 2 decoder (Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical
Size"), loading Hugging Face `Gemma2ForCausalLM` folders: Gemma (gemma.py) plus

- attention-logit soft-capping: each score (after the 1/sqrt scale) becomes
  cap * tanh(score / cap) before the softmax, cap = `attn_logit_softcapping` (50); a
  `score_mod` of `qkv.attention` (`qkv.masks.soft_cap`) held by each layer as `self.score_mod`,
  so `auto` picks a backend that applies score functions (sdpa cannot);
- final-logit soft-capping: the LM head's logits become cap * tanh(logits / cap), cap =
  `final_logit_softcapping` (30);
- the score scale is query_pre_attn_scalar ** -0.5, not head_dim ** -0.5 (Gemma 2 27B: 144);
- local and global layers (`layer_types`, by default alternating, the first local): a local
  layer's token sees itself and the `sliding_window - 1` tokens before it (transformers' mask
  keeps kv > q - sliding_window), `qkv.attention`'s window (sliding_window - 1, 0), held by the
  layer as `self.window` as Mistral's are (Beltagy et al. 2020, "Longformer");
- norms after attention and after the MLP as well as before them ("sandwich" norms:
  `post_attention_layernorm` is applied to the attention's output, before the residual sum;
  `pre_feedforward_layernorm` and `post_feedforward_layernorm` around the MLP).

Weight names are Gemma's (Llama's) plus the two feed-forward norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..masks.scores import soft_cap
from ..nn import KVCache, MultiHeadAttention
from .checkpoint import Dim, ModelError, Plan
from .common import ACTIVATION, Family
from .fields import POSITIVE, POSITIVE_REAL, Fields, Limit, read_dataclass
from .gemma import GemmaConfig, GemmaDecoderLayer, GemmaForCausalLM, refuse_bidirectional
from .llama import CLASSIC_KINDS, _read_rope, hf_ignored, hf_layers, per_layer
from .llama import hf_plan as llama_plan

SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPE = Limit(choices=(FULL, SLIDING))  # each entry of layer_types


@dataclass(frozen=True)
class Gemma2Config(GemmaConfig):
    # transformers' Gemma2Config defaults (Gemma 2 2B), for fields a config.json leaves out
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = 4
    hidden_activation: str = "gelu_pytorch_tanh"  # the GeGLU gate (Gemma 2 reads this, not hidden_act)
    query_pre_attn_scalar: float = 256  # scores are scaled by query_pre_attn_scalar ** -0.5
    sliding_window: Optional[int] = 4096  # a local layer's token sees itself and sliding_window - 1 before it
    layer_types: Optional[list[str]] = None  # "sliding_attention" | "full_attention" per layer; None = alternate
    final_logit_softcapping: Optional[float] = 30.0  # logits -> cap * tanh(logits / cap); None = off
    attn_logit_softcapping: Optional[float] = 50.0  # scores -> cap * tanh(scores / cap); None = off

    LIMITS = {**GemmaConfig.LIMITS, "hidden_activation": ACTIVATION, "query_pre_attn_scalar": POSITIVE_REAL,
              "sliding_window": POSITIVE, "layer_types": LAYER_TYPE, "final_logit_softcapping": POSITIVE_REAL,
              "attn_logit_softcapping": POSITIVE_REAL}

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        refuse_bidirectional(f, "Gemma 2")
        # hidden_act: Gemma 2 configs carry it next to hidden_activation, and transformers (4 and 5) reads
        # only hidden_activation; so does qkv.
        skip = ("rope_scaling", "mlp_bias", "hidden_act")
        return {**read_dataclass(cls, f, limits=cls.LIMITS, skip=skip), **_read_rope(f, kinds=CLASSIC_KINDS)}

    def check(self, source) -> None:
        super().check(source)
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ModelError(f"{source}: layer_types has {len(self.layer_types)} entries but num_hidden_layers="
                             f"{self.num_hidden_layers}; give one type per layer (or leave layer_types out)")
        if self.sliding_window is None and SLIDING in self.types:
            raise ModelError(f"{source}: sliding_window is null but layer_types has {SLIDING} layers (transformers "
                             f"cannot run this either); set sliding_window, or make every layer {FULL}")

    @property
    def mlp_activation(self) -> str:
        return self.hidden_activation

    @property
    def types(self) -> list[str]:
        """The attention type of each layer: layer_types, else transformers' default."""
        return self.layer_types or self.default_types()

    def default_types(self) -> list[str]:
        """Gemma 2: local, global, local, global, ... (layer i is local when i + 1 is odd)."""
        return [SLIDING if (i + 1) % 2 else FULL for i in range(self.num_hidden_layers)]

    def window(self, layer: int) -> Optional[tuple[int, int]]:
        return (self.sliding_window - 1, 0) if self.types[layer] == SLIDING else None

    @property
    def attn_softcap(self) -> Optional[float]:
        """The attention-logit cap the layers apply (None = none)."""
        return self.attn_logit_softcapping

    qk_norm = property(lambda self: False)  # Gemma 3 normalises queries and keys


class Gemma2DecoderLayer(GemmaDecoderLayer):
    """x + post_attn_norm(attn(input_norm(x))), then + post_ff_norm(mlp(pre_ff_norm(.))).

    Attributes read by other parts of qkv: `window` ((left, 0) on local layers, None on global
    ones), `attn_logit_softcapping` (the cap, or None) and `score_mod` (`qkv.masks.soft_cap` of
    it, or None), `layer_type`.
    """

    def __init__(self, c: Gemma2Config, layer_idx: int):
        super().__init__(c, layer_idx)
        self.layer_type = c.types[layer_idx]
        self.attn_logit_softcapping = c.attn_softcap
        self.score_mod = soft_cap(c.attn_softcap) if c.attn_softcap is not None else None
        self.pre_feedforward_layernorm = self.make_norm(c, c.hidden_size)
        self.post_feedforward_layernorm = self.make_norm(c, c.hidden_size)

    def make_attention(self, c: Gemma2Config, **extra) -> MultiHeadAttention:
        D = c.dim_per_head  # the q/k norms (Gemma 3) run per head, on (B, L, H, D)
        return super().make_attention(c, scale=c.query_pre_attn_scalar ** -0.5,
                                      q_norm=self.make_norm(c, D) if c.qk_norm else None,
                                      k_norm=self.make_norm(c, D) if c.qk_norm else None, **extra)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: Union[tuple[Tensor, Tensor], dict],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions, or
        {layer type: (cos, sin)} where local and global layers rotate differently (Gemma 3)."""
        if isinstance(rotary, dict):
            rotary = rotary[self.layer_type]
        x = x + self.post_attention_layernorm(self.attend(self.input_layernorm(x), mask, rotary, cache))  # (B, L, E)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))  # (B, L, E)


class Gemma2ForCausalLM(GemmaForCausalLM):
    """A Gemma 2 decoder with its (tied) LM head, whose logits are soft-capped."""

    layer_class = Gemma2DecoderLayer

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., E) -> (..., V), capped to (-cap, cap) by cap * tanh(logits / cap)."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)


def hf_plan(c: Gemma2Config) -> Plan:
    """Checkpoint names of a Hugging Face Gemma2ForCausalLM -> qkv parameter names (pure): Gemma's
    (Llama's) plus each layer's pre_feedforward_layernorm and post_feedforward_layernorm."""
    E = Dim(c.hidden_size, "hidden_size")
    return {**llama_plan(c), **per_layer(c, {"pre_feedforward_layernorm.weight": (E,),
                                             "post_feedforward_layernorm.weight": (E,)})}


FAMILY = Family(architectures=("Gemma2ForCausalLM",), model_type="gemma2", config=Gemma2Config,
                model=Gemma2ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

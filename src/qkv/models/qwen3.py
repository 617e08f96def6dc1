"""Qwen3 decoder (Qwen Team 2025, "Qwen3 Technical Report"), loading Hugging Face
`Qwen3ForCausalLM` folders.

What differs from Llama (llama.py): each attention head's queries and keys go through an
RMSNorm over the head size before RoPE (`self_attn.q_norm`, `self_attn.k_norm`; QK-norm, Henry
et al. 2020, run by `MultiHeadAttention`'s `q_norm=`/`k_norm=`); `attention_bias` puts biases on
all four projections as in Llama (Qwen2's fixed q/k/v biases are gone); the MLP has no biases.
Layers may slide, as transformers 5.24 runs them: with `use_sliding_window`, the layers
`layer_types` names `sliding_attention` (by default those from `max_window_layers` on) attend to
themselves and the `sliding_window - 1` tokens before, through `qkv.attention`'s window. The
layer_types helpers here are shared with smollm3.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from ..nn import MultiHeadAttention, RotaryEmbedding
from .checkpoint import Piece, Plan
from .common import Family
from .decoder import CausalLM
from .fields import NON_NEGATIVE, POSITIVE, Fields, Limit
from .llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaRMSNorm, hf_ignored, hf_layers
from .llama import hf_plan as llama_plan

# layer_types entries a Llama-like layer runs: transformers' two names, and the legacy "attention"
# transformers reads as full_attention. Its other kinds (chunked, linear, ...) belong to other models.
LAYER_TYPE = Limit(choices=("full_attention", "sliding_attention", "attention"))


def check_layer_types(f: Fields, types: Optional[list[str]], layers: int, window: Optional[int],
                      no_window: str) -> None:
    """transformers' checks on an explicit `layer_types`, as a ModelError naming the field: one
    entry per layer, and a window wherever a layer slides (`no_window` says why there is none)."""
    if types is None:
        return
    if len(types) != layers:
        raise f.unsupported("layer_types", f"it has {len(types)} entries for num_hidden_layers={layers} layers "
                            f"(transformers refuses it too); give one entry per layer")
    if "sliding_attention" in types and window is None:
        raise f.unsupported("layer_types", f"it names sliding_attention layers, but {no_window}, so there is no "
                            f"window to slide (transformers fails on it too); set the window, or make every "
                            f"layer full_attention")


def layer_kinds(types: list[str]) -> list[str]:
    """layer_types with the legacy "attention" read as "full_attention", as transformers does."""
    return ["full_attention" if t == "attention" else t for t in types]


@dataclass(frozen=True)
class Qwen3Config(LlamaConfig):
    # transformers' Qwen3Config defaults (Qwen3-8B), for fields a config.json leaves out
    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: Optional[int] = 32
    head_dim: Optional[int] = 128  # D; null = hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None
    use_sliding_window: bool = False  # false: no layer slides (transformers then sets sliding_window to null)
    sliding_window: Optional[int] = 4096  # a sliding layer attends to itself and the sliding_window - 1 before it
    max_window_layers: int = 28  # without layer_types: layers max_window_layers.. slide (with use_sliding_window)
    layer_types: Optional[list[str]] = None  # per layer full_attention | sliding_attention; null = from the above

    LIMITS = {**LlamaConfig.LIMITS, "sliding_window": POSITIVE, "max_window_layers": NON_NEGATIVE,
              "layer_types": LAYER_TYPE}

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        out = super().read_fields(f)
        out.pop("mlp_bias", None)  # not a Qwen3 field: its MLP never has biases
        window = out.get("sliding_window", cls.sliding_window) if out.get("use_sliding_window", False) else None
        check_layer_types(f, out.get("layer_types"), out.get("num_hidden_layers", cls.num_hidden_layers), window,
                          "use_sliding_window is false or sliding_window is null")
        return out

    @property
    def kinds(self) -> list[str]:
        """Each layer's attention: "full_attention" or "sliding_attention", as transformers decides."""
        if self.layer_types is not None:
            return layer_kinds(self.layer_types)
        slides = self.use_sliding_window and self.sliding_window is not None
        return ["sliding_attention" if slides and i >= self.max_window_layers else "full_attention"
                for i in range(self.num_hidden_layers)]

    def window(self, layer: int) -> Optional[tuple[int, int]]:
        return (self.sliding_window - 1, 0) if self.kinds[layer] == "sliding_attention" else None


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """Llama's block, whose attention normalises each query and key head (RMSNorm over D) before RoPE."""

    def __init__(self, c: Qwen3Config, layer_idx: int):
        super().__init__(c, layer_idx)
        D = c.dim_per_head
        self.self_attn = MultiHeadAttention(
            c.hidden_size, c.num_attention_heads, num_kv_heads=c.kv_heads, head_dim=D, bias=c.qkv_bias,
            out_bias=c.out_bias, dropout=c.attention_dropout,
            q_norm=LlamaRMSNorm(D, c.rms_norm_eps), k_norm=LlamaRMSNorm(D, c.rms_norm_eps),  # on (B, L, H, D)
        )


class Qwen3Model(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(c.dim_per_head, c.rope_theta, rope_scaling=c.rope_scaling)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """A Qwen3 decoder with its LM head: Llama's skeleton and hooks, with Qwen3's layers."""

    def __init__(self, config: Qwen3Config):
        CausalLM.__init__(self, config)
        self.model = Qwen3Model(config)
        self.add_lm_head(config.hidden_size, config.vocab_size)


def hf_plan(c: Qwen3Config) -> Plan:
    """Llama's plan (llama.hf_plan) and each layer's q/k norm weights (D,)."""
    plan = dict(llama_plan(c))
    for i in range(c.num_hidden_layers):
        for norm in ("q_norm", "k_norm"):
            key = f"model.layers.{i}.self_attn.{norm}.weight"
            plan[key] = (Piece(key, (c.dim_per_head,)),)
    return plan


FAMILY = Family(architectures=("Qwen3ForCausalLM",), model_type="qwen3", config=Qwen3Config,
                model=Qwen3ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

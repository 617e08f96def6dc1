"""SmolLM3 decoder (Hugging Face 2025, "SmolLM3: smol, multilingual, long-context reasoner"),
loading Hugging Face `SmolLM3ForCausalLM` folders.

What differs from Llama (llama.py): some layers use no position embedding at all (NoPE, Kazemnejad
et al. 2023, "The Impact of Positional Encoding on Length Generalization in Transformers";
interleaved with RoPE layers as in Yang et al. 2025, "Rope to Nope and Back Again"):
`no_rope_layers[i]` is 1 where layer i rotates its queries and keys and 0 where it does not (by
default every `no_rope_layer_interval`-th layer skips RoPE). With `use_sliding_window` and a
`sliding_window`, the NoPE layers slide (or the layers `layer_types` names `sliding_attention`),
as transformers 5.24 runs them. Weight names and plan are Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor

from ..nn import KVCache
from .common import Family
from .fields import POSITIVE, Fields, Limit
from .llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, hf_ignored, hf_layers, hf_plan
from .qwen2 import LAYER_TYPE, check_layer_types, layer_kinds


@dataclass(frozen=True)
class SmolLM3Config(LlamaConfig):
    # transformers' SmolLM3Config defaults (SmolLM3-3B), for fields a config.json leaves out
    vocab_size: int = 128256
    hidden_size: int = 2048
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 4
    max_position_embeddings: int = 32768
    rope_theta: float = 2000000.0  # SmolLM3's default RoPE base
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 128000
    eos_token_id: Optional[Union[int, list[int]]] = 128001
    use_sliding_window: bool = False  # without it no layer slides
    sliding_window: Optional[int] = None  # a sliding layer attends to itself and the sliding_window - 1 before it
    no_rope_layers: Optional[list[int]] = None  # per layer: 1 = RoPE, 0 = no position embedding; null = by interval
    no_rope_layer_interval: int = 4  # without no_rope_layers: layers 3, 7, 11, ... (every 4th) skip RoPE
    layer_types: Optional[list[str]] = None  # full_attention | sliding_attention; null: NoPE ones slide

    LIMITS = {**LlamaConfig.LIMITS, "sliding_window": POSITIVE, "no_rope_layers": Limit(choices=(0, 1)),
              "no_rope_layer_interval": POSITIVE, "layer_types": LAYER_TYPE}

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        out = super().read_fields(f)
        layers = out.get("num_hidden_layers", cls.num_hidden_layers)
        rope_layers = out.get("no_rope_layers")
        if rope_layers is not None and len(rope_layers) < layers:
            raise f.unsupported("no_rope_layers", f"it has {len(rope_layers)} entries for num_hidden_layers={layers} "
                                f"layers (transformers fails on it too); give one entry per layer (1 = RoPE, 0 = none)")
        types = out.get("layer_types")
        if types is not None and "sliding_attention" in types and not out.get("use_sliding_window", False):
            raise f.unsupported("layer_types", "it names sliding_attention layers while use_sliding_window is false, "
                                "on which transformers' attention implementations disagree (its masks slide, flash "
                                "attention does not); set use_sliding_window to true, or make every layer "
                                "full_attention")
        check_layer_types(f, types, layers, out.get("sliding_window"), "sliding_window is null")
        return out

    def rope(self, layer: int) -> bool:
        """Whether `layer` rotates its queries and keys (RoPE) or uses no position embedding (NoPE)."""
        if self.no_rope_layers is not None:
            return bool(self.no_rope_layers[layer])
        return (layer + 1) % self.no_rope_layer_interval != 0

    @property
    def kinds(self) -> list[str]:
        """Each layer's attention: "full_attention" or "sliding_attention", as transformers decides."""
        if self.layer_types is not None:
            return layer_kinds(self.layer_types)
        slides = self.use_sliding_window and self.sliding_window is not None
        return ["sliding_attention" if slides and not self.rope(i) else "full_attention"
                for i in range(self.num_hidden_layers)]

    def window(self, layer: int) -> Optional[tuple[int, int]]:
        return (self.sliding_window - 1, 0) if self.kinds[layer] == "sliding_attention" else None


class SmolLM3DecoderLayer(LlamaDecoderLayer):
    """Llama's block; a NoPE layer attends without rotating its queries and keys."""

    def __init__(self, c: SmolLM3Config, layer_idx: int):
        super().__init__(c, layer_idx)
        self.use_rope = c.rope(layer_idx)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        return super().forward(x, mask, rotary if self.use_rope else None, cache)


class SmolLM3ForCausalLM(LlamaForCausalLM):
    """A SmolLM3 decoder with its LM head: Llama's skeleton and hooks, with NoPE and sliding layers."""

    layer_class = SmolLM3DecoderLayer


FAMILY = Family(architectures=("SmolLM3ForCausalLM",), model_type="smollm3", config=SmolLM3Config,
                model=SmolLM3ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

"""Qwen2 decoder (Yang et al. 2024, "Qwen2 Technical Report"), loading Hugging Face
`Qwen2ForCausalLM` folders: a Llama (llama.py) with biases on the q, k and v projections and
none on the output projection. Weight names, plan and modules are Llama's. Layers may slide, as
transformers 5.24 runs them: with `use_sliding_window`, the layers `layer_types` names
`sliding_attention` (by default those from `max_window_layers` on) attend to themselves and the
`sliding_window - 1` tokens before, through `qkv.attention`'s window (Qwen2.5 and Qwen3 configs
carry these fields; the released models leave `use_sliding_window` false). The layer_types
helpers here are shared with qwen3.py and smollm3.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .common import Family
from .fields import NON_NEGATIVE, POSITIVE, Fields, Limit
from .llama import LlamaConfig, LlamaForCausalLM, hf_ignored, hf_layers, hf_plan

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
class Qwen2Config(LlamaConfig):
    # transformers' Qwen2Config defaults, for fields a config.json leaves out
    vocab_size: int = 151936
    intermediate_size: int = 22016
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
        out.pop("mlp_bias", None)  # not a Qwen2/Qwen3 field: their MLPs never have biases
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

    qkv_bias = property(lambda self: True)  # Qwen2 always has q/k/v biases; attention_bias is not a Qwen2 field
    out_bias = property(lambda self: False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """A Qwen2 decoder with its LM head: Llama's modules, with q/k/v biases."""


FAMILY = Family(architectures=("Qwen2ForCausalLM",), model_type="qwen2", config=Qwen2Config,
                model=Qwen2ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

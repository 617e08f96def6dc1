"""Qwen2 decoder (Yang et al. 2024, "Qwen2 Technical Report"), loading Hugging Face
`Qwen2ForCausalLM` folders: a Llama (llama.py) with biases on the q, k and v projections and
none on the output projection. Weight names, plan and modules are Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .common import Family
from .fields import Fields
from .llama import LlamaConfig, LlamaForCausalLM, hf_ignored, hf_layers, hf_plan


@dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    # transformers' Qwen2Config defaults, for fields a config.json leaves out
    vocab_size: int = 151936
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        if f.get("use_sliding_window", bool, False):
            raise f.unsupported("use_sliding_window", "qkv's Qwen2 attends to every earlier token (the released "
                                "Qwen2 models do); set use_sliding_window to false")
        if "sliding_attention" in (f.get("layer_types", Optional[list[str]], None) or []):
            raise f.unsupported("layer_types", "qkv's Qwen2 attends to every earlier token in every layer; "
                                "use full_attention layers (use_sliding_window false)")
        return super().read_fields(f)

    qkv_bias = property(lambda self: True)  # Qwen2 always has q/k/v biases; attention_bias is not a Qwen2 field
    out_bias = property(lambda self: False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """A Qwen2 decoder with its LM head: Llama's modules, with q/k/v biases."""


FAMILY = Family(architectures=("Qwen2ForCausalLM",), model_type="qwen2", config=Qwen2Config,
                model=Qwen2ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

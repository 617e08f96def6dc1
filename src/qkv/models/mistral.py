"""Mistral decoder (Jiang et al. 2023, "Mistral 7B"), loading Hugging Face `MistralForCausalLM`
folders: a Llama (llama.py) whose self-attention may look back over a sliding window of
`sliding_window` tokens (Beltagy et al. 2020, "Longformer"; Child et al. 2019), run as
`qkv.attention`'s causal window. Weight names, plan and modules are Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .common import Family
from .fields import POSITIVE
from .llama import LlamaConfig, LlamaForCausalLM, hf_ignored, hf_layers, hf_plan


@dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    # transformers' MistralConfig defaults (Mistral 7B), for fields a config.json leaves out
    intermediate_size: int = 14336
    num_key_value_heads: Optional[int] = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: Optional[int] = 4096  # a token attends to itself and the sliding_window - 1 before it; None = all

    LIMITS = {**LlamaConfig.LIMITS, "sliding_window": POSITIVE}

    def window(self, layer: int) -> Optional[tuple[int, int]]:
        return None if self.sliding_window is None else (self.sliding_window - 1, 0)


class MistralForCausalLM(LlamaForCausalLM):
    """A Mistral decoder with its LM head: Llama's modules, with a sliding window."""


FAMILY = Family(architectures=("MistralForCausalLM",), model_type="mistral", config=MistralConfig,
                model=MistralForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

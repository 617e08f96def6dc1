"""Phi-3 decoder (Abdin et al. 2024, "Phi-3 Technical Report: A Highly Capable Language Model
Locally on Your Phone"), loading Hugging Face `Phi3ForCausalLM` folders (Phi-3, Phi-3.5 mini,
Phi-4-mini).

A Llama (llama.py) with these differences:

- the checkpoint stores q, k and v as one matrix `self_attn.qkv_proj.weight` (rows q | k | v),
  which is `MultiHeadAttention`'s fused `qkv_proj` as it is, and gate and up as one
  `mlp.gate_up_proj.weight` (rows gate | up), kept under that name and split in `Phi3MLP`;
  no biases anywhere;
- `partial_rotary_factor` (Phi-4-mini: 0.75): RoPE rotates the first int(D * factor) features
  of each head;
- `sliding_window`: each token attends to itself and the sliding_window - 1 before it, as in
  Mistral (transformers 5.24's Phi3 masks it; Phi-3-mini-4k has 2047);
- longrope scaling (Ding et al. 2024, "LongRoPE"; the 128k models): short factors up to
  `original_max_position_embeddings`, long ones beyond (nn/positions.py). When generation
  crosses that length, transformers' Phi3ForCausalLM drops its cache and runs the whole
  sequence again with the long factors; `Phi3ForCausalLM.hidden` does the same;
- dropout on each block's attention and MLP outputs (`resid_pdrop`), training mode only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .checkpoint import Dim, ModelError, Piece, Plan
from .common import Family
from .fields import POSITIVE, PROBABILITY, Fields, read_dataclass
from .llama import (
    GateUpMLP,
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    _read_rope,
    hf_ignored,
    hf_layers,
    kept,
    norms_plan,
    outer_plan,
)

# rope types of a Phi-3 config -> the type qkv runs: transformers' Phi3Config allows default and
# longrope, and reads the older names su and yarn as longrope
_PHI3_ROPE = {"default": "default", "longrope": "longrope", "su": "longrope", "yarn": "longrope"}


@dataclass(frozen=True)
class Phi3Config(LlamaConfig):
    # transformers' Phi3Config defaults (Phi-3-mini-4k), for fields a config.json leaves out
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192  # the inner size of gate and of up (gate_up_proj holds both)
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096  # trained context: longrope's switch, and where generation recomputes
    rms_norm_eps: float = 1e-5
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, list[int]]] = 32000
    resid_pdrop: float = 0.0  # dropout on each block's attention and MLP outputs, training mode only
    embd_pdrop: float = 0.0  # read typed; transformers 5.24's Phi3Model does not apply it, nor does qkv
    sliding_window: Optional[int] = None  # a token attends to itself and the sliding_window - 1 before it
    partial_rotary_factor: float = 1.0  # RoPE rotates the first int(head_dim * factor) features of each head

    LIMITS = {**LlamaConfig.LIMITS, "original_max_position_embeddings": POSITIVE, "resid_pdrop": PROBABILITY,
              "embd_pdrop": PROBABILITY, "sliding_window": POSITIVE}

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        fields = read_dataclass(cls, f, limits=cls.LIMITS, skip=("rope_scaling", "partial_rotary_factor"))
        original = fields.get("original_max_position_embeddings", cls.original_max_position_embeddings)
        return {**fields, **_read_rope(f, cls, partial=True, kinds=_PHI3_ROPE, original=original)}

    def check(self, source) -> None:
        super().check(source)
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ModelError(f"{source}: partial_rotary_factor={self.partial_rotary_factor:g} rotates "
                             f"{self.rotary_dim} of the {self.dim_per_head} features of each head; rotary "
                             f"embeddings rotate pairs, so that must be even and positive; correct the factor")

    @property
    def rotary_dim(self) -> int:
        """R, the rotated features of each head."""
        return int(self.dim_per_head * self.partial_rotary_factor)

    qkv_bias = property(lambda self: False)  # Phi-3 has no biases (attention_bias is not a Phi-3 field)
    out_bias = property(lambda self: False)

    def window(self, layer: int) -> Optional[tuple[int, int]]:
        return None if self.sliding_window is None else (self.sliding_window - 1, 0)


Phi3MLP = GateUpMLP  # SwiGLU with gate and up in one projection, gate_up_proj (rows gate | up)


class Phi3DecoderLayer(LlamaDecoderLayer):
    """Llama's block with the fused MLP and dropout on both residual branches (training only)."""

    def __init__(self, c: Phi3Config, layer_idx: int):
        super().__init__(c, layer_idx)
        self.resid_attn_dropout = nn.Dropout(c.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(c.resid_pdrop)

    def make_mlp(self, c: Phi3Config) -> nn.Module:
        return Phi3MLP(c)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache=None) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions, (.., R)."""
        x = x + self.resid_attn_dropout(self.attend(self.input_layernorm(x), mask, rotary, cache))  # (B, L, E)
        return x + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))


class Phi3ForCausalLM(LlamaForCausalLM):
    """A Phi-3 decoder with its LM head: Llama's skeleton and hooks over Phi-3's layers (RoPE tables
    of the R rotated features)."""

    layer_class = Phi3DecoderLayer

    def hidden(self, input_ids: Tensor, *, attention_mask: Optional[Tensor] = None, cache=None,
               positions: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> Tensor:
        """As `CausalLM.hidden`; during `generate` with longrope, the step that takes the sequence
        past original_max_position_embeddings runs the whole sequence again from an empty cache
        (the long factors for every position), as transformers' Phi3ForCausalLM does."""
        run = self._generation
        if run is None or cache is None or not self._length_rotaries():
            return super().hidden(input_ids, attention_mask=attention_mask, cache=cache, positions=positions,
                                  chunk_size=chunk_size)
        n, (B, L) = cache.length, input_ids.shape
        pos = positions if positions is not None else torch.arange(n, n + L, device=input_ids.device)
        run.setdefault("ids", []).append(input_ids)  # every token the cache holds, to run them again
        run.setdefault("positions", []).append(pos.expand(B, L))
        switch = self.config.original_max_position_embeddings
        if run["prompt"] is not None and n >= run["prompt"] and n <= switch < n + L:
            every_id = torch.cat(run["ids"], dim=1)  # (B, n + L)
            every_pos = None if positions is None else torch.cat(run["positions"], dim=1)  # (B, n + L)
            cache.crop(0)
            return super().hidden(every_id, attention_mask=attention_mask, cache=cache,
                                  positions=every_pos)[:, -L:]  # (B, L, E)
        return super().hidden(input_ids, attention_mask=attention_mask, cache=cache, positions=positions,
                              chunk_size=chunk_size)


def hf_plan(c: Phi3Config) -> Plan:
    """Checkpoint names of a Hugging Face Phi3ForCausalLM -> qkv parameter names (pure).

    The fused `self_attn.qkv_proj.weight` (rows q | k | v) is MultiHeadAttention's `qkv_proj` as
    it is; o_proj becomes `self_attn.out_proj`; `mlp.gate_up_proj` and everything else keep
    their names.
    """
    E, FF = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size")
    D = c.dim_per_head
    q_out, kv_out = c.num_attention_heads * D, c.kv_heads * D
    plan = outer_plan(c)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.update(kept(p + "self_attn.", {"qkv_proj.weight": (q_out + 2 * kv_out, E)}))
        plan[p + "self_attn.out_proj.weight"] = (Piece(p + "self_attn.o_proj.weight", (E, q_out)),)
        plan.update(kept(p + "mlp.", {"gate_up_proj.weight": (2 * FF, E), "down_proj.weight": (E, FF)}))
        plan.update(norms_plan(p, E))
    return plan


FAMILY = Family(architectures=("Phi3ForCausalLM",), model_type="phi3", config=Phi3Config,
                model=Phi3ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

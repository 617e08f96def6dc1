"""Gemma 3 text decoder (Gemma Team 2025, "Gemma 3 Technical Report"), loading Hugging Face
`Gemma3ForCausalLM` folders (config `Gemma3TextConfig`, model_type `gemma3_text`): Gemma 2
(gemma2.py) with

- q/k norms (Henry et al. 2020, "Query-Key Normalization for Transformers") in place of
  attention soft-capping: Gemma's (1 + w) RMSNorm over each head of the projected queries and
  keys, before RoPE (`MultiHeadAttention`'s q_norm/k_norm);
- five local layers to one global (`layer_types`; old configs: `sliding_window_pattern`, 6),
  windows of 512 to 1024 tokens;
- a RoPE per layer type: local layers rotate with base `rope_local_base_freq` (10^4), global
  ones with `rope_theta` (10^6) and the checkpoint's scaling (4B to 27B: linear, factor 8).
  transformers 5 stores both in `rope_parameters` = {"sliding_attention": {...},
  "full_attention": {...}}; older configs have `rope_theta`, `rope_local_base_freq` and a
  `rope_scaling` that applies to global layers. `embed` returns {layer type: (cos, sin)}, and
  each layer picks its own.

`attn_logit_softcapping` has no effect: transformers' Gemma 3 attention never applies it (the
released configs set it null), so qkv does not either. The final-logit cap applies if set.

`Gemma3ForConditionalGeneration` folders (the multimodal 4B-27B checkpoints: a SigLIP vision
tower and a projector around the text decoder, under `model.language_model.`) are refused with
a message naming `Gemma3ForCausalLM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..nn import RotaryEmbedding
from .checkpoint import Plan
from .common import Family
from .fields import POSITIVE, POSITIVE_REAL, Fields, read_dataclass
from .gemma import GemmaModel, refuse_bidirectional, scaled_embedding
from .gemma2 import FULL, SLIDING, Gemma2Config, Gemma2DecoderLayer, Gemma2ForCausalLM
from .gemma2 import hf_plan as gemma2_plan
from .llama import hf_ignored, hf_layers, per_layer, read_classic_scaling


@dataclass(frozen=True)
class Gemma3TextConfig(Gemma2Config):
    # transformers' Gemma3TextConfig defaults (Gemma 3 4B's text decoder), for fields a config.json leaves out
    vocab_size: int = 262_208
    max_position_embeddings: int = 131_072
    final_logit_softcapping: Optional[float] = None  # logits -> cap * tanh(logits / cap); None = off
    attn_logit_softcapping: Optional[float] = None  # read, never applied (transformers' Gemma 3 does not)
    rope_theta: float = 1_000_000.0  # global layers' RoPE base
    rope_local_base_freq: float = 10_000.0  # local layers' RoPE base
    local_rope_scaling: Optional[dict] = None  # local layers' scaling (rope_parameters.sliding_attention)
    sliding_window_pattern: int = 6  # old configs without layer_types: every 6th layer is global
    # rope_scaling (Llama's field): the global layers' scaling.

    LIMITS = {**Gemma2Config.LIMITS, "rope_local_base_freq": POSITIVE_REAL, "sliding_window_pattern": POSITIVE}

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        refuse_bidirectional(f, "Gemma 3")
        skip = ("rope_scaling", "mlp_bias", "hidden_act", "rope_theta", "rope_local_base_freq", "local_rope_scaling")
        return {**read_dataclass(cls, f, limits=cls.LIMITS, skip=skip), **_read_rope_per_type(f)}

    def default_types(self) -> list[str]:
        """Gemma 3: layer i is global when i + 1 is a multiple of sliding_window_pattern."""
        return [SLIDING if (i + 1) % self.sliding_window_pattern else FULL for i in range(self.num_hidden_layers)]

    attn_softcap = property(lambda self: None)  # transformers' Gemma 3 attention never soft-caps
    qk_norm = property(lambda self: True)


def _read_rope_per_type(f: Fields) -> dict:
    """rope_theta, rope_scaling (global layers), rope_local_base_freq, local_rope_scaling (local
    layers), merged as transformers 5's Gemma3TextConfig does: `rope_parameters` nested by layer
    type first, then the old `rope_scaling` over the global layers' entry, then the old
    `rope_theta` / `rope_local_base_freq` where an entry has no base, then the defaults."""
    _refuse_partial(f)
    nested = f.sub("rope_parameters")
    if nested is not None and not {FULL, SLIDING} & set(nested.data):
        raise f.unsupported("rope_parameters", f"Gemma 3 has one RoPE per layer type: nest the parameters under "
                            f"{FULL!r} (global layers) and {SLIDING!r} (local layers), as transformers 5 saves them")
    entries = {}
    for kind in (FULL, SLIDING):
        sub = nested.sub(kind) if nested is not None else None
        entries[kind] = (dict(sub.data), f"rope_parameters.{kind}.") if sub is not None else ({}, "")
    legacy = f.sub("rope_scaling")
    if legacy is not None:
        merged, _ = entries[FULL]
        legacy_type = legacy.get("type", str, None)
        if legacy_type is not None and "rope_type" not in legacy and merged.get("rope_type", "default") != legacy_type:
            raise legacy.unsupported("type", "transformers 5 merges rope_scaling into a global RoPE whose rope_type "
                                     "is already set and keeps that type (transformers 4 ran this one); write "
                                     "rope_type instead of type")
        entries[FULL] = ({**merged, **legacy.data}, "rope_scaling.")
    out = {}
    for kind, (theta_field, scaling_field) in {FULL: ("rope_theta", "rope_scaling"),
                                               SLIDING: ("rope_local_base_freq", "local_rope_scaling")}.items():
        data, prefix = entries[kind]
        rope = Fields(data, f.source, prefix=prefix, fix=f.fix)
        _refuse_partial(rope)
        old_base = f.get(theta_field, Optional[float], None, POSITIVE_REAL)  # the old top-level base
        theta = rope.get("rope_theta", Optional[float], None, POSITIVE_REAL)
        if theta is not None or old_base is not None:
            out[theta_field] = theta if theta is not None else old_base
        out[scaling_field] = read_classic_scaling(rope)  # one layer type's (None = default)
    return out


def _refuse_partial(g: Fields) -> None:
    if g.get("partial_rotary_factor", float, 1.0) != 1.0:
        raise g.unsupported("partial_rotary_factor", "Gemma 3 rotates whole heads (transformers' Gemma 3 "
                            "ignores the field); remove it or set it to 1.0")


class Gemma3TextModel(GemmaModel):
    """Gemma's model with a second RoPE: `rotary_emb` for global layers, `rotary_emb_local` for local ones."""

    def __init__(self, c: Gemma3TextConfig, layer: type = Gemma2DecoderLayer):
        super().__init__(c, layer)
        self.rotary_emb_local = RotaryEmbedding(c.dim_per_head, c.rope_local_base_freq,
                                                rope_scaling=c.local_rope_scaling)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """A Gemma 3 text decoder with its (tied) LM head."""

    model_class = Gemma3TextModel

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, dict]:
        """-> x (B, L, E), {layer type: (cos, sin) (L, D) or (B, 1, L, D)}; each layer takes its type's."""
        x = scaled_embedding(self.model.embed_tokens, input_ids)  # (B, L, E)
        return x, {FULL: self.model.rotary_emb(positions, dtype=x.dtype),
                   SLIDING: self.model.rotary_emb_local(positions, dtype=x.dtype)}


def hf_plan(c: Gemma3TextConfig) -> Plan:
    """Checkpoint names of a Hugging Face Gemma3ForCausalLM -> qkv parameter names (pure): Gemma 2's
    plus each layer's self_attn.q_norm and self_attn.k_norm (D,), which keep their names inside
    `MultiHeadAttention`."""
    D = c.dim_per_head
    return {**gemma2_plan(c), **per_layer(c, {"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})}


# Architectures of Gemma 3 that qkv refuses, with the reason and what runs instead (loading.py).
REFUSED = {
    "Gemma3ForConditionalGeneration": (
        "this is a multimodal Gemma 3 checkpoint (a SigLIP vision tower and projector around the text decoder, "
        "weights under model.language_model.); qkv runs Gemma 3's text decoder, Gemma3ForCausalLM (model_type "
        "gemma3_text, e.g. gemma-3-1b), not images; use a Gemma3ForCausalLM folder"
    ),
}


FAMILY = Family(architectures=("Gemma3ForCausalLM",), model_type="gemma3_text", config=Gemma3TextConfig,
                model=Gemma3ForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

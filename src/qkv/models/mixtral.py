"""Mixtral decoder (Jiang et al. 2024, "Mixtral of Experts"), loading Hugging Face
`MixtralForCausalLM` folders: a Mistral (mistral.py: Llama's attention, RMSNorm and RoPE, with
an optional sliding window) whose feed-forward is a sparse mixture of experts (Shazeer et al.
2017, "Outrageously Large Neural Networks"; Fedus et al. 2022, "Switch Transformers").

What differs from Llama: each block's MLP is `block_sparse_moe`, a router `gate` (E ->
num_local_experts, no bias) and `num_local_experts` SwiGLU experts (`w1` gate, `w3` up, `w2`
down). Per token, the router's logits go through a softmax over all experts; the
`num_experts_per_tok` largest probabilities are kept and renormalised to sum to 1 (transformers
5.24's order: softmax, top-k, renormalise); the token's output is the weighted sum of those
experts' outputs. qkv runs this as a loop over the experts, each on the tokens routed to it.

Checkpoints store the experts in one of two layouts, and qkv loads both (`_adapt` reads which
from the key names):

- per expert, `model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`: the Hub's
  Mixtral checkpoints, and what transformers 5.24's `save_pretrained` writes (it converts back);
- stacked, transformers 5's modules: `model.layers.{i}.mlp.gate.weight`,
  `mlp.experts.gate_up_proj` (experts, 2 FF, E: w1's rows, then w3's) and `mlp.experts.down_proj`
  (experts, E, FF), e.g. a state dict saved directly. The plan reads each expert's rows out of
  the stacked tensors (`Piece.index`).

transformers accepts either prefix (`block_sparse_moe.` or `mlp.`) with either layout, and so
does qkv. qkv's modules use the Hub's names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import KVCache, MultiHeadAttention, RotaryEmbedding
from .checkpoint import CheckpointError, Dim, ModelError, Piece, Plan
from .common import Family, activation
from .decoder import CausalLM
from .fields import NON_NEGATIVE, POSITIVE
from .llama import LlamaForCausalLM, LlamaRMSNorm
from .mistral import MistralConfig


@dataclass(frozen=True)
class MixtralConfig(MistralConfig):
    # transformers' MixtralConfig defaults (Mixtral 8x7B), for fields a config.json leaves out
    intermediate_size: int = 14336  # FF of each expert
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6  # transformers' default_theta for Mixtral
    sliding_window: Optional[int] = None  # Mixtral attends to every earlier token unless set
    num_local_experts: int = 8  # experts per block
    num_experts_per_tok: int = 2  # k: experts each token is routed to
    router_jitter_noise: float = 0.0  # j: the block's input times uniform noise in [1 - j, 1 + j], training only
    # Fields with no effect on what qkv computes (read only to be typed): output_router_logits
    # returns the router logits, router_aux_loss_coef weights the load-balancing loss in training.
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001

    LIMITS = {**MistralConfig.LIMITS, "num_local_experts": POSITIVE, "num_experts_per_tok": POSITIVE,
              "router_jitter_noise": NON_NEGATIVE, "router_aux_loss_coef": NON_NEGATIVE}

    def check(self, source) -> None:
        super().check(source)
        if self.num_experts_per_tok > self.num_local_experts:
            raise ModelError(f"{source}: num_experts_per_tok={self.num_experts_per_tok} is more than "
                             f"num_local_experts={self.num_local_experts}; a token is routed to k of the experts, "
                             f"so correct one of them (Mixtral 8x7B: 2 of 8)")

    # transformers' Mixtral has no attention biases (attention_bias and mlp_bias are not its fields)
    qkv_bias = property(lambda self: False)
    out_bias = property(lambda self: False)


class MixtralExpert(nn.Module):
    """One expert: a SwiGLU MLP under the Hub's names, w2(act(w1(x)) * w3(x))."""

    def __init__(self, c: MixtralConfig):
        super().__init__()
        self.w1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)  # down
        self.w3 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)  # up
        self._act = activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, E) -> (N, E)."""
        return self.w2(self._act(self.w1(x)) * self.w3(x))


class MixtralSparseMoeBlock(nn.Module):
    """The mixture of experts that replaces Llama's MLP: a router picks k experts per token."""

    def __init__(self, c: MixtralConfig):
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.jitter_noise = c.router_jitter_noise
        self.gate = nn.Linear(c.hidden_size, c.num_local_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MixtralExpert(c) for _ in range(c.num_local_experts))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, E) -> (B, L, E): each token through its k experts, weighted by the router."""
        B, L, E = x.shape
        x = x.reshape(B * L, E)  # (N, E): tokens are routed one by one
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, experts), float32 as transformers
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k) each: the k most probable experts
        weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, k): the chosen weights sum to 1
        out = torch.zeros_like(x)  # (N, E)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # (n_e,) each: tokens routed to e, at which of their k
            if token.numel() == 0:
                continue
            y = expert(x[token]) * weights[token, slot, None]  # (n_e, E) float32
            out.index_add_(0, token, y.to(x.dtype))
        return out.view(B, L, E)


class MixtralDecoderLayer(nn.Module):
    """Llama's pre-norm block (llama.py) with the mixture of experts in place of the MLP."""

    def __init__(self, c: MixtralConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = MultiHeadAttention(
            c.hidden_size, c.num_attention_heads, num_kv_heads=c.kv_heads, head_dim=c.dim_per_head,
            bias=False, dropout=c.attention_dropout,
        )
        self.window = c.window(layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.block_sparse_moe = MixtralSparseMoeBlock(c)

    def forward(self, x: Tensor, mask: Optional[Tensor], rotary: tuple[Tensor, Tensor],
                cache: Optional[KVCache]) -> Tensor:
        """x (B, L, E), mask (B, 1, 1, n + L) or None, rotary (cos, sin) of the new positions."""
        x = x + self.self_attn(self.input_layernorm(x), mask=mask, causal=True, window=self.window, rotary=rotary,
                               cache=cache, layer=self.layer_idx)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MixtralModel(nn.Module):
    def __init__(self, c: MixtralConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(MixtralDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(c.dim_per_head, c.rope_theta, rope_scaling=c.rope_scaling)


class MixtralForCausalLM(LlamaForCausalLM):
    """A Mixtral decoder with its LM head: Llama's hooks (`embed`, `blocks`, ...) over Mixtral's body."""

    def __init__(self, config: MixtralConfig):
        CausalLM.__init__(self, config)  # not Llama's body: Mixtral's
        self.model = MixtralModel(config)
        self.add_lm_head(config.hidden_size, config.vocab_size)


def hf_plan(c: MixtralConfig, moe: str = "block_sparse_moe", stacked: bool = False) -> Plan:
    """Checkpoint names of a Hugging Face MixtralForCausalLM -> qkv parameter names (pure).

    Attention, norms and embeddings are Llama's (q/k/v fused into `self_attn.qkv_proj`, o_proj
    is `self_attn.out_proj`). `moe` is the checkpoint's name of the block ("block_sparse_moe"
    or transformers 5's "mlp"); `stacked`: the experts are transformers 5's stacked tensors,
    whose rows each expert's w1, w3 and w2 are read from.
    """
    E, FF = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size")
    V, D, n = Dim(c.vocab_size, "vocab_size"), c.dim_per_head, Dim(c.num_local_experts, "num_local_experts")
    q_out, kv_out = c.num_attention_heads * D, c.kv_heads * D
    plan: dict[str, tuple[Piece, ...]] = {
        "model.embed_tokens.weight": (Piece("model.embed_tokens.weight", (V, E)),),
        "model.norm.weight": (Piece("model.norm.weight", (E,)),),
    }
    if not c.tie_word_embeddings:
        plan["lm_head.weight"] = (Piece("lm_head.weight", (V, E)),)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        plan[p + "self_attn.qkv_proj.weight"] = (
            Piece(p + "self_attn.q_proj.weight", (q_out, E)),
            Piece(p + "self_attn.k_proj.weight", (kv_out, E)),
            Piece(p + "self_attn.v_proj.weight", (kv_out, E)),
        )
        plan[p + "self_attn.out_proj.weight"] = (Piece(p + "self_attn.o_proj.weight", (E, q_out)),)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plan[p + f"{norm}.weight"] = (Piece(p + f"{norm}.weight", (E,)),)
        ours, theirs = p + "block_sparse_moe.", p + moe + "."
        plan[ours + "gate.weight"] = (Piece(theirs + "gate.weight", (n, E)),)
        for e in range(c.num_local_experts):
            w = ours + f"experts.{e}."
            if stacked:  # gate_up_proj[e] is (2 FF, E): w1's rows, then w3's
                gate_up = (theirs + "experts.gate_up_proj", (n, 2 * FF, E))
                down = (theirs + "experts.down_proj", (n, E, FF))
                plan[w + "w1.weight"] = (Piece(*gate_up, index=(e, slice(0, FF))),)
                plan[w + "w3.weight"] = (Piece(*gate_up, index=(e, slice(FF, 2 * FF))),)
                plan[w + "w2.weight"] = (Piece(*down, index=(e,)),)
            else:
                for name, shape in (("w1", (FF, E)), ("w2", (E, FF)), ("w3", (FF, E))):
                    plan[w + f"{name}.weight"] = (Piece(theirs + f"experts.{e}.{name}.weight", shape),)
    return plan


def hf_layers(c: MixtralConfig, moe: str = "block_sparse_moe", stacked: bool = False) -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning (the experts are counted by `_adapt`)."""
    return [("num_hidden_layers", c.num_hidden_layers, "model.layers.")]


def hf_ignored(c: MixtralConfig, moe: str = "block_sparse_moe", stacked: bool = False) -> dict:
    """Keys that are not weights: RoPE's inv_freq in older checkpoints, a stored copy of a tied lm_head."""
    out: dict = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (c.dim_per_head // 2,)
                 for i in range(c.num_hidden_layers)}
    if c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return out


def _adapt(c: MixtralConfig, shapes) -> tuple[MixtralConfig, tuple]:
    """The experts' layout from the key names: the block's name ("block_sparse_moe", the Hub's,
    or "mlp", transformers 5's) and whether the experts are stacked. The experts of layer 0 are
    counted against num_local_experts here, before a plan with one entry per expert is built."""
    moe = "mlp" if any(".mlp.gate." in k or ".mlp.experts." in k for k in shapes) else "block_sparse_moe"
    experts = f"model.layers.0.{moe}.experts."
    stacked = experts + "gate_up_proj" in shapes
    if stacked:
        shape = tuple(shapes[experts + "gate_up_proj"][0])  # (experts, 2 FF, E)
        held = shape[0] if shape else 0
    else:
        held = len({k[len(experts):].split(".")[0] for k in shapes if k.startswith(experts)})
    if held and held != c.num_local_experts:
        raise CheckpointError(f"config.json: num_local_experts={c.num_local_experts}, but the checkpoint holds {held} "
                              f"experts ({experts}...); set num_local_experts to {held}, or use the config.json that "
                              f"belongs to these weights")
    return c, (moe, stacked)


FAMILY = Family(architectures=("MixtralForCausalLM",), model_type="mixtral", config=MixtralConfig,
                model=MixtralForCausalLM, plan=hf_plan, layers=hf_layers, ignored=hf_ignored, adapt=_adapt)

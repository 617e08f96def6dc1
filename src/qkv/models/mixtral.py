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

from .checkpoint import CheckpointError, Dim, ModelError, Piece, Plan
from .common import Family, activation
from .fields import NON_NEGATIVE, POSITIVE
from .llama import LlamaDecoderLayer, LlamaForCausalLM, attention_plan, norms_plan, outer_plan
from .llama import hf_ignored as llama_ignored
from .llama import hf_layers as llama_layers
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


class MixtralDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm block (llama.py) with the mixture of experts in place of the MLP."""

    mlp_name = "block_sparse_moe"  # the Hub's name for the block's feed-forward

    def make_mlp(self, c: MixtralConfig) -> nn.Module:
        return MixtralSparseMoeBlock(c)


class MixtralForCausalLM(LlamaForCausalLM):
    """A Mixtral decoder with its LM head: Llama's skeleton and hooks, with Mixtral's layers."""

    layer_class = MixtralDecoderLayer


def hf_plan(c: MixtralConfig, moe: str = "block_sparse_moe", stacked: bool = False) -> Plan:
    """Checkpoint names of a Hugging Face MixtralForCausalLM -> qkv parameter names (pure).

    Attention, norms and embeddings are Llama's (q/k/v fused into `self_attn.qkv_proj`, o_proj
    is `self_attn.out_proj`). `moe` is the checkpoint's name of the block ("block_sparse_moe"
    or transformers 5's "mlp"); `stacked`: the experts are transformers 5's stacked tensors,
    whose rows each expert's w1, w3 and w2 are read from.
    """
    E, FF = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size")
    n = Dim(c.num_local_experts, "num_local_experts")
    plan = outer_plan(c)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.update(attention_plan(p, c, E, qkv_bias=False, out_bias=False))
        plan.update(norms_plan(p, E))
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
    """Llama's (the experts are counted by `_adapt`)."""
    return llama_layers(c)


def hf_ignored(c: MixtralConfig, moe: str = "block_sparse_moe", stacked: bool = False) -> dict:
    """Llama's: RoPE's inv_freq in older checkpoints, a stored copy of a tied lm_head."""
    return llama_ignored(c)


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

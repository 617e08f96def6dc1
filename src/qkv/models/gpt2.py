"""GPT-2 decoder with its language-model head (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners"), loading Hugging Face `GPT2LMHeadModel` folders.

Pre-LayerNorm blocks: x = x + Attn(LN(x)); x = x + MLP(LN(x)); learned absolute positions;
the LM head is tied to the token embedding. Module names are Hugging Face's; the attention
projections are `attn.qkv_proj` / `attn.out_proj` of a qkv MultiHeadAttention, filled from
GPT-2's transposed Conv1D weights `attn.c_attn` / `attn.c_proj` by `hf_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..nn import KVCache, LearnedPositions, MultiHeadAttention
from .bert import ACTIVATION, activation
from .checkpoint import Dim, ModelError, Piece, Plan
from .fields import EPS, NON_NEGATIVE, POSITIVE, PROBABILITY, Fields, read_dataclass, refuse_common
from .generation import PREFILL_CHUNK, check_chunk_size, chunked_hidden
from .generation import generate as _generate
from .tokenizer import Tokenizer


# config.json ranges; a field not listed has no range beyond its type
_LIMITS = {
    "vocab_size": POSITIVE, "n_positions": POSITIVE, "n_embd": POSITIVE, "n_layer": POSITIVE, "n_head": POSITIVE,
    "n_inner": POSITIVE, "activation_function": ACTIVATION, "layer_norm_epsilon": EPS, "resid_pdrop": PROBABILITY,
    "embd_pdrop": PROBABILITY, "attn_pdrop": PROBABILITY, "bos_token_id": NON_NEGATIVE, "eos_token_id": NON_NEGATIVE,
}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257  # byte-level BPE vocabulary of the released GPT-2
    n_positions: int = 1024  # learned absolute positions: the longest sequence
    n_embd: int = 768  # E
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads, D = n_embd / n_head
    n_inner: Optional[int] = None  # MLP inner size; None = 4 * n_embd
    activation_function: str = "gelu_new"  # tanh-approximated GELU
    layer_norm_epsilon: float = 1e-5  # LayerNorm eps
    resid_pdrop: float = 0.1  # dropout, training mode only
    embd_pdrop: float = 0.1  # dropout on embeddings, training mode only
    attn_pdrop: float = 0.1  # dropout on attention weights, training mode only
    scale_attn_weights: bool = True  # scores scaled by 1/sqrt(D)
    scale_attn_by_inverse_layer_idx: bool = False  # and by 1/(layer + 1) (Mistral's GPT-2 runs)
    bos_token_id: Optional[int] = 50256  # <|endoftext|>
    eos_token_id: Optional[Union[int, list[int]]] = 50256  # generation stops here (a list: at any); None = never
    tie_word_embeddings: bool = True  # lm_head shares wte's weight

    @classmethod
    def from_hf(cls, d: dict, source="config.json") -> "GPT2Config":
        """Read a Hugging Face config.json dict: every field qkv uses, typed and range-checked,
        and the fields that change the math in ways qkv does not run refused by name
        (docs/models.md lists every field). `source` names the file in messages."""
        f = Fields(d, source)
        refuse_common(f)
        if f.get("add_cross_attention", bool, False):
            raise f.unsupported("add_cross_attention", "qkv's GPT-2 has no cross-attention layers; use the "
                                "folder of a plain GPT2LMHeadModel (add_cross_attention false)")
        # reorder_and_upcast_attn is a numerical detail of HF's eager path (scores in float32);
        # qkv.attention accumulates low precision in float32 anyway, so it needs no field.
        cfg = cls(**read_dataclass(cls, f, limits=_LIMITS))
        if cfg.n_embd % cfg.n_head:
            raise ModelError(f"{source}: n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}; correct one "
                             f"of them (the head size is their quotient)")
        return cfg

    @property
    def inner(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class GPT2MLP(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, c.inner)
        self.c_proj = nn.Linear(c.inner, c.n_embd)
        self.dropout = nn.Dropout(c.resid_pdrop)
        self._act = activation(c.activation_function)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self._act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, c: GPT2Config, layer_idx: int):
        super().__init__()
        D = c.n_embd // c.n_head
        scale = (D ** -0.5 if c.scale_attn_weights else 1.0) / ((layer_idx + 1) if c.scale_attn_by_inverse_layer_idx else 1)
        self.layer_idx = layer_idx
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.attn = MultiHeadAttention(c.n_embd, c.n_head, dropout=c.attn_pdrop, scale=scale)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = GPT2MLP(c)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def forward(self, x: Tensor, mask: Optional[Tensor], cache: Optional[KVCache]) -> Tensor:
        x = x + self.resid_dropout(self.attn(self.ln_1(x), mask=mask, causal=True, cache=cache, layer=self.layer_idx))
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = LearnedPositions(c.n_positions, c.n_embd)
        self.drop = nn.Dropout(c.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(c, i) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its LM head. `forward` gives logits; `generate` extends prompts with a KV cache."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.tokenizer: Optional[Tokenizer] = None

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache:
        """An empty KV cache for `batch` sequences, preallocated for `capacity` tokens."""
        c = self.config
        w = self.transformer.wte.weight
        return KVCache(c.n_layer, batch, c.n_head, c.n_embd // c.n_head, capacity=capacity, dtype=w.dtype, device=w.device)

    def hidden(self, input_ids: Tensor, *, attention_mask: Optional[Tensor] = None,
               cache: Optional[KVCache] = None, positions: Optional[Tensor] = None,
               chunk_size: Optional[int] = None) -> Tensor:
        """Final hidden states (after ln_f).

        Args:
            input_ids: (B, L) int64; with a cache, the new tokens only.
            attention_mask: (B, n + L) bool/0-1 over cached and new tokens (padding = False);
                positions still count every slot, as Hugging Face does without position_ids.
            positions: (B, L) int64 position of each new token (default: cache length onwards);
                left-padded batches pass positions that count real tokens only.
            cache: a KVCache from `new_cache`; the new keys and values are appended.
            chunk_size: run the input in chunks of this many tokens (chunked prefill: each chunk
                attends to the cache so far and itself; without a cache, a temporary one), so
                activations stay the size of one chunk; None = all at once. Same result.

        Returns:
            (B, L, E).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L); got shape {tuple(input_ids.shape)}")
        start = cache.length if cache is not None else 0
        L = input_ids.shape[1]
        if start + L > self.config.n_positions:
            raise ModelError(
                f"sequence of {start + L} tokens exceeds this model's {self.config.n_positions} positions; "
                f"shorten the input (or truncate it)"
            )
        check_chunk_size(chunk_size)
        if chunk_size is not None and L > chunk_size:
            return chunked_hidden(self, input_ids, chunk_size, cache=cache, attention_mask=attention_mask,
                                  positions=positions)
        pos = torch.arange(start, start + L, device=input_ids.device) if positions is None else positions  # (L,) | (B, L)
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, n + L)
        t = self.transformer
        x = t.drop(t.wte(input_ids) + t.wpe(pos))  # (B, L, E)
        for block in t.h:
            x = block(x, mask, cache)
        return t.ln_f(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., E) -> (..., V)."""
        return self.lm_head(hidden)

    def forward(self, input_ids: Tensor, *, attention_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, chunk_size: Optional[int] = None) -> Tensor:
        """input_ids (B, L) -> logits (B, L, V); see `hidden` for the arguments."""
        return self.logits(self.hidden(input_ids, attention_mask=attention_mask, cache=cache, chunk_size=chunk_size))

    def generate(self, prompt: Union[str, list, Tensor], *, max_new_tokens: int = 20, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 eos_token_id: Optional[int] = -1, attention_mask: Optional[Tensor] = None,
                 prefill_chunk: Optional[int] = PREFILL_CHUNK) -> Tensor:
        """Extend prompts; see `qkv.models.generation.generate` for the sampling arguments.

        Args:
            prompt: a text or a list of texts (tokenised with the model's tokenizer; texts of
                different lengths are padded on the left), or ids (B, L) / (L,).
            eos_token_id: -1 = the config's eos_token_id; None = never stop early.
            attention_mask: (B, L) bool for left-padded ids (False = padding).
            prefill_chunk: the prompt fills the KV cache in chunks of at most this many tokens
                (default 2048; the same tokens as one pass, with less memory); None = one pass.

        Returns:
            (B, L + T) int64 ids, prompts as given (left-padded for texts of different lengths).
        """
        return _decoder_generate(self, prompt, self.config.n_positions, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                 eos_token_id=self.config.eos_token_id if eos_token_id == -1 else eos_token_id)

    def complete(self, text: str, **kwargs) -> str:
        """The text a prompt is extended with (arguments as `generate`)."""
        return _decoder_complete(self, text, **kwargs)


def _left_pad(ids: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (B, L) ids and mask -> the same rows padded on the left (decoders append on the right)."""
    lengths = mask.sum(dim=1)  # (B,)
    L = ids.shape[1]
    out_ids = torch.full_like(ids, pad_id)
    out_mask = torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        out_ids[i, L - n:] = ids[i, :n]
        out_mask[i, L - n:] = True
    return out_ids, out_mask


def _decoder_generate(model, prompt, max_length: int, *, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
    if isinstance(prompt, (str, list, tuple)):
        if model.tokenizer is None:
            raise ModelError("this model has no tokenizer; pass token ids, or load it with qkv.load(folder)")
        if attention_mask is not None:
            raise ValueError("attention_mask goes with token ids; texts are padded by qkv")
        batch = model.tokenizer(prompt, max_length=10**9)  # right-padded (N, L); generate checks the length
        ids, attention_mask = _left_pad(batch.input_ids, batch.attention_mask, model.tokenizer.pad_id)
    elif isinstance(prompt, Tensor):
        ids = prompt.unsqueeze(0) if prompt.dim() == 1 else prompt
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    else:
        raise TypeError(f"prompt must be a string, a list of strings or a tensor of token ids; got {type(prompt).__name__}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        mask = attention_mask.to(device).bool() if attention_mask is not None else None
        return _generate(model, ids.to(device), max_length=max_length, attention_mask=mask, **kwargs)
    finally:
        model.train(was_training)


def _decoder_complete(model, text: str, **kwargs) -> str:
    if model.tokenizer is None:
        raise ModelError("this model has no tokenizer; load it with qkv.load(folder)")
    if not isinstance(text, str):
        raise TypeError(f"complete takes one text; got {type(text).__name__} (use generate for batches)")
    prompt = model.tokenizer(text, max_length=10**9).input_ids  # (1, L); generate checks the length
    out = model.generate(prompt, **kwargs)
    return model.tokenizer.decode(out[0, prompt.shape[1]:])


def hf_plan(c: GPT2Config, prefix: str = "transformer.") -> Plan:
    """Checkpoint names of a Hugging Face GPT-2 -> qkv parameter names (pure).

    GPT-2 stores its projections as Conv1D, weight (in, out): each is transposed into
    nn.Linear's (out, in). `attn.c_attn` becomes `attn.qkv_proj`, `attn.c_proj` `attn.out_proj`.
    `prefix` is "transformer." for GPT2LMHeadModel checkpoints and "" for GPT2Model ones.
    """
    E, I, V = Dim(c.n_embd, "n_embd"), Dim(c.inner, "n_inner"), Dim(c.vocab_size, "vocab_size")
    plan: dict[str, tuple[Piece, ...]] = {
        "transformer.wte.weight": (Piece(prefix + "wte.weight", (V, E)),),
        "transformer.wpe.weight": (Piece(prefix + "wpe.weight", (Dim(c.n_positions, "n_positions"), E)),),
        "transformer.ln_f.weight": (Piece(prefix + "ln_f.weight", (E,)),),
        "transformer.ln_f.bias": (Piece(prefix + "ln_f.bias", (E,)),),
    }
    for i in range(c.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"{prefix}h.{i}."
        for ln in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                plan[ours + f"{ln}.{kind}"] = (Piece(theirs + f"{ln}.{kind}", (E,)),)
        for mine, hf, n_in, n_out in (("attn.qkv_proj", "attn.c_attn", E, 3 * E), ("attn.out_proj", "attn.c_proj", E, E),
                                      ("mlp.c_fc", "mlp.c_fc", E, I), ("mlp.c_proj", "mlp.c_proj", I, E)):
            plan[ours + f"{mine}.weight"] = (Piece(theirs + f"{hf}.weight", (n_in, n_out), transpose=True),)
            plan[ours + f"{mine}.bias"] = (Piece(theirs + f"{hf}.bias", (n_out,)),)
    if not c.tie_word_embeddings:
        plan["lm_head.weight"] = (Piece("lm_head.weight", (V, E)),)
    return plan


def hf_layers(c: GPT2Config, prefix: str = "transformer.") -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning."""
    return [("n_layer", c.n_layer, prefix + "h.")]


def hf_ignored(c: GPT2Config, prefix: str = "transformer.") -> dict:
    """Keys that are not weights: older checkpoints store the causal mask buffers, and a tied
    lm_head.weight may be saved as a copy of wte."""
    out: dict = {}
    for i in range(c.n_layer):
        out[f"{prefix}h.{i}.attn.bias"] = None
        out[f"{prefix}h.{i}.attn.masked_bias"] = None
    if c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.n_embd)
    return out

"""Autoregressive generation with a KV cache: greedy decoding and sampling with temperature,
top-k (Fan et al. 2018) and top-p / nucleus sampling (Holtzman et al. 2020).

Shared by the decoders: each provides `new_cache(batch, capacity)`, `hidden(ids, cache=...)`
and `logits(hidden)`. The prompt runs once through the model, filling the cache; each new token
then costs one forward pass of a single position against the cached keys and values.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def process_logits(logits: Tensor, *, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> Tensor:
    """Temperature, then top-k, then top-p (the order Hugging Face uses). logits (B, V) -> (B, V)."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)  # (B, V) ascending
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None; got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None; got {top_p!r}")


@torch.inference_mode()
def generate(model, input_ids: Tensor, *, max_new_tokens: int = 20, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             eos_token_id=None, attention_mask: Optional[Tensor] = None,
             max_length: int) -> Tensor:
    """Extend each row of `input_ids` by up to `max_new_tokens` tokens.

    Args:
        model: a decoder with `new_cache`, `hidden` and `logits`.
        input_ids: (B, L) int64 prompts; shorter ones padded on the left (see attention_mask).
        max_new_tokens: tokens to add.
        temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the smallest set of tokens whose probability reaches p.
        seed: seed of a private torch.Generator, so sampling is reproducible.
        eos_token_id: an id or a list of ids (Llama 3 has several); a row that produces one
            stops, finished rows are padded with the first, and generation ends when every row
            has finished.
        attention_mask: (B, L) bool, False at left padding; positions then count real tokens
            only, so a padded prompt continues exactly as it would alone.
        max_length: the model's positions; the prompt plus new tokens must fit.

    Returns:
        (B, L + T) int64, T <= max_new_tokens.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, L) with L >= 1; got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    if L + max_new_tokens > max_length:
        raise ValueError(
            f"the prompt has {L} tokens and {max_new_tokens} new ones were asked for, but this model has "
            f"{max_length} positions; shorten the prompt or ask for at most {max(max_length - L, 0)} new tokens"
        )
    eos = None
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos = torch.tensor(ids, dtype=torch.int64, device=input_ids.device) if ids else None
    gen = None
    if temperature > 0 and seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    cache = model.new_cache(B, capacity=L + max_new_tokens)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be (B, L) = {tuple(input_ids.shape)}; got {tuple(attention_mask.shape)}")
        mask = torch.ones(B, L + max_new_tokens, dtype=torch.bool, device=input_ids.device)  # (B, L + T)
        mask[:, :L] = attention_mask.bool()
        # Position of each slot = real tokens before it; padding slots get 0 (never attended).
        all_pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L + T)
    out = torch.empty(B, L + max_new_tokens, dtype=torch.int64, device=input_ids.device)  # (B, L + T)
    out[:, :L] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids  # (B, L) first, then (B, 1)
    n = L
    for _ in range(max_new_tokens):
        l = step_ids.shape[1]
        if mask is None:
            h = model.hidden(step_ids, cache=cache)  # (B, l, E)
        else:
            h = model.hidden(step_ids, cache=cache, attention_mask=mask[:, :n],
                             positions=all_pos[:, n - l:n])  # (B, l, E)
        logits = model.logits(h[:, -1]).float()  # (B, V)
        if temperature == 0:
            next_id = logits.argmax(dim=-1)  # (B,)
        else:
            probs = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
            next_id = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B,)
        if eos is not None:
            next_id = torch.where(finished, eos[0], next_id)
            finished |= torch.isin(next_id, eos)
        out[:, n] = next_id
        n += 1
        if eos is not None and bool(finished.all()):
            break
        step_ids = next_id.unsqueeze(1)  # (B, 1)
    return out[:, :n]

"""Autoregressive generation with a KV cache: greedy decoding and sampling with temperature,
top-k (Fan et al. 2018) and top-p / nucleus sampling (Holtzman et al. 2020).

Shared by the decoders: each provides `new_cache(batch, capacity)`, `hidden(ids, cache=...)`
and `logits(hidden)`. The prompt runs through the model filling the cache, in chunks of at
most `prefill_chunk` tokens (chunked prefill, as in Agrawal et al. 2023, "SARATHI", and vLLM):
each chunk attends causally, aligned bottom right, to the cache so far plus itself, so the
result equals running the prompt at once while the activations of the feed-forward layers,
projections and attention stay the size of one chunk. Each new token then costs one forward
pass of a single position against the cached keys and values, which `qkv.attention`'s `auto`
sends to its decode backend once the cache is long.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterator, Optional

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


# Default `prefill_chunk` of `generate`: prompts longer than this run through the model in
# chunks of this many tokens. A 32k-token prompt into a 1024-wide Llama-family model held
# 122 MiB of activations in chunks of 2048 against 1.5 GiB in one pass
# (benchmarks/long_context.py), and took about 1.2x the one-pass time
# (benchmarks/generation.py --prefill-chunks; figures in docs/benchmarks.md).
PREFILL_CHUNK = 2048


def check_chunk_size(chunk_size, name: str = "chunk_size") -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{name} must be a positive int (tokens per chunk) or None (all at once); got {chunk_size!r}")


def prefill_chunks(model, input_ids: Tensor, chunk_size: int, *, cache, attention_mask: Optional[Tensor] = None,
                   positions: Optional[Tensor] = None) -> Iterator[Tensor]:
    """Run `input_ids` through `model.hidden` in chunks, appending to `cache`; yield each chunk's states.

    Each chunk is a call `model.hidden(chunk, cache=cache, ...)`, whose attention is causal and
    aligned bottom right, so chunk tokens see every cached token and their own past: the
    states and the cache equal those of one call with the whole input (up to rounding).

    Args:
        model: a decoder with `hidden(ids, cache=, attention_mask=, positions=)`.
        input_ids: (B, L) int64 new tokens.
        chunk_size: tokens per chunk (> 0); the last chunk may be shorter.
        cache: the KVCache to append to (holding n tokens before the call).
        attention_mask: (B, n + L) bool over cached and new tokens (False = padding), or None.
        positions: (L,) or (B, L) int64 positions of the new tokens, or None (cache length onwards).

    Yields:
        (B, l, E) hidden states of each chunk of l <= chunk_size tokens, in order.
    """
    check_chunk_size(chunk_size)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L); got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    n = cache.length
    if attention_mask is not None and tuple(attention_mask.shape) != (B, n + L):
        raise ValueError(
            f"attention_mask must be (B, cached + new) = ({B}, {n + L}) with {n} cached and {L} new tokens; "
            f"got {tuple(attention_mask.shape)}"
        )
    if positions is not None and positions.shape[-1] != L:
        raise ValueError(f"positions must be (L,) or (B, L) with L = {L}; got {tuple(positions.shape)}")
    for s in range(0, L, chunk_size):
        e = min(s + chunk_size, L)
        yield model.hidden(
            input_ids[:, s:e], cache=cache,
            attention_mask=None if attention_mask is None else attention_mask[:, :n + e],  # (B, n + e)
            positions=None if positions is None else positions[..., s:e],  # (e - s,) | (B, e - s)
        )  # (B, e - s, E)


def chunked_hidden(model, input_ids: Tensor, chunk_size: int, *, cache=None, attention_mask: Optional[Tensor] = None,
                   positions: Optional[Tensor] = None) -> Tensor:
    """`model.hidden` run chunk by chunk (see `prefill_chunks`); without a cache, a temporary one.

    Returns (B, L, E), the states of every chunk concatenated.
    """
    if cache is None:
        cache = model.new_cache(input_ids.shape[0], capacity=max(1, input_ids.shape[1]))
    parts = list(prefill_chunks(model, input_ids, chunk_size, cache=cache, attention_mask=attention_mask,
                                positions=positions))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, L, E)


def left_pad(ids: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (B, L) ids and mask -> the same rows padded on the left (decoders append on the right)."""
    lengths = mask.sum(dim=1)  # (B,)
    L = ids.shape[1]
    out_ids = torch.full_like(ids, pad_id)  # (B, L)
    out_mask = torch.zeros_like(mask)  # (B, L)
    for i, n in enumerate(lengths.tolist()):
        out_ids[i, L - n:] = ids[i, :n]
        out_mask[i, L - n:] = True
    return out_ids, out_mask


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    """Refuse sampling settings that are not numbers of the right kind and range (NaN and
    infinity included: `not 0 <= nan` holds, so each range is written to fail on them)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number (0 = greedy); got {type(temperature).__name__}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None; got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] or None; got {top_p!r}")


@torch.inference_mode()
def generate(model, input_ids: Tensor, *, max_new_tokens: int = 20, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             eos_token_id=None, attention_mask: Optional[Tensor] = None,
             prefill_chunk: Optional[int] = PREFILL_CHUNK, max_length: int) -> Tensor:
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
        prefill_chunk: the prompt runs through the model in chunks of at most this many tokens
            (chunked prefill; the same result as one pass, with activations the size of one
            chunk); None = the whole prompt in one pass.
        max_length: the model's positions; the prompt plus new tokens must fit.

    Returns:
        (B, L + T) int64, T <= max_new_tokens.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_chunk_size(prefill_chunk, "prefill_chunk")
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
            raise ValueError(f"attention_mask must be (B, L) = {tuple(input_ids.shape)}; "
                             f"got {tuple(attention_mask.shape)}")
        mask = torch.ones(B, L + max_new_tokens, dtype=torch.bool, device=input_ids.device)  # (B, L + T)
        mask[:, :L] = attention_mask.bool()
        # Position of each slot = real tokens before it; padding slots get 0 (never attended).
        all_pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L + T)
    out = torch.empty(B, L + max_new_tokens, dtype=torch.int64, device=input_ids.device)  # (B, L + T)
    out[:, :L] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids  # (B, L) first, then (B, 1)
    n = L
    for step in range(max_new_tokens):
        step_len = step_ids.shape[1]
        step_mask = None if mask is None else mask[:, :n]  # (B, n)
        step_pos = None if mask is None else all_pos[:, n - step_len:n]  # (B, step_len)
        if step == 0 and prefill_chunk is not None and step_len > prefill_chunk:
            # Only the last chunk's states are kept: the prompt's states are never all held.
            for chunk_h in prefill_chunks(model, step_ids, prefill_chunk, cache=cache, attention_mask=step_mask,
                                          positions=step_pos):
                h = chunk_h  # (B, l_chunk, E)
        else:
            h = model.hidden(step_ids, cache=cache, attention_mask=step_mask, positions=step_pos)  # (B, step_len, E)
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

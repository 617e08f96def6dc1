"""The one decoder-only skeleton (GPT-2, Llama and the families built like them): token
embeddings, a stack of causal blocks over a KV cache, a final norm and an LM head, with
generation (generation.py) and chunked prefill on top (docs/architecture.md, "Adding a model
family").

A family subclasses `CausalLM` and supplies only what differs: its config, its modules (under
Hugging Face's names, so checkpoints map onto them by `hf_plan`) and these hooks:

- `embed(input_ids, positions)` -> (x, rotary): token (and learned position) embeddings,
  and the rotary cos/sin the blocks apply (None without rotary embeddings; any object the
  family's blocks understand, e.g. Gemma 3's one (cos, sin) per layer type);
- `blocks`: the ModuleList of blocks, each called `block(x, mask, rotary, cache)`;
- `final_norm`: the norm after the last block; `token_embedding`: the embedding the LM head
  may be tied to;
- `kv_shape`: (layers, key/value heads, head size) of the KV cache;
- `window_cache = True` (optional): block i caches in layer i and attends through its
  `window`, so windowed layers get a cache that keeps only what their window reaches.

The class attributes `positions_field` and `positions_text` name the config field that bounds
the sequence and how the message for a longer one says it.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..nn import KVCache
from ..nn.attention import window_left
from .checkpoint import ModelError
from .common import key_padding_mask
from .generation import PREFILL_CHUNK, check_chunk_size, chunked_hidden, left_pad
from .generation import generate as _generate
from .tokenizer import Tokenizer


class CausalLM(nn.Module):
    """A decoder with its LM head. `forward` gives logits; `generate` extends prompts with a KV cache."""

    positions_field = "max_position_embeddings"  # config field: the longest sequence
    positions_text = "{field}={n}"  # how the too-long message names that limit
    # A family sets True when block i stores its keys in cache layer i and attends causally
    # through its `window` attribute ((left, 0) or None), so `new_cache` may keep only the last
    # `left` tokens of a windowed layer (Mistral; Gemma 2/3 alternate windowed and global layers).
    window_cache = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tokenizer: Optional[Tokenizer] = None

    # hooks of a family (module docstring)
    blocks: nn.ModuleList
    final_norm: nn.Module
    token_embedding: nn.Embedding

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head size) of the KV cache."""
        raise NotImplementedError

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
        """input_ids (B, L), positions (L,) | (B, L) -> x (B, L, E), rotary (cos, sin) or None
        (or what the family's blocks take instead: Gemma 3, a (cos, sin) per layer type)."""
        raise NotImplementedError

    # -- the skeleton ---------------------------------------------------------------------
    @property
    def max_positions(self) -> int:
        return getattr(self.config, self.positions_field)

    def add_lm_head(self, hidden_size: int, vocab_size: int) -> None:
        """The LM head (E -> V, no bias), tied to the token embedding if the config says so;
        called by a family's __init__ after its body, so parameters register in HF's order."""
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def cache_windows(self) -> Optional[list[Optional[int]]]:
        """Tokens each cache layer must keep before a new one: block i's left window (None = all),
        read from the blocks' `window` now; None (keep everything) unless the family opts in
        with `window_cache = True`."""
        layers = self.kv_shape[0]
        if not self.window_cache or len(self.blocks) != layers:
            return None
        windows = [window_left(getattr(block, "window", None)) for block in self.blocks]
        return None if all(w is None for w in windows) else windows

    def new_cache(self, batch: int, capacity: int = 256, *, windowed: bool = True) -> KVCache:
        """An empty KV cache for `batch` sequences, preallocated for `capacity` tokens.

        With `windowed` (default) and a family that opts in (`window_cache`), layers that attend
        through a sliding window keep only the tokens it reaches (`KVCache(windows=...)`, from
        `cache_windows()`); global layers, and every layer with `windowed=False`, keep all.
        """
        layers, heads, head_dim = self.kv_shape
        w = self.token_embedding.weight
        windows = self.cache_windows() if windowed else None
        return KVCache(layers, batch, heads, head_dim, capacity=capacity, dtype=w.dtype, device=w.device,
                       windows=windows)

    def hidden(self, input_ids: Tensor, *, attention_mask: Optional[Tensor] = None,
               cache: Optional[KVCache] = None, positions: Optional[Tensor] = None,
               chunk_size: Optional[int] = None) -> Tensor:
        """Final hidden states (after the final norm).

        Args:
            input_ids: (B, L) int64; with a cache, the new tokens only.
            attention_mask: (B, n + L) bool/0-1 over cached and new tokens (padding = False);
                positions still count every slot, as Hugging Face does without position_ids.
            positions: (B, L) int64 position of each new token (default: cache length onwards);
                left-padded batches pass positions that count real tokens only.
            cache: a KVCache from `new_cache`; the new keys (rotated, with rotary embeddings)
                and values are appended.
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
        if start + L > self.max_positions:
            limit = self.positions_text.format(field=self.positions_field, n=self.max_positions)
            raise ModelError(f"sequence of {start + L} tokens exceeds this model's {limit}; "
                             f"shorten the input (or truncate it)")
        check_chunk_size(chunk_size)
        if chunk_size is not None and L > chunk_size:
            return chunked_hidden(self, input_ids, chunk_size, cache=cache, attention_mask=attention_mask,
                                  positions=positions)
        pos = (torch.arange(start, start + L, device=input_ids.device)
               if positions is None else positions)  # (L,) | (B, L)
        mask = key_padding_mask(attention_mask)  # (B, 1, 1, n + L) | None
        x, rotary = self.embed(input_ids, pos)  # (B, L, E); cos, sin (L, D) | (B, 1, L, D) | None
        for block in self.blocks:
            x = block(x, mask, rotary, cache)
        return self.final_norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., E) -> (..., V)."""
        return self.lm_head(hidden)

    def forward(self, input_ids: Tensor, *, attention_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, chunk_size: Optional[int] = None) -> Tensor:
        """input_ids (B, L) -> logits (B, L, V); see `hidden` for the arguments."""
        return self.logits(self.hidden(input_ids, attention_mask=attention_mask, cache=cache, chunk_size=chunk_size))

    def generate(self, prompt: Union[str, list, Tensor], *, max_new_tokens: int = 20, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 eos_token_id=-1, attention_mask: Optional[Tensor] = None,
                 prefill_chunk: Optional[int] = PREFILL_CHUNK) -> Tensor:
        """Extend prompts; see `qkv.models.generation.generate` for the sampling arguments.

        Args:
            prompt: a text or a list of texts (tokenised with the model's tokenizer; texts of
                different lengths are padded on the left), or ids (B, L) / (L,).
            eos_token_id: an id or a list of ids; -1 = the config's eos_token_id (one id or
                several); None = never stop early.
            attention_mask: (B, L) bool for left-padded ids (False = padding).
            prefill_chunk: the prompt fills the KV cache in chunks of at most this many tokens
                (default 2048; the same tokens as one pass, with less memory); None = one pass.

        Returns:
            (B, L + T) int64 ids, prompts as given (left-padded for texts of different lengths).
        """
        if isinstance(eos_token_id, int) and eos_token_id == -1:
            eos_token_id = self.config.eos_token_id
        if isinstance(prompt, (str, list, tuple)):
            if self.tokenizer is None:
                raise ModelError("this model has no tokenizer; pass token ids, or load it with qkv.load(folder)")
            if attention_mask is not None:
                raise ValueError("attention_mask goes with token ids; texts are padded by qkv")
            batch = self.tokenizer(prompt, max_length=10**9)  # right-padded (N, L); generate checks the length
            ids, attention_mask = left_pad(batch.input_ids, batch.attention_mask, self.tokenizer.pad_id)
        elif isinstance(prompt, Tensor):
            ids = prompt.unsqueeze(0) if prompt.dim() == 1 else prompt  # (B, L)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)  # (1, L)
        else:
            raise TypeError("prompt must be a string, a list of strings or a tensor of token ids; "
                            f"got {type(prompt).__name__}")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            mask = attention_mask.to(device).bool() if attention_mask is not None else None
            return _generate(self, ids.to(device), max_length=self.max_positions, attention_mask=mask,
                             max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id)
        finally:
            self.train(was_training)

    def complete(self, text: str, **kwargs) -> str:
        """The text a prompt is extended with (arguments as `generate`)."""
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer; load it with qkv.load(folder)")
        if not isinstance(text, str):
            raise TypeError(f"complete takes one text; got {type(text).__name__} (use generate for batches)")
        prompt = self.tokenizer(text, max_length=10**9).input_ids  # (1, L); generate checks the length
        out = self.generate(prompt, **kwargs)
        return self.tokenizer.decode(out[0, prompt.shape[1]:])

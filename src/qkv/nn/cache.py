"""A key/value cache for incremental decoding (autoregressive transformers, Vaswani et al. 2017),
with sliding-window layers that keep only the tokens their window can still reach.

Each layer's keys and values live in one preallocated buffer (B, Hkv, capacity, D), so appending
a token is a copy into place, not a concatenation of the whole history. `update` returns views of
the stored part; with qkv's bottom-right causal alignment a chunk of L new queries against those
keys needs no offset: query i sees keys j <= i + (Lk - L).

A layer may hold everything or a window. A full layer's buffer grows by doubling when a step
would overflow it. A windowed layer attends from each token to at most `keep` tokens before it
(a sliding window, Beltagy et al. 2020; Mistral's `sliding_window - 1`), so before a chunk of L
new tokens it needs only the last `keep` stored ones: its buffer is a *trimmed buffer*, tokens in
order, compacted (the last `keep` tokens moved to the front) when a chunk would not fit. Why not
a ring buffer: a trimmed buffer keeps the keys in sequence order, so the causal band, the window
and a key padding mask apply to it as to a full cache, only cut at the front (the layer slices
the mask and shifts mask and score functions by `start(layer)`, the position of the first stored
token); prefill chunks need no unrolling, and whoever reads the cache (`stored`, qkv.inspect)
sees ordered keys. The price is a copy of `keep` tokens per compaction; a windowed buffer has
room for `keep + max(L, slack)` tokens, so during decoding that copy comes once every `slack`
tokens (default `keep // 4`): less than 4 tokens copied per token, while attention reads `keep`.

Memory: a full layer holds every token; a windowed layer at most `keep + max(L, slack)` for a
chunk of L, resized to that at each compaction (so after a long chunk it shrinks back).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer of one decoder, for a batch of B sequences.

    Args:
        num_layers: layers that store keys and values.
        batch: B.
        num_kv_heads: Hkv, the key/value heads (fewer than the query heads under GQA/MQA).
        head_dim: D of keys; `value_dim` Dv of values (default D).
        capacity: tokens to preallocate per layer; full layers double when exceeded (windowed
            layers preallocate at most `keep + slack`).
        dtype, device: of the buffers (match the model's).
        windows: one entry per layer: None = keep every token; an int `keep` >= 0 = the layer's
            queries see at most `keep` tokens before themselves (attention `window=(keep, 0)`),
            so only the last `keep` tokens are kept between steps. None = every layer full.
        slack: extra room of a windowed layer beyond `keep` (tokens appended between two
            compactions while decoding); default max(1, keep // 4) per layer.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, *,
                 value_dim: Optional[int] = None, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device=None,
                 windows: Optional[Sequence[Optional[int]]] = None, slack: Optional[int] = None):
        if num_layers <= 0 or batch <= 0 or num_kv_heads <= 0 or head_dim <= 0 or capacity <= 0:
            raise ValueError(
                f"KVCache sizes must be positive; got num_layers={num_layers}, batch={batch}, "
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim}, capacity={capacity}"
            )
        windows = [None] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers:
            raise ValueError(f"windows must give one entry per layer ({num_layers}); got {len(windows)}")
        for i, w in enumerate(windows):
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
                raise ValueError(f"windows[{i}] must be None (keep everything) or an int >= 0 (tokens kept "
                                 f"before each new one); got {w!r}")
        if slack is not None and (isinstance(slack, bool) or not isinstance(slack, int) or slack <= 0):
            raise ValueError(f"slack must be a positive int or None; got {slack!r}")
        self.num_layers = num_layers
        self.batch = batch
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._keep: list[Optional[int]] = windows
        self._slack = [None if w is None else (slack if slack is not None else max(1, w // 4)) for w in windows]
        caps = [capacity if w is None else min(capacity, w + s) for w, s in zip(windows, self._slack)]
        self._k = [self._empty(cap, self.head_dim) for cap in caps]  # (B, Hkv, cap, D)
        self._v = [self._empty(cap, self.value_dim) for cap in caps]  # (B, Hkv, cap, Dv)
        self._lengths = [0] * num_layers  # tokens appended to each layer: the position of its next token
        self._starts = [0] * num_layers  # position of each layer's first stored token (> 0 once a window dropped)

    def _empty(self, capacity: int, dim: int) -> Tensor:
        return torch.empty(self.batch, self.num_kv_heads, capacity, dim, dtype=self.dtype, device=self.device)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}); got {layer}")

    # -- sizes --------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Tokens layer 0 can hold before its buffers grow (or, windowed, compact)."""
        return self._k[0].shape[2]

    def layer_capacity(self, layer: int) -> int:
        """Tokens `layer`'s buffers can hold."""
        self._check_layer(layer)
        return self._k[layer].shape[2]

    @property
    def length(self) -> int:
        """Tokens appended to layer 0: the position of the next token (for all layers between steps).
        A windowed layer stores only the last of them (`stored`, `start`)."""
        return self._lengths[0]

    def layer_length(self, layer: int) -> int:
        """Tokens appended to `layer` (the position of its next token)."""
        self._check_layer(layer)
        return self._lengths[layer]

    def start(self, layer: int) -> int:
        """Position of the first token `layer` still stores: 0 unless its window dropped earlier ones."""
        self._check_layer(layer)
        return self._starts[layer]

    def window(self, layer: int) -> Optional[int]:
        """How many tokens before each new one `layer` keeps (its attention's left window), or None = all."""
        self._check_layer(layer)
        return self._keep[layer]

    @property
    def windows(self) -> tuple[Optional[int], ...]:
        return tuple(self._keep)

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's key and value buffers (allocated capacity, not only what is stored)."""
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))

    # -- storing ------------------------------------------------------------------------------
    def _reallocate(self, layer: int, cap: int, keep_from: int, stored: int) -> None:
        """New buffers of `cap` tokens holding stored tokens [keep_from, stored) at the front."""
        for store, dim in ((self._k, self.head_dim), (self._v, self.value_dim)):
            new = self._empty(cap, dim)  # (B, Hkv, cap, dim)
            new[:, :, :stored - keep_from] = store[layer][:, :, keep_from:stored]
            store[layer] = new

    def _make_room(self, layer: int, L: int) -> None:
        """Make room for L more tokens in `layer`: grow a full layer; compact (and resize) a windowed one."""
        stored = self._lengths[layer] - self._starts[layer]
        cap = self._k[layer].shape[2]
        keep = self._keep[layer]
        if stored + L <= cap:
            return
        if keep is None:
            self._reallocate(layer, max(stored + L, 2 * cap), 0, stored)
            return
        drop = max(0, stored - keep)  # tokens no query of this chunk or later can see
        kept = stored - drop
        want = max(kept + L, keep + self._slack[layer])
        if cap != want:  # too small for this chunk, or larger than needed after a long one: resize while copying
            self._reallocate(layer, want, drop, stored)
        elif drop:
            for store in (self._k, self._v):
                buf = store[layer]
                src = buf[:, :, drop:stored]  # (B, Hkv, kept, dim)
                buf[:, :, :kept] = src.clone() if drop < kept else src  # overlapping ranges go through a copy
        self._starts[layer] += drop

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys and values to `layer` and return everything it stores.

        Args:
            layer: 0 .. num_layers-1.
            k: (B, Hkv, L, D) new keys (already position-encoded, e.g. rotated).
            v: (B, Hkv, L, Dv) new values.

        Returns:
            (k_all (B, Hkv, m + L, D), v_all (B, Hkv, m + L, Dv)): views into the buffers, valid
            until the next update of this layer, of the positions start(layer) .. n + L - 1; m = n
            tokens before them for a full layer, at least min(n, keep) for a windowed one.
        """
        self._check_layer(layer)
        B, H, L, D = k.shape
        if (B, H, D) != (self.batch, self.num_kv_heads, self.head_dim) or v.shape[:3] != k.shape[:3] \
                or v.shape[3] != self.value_dim:
            raise ValueError(
                f"KVCache holds (B={self.batch}, Hkv={self.num_kv_heads}, D={self.head_dim}, "
                f"Dv={self.value_dim}); got k {tuple(k.shape)} and v {tuple(v.shape)}"
            )
        self._make_room(layer, L)
        m = self._lengths[layer] - self._starts[layer]
        self._k[layer][:, :, m:m + L] = k
        self._v[layer][:, :, m:m + L] = v
        self._lengths[layer] += L
        return self._k[layer][:, :, :m + L], self._v[layer][:, :, :m + L]  # (B, Hkv, m+L, D|Dv)

    def stored(self, layer: int) -> tuple[Tensor, Tensor]:
        """The keys (B, Hkv, m, D) and values (B, Hkv, m, Dv) stored in `layer`, positions
        start(layer) .. layer_length(layer) - 1 (every token for a full layer): views into the
        buffers, valid until the next update of this layer."""
        self._check_layer(layer)
        m = self._lengths[layer] - self._starts[layer]
        return self._k[layer][:, :, :m], self._v[layer][:, :, :m]  # (B, Hkv, m, D|Dv)

    def crop(self, length: int) -> None:
        """Forget every token from position `length` on, in all layers (e.g. to re-run a step).

        A windowed layer that has dropped tokens can go back only as far as it still holds the
        `keep` tokens before the new end (or to 0, an empty cache); further is a ValueError and
        nothing is changed."""
        if length < 0:
            raise ValueError(f"length must be >= 0; got {length}")
        for i, (n, start, keep) in enumerate(zip(self._lengths, self._starts, self._keep)):
            if 0 < length < n and start > 0 and length - keep < start:
                raise ValueError(
                    f"cannot crop to {length} tokens: layer {i} keeps only its last {keep} tokens and has "
                    f"dropped those before position {start}, so it can go back to position {start + keep} at "
                    f"the earliest; crop less, or build the cache with windows=None to keep everything"
                )
        self._lengths = [min(n, length) for n in self._lengths]
        self._starts = [min(s, n) for s, n in zip(self._starts, self._lengths)]

    def __repr__(self) -> str:
        windows = "" if all(w is None for w in self._keep) else f", windows={list(self._keep)}"
        return (f"KVCache(layers={self.num_layers}, batch={self.batch}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, length={self.length}, capacity={self.capacity}{windows}, "
                f"dtype={self.dtype})")

"""A key/value cache for incremental decoding (autoregressive transformers, Vaswani et al. 2017).

Each layer's keys and values live in one preallocated buffer (B, Hkv, capacity, D) that grows
by doubling when a step would overflow it, so appending a token is a copy into place, not a
concatenation of the whole history. `update` returns views of the filled part; with qkv's
bottom-right causal alignment a chunk of L new queries against those Lk keys needs no
offset: query i sees keys j <= i + (Lk - L).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer of one decoder, for a batch of B sequences.

    Args:
        num_layers: layers that store keys and values.
        batch: B.
        num_kv_heads: Hkv, the key/value heads (fewer than the query heads under GQA/MQA).
        head_dim: D of keys; `value_dim` Dv of values (default D).
        capacity: tokens to preallocate per layer; the buffers double when exceeded.
        dtype, device: of the buffers (match the model's).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, *,
                 value_dim: Optional[int] = None, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device=None):
        if num_layers <= 0 or batch <= 0 or num_kv_heads <= 0 or head_dim <= 0 or capacity <= 0:
            raise ValueError(
                f"KVCache sizes must be positive; got num_layers={num_layers}, batch={batch}, "
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim}, capacity={capacity}"
            )
        self.num_layers = num_layers
        self.batch = batch
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._k = [self._empty(capacity, self.head_dim) for _ in range(num_layers)]  # (B, Hkv, cap, D)
        self._v = [self._empty(capacity, self.value_dim) for _ in range(num_layers)]  # (B, Hkv, cap, Dv)
        self._lengths = [0] * num_layers

    def _empty(self, capacity: int, dim: int) -> Tensor:
        return torch.empty(self.batch, self.num_kv_heads, capacity, dim, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        """Tokens each layer can hold before its buffers grow."""
        return self._k[0].shape[2]

    @property
    def length(self) -> int:
        """Tokens stored in layer 0 (the position of the next token, for all layers between steps)."""
        return self._lengths[0]

    def layer_length(self, layer: int) -> int:
        """Tokens stored in `layer`."""
        return self._lengths[layer]

    def _grow(self, layer: int, needed: int) -> None:
        cap = max(needed, 2 * self._k[layer].shape[2])
        n = self._lengths[layer]
        for store, dim in ((self._k, self.head_dim), (self._v, self.value_dim)):
            new = self._empty(cap, dim)  # (B, Hkv, cap, dim)
            new[:, :, :n] = store[layer][:, :, :n]
            store[layer] = new

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys and values to `layer` and return everything stored.

        Args:
            layer: 0 .. num_layers-1.
            k: (B, Hkv, L, D) new keys (already position-encoded, e.g. rotated).
            v: (B, Hkv, L, Dv) new values.

        Returns:
            (k_all (B, Hkv, n + L, D), v_all (B, Hkv, n + L, Dv)): views into the buffers, valid
            until the next update of this layer.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}); got {layer}")
        B, H, L, D = k.shape
        if (B, H, D) != (self.batch, self.num_kv_heads, self.head_dim) or v.shape[:3] != k.shape[:3] \
                or v.shape[3] != self.value_dim:
            raise ValueError(
                f"KVCache holds (B={self.batch}, Hkv={self.num_kv_heads}, D={self.head_dim}, "
                f"Dv={self.value_dim}); got k {tuple(k.shape)} and v {tuple(v.shape)}"
            )
        n = self._lengths[layer]
        if n + L > self._k[layer].shape[2]:
            self._grow(layer, n + L)
        self._k[layer][:, :, n:n + L] = k
        self._v[layer][:, :, n:n + L] = v
        self._lengths[layer] = n + L
        return self._k[layer][:, :, :n + L], self._v[layer][:, :, :n + L]  # (B, Hkv, n+L, D|Dv)

    def stored(self, layer: int) -> tuple[Tensor, Tensor]:
        """The keys (B, Hkv, n, D) and values (B, Hkv, n, Dv) stored in `layer`: views into the
        buffers, valid until the next update of this layer."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}); got {layer}")
        n = self._lengths[layer]
        return self._k[layer][:, :, :n], self._v[layer][:, :, :n]  # (B, Hkv, n, D|Dv)

    def crop(self, length: int) -> None:
        """Forget every token from position `length` on, in all layers (e.g. to re-run a step)."""
        if length < 0:
            raise ValueError(f"length must be >= 0; got {length}")
        self._lengths = [min(n, length) for n in self._lengths]

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, batch={self.batch}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, length={self.length}, capacity={self.capacity}, dtype={self.dtype})")

"""Multi-head attention as a module: projections around the functional core.

Vaswani et al. 2017, "Attention Is All You Need" (multi-head attention, self- and
cross-attention); grouped-query attention after Ainslie et al. 2023 (GQA) and multi-query
after Shazeer 2019 (MQA). All attention arithmetic is `qkv.attention`; this module only
projects, splits heads, rotates (RoPE), appends to a KV cache and merges heads.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Backend, attention
from ..core.block_mask import BlockMask
from ..core.flex_mask import is_flex_block_mask
from .cache import KVCache
from .positions import apply_rotary


class MultiHeadAttention(nn.Module):
    """Multi-head attention with optional GQA/MQA, cross-attention, RoPE and a KV cache.

    Args:
        embed_dim: E, the size of the query input (and of the output).
        num_heads: Hq, query heads.
        num_kv_heads: Hkv, key/value heads (default Hq; 1 = multi-query; must divide Hq).
        head_dim: D per head (default E // Hq).
        kdim, vdim: sizes of the key and value inputs for cross-attention (default E).
        bias: bias on the q/k/v projections.
        out_bias: bias on the output projection (default: `bias`).
        out_proj: False leaves heads merged but unprojected (output size Hq * D).
        dropout: dropout on the attention weights, active in training mode only.
        scale: score scale (default 1/sqrt(D)).
        fused: one (Hq + 2 Hkv) * D projection `qkv_proj` instead of `q_proj`/`k_proj`/`v_proj`;
            only possible when kdim == vdim == E. Default: fuse where the sizes allow.
        interleaved_rotary: RoPE layout (False = Llama's halves, True = RoFormer's pairs).
        q_norm, k_norm: modules that normalise the projected queries and keys before rotary
            embeddings and attention (Qwen3, OLMo 2, Gemma 3, Cohere, StableLM; Henry et al.
            2020, "Query-Key Normalization for Transformers"), registered as `q_norm`/`k_norm`.
            Each gets (B, L, H, D) per head, or (B, L, H*D) with `qk_norm_per_head=False`
            (OLMo 2 normalises the whole projection).
        qk_norm_per_head: see q_norm.
        rotary_dtype: rotate q and k in this dtype and cast back (OLMo 2 and Cohere rotate
            bfloat16 queries in float32); None = in their own dtype, as Llama does.

    Parameters: `qkv_proj` (fused) or `q_proj`, `k_proj`, `v_proj`; `out_proj`. Weights follow
    nn.Linear: (out_features, in_features).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, kdim: Optional[int] = None, vdim: Optional[int] = None,
                 bias: bool = True, out_bias: Optional[bool] = None, out_proj: bool = True,
                 dropout: float = 0.0, scale: Optional[float] = None, fused: Optional[bool] = None,
                 interleaved_rotary: bool = False, q_norm: Optional[nn.Module] = None,
                 k_norm: Optional[nn.Module] = None, qk_norm_per_head: bool = True,
                 rotary_dtype: Optional[torch.dtype] = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads must be a positive multiple of num_kv_heads; got num_heads={num_heads}, "
                f"num_kv_heads={num_kv_heads}"
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; pass head_dim explicitly"
                )
            head_dim = embed_dim // num_heads
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        can_fuse = kdim == embed_dim and vdim == embed_dim
        if fused is None:
            fused = can_fuse
        elif fused and not can_fuse:
            raise ValueError(
                f"a fused QKV projection needs kdim == vdim == embed_dim; got embed_dim={embed_dim}, "
                f"kdim={kdim}, vdim={vdim}; pass fused=False"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dropout = dropout
        self.scale = scale
        self.fused = fused
        self.interleaved_rotary = interleaved_rotary
        q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
        self._split = [q_out, kv_out, kv_out]
        if fused:
            self.qkv_proj = nn.Linear(embed_dim, q_out + 2 * kv_out, bias=bias)
        else:
            self.q_proj = nn.Linear(embed_dim, q_out, bias=bias)
            self.k_proj = nn.Linear(kdim, kv_out, bias=bias)
            self.v_proj = nn.Linear(vdim, kv_out, bias=bias)
        self.out_proj = nn.Linear(q_out, embed_dim, bias=bias if out_bias is None else out_bias) if out_proj else None
        self.q_norm, self.k_norm = q_norm, k_norm
        self.qk_norm_per_head = qk_norm_per_head
        self.rotary_dtype = rotary_dtype
        # A qkv.inspect Recorder, called with (module, q, k, v, **constraints) before attention; it
        # only reads them, so outputs are identical with and without it.
        self.recorder = None
        # What forward's backend="auto" runs: "auto" (qkv.attention's choice), a backend name, or
        # a backend object; `distribute()` sets a qkv.distributed.RingAttention, which attends
        # across the shards of a process group.
        self.backend: Union[str, Backend] = "auto"

    def _project(self, x: Tensor, key: Optional[Tensor], value: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """-> q (B, Lq, Hq*D), k (B, Lk, Hkv*D), v (B, Lk, Hkv*D)."""
        if self.fused:
            if key is None and value is None:
                return self.qkv_proj(x).split(self._split, dim=-1)
            # Cross-attention with a fused weight: slice it, rows [q | k | v].
            w, b = self.qkv_proj.weight, self.qkv_proj.bias
            wq, wk, wv = w.split(self._split, dim=0)
            bq, bk, bv = b.split(self._split) if b is not None else (None, None, None)
            key = x if key is None else key
            value = key if value is None else value
            return F.linear(x, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        key = x if key is None else key
        value = key if value is None else value
        return self.q_proj(x), self.k_proj(key), self.v_proj(value)

    def forward(
        self,
        x: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        *,
        mask=None,
        causal: bool = False,
        window=None,
        score_mod: Optional[Callable] = None,
        rotary: Optional[tuple[Tensor, Tensor]] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
        backend: Union[str, Backend] = "auto",
    ) -> Tensor:
        """Attend from `x` to itself (self-attention) or to `key`/`value` (cross-attention).

        Args:
            x: (B, Lq, E) query input.
            key: (B, Lk, kdim) key input for cross-attention; None = self-attention on x.
            value: (B, Lk, vdim) value input; None = `key` (or x).
            mask: as `qkv.attention`'s mask, over (B, Hq, Lq, Lk_total) where Lk_total includes
                cached keys; a key padding mask is (B, 1, 1, Lk_total), True = may attend.
            causal: bottom-right aligned causal masking (a chunk of new tokens against a cache
                sees the whole cache and its own past).
            window, score_mod: passed to `qkv.attention`.
            backend: passed to `qkv.attention`; "auto" means the layer's `self.backend`.
            rotary: (cos, sin) from `RotaryEmbedding` for the positions of these Lq tokens,
                (Lq, D) or (B, 1, Lq, D); applied to q and k before caching (self-attention).
            cache: a KVCache; this step's keys and values are appended to `layer` and attention
                runs over everything stored. A windowed cache layer (`KVCache(windows=...)`) keeps
                only the last tokens its window reaches: `window` must look back no further, and
                `mask` (over all n + Lk positions), a mask function or score_mod see the positions
                of a full cache (sliced and shifted here by `cache.start(layer)`).
            layer: which cache layer this module owns.

        Returns:
            (B, Lq, E), or (B, Lq, Hq*D) without an output projection.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, E={self.embed_dim}); got {tuple(x.shape)}")
        B, Lq, _ = x.shape
        q, k, v = self._project(x, key, value)
        Lk = k.shape[1]
        q = self._norm(self.q_norm, q, self.num_heads).transpose(1, 2)  # (B, Hq, Lq, D)
        k = self._norm(self.k_norm, k, self.num_kv_heads).transpose(1, 2)  # (B, Hkv, Lk, D)
        v = v.view(B, Lk, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Lk, D)
        if rotary is not None:
            cos, sin = rotary
            to = self.rotary_dtype or q.dtype
            q = apply_rotary(q.to(to), cos, sin, interleaved=self.interleaved_rotary).to(q.dtype)
            k = apply_rotary(k.to(to), cos, sin, interleaved=self.interleaved_rotary).to(k.dtype)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, m + Lk, D): positions cache.start(layer) .. n + Lk - 1
            if cache.window(layer) is not None:
                mask, score_mod = _windowed_cache(cache, layer, window, mask, score_mod, k.shape[2])
        # With one query, bottom-right causal masking allows every key: skip building the band.
        causal = causal and Lq > 1
        if self.recorder is not None:  # qkv.inspect observes what attention is about to see
            self.recorder(self, q, k, v, mask=mask, causal=causal, window=window, scale=self.scale, score_mod=score_mod)
        out = attention(
            q, k, v, mask=mask, causal=causal, window=window, scale=self.scale, score_mod=score_mod,
            dropout_p=self.dropout if self.training else 0.0, backend=self._backend_for(backend),
        )  # (B, Hq, Lq, D)
        out = out.transpose(1, 2).reshape(B, Lq, self.num_heads * self.head_dim)  # (B, Lq, Hq*D)
        return self.out_proj(out) if self.out_proj is not None else out

    def _norm(self, norm: Optional[nn.Module], t: Tensor, heads: int) -> Tensor:
        """(B, L, heads*D) projection -> (B, L, heads, D), through the q/k norm if there is one."""
        B, L, _ = t.shape
        if norm is not None and not self.qk_norm_per_head:
            t = norm(t)  # (B, L, heads*D)
        t = t.view(B, L, heads, self.head_dim)  # (B, L, heads, D)
        if norm is not None and self.qk_norm_per_head:
            t = norm(t)  # (B, L, heads, D)
        return t

    def _backend_for(self, backend: Union[str, Backend]) -> Union[str, Backend]:
        """What forward's `backend` runs: "auto" means the layer's own. A layer whose own is a
        backend object (ring attention, set by `distribute`) holds one shard of the sequence,
        so any other backend would attend within that shard alone: refused."""
        if isinstance(backend, str) and backend == "auto":
            return self.backend
        if isinstance(self.backend, str):
            return backend
        if backend is self.backend or backend == self.backend.name:
            return self.backend
        raise ValueError(f"this layer runs {self.backend.name} attention (set by distribute()), so backend={backend!r} "
                         f"would attend within the local shard only: pass backend='auto', or set "
                         f"layer.backend = 'auto' to attend on one process")

    def distribute(self, group=None, layout: str = "zigzag", timeout: Optional[float] = None) -> "MultiHeadAttention":
        """Run this layer's attention as ring attention across a torch.distributed process group.

        Each rank then passes its own shard of the sequence as x (B, L_local, E), cut with
        `qkv.distributed.shard(..., layout=layout)`, and rotary positions from
        `self.backend.positions(L_local)`. `distribute(None)` with no process group
        initialised raises when the layer runs. Returns the layer; `layer.backend = "auto"`
        goes back to single-process attention.
        """
        from ..distributed import RingAttention

        kwargs = {} if timeout is None else {"timeout": timeout}
        self.backend = RingAttention(group=group, layout=layout, **kwargs)
        return self

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, fused={self.fused}, dropout={self.dropout}")


def window_left(window) -> Optional[int]:
    """How far back `qkv.attention`'s window ((left, right), an int w, or None) lets a query look:
    w for an int, left of (left, right), None when unbounded."""
    if window is None:
        return None
    return int(window) if isinstance(window, int) else (None if window[0] is None else int(window[0]))


def _windowed_cache(cache: KVCache, layer: int, window, mask, score_mod, stored: int):
    """mask and score_mod for attention against a windowed cache layer that stores positions
    start .. start + stored - 1 only: a tensor mask over all positions is sliced to those, a mask
    or score function sees the positions of a full cache (kv_idx + start). Refuses a window that
    looks back further than the cache keeps, and a BlockMask (built for the full key length)."""
    keep = cache.window(layer)
    left = window_left(window)
    if left is None or left > keep:
        raise ValueError(
            f"cache layer {layer} keeps only the {keep} tokens before each new one, but this attention looks back "
            f"{'over every token' if left is None else f'{left} tokens'} (window={window!r}); pass window=({keep}, 0) "
            f"or a narrower one, or build the cache with that layer's window None (model.new_cache(..., "
            f"windowed=False))"
        )
    start = cache.start(layer)
    if start == 0:
        return mask, score_mod
    if isinstance(mask, Tensor):
        if mask.shape[-1] == start + stored:
            mask = mask[..., start:]  # (.., Lq | 1, stored): the columns of the positions kept
        elif mask.shape[-1] not in (1, stored):
            raise ValueError(f"mask has {mask.shape[-1]} key columns; cache layer {layer} holds positions "
                             f"{start}..{start + stored - 1}: give a mask over all {start + stored} positions")
    elif isinstance(mask, BlockMask) or is_flex_block_mask(mask):
        raise ValueError(f"a BlockMask (qkv's or FlexAttention's) is laid out for the full key length, and cache "
                         f"layer {layer} has dropped the {start} tokens its window no longer reaches; pass a mask "
                         f"function or a bool mask, or build the cache with windows=None")
    elif callable(mask):
        mask = _shift_kv(mask, start, with_score=False)
    if score_mod is not None:
        score_mod = _shift_kv(score_mod, start, with_score=True)
    return mask, score_mod


def _shift_kv(fn: Callable, start: int, *, with_score: bool) -> Callable:
    """fn seen with the key indices of a full cache: kv_idx + start (the positions a trimmed
    cache dropped). Keeps `__wrapped__` = fn, so qkv.inspect describes the original."""
    if with_score:
        def shifted(score, b, h, q_idx, kv_idx):
            return fn(score, b, h, q_idx, kv_idx + start)
    else:
        def shifted(b, h, q_idx, kv_idx):
            return fn(b, h, q_idx, kv_idx + start)
    shifted.__wrapped__ = fn  # type: ignore[attr-defined]
    return shifted

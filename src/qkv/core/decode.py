"""Decode backend: a few new queries against a long KV cache.

A decode step reads every cached key and value once, so its speed limit is memory
bandwidth, not arithmetic. The grouped-query heads of each key/value head are folded into
the rows of one matrix product (Ainslie et al., 2023, GQA), so keys and values are read
once per key/value head and never copied per query head; the cache is walked in large
chunks whose partial softmax results are merged through running max and sum, the
FlashAttention-2 online softmax (Dao, 2023) applied as in Flash-Decoding (Dao et al.,
2023). bfloat16/float16 chunks are upcast to float32 one at a time, so no float32 copy of
the cache is ever made. It runs on the tiled engine with a one-query-block plan, so its
backward pass, masks and score functions are the tiled backend's.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import tiled
from ._spec import AttentionSpec
from .api import register_backend

MAX_QUERIES = 16  # more new tokens than this per sequence: use the tiled backend
AUTO_MIN_KEYS = 2048  # below this the cache is too short for the bandwidth to matter
_CHUNK_ENTRIES = 1 << 24  # score entries (B x Hq x Lq x chunk) per cache chunk: 64 MiB in float32


def plan(spec: AttentionSpec) -> tiled.Plan:
    """All queries in one block; the cache in chunks of up to 2^24 score entries."""
    rows = max(1, spec.B * spec.Hq * spec.Lq)
    chunk = max(1024, _CHUNK_ENTRIES // rows)
    return tiled.band_plan(spec, block_q=max(1, spec.Lq), block_k=max(1, min(chunk, spec.Lk)))


def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    if spec.Lq > MAX_QUERIES:
        return (f"the decode backend takes at most {MAX_QUERIES} queries per sequence; got Lq={spec.Lq}. "
                "Use backend='tiled' (or 'auto') for prefill")
    return tiled.unsupported(spec, q, need_lse)


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq<=16, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""
    return tiled.run(q, k, v, spec, plan(spec), need_lse=need_lse)


def auto_rule(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    """`auto` sends single-token decode steps against a long cache here.

    Measured with benchmarks/decode.py (docs/benchmarks.md): with one query per sequence the
    decode backend beat SDPA at every cache length, float32 and bfloat16; with 8 queries the
    results were mixed, so chunks of several queries stay with SDPA under `auto`.
    """
    if spec.Lq == 1 and spec.Lk >= AUTO_MIN_KEYS and spec.dropout_p == 0.0:
        return "decode"
    return None


register_backend("decode", forward, unsupported, auto_rule)

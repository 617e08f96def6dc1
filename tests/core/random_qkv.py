"""Random q, k, v for the kernel tests (decode, native FA-2, SDPA split): drawn in float64 from
one seeded generator, then cast, so every dtype sees the same values."""

from __future__ import annotations

import torch


def random_qkv(B, Hq, Hkv, Lq, Lk, dtype, seed, D=32, Dv=24):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], gen


def random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed, upstream=False):
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) and, with upstream, an output
    gradient (B, Hq, Lq, Dv): drawn in float64 and cast, so that the float64 reference sees the
    very values under test (the native-kernel and SDPA-split tests)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)] + ([(B, Hq, Lq, Dv)] if upstream else [])
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]

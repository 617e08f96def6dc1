"""Random q, k, v for the decode tests (test_decode.py, test_kernels.py): drawn in float64 from
one seeded generator, then cast, so every dtype sees the same values."""

from __future__ import annotations

import torch


def random_qkv(B, Hq, Hkv, Lq, Lk, dtype, seed, D=32, Dv=24):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], gen

"""The tiled backend: the FlashAttention-2 engine (engines/flash.py) over the causal/window band.

Dao, 2023, "FlashAttention-2": every key block the band reaches, memory linear in length,
every argument honoured (masks, score functions, dropout, the lse, gradients). `auto`'s last
resort: chosen wherever no faster backend claims the arguments. Layout: docs/architecture.md.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..engines import flash
from ..spec import AttentionSpec
from .base import Backend


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""
    return flash.run(q, k, v, spec, flash.band_plan(spec), need_lse=need_lse)


BACKEND = Backend("tiled", forward, flash.unsupported, memory=flash.memory, auto=lambda spec, q, need_lse: True,
                  priority=10)

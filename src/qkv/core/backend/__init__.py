"""The builtin backends, one thin module each, registered from this one list.

Each module exposes `BACKEND`, a `Backend` (base.py): `reference` (the specification),
`sdpa` (PyTorch's fused kernel), `tiled` (FlashAttention-2, Dao 2023), `sparse` (block-sparse
layouts after FlexAttention, Dong et al. 2024), `decode` (a few queries against a long cache,
after Flash-Decoding) and `native` (qkv's C++ FlashAttention-2 kernel on CPU tensors, chosen by
`auto` only where it was measured to win). `auto` tries their rules by descending priority.
Adding a backend is one file plus `qkv.core.register_backend` (or one line here for a builtin);
see docs/architecture.md.
"""

from . import decode, native, reference, sdpa, sparse, tiled
from .base import Backend

BUILTIN: list[Backend] = [m.BACKEND for m in (reference, sdpa, tiled, sparse, decode, native)]

__all__ = ["Backend", "BUILTIN"]

"""What a backend is: the one protocol every way of computing attention follows.

A backend is thin: it says what it cannot do (`unsupported`), runs (`forward`, usually by
calling an engine of qkv/core/engines), and may claim cases for `backend="auto"` through an
`auto` rule tried in order of `priority` (highest first). The builtin backends are listed in
`qkv.core.backend.BUILTIN`, and any object with these attributes can be registered
(`qkv.core.register_backend`) or passed as `attention(..., backend=obj)` (ring attention is
one: `qkv.distributed.RingAttention`). Layout: docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from ..spec import AttentionSpec

__all__ = ["Backend"]


@dataclass(eq=False)
class Backend:
    """A way of computing attention, registered by name.

    forward(q, k, v, spec, *, need_lse) -> (out (B, Hq, Lq, Dv), lse (B, Hq, Lq) or None);
    unsupported(spec, q, need_lse) -> None, or a sentence naming what it cannot do and which
        backend can (q (B, Hq, Lq, D): device and dtype may matter; whether autograd records
        the call, through q, k, v or a float mask, is `spec.grad`);
    memory(spec, q, need_lse) -> (bytes, what): what a call allocates, so a call that cannot
        fit is refused before it starts (None: not estimated);
    self_checking(spec, q, k, v) -> bool: the backend checks the keys and values it reads for
        NaN and infinity itself (`finite.report`), so the dispatch checks only q and a float mask;
    checks_queries: with self_checking, the backend checks q as well (every query row it reads),
        so the dispatch checks only a float mask;
    auto(spec, q, need_lse) -> bool: claims these arguments for `auto` (None: never chosen
        by auto); rules are tried by descending `priority`, and the first claiming backend
        that supports the arguments runs;
    guarded: False when the backend applies the non-finite rule (core/finite.py) itself,
        piece by piece (ring attention), instead of around the whole call.
    """

    name: str
    forward: Callable[..., tuple]
    unsupported: Callable[[AttentionSpec, Tensor, bool], Optional[str]]
    memory: Optional[Callable[[AttentionSpec, Tensor, bool], tuple[int, str]]] = None
    self_checking: Optional[Callable[[AttentionSpec, Tensor, Tensor, Tensor], bool]] = None
    auto: Optional[Callable[[AttentionSpec, Tensor, bool], bool]] = None
    priority: int = 0
    guarded: bool = True
    checks_queries: bool = False  # last: Backend's positional fields keep their places

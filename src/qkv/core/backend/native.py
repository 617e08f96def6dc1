"""The native backend: qkv's C++ FlashAttention-2 kernel for float32 and bfloat16 CPU tensors.

Dao, 2023, "FlashAttention-2": the forward runs in csrc/flash_fwd_kernel.cpp (compiled on
first use, engines/native_flash.py), causal and windowed bands included, GQA without copying
keys, the lse out; gradients through an autograd Function that keeps q, k, v, out and lse and
recomputes the probabilities (the native backward kernel where it exists, else the tiled
engine's backward). Opt-in (`backend="native"`): `auto` does not choose it. Masks, score
functions, dropout, other dtypes and devices are refused by name, with the backend that can.
Layout: docs/architecture.md.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _kernels, _memory
from ..engines import native_flash
from ..spec import AttentionSpec
from .base import Backend

_NAME = "flash_fwd_kernel"


def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    """Why the native backend cannot run these arguments, and which backend can; None if it can."""
    if q.device.type != "cpu":
        return (f"the native backend runs on CPU tensors; on {q.device.type} use backend='sdpa' or 'tiled'")
    if q.dtype not in native_flash.KINDS:
        return (f"the native backend takes float32 and bfloat16 tensors; got {q.dtype}: "
                "use backend='tiled' or 'reference'")
    if spec.has_dense_constraints:
        return ("the native backend takes causal and window bands only, not a mask, mask function or "
                "block mask; use backend='tiled' or 'sparse'")
    if spec.score_mod is not None:
        return "the native backend cannot apply a score_mod; use backend='tiled' or 'sparse'"
    if spec.dropout_p > 0.0:
        return "the native backend has no dropout; use backend='tiled' or 'sparse'"
    if spec.D > native_flash.MAX_DIM or spec.Dv > native_flash.MAX_DIM:
        return (f"the native backend takes head sizes up to {native_flash.MAX_DIM}; got D={spec.D}, "
                f"Dv={spec.Dv}: use backend='tiled'")
    if native_flash.lib() is None:
        return (f"the native backend's kernel is unavailable ({_kernels.status(_NAME)}); "
                "use backend='tiled' or 'sdpa'")
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""
    reason = unsupported(spec, q, need_lse)
    if reason:  # never hand the kernel what it cannot take (a CUDA tensor above all)
        raise ValueError(reason)
    if k.device != q.device or v.device != q.device:
        raise ValueError("the native backend runs on CPU tensors; q, k and v must all be on the CPU")
    return native_flash.run(q, k, v, spec, need_lse=need_lse)


def memory(spec: AttentionSpec, q: Tensor, need_lse: bool) -> tuple[int, str]:
    """(bytes, what): the keys and values packed in float32 once per call, the output, and (when
    autograd records) the gradients; linear in length."""
    return _memory.linear(spec, q, 1 << 16), "packed keys and values, output and gradients, linear in length"


BACKEND = Backend("native", forward, unsupported, memory=memory, auto=None)

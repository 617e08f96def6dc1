"""The native FlashAttention-2 backward: the ctypes binding of csrc/flash_bwd_kernel.cpp.

The kernel (compiled on first use by `qkv.core._kernels`) recomputes each block's
probabilities from the forward's lse and forms dq, dk, dv in float32 (FlashAttention-2,
Dao 2023, Algorithm 2), block by block under the causal/window band and a BlockMask's block
lists (engines/native_blocks.py: only the listed blocks are visited, only partial ones are
masked), for float32 and bfloat16 inputs, with the gradient through lse where one is given;
a work item is a (batch row, kv head) that owns dk/dv of its keys and dq of its grouped query
heads, so the threads share nothing (see the kernel's comment). This module only prepares the
arguments: `backward` is what the native autograd Function calls.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from .. import _kernels
from ..spec import AttentionSpec
from . import native_blocks

NAME = "flash_bwd_kernel"
VERSION = 3  # qkv_flash_bwd_version(): 2 added d_lse and the block lists, 3 lse_lo
KINDS = {torch.float32: 0, torch.bfloat16: 1}
MAX_HEAD = 256  # the largest D and Dv the kernel takes

def lib() -> Optional[ctypes.CDLL]:
    """The compiled csrc/flash_bwd_kernel.cpp with its ctypes signatures, or None (see _kernels)."""
    kernel = _kernels.load(NAME)
    if kernel is None or getattr(kernel, "qkv_typed", False):  # marked on the object: an id can be reused
        return kernel
    return typed(kernel)


def typed(kernel: ctypes.CDLL) -> ctypes.CDLL:
    """`kernel` (a build of csrc/flash_bwd_kernel.cpp) with the ctypes signatures of its functions."""
    p, i64, i64p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    kernel.qkv_flash_bwd.restype = ctypes.c_int
    kernel.qkv_flash_bwd.argtypes = [
        ctypes.c_int, i64, i64, i64, i64, i64, i64, i64,  # kind, B, Hq, Hkv, Lq, Lk, D, Dv
        p, i64p, p, i64p, p, i64p,  # q, qst, k, kst, v, vst
        p, p, p, p,  # out, dout, lse, d_lse
        ctypes.c_float, i64, i64, i64,  # scale, left, right, offset
        p, p, p, ctypes.c_int,  # dq, dk, dv, threads
        ctypes.POINTER(native_blocks.QkvBlockLists),  # blocks
        p]  # lse_lo
    kernel.qkv_flash_bwd_version.restype = ctypes.c_int
    if kernel.qkv_flash_bwd_version() != VERSION:
        raise RuntimeError(f"qkv {NAME} has version {kernel.qkv_flash_bwd_version()}, expected {VERSION}")
    kernel.amx = _kernels.amx_state(kernel, "qkv_flash_bwd_amx", "the native bfloat16 backward")  # type: ignore[attr-defined]
    kernel.qkv_typed = True  # type: ignore[attr-defined]
    return kernel


def _i64(values) -> "ctypes.Array":
    return (ctypes.c_int64 * len(values))(*[int(x) for x in values])


def _rows(t: Tensor) -> Tensor:
    """t itself where its last stride is 1 (any other strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
             spec: AttentionSpec, *, d_lse: Optional[Tensor] = None,
             lse_lo: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention under `spec`'s band (causal/window) and BlockMask (its only other
    constraint may be `spec.block_mask`, with key blocks of 128) from the forward's out
    (B, Hq, Lq, Dv) and lse (B, Hq, Lq) (natural log, -inf = the row saw no key), d_out like out
    and d_lse like lse (the gradient through lse; None = 0), lse_lo like lse (lse's low part from
    native_flash.forward_for_backward; None = 0: a float32 lse alone, as precise as its ulp) -> dq (B, Hq, Lq, D),
    dk (B, Hkv, Lk, D), dv (B, Hkv, Lk, Dv), float32. A row that saw no key gets dq 0 (whatever
    its d_out and d_lse); a key no row sees gets dk, dv 0.

    q, k, v: float32 or bfloat16 CPU tensors of one dtype, any strides (copied where the last
    is not 1). Raises ValueError for arguments it cannot take (naming them), RuntimeError naming
    the reason where the kernel cannot be loaded."""
    kernel = lib()
    if kernel is None:
        raise RuntimeError(f"the native {NAME} is unavailable: {_kernels.status(NAME)}")
    if q.dtype not in KINDS or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the native backward takes float32 or bfloat16 q, k, v of one dtype, "
                         f"not {q.dtype}, {k.dtype}, {v.dtype}")
    dense_other = [name for name in ("bool_mask", "float_mask", "mask_mod") if getattr(spec, name) is not None]
    if dense_other or spec.score_mod is not None or spec.dropout_p > 0.0:
        raise ValueError("the native backward takes causal/window bands and BlockMasks only (no bool or float "
                         "masks, mask functions, score_mod or dropout: build a qkv.BlockMask from the mask "
                         "function, or use another backend)")
    blocks = None
    if spec.block_mask is not None:
        blocks = native_blocks.block_lists(spec.block_mask)  # ValueError naming the reason; kept alive below
    B, Hq, Hkv, Lq, Lk, D, Dv = spec.B, spec.Hq, spec.Hkv, spec.Lq, spec.Lk, spec.D, spec.Dv
    if not (1 <= D <= MAX_HEAD and 1 <= Dv <= MAX_HEAD):
        raise ValueError(f"the native backward takes head sizes 1..{MAX_HEAD}, not D={D}, Dv={Dv}")
    tensors = {"q": q, "k": k, "v": v, "out": out, "lse": lse, "d_out": d_out}
    if d_lse is not None:
        tensors["d_lse"] = d_lse
    if lse_lo is not None:
        tensors["lse_lo"] = lse_lo
    off_cpu = [f"{name} on {t.device}" for name, t in tensors.items() if t.device.type != "cpu"]
    if off_cpu:  # a CPU kernel is never handed another device's memory
        raise ValueError(f"the native backward is a CPU kernel: {', '.join(off_cpu)}")
    shapes = {"q": (B, Hq, Lq, D), "k": (B, Hkv, Lk, D), "v": (B, Hkv, Lk, Dv), "out": (B, Hq, Lq, Dv),
              "lse": (B, Hq, Lq), "d_out": (B, Hq, Lq, Dv), "d_lse": (B, Hq, Lq), "lse_lo": (B, Hq, Lq)}
    wrong = [f"{name} {tuple(tensors[name].shape)} (spec: {shape})" for name, shape in shapes.items()
             if name in tensors and tuple(tensors[name].shape) != shape]
    if wrong:
        raise ValueError(f"the native backward's shapes do not match the spec: {', '.join(wrong)}")
    q, k, v = _rows(q), _rows(k), _rows(v)
    out = out.to(q.dtype).contiguous()
    d_out = d_out.to(q.dtype).contiguous()
    lse = lse.to(torch.float32).contiguous()
    dlse = None if d_lse is None else d_lse.to(torch.float32).contiguous()
    lo = None if lse_lo is None else lse_lo.to(torch.float32).contiguous()
    struct = None
    if blocks is not None:
        if (blocks.nq, blocks.nk) != (-(-Lq // blocks.bq), -(-Lk // blocks.bk)):
            raise ValueError(f"the BlockMask's {blocks.nq} x {blocks.nk} blocks of {blocks.bq} x {blocks.bk} do not "
                             f"cover Lq={Lq}, Lk={Lk}: build it for these lengths")
        Bm, Hm = blocks.tiles.shape[:2]
        if Bm not in (1, B) or Hm not in (1, Hq):
            raise ValueError(f"the BlockMask's batch and heads ({Bm}, {Hm}) must be 1 or the call's ({B}, {Hq})")
        struct = blocks.struct()
    dq = torch.empty(B, Hq, Lq, D, dtype=torch.float32)
    dk = torch.empty(B, Hkv, Lk, D, dtype=torch.float32)
    dv = torch.empty(B, Hkv, Lk, Dv, dtype=torch.float32)
    left = -1 if spec.left is None else spec.left
    right = -1 if spec.right is None else spec.right
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = kernel.qkv_flash_bwd(
        KINDS[q.dtype], B, Hq, Hkv, Lq, Lk, D, Dv,
        ptr(q), _i64(q.stride()), ptr(k), _i64(k.stride()), ptr(v), _i64(v.stride()),
        ptr(out), ptr(d_out), ptr(lse), None if dlse is None else ptr(dlse), spec.scale, left, right, spec.offset,
        ptr(dq), ptr(dk), ptr(dv), max(1, torch.get_num_threads()),
        None if struct is None else ctypes.byref(struct), None if lo is None else ptr(lo))
    del blocks  # alive until here: the struct points into its tensors
    if rc != 0:
        why = {1: "unknown dtype kind", 2: "unsupported head size", 3: "no memory for its work buffers",
               4: "block lists that do not fit the call"}.get(rc, "?")
        raise RuntimeError(f"qkv's native flash backward kernel failed with code {rc} ({why})")
    return dq, dk, dv

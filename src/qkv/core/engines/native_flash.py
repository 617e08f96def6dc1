"""The native FlashAttention-2 engine: the ctypes binding of the C++ forward kernel.

The kernel (csrc/flash_fwd_kernel.cpp, compiled on first use by `qkv.core._kernels`) is
FlashAttention-2's forward (Dao, 2023, Algorithm 1) for float32 and bfloat16 CPU tensors
under the causal/window band: work items (batch row, kv head, block of query positions) on
torch's OpenMP threads, the grouped query heads of a kv head as rows of one item (keys read
once per group, never copied per head), key blocks of 128 with the online softmax in float32,
blocks outside the band skipped and only the band's edge blocks masked; bfloat16 scores by
the AVX512-BF16 dot product where the processor has one (and then P V too, P rounded to
bfloat16). A BlockMask runs on the kernel as block lists (engines/native_blocks.py, the
FlexAttention layout): only the listed key blocks are visited, full blocks without a mask, the
partial ones masked by their tile bits. It returns out and the lse.

The backward pass is the native backward kernel's (engines/native_flash_bwd.py) where that
module exists, else qkv's PyTorch FA-2 backward (flash.block_backward over the band plan),
both recomputing the probabilities from the saved lse. Layout: docs/architecture.md.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import struct
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from .. import _kernels
from ..spec import AttentionSpec
from . import flash, native_blocks

KINDS = {torch.float32: 0, torch.bfloat16: 1}
MAX_DIM = 256  # largest D and Dv the kernel takes
# The vector width of the builds `auto`'s rules (backend/native.py, backend/sparse.py) were measured
# on: the AVX-512 build's 16-float tiles. A build for another target (the narrow tiles of CPUs without
# AVX-512; on the measured CPU only through a compiler wrapper) is never claimed by those rules.
MEASURED_WIDTH = 16
VERSION = 5  # qkv_flash_fwd_version(): 3 added qkv_flash_vector_width and qkv_flash_has_fma, 4 lse_lo, 5 absmax
_CODES = {1: "unknown dtype kind", 2: "unsupported head size", 3: "no memory for the packed keys and values",
          4: "block lists that do not fit the call"}

def lib():
    """The compiled csrc/flash_fwd_kernel.cpp with its ctypes signatures, or None (see _kernels)."""
    kernel = _kernels.load("flash_fwd_kernel")
    return None if kernel is None else typed(kernel)


def typed(kernel):
    """`kernel` (a ctypes CDLL of csrc/flash_fwd_kernel.cpp, however built) with its signatures set and
    its version checked (RuntimeError for another version)."""
    if getattr(kernel, "qkv_typed", False):  # on the object itself: an id could be reused by another library
        return kernel
    p, i64, i64p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    kernel.qkv_flash_fwd.restype = ctypes.c_int
    kernel.qkv_flash_fwd.argtypes = [
        ctypes.c_int, i64, i64, i64, i64, i64, i64, i64,  # kind, B, Hq, Hkv, Lq, Lk, D, Dv
        p, i64p, p, i64p, p, i64p,  # q, qst, k, kst, v, vst
        ctypes.c_float, i64, i64, i64,  # scale, left, right, offset
        p, p, ctypes.c_int, p,  # out, lse, threads, blocks (QkvBlockLists*, None: the band alone)
        p, p]  # lse_lo (B, Hq, Lq) float32, or None; absmax (3,) uint32, or None
    kernel.qkv_flash_fwd_version.restype = ctypes.c_int
    kernel.qkv_flash_has_bf16_dot.restype = ctypes.c_int
    if kernel.qkv_flash_fwd_version() != VERSION:
        raise RuntimeError(f"qkv flash_fwd_kernel has version {kernel.qkv_flash_fwd_version()}, expected {VERSION}")
    kernel.bf16_dot = bool(kernel.qkv_flash_has_bf16_dot())
    kernel.qkv_flash_vector_width.restype = ctypes.c_int
    kernel.vector_width = int(kernel.qkv_flash_vector_width())  # 16 (AVX-512), 8 (AVX, AVX2) or 4
    kernel.qkv_flash_has_fma.restype = ctypes.c_int
    kernel.fma = bool(kernel.qkv_flash_has_fma())
    kernel.amx = _kernels.amx_state(kernel, "qkv_flash_amx", "the native bfloat16 forward")
    kernel.qkv_typed = True
    return kernel


def tiles_run(grad: bool) -> bool:
    """Whether the forward kernel (and, with `grad`, the backward's) runs bfloat16 on the processor's AMX
    tiles: each kernel's state 2 (built with them, granted the tile data by Linux, self-check passed)."""
    kernels = [lib()]
    if grad:
        bwd = native_backward_module()
        kernels.append(bwd.lib() if bwd is not None else None)
    return all(kernel is not None and getattr(kernel, "amx", 0) == 2 for kernel in kernels)


def why_not(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Optional[str]:
    """What of these arguments the kernel cannot take (a short phrase), or None."""
    for t in (q, k, v):
        if t.device.type != "cpu":
            return f"a {t.device.type} tensor"
    if q.dtype not in KINDS:
        return f"{q.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k and v of different dtypes"
    if spec.bool_mask is not None or spec.float_mask is not None or spec.mask_mod is not None:
        return "a dense mask or mask function (it takes a BlockMask: build one with qkv.block_mask)"
    if spec.block_mask is not None:
        reason = native_blocks.why_not(spec.block_mask)
        if reason is not None:
            return reason
    if spec.score_mod is not None:
        return "a score_mod"
    if spec.dropout_p > 0.0:
        return "dropout"
    if spec.D > MAX_DIM or spec.Dv > MAX_DIM:
        return f"head size D={spec.D}, Dv={spec.Dv} above {MAX_DIM}"
    return None


def applies(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> bool:
    """Whether the kernel takes these arguments: CPU tensors, float32 or bfloat16 (one dtype
    for q, k and v), no dense constraint but a BlockMask of key blocks of 128 (mask, mask
    function: no), no score_mod, no dropout, D and Dv at most 256."""
    return why_not(q, k, v, spec) is None


def _i64(values) -> "ctypes.Array":
    return (ctypes.c_int64 * len(values))(*[int(x) for x in values])


def _band(x: Optional[int]) -> int:
    return -1 if x is None else int(x)


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec,
            seen: Optional[list] = None) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) on the CPU -> out (B, Hq, Lq, Dv)
    in q's dtype, lse (B, Hq, Lq) float32 (-inf for a row that sees no key), without autograd.
    spec.block_mask (if any) runs as its block lists, intersected with the causal/window band.
    `seen` (a list, or None): extended by the largest |x| of the queries, the keys and the values
    the kernel read (three floats, NaN or inf where one was; nothing for an empty call): the
    non-finite guard's extremes (finite.extremes_suspect), taken as the kernel reads them."""
    out, lse, _ = _forward(q, k, v, spec, with_lo=False, seen=seen)
    return out, lse


def forward_for_backward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec,
                         seen: Optional[list] = None) -> tuple[Tensor, Tensor, Tensor]:
    """`forward`'s out and lse, and lse_lo (B, Hq, Lq) float32: lse's low part (lse + lse_lo is the
    row's log-sum-exp to about 1e-7, where a float32 lse keeps its ulp: 0.002 at scores near 26000),
    which the native backward subtracts after lse when it recomputes the probabilities."""
    out, lse, lo = _forward(q, k, v, spec, with_lo=True, seen=seen)
    assert lo is not None
    return out, lse, lo


def _as_float(bits: int, dtype: torch.dtype) -> float:
    """The float whose |x| the kernel's abs_bits `bits` are (float32's low 31 bits; bfloat16's low 15)."""
    return float(struct.unpack("<f", struct.pack("<I", bits if dtype == torch.float32 else bits << 16))[0])


def _forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec,
             with_lo: bool, seen: Optional[list] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    reason = why_not(q, k, v, spec)
    if reason is not None:  # the backend checks first; this guards every other caller
        raise ValueError(f"the native flash kernel cannot take {reason}")
    kernel = lib()
    if kernel is None:
        raise RuntimeError(f"the native flash_fwd_kernel is unavailable ({_kernels.status('flash_fwd_kernel')})")
    B, Hq, Lq, Dv = spec.B, spec.Hq, spec.Lq, spec.Dv
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32)
    lo = torch.zeros(B, Hq, Lq, dtype=torch.float32) if with_lo else None
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse, lo
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q, k, v = (t.detach() for t in (q, k, v))
    lists = None if spec.block_mask is None else native_blocks.block_lists(spec.block_mask)
    struct_ = None if lists is None else lists.struct()  # points into `lists`, alive until the call returns
    absmax = (ctypes.c_uint32 * 3)() if seen is not None else None
    rc = kernel.qkv_flash_fwd(
        KINDS[q.dtype], B, Hq, spec.Hkv, Lq, spec.Lk, spec.D, Dv,
        ctypes.c_void_p(q.data_ptr()), _i64(q.stride()), ctypes.c_void_p(k.data_ptr()), _i64(k.stride()),
        ctypes.c_void_p(v.data_ptr()), _i64(v.stride()), spec.scale, _band(spec.left), _band(spec.right),
        spec.offset, ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(lse.data_ptr()),
        max(1, torch.get_num_threads()), None if struct_ is None else ctypes.byref(struct_),
        None if lo is None else ctypes.c_void_p(lo.data_ptr()), absmax)
    if rc != 0:
        why = _CODES.get(rc, "unknown error")
        raise RuntimeError(f"qkv's native flash_fwd_kernel failed with code {rc} ({why})")
    if seen is not None and absmax is not None:
        seen.extend(_as_float(int(b), q.dtype) for b in absmax)
    return out, lse, lo


@functools.lru_cache(maxsize=None)
def native_backward_module() -> Optional[ModuleType]:
    """engines/native_flash_bwd.py (the native backward kernel's binding) where it exists, else None;
    imported on first use, so that it may import this module."""
    name = f"{__package__}.native_flash_bwd"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the module exists and one of its own imports failed
            raise
        return None


_TWICE = ("the native backend's gradients cannot be differentiated again (create_graph=True: a gradient "
          "penalty, a Hessian-vector product); use backend='reference' for higher-order gradients")


class FirstOrderOnly(torch.autograd.Function):
    """A gradient `g` of input `x`, returned as it is, whose own backward raises `_TWICE`: torch's fused
    CPU SDPA refuses a second derivative the same way, where a constant would drop it silently."""

    @staticmethod
    def forward(ctx, g, x):
        return g.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(_TWICE)


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, d_lse: Optional[Tensor],
              spec: AttentionSpec, lse_lo: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    """(dq, dk, dv) in the inputs' dtypes, recomputing the probabilities from lse (FA-2, Alg. 2): the
    engine backward that flash.Recomputed calls. Under create_graph=True (grad mode on here) the
    gradients go through `FirstOrderOnly`, so differentiating them again raises rather than silently
    leaving out the second order; backend="reference" takes higher-order gradients."""
    twice = torch.is_grad_enabled()
    with torch.no_grad():
        grads: tuple[Tensor, ...] = _first_order(q, k, v, out, lse, d_out, d_lse, spec, lse_lo)
    if twice:
        grads = tuple(FirstOrderOnly.apply(g, x) if x.requires_grad else g for g, x in zip(grads, (q, k, v)))
    return grads


def _first_order(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, d_lse: Optional[Tensor],
                 spec: AttentionSpec, lse_lo: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    native_bwd = native_backward_module()
    if native_bwd is not None and getattr(native_bwd, "lib", lambda: True)() is not None:
        if d_lse is not None and not bool(d_lse.any()):
            d_lse = None  # autograd's zeros where only the output had a gradient
        dq, dk, dv = native_bwd.backward(q, k, v, out, lse, d_out, spec, d_lse=d_lse, lse_lo=lse_lo)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    # The native backward is unavailable (it failed to build where the forward built): the PyTorch FA-2
    # backward, over the listed blocks only where there is a BlockMask (never every tile of the band),
    # with the kernel's lse_lo (the low part flash.split_lse gives its own forward). Its scores are torch's
    # products, not the kernel's, so at large logits (an lse in the thousands) their rounding differs
    # from the forward's by about lse's ulp and so do its probabilities (dv 0.07 off at scale 1000).
    _kernels.warn_unavailable("flash_bwd_kernel", "the native backend's gradients run on the PyTorch FA-2 backward")
    bm = spec.block_mask
    plan = flash.band_plan(spec) if bm is None else native_blocks.plan(native_blocks.block_lists(bm), spec)
    return flash.block_backward(q, k, v, out, lse, d_out, d_lse, spec, lse_lo, plan=plan)


def run(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool,
        seen: Optional[list] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Attention on the kernel, differentiable once (flash.Recomputed keeps q, k, v, out, lse and lse_lo).
    `seen`: as `forward`'s."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        fwd = forward_for_backward if seen is None else functools.partial(forward_for_backward, seen=seen)
        out, lse = flash.Recomputed.apply(q, k, v, spec, fwd, _backward)
    else:
        out, lse = forward(q, k, v, spec, seen=seen)
    return out, (lse if need_lse else None)

"""PyTorch's fused `scaled_dot_product_attention` behind qkv's signature.

torch.nn.functional.scaled_dot_product_attention dispatches to a fused FlashAttention-style
kernel (on CPU: a tiled C++ kernel), so it is the fastest exact path wherever it can honour
the arguments. Two differences from qkv's contract are bridged here:

- its `is_causal` is aligned to the top left; qkv aligns to the bottom right. For Lq == Lk
  the two agree. A causal chunk of 0 < Lq < Lk queries (chunked prefill) on the CPU, with no
  other constraint and Dv == D, runs without a mask: all queries against the Lk - Lq prefix
  keys, which every query sees (the G query heads of a key/value head folded into its rows),
  and against the last Lq keys with the square causal mask (there top left = bottom right),
  two calls of the fused CPU kernel merged by their log-sum-exp as in blockwise/ring
  attention (Liu, Zaharia and Abbeel, 2023, "Ring Attention with Blockwise Transformers";
  FlashAttention-2's lse merge, Dao, 2023). Its backward is the kernel's backward of each
  part given the merged output and lse. Every other band with Lq != Lk (windows, Lq > Lk,
  other devices, Dv != D) and every mask becomes one explicit mask of (B?, H?, Lq, Lk);
- a row that may attend to nothing must give zeros: such rows are given one harmless key
  and their output is zeroed afterwards, which keeps gradients finite too.

It cannot apply score functions or return the lse; asking for either raises and names the
tiled backend. `auto` picks it where it materialises a mask of at most AUTO_MAX_MASK_ENTRIES
entries. Layout: docs/architecture.md.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _memory
from ..engines.flash import merge_lse_
from ..spec import AttentionSpec, rows_overlap
from .base import Backend

# `auto` uses SDPA with a materialised mask only up to this many mask entries (Lq * Lk per
# batch and head actually stored, see mask_entries); above it the tiled backend keeps memory
# linear. A causal chunk that runs as the split needs no mask and counts 0.
AUTO_MAX_MASK_ENTRIES = 1 << 24


def _needs_dense_mask(spec: AttentionSpec) -> bool:
    # torch's fused CPU kernels return NaN rows for is_causal with a scale <= 0 (an explicit mask is
    # right), so such a band is passed as a mask, and never split (_splits_causal).
    band_only_causal = spec.causal and spec.left is None and spec.Lq == spec.Lk and spec.scale > 0
    return spec.has_dense_constraints or (spec.banded and not band_only_causal)


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_cpu_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _splits_causal(spec: AttentionSpec, q: Tensor) -> bool:
    """Whether the bottom-right causal case Lq < Lk runs as two mask-free calls (see module doc)."""
    return (
        spec.left is None
        and spec.right == 0  # the causal band, from causal=True or window=(None, 0)
        and 0 < spec.Lq < spec.Lk
        and not spec.has_dense_constraints
        and spec.score_mod is None
        and spec.dropout_p == 0.0
        and spec.D == spec.Dv  # the fused CPU kernel wants one head size for q, k and v
        and spec.scale > 0  # its causal path returns NaN rows for a scale <= 0 (see _needs_dense_mask)
        and q.device.type == "cpu"
        and _flash_cpu is not None
        and _flash_cpu_backward is not None
    )


def mask_entries(spec: AttentionSpec, q: Optional[Tensor] = None) -> int:
    """Entries of the mask the sdpa backend materialises for these arguments: 0 when none.

    Args:
        spec: the validated arguments (shapes as in forward).
        q: the queries (B, Hq, Lq, D); their device decides whether a causal chunk (Lq < Lk)
            runs as the mask-free split (CPU only), which counts 0. Without q the count is
            that of the dense bottom-right mask, as if the split could not run.

    Returns:
        B? * H? * Lq * Lk, where B and H count only if a mask varies along them.
    """
    if not _needs_dense_mask(spec) or (q is not None and _splits_causal(spec, q)):
        return 0
    b = spec.B if _varies(spec, 0) else 1
    h = spec.Hq if _varies(spec, 1) else 1
    return b * h * spec.Lq * spec.Lk


def _varies(spec: AttentionSpec, dim: int) -> bool:
    for m in (spec.bool_mask, spec.float_mask):
        if m is not None and m.shape[dim] != 1:
            return True
    return spec.mask_mod is not None or spec.block_mask is not None


def memory(spec: AttentionSpec, q: Tensor, need_lse: bool) -> tuple[int, str]:
    """(bytes, what): the dense mask (bool, then in q's dtype for the kernel, and the row
    checks), and on the CPU with dropout the score matrix that torch's math path materialises
    (about three copies: measured 3.0x at L=8192, H=4)."""
    need, what = _memory.linear(spec, q), []
    entries = mask_entries(spec, q)
    if entries:
        need += entries * (2 + _memory.itemsize(q.dtype))
        what.append(f"a dense mask of {entries} entries "
                    f"(Lq*Lk = {spec.Lq}*{spec.Lk} per batch row and head it varies over)")
    if spec.dropout_p > 0.0 and q.device.type == "cpu":
        need += _memory.quadratic(spec, 3, max(4, _memory.itemsize(q.dtype)))
        what.append(f"torch's math path for dropout on the CPU, 3 score matrices of "
                    f"B*Hq*Lq*Lk = {spec.B}*{spec.Hq}*{spec.Lq}*{spec.Lk}")
    return need, " and ".join(what) or "the fused kernel's blocks, linear in length"


def unsupported(spec: AttentionSpec, q: Tensor, need_lse: bool) -> Optional[str]:
    if spec.score_mod is not None:
        return "the sdpa backend cannot apply a score_mod; use backend='tiled' or 'reference'"
    if need_lse:
        return "the sdpa backend does not return the lse; use backend='tiled' or 'reference'"
    if spec.Lk == 0:
        return "the sdpa backend needs at least one key; use backend='tiled' or 'reference'"
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv), None."""
    reason = unsupported(spec, q, need_lse)
    if reason:
        raise ValueError(reason)
    gqa = spec.Hkv != spec.Hq
    # Rows that share memory (as_strided, unfold) make torch's backward raise from oneDNN: copied.
    q, k, v = (t.contiguous() if rows_overlap(t) else t for t in (q, k, v))
    if _splits_causal(spec, q):
        return split_causal(q, k, v, spec.scale), None
    if not _needs_dense_mask(spec):
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=spec.dropout_p, is_causal=spec.causal, scale=spec.scale, enable_gqa=gqa
        )
        return out, None
    allowed, bias = spec.constraints(0, spec.Lq, 0, spec.Lk, q.device)
    if allowed is None and bias is None:  # the band covers every (query, key) pair
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=spec.dropout_p, scale=spec.scale, enable_gqa=gqa)
        return out, None
    empty_rows: Optional[Tensor]
    if bias is not None:
        # SDPA wants a float mask in q's dtype; the bool constraints become -inf in it.
        attn_mask = bias.to(q.dtype)
        if allowed is not None:
            attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
        empty_rows = torch.isneginf(attn_mask).all(dim=-1, keepdim=True)  # (.., Lq, 1)
    else:
        assert allowed is not None  # both None returned above
        attn_mask = allowed.expand(*allowed.shape[:-2], spec.Lq, spec.Lk)  # (.., Lq, Lk)
        empty_rows = ~attn_mask.any(dim=-1, keepdim=True)  # (.., Lq, 1)
    # An empty row is shown every key (finite output and gradients) and zeroed afterwards.
    if bool(empty_rows.any()):
        attn_mask = attn_mask.masked_fill(empty_rows, True if attn_mask.dtype == torch.bool else 0.0)
    else:
        empty_rows = None
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=spec.dropout_p, scale=spec.scale, enable_gqa=gqa
    )
    if empty_rows is not None and bool(empty_rows.any()):
        out = out.masked_fill(empty_rows, 0.0)
    return out, None


def split_causal(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Bottom-right causal attention for 0 < Lq < Lk with no mask: prefix and square part merged by lse.

    Args:
        q: queries (B, Hq, Lq, D) on the CPU; Hq a multiple of Hkv (query head h*G + g, for
            g < G = Hq // Hkv, uses key/value head h, as `enable_gqa` and the reference).
        k: keys (B, Hkv, Lk, D), Lk > Lq; any strides (a KV cache's view is read in place, a last
            dimension that is not contiguous copied).
        v: values (B, Hkv, Lk, D): the fused CPU kernel needs Dv == D.
        scale: multiplies the scores.

    Returns:
        out (B, Hq, Lq, D) in q's dtype; query i sees keys 0 .. Lk - Lq + i. Differentiable in
        q, k and v (once: the kernel's backward has no derivative of its own).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if not 0 < Lq < Lk or v.shape[-1] != D or Hkv == 0 or Hq % Hkv or B == 0 or q.device.type != "cpu":
        raise ValueError(
            f"split_causal needs CPU tensors with 0 < Lq < Lk, Dv == D, B > 0 and Hq a positive "
            f"multiple of Hkv; got q {tuple(q.shape)} on {q.device.type}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}. Use qkv.attention(..., causal=True), which picks a path that fits"
        )
    # torch's fused CPU kernel reads each row's D elements as contiguous (stride 1) and silently reads
    # other elements when they are not (a slice t[..., ::2], keys stored (D, Lk) and transposed): O(1)
    # wrong outputs and gradients. Such tensors are copied; any other strides are read in place.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _SplitCausal.apply(q, k, v, scale)


def _fold(t: Tensor, Hkv: int) -> Tensor:
    """(B, Hq, Lq, X) -> (B, Hkv, G*Lq, X): query heads h*G .. h*G+G-1 become rows of kv head h."""
    B, Hq, Lq, X = t.shape
    return t.reshape(B, Hkv, (Hq // Hkv) * Lq, X)  # a copy only if t's heads are not contiguous


class _SplitCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        B, Hq, Lq, _ = q.shape
        Hkv, P = k.shape[1], k.shape[2] - Lq  # P >= 1 prefix keys, seen by every query
        assert _flash_cpu is not None  # _splits_causal checked that the kernel exists
        # 1. The prefix: no mask, so rows are independent and the G query heads of a kv head
        #    fold into its rows; keys and values are read once per kv head, never copied.
        out_pre, lse_pre = _flash_cpu(_fold(q, Hkv), k[:, :, :P], v[:, :, :P], 0.0, False, scale=scale)
        out_pre = out_pre.reshape(B, Hq, Lq, -1)  # (B, Hkv, G*Lq, D) -> (B, Hq, Lq, D)
        lse_pre = lse_pre.reshape(B, Hq, Lq)  # (B, Hkv, G*Lq) -> (B, Hq, Lq)
        # 2. The last Lq keys: a square causal block, where top-left equals bottom-right; the
        #    kernel maps query head h*G + g to kv head h itself.
        out_sq, lse_sq = _flash_cpu(q, k[:, :, P:], v[:, :, P:], 0.0, True, scale=scale)
        # The kernel's lse is float32 for bfloat16/float16 and float64 for float64; merge in
        # it: out = sum_r exp(lse_r - lse) out_r, lse = log(exp(lse_pre) + exp(lse_sq)).
        ct = lse_sq.dtype
        out, lse = out_pre.to(ct), lse_pre  # (B, Hq, Lq, D), (B, Hq, Lq): the kernel's, merged in place
        merge_lse_(out, lse, out_sq.to(ct), lse_sq)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        # Each part's gradient is the kernel's backward run with the *merged* out and lse: its
        # weights exp(s - lse) are then the full softmax's restricted to the part's keys, and
        # the row term sum(dO * O) is the full attention's (as in ring attention's backward).
        q, k, v, out, lse = ctx.saved_tensors
        Hkv, Lq = k.shape[1], q.shape[2]
        assert _flash_cpu_backward is not None  # _splits_causal checked that the kernel exists
        P = k.shape[2] - Lq
        grad_out = grad_out.contiguous()  # out.sum()'s gradient arrives expanded (stride 0)
        dq_pre, dk_pre, dv_pre = _flash_cpu_backward(
            _fold(grad_out, Hkv), _fold(q, Hkv), k[:, :, :P], v[:, :, :P], _fold(out, Hkv),
            lse.reshape(lse.shape[0], Hkv, -1), 0.0, False, scale=ctx.scale)  # lse (B, Hkv, G*Lq)
        dq_sq, dk_sq, dv_sq = _flash_cpu_backward(
            grad_out, q, k[:, :, P:], v[:, :, P:], out, lse, 0.0, True, scale=ctx.scale)
        need_q, need_k, need_v, _ = ctx.needs_input_grad
        # The two parts of dq are summed in lse's dtype (float32 for bfloat16), rounded once.
        dq = (dq_pre.reshape(q.shape).to(lse.dtype) + dq_sq.to(lse.dtype)).to(q.dtype) if need_q else None
        dk = torch.cat([dk_pre, dk_sq], dim=2) if need_k else None  # (B, Hkv, Lk, D)
        dv = torch.cat([dv_pre, dv_sq], dim=2) if need_v else None  # (B, Hkv, Lk, D)
        return dq, dk, dv, None


def auto(spec: AttentionSpec, q: Tensor, need_lse: bool) -> bool:
    """auto: sdpa where its mask has at most AUTO_MAX_MASK_ENTRIES entries (none for Lq == Lk
    causal or no band, none for a causal chunk Lq < Lk on the CPU, the mask-free split)."""
    return mask_entries(spec, q) <= AUTO_MAX_MASK_ENTRIES


BACKEND = Backend("sdpa", forward, unsupported, memory=memory, auto=auto, priority=20)

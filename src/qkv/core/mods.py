"""The contract of user mask and score functions, checked in one place.

    mask_mod(b, h, q_idx, kv_idx) -> bool tensor            True = may attend
    score_mod(score, b, h, q_idx, kv_idx) -> score tensor    changes scores before softmax

The index arguments are broadcastable integer tensors (`index_grid`), as in PyTorch's
FlexAttention (Dong et al., 2024). Every call of a user's function, wherever it is
evaluated (the reference, the engines, BlockMask), goes through `call_mask_mod` or
`call_score_mod`, so what it returns is checked once. See docs/architecture.md.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def fmt_shape(t: Tensor) -> str:
    """"(2, 4, 16, 64)": a tensor's shape as error messages print it."""
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def index_grid(B: int, H: int, i0: int, i1: int, j0: int, j1: int, device=None):
    """The (b, h, q_idx, kv_idx) index tensors mask and score functions receive for a block.

    b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (1, 1, i1-i0, 1), kv_idx (1, 1, 1, j1-j0): they
    broadcast to (B, H, i1-i0, j1-j0). Shared by every backend and by BlockMask, so a mask
    function sees the same indices wherever it is evaluated.
    """
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)  # (1, H, 1, 1)
    q_idx = torch.arange(i0, i1, device=device).view(1, 1, -1, 1)  # (1, 1, bq, 1)
    kv_idx = torch.arange(j0, j1, device=device).view(1, 1, 1, -1)  # (1, 1, 1, bk)
    return b, h, q_idx, kv_idx


# Every call of a user's mask or score function goes through these two functions, so what it
# returns is checked in one place, wherever it is evaluated (reference, engines, BlockMask).
_CONVENTION = (
    "qkv calls it with broadcastable index tensors, not scalars: b (B, 1, 1, 1), h (1, H, 1, 1), "
    "q_idx (1, 1, rows, 1), kv_idx (1, 1, 1, keys); write it with tensor operations "
    "(q_idx >= kv_idx, &, |, ~, torch.where) instead of Python's if/and/or, and index tensors "
    "with them as a whole (doc[q_idx] == doc[kv_idx])"
)


def _user_call(what: str, fn: Callable, *args):
    """fn(*args), with a hint about the index convention if the user's function raises."""
    try:
        return fn(*args)
    except Exception as exc:
        raise ValueError(f"the {what} raised {type(exc).__name__}: {exc}. {_CONVENTION}") from exc


def _check_result(what: str, out: Tensor, grid: torch.Size) -> None:
    """Refuse a result that does not broadcast to the index tensors' shape `grid`."""
    ok = out.dim() <= len(grid)
    if ok:
        try:
            ok = torch.broadcast_shapes(out.shape, grid) == grid
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(
            f"the {what} returned shape {fmt_shape(out)}, but qkv evaluated it on index tensors of "
            f"broadcast shape {tuple(grid)} (batch B, heads, query rows, keys): its result must "
            f"broadcast to that shape, one value per (b, h, q_idx, kv_idx) or 1 along a dimension it "
            f"does not depend on; for the whole call that is (B, Hq, Lq, Lk). {_CONVENTION}"
        )


def call_mask_mod(fn: MaskMod, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """fn(b, h, q_idx, kv_idx), checked: a bool tensor that broadcasts to the indices' shape."""
    out = _user_call("mask function", fn, b, h, q_idx, kv_idx)
    if isinstance(out, bool):
        out = torch.tensor(out, device=q_idx.device)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"a mask function must return a bool tensor; got {type(out).__name__}. "
            "Write it with tensor operations, e.g. `lambda b, h, q, k: q >= k`"
        )
    if out.dtype != torch.bool:
        raise TypeError(
            f"a mask function must return a bool tensor; got dtype {out.dtype}. "
            "Compare indices (q >= k) rather than computing numbers"
        )
    _check_result("mask function", out, torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape))
    return out


def call_score_mod(fn: ScoreMod, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """fn(score, b, h, q_idx, kv_idx), checked: a tensor that broadcasts to the scores' shape."""
    out = _user_call("score_mod", fn, score, b, h, q_idx, kv_idx)
    if not isinstance(out, Tensor):
        raise TypeError(f"score_mod must return a tensor; got {type(out).__name__}. Build it from `score`, "
                        "e.g. `lambda score, b, h, q, k: score - 0.1 * (q - k).abs()`")
    _check_result("score_mod", out,
                  torch.broadcast_shapes(score.shape, b.shape, h.shape, q_idx.shape, kv_idx.shape))
    return out

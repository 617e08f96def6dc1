"""The tolerance rule of the Foundation issue (after flash-attention's and PyTorch flex's tests).

A fast path is compared with the float64 reference, and so is the plain reference run in
the same dtype as the fast path. The fast path's error must be at most `factor` times the
plain run's error (2x for outputs, 3x for gradients) plus a rounding-scale absolute term,
so the tolerance follows dtype, length and head size by itself.

The absolute term is `ulps` units of the dtype's epsilon at the magnitude of the exact
values, or at magnitude 1 if they are smaller (a gradient that is exactly zero, say). It
matters where the plain run is exact: float64 against float64, or a zero gradient. By
default 8 ulps for float32, 1 ulp for bfloat16/float16 (whose epsilon is large), and 64
ulps for float64, where the plain run is the exact one and only reordered sums remain.
"""

from __future__ import annotations

import torch

FWD_FACTOR = 2.0
GRAD_FACTOR = 3.0


def rounding_term(exact: torch.Tensor, dtype: torch.dtype, ulps: float | None = None) -> float:
    if ulps is None:
        ulps = {torch.float64: 64.0, torch.float32: 8.0}.get(dtype, 1.0)
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    return ulps * torch.finfo(dtype).eps * scale


def assert_within_rule(fast, plain, exact, *, factor: float, what: str, ulps: float | None = None) -> None:
    """fast, plain: tensors in the test dtype; exact: the float64 reference result."""
    assert fast.shape == exact.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(exact.shape)}"
    assert not torch.isnan(fast).any(), f"{what}: NaN in result"
    exact = exact.double()
    err = (fast.double() - exact).abs().max().item() if exact.numel() else 0.0
    base = (plain.double() - exact).abs().max().item() if exact.numel() else 0.0
    atol = rounding_term(exact, fast.dtype, ulps)
    bound = factor * base + atol
    assert err <= bound, (
        f"{what}: error {err:.3e} against float64 exceeds {factor}x the plain {fast.dtype} "
        f"reference's error {base:.3e} + rounding term {atol:.3e} (= {bound:.3e})"
    )


def grads(out, inputs, upstream):
    """d(out . upstream)/d(inputs), with one shared upstream gradient."""
    return torch.autograd.grad(out, inputs, upstream, allow_unused=False)

"""The tolerance rule qkv's tests and `qkv bench` check results by.

The rule follows flash-attention's tests (Dao et al., 2022: "the error of the fast path is at
most a few times the error of the plain implementation in the same precision") and PyTorch's
FlexAttention tests, which compare a fused kernel and an eager run against a float64 "golden"
result the same way.

A fast path is compared with the float64 reference, and so is the plain reference run in the
same dtype as the fast path. The fast path's error must be at most `factor` times the plain
run's error (FWD_FACTOR = 2 for outputs, GRAD_FACTOR = 3 for gradients) plus a rounding-scale
absolute term, so the tolerance follows dtype, length and head size by itself.

The absolute term (`rounding_term`) is `ulps` units of the dtype's epsilon at the magnitude of
the exact values, or at magnitude 1 if they are smaller (a gradient that is exactly zero, say).
It matters where the plain run is exact: float64 against float64, or a zero gradient. By
default 8 ulps for float32, 1 ulp for bfloat16/float16 (whose epsilon is large), and 64 ulps
for float64, where the plain run is the exact one and only reordered sums remain.

See docs/architecture.md for where the rule is used.
"""

from __future__ import annotations

import torch

__all__ = ["FWD_FACTOR", "GRAD_FACTOR", "assert_within_rule", "grads", "rounding_term", "within_rule"]

FWD_FACTOR = 2.0
GRAD_FACTOR = 3.0
_ULPS = {torch.float64: 64.0, torch.float32: 8.0}  # units of eps of the absolute term; 1 for the rest


def rounding_term(exact: torch.Tensor, dtype: torch.dtype, ulps: float | None = None) -> float:
    """`ulps` epsilons of `dtype` at the magnitude of `exact` (any shape), at least at magnitude 1."""
    if ulps is None:
        ulps = _ULPS.get(dtype, 1.0)
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    return ulps * torch.finfo(dtype).eps * scale


def _errors(fast, plain, exact, ulps) -> tuple[float, float, float]:
    """(err, base, atol): the largest errors of fast and plain against exact, and the rounding term."""
    exact = exact.double()
    err = (fast.double() - exact).abs().max().item() if exact.numel() else 0.0
    base = (plain.double() - exact).abs().max().item() if exact.numel() else 0.0
    return err, base, rounding_term(exact, fast.dtype, ulps)


def within_rule(fast: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, *, factor: float,
                ulps: float | None = None) -> tuple[bool, float, float]:
    """(ok, err, bound): is the largest error of `fast` against `exact` within the rule?

    fast, plain: the fast path's and the plain reference's results in the dtype under test;
    exact: the float64 reference result; all three of one shape (any). err and bound are
    floats; ok is False for a NaN error (never raised).
    """
    err, base, atol = _errors(fast, plain, exact, ulps)
    bound = factor * base + atol
    return bool(err <= bound), err, bound


def assert_within_rule(fast, plain, exact, *, factor: float, what: str, ulps: float | None = None) -> None:
    """Raise AssertionError naming `what` unless `fast` is within the rule (shapes as `within_rule`)."""
    assert fast.shape == exact.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(exact.shape)}"
    assert not torch.isnan(fast).any(), f"{what}: NaN in result"
    err, base, atol = _errors(fast, plain, exact, ulps)
    bound = factor * base + atol
    assert err <= bound, (
        f"{what}: error {err:.3e} against float64 exceeds {factor}x the plain {fast.dtype} "
        f"reference's error {base:.3e} + rounding term {atol:.3e} (= {bound:.3e})"
    )


def grads(out, inputs, upstream):
    """d(out . upstream)/d(inputs): out and upstream of one shape, inputs a sequence of tensors."""
    return torch.autograd.grad(out, inputs, upstream, allow_unused=False)

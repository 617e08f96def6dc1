"""The check the native kernels' tests share: out and lse against the float64 reference by the rule."""

from __future__ import annotations

import torch

from qkv.testing import FWD_FACTOR, assert_within_rule


def assert_out_and_lse(fast, fast_lse, plain, plain_lse, exact, exact_lse, what: str) -> None:
    """fast/plain/exact out (B, Hq, Lq, Dv) and lse (B, Hq, Lq): the fast path's out and lse within the rule,
    its lse -inf exactly where the exact one is (rows that see no key), and those rows' outputs 0."""
    assert fast_lse.dtype == torch.float32
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=what + " out")
    assert torch.equal(torch.isneginf(fast_lse), torch.isneginf(exact_lse)), \
        f"{what}: lse must be -inf exactly where no key is seen"
    seen = torch.isfinite(exact_lse)
    assert_within_rule(fast_lse[seen], plain_lse[seen], exact_lse[seen], factor=FWD_FACTOR, what=what + " lse")
    assert torch.all(fast[~seen] == 0), f"{what}: a row that sees no key must be 0"


def check_large_logit_gradients(dtype, what: str) -> None:
    """The native backward at scale 1000 (scores in the thousands): one key's dv is dO exactly (its P is
    1: the backward recomputes exp(scale s - lse) from the scaled score rounded as the forward rounds it,
    not fused into the subtraction)."""
    from random_qkv import random_inputs

    import qkv

    q, k, v = random_inputs(1, 4, 4, 1, 1, 64, 64, dtype, seed=3)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = qkv.attention(*xs, scale=1e3, backend="native")
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    out.backward(up)
    assert torch.equal(xs[2].grad, up), f"{what}: one key, scale 1000: dv must be dO exactly"

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

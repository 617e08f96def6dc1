"""Cases shared by the decode kernel's tests (test_decode_bf16_values.py for the machine's build,
test_decode_narrow.py for builds without AVX-512): the check of a step by the rule, the
constraints a step is checked under, and the check of a step whose cache holds a non-finite entry
that only the last query sees."""

from __future__ import annotations

import torch

import qkv
from qkv.testing import FWD_FACTOR, assert_within_rule


def check_rule(q, k, v, what: str, **kw):
    """qkv's decode backend (no grad) on q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)
    against the float64 reference, by the rule; returns its output (B, Hq, Lq, Dv), in q's dtype."""
    kw64 = {key: (val.double() if torch.is_tensor(val) and val.is_floating_point() else val) for key, val in kw.items()}
    exact = qkv.reference_attention(q.double(), k.double(), v.double(), **kw64)
    plain = qkv.reference_attention(q, k, v, **kw)
    with torch.no_grad():
        fast = qkv.attention(q, k, v, backend="decode", **kw)
    assert fast.dtype == q.dtype
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=what)
    return fast


def constraint_cases(gen: torch.Generator, B: int, Hq: int, Lq: int, Lk: int, dtype: torch.dtype) -> list:
    """[(what, attention kwargs)]: a per-head bool mask (B, Hq, Lq, Lk) that keeps the last key, a
    float bias (1, Hq, 1, Lk) in `dtype` with -inf entries (causal), a causal window of 300; drawn
    from `gen` in that order."""
    allowed = torch.rand(B, Hq, Lq, Lk, generator=gen) > 0.5
    allowed[:, :, :, -1] = True  # the last key (an odd last key of a pair), seen
    bias = torch.randn(1, Hq, 1, Lk, generator=gen).masked_fill(torch.rand(1, Hq, 1, Lk, generator=gen) < 0.3,
                                                                 float("-inf")).to(dtype)
    return [("bool mask", {"mask": allowed}), ("bias", {"mask": bias, "causal": True}),
            ("window", {"window": (300, 0), "causal": True})]


def check_last_query_poisoned(out, q, clean_k, clean_v, what: str, **kw) -> None:
    """out (B, Hq, Lq, Dv) of a decode step whose cache held a NaN or infinity that only the last
    query sees: that query's rows are NaN, every other row is finite and equals the reference on the
    clean cache (clean_k (B, Hkv, Lk, D), clean_v (B, Hkv, Lk, Dv)) by the rule."""
    B, Hq, Lq = out.shape[:3]
    poisoned = torch.zeros(B, Hq, Lq, dtype=torch.bool)
    poisoned[:, :, Lq - 1] = True
    assert torch.equal(torch.isnan(out).all(-1), poisoned), torch.isnan(out).any(-1)
    assert torch.isfinite(out[~poisoned]).all()
    exact = qkv.reference_attention(q.double(), clean_k.double(), clean_v.double(), **kw)
    plain = qkv.reference_attention(q, clean_k, clean_v, **kw)
    assert_within_rule(out[~poisoned], plain[~poisoned], exact[~poisoned], factor=FWD_FACTOR,
                       what=f"{what}: the rows that do not see it")

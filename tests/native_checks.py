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


def check_forward(q, k, v, what: str, **kw):
    """backend="native" against the same-dtype reference and the float64 one, out and lse by
    assert_out_and_lse; returns the native (out, lse)."""
    import qkv

    exact, exact_lse = qkv.attention_with_lse(q.double(), k.double(), v.double(), backend="reference", **kw)
    plain, plain_lse = qkv.attention_with_lse(q, k, v, backend="reference", **kw)
    fast, fast_lse = qkv.attention_with_lse(q, k, v, backend="native", **kw)
    assert fast.dtype == q.dtype
    assert_out_and_lse(fast, fast_lse, plain, plain_lse, exact, exact_lse, what)
    return fast, fast_lse


def check_large_logit_gradients(dtype, what: str) -> None:
    """The native backward at scale 1000 (scores in the thousands): one key's dv is dO exactly (its P is
    1: the backward recomputes exp(scale s - lse) from the scaled score rounded as the forward rounds it,
    not fused into the subtraction); in float32 a causal D=256 call's gradients are within the rule
    (P from lse and its low part: a float32 lse alone near 26000 is 0.002 coarse, and dv went 11x past
    the rule). In bfloat16 at this scale dq and dk are not: D_i = rowsum(dO * O) is formed from the
    output rounded to bfloat16, as FlashAttention-2 forms it, and dS = P (dP - D_i), times scale 1000,
    turns that rounding into dq (docs/benchmarks.md, the sixth part)."""
    from random_qkv import random_inputs

    import qkv
    from qkv.testing import GRAD_FACTOR, grads

    q, k, v = random_inputs(1, 4, 4, 1, 1, 64, 64, dtype, seed=3)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = qkv.attention(*xs, scale=1e3, backend="native")
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    out.backward(up)
    assert torch.equal(xs[2].grad, up), f"{what}: one key, scale 1000: dv must be dO exactly"
    if dtype != torch.float32:
        return
    q, k, v = random_inputs(1, 4, 4, 70, 70, 256, 256, dtype, seed=5)
    up = torch.randn(1, 4, 70, 256, generator=torch.Generator().manual_seed(6)).to(dtype)
    res = {}
    for w in ("exact", "plain", "fast"):
        xs = [(t.double() if w == "exact" else t.clone()).requires_grad_() for t in (q, k, v)]
        o = qkv.attention(*xs, scale=1e3, causal=True, backend="native" if w == "fast" else "reference")
        res[w] = grads(o, xs, up.double() if w == "exact" else up)
    for name, g, gp, ge in zip("qkv", res["fast"], res["plain"], res["exact"]):
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"{what} scale 1000 d{name}")


def check_accumulation(what: str, backend: str = "native") -> None:
    """P V summed over many keys in float32, against the float64 reference by the rule (forward):
    values sharing a large offset (v = 1000 + noise) over 1797 keys. One running sum of P V over the
    keys missed the rule in 10 of 10 draws (6x the reference's error); the kernels now sum each block
    from zero and add it once. Inputs drawn in float64, as qkv.testing's cases are."""
    import qkv

    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(3, 6, 7, 55, generator=g, dtype=torch.float64).float()
        k = (torch.randn(3, 2, 1797, 55, generator=g, dtype=torch.float64) * 4).float()
        v = (torch.randn(3, 2, 1797, 55, generator=g, dtype=torch.float64) + 1000.0).float()
        exact = qkv.attention(q.double(), k.double(), v.double(), backend="reference")
        plain = qkv.attention(q, k, v, backend="reference")
        fast = qkv.attention(q, k, v, backend=backend)
        assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=f"{what} values 1000 + noise, seed {seed}")


def check_gradients(case, dtype, what: str, seed: int, inputs=None, names: str = "qkv") -> None:
    """backend="native" with gradients on a (B, Hq, Hkv, Lq, Lk, D, Dv, causal, window) case of random
    inputs (seed, and seed + 1 for the upstream gradient; or the case's (q, k, v) `inputs`): out and the
    gradients of `names` (of q, k, v) against the same-dtype and float64 references by the rule, every
    gradient in the inputs' dtype."""
    from random_qkv import random_inputs

    import qkv
    from qkv.testing import GRAD_FACTOR, grads

    B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
    q, k, v = inputs if inputs is not None else random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=seed)
    up = torch.randn(B, Hq, Lq, Dv, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    kw = dict(causal=causal, window=window)
    ins = {w: [(t.double() if w == "exact" else t.clone()).requires_grad_() for t in (q, k, v)]
           for w in ("exact", "plain", "fast")}
    outs = {w: qkv.attention(*xs, backend="native" if w == "fast" else "reference", **kw) for w, xs in ins.items()}
    assert_within_rule(outs["fast"], outs["plain"], outs["exact"], factor=FWD_FACTOR, what=what + " out")
    gs = {w: grads(outs[w], ins[w], up.double() if w == "exact" else up) for w in ins}
    for name, g, gp, ge in zip("qkv", gs["fast"], gs["plain"], gs["exact"]):
        assert g.dtype == dtype
        if name in names:
            assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"{what} d{name}")

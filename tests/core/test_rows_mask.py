"""AttentionSpec.rows_mask: the constraints of any set of query rows (explain's recorder and the
transformers integration's selected weights use it) equal what `constraints` gives row by row,
for every kind of constraint, and the weights recomputed from it equal the full call's rows."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.core.spec import build_spec

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 9, 13, 8


def _per_row(spec, rows, heads):
    """The oracle: `constraints` of each row alone, as a float mask (B|1, nh|1, nr, Lk)."""
    out = []
    for r in rows.tolist():
        allowed, bias = spec.constraints(r, r + 1, 0, spec.Lk, "cpu")
        m = torch.zeros(1, 1, 1, spec.Lk)
        if bias is not None:
            m = m + bias.float().reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        if allowed is not None:
            m = m.masked_fill(~allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape)), float("-inf"))
        out.append(m)  # (B|1, H|1, 1, Lk)
    shape = torch.broadcast_shapes(*(m.shape for m in out))
    full = torch.cat([m.expand(shape) for m in out], dim=2)  # (B|1, H|1, nr, Lk)
    return full[:, heads] if full.shape[1] != 1 else full


def _kinds():
    g = torch.Generator().manual_seed(0)
    bool_mask = torch.rand(B, HQ, LQ, LK, generator=g) > 0.3
    float_mask = torch.randn(B, 1, LQ, LK, generator=g)
    float_mask[0, 0, 2, 5] = float("-inf")
    yield "causal", dict(causal=True)
    yield "window", dict(causal=True, window=3)
    yield "two-sided window", dict(window=(2, 1))
    yield "bool per head", dict(mask=bool_mask)
    yield "float bias", dict(mask=float_mask, causal=True)
    yield "mask_mod", dict(mask=lambda b, h, q, kv: (kv + h) % 3 != 0)
    yield "BlockMask", dict(mask=qkv.block_mask(lambda b, h, q, kv: (q + kv) % 4 != 1, B=1, H=1, Lq=LQ, Lk=LK,
                                                block_size=4))


@pytest.mark.parametrize("kind,kw", list(_kinds()), ids=[k for k, _ in _kinds()])
def test_rows_mask_is_constraints_row_by_row_and_gives_the_full_calls_rows(kind, kw):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, HQ, LQ, D, generator=g), torch.randn(B, HKV, LK, D, generator=g)
    spec = build_spec(q, k, None, **kw)
    rows, heads = torch.tensor([8, 0, 4, 4]), torch.tensor([3, 0])
    got = spec.rows_mask(rows, heads, "cpu")
    want = _per_row(spec, rows, heads)
    assert got.dim() == 4 and torch.equal(torch.broadcast_to(got, want.shape), want)
    full = qkv.attention_weights(q, k, **kw)  # (B, Hq, Lq, Lk)
    sel = qkv.attention_weights(q[:, heads][:, :, rows], k[:, heads // (HQ // HKV)], mask=got)
    torch.testing.assert_close(sel, full[:, heads][:, :, rows], atol=1e-6, rtol=1e-6)
    assert spec.rows_mask(rows[:0], heads, "cpu").shape[2] == 0

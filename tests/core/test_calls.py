"""qkv.sdpa, qkv.varlen_attention and qkv.merge_attention against their peers, by the tolerance rule.

- sdpa: against torch's own scaled_dot_product_attention on a grid of shapes (2-D to 5-D,
  broadcast batch and heads, grouped-query), masks (bool, float, fully masked rows) and
  top-left causal with L <, =, > S; outputs and dq, dk, dv; dropout statistically.
- varlen_attention: against a per-sequence loop of qkv.reference_attention (its own float64
  run the exact answer), on length mixes with empty sequences and lq != lk, causal, windows,
  softcap, GQA, in float32, bfloat16 and float64; its BlockMask against a dense oracle.
- merge_attention: against attention over the concatenated keys.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.core import calls
from qkv.core.api import attention_with_lse_exact
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _randn(shapes, seed):
    """float64 normals of each shape from one seeded generator (cast by the caller)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]


def _run(fn, inputs, dtype, upstream, grads=True):
    """fn(*inputs in dtype) and the gradients of (out . upstream) w.r.t. the inputs."""
    xs = [x.to(dtype).detach().requires_grad_(grads) for x in inputs]
    out = fn(*xs)
    g = torch.autograd.grad(out, xs, upstream.to(out.dtype)) if grads else ()
    return out, g


def _check(fast_fn, peer_fn, inputs, out_shape, dtype, what, grads=True, seed=1):
    """fast in dtype vs the peer in dtype vs the peer in float64, outputs and input gradients."""
    (upstream,) = _randn([out_shape], seed)
    fast, gf = _run(fast_fn, inputs, dtype, upstream, grads)
    plain, gp = _run(peer_fn, inputs, dtype, upstream, grads)
    exact, ge = _run(peer_fn, inputs, torch.float64, upstream, grads)
    assert fast.dtype == dtype
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=f"{what} out")
    for i in range(len(gf)):
        assert_within_rule(gf[i], gp[i], ge[i], factor=GRAD_FACTOR, what=f"{what} grad {i}")


# ====================================================================== sdpa
# (query, key, value) shapes, keyword arguments; torch SDPA is the peer
SDPA_CASES = {
    "4d": (((2, 3, 9, 16), (2, 3, 13, 16), (2, 3, 13, 8)), {}),
    "4d-causal-square": (((2, 3, 11, 16), (2, 3, 11, 16), (2, 3, 11, 16)), {"is_causal": True}),
    "4d-causal-short-q": (((1, 2, 5, 16), (1, 2, 12, 16), (1, 2, 12, 16)), {"is_causal": True}),
    "4d-causal-long-q": (((1, 2, 12, 16), (1, 2, 5, 16), (1, 2, 5, 16)), {"is_causal": True}),
    "3d-causal": (((4, 7, 8), (4, 10, 8), (4, 10, 8)), {"is_causal": True}),
    "2d": (((7, 8), (10, 8), (10, 6)), {}),
    "5d-broadcast": (((2, 3, 2, 6, 8), (1, 3, 2, 9, 8), (2, 1, 2, 9, 8)), {}),
    "mqa-without-gqa": (((2, 4, 6, 8), (2, 1, 9, 8), (2, 1, 9, 8)), {"scale": 0.3}),
    "gqa": (((2, 6, 7, 16), (2, 2, 10, 16), (2, 2, 10, 16)), {"enable_gqa": True, "is_causal": True}),
    "gqa-5d": (((2, 2, 4, 5, 8), (2, 2, 2, 7, 8), (2, 2, 2, 7, 8)), {"enable_gqa": True}),
    "gqa-k-v-differ": (((1, 4, 5, 8), (1, 2, 7, 8), (1, 1, 7, 8)), {"enable_gqa": True}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_sdpa_matches_torch(case, dtype):
    shapes, kw = SDPA_CASES[case]
    inputs = _randn(shapes, seed=hash(case) % 1000)
    if kw.get("enable_gqa"):
        out_shape = shapes[0][:-1] + (shapes[2][-1],)
    else:  # batch and heads broadcast
        out_shape = tuple(torch.broadcast_shapes(*(s[:-2] for s in shapes))) + (shapes[0][-2], shapes[2][-1])
    _check(lambda q, k, v: qkv.sdpa(q, k, v, **kw), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw),
           inputs, out_shape, dtype, f"sdpa {case}")


def _masks(L, S, seed):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 1, L, S, generator=gen) > 0.4  # (B, 1, L, S), key padding-like and random
    keep[0, 0, 2] = False  # a row that sees nothing
    bias = torch.randn(3, L, S, generator=gen, dtype=torch.float64)  # (H, L, S), broadcast over the batch
    bias[1, 3] = float("-inf")  # a row whose float mask is all -inf
    return {"bool": keep, "float": bias, "bool-2d": keep[1, 0], "key-padding": keep[:, :, :1]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float", "bool-2d", "key-padding"])
def test_sdpa_masks_match_torch(kind, dtype):
    L, S = 9, 13
    inputs = _randn([(2, 3, L, 16), (2, 3, S, 16), (2, 3, S, 8)], seed=3)
    mask = _masks(L, S, 4)[kind]

    def with_mask(fn):
        def call(q, k, v):
            m = mask.to(q.dtype) if mask.dtype.is_floating_point else mask  # torch wants the query's dtype
            return fn(q, k, v, attn_mask=m)
        return call

    _check(with_mask(qkv.sdpa), with_mask(F.scaled_dot_product_attention), inputs, (2, 3, L, 8), dtype,
           f"sdpa mask {kind}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_rows_that_see_nothing_are_zeros_like_torch(dtype):
    """torch 2.13 on the CPU returns zeros for a row whose mask is all False (every kernel): so does qkv."""
    q, k, v = (t.to(dtype) for t in _randn([(1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8)], seed=5))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False
    ours = qkv.sdpa(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(theirs[:, :, 1], torch.zeros_like(theirs[:, :, 1]))  # the peer's behaviour, checked
    assert torch.equal(ours[:, :, 1], torch.zeros_like(ours[:, :, 1]))
    assert ours[:, :, 0].abs().sum() > 0


def test_sdpa_top_left_causal_is_not_bottom_right():
    """The same call through qkv.attention(causal=True) differs when L != S: the alignment is real."""
    q, k, v = (t.float() for t in _randn([(1, 1, 4, 8), (1, 1, 7, 8), (1, 1, 7, 8)], seed=6))
    top_left = qkv.sdpa(q, k, v, is_causal=True)
    i, j = torch.arange(4)[:, None], torch.arange(7)[None, :]
    torch.testing.assert_close(top_left, qkv.reference_attention(q, k, v, mask=j <= i), atol=1e-6, rtol=1e-6)
    assert (top_left - qkv.attention(q, k, v, causal=True)).abs().max() > 1e-2


def test_sdpa_dropout_has_torch_distribution():
    """With all scores equal and one-hot values, each output entry is a weight: 0 where dropped,
    1/(S (1 - p)) where kept. The share dropped is p for qkv as for torch (not the same numbers)."""
    B, H, L, S, p = 4, 4, 64, 64, 0.3
    q = torch.zeros(B, H, L, 8)
    k = torch.randn(B, H, S, 8)
    v = torch.eye(S).expand(B, H, S, S)
    torch.manual_seed(0)
    shares = {}
    for name, fn in (("qkv", qkv.sdpa), ("torch", F.scaled_dot_product_attention)):
        out = fn(q, k, v, dropout_p=p)
        kept = out != 0
        torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (S * (1 - p))))
        shares[name] = 1 - kept.float().mean().item()
    n = B * H * L * S
    for name, share in shares.items():  # 5 standard deviations of a binomial share
        assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n), (name, share)
    assert torch.equal(qkv.sdpa(q, k, v, dropout_p=1.0), torch.zeros(B, H, L, S))  # as torch: all dropped


def test_sdpa_errors_are_torchs():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        qkv.sdpa(q, k, v)
    with pytest.raises(ValueError, match="divide"):
        qkv.sdpa(torch.randn(1, 3, 5, 8), k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="cannot be given together"):
        qkv.sdpa(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="float32 or the query's dtype"):
        qkv.sdpa(q, q, q, attn_mask=torch.zeros(5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="bool"):
        qkv.sdpa(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not broadcast"):
        qkv.sdpa(q, q, q, attn_mask=torch.ones(3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 to 4 dimensions"):
        qkv.sdpa(q, q, q, attn_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        qkv.sdpa(torch.randn(8), torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="same length S"):
        qkv.sdpa(q, k, v[:, :, :5])


# ==================================================================== varlen
def _per_sequence(q, k, v, cu_q, cu_k, **kw):
    """The peer: qkv.reference_attention on each sequence alone, concatenated."""
    parts = []
    for d in range(len(cu_q) - 1):
        a, b, c, e = int(cu_q[d]), int(cu_q[d + 1]), int(cu_k[d]), int(cu_k[d + 1])
        qs, ks, vs = (t.permute(1, 0, 2).unsqueeze(0) for t in (q[a:b], k[c:e], v[c:e]))  # (1, H, l, D)
        parts.append(qkv.reference_attention(qs, ks, vs, **kw)[0].permute(1, 0, 2))  # (l, H, Dv)
    return torch.cat(parts)


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def _softcap(cap):
    return lambda s, b, h, q, k: cap * torch.tanh(s / cap)


# (query lengths, key lengths): empty sequences on either side, lq != lk both ways
LENGTHS = {
    "equal": ([23, 1, 40, 9], [23, 1, 40, 9]),
    "empty-and-ragged": ([17, 0, 31, 5, 12], [17, 6, 31, 0, 20]),
    "short-q": ([3, 8, 1], [20, 9, 33]),
    "long-q": ([30, 12], [7, 12]),
}
# keyword arguments of varlen_attention -> those of the per-sequence reference
OPTIONS = {
    "plain": ({}, {}),
    "causal": ({"causal": True}, {"causal": True}),
    "window-fa": ({"window": (4, 2)}, {"window": (4, 2)}),
    "causal-window-left-only": ({"causal": True, "window": (5, -1)}, {"causal": True, "window": (5, None)}),
    "right-only": ({"window": (-1, 3)}, {"window": (None, 3)}),
    "softcap-scale": ({"softcap": 1.5, "scale": 0.4, "causal": True},
                      {"score_mod": _softcap(1.5), "scale": 0.4, "causal": True}),
}


@pytest.fixture(params=[(16, 10**9), (128, 10**9), (16, 10)], ids=["packed-block16", "packed-block128", "mixed"])
def varlen_block(request, monkeypatch):
    """The varlen BlockMask's block size (16 puts many sequence edges inside blocks) and the length
    from which `auto` runs a sequence alone (10: the longer sequences alone, the rest packed)."""
    block, alone = request.param
    monkeypatch.setattr(calls, "_VARLEN_BLOCK", block)
    monkeypatch.setattr(calls, "_VARLEN_ALONE", alone)
    return f"{block}-{alone}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
def test_varlen_matches_per_sequence_reference(lengths, option, dtype, varlen_block):
    lq, lk = LENGTHS[lengths]
    cu_q, cu_k = _cu(lq), _cu(lk)
    H, Hkv, D, Dv = 4, 2, 16, 8
    inputs = _randn([(sum(lq), H, D), (sum(lk), Hkv, D), (sum(lk), Hkv, Dv)], seed=7)
    ours, theirs = OPTIONS[option]
    _check(lambda q, k, v: qkv.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), **ours),
           lambda q, k, v: _per_sequence(q, k, v, cu_q, cu_k, **theirs),
           inputs, (sum(lq), H, Dv), dtype, f"varlen {lengths}/{option}/block{varlen_block}")


def test_varlen_int_window_and_reference_backend(varlen_block):
    lq = [20, 0, 35]
    cu = _cu(lq)
    q, k, v = (t.float() for t in _randn([(55, 2, 8), (55, 2, 8), (55, 2, 8)], seed=8))
    expected = _per_sequence(q, k, v, cu, cu, window=3)
    for backend in ("auto", "sparse", "tiled", "reference"):
        got = qkv.varlen_attention(q, k, v, cu, cu, 35, 35, window=3, backend=backend)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


def test_varlen_rows_that_see_nothing_are_zeros():
    """An empty key sequence, and causal rows before the first key when lq > lk: zeros (FlashAttention's)."""
    cu_q, cu_k = _cu([4, 6]), _cu([0, 2])
    q, k, v = (t.float() for t in _randn([(10, 2, 8), (2, 2, 8), (2, 2, 8)], seed=9))
    out = qkv.varlen_attention(q, k, v, cu_q, cu_k, 6, 2, causal=True)
    assert torch.equal(out[:4], torch.zeros(4, 2, 8))  # sequence 0 has no keys
    assert torch.equal(out[4:8], torch.zeros(4, 2, 8))  # rows 0..3 of sequence 1 (lq 6, lk 2) see none
    assert out[8:].abs().sum() > 0


def _dense_oracle(lq, lk, causal, left, right):
    """(total_q, total_k) bool: the varlen mask written out from the lengths."""
    rows = []
    for d, (a, b) in enumerate(zip(lq, lk)):
        i, j = torch.arange(a)[:, None], torch.arange(b)[None, :]
        ok = torch.ones(a, b, dtype=torch.bool)
        if causal:
            ok &= j <= i + b - a
        if left is not None:
            ok &= j >= i + b - a - left
        if right is not None:
            ok &= j <= i + b - a + right
        row = [torch.zeros(a, x, dtype=torch.bool) for x in lk]
        row[d] = ok
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (3, 5)), (True, (9, -1))])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
def test_varlen_block_mask_is_exact(lengths, causal, window):
    """Every block's label (full, partial, empty) is the oracle's; the dense picture equals it."""
    lq, lk = LENGTHS[lengths]
    left, right = calls._varlen_band(causal, window)
    bm = calls.varlen_mask(_cu(lq), _cu(lk), causal=causal, window=window, block_size=8)
    dense = _dense_oracle(lq, lk, causal, left, right)
    assert torch.equal(bm.to_dense()[0, 0], dense)
    states = bm.block_states()[0, 0]  # (nq, nk)
    for qb in range(states.shape[0]):
        for kb in range(states.shape[1]):
            blk = dense[qb * 8:(qb + 1) * 8, kb * 8:(kb + 1) * 8]
            want = 2 if bool(blk.all()) else 0 if not bool(blk.any()) else 1
            assert int(states[qb, kb]) == want, (qb, kb)


def test_varlen_never_evaluates_the_whole_grid(monkeypatch):
    """64 documents of 64 tokens: building the mask and a forward and backward evaluate the mask
    function on a small share of the total x total grid, never on all of it at once."""
    sizes = []
    make = calls._document_pattern

    def spying(*args):
        p = make(*args)
        fn = p.fn

        def counted(b, h, q_idx, kv_idx):
            out = fn(b, h, q_idx, kv_idx)
            sizes.append(torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape).numel())
            return out

        return calls.Pattern(counted, p.classify, p.name)

    monkeypatch.setattr(calls, "_document_pattern", spying)
    monkeypatch.setattr(calls, "_VARLEN_MASKS", type(calls._VARLEN_MASKS)())
    lengths = [50, 78] * 32  # edges inside blocks
    cu = _cu(lengths)
    total = sum(lengths)
    q, k, v = (t.float().requires_grad_() for t in _randn([(total, 2, 8)] * 3, seed=10))
    out = qkv.varlen_attention(q, k, v, cu, cu, 78, 78, causal=True, backend="sparse")
    out.sum().backward()
    assert sizes and max(sizes) < total * total / 4
    assert sum(sizes) < total * total / 4


@pytest.mark.parametrize("backend", ["sparse", "auto"])
def test_varlen_dropout_distribution(backend, monkeypatch):
    """Equal scores and one-hot values: each entry is 0 (dropped) or 1/(l (1 - p)) (kept), and
    entries outside a token's own sequence are always 0; the share dropped is p. With auto, the
    two longer sequences run alone (through torch's SDPA dropout), the shortest packed."""
    monkeypatch.setattr(calls, "_VARLEN_ALONE", 30)
    lengths, p = [40, 24, 64], 0.25
    cu = _cu(lengths)
    total = sum(lengths)
    q, k = torch.zeros(total, 4, 8), torch.randn(total, 4, 8)
    v = torch.eye(total).unsqueeze(1).expand(total, 4, total)  # (total, H, Dv = total)
    torch.manual_seed(0)
    out = qkv.varlen_attention(q, k, v, cu, cu, 64, 64, dropout_p=p, backend=backend)  # (total, H, total)
    same = _dense_oracle(lengths, lengths, False, None, None).unsqueeze(1).expand_as(out)
    assert torch.equal(out[~same], torch.zeros_like(out[~same]))
    inside = out[same]
    size = torch.tensor(lengths).repeat_interleave(torch.tensor(lengths)).view(-1, 1, 1).expand_as(out)[same]
    kept = inside != 0
    torch.testing.assert_close(inside[kept], 1 / (size[kept].double() * (1 - p)).float())
    n = inside.numel()
    share = 1 - kept.float().mean().item()
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_varlen_errors():
    q = torch.randn(10, 2, 8)
    cu = _cu([4, 6])
    with pytest.raises(TypeError, match="int32"):
        qkv.varlen_attention(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="start at 0"):
        qkv.varlen_attention(q, q, q, torch.tensor([1, 4, 10], dtype=torch.int32), cu, 6, 6)
    with pytest.raises(ValueError, match="non-decreasing"):
        qkv.varlen_attention(q, q, q, torch.tensor([0, 7, 4, 10], dtype=torch.int32),
                             torch.tensor([0, 3, 4, 10], dtype=torch.int32), 7, 7)
    with pytest.raises(ValueError, match="packs 10 tokens"):
        qkv.varlen_attention(q, q, q, torch.tensor([0, 4, 9], dtype=torch.int32), cu, 6, 6)
    with pytest.raises(ValueError, match="sequences"):
        qkv.varlen_attention(q, q, q, cu, torch.tensor([0, 10], dtype=torch.int32), 6, 10)
    with pytest.raises(ValueError, match="max_seqlen_q=5 is less than the longest sequence, 6"):
        qkv.varlen_attention(q, q, q, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="3-D"):
        qkv.varlen_attention(q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="window left"):
        qkv.varlen_attention(q, q, q, cu, cu, 6, 6, window=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        qkv.varlen_attention(q, q, q, cu, cu, 6, 6, softcap=-1.0)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        qkv.varlen_attention(torch.randn(10, 3, 8), q, q, cu, cu, 6, 6)


# ===================================================================== merge
SPLITS = {
    "two-halves": lambda Lk: [torch.arange(0, Lk // 2), torch.arange(Lk // 2, Lk)],
    "interleaved-three": lambda Lk: [torch.arange(r, Lk, 3) for r in range(3)],
    "one": lambda Lk: [torch.arange(Lk)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_merge_equals_attention_over_the_union(split, dtype):
    """attention_with_lse over disjoint key sets, merged, against attention over all keys; the
    mask leaves one row no key at all and some rows no key in some part."""
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 9, 14
    inputs = _randn([(B, Hq, Lq, 16), (B, Hkv, Lk, 16), (B, Hkv, Lk, 8)], seed=11)
    mask = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + 2  # (Lq, Lk) causal-ish
    mask[4] = False
    parts = SPLITS[split](Lk)

    # qkv.attention_with_lse gives lse in float32 (the core's contract); a float64 merge that is to
    # lose nothing takes the lse in float64 from attention_with_lse_exact
    with_lse = attention_with_lse_exact if dtype == torch.float64 else qkv.attention_with_lse

    def merged(q, k, v):
        pairs = [with_lse(q, k[:, :, idx], v[:, :, idx], mask=mask[:, idx]) for idx in parts]
        out, lse = qkv.merge_attention(pairs)
        assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
        return out

    _check(merged, lambda q, k, v: qkv.reference_attention(q, k, v, mask=mask), inputs, (B, Hq, Lq, 8), dtype,
           f"merge {split}")


def test_merge_lse_and_its_gradient():
    """The merged lse is the lse over the union, and differentiating through it is exact too."""
    q, k, v = (t.requires_grad_() for t in _randn([(1, 2, 5, 8), (1, 2, 11, 8), (1, 2, 11, 8)], seed=12))
    pairs = [attention_with_lse_exact(q, k[:, :, s], v[:, :, s]) for s in (slice(0, 4), slice(4, 11))]
    out, lse = qkv.merge_attention(pairs)
    ref_out, ref_lse = attention_with_lse_exact(q, k, v)
    torch.testing.assert_close(lse, ref_lse.double(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    g = torch.autograd.grad((lse.sin().sum() + out.sum()), (q, k))
    g_ref = torch.autograd.grad((ref_lse.double().sin().sum() + ref_out.sum()), (q, k))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_merge_rows_no_part_saw():
    """All parts -inf: zeros and -inf, and finite (zero) gradients; a part that saw nothing is
    ignored whatever its out holds."""
    out1 = torch.randn(1, 1, 3, 4, requires_grad=True)
    lse1 = torch.tensor([[[0.5, float("-inf"), float("-inf")]]], requires_grad=True)
    out2 = torch.full((1, 1, 3, 4), float("nan"))
    lse2 = torch.full((1, 1, 3), float("-inf"))
    out, lse = qkv.merge_attention([(out1, lse1), (out2, lse2)])
    assert torch.equal(out[0, 0, 1:], torch.zeros(2, 4))
    assert torch.isneginf(lse[0, 0, 1:]).all()
    torch.testing.assert_close(out[0, 0, 0], out1[0, 0, 0])
    assert lse[0, 0, 0].item() == pytest.approx(0.5)
    g_out, g_lse = torch.autograd.grad(out.sum() + lse[..., 0].sum(), (out1, lse1))
    assert torch.isfinite(g_out).all() and torch.isfinite(g_lse).all()


def test_merge_dtypes_and_errors():
    o16 = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    lse = torch.randn(2, 3)
    out, merged = qkv.merge_attention([(o16, lse), (o16, lse)])
    assert out.dtype == torch.bfloat16 and merged.dtype == torch.float32
    out, merged = qkv.merge_attention([(o16.float(), lse.double())])
    assert out.dtype == torch.float32 and merged.dtype == torch.float64
    with pytest.raises(ValueError, match="at least one"):
        qkv.merge_attention([])
    with pytest.raises(TypeError, match="pair"):
        qkv.merge_attention([o16])
    with pytest.raises(ValueError, match="without the last dimension"):
        qkv.merge_attention([(o16, lse[:, :2])])
    with pytest.raises(ValueError, match="same rows in one dtype"):
        qkv.merge_attention([(o16, lse), (o16.float(), lse)])
    with pytest.raises(TypeError, match="list of"):
        qkv.merge_attention(o16)

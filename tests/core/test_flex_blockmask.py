"""FlexAttention's own BlockMask as `mask=`: qkv against eager flex_attention (forward), and against
qkv's reference with the same mask function (gradients: eager FlexAttention has no backward on
the CPU), for causal, sliding-window, document and prefix-LM mask_mods, on every entry point."""

from __future__ import annotations

import warnings

import pytest
import torch

import qkv
from qkv.core import flex_mask
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule

flex = pytest.importorskip("torch.nn.attention.flex_attention")

DTYPES = [torch.float32, torch.bfloat16]


def _causal(b, h, q, kv):
    return q >= kv


def _window(b, h, q, kv):
    return (q - kv).abs() <= 20


_DOC = torch.repeat_interleave(torch.arange(4), torch.tensor([70, 5, 90, 100]))  # (265,) document ids


def _document(b, h, q, kv):
    return (_DOC[q] == _DOC[kv]) & (q >= kv)


def _prefix_lm(b, h, q, kv):
    return (kv < 37) | (q >= kv)


def _per_head(b, h, q, kv):  # depends on b and h: the layout differs per (b, h)
    return (q - kv).abs() <= 8 + 16 * h + 24 * b


MASK_MODS = {"causal": _causal, "window": _window, "document": _document, "prefix-lm": _prefix_lm,
             "per-head": _per_head}
# (B, Hq, Hkv, Lq, Lk, D), the B and H of the FlexAttention mask (None: broadcast), its BLOCK_SIZE
CASES = {
    "square": ((2, 4, 4, 265, 265, 16), (None, None), 128),
    "gqa-small-blocks": ((1, 4, 2, 200, 265, 16), (None, None), (32, 64)),
    "per-head": ((2, 2, 2, 150, 150, 8), (2, 2), 32),
}


def _inputs(shape, seed=0):
    B, Hq, Hkv, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in
            ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), (B, Hq, Lq, D))]


def _flex(q, k, v, fbm, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        return flex.flex_attention(q, k, v, block_mask=fbm, enable_gqa=True, **kw)


def _cases():
    for case, (shape, _bh, _block) in CASES.items():
        for name in MASK_MODS:
            if (name == "per-head") != (case == "per-head"):
                continue
            if name == "document" and shape[4] != 265:
                continue
            yield case, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,name", sorted(_cases()))
def test_forward_matches_eager_flex_attention(case, name, dtype):
    """qkv (auto and sparse) vs FlexAttention in dtype vs FlexAttention in float64."""
    shape, (Bm, Hm), block = CASES[case]
    B, Hq, Hkv, Lq, Lk, D = shape
    fbm = flex.create_block_mask(MASK_MODS[name], Bm, Hm, Lq, Lk, device="cpu", BLOCK_SIZE=block, _compile=False)
    q, k, v, _ = _inputs(shape)
    exact = _flex(q, k, v, fbm)
    plain = _flex(q.to(dtype), k.to(dtype), v.to(dtype), fbm)
    for backend in ("auto", "sparse", "tiled"):
        fast = qkv.attention(q.to(dtype), k.to(dtype), v.to(dtype), mask=fbm, backend=backend)
        assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=f"{case}/{name}/{backend}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,name", sorted(_cases()))
def test_gradients_match_the_reference_with_the_mask_mod(case, name, dtype):
    """Eager FlexAttention refuses backward on the CPU; qkv's gradients under the FlexAttention
    mask are checked against qkv's reference with the same mask function (float64 exact)."""
    shape, (Bm, Hm), block = CASES[case]
    B, Hq, Hkv, Lq, Lk, D = shape
    fbm = flex.create_block_mask(MASK_MODS[name], Bm, Hm, Lq, Lk, device="cpu", BLOCK_SIZE=block, _compile=False)
    q, k, v, up = _inputs(shape, seed=1)
    runs = {}
    for what, dt, mask, fn in (("fast", dtype, fbm, qkv.attention), ("plain", dtype, MASK_MODS[name],
                               qkv.reference_attention), ("exact", torch.float64, MASK_MODS[name],
                               qkv.reference_attention)):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*xs, mask=mask)
        runs[what] = (out, torch.autograd.grad(out, xs, up.to(dt)))
    assert_within_rule(runs["fast"][0], runs["plain"][0], runs["exact"][0], factor=FWD_FACTOR, what=f"{name} out")
    for i, g in enumerate(("dq", "dk", "dv")):
        assert_within_rule(runs["fast"][1][i], runs["plain"][1][i], runs["exact"][1][i], factor=GRAD_FACTOR,
                           what=f"{case}/{name} {g}")


def test_every_entry_point_takes_it():
    """attention (every backend), attention_with_lse, attention_weights, reference_attention,
    with a score_mod too (the same signature as FlexAttention's)."""
    shape = (1, 2, 2, 150, 150, 16)
    q, k, v, _ = (t.float() for t in _inputs(shape, seed=2))
    fbm = flex.create_block_mask(_prefix_lm, None, None, 150, 150, device="cpu", BLOCK_SIZE=32, _compile=False)

    def bias(score, b, h, q_idx, kv_idx):
        return score - 0.05 * (q_idx - kv_idx).abs()

    expected, lse = _flex(q, k, v, fbm, score_mod=bias, return_lse=True)
    for backend in ("auto", "sparse", "tiled", "reference"):  # decode takes at most 16 queries
        got = qkv.attention(q, k, v, mask=fbm, score_mod=bias, backend=backend)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=backend)
    torch.testing.assert_close(qkv.attention(q, k, v, mask=fbm, backend="sdpa"), _flex(q, k, v, fbm),
                               atol=1e-5, rtol=1e-5)  # sdpa has no score_mod
    got, got_lse = qkv.attention_with_lse(q, k, v, mask=fbm, score_mod=bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv.reference_attention(q, k, v, mask=fbm, score_mod=bias), expected,
                               atol=1e-5, rtol=1e-5)
    probs = qkv.attention_weights(q, k, mask=fbm)
    torch.testing.assert_close(probs, qkv.attention_weights(q, k, mask=_prefix_lm), atol=0, rtol=0)
    assert probs[0, 0, 3, 40].item() == 0.0 and probs[0, 0, 3, 36].item() > 0.0


def _layout_only_mask():
    """A mask from from_kv_blocks whose layout leaves out blocks its mask function allows (only the
    diagonal blocks are listed as partial) and lists a whole block as full where it does not
    (row block 2 sees key block 0 whole), and the dense mask that layout means."""
    L, bs = 96, 32
    nq = L // bs
    kv_num = torch.tensor([[[1, 1, 1]]], dtype=torch.int32)  # one partial block per row: the diagonal
    kv_idx = torch.arange(nq, dtype=torch.int32).view(1, 1, nq, 1).expand(1, 1, nq, nq).contiguous()
    full_num = torch.tensor([[[0, 0, 1]]], dtype=torch.int32)
    full_idx = torch.zeros(1, 1, nq, nq, dtype=torch.int32)
    fbm = flex.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=_causal,
                                        seq_lengths=(L, L))
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return fbm, ((i // bs == j // bs) & (j <= i)) | ((i // bs == 2) & (j // bs == 0))


def test_the_layout_decides_as_in_flex_kernels():
    """qkv follows the block lists as FlexAttention's compiled kernels do (full blocks whole,
    partial ones through mask_mod, unlisted ones skipped). FlexAttention's eager path ignores the
    layout and applies mask_mod alone; for a create_block_mask layout the two agree."""
    fbm, want = _layout_only_mask()
    q, k, v, _ = (t.float() for t in _inputs((1, 1, 1, 96, 96, 8), seed=3))
    for backend in ("auto", "tiled", "reference"):
        got = qkv.attention(q, k, v, mask=fbm, backend=backend)
        torch.testing.assert_close(got, qkv.reference_attention(q, k, v, mask=want), atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv.attention_weights(q, k, mask=fbm)[0, 0] > 0, want)
    torch.testing.assert_close(_flex(q, k, v, fbm), qkv.attention(q, k, v, mask=_causal), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_layout_matches_compiled_flex_attention():
    """The same mask through torch.compile(flex_attention) on the CPU (about 10 s to compile)."""
    fbm, want = _layout_only_mask()
    q, k, v, _ = (t.float() for t in _inputs((1, 1, 1, 96, 96, 8), seed=3))
    compiled = torch.compile(flex.flex_attention)(q, k, v, block_mask=fbm)
    torch.testing.assert_close(qkv.attention(q, k, v, mask=fbm), compiled, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(compiled, _flex(q, k, v, fbm), atol=1e-3)  # eager differs: it ignores the layout


def test_conversion_is_cached_and_dies_with_the_mask():
    fbm = flex.create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16, _compile=False)
    a = flex_mask.from_flex(fbm, 2, 4, 64, 64)
    assert flex_mask.from_flex(fbm, 2, 4, 64, 64) is a
    assert flex_mask.from_flex(fbm, 1, 4, 64, 64) is not a
    assert a.block_size == (16, 16) and a.counts()["full"] == 6 and a.counts()["partial"] == 4
    n = len(flex_mask._CACHE)
    del fbm
    assert len(flex_mask._CACHE) == n - 1


def test_sizes_must_match():
    fbm = flex.create_block_mask(_causal, 2, None, 64, 80, device="cpu", _compile=False)
    q, k = torch.randn(2, 2, 64, 8), torch.randn(2, 2, 80, 8)
    with pytest.raises(ValueError, match="Q_LEN=64, KV_LEN=80 but q/k have Lq=64, Lk=70"):
        qkv.attention(q, k[:, :, :70], k[:, :, :70], mask=fbm)
    with pytest.raises(ValueError, match="its batch is 2 but q has B=3"):
        qkv.attention(torch.randn(3, 2, 64, 8), torch.randn(3, 2, 80, 8), torch.randn(3, 2, 80, 8), mask=fbm)
    per_head = flex.create_block_mask(_causal, None, 4, 64, 80, device="cpu", _compile=False)
    with pytest.raises(ValueError, match="its heads are 4 but q has Hq=2"):
        qkv.attention(q, k, k, mask=per_head)

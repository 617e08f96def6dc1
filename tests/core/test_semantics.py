"""What the arguments mean, checked against hand-written index formulas (not the library's own code)."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.core import _kernels, choose_backend
from qkv.core.api import attention_with_lse_exact
from qkv.core.engines import flash, native_flash
from qkv.core.spec import build_spec

BACKENDS = ["reference", "sdpa", "tiled"]


def _qkv(B=1, Hq=2, Hkv=2, Lq=6, Lk=9, D=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=gen, dtype=dtype),
            torch.randn(B, Hkv, Lk, D, generator=gen, dtype=dtype),
            torch.randn(B, Hkv, Lk, D, generator=gen, dtype=dtype))


def _dense(q, k, v, allowed):
    """Attention with an explicit bool mask, written out: the oracle for the flag arguments."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v.double()).to(q.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,Lk", [(6, 9), (9, 6), (7, 7), (1, 9)])
def test_causal_is_aligned_bottom_right(backend, Lq, Lk):
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    expected = _dense(q, k, v, j <= i + (Lk - Lq))
    got = qkv.attention(q, k, v, causal=True, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decode_step_sees_the_whole_cache():
    q, k, v = _qkv(Lq=1, Lk=50)
    torch.testing.assert_close(qkv.attention(q, k, v, causal=True), qkv.attention(q, k, v), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,causal,left,right", [
    (2, False, 2, 2), (2, True, 2, 0), ((1, 3), False, 1, 3), ((3, 1), True, 3, 0), ((0, 0), False, 0, 0),
])
def test_window_semantics(backend, window, causal, left, right):
    q, k, v = _qkv(Lq=7, Lk=11)
    pos = torch.arange(7)[:, None] + (11 - 7)
    j = torch.arange(11)[None, :]
    expected = _dense(q, k, v, (j >= pos - left) & (j <= pos + right))
    with flash.block_sizes(2, 3):
        got = qkv.attention(q, k, v, window=window, causal=causal, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "auto", "tiled", "decode"])
@pytest.mark.parametrize("Lq,Lk", [(9, 9), (4, 11)])
@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_causal_with_a_scale_of_zero_or_less(backend, Lq, Lk, scale):
    """torch's fused CPU kernels return NaN rows for is_causal with scale <= 0 (the sdpa backend's
    causal call and its causal split for Lq < Lk, which auto picks): the hand-written band, finite."""
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    expected = (torch.softmax(s.masked_fill(j > i + (Lk - Lq), float("-inf")), -1) @ v.double()).float()
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    got = qkv.attention(*xs, causal=True, scale=scale, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if backend != "decode":
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(got.sum(), xs))


HUGE = 2**63 - 1  # sys.maxsize, "unbounded"


@pytest.mark.parametrize("backend", BACKENDS + ["native", "auto", "decode"])
@pytest.mark.parametrize("window,causal,left,right", [
    (HUGE, False, None, None), ((0, HUGE), False, 0, None), ((5, 2**63), False, 5, None), (2**70, True, None, 0),
    ((HUGE, 3), False, None, 3), ((17, 17), False, None, None), ((16, 2), False, 16, 2),
])
def test_window_reach_past_every_key_is_no_constraint(backend, window, causal, left, right):
    """A reach of Lq + Lk or more (here 7 + 11 = 18) passes every key, up to sys.maxsize and past int64
    (window=(0, sys.maxsize) gave rows of zeros on every backend; (sys.maxsize, sys.maxsize) wrong rows on
    native and sparse; 2**70 an OverflowError or wrong rows): the hand-written band, reaches as given."""
    if backend == "native" and native_flash.lib() is None:
        pytest.skip(f"the native flash kernel is unavailable here: {_kernels.status('flash_fwd_kernel')}")
    q, k, v = _qkv(Lq=7, Lk=11)
    pos = torch.arange(7)[:, None] + (11 - 7)
    j = torch.arange(11)[None, :]
    allowed = torch.ones(7, 11, dtype=torch.bool)
    if left is not None:
        allowed &= j >= pos - left
    if right is not None:
        allowed &= j <= pos + right
    expected = _dense(q, k, v, allowed)
    got = qkv.attention(q, k, v, window=window, causal=causal, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rows_that_see_nothing_give_zeros_and_finite_gradients(backend, dtype):
    q, k, v = (t.requires_grad_() for t in _qkv(B=2, Hq=4, Hkv=2, dtype=dtype))
    mask = torch.ones(2, 4, 6, 9, dtype=torch.bool)
    mask[0, 1, 3] = False
    mask[1, :, 0] = False
    out, lse = (qkv.attention_with_lse(q, k, v, mask=mask, backend=backend) if backend != "sdpa"
                else (qkv.attention(q, k, v, mask=mask, backend=backend), None))
    assert out.dtype == dtype
    assert torch.all(out[0, 1, 3] == 0) and torch.all(out[1, :, 0] == 0)
    assert not torch.isnan(out).any()
    if lse is not None:
        assert torch.isneginf(lse[0, 1, 3]) and torch.isneginf(lse[1, :, 0]).all()
        assert torch.isfinite(lse[0, 0]).all()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    weights = qkv.attention_weights(q, k, mask=mask)
    assert torch.all(weights[0, 1, 3] == 0) and torch.all(weights[1, :, 0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_of_minus_inf_rows(backend):
    q, k, v = _qkv()
    bias = torch.zeros(1, 1, 6, 9)
    bias[..., 2, :] = float("-inf")
    out = qkv.attention(q, k, v, mask=bias, backend=backend)
    assert torch.all(out[..., 2, :] == 0) and not torch.isnan(out).any()


@pytest.mark.parametrize("backend", ["auto", "reference", "tiled", "decode"])
def test_no_keys_at_all(backend):
    q, k, v = _qkv(Lq=3, Lk=0)
    out, lse = qkv.attention_with_lse(q, k, v, backend=backend)
    assert out.shape == (1, 2, 3, 8) and torch.all(out == 0) and torch.isneginf(lse).all()
    assert qkv.attention_weights(q, k).shape == (1, 2, 3, 0)


def test_key_padding_mask_equals_dropping_the_keys():
    q, k, v = _qkv(B=1, Lk=9)
    pad = (torch.arange(9) < 5).view(1, 1, 1, 9)
    torch.testing.assert_close(qkv.attention(q, k, v, mask=pad), qkv.attention(q, k[:, :, :5], v[:, :, :5]))


def test_mask_function_equals_its_dense_mask():
    q, k, v = _qkv()
    i, j = torch.arange(6)[:, None], torch.arange(9)[None, :]
    dense = (i + j) % 2 == 0
    for backend in BACKENDS:
        got = qkv.attention(q, k, v, mask=lambda b, h, qi, kj: (qi + kj) % 2 == 0, backend=backend)
        torch.testing.assert_close(got, _dense(q, k, v, dense), atol=1e-5, rtol=1e-5)


def test_score_mod_equals_additive_bias():
    q, k, v = _qkv(Hq=2)
    i, j = torch.arange(6).view(1, 1, 6, 1), torch.arange(9).view(1, 1, 1, 9)
    h = torch.arange(2).view(1, 2, 1, 1)
    bias = -0.5 * (h + 1) * (i - j).abs().float()  # (1, 2, 6, 9)
    expected = qkv.attention(q, k, v, mask=bias, backend="reference")
    for backend in ("reference", "tiled"):
        got = qkv.attention(q, k, v, score_mod=lambda s, b, hh, qi, kj: s - 0.5 * (hh + 1) * (qi - kj).abs(),
                            backend=backend)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_scale_one_reproduces_unscaled_softmax():
    q, k, v = _qkv(dtype=torch.float64)
    expected = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    torch.testing.assert_close(qkv.reference_attention(q, k, v, scale=1.0), expected)


def test_gqa_equals_repeated_heads():
    q, k, v = _qkv(Hq=6, Hkv=2)
    rep = [t.repeat_interleave(3, dim=1) for t in (k, v)]
    for backend in BACKENDS:
        torch.testing.assert_close(qkv.attention(q, k, v, causal=True, backend=backend),
                                   qkv.attention(q, *rep, causal=True, backend="reference"), atol=1e-5, rtol=1e-5)


def test_attention_weights_rows_sum_to_one_and_give_the_output():
    q, k, v = _qkv(Hq=4, Hkv=2)
    w = qkv.attention_weights(q, k, causal=True)
    assert w.shape == (1, 4, 6, 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 6))
    torch.testing.assert_close(w @ v.repeat_interleave(2, dim=1), qkv.attention(q, k, v, causal=True),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_statistics(backend):
    """With v the identity, the output is the dropped weight matrix itself."""
    torch.manual_seed(0)
    L, p = 64, 0.25
    q = torch.randn(2, 4, L, 16)
    k = torch.randn(2, 4, L, 16)
    v = torch.eye(L).expand(2, 4, L, L)
    weights = qkv.attention_weights(q, k)
    with flash.block_sizes(16, 16):
        dropped = qkv.attention(q, k, v, dropout_p=p, backend=backend)
    kept = dropped != 0
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, f"kept fraction {frac:.3f}, expected {1 - p}"
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p), atol=1e-5, rtol=1e-4)
    rows = dropped.sum(-1)  # expectation 1: each weight kept with 1-p and scaled 1/(1-p)
    assert abs(rows.mean().item() - 1.0) < 0.02, f"mean row sum {rows.mean().item():.4f}"
    assert torch.equal(qkv.attention(q, k, v, dropout_p=0.0, backend=backend).ne(0), weights.ne(0))


def test_tiled_dropout_is_reproducible_and_differentiable():
    q, k, v = (t.requires_grad_() for t in _qkv(Lq=40, Lk=40))
    with flash.block_sizes(8, 16):
        torch.manual_seed(1)
        a = qkv.attention(q, k, v, dropout_p=0.3, backend="tiled")
        torch.manual_seed(1)
        b = qkv.attention(q, k, v, dropout_p=0.3, backend="tiled")
        assert torch.equal(a, b)
        # Gradient check: the same keep-mask is replayed in backward; compare with finite differences.
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))

        def f(qq, kk, vv):
            torch.manual_seed(2)
            return qkv.attention(qq, kk, vv, dropout_p=0.3, backend="tiled")

        # fast_mode: finite differences along random directions (torch's fast gradcheck), one
        # Jacobian-vector product each instead of two forward passes per input element.
        assert torch.autograd.gradcheck(f, (q64, k64, v64), eps=1e-6, atol=1e-5, fast_mode=True)


def test_tiled_gradcheck_with_score_mod_and_window():
    q, k, v = (t.double().requires_grad_() for t in _qkv(Hq=4, Hkv=2, Lq=5, Lk=7, D=4))
    with flash.block_sizes(2, 3):
        assert torch.autograd.gradcheck(
            lambda a, b, c: attention_with_lse_exact(  # float64 lse: finite differences need it
                a, b, c, window=(2, 1), score_mod=lambda s, *_: 3 * torch.tanh(s / 3), backend="tiled"),
            (q, k, v), eps=1e-6, atol=1e-6)


def test_auto_never_picks_a_quadratic_mask_for_long_inputs():
    from qkv.core.backend import native

    q, k, v = (torch.empty(1, 8, 1 << 16, 64) for _ in range(3))
    # the native kernel where it was measured to win (its CPU kind, its kernel built), else SDPA or, for the
    # lse, the tiled engine: none of them forms a mask
    fused = "native" if native.measured_cpu() and native.native_flash.lib() is not None else None
    assert choose_backend(build_spec(q, k, v), q, False) == (fused or "sdpa")
    assert choose_backend(build_spec(q, k, v, causal=True), q, False) == (fused or "sdpa")
    assert choose_backend(build_spec(q, k, v, window=256), q, False) == "sparse"  # a narrow band: the gathered engine
    assert choose_backend(build_spec(q, k, v, causal=True), q, True) == (fused or "tiled")
    mask_fn = lambda b, h, i, j: i >= j  # noqa: E731
    assert choose_backend(build_spec(q, k, v, mask=mask_fn), q, False) == "tiled"
    small = torch.empty(1, 8, 128, 64)
    assert choose_backend(build_spec(small, small, small, window=16), small, False) == "sdpa"


def test_reference_refuses_huge_score_matrices():
    q = torch.zeros(1, 8, 1 << 14, 1)
    with pytest.raises(ValueError, match="backend='tiled'"):
        qkv.reference_attention(q, q, q)
    with pytest.raises(ValueError, match="GiB"):
        qkv.attention(q, q, q, backend="reference")


def test_inputs_are_not_modified():
    q, k, v = _qkv()
    copies = [t.clone() for t in (q, k, v)]
    for backend in BACKENDS:
        qkv.attention(q, k, v, causal=True, score_mod=None, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))


def test_decode_backend_chunk_against_cache_and_its_limits():
    q, k, v = _qkv(Hq=8, Hkv=2, Lq=5, Lk=3000)
    i, j = torch.arange(5)[:, None], torch.arange(3000)[None, :]
    k4, v4 = (t.repeat_interleave(4, dim=1) for t in (k, v))  # (1, 8, 3000, 8): each query head's kv head
    expected = _dense(q, k4, v4, j <= i + 2995)  # bottom-right: the chunk sees the cache and its past
    torch.testing.assert_close(qkv.attention(q, k, v, causal=True, backend="decode"), expected, atol=1e-5, rtol=1e-5)
    one, cache = q[:, :, :1], torch.zeros(1, 2, 32768, 8)  # one new query against a long cache (4 MiB)
    assert choose_backend(build_spec(one, cache, cache, causal=True), one, False) == "decode"
    with pytest.raises(ValueError, match="at most 16 queries.*backend='tiled'"):
        qkv.attention(*_qkv(Lq=17, Lk=3000), backend="decode")

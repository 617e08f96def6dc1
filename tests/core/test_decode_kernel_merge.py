"""The native decode kernel's whole step (qkv_decode): work items handed out as threads come free,
the cache prefetched 64 keys ahead of each read, and the splits' partial states merged and finished
in C++ (csrc/decode_kernel.cpp) rather than by torch (flash.merge_states and flash.finish).

What these tests aim at:
- the merge: forced split counts (1 to 16, some splits shorter than a block, some past the keys
  any row sees), key counts around the blocks of 64 and the prefetch distance of 64, grouped
  query heads 4/1 and 8/1, masks under which whole splits and whole rows see nothing, causal and
  window bands (a band inside one split); out and lse against the float64 reference by the
  tolerance rule (qkv.testing), a row that sees nothing as out 0, lse -inf;
- the same call against the kernel's partial states merged by torch (qkv_decode_partials with
  flash.merge_states and flash.finish, the earlier path), which must agree to float32 rounding;
- the threads: the same result, bit for bit, on 1, 2 and 3 threads (items taken in any order).
"""

from __future__ import annotations

import math

import pytest
import torch
from decode_partials import partials_merged_by_torch
from random_qkv import random_qkv

import qkv
from qkv.core import _kernels
from qkv.core.engines import decode_native
from qkv.core.spec import build_spec
from qkv.testing import FWD_FACTOR, assert_within_rule

pytestmark = pytest.mark.skipif(decode_native.lib() is None,
                                reason=f"the native decode kernel is unavailable: {_kernels.status('decode_kernel')}")

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed):
    (q, k, v), gen = random_qkv(B, Hq, Hkv, Lq, Lk, torch.float64, seed, D=D, Dv=D)
    v = v + torch.linspace(-2.0, 2.0, D, dtype=torch.float64)  # a dimension out of place shows
    return [t.to(dtype) for t in (q, k, v)], gen


def _kernel_step(q, k, v, **kw):
    """(out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32, suspect) from decode_native.forward,
    as the decode backend calls it."""
    spec = build_spec(q, k, v, **kw)
    lo, hi = spec.kv_range(0, spec.Lq)
    lo, hi = max(lo, 0), min(hi, spec.Lk)
    return decode_native.forward(decode_native.lib(), q, k, v, spec, lo, hi)


def _exact_lse(q, k, mask, causal, window):
    """float64 lse (B, Hq, Lq) by definition: logsumexp of the visible scaled scores."""
    q64, k64 = q.double(), k.double()
    G = q.shape[1] // k.shape[1]
    s = q64 @ k64.repeat_interleave(G, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, Hq, Lq, Lk)
    Lq, Lk = s.shape[-2:]
    i = torch.arange(Lq)[:, None] + (Lk - Lq)
    j = torch.arange(Lk)[None, :]
    seen = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        seen &= j <= i
    if window is not None:
        seen &= (j >= i - window[0]) & (j <= i + window[1])
    if mask is not None:
        seen = seen & mask
    return torch.logsumexp(s.masked_fill(~seen, float("-inf")), dim=-1)


def _padding(B, Lk, lengths):
    """(B, 1, 1, Lk) key-padding mask: batch row b sees its first lengths[b] keys."""
    return (torch.arange(Lk)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


# (Hq, Hkv, Lq, Lk, D): 4 and 8 rows per kv head, odd key counts around the blocks (64) and the
# prefetch distance (64: keys 64 to 127 are the first a tile asks for ahead), a longer cache.
SHAPES = [(4, 1, 1, 1, 64), (8, 1, 1, 63, 64), (4, 1, 1, 65, 32), (8, 1, 1, 127, 64), (4, 1, 1, 129, 128),
          (8, 1, 2, 1001, 48), (8, 2, 1, 4099, 128), (4, 1, 3, 2113, 64)]


@pytest.mark.parametrize("S", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_splits_by_the_rule(dtype, Hq, Hkv, Lq, Lk, D, S, monkeypatch):
    """out and lse of qkv_decode, S splits forced, against float64 by the rule; a batch row with
    an empty cache gets out 0 and lse -inf; the masks leave later splits empty for some rows."""
    monkeypatch.setattr(decode_native, "splits", lambda *a: S)
    B = 3
    (q, k, v), _ = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=Lk * 7 + S)
    lengths = [Lk, 0, max(1, Lk // 3)]  # row 1 sees nothing, row 2 only the first splits
    mask = _padding(B, Lk, lengths)
    causal = Lq > 1
    out, lse, suspect = _kernel_step(q, k, v, mask=mask, causal=causal)
    assert not bool(suspect), "finite inputs were flagged"
    assert torch.all(out[1] == 0), "a row with an empty cache attends to nothing"
    assert torch.all(torch.isneginf(lse[1])), "a row with an empty cache has lse -inf"
    seen = [0, 2]
    exact = qkv.reference_attention(q.double(), k.double(), v.double(), mask=mask, causal=causal)
    plain = qkv.reference_attention(q, k, v, mask=mask, causal=causal)
    assert_within_rule(out.to(dtype)[seen], plain[seen], exact[seen], factor=FWD_FACTOR,
                       what=f"out {dtype} {Hq}/{Hkv} Lq={Lq} Lk={Lk} D={D} S={S}")
    lse_exact = _exact_lse(q, k, mask[:, 0, 0, None, :].expand(B, Lq, Lk)[:, None], causal, None)
    # lse in float32 from the float32 products of the (bfloat16-exact) inputs: a few float32 roundings of |lse|.
    err = float((lse[seen].double() - lse_exact[seen]).abs().max())
    assert err <= 1e-5 * float(lse_exact[seen].abs().max() + 1), f"lse error {err:.3e}"


@pytest.mark.parametrize("S", [1, 2, 4, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [(3, 0), (100, 0), (700, 0)], ids=["w3", "w100", "w700"])
def test_window_bands_inside_one_split(dtype, window, S, monkeypatch):
    """A causal window (the kernel's per-row band arrays): with 7 splits of 2048 keys a 3-key
    window lies inside one split and all other splits see nothing."""
    monkeypatch.setattr(decode_native, "splits", lambda *a: S)
    (q, k, v), _ = _inputs(2, 8, 1, 4, 2048, 64, dtype, seed=S + window[0])
    out, lse, _ = _kernel_step(q, k, v, causal=True, window=window)
    exact = qkv.reference_attention(q.double(), k.double(), v.double(), causal=True, window=window)
    plain = qkv.reference_attention(q, k, v, causal=True, window=window)
    assert_within_rule(out.to(dtype), plain, exact, factor=FWD_FACTOR, what=f"window {window} S={S}")
    lse_exact = _exact_lse(q, k, None, True, window)
    assert float((lse.double() - lse_exact).abs().max()) <= 1e-5 * float(lse_exact.abs().max() + 1)


@pytest.mark.parametrize("S", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_in_cpp_matches_the_torch_merge(dtype, S, monkeypatch):
    """qkv_decode's merge and finish against the partial states merged by torch: equal to a few
    float32 roundings (the same states, the same formulas; a wrong weight or row shows at once),
    and for a bfloat16 cache within one bfloat16 rounding of that float32 result (out is rounded
    in C++; a float32 result near a rounding boundary may round either way)."""
    monkeypatch.setattr(decode_native, "splits", lambda *a: S)
    (q, k, v), _ = _inputs(2, 8, 2, 2, 3001, 64, dtype, seed=S)
    out, lse, _ = _kernel_step(q, k, v, causal=True)
    ref_out, ref_lse = partials_merged_by_torch(q, k, v, S, causal=True)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6)
    else:
        ulp = 2.0 ** -8 * ref_out.abs() + 1e-30  # bfloat16's unit roundoff is 2^-9: one step either way
        assert torch.all((out.float() - ref_out).abs() <= ulp), "out is not the float32 result rounded"
    torch.testing.assert_close(lse, ref_lse, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_result_on_any_thread_count(dtype, monkeypatch):
    """Work items go to whichever thread is free: the result must not depend on which took
    which (each item's state is computed alone, and merged in split order)."""
    monkeypatch.setattr(decode_native, "splits", lambda *a: 6)
    (q, k, v), _ = _inputs(1, 8, 2, 1, 5000, 128, dtype, seed=3)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, lse, _ = _kernel_step(q, k, v)
            results.append((out, lse))
    finally:
        torch.set_num_threads(previous)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["clean", "inf value seen", "nan value seen", "nan value masked", "inf key"])
def test_the_kernel_flags_every_non_finite_result_for_the_guard(dtype, case):
    """The flag the decode backend hands the non-finite guard (core/finite.py) comes whole from the kernel:
    a raw score that is not finite, an output that is not finite (a value's inf or NaN, seen or leaking
    through a masked key's 0 * NaN), or an lse that is NaN; and never for clean inputs."""
    (q, k, v), _ = _inputs(1, 4, 2, 2, 300, 32, dtype, seed=11)
    mask = torch.ones(1, 1, 2, 300, dtype=torch.bool)
    mask[..., 150] = False  # key 150 masked for every row
    if case == "inf value seen":
        v[0, 1, 40, 3] = float("inf")
    elif case == "nan value seen":
        v[0, 0, 299, 0] = float("nan")
    elif case == "nan value masked":
        v[0, 1, 150, 5] = float("nan")
    elif case == "inf key":
        k[0, 0, 7, 1] = float("inf")
    out, lse, bad = _kernel_step(q, k, v, mask=mask)
    assert bool(bad) is (case != "clean"), case
    if case == "clean":
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["clean", "nan query", "inf query", "-inf query, row sees nothing"])
def test_the_kernel_flags_a_non_finite_query(case, dtype):
    """The kernel gathers the queries itself and flags a query entry that is NaN or infinite, also in
    a row that sees no key, of which no score is ever formed: 4 causal queries against 2 keys
    (bottom-right: queries 0 and 1 see nothing)."""
    (q, k, v), _ = _inputs(2, 4, 2, 4, 2, 32, dtype, seed=5)
    if case == "nan query":
        q[1, 3, 3, 17] = float("nan")
    elif case == "inf query":
        q[0, 0, 2, 0] = float("inf")
    elif case == "-inf query, row sees nothing":
        q[1, 2, 0, 5] = float("-inf")
    out, lse, bad = _kernel_step(q, k, v, causal=True)
    assert bool(bad) is (case != "clean"), case
    assert torch.all(torch.isneginf(lse[:, :, :2])) and torch.all(out[:, :, :2] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_queries_are_read_in_place(dtype):
    """Queries as a slice of a larger tensor, and as the (B, Lq, Hq, D) layout a model's projection
    gives, transposed to (B, Hq, Lq, D) (strides of heads and queries not those of a packed tensor;
    the kernel gathers its rows through them): the same bits as the packed copy."""
    (q, k, v), _ = _inputs(2, 8, 2, 3, 777, 64, dtype, seed=9)
    wide = torch.randn(2, 3, 16, 5, 80).to(dtype)
    wide[:, 1, :8, 1:4, 8:72] = q  # (B, Hq, Lq, D) inside (B, 3, 16, 5, 80)
    sliced = wide[:, 1, :8, 1:4, 8:72]
    projected = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Lq, Hq, D) memory, (B, Hq, Lq, D) view
    want = _kernel_step(q.contiguous(), k, v, causal=True)
    for strided in (sliced, projected):
        assert not strided.is_contiguous() and torch.equal(strided, q)
        got = _kernel_step(strided, k, v, causal=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bfloat16_out_is_rounded_to_nearest_even_as_torch_rounds():
    """out for a bfloat16 cache is rounded from float32 in C++. With q = 0 every key weighs 1, so
    each row's out is the mean of its two values, exact in float32 and often exactly half way
    between two bfloat16 numbers (ties): it must equal torch's rounding of that mean bit for bit."""
    gen = torch.Generator().manual_seed(2)
    B, Hkv, G, D = 1, 16, 2, 64
    q = torch.zeros(B, Hkv * G, 1, D, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, 2, D, generator=gen).to(torch.bfloat16)
    v = (torch.randn(B, Hkv, 2, D, generator=gen) * 8).to(torch.bfloat16)
    v[0, 0, 0, :3] = torch.tensor([1.0, -1.0, 1.0e38])  # means of 1.0 and 1 + 2^-7: ties, rounded to even
    v[0, 0, 1, :3] = torch.tensor([1.0078125, -1.0078125, 1.0e38])  # a huge mean, finite
    out, lse, bad = _kernel_step(q, k, v)
    mean = (v.float().sum(dim=2, keepdim=True) / 2).repeat_interleave(G, dim=1)  # (B, Hq, 1, D), exact
    expected = mean.to(torch.bfloat16)
    assert not bool(bad)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    ties = (mean.view(torch.int32) & 0xFFFF) == 0x8000  # float32 bits exactly half way between two bfloat16
    assert ties.sum() >= 20, f"only {int(ties.sum())} ties: too few to test the rounding of ties"

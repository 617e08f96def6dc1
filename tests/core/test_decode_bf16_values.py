"""The native decode kernel on bfloat16 caches: the values product on the bfloat16 dot product.

With AVX512-BF16 the kernel (csrc/decode_kernel.cpp, values_tile_bf16) rounds the softmax
weights p to bfloat16 and adds two keys' products per vdpbf16ps, as FlashAttention-2 does on
GPUs (P cast to 16 bits before P V). These tests exercise what that changes: keys taken in
pairs (odd key counts, an odd last key of a block or split), value rows interleaved in pieces
of 32 dims (head sizes that are not multiples of 32, whose rest is widened to float32), grouped
query heads 4/1 and 8/1 (4 and 8 rows per kv head), long caches, masks and biases, and a NaN or
infinity in the cache (the non-finite flag and the guard's recompute).

Three kinds of check:
- the tolerance rule (qkv.testing) against the float64 reference, on values with a distinct
  offset per dimension (a dimension put in the wrong place shows) and, for some, sharp
  softmaxes (a weight paired with the wrong key shows);
- a bound that holds only for this algorithm, on the kernel's float32 result before it is
  rounded to bfloat16: rounding each weight to bfloat16 (unit roundoff 2^-8) moves an output
  by at most 2^-8 sum_j p_j |v_j|, so the error must stay below that (plus float32 sums);
- the same source built without AVX512-BF16, and without AVX-512 at all (x86-64-v3, no OpenMP:
  the portable path and the std::thread fallback), by the same rule.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
from pathlib import Path

import pytest
import torch
from decode_cases import check_last_query_poisoned, check_rule, constraint_cases
from decode_partials import partials_merged_by_torch
from random_qkv import random_qkv

import qkv
from qkv.core import _kernels
from qkv.core.engines import decode_native
from qkv.testing import FWD_FACTOR, assert_within_rule

BF16 = torch.bfloat16

pytestmark = pytest.mark.skipif(decode_native.lib() is None,
                                reason=f"the native decode kernel is unavailable: {_kernels.status('decode_kernel')}")


@pytest.fixture
def kernel_calls(monkeypatch):
    """The calls of the native kernel's forward (each test checks that it ran)."""
    calls = []
    original = decode_native.forward
    monkeypatch.setattr(decode_native, "forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, seed, sharp=1.0):
    """bfloat16 q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): v has an offset per
    dimension (from -3 to 3), q is multiplied by `sharp` (a sharper softmax)."""
    (q, k, v), gen = random_qkv(B, Hq, Hkv, Lq, Lk, torch.float64, seed, D=D, Dv=Dv)
    v = v + torch.linspace(-3.0, 3.0, Dv, dtype=torch.float64)
    return [t.to(BF16) for t in (q * sharp, k, v)], gen


def _kernel_float32(q, k, v, **kw):
    """The kernel's float32 result before it is rounded to bfloat16: its work items on the splits
    the decode backend uses, merged by torch: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)
    -> (B, Hq, Lq, Dv)."""
    return partials_merged_by_torch(q, k, v, threads=max(1, torch.get_num_threads()), **kw)[0]


# (Hq, Hkv, Lq, Lk, D, Dv): 4 and 8 rows per kv head; key counts odd and even, around the
# blocks of 64 and the splits; Dv of pieces of 64, 32 and a float32 rest (8, 16, 24).
SHAPES = [
    (4, 1, 1, 1, 64, 64),
    (4, 1, 1, 3, 64, 64),
    (8, 1, 1, 63, 64, 96),
    (8, 1, 1, 65, 72, 40),
    (4, 1, 1, 129, 128, 128),
    (8, 1, 2, 1025, 48, 80),
    (4, 1, 1, 4097, 128, 128),
    (8, 2, 1, 3001, 40, 200),
    (8, 1, 3, 2049, 96, 56),
    (4, 1, 1, 32769, 128, 128),
    (8, 1, 1, 32768, 128, 128),
]


@pytest.mark.parametrize("sharp", [1.0, 6.0], ids=["soft", "sharp"])
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,Dv", SHAPES)
def test_rule_on_bfloat16_caches(Hq, Hkv, Lq, Lk, D, Dv, sharp, kernel_calls):
    (q, k, v), _ = _inputs(2 if Lk < 5000 else 1, Hq, Hkv, Lq, Lk, D, Dv, seed=Lk + D + Dv, sharp=sharp)
    check_rule(q, k, v, f"bf16 decode {Hq}/{Hkv} Lq={Lq} Lk={Lk} D={D} Dv={Dv} sharp={sharp}", causal=Lq > 1)
    assert kernel_calls, "the native kernel did not run"


@pytest.mark.parametrize("sharp", [1.0, 6.0], ids=["soft", "sharp"])
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,Dv", SHAPES)
def test_float32_result_within_the_weight_rounding_bound(Hq, Hkv, Lq, Lk, D, Dv, sharp):
    """|kernel - exact| <= 2^-8 sum_j p_j |v_j| (each weight rounded to bfloat16 once) plus
    float32 sums, per output entry: the bound of this algorithm (which the float32 FMAs of
    builds without AVX512-BF16 meet too), broken by a weight paired with the wrong key or a
    dimension out of place."""
    (q, k, v), _ = _inputs(1, Hq, Hkv, Lq, Lk, D, Dv, seed=3 * Lk + Dv, sharp=sharp)
    kw = {"causal": Lq > 1}
    with torch.no_grad():
        got = _kernel_float32(q, k, v, **kw).double()  # (B, Hq, Lq, Dv)
    q64, k64, v64 = q.double(), k.double(), v.double()
    exact = qkv.reference_attention(q64, k64, v64, **kw)
    weights = qkv.attention_weights(q64, k64, **kw)  # (B, Hq, Lq, Lk) float64
    G = Hq // Hkv
    v_abs = v64.abs().repeat_interleave(G, dim=1)  # (B, Hq, Lk, Dv)
    spread = weights @ v_abs  # (B, Hq, Lq, Dv): sum_j p_j |v_j|
    bound = 2.0 ** -8 * spread * 1.02 + 64 * torch.finfo(torch.float32).eps * spread
    err = (got - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, (f"{Hq}/{Hkv} Lq={Lq} Lk={Lk} D={D} Dv={Dv} sharp={sharp}: error {err.max().item():.3e} "
                          f"exceeds the weight-rounding bound ({worst:.2f}x)")


@pytest.mark.parametrize("Hq,Lk", [(4, 1001), (8, 4097)])
def test_masks_and_bias(Hq, Lk, kernel_calls):
    """A per-head bool mask (keys dropped from pairs) and a float bias with -inf entries."""
    (q, k, v), gen = _inputs(2, Hq, 1, 2, Lk, 72, 40, seed=Lk, sharp=3.0)
    for what, kw in constraint_cases(gen, 2, Hq, 2, Lk, BF16):
        check_rule(q, k, v, f"bf16 decode {what} Hq={Hq} Lk={Lk}", **kw)
    assert len(kernel_calls) >= 3


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["k", "v"])
def test_non_finite_cache_entries(where, value, kernel_calls):
    """A NaN or infinity in a key or value of the odd last key (paired with zeros), seen by the
    last query only, and one at an even key no query sees (masked by the window): the rows that
    see the bad key are NaN, every other row equals the reference on the clean cache."""
    B, Hq, Hkv, Lq, Lk, D, Dv = 1, 8, 1, 3, 4097, 72, 40
    (q, k, v), _ = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, seed=17)
    clean_k, clean_v = k.clone(), v.clone()
    bad = k if where == "k" else v
    bad[0, 0, Lk - 1, 5] = value  # seen by the last query only (causal, bottom-right)
    bad[0, 0, 10, 3] = value  # outside every query's window
    kw = {"causal": True, "window": (1000, 0)}
    with torch.no_grad():
        out = qkv.attention(q, k, v, backend="decode", **kw)
    assert kernel_calls, "the native kernel did not run"
    check_last_query_poisoned(out, q, clean_k, clean_v, f"bf16 decode, {value} in {where}", **kw)


_BUILDS = {
    # AVX-512 without the bfloat16 dot product: bfloat16 widened to float32 for both products.
    "avx512-no-bf16": ["-march=native", "-mno-avx512bf16", "-fopenmp"],
    # No AVX-512 (AVX2): the portable vector-extension path, and std::thread instead of OpenMP.
    "x86-64-v3": ["-march=x86-64-v3"],
}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 build flags")
@pytest.mark.parametrize("build", list(_BUILDS))
def test_builds_without_the_bfloat16_dot_product(build, tmp_path, monkeypatch, kernel_calls):
    cxx = _kernels._compiler()
    assert cxx is not None  # the module's skip: the native build succeeded
    src = Path(_kernels.__file__).with_name("csrc") / "decode_kernel.cpp"
    so = tmp_path / f"decode_{build}.so"
    run = subprocess.run([cxx, "-O2", *_BUILDS[build], "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wno-psabi",
                          "-o", str(so), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cdll = ctypes.CDLL(str(so))
    monkeypatch.setattr(_kernels, "load", lambda name: cdll)
    monkeypatch.setattr(decode_native, "_typed", set())
    assert decode_native.lib() is cdll and not cdll.bf16_dot
    for Hq, Lq, Lk, D, Dv in [(4, 1, 4097, 128, 128), (8, 3, 1001, 72, 40), (8, 1, 65, 40, 200)]:
        (q, k, v), gen = _inputs(1, Hq, 1, Lq, Lk, D, Dv, seed=Lk, sharp=3.0)
        check_rule(q, k, v, f"{build} bf16 {Hq}/1 Lq={Lq} Lk={Lk} D={D} Dv={Dv}", causal=Lq > 1)
        (q, k, v), gen = random_qkv(1, Hq, 1, Lq, Lk, torch.float32, seed=Lk, D=D, Dv=Dv)
        _check_rule_float32(q, k, v, f"{build} float32 {Hq}/1 Lq={Lq} Lk={Lk}")
    assert kernel_calls, "the native kernel did not run"


def _check_rule_float32(q, k, v, what):
    exact = qkv.reference_attention(q.double(), k.double(), v.double(), causal=q.shape[2] > 1)
    plain = qkv.reference_attention(q, k, v, causal=q.shape[2] > 1)
    with torch.no_grad():
        fast = qkv.attention(q, k, v, backend="decode", causal=q.shape[2] > 1)
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=what)

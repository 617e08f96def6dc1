"""The native backend (csrc/flash_fwd_kernel.cpp through engines/native_flash.py): out and lse
against the float64 reference under the tolerance rule (qkv.testing) on fresh random inputs,
float32 and bfloat16, multi-head, GQA and multi-query, causal and windowed bands with Lq != Lk,
head sizes that are and are not multiples of 16, rows that see no key (out 0, lse -inf),
strided inputs, gradients through its autograd Function, and refusals by name (other devices,
dtypes, masks, score functions, dropout, kernels turned off). The kernel compiles once into the
kernel cache (QKV_KERNEL_CACHE, as for the decode kernel)."""

from __future__ import annotations

import ctypes
import zlib
from types import SimpleNamespace

import pytest
import torch
from random_qkv import random_inputs

import qkv
from native_checks import check_forward
from qkv.core import _kernels
from qkv.core.api import choose_backend
from qkv.core.backend import native
from qkv.core.engines import flash, native_flash
from qkv.core.spec import build_spec
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule, grads

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _kernel():
    """Skip where no compiler can build the kernel (or kernels are turned off); where one exists, a
    kernel that does not build fails `test_the_kernels_build_where_a_compiler_exists` instead."""
    if native_flash.lib() is None and (_kernels._compiler() is None or _kernels._turned_off()):
        pytest.skip(f"the native flash kernel is unavailable here: {_kernels.status('flash_fwd_kernel')}")


def test_the_kernels_build_where_a_compiler_exists():
    """A compile error must fail the suite, not turn every kernel test into a skip."""
    from qkv.core.engines import native_flash_bwd

    assert native_flash.lib() is not None, _kernels.status("flash_fwd_kernel")
    assert native_flash_bwd.lib() is not None, _kernels.status("flash_bwd_kernel")


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed):
    return random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed)  # q, k, v


_check = check_forward  # native vs the same-dtype reference vs the float64 reference: out and lse


# (B, Hq, Hkv, Lq, Lk, D, Dv, causal, window): multi-head, GQA and multi-query; lengths of
# 1, 7, 64, 130 and 257 (one key block, several, ragged), Lq below, equal to and above Lk;
# head sizes 8, 16, 40, 64, 128 and 256.
CASES = [
    (1, 4, 4, 64, 64, 64, 64, False, None),
    (2, 8, 2, 130, 257, 40, 8, True, None),
    (1, 4, 1, 257, 130, 128, 128, False, (16, 4)),
    (2, 4, 4, 7, 1, 16, 16, True, None),  # 6 of 7 rows see no key
    (1, 8, 2, 1, 257, 64, 64, False, (3, 0)),
    (1, 4, 1, 130, 130, 8, 40, False, (None, 0)),
    (2, 4, 4, 257, 7, 16, 128, True, (3, 0)),  # most rows see no key
    (1, 8, 2, 64, 130, 128, 16, False, (16, 4)),
    (1, 4, 4, 1, 1, 40, 8, False, None),
    (1, 4, 1, 70, 33, 256, 256, True, None),
    (1, 8, 2, 257, 257, 64, 64, True, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_out_and_lse_follow_the_reference(case, dtype):
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=zlib.crc32(repr(case).encode()))
    _check(q, k, v, f"native {case} {dtype}", causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype):
    """A (B, L, H, D) layout seen as (B, H, L, D), keys cut from wider rows, and values whose
    last dimension is not contiguous (copied by the binding) give the same results."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 70, 8, 40, generator=gen).to(dtype).transpose(1, 2)  # (2, 8, 70, 40)
    k = torch.randn(2, 2, 90, 56, generator=gen).to(dtype)[..., 3:43]  # (2, 2, 90, 40), rows of 56
    v = torch.randn(2, 2, 24, 90, generator=gen).to(dtype).transpose(-1, -2)  # (2, 2, 90, 24), stride(-1) 90
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) != 1
    fast, lse = _check(q, k, v, f"native strided {dtype}", causal=True)
    again, lse2 = qkv.attention_with_lse(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, backend="native")
    assert torch.equal(fast, again) and torch.equal(lse, lse2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "no-band"])
def test_threads_do_not_change_the_result(dtype, causal):
    """Work items are independent: 1, 2 and 8 threads give the same bits. With 200 query positions (8 heads
    in 2 groups) the items' rows change with the thread count: 8 threads halve them until each group has
    4 items per thread (64 positions down to 8 on AMX tiles without a band, 16 down to 8 elsewhere)."""
    q, k, v = _inputs(1, 8, 2, 200, 1100, 64, 64, dtype, seed=3)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 8):
            torch.set_num_threads(threads)
            outs.append(qkv.attention_with_lse(q, k, v, causal=causal, backend="native"))
    finally:
        torch.set_num_threads(before)
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


LAYOUT_DIMS = [(64, 64), (128, 32), (40, 24)]  # (D, Dv): whole 16-word groups, and not (D 40)


def check_layouts_give_the_same_bits(D: int, Dv: int) -> None:
    """bfloat16 keys and values contiguous, in a (B, L, H, D) layout seen as (B, H, L, D) (rows H D
    apart: the 16 x 16 transposes where D is a multiple of 32 and Dv of 16) and cut from rows an odd
    number of elements apart (the word-by-word packing): the same bits over two whole key blocks and a
    partial one (300 keys), and the contiguous call within the tolerance rule."""
    gen = torch.Generator().manual_seed(D + Dv)
    q = torch.randn(1, 4, 100, D, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 300, 2, D, generator=gen).to(torch.bfloat16).transpose(1, 2)  # (1, 2, 300, D)
    v = torch.randn(1, 300, 2, Dv, generator=gen).to(torch.bfloat16).transpose(1, 2)
    k_odd = torch.zeros(1, 2, 300, D + 1, dtype=torch.bfloat16)
    v_odd = torch.zeros(1, 2, 300, Dv + 1, dtype=torch.bfloat16)
    k_odd[..., :D], v_odd[..., :Dv] = k, v
    k_odd, v_odd = k_odd[..., :D], v_odd[..., :Dv]  # rows D + 1 apart (odd)
    assert k.stride(2) == 2 * D and k_odd.stride(2) == D + 1 and k_odd.stride(-1) == 1
    fast, lse = _check(q, k.contiguous(), v.contiguous(), f"native layouts {D}/{Dv}", causal=True)
    for kk, vv in ((k, v), (k_odd, v_odd)):
        out2, lse2 = qkv.attention_with_lse(q, kk, vv, causal=True, backend="native")
        assert torch.equal(out2, fast) and torch.equal(lse2, lse)


@pytest.mark.parametrize("dims", LAYOUT_DIMS, ids=lambda d: f"D{d[0]}-Dv{d[1]}")
def test_key_and_value_layouts_give_the_same_bits(dims):
    """check_layouts_give_the_same_bits with this CPU's build (tests/core/test_native_flash_amx.py runs it
    on the tile model too); only where bfloat16 takes the pair-packed path (AVX512-BF16)."""
    if not native_flash.lib().bf16_dot:
        pytest.skip("bfloat16 is widened to float32 at packing in this build (no AVX512-BF16): no pairs to pack")
    check_layouts_give_the_same_bits(*dims)



# Head sizes above 64: float32 scores summed in pieces of 64 terms, each piece over all the rows of a work
# item, and P V 64 value columns at a time over all the rows (bfloat16 on vdpbf16ps alongside). Sizes at
# the pieces' edges (65, 127, 128, 129, 192 + 8), the largest (256), Dv != D (fewer and more value columns
# than D, Dv not a multiple of 16); items of 64 rows (GQA: 2 heads x 32 positions, so the score tiles of 3
# rows leave one) and a ragged last item; unbounded, causal and windowed bands. (D, Dv, causal, window)
WIDE_CASES = [
    (65, 65, False, None),
    (96, 96, True, None),
    (127, 127, False, (40, 0)),
    (128, 128, False, None),
    (128, 128, True, None),
    (129, 129, True, None),
    (200, 200, False, (None, 0)),
    (256, 256, False, (90, 20)),
    (128, 40, True, None),
    (96, 200, False, None),
    (129, 80, False, (100, 0)),
    (256, 17, True, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_head_sizes_above_64_follow_the_reference(case, dtype):
    D, Dv, causal, window = case
    q, k, v = _inputs(1, 4, 2, 197, 300, D, Dv, dtype, seed=zlib.crc32(repr(case).encode()))
    _check(q, k, v, f"native D={D} Dv={Dv} {dtype}", causal=causal, window=window)

GRAD_CASES = [
    (1, 8, 2, 70, 130, 64, 40, True, None),
    (2, 4, 1, 40, 33, 16, 64, False, (16, 4)),
    (1, 4, 4, 20, 9, 40, 8, True, (3, 0)),  # rows that see no key: zero gradients, never NaN
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradients_follow_the_reference(case, dtype):
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=11)
    up = torch.randn(B, Hq, Lq, Dv, generator=torch.Generator().manual_seed(12)).to(dtype)
    kw = dict(causal=causal, window=window)
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    plain_in = [t.clone().requires_grad_() for t in (q, k, v)]
    fast_in = [t.clone().requires_grad_() for t in (q, k, v)]
    exact = qkv.attention(*exact_in, backend="reference", **kw)
    plain = qkv.attention(*plain_in, backend="reference", **kw)
    fast = qkv.attention(*fast_in, backend="native", **kw)
    what = f"native grad {case} {dtype}"
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=what + " out")
    for name, g, gp, ge in zip("qkv", grads(fast, fast_in, up), grads(plain, plain_in, up),
                               grads(exact, exact_in, up.double())):
        assert g.dtype == dtype
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"{what} d{name}")


def test_lse_gradient_flows():
    """The lse is differentiable too (merging partial results needs it)."""
    q, k, v = _inputs(1, 4, 2, 33, 50, 16, 16, torch.float32, seed=21)
    fast_in = [t.clone().requires_grad_() for t in (q, k, v)]
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    plain_in = [t.clone().requires_grad_() for t in (q, k, v)]
    outs = [qkv.attention_with_lse(*x, causal=True, backend=b)
            for x, b in ((fast_in, "native"), (plain_in, "reference"), (exact_in, "reference"))]
    losses = [(o * 0.5).sum() + (lse * 0.25).sum() for o, lse in outs]
    gs = [torch.autograd.grad(loss, x) for loss, x in zip(losses, (fast_in, plain_in, exact_in))]
    for name, g, gp, ge in zip("qkv", *gs):
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"native d{name} through out and lse")


def _spec(q, k, v, **kw):
    return build_spec(q, k, v, mask=kw.get("mask"), causal=False, window=None, scale=None,
                      score_mod=kw.get("score_mod"), dropout_p=kw.get("dropout_p", 0.0))


def test_refusals_name_what_and_which_backend():
    q, k, v = _inputs(1, 4, 2, 8, 8, 16, 16, torch.float32, seed=1)
    spec = _spec(q, k, v)
    assert native.unsupported(spec, q, False) is None
    # Another device: checked on a meta tensor (no GPU here); no CPU kernel ever sees it.
    why = native.unsupported(spec, q.to("meta"), False)
    assert why and "runs on CPU tensors" in why and "'sdpa'" in why
    with pytest.raises(ValueError, match="float16.*'tiled' or 'reference'"):
        qkv.attention(q.half(), k.half(), v.half(), backend="native")
    with pytest.raises(ValueError, match="float64"):
        qkv.attention(q.double(), k.double(), v.double(), backend="native")
    with pytest.raises(ValueError, match="not a tensor mask; use backend='tiled' or 'sdpa'"):
        qkv.attention(q, k, v, mask=torch.ones(8, 8, dtype=torch.bool).view(1, 1, 8, 8), backend="native")
    with pytest.raises(ValueError, match="score_mod.*'tiled'"):
        qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s, backend="native")
    with pytest.raises(ValueError, match="dropout"):
        qkv.attention(q, k, v, dropout_p=0.1, backend="native")
    big = _inputs(1, 2, 2, 3, 3, 300, 16, torch.float32, seed=2)
    with pytest.raises(ValueError, match="1 to 256.*'tiled'"):
        qkv.attention(*big, backend="native")


@pytest.mark.parametrize("shape,dtype,causal,grad,claimed", [
    ((1, 8, 8, 1024, 1024, 64, 64), torch.float32, False, False, True),   # 2^20 pairs: measured 1.16x
    ((1, 8, 8, 512, 512, 64, 64), torch.float32, False, False, False),    # 1.04x: too close to call a win
    ((1, 8, 8, 512, 512, 64, 64), torch.bfloat16, True, False, True),     # 2^18 pairs in bfloat16
    ((1, 8, 8, 128, 128, 64, 64), torch.bfloat16, False, False, False),
    ((1, 8, 8, 1024, 1024, 128, 128), torch.float32, False, False, False),  # float32 D=128 without a band: parity
    ((1, 8, 8, 1024, 1024, 128, 128), torch.float32, True, False, True),    # causal D=128: 1.09x-1.35x
    ((1, 8, 8, 1024, 1024, 96, 96), torch.float32, True, False, False),     # causal D=96: not timed
    ((1, 8, 8, 1024, 1024, 256, 256), torch.bfloat16, False, False, False),  # not measured
    ((1, 8, 8, 512, 2048, 64, 64), torch.float32, True, False, True),      # a chunk of queries (Lq < Lk), causal
    ((1, 8, 2, 512, 8192, 64, 64), torch.float32, True, False, True),      # chunked prefill: 1.54x-2.08x SDPA
    ((1, 32, 8, 512, 8192, 128, 128), torch.bfloat16, True, False, True),  # 1.98x-2.42x
    ((1, 8, 2, 128, 8192, 64, 64), torch.bfloat16, True, False, True),     # the shortest chunk timed
    ((1, 8, 2, 64, 8192, 64, 64), torch.bfloat16, True, False, False),     # shorter chunks: not timed
    ((1, 8, 2, 512, 8192, 64, 64), torch.bfloat16, True, True, False),     # a chunk's backward: not timed
    ((1, 8, 2, 512, 8192, 64, 64), torch.bfloat16, False, False, False),   # grouped cross-attention: not timed
    ((1, 8, 8, 256, 1024, 64, 64), torch.bfloat16, False, False, True),    # cross-attention: 1.54x-2.02x
    ((1, 8, 8, 256, 4096, 64, 64), torch.float32, False, False, True),     # 1.05x-1.28x from 2^20 pairs
    ((1, 8, 8, 256, 2048, 64, 64), torch.float32, False, False, False),    # below 2^20 pairs in float32
    ((1, 8, 8, 4096, 256, 64, 64), torch.float32, False, True, True),      # more queries than keys, training: 1.18x
    ((1, 8, 8, 128, 8192, 64, 64), torch.bfloat16, False, False, False),   # 128 queries: below the lengths timed
    ((1, 8, 8, 8192, 128, 64, 64), torch.float32, False, False, False),    # 128 keys: below the lengths timed
    ((1, 8, 8, 256, 1024, 64, 128), torch.bfloat16, False, False, False),  # cross-attention with D != Dv
    ((1, 8, 2, 512, 8192, 64, 128), torch.bfloat16, True, False, False),   # a chunk with D != Dv
    ((1, 8, 8, 256, 1024, 128, 128), torch.bfloat16, False, False, True),  # 1.58x-2.16x at 128
    ((1, 8, 8, 1024, 4096, 128, 128), torch.float32, False, False, False),  # float32 forward at 128: not claimed
    ((1, 8, 8, 1024, 4096, 128, 128), torch.float32, False, True, True),   # its training step: 1.06x-1.31x
    ((1, 8, 8, 256, 2048, 32, 32), torch.bfloat16, False, False, False),   # cross-attention at D=32: not timed
    ((1, 8, 2, 512, 8192, 64, 64), torch.bfloat16, 1024, False, False),    # a chunk under a window: not timed
    ((1, 8, 2, 512, 8192, 96, 96), torch.bfloat16, True, False, False),    # a chunk at D=96: not timed
    ((1, 32, 8, 512, 8192, 128, 128), torch.float32, True, False, False),  # float32 at 128: 1.00x the split
    ((1, 8, 2, 8192, 512, 64, 64), torch.bfloat16, True, False, False),    # more queries than keys
    ((1, 8, 8, 1024, 1024, 64, 64), torch.float32, False, True, True),     # training at 64: 1.17x-2.30x
    ((1, 8, 8, 1024, 1024, 128, 128), torch.float32, False, True, True),   # training at 128: 1.05x-1.20x
    ((1, 8, 8, 512, 512, 128, 128), torch.bfloat16, True, True, True),     # 1.80x-2.81x
    ((1, 8, 8, 1024, 1024, 96, 96), torch.bfloat16, True, True, False),    # training at 96: not timed
    ((1, 8, 8, 1024, 1024, 64, 128), torch.bfloat16, True, True, False),   # D != Dv: 64 is the bound
    ((1, 8, 8, 4096, 4096, 128, 128), torch.bfloat16, 2048, True, True),   # a causal window at 128: 2.90x-7.75x
    ((1, 8, 2, 1024, 1024, 64, 64), torch.float32, False, False, True),    # grouped heads 8/2: 1.14x-1.56x
    ((1, 8, 2, 1024, 1024, 64, 64), torch.float32, True, True, True),      # their training: 1.05x-1.68x
    ((1, 8, 2, 512, 512, 128, 128), torch.bfloat16, False, True, True),    # bfloat16 1.48x-3.03x
    ((1, 8, 1, 512, 512, 128, 128), torch.bfloat16, True, False, True),    # any grouping Hq / Hkv
    ((1, 8, 2, 1024, 1024, 128, 128), torch.float32, False, False, False),  # float32 D=128 without a band
    ((1, 8, 2, 1024, 1024, 96, 96), torch.bfloat16, False, False, False),  # grouped at D=96: not timed
    ((1, 8, 2, 1024, 1024, 32, 32), torch.bfloat16, False, False, False),  # grouped at D=32: not timed
    ((1, 8, 2, 4096, 4096, 64, 64), torch.bfloat16, 2048, False, True),    # grouped under a window: 3.44x-11.32x
    ((1, 8, 2, 4096, 4096, 128, 128), torch.float32, 2048, True, True),    # and its training step at 128
    ((1, 8, 2, 4096, 4096, 96, 96), torch.bfloat16, 2048, False, False),   # grouped under a window at D=96
    ((1, 8, 2, 256, 256, 64, 64), torch.bfloat16, True, True, False),      # below 2^18 pairs
])
def test_auto_claims_only_what_was_measured(monkeypatch, shape, dtype, causal, grad, claimed):
    """The rule (backend/native.py's comment gives the measurements) on the CPU kind it was measured on,
    and nothing on any other kind."""
    q, spec = _kind_case(shape, dtype, causal, grad)
    monkeypatch.setattr(native, "measured_cpu", lambda: True)
    monkeypatch.setattr(native, "zen5_cpu", lambda: False)  # the Zen 4 rule
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    assert native.auto(spec, q, False) is claimed
    assert (choose_backend(spec, q, False) == "native") is claimed
    monkeypatch.setattr(native, "measured_cpu", lambda: False)
    monkeypatch.setattr(native, "amx_cpu", lambda: False)
    monkeypatch.setattr(native, "avx2_cpu", lambda: False)
    assert native.auto(spec, q, False) is False and choose_backend(spec, q, False) != "native"
    assert native.auto(spec, q.to("meta"), False) is False  # never a CUDA (or any other device's) tensor


def _kind_case(shape, dtype, causal, grad):
    """(q, spec) of a CPU kind's rule case: shape (B, Hq, Hkv, Lq, Lk, D, Dv); causal a bool, or an int: a
    causal window of that many keys."""
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q = torch.zeros(B, Hq, Lq, D, dtype=dtype, requires_grad=grad)
    k, v = torch.zeros(B, Hkv, Lk, D, dtype=dtype), torch.zeros(B, Hkv, Lk, Dv, dtype=dtype)
    window = None if isinstance(causal, bool) else causal
    spec = build_spec(q, k, v, causal=bool(causal), window=window)
    assert spec.grad is grad
    return q, spec


@pytest.mark.parametrize("shape,dtype,causal,grad,on_zen5,on_zen4", [
    ((1, 8, 8, 96, 96, 64, 64), torch.bfloat16, False, False, True, False),    # 2^13 pairs and more: 1.45x-6.92x
    ((1, 8, 8, 64, 64, 64, 64), torch.bfloat16, True, False, False, False),    # 64 tokens: 0.99x-2.51x, not claimed
    ((1, 8, 8, 96, 96, 64, 128), torch.bfloat16, False, False, False, False),  # D != Dv: not timed from so few
    ((1, 8, 8, 96, 96, 8, 8), torch.bfloat16, False, False, False, False),     # D=8: not timed from so few
    ((1, 8, 8, 4096, 4096, 128, 128), torch.float32, 2048, False, True, False),  # a float32 window at 128: 4.12x-7.61x
    ((1, 8, 8, 256, 300, 64, 64), torch.bfloat16, False, True, False, False),  # cross-attention: the first floor
    ((1, 8, 2, 128, 129, 64, 64), torch.bfloat16, True, False, False, False),  # a chunk on a short cache: not timed
    ((1, 8, 2, 128, 128, 128, 128), torch.bfloat16, 64, True, True, False),    # grouped, windowed, training
    ((1, 8, 8, 256, 256, 64, 64), torch.float32, False, False, True, False),   # 2^16 pairs: 1.27x-4.58x
    ((1, 8, 8, 192, 192, 64, 64), torch.float32, True, True, False, False),    # below 2^16 in float32
    ((1, 8, 8, 4096, 4096, 128, 128), torch.float32, False, False, True, False),  # float32 at 128 without a band
    ((1, 8, 8, 256, 256, 128, 128), torch.float32, False, False, True, False),  # 1.25x-1.27x
    ((1, 8, 8, 4096, 4096, 96, 96), torch.float32, False, False, False, False),  # float32 at 96: not timed
    ((1, 32, 8, 512, 8192, 128, 128), torch.float32, True, False, True, False),  # a float32 chunk at 128: 1.58x-1.84x
    ((1, 8, 8, 1024, 4096, 128, 128), torch.float32, False, False, True, False),  # float32 cross-attention at 128
    ((1, 8, 8, 128, 1024, 64, 64), torch.bfloat16, False, False, False, False),  # 128 queries: cross-attention floor
    ((1, 8, 8, 128, 2048, 64, 64), torch.float32, True, False, True, False),   # a 128-query chunk, 2^18 pairs: 1.59x
    ((1, 8, 2, 512, 8192, 64, 64), torch.bfloat16, True, True, False, False),  # a chunk's backward: not timed
])
def test_auto_on_zen5_claims_from_fewer_pairs(monkeypatch, shape, dtype, causal, grad, on_zen5, on_zen4):
    """The first kind's Zen 5 (backend/native.py, ZEN5_AUTO_MIN_CELLS): the rule's shapes from fewer
    query-key pairs, float32's forward at 128 with any band, float32 chunks at 128; the same shapes on Zen 4
    as the first kind's rule says."""
    q, spec = _kind_case(shape, dtype, causal, grad)
    monkeypatch.setattr(native, "measured_cpu", lambda: True)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    for zen5, claimed in ((True, on_zen5), (False, on_zen4)):
        monkeypatch.setattr(native, "zen5_cpu", lambda zen5=zen5: zen5)
        assert native.auto(spec, q, False) is claimed, zen5
        assert (choose_backend(spec, q, False) == "native") is claimed, zen5


@pytest.mark.parametrize("shape,dtype,causal,grad,claimed", [
    ((1, 8, 8, 4096, 4096, 64, 64), torch.bfloat16, False, False, True),   # measured 1.26x, now 1.76x
    ((1, 8, 8, 4096, 4096, 64, 64), torch.bfloat16, True, False, True),    # 1.05x, now 1.69x
    ((1, 8, 8, 1024, 1024, 64, 64), torch.bfloat16, False, False, True),   # 2^20 pairs: 1.39x (sixteenth part)
    ((1, 8, 8, 1024, 2048, 64, 64), torch.bfloat16, False, False, False),  # cross-attention: not this rule
    ((1, 8, 8, 512, 512, 64, 64), torch.bfloat16, False, False, False),    # below 2^20: 0.96x
    ((1, 8, 8, 1024, 1024, 64, 64), torch.bfloat16, True, True, True),     # forward + backward: 1.33x
    ((1, 8, 8, 512, 512, 64, 64), torch.bfloat16, False, True, False),     # not measured below 1024
    ((1, 8, 8, 4096, 4096, 64, 64), torch.float32, False, False, False),   # float32 forward: 0.77x-1.16x
    ((1, 8, 8, 1024, 1024, 64, 64), torch.float32, True, True, True),      # float32 causal training: 1.41x
    ((1, 8, 8, 1024, 1024, 64, 64), torch.float32, False, True, False),    # without a band: 1.00x
    ((1, 8, 8, 4096, 4096, 128, 128), torch.bfloat16, False, False, False),  # D=128: not measured here
    ((1, 8, 8, 4096, 4096, 32, 32), torch.bfloat16, False, False, False),  # D=32: not measured there
    ((1, 8, 2, 4096, 4096, 64, 64), torch.bfloat16, False, False, False),  # grouped-query heads
    ((1, 8, 8, 2048, 2048, 64, 64), torch.float32, 1024, False, True),     # causal window 1024: 2.64x
    ((1, 8, 8, 2048, 2048, 64, 64), torch.bfloat16, 1024, True, True),     # its training step: 2.97x
    ((1, 8, 8, 1024, 1024, 64, 64), torch.float32, 512, False, False),     # below 2^22 pairs
])
def test_auto_on_the_amx_kind_claims_only_what_was_measured(monkeypatch, shape, dtype, causal, grad, claimed):
    """The second CPU kind's rule (backend/native.py, AMX_AUTO_MIN_CELLS): an Intel Xeon with AMX, where
    bfloat16 is claimed only while the kernels run the processor's tiles (tiles_run)."""
    q, spec = _kind_case(shape, dtype, causal, grad)
    monkeypatch.setattr(native, "measured_cpu", lambda: False)
    monkeypatch.setattr(native, "avx2_cpu", lambda: False)
    monkeypatch.setattr(native, "amx_cpu", lambda: True)
    monkeypatch.setattr(native, "tiles_run", lambda grad: True)
    if dtype == torch.float32 and native_flash.lib().vector_width != native_flash.MEASURED_WIDTH:
        claimed = False  # a build without AVX-512 (its own rule: test_native_flash_narrow.py)
    assert native.auto(spec, q, False) is claimed
    assert (choose_backend(spec, q, False) == "native") is claimed
    monkeypatch.setattr(native, "tiles_run", lambda grad: False)  # Linux refused the tiles, say
    assert native.auto(spec, q, False) is (claimed and dtype == torch.float32)
    monkeypatch.setattr(native, "amx_cpu", lambda: False)
    assert native.auto(spec, q, False) is False


@pytest.mark.parametrize("shape,dtype,causal,grad,claimed", [
    ((1, 8, 8, 512, 512, 64, 64), torch.bfloat16, False, True, True),       # training: 5.91x
    ((1, 8, 8, 4096, 4096, 64, 64), torch.bfloat16, True, True, True),      # 7.74x-9.64x up to 2048
    ((1, 8, 8, 256, 256, 64, 64), torch.bfloat16, True, True, False),       # below auto's 2^18 pairs
    ((1, 8, 8, 4096, 4096, 64, 64), torch.bfloat16, False, False, False),   # forward: 0.83x-1.11x, parity
    ((1, 8, 8, 4096, 4096, 64, 64), torch.float32, True, False, False),     # float32 forward: parity
    ((1, 8, 8, 1024, 1024, 64, 64), torch.float32, True, True, True),       # float32 causal training: 1.55x
    ((1, 8, 8, 4096, 4096, 64, 64), torch.float32, False, True, False),     # without a band: 0.97x-1.16x
    ((1, 8, 8, 512, 512, 64, 64), torch.float32, True, True, False),        # below auto's 2^20 in float32
    ((1, 8, 8, 1024, 1024, 128, 128), torch.bfloat16, True, True, True),    # D=128 training: 6.78x-7.74x
    ((1, 8, 8, 512, 512, 128, 128), torch.bfloat16, False, True, True),     # 5.56x-5.65x
    ((1, 8, 8, 4096, 4096, 128, 128), torch.bfloat16, True, False, False),  # D=128 forward: not claimed
    ((1, 8, 8, 1024, 1024, 128, 128), torch.float32, True, True, False),    # float32 at 128: 0.88x at 4096
    ((1, 8, 8, 4096, 4096, 128, 128), torch.float32, 2048, True, True),     # a window at 128: 2.47x
    ((1, 8, 8, 2048, 2048, 128, 128), torch.bfloat16, 1024, False, True),   # 2.34x-2.41x
    ((1, 8, 8, 1024, 1024, 96, 96), torch.bfloat16, True, True, False),     # D=96: not measured there
    ((1, 8, 8, 2048, 2048, 64, 128), torch.bfloat16, True, True, False),    # D != Dv: not measured there
    ((1, 8, 2, 1024, 1024, 64, 64), torch.bfloat16, True, True, True),      # grouped heads 8/2: 8.04x-8.27x
    ((1, 8, 2, 512, 512, 128, 128), torch.bfloat16, False, True, True),     # 5.82x-6.13x at 128
    ((1, 8, 4, 1024, 1024, 64, 64), torch.bfloat16, True, True, True),      # any grouping Hq / Hkv
    ((1, 8, 2, 4096, 4096, 64, 64), torch.bfloat16, True, False, False),    # grouped, forward: not measured
    ((1, 8, 2, 1024, 1024, 64, 64), torch.float32, True, True, False),      # grouped float32: not measured
    ((1, 8, 2, 4096, 4096, 64, 64), torch.bfloat16, 2048, True, False),     # grouped under a window: not here
    ((1, 8, 2, 256, 256, 64, 64), torch.bfloat16, True, True, False),       # below 2^18 pairs
    ((1, 8, 8, 2048, 2048, 64, 64), torch.float32, 1024, False, True),      # causal window 1024: 3.20x
    ((1, 8, 8, 4096, 4096, 64, 64), torch.bfloat16, 2048, True, True),      # its training step: 16.53x
    ((1, 8, 8, 1024, 1024, 64, 64), torch.float32, 512, False, False),      # below 2^22 pairs
])
def test_auto_on_the_avx2_kind_claims_only_what_was_measured(monkeypatch, shape, dtype, causal, grad, claimed):
    """The third CPU kind's rule (backend/native.py, AVX2_AUTO_MIN_CELLS): an AMD Zen 3 with AVX2 only, where
    the kernels build 8-float tiles with fused multiply-adds; another build there is not what was measured."""
    q, spec = _kind_case(shape, dtype, causal, grad)
    kernel = native_flash.lib()
    monkeypatch.setattr(native, "measured_cpu", lambda: False)
    monkeypatch.setattr(native, "avx2_cpu", lambda: True)
    monkeypatch.setattr(kernel, "vector_width", native.AVX2_WIDTH)
    monkeypatch.setattr(kernel, "fma", True)
    assert native.auto(spec, q, False) is claimed
    assert (choose_backend(spec, q, False) == "native") is claimed
    monkeypatch.setattr(kernel, "vector_width", 16)  # the AVX-512 tiles: not the build measured there
    assert native.auto(spec, q, False) is False
    monkeypatch.setattr(kernel, "vector_width", native.AVX2_WIDTH)
    monkeypatch.setattr(kernel, "fma", False)  # a build without fused multiply-adds (refused by the backend)
    assert native.auto(spec, q, False) is False
    monkeypatch.setattr(kernel, "fma", True)
    monkeypatch.setattr(native, "avx2_cpu", lambda: False)
    monkeypatch.setattr(native, "amx_cpu", lambda: False)
    assert native.auto(spec, q, False) is False


@pytest.mark.parametrize("vendor,family,flags,kind", [
    ("AuthenticAMD", 25, "fma avx2", True),              # Zen 3 (a Milan EPYC): the third kind
    ("AuthenticAMD", 25, "fma avx2 avx512f avx512_bf16", False),  # Zen 4: the first kind, not this one
    ("AuthenticAMD", 23, "fma avx2", False),             # Zen 2: not measured
    ("GenuineIntel", 6, "fma avx2", False),              # an Intel CPU with AVX2: not measured
    ("AuthenticAMD", 25, "avx", False),                  # no AVX2 (a virtual CPU that hides it)
])
def test_the_avx2_kind_is_read_from_cpuinfo(monkeypatch, vendor, family, flags, kind):
    info = f"vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 1\nflags\t\t: fpu sse2 {flags}\n"
    monkeypatch.setattr(_kernels, "_cpuinfo", lambda: (info, info.split("flags\t\t:", 1)[1].split()))
    _kernels.avx2_cpu.cache_clear()
    try:
        assert _kernels.avx2_cpu() is kind
    finally:
        _kernels.avx2_cpu.cache_clear()


@pytest.mark.parametrize("vendor,family,model,flags,first,zen5", [
    ("AuthenticAMD", 25, 17, "avx512f avx512_bf16", True, False),   # Zen 4 (a Genoa EPYC): the first kind
    ("AuthenticAMD", 26, 2, "avx512f avx512_bf16", True, True),     # Zen 5 (a Turin EPYC): the first kind, timed again
    ("AuthenticAMD", 27, 2, "avx512f avx512_bf16", False, False),   # a later family: not measured
    ("AuthenticAMD", 26, 36, "avx512f avx512_bf16", True, False),   # a laptop Zen 5 (256-bit units)
    ("AuthenticAMD", 26, 2, "avx512f", False, False),               # no AVX512-BF16 (a virtual CPU that hides it)
    ("GenuineIntel", 6, 143, "avx512f avx512_bf16", False, False),  # an Intel CPU without AMX: not measured
    ("GenuineIntel", 6, 207, "avx512f avx512_bf16 amx_tile amx_bf16", False, False),  # the AMX kind instead
])
def test_the_first_kind_and_zen5_are_read_from_cpuinfo(monkeypatch, vendor, family, model, flags, first, zen5):
    info = (f"vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\n"
            f"flags\t\t: fpu sse2 avx2 fma {flags}\n")
    monkeypatch.setattr(_kernels, "_cpuinfo", lambda: (info, info.split("flags\t\t:", 1)[1].split()))
    _kernels.measured_cpu.cache_clear()
    _kernels.zen5_cpu.cache_clear()
    try:
        assert _kernels.measured_cpu() is first and _kernels.zen5_cpu() is zen5
    finally:
        _kernels.measured_cpu.cache_clear()
        _kernels.zen5_cpu.cache_clear()


def test_tiles_run_reads_the_kernels_states():
    """tiles_run is each kernel's AMX state read as the processor's tiles (2), nothing else."""
    fwd = native_flash.lib()
    from qkv.core.engines import native_flash_bwd

    bwd = native_flash_bwd.lib()
    assert native.tiles_run(False) is (fwd.amx == 2)
    assert native.tiles_run(True) is (fwd.amx == 2 and bwd is not None and bwd.amx == 2)
    assert native.amx_cpu() is _kernels.amx_cpu()


@pytest.mark.parametrize("which", ["q", "k", "v", "none"])
def test_auto_sees_gradients_asked_through_any_input(monkeypatch, which):
    """bfloat16 D=96 is claimed forward (up to 128) but its backward was not timed (64 and 128 were): the rule
    leaves it to SDPA when autograd records, whichever of q, k and v requires grad (not q alone)."""
    q = torch.zeros(1, 8, 1024, 96, dtype=torch.bfloat16)
    k, v = torch.zeros_like(q), torch.zeros_like(q)
    if which != "none":
        {"q": q, "k": k, "v": v}[which].requires_grad_()
    spec = build_spec(q, k, v, causal=True)
    assert spec.grad is (which != "none")
    monkeypatch.setattr(native, "measured_cpu", lambda: True)
    monkeypatch.setattr(native, "zen5_cpu", lambda: False)  # the Zen 4 rule
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    assert native.auto(spec, q, False) is (which == "none")
    with torch.no_grad():
        assert build_spec(q, k, v, causal=True).grad is False


def test_kernel_return_codes():
    kernel = native_flash.lib()
    st = (ctypes.c_int64 * 4)(0, 0, 0, 1)
    args = [None, st, None, st, None, st, 1.0, -1, -1, 0, None, None, 1, None, None, None]
    assert kernel.qkv_flash_fwd(7, 1, 1, 1, 1, 1, 16, 16, *args) == 1
    assert kernel.qkv_flash_fwd(0, 1, 1, 1, 1, 1, 257, 16, *args) == 2
    assert kernel.qkv_flash_fwd(0, 1, 1, 1, 1, 1, 16, 0, *args) == 2
    # keys that cannot be packed (2^58 bytes): refused before any input is read
    assert kernel.qkv_flash_fwd(0, 1, 1, 1, 1, 1 << 50, 64, 64, *args) == 3
    assert kernel.qkv_flash_fwd_version() == native_flash.VERSION == 5


def test_turned_off_kernels_are_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("QKV_NO_KERNELS", "1")
    monkeypatch.setattr(_kernels, "_loaded", {})
    monkeypatch.setattr(_kernels, "_why", {})
    q, k, v = _inputs(1, 2, 2, 4, 4, 16, 16, torch.float32, seed=4)
    with pytest.raises(ValueError, match=r"kernel is unavailable \(turned off by QKV_NO_KERNELS\).*'tiled'"):
        qkv.attention(q, k, v, backend="native")


def test_backward_switches_to_the_native_backward_module(monkeypatch):
    """Where engines/native_flash_bwd.py exists its `backward` (float32 gradients) is used, cast
    to the inputs' dtype, for the output's gradient and the lse's (its d_lse) alike."""
    calls = []

    def backward(q, k, v, out, lse, d_out, spec, d_lse=None, lse_lo=None):
        calls.append(d_lse is not None)
        assert lse_lo is not None and lse_lo.shape == lse.shape  # the forward's low part of lse, kept
        dq, dk, dv = flash.block_backward(q.float(), k.float(), v.float(), out.float(), lse, d_out.float(), d_lse,
                                          spec)
        return dq, dk, dv

    monkeypatch.setattr(native_flash, "native_backward_module",
                        lambda: SimpleNamespace(backward=backward, lib=lambda: object()))
    q, k, v = _inputs(1, 4, 2, 20, 30, 16, 8, torch.bfloat16, seed=8)
    fast_in = [t.clone().requires_grad_() for t in (q, k, v)]
    out = qkv.attention(*fast_in, causal=True, backend="native")
    g = torch.autograd.grad(out.float().sum(), fast_in)
    assert calls == [False] and all(x.dtype == torch.bfloat16 for x in g)
    _, lse = qkv.attention_with_lse(*fast_in, causal=True, backend="native")
    torch.autograd.grad(lse.sum(), fast_in)
    assert calls == [False, True], "an lse gradient runs the native backward with its d_lse"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_many_groups_and_empty_sizes(dtype):
    """An explicit (even negative) scale, 16 query heads on one kv head, and no keys or no queries."""
    q, k, v = _inputs(2, 16, 1, 33, 75, 24, 20, dtype, seed=31)
    _check(q, k, v, f"native scale=0.3 {dtype}", scale=0.3, causal=True)
    _check(q, k, v, f"native scale=-0.2 {dtype}", scale=-0.2, window=(10, 2))
    q, k, v = _inputs(1, 4, 2, 5, 0, 16, 8, dtype, seed=32)
    out, lse = qkv.attention_with_lse(q, k, v, backend="native")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    q, k, v = _inputs(1, 4, 2, 0, 9, 16, 8, dtype, seed=33)
    out, lse = qkv.attention_with_lse(q, k, v, backend="native")
    assert out.shape == (1, 4, 0, 8) and lse.shape == (1, 4, 0)


# ------------------------------------------------------------------ review findings: large logits, the guard's
# wide run, second-order gradients, empty head sizes


@pytest.mark.parametrize("scale", [3.0, 1e3, 1e6])
def test_large_logits_follow_the_reference(scale):
    """Scores far from O(1): exp(y - now) is formed from the difference, so the max key weighs 1 exactly."""
    q, k, v = _inputs(1, 4, 2, 33, 130, 64, 24, torch.float32, seed=11)
    _check(q, k, v, f"scale {scale}", scale=scale)
    one, _ = qkv.attention_with_lse(q[:, :, :1], k[:, :, :1], v[:, :, :1], backend="native", scale=scale)
    assert torch.equal(one, v[:, :, :1].repeat_interleave(2, dim=1)), "one key: the output is its value exactly"


def test_gradients_at_large_logits_and_head_size_256():
    """The forward's scores are summed as the backward recomputes them (pieces of 64 terms)."""
    q, k, v = _inputs(1, 16, 1, 1, 130, 255, 256, torch.float32, seed=12)
    g = torch.randn(1, 16, 1, 256, generator=torch.Generator().manual_seed(13), dtype=torch.float64).float()
    xs64 = [t.double().requires_grad_() for t in (q, k, v)]
    exact = grads(qkv.attention(*xs64, scale=3.0, backend="reference"), xs64, g.double())
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    plain = grads(qkv.attention(*xs, scale=3.0, backend="reference"), xs, g)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    fast = grads(qkv.attention(*xs, scale=3.0, backend="native"), xs, g)
    for name, f, p, e in zip("qkv", fast, plain, exact):
        assert_within_rule(f, p, e, factor=GRAD_FACTOR, what=f"d{name}")


@pytest.mark.parametrize("backend", ["native", "auto"])
def test_huge_finite_inputs_take_the_guards_wide_run(backend, monkeypatch):
    """Finite scores that could overflow float32 are recomputed in float64 by the non-finite guard;
    the native backend hands that run to the FA-2 engine instead of refusing float64."""
    monkeypatch.setattr(native, "measured_cpu", lambda: True)
    monkeypatch.setattr(native, "zen5_cpu", lambda: False)  # the Zen 4 rule
    q = torch.randn(1, 2, 1024, 64, generator=torch.Generator().manual_seed(14)) * 1e17
    got = qkv.attention(q, q, q, causal=True, backend=backend)
    want = qkv.attention(q.double(), q.double(), q.double(), causal=True, backend="reference")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_second_order_gradients_are_refused_not_dropped():
    """create_graph=True (a gradient penalty): the kernel's gradients are constants, so differentiating
    them again raises (as torch's fused CPU SDPA does) instead of silently leaving out the second order."""
    q, k, v = _inputs(1, 4, 2, 40, 40, 16, 16, torch.float32, seed=15)
    xs = [t.requires_grad_() for t in (q, k, v)]
    out = qkv.attention(*xs, causal=True, backend="native")
    gq, = torch.autograd.grad(out.sum(), xs[0], create_graph=True)
    first = [t.clone().detach().requires_grad_() for t in (q, k, v)]
    want, = torch.autograd.grad(qkv.attention(*first, causal=True, backend="reference").sum(), first[0])
    torch.testing.assert_close(gq.detach(), want, atol=1e-5, rtol=1e-4)  # the first order is right
    assert gq.requires_grad
    with pytest.raises(RuntimeError, match="cannot be differentiated again.*'reference'"):
        gq.pow(2).sum().backward()
    out = qkv.attention(*xs, causal=True, backend="native")  # mixed into a larger loss: refused too, not dropped
    gq, = torch.autograd.grad(out.sum(), xs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(out.sum() + gq.pow(2).sum(), xs)


def test_an_empty_head_size_is_refused_and_auto_passes_it_on(monkeypatch):
    monkeypatch.setattr(native, "measured_cpu", lambda: True)
    monkeypatch.setattr(native, "zen5_cpu", lambda: False)  # the Zen 4 rule
    q = torch.randn(1, 2, 1024, 16)
    v = torch.randn(1, 2, 1024, 0)
    with pytest.raises(ValueError, match="head sizes 1 to 256"):
        qkv.attention(q, q, v, backend="native")
    assert qkv.attention(q, q, v, causal=True).shape == (1, 2, 1024, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heads_packed_in_several_groups(dtype):
    """Long keys: the kernel packs and runs the kv heads a few at a time (64 MiB of packed keys and
    values per group: 5 of the 12 kv heads per group in float32, 10 in bfloat16); every group gives
    the reference's result, with a window and block lists too."""
    q, k, v = _inputs(2, 12, 6, 64, 12000, 128, 128, dtype, seed=41)
    _check(q, k, v, f"native groups {dtype}", causal=True)
    _check(q, k, v, f"native groups window {dtype}", window=(700, 0))
    bm = qkv.block_mask(lambda b, h, i, j: (j % 512) < 200 + 20 * h, 1, 12, 64, 12000)
    spec = build_spec(q, k, v, mask=bm)
    fast, fast_lse = native_flash.forward(q, k, v, spec)
    exact, exact_lse = qkv.attention_with_lse(q.double(), k.double(), v.double(), mask=bm, backend="reference")
    plain, plain_lse = qkv.attention_with_lse(q, k, v, mask=bm, backend="reference")
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=f"native groups blocks {dtype} out")
    assert_within_rule(fast_lse, plain_lse, exact_lse, factor=FWD_FACTOR, what=f"native groups blocks {dtype} lse")


def test_concurrent_calls_give_the_sequential_results():
    """The packing arena serves one call at a time (a concurrent call packs into its own buffers):
    calls from several Python threads at once (ctypes releases the GIL) give each call's own result."""
    import threading

    cases = [_inputs(1, 4, 2, 300, 700 + 100 * i, 64, 64, torch.float32 if i % 2 else torch.bfloat16, seed=50 + i)
             for i in range(4)]
    want = [qkv.attention(*c, causal=True, backend="native") for c in cases]
    got: list = [None] * len(cases)

    def work(i):
        for _ in range(3):
            got[i] = qkv.attention(*cases[i], causal=True, backend="native")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# The kernel's extremes (qkv_flash_fwd's absmax): the largest |x| of the queries, keys and values it read, by which
# the non-finite guard leaves out its own pass over k and v (backend/native.py, finite.extremes_suspect).
EXTREME_SHAPES = [  # (D, Dv, Lk): float32 keys 16 x 16 transposes (D % 16 == 0, whole blocks) or a float at a time;
    # bfloat16 key pairs transposed and value pairs by vectors (D % 32 == 0, Dv % 16 == 0, whole blocks) or a word
    # at a time (other head sizes, a last partial block)
    (64, 64, 256), (40, 24, 300), (128, 128, 200), (16, 16, 128), (96, 48, 384)]


@pytest.mark.parametrize("value", [1000.0, float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("D,Dv,Lk", EXTREME_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_kernel_reports_the_extremes_it_reads(dtype, D, Dv, Lk, where, value):
    seed = zlib.crc32(f"{dtype}{D}{Dv}{Lk}{where}{value}".encode()) % 1000
    q, k, v = _inputs(2, 4, 2, 70, Lk, D, Dv, dtype, seed=seed)
    t = {"q": q, "k": k, "v": v}[where]
    g = torch.Generator().manual_seed(seed)
    at = [int(torch.randint(0, n, (1,), generator=g)) for n in t.shape]  # anywhere in the tensor
    t[tuple(at)] = value
    seen: list = []
    native_flash.forward(q, k, v, build_spec(q, k, v, causal=True), seen=seen)  # the last query sees every key
    want = [float(x.float().abs().max()) for x in (q, k, v)]  # NaN where a NaN is (torch's max propagates it)
    for name, got, exp in zip("qkv", seen, want):
        assert (got != got and exp != exp) or got == exp, f"{dtype} {D} {Dv} {Lk} {where}={value} at {at}: " \
            f"the largest |{name}| read is {got}, the tensor's {exp}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_no_query_sees_stay_out_of_the_extremes(dtype, monkeypatch):
    """A chunk of 16 queries at the end of 600 keys under a window of 64 sees keys 520-599: the key blocks
    before 512 are never packed, so a NaN there is never read. The call stays on the kernel (the guard's
    exact path is never taken) and gives the bits it gives without the NaN, as the rule wants (the key has
    no effect on any row)."""
    from qkv.core import finite

    q, k, v = _inputs(1, 4, 2, 16, 600, 64, 64, dtype, seed=7)
    clean = qkv.attention(q, k, v, causal=True, window=64, backend="native")
    k[0, 1, 10, 3] = float("nan")
    v[0, 0, 500, 0] = float("inf")
    seen: list = []
    native_flash.forward(q, k, v, build_spec(q, k, v, causal=True, window=64), seen=seen)
    assert all(x < float("inf") for x in seen), seen
    monkeypatch.setattr(finite, "_exact", lambda *a, **kw: pytest.fail("the guard's exact path ran"))
    assert torch.equal(qkv.attention(q, k, v, causal=True, window=64, backend="native"), clean)
    k[0, 1, 530, 3] = float("nan")  # a key the queries see: the guard's exact path, NaN in the rows that see it
    monkeypatch.undo()
    out = qkv.attention(q, k, v, causal=True, window=64, backend="native")
    # query 584 + r sees keys [520 + r, 584 + r]: key 530 is seen by rows 0-10 of kv head 1's query heads 2 and 3
    want = torch.zeros(4, 16, dtype=torch.bool)
    want[2:4, :11] = True
    assert torch.equal(torch.isnan(out[0]).all(-1), want) and torch.equal(torch.isnan(out[0]).any(-1), want)


def test_the_guard_benchmark_times_the_native_rows(capsys):
    """`benchmarks/finite_check.py --backends native --window W` prints the native rows (dense, causal, the
    window), whose guard scans nothing ("-") and whose full scan is what the guard's scan would cost."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "finite_check.py"
    loader = importlib.util.spec_from_file_location("finite_check_benchmark", path)
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)
    assert bench.main(["--lengths", "64", "--backends", "native", "--window", "16", "--repeats", "1",
                       "--dtypes", "float32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "native" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| dense", "| causal", "| causal window 16"], rows
    assert all(" | - | - | " in r and r.rstrip().endswith("%) |") for r in rows), rows


def test_the_checkouts_benchmark_times_two_checkouts_in_turns():
    """`benchmarks/checkouts_ab.py` runs each checkout in a process of its own (here this one against itself),
    checks every output by the rule and prints one row per case; a folder that is no checkout is named."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "checkouts_ab.py"
    run = subprocess.run([sys.executable, str(script), "--before", str(root), "--lengths", "64", "--window", "16",
                          "--dtypes", "float32", "--rounds", "1", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| float32 64 ")]
    assert [r.split(" | ")[0] for r in rows] == ["| float32 64 no band", "| float32 64 causal",
                                                 "| float32 64 window 16"], run.stdout
    assert "outside the tolerance rule" not in run.stdout, run.stdout
    bad = subprocess.run([sys.executable, str(script), "--before", str(root / "docs")], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "is not a checkout of qkv" in bad.stderr and "Traceback" not in bad.stderr

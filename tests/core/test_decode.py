"""The decode backend's no-grad fast path against the float64 reference, by the tolerance rule.

Caches that are empty, of length 1, shorter and longer than a segment and not a multiple of
it; 1, 3 and 16 new queries, causal (bottom-right) or not; grouped-query and multi-head;
float32, bfloat16 and float64; batch rows with different cache lengths (key padding); and
the merging of segments and of upcast chunks, forced small with `decode_eager.split_sizes`. Every
test also checks that the fast path ran, so none passes through the tiled fallback unseen,
and runs twice: on the native kernel (float32 and bfloat16 without mask functions; checked
to have run) and on the eager segments that serve where no C++ compiler is found.
(The decode backend with gradients, which runs on the tiled engine, is in test_backends.)
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from random_qkv import random_qkv as _inputs

import qkv
from qkv.core import _kernels
from qkv.core.backend import decode
from qkv.core.engines import decode_eager, decode_native
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule, grads

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.fixture(params=["kernel", "eager"], autouse=True)
def engine(request, monkeypatch):
    """Every test runs twice: on the native kernel (csrc/decode_kernel.cpp) where it applies,
    and with the kernel turned off, on the eager segments that run where no compiler is."""
    calls = []
    _ENGINE.update(name=request.param, calls=calls)
    if request.param == "eager":
        monkeypatch.setattr(decode_native, "lib", lambda: None)
        monkeypatch.setattr(_kernels, "warn_unavailable", lambda *a, **kw: None)
    elif decode_native.lib() is None:
        pytest.skip(f"the native decode kernel is unavailable: {_kernels.status('decode_kernel')}")
    original = decode_native.forward
    monkeypatch.setattr(decode_native, "forward", lambda *a, **kw: calls.append(a) or original(*a, **kw))
    return calls


_ENGINE: dict = {}


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls of the fast path."""
    calls = []
    original = decode._fast_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "_fast_forward", counting)
    return calls


def _padding(B, Lk, gen, lengths=None):
    """A (B, 1, 1, Lk) key-padding mask: row b sees its first lengths[b] keys."""
    if lengths is None:
        lengths = torch.randint(0, Lk + 1, (B,), generator=gen)
    return (torch.arange(Lk)[None, :] < torch.as_tensor(lengths)[:, None]).view(B, 1, 1, Lk)


def _check(q, k, v, *, sizes=None, **kw):
    """decode (fast path, no grad) vs the same-dtype reference vs the float64 reference: out and lse."""
    kw64 = {key: (val.double() if torch.is_tensor(val) and val.is_floating_point() else val) for key, val in kw.items()}
    exact, exact_lse = qkv.attention_with_lse(q.double(), k.double(), v.double(), backend="reference", **kw64)
    plain = qkv.reference_attention(q, k, v, **kw)
    calls, before = _ENGINE["calls"], len(_ENGINE["calls"])
    with torch.no_grad(), (decode_eager.split_sizes(*sizes) if sizes else contextlib.nullcontext()):
        fast, fast_lse = qkv.attention_with_lse(q, k, v, backend="decode", **kw)
    what = f"decode {tuple(q.shape)} x {tuple(k.shape)} {q.dtype} sizes={sizes} {sorted(kw)} on {_ENGINE['name']}"
    # The kernel takes float32 and bfloat16 caches without mask functions; the rest is eager.
    on_kernel = _ENGINE["name"] == "kernel" and q.dtype != torch.float64 and not callable(kw.get("mask"))
    if k.shape[2] > 0 and q.shape[2] > 0:
        assert (len(calls) > before) == on_kernel, f"{what}: the native kernel {'did not run' if on_kernel else 'ran'}"
    assert fast.dtype == q.dtype
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=what + " out")
    assert torch.equal(torch.isneginf(fast_lse), torch.isneginf(exact_lse)), \
        f"{what}: lse must be -inf exactly where no key is seen"
    seen = torch.isfinite(exact_lse)
    if seen.any():
        err = (fast_lse.double() - exact_lse)[seen].abs().max().item()
        assert err <= 1e-5 * max(1.0, exact_lse[seen].abs().max().item()), f"{what}: lse error {err:.2e}"
    return fast


# Segments of 8 keys and upcast chunks of 3: caches of 1 and 5 keys are shorter than a
# segment, 23 is longer and not a multiple of either, 64 is a multiple of both.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lk", [0, 1, 5, 23, 64])
@pytest.mark.parametrize("Lq", [1, 3, 16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_small_splits(heads, causal, Lq, Lk, dtype, fast_calls):
    Hq, Hkv = heads
    (q, k, v), _ = _inputs(2, Hq, Hkv, Lq, Lk, dtype, seed=Lk * 31 + Lq)
    _check(q, k, v, causal=causal, sizes=(8, 3))
    assert fast_calls, "the fast path did not run"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq", [1, 3, 16])
def test_default_sizes_long_cache(Lq, dtype, fast_calls, monkeypatch):
    """A cache longer than the default upcast chunk (bfloat16) and, with 16 queries, than a segment."""
    segments = []
    original = decode_eager._segment
    monkeypatch.setattr(decode_eager, "_segment", lambda *a, **kw: segments.append(1) or original(*a, **kw))
    splits = []
    original_splits = decode_native.splits
    monkeypatch.setattr(decode_native, "splits", lambda *a: splits.append(original_splits(*a)) or splits[-1])
    (q, k, v), gen = _inputs(1, 8, 2, Lq, 70_001, dtype, seed=Lq, D=64, Dv=64)
    assert decode_eager._sizes(qkv.core.spec.build_spec(q, k, v), batched=False)[1] < 70_001
    _check(q, k, v, causal=True)
    assert fast_calls
    if splits:  # the kernel: 2 work items (B * Hkv), so the cache is split for the threads
        assert splits[0] >= 2, f"expected the cache split in several pieces, got {splits[0]}"
    elif Lq == 16:
        assert len(segments) > 2, f"expected several segments of the cache, got {len(segments)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("sizes", [None, (8, 3)], ids=["default", "small"])
def test_rows_of_different_cache_lengths(sizes, Lq, dtype, fast_calls):
    """A key-padding mask: row 0 sees nothing, row 1 one key, the others 17, 40 and all 50."""
    (q, k, v), gen = _inputs(5, 8, 2, Lq, 50, dtype, seed=Lq)
    pad = _padding(5, 50, gen, lengths=[0, 1, 17, 40, 50])
    out = _check(q, k, v, mask=pad, causal=True, sizes=sizes)
    assert torch.all(out[0] == 0), "a row with an empty cache attends to nothing"
    assert fast_calls


@pytest.mark.parametrize("option", ["window", "float-mask", "mask-mod", "bool-mask-per-head", "scale"])
def test_other_constraints(option, fast_calls):
    (q, k, v), gen = _inputs(2, 8, 2, 3, 41, torch.float32, seed=3)
    kw = {
        "window": {"window": 9, "causal": True},
        "float-mask": {"mask": torch.randn(2, 1, 3, 41, generator=gen).masked_fill(
            torch.rand(2, 1, 3, 41, generator=gen) < 0.3, float("-inf"))},
        "mask-mod": {"mask": lambda b, h, qi, kj: (kj + h + b) % 3 != 0},
        "bool-mask-per-head": {"mask": torch.rand(2, 8, 3, 41, generator=gen) > 0.5},
        "scale": {"scale": 0.7, "causal": True},
    }[option]
    _check(q, k, v, sizes=(8, 3), **kw)
    assert fast_calls


def test_segments_merge_exactly_in_float64(fast_calls):
    """In float64 the merged segments equal one softmax to rounding: 1 key per segment, 1 per chunk."""
    (q, k, v), gen = _inputs(2, 4, 2, 3, 37, torch.float64, seed=5)
    pad = _padding(2, 37, gen, lengths=[20, 37])
    exact = qkv.reference_attention(q, k, v, mask=pad, causal=True)
    with torch.no_grad(), decode_eager.split_sizes(1, 1):
        got = qkv.attention(q, k, v, mask=pad, causal=True, backend="decode")
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)
    assert fast_calls


def test_cache_that_is_a_slice_of_a_larger_buffer(fast_calls):
    """As qkv.nn.KVCache hands it over: (B, Hkv, capacity, D) storage, the first L keys in use."""
    (q, k, v), _ = _inputs(2, 8, 2, 1, 300, torch.bfloat16, seed=8)
    store_k = torch.zeros(2, 2, 512, 32, dtype=torch.bfloat16)
    store_v = torch.zeros(2, 2, 512, 24, dtype=torch.bfloat16)
    store_k[:, :, :300], store_v[:, :, :300] = k, v
    with torch.inference_mode():
        got = qkv.attention(q, store_k[:, :, :300], store_v[:, :, :300], backend="decode")
    assert torch.equal(got, qkv.attention(q, k, v, backend="decode"))
    _check(q, store_k[:, :, :300], store_v[:, :, :300], sizes=(64, 16))
    assert fast_calls


def test_gradients_and_dropout_use_the_tiled_engine(fast_calls):
    """With inputs that require grad the backend runs the tiled engine (its backward), exactly."""
    (q, k, v), gen = _inputs(2, 8, 2, 3, 50, torch.float32, seed=2)
    up = torch.randn(2, 8, 3, 24, generator=gen)
    pad = _padding(2, 50, gen, lengths=[30, 50])
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    exact = qkv.reference_attention(q64, k64, v64, mask=pad, causal=True)
    qp, kp, vp = (t.clone().requires_grad_() for t in (q, k, v))
    plain = qkv.reference_attention(qp, kp, vp, mask=pad, causal=True)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    fast = qkv.attention(qf, kf, vf, mask=pad, causal=True, backend="decode")
    assert not fast_calls, "inputs that require grad must not take the no-grad fast path"
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what="decode with grad out")
    for name, g, gp, ge in zip("qkv", grads(fast, (qf, kf, vf), up), grads(plain, (qp, kp, vp), up),
                               grads(exact, (q64, k64, v64), up.double())):
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"decode d{name}")
    with torch.no_grad():
        qkv.attention(q, k, v, dropout_p=0.5, backend="decode")
        qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s * 0.5, backend="decode")
    assert not fast_calls, "dropout and score functions run on the tiled engine"


def test_split_sizes_are_checked():
    with pytest.raises(ValueError, match="split sizes must be >= 1"):
        with decode_eager.split_sizes(0, 4):
            pass


def test_auto_picks_decode_for_a_chunk_only_without_gradients():
    from qkv.core import choose_backend
    from qkv.core.spec import build_spec

    def picked(Lq, Lk, requires_grad=False, dtype=torch.float32, **kw):
        q = torch.zeros(1, 8, Lq, 16, requires_grad=requires_grad, dtype=dtype)
        k = torch.zeros(1, 2, Lk, 16, dtype=dtype)
        return choose_backend(build_spec(q, k, k, causal=True, **kw), q, False)

    # Without gradients for q: by cache bytes on the kernel, by cache length on the eager path.
    for dtype in (torch.float32, torch.bfloat16):
        for Lq in (1, 8, 16):
            if _ENGINE["name"] == "kernel":
                kernel = decode_native.lib()
                least = decode.kernel_min_bytes(dtype, kernel.vector_width, kernel.fma)[0 if Lq == 1 else 1]
                if least is None:  # this build's rule never claims a chunk (a narrow build)
                    assert picked(Lq, 1 << 16, dtype=dtype) != "decode", (dtype, Lq)
                    continue
                first = -(-least // (2 * (16 + 16) * dtype.itemsize))  # keys of 2 kv heads, D = Dv = 16
            else:
                first = decode.AUTO_MIN_KEYS if Lq == 1 else decode.AUTO_MIN_KEYS_CHUNK
            assert picked(Lq, first, dtype=dtype) == "decode", (dtype, Lq, first)
            assert picked(Lq, first - 1, dtype=dtype) != "decode", (dtype, Lq, first)
    big = 4 * decode.AUTO_MIN_KEYS_CHUNK
    assert picked(17, big) != "decode"
    assert picked(8, big, requires_grad=True) != "decode"
    assert picked(1, decode.AUTO_MIN_KEYS, requires_grad=True) == "decode"  # one query: the tiled fallback
    assert picked(8, big, dropout_p=0.1) != "decode"
    assert picked(8, big, score_mod=lambda s, b, h, i, j: s) != "decode"


# ------------------------------------------------------------------ the native kernel's edges
# Head sizes around its vector widths (16 floats; 32 bfloat16 in the dot product), rows
# around its tiles of 4, keys around its tiles (4 and 16) and blocks (64), and layouts.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# Head sizes whose last dims (D mod 16, or mod 32 on the bfloat16 dot product; Dv mod 16) run in
# one masked step: some only that step (D < 16), some across a 64-byte line.
@pytest.mark.parametrize("D,Dv", [(72, 24), (80, 8), (40, 200), (128, 64), (16, 1), (1, 3), (7, 15), (33, 17),
                                  (100, 33), (130, 130)])
def test_head_sizes(D, Dv, dtype):
    (q, k, v), gen = _inputs(2, 6, 2, 2, 131, dtype, seed=D + Dv, D=D, Dv=Dv)
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Hq,Hkv,Lq", [(3, 1, 1), (5, 1, 1), (10, 2, 1), (8, 1, 16), (4, 4, 5)])
@pytest.mark.parametrize("Lk", [3, 63, 65, 129, 1100])
def test_rows_and_keys_around_the_tiles(Hq, Hkv, Lq, Lk, dtype):
    (q, k, v), gen = _inputs(1, Hq, Hkv, Lq, Lk, dtype, seed=Hq * 7 + Lk, D=64, Dv=64)
    _check(q, k, v, causal=True)
    _check(q, k, v, causal=True, window=(40, 0), sizes=(50, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cache_in_sequence_major_layout(dtype):
    """k and v as (B, L, Hkv, D) storage seen as (B, Hkv, L, D): strided heads and keys."""
    (q, k, v), gen = _inputs(2, 8, 2, 3, 300, dtype, seed=11, D=64, Dv=48)
    k_t, v_t = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    assert k_t.stride() != k.stride() and torch.equal(k_t, k)
    pad = _padding(2, 300, gen, lengths=[123, 300])
    _check(q, k_t, v_t, mask=pad, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masks_per_head_and_bias_in_the_cache_dtype(dtype):
    (q, k, v), gen = _inputs(2, 8, 2, 4, 257, dtype, seed=12)
    allowed = torch.rand(2, 8, 4, 257, generator=gen) > 0.4
    bias = torch.randn(1, 8, 1, 257, generator=gen).to(dtype)
    _check(q, k, v, mask=allowed)
    _check(q, k, v, mask=bias, causal=True)


def test_one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (q, k, v), gen = _inputs(1, 8, 2, 1, 5000, torch.bfloat16, seed=13, D=64, Dv=64)
        _check(q, k, v)
    finally:
        torch.set_num_threads(threads)


def test_the_fast_paths_estimate_does_not_count_the_cache(monkeypatch):
    """A decode step reads the cache where it lies: its estimate is the queries, output and split states,
    so a long cache does not make every step read the free memory; with autograd it is the tiled
    engine's (which upcasts the inputs and keeps their gradients)."""
    from qkv.core import _memory
    from qkv.core.spec import build_spec

    q = torch.zeros(1, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16).expand(1, 8, 1 << 20, 128)  # 2^20 keys, no memory
    spec = build_spec(q, k, k)
    need, what = decode.memory(spec, q, False)
    assert need < _memory.ALWAYS_FITS and "partial states" in what
    calls = []
    monkeypatch.setattr(_memory, "available", lambda device: calls.append(device) or 1 << 40)
    qkv.core.api.check_memory("decode", spec, q, False)
    assert calls == []
    bias = torch.zeros(1, 32, 1, 1 << 20, dtype=torch.bfloat16)  # read as float32: one copy counted
    need_m, _ = decode.memory(build_spec(q, k, k, mask=bias), q, False)
    assert need_m == need + 4 * bias.numel()
    qg = q.clone().requires_grad_()
    for spec_g in (build_spec(qg, k, k), build_spec(q, k.clone().requires_grad_(), k)):
        need_g, what_g = decode.memory(spec_g, q, False)
        assert need_g > 2 * 8 * (1 << 20) * 256 * 4 and "upcast" in what_g  # k and v in float32, and their gradients


@pytest.mark.parametrize("zen5", [True, False])
def test_auto_on_zen5_takes_short_caches_but_not_a_chunk_as_long_as_its_cache(monkeypatch, zen5):
    """On Zen 5 (ZEN5_KERNEL_AUTO_MIN_BYTES, measured against qkv's SDPA backend: its non-finite scan
    weighs most on a short cache) `auto` sends a step to the decode kernel from far fewer bytes than the
    first rule (KERNEL_AUTO_MIN_BYTES), but a chunk with fewer than ZEN5_CHUNK_KEYS_PER_QUERY cached keys
    per query (16 queries on 16 keys lost there) keeps the first rule's bytes."""
    from qkv.core import _kernels, choose_backend
    from qkv.core.spec import build_spec

    kernel = decode_native.lib()
    if kernel is None or kernel.vector_width < 16:
        pytest.skip("the AVX-512 build's rule: no such build in this run (the eager engine, or a narrower build)")
    monkeypatch.setattr(_kernels, "zen5_cpu", lambda: zen5)

    def picked(Lq, Lk, dtype, B=1):
        q = torch.zeros(B, 32, Lq, 128, dtype=dtype)  # (B, Hq, Lq, D)
        k = torch.zeros(B, 8, Lk, 128, dtype=dtype)  # (B, Hkv, Lk, D): 8 KiB a key in float32, 4 KiB in bfloat16
        return choose_backend(build_spec(q, k, k, causal=Lq > 1), q, False)

    assert (picked(1, 32, torch.float32) == "decode") is zen5  # 256 KiB: 1.24x-1.41x qkv's SDPA there
    assert picked(1, 31, torch.float32) != "decode"
    assert (picked(1, 4, torch.bfloat16) == "decode") is zen5  # 16 KiB
    assert picked(1, 3, torch.bfloat16) != "decode"
    assert (picked(8, 16, torch.float32) == "decode") is zen5  # a chunk of 8 on 16 keys: 1.93x
    assert (picked(16, 32, torch.bfloat16) == "decode") is zen5
    assert picked(16, 16, torch.float32) != "decode"  # as long as its cache: 0.82x there
    assert picked(16, 16, torch.bfloat16, B=7) != "decode"  # 448 KiB, one key a query: the first rule's bytes,
    assert picked(16, 16, torch.bfloat16, B=8) == "decode"  # from whose 512 KiB it is claimed on either kind

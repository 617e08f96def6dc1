"""The native FlashAttention-2 backward kernel (csrc/flash_bwd_kernel.cpp, engines/native_flash_bwd.py).

Its dq, dk, dv from the forward's out and lse are checked against float64 autograd of the
reference under the tolerance rule (GRAD_FACTOR times the plain same-dtype reference's error),
on fresh random inputs, float32 and bfloat16: GQA, Lq != Lk, head sizes that are and are not
multiples of 16, causal and windows, rows that see no key, non-contiguous inputs, and the
key splits taken when there are fewer (batch, kv head) items than threads.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from random_qkv import random_inputs

import qkv
from native_checks import check_large_logit_gradients
from qkv.core import _kernels
from qkv.core.engines import native_flash_bwd as nb
from qkv.core.spec import build_spec
from qkv.testing import GRAD_FACTOR, assert_within_rule

# Skipped only where no compiler can build it (or kernels are turned off); a kernel that fails to
# build where a compiler exists fails test_the_kernels_build_where_a_compiler_exists (test_native_flash.py).
pytestmark = pytest.mark.skipif(nb.lib() is None and (_kernels._compiler() is None or _kernels._turned_off()),
                                reason=f"no native kernel: {_kernels.status(nb.NAME)}")

# name: (B, Hq, Hkv, Lq, Lk, D, Dv, options)
CASES = {
    "mha": (1, 2, 2, 128, 128, 64, 64, {}),
    "mha-causal": (2, 2, 2, 150, 150, 64, 64, {"causal": True}),
    "gqa8/2-causal-longer-k": (1, 8, 2, 96, 160, 128, 128, {"causal": True}),
    "gqa4/1-causal-dead-rows": (2, 4, 1, 130, 70, 40, 40, {"causal": True}),  # rows 0..59 see no key
    "gqa4/1-window": (1, 4, 1, 200, 200, 16, 16, {"window": (32, 8)}),
    "d40-dv24-left-only": (1, 2, 1, 77, 93, 40, 24, {"window": (10, None)}),
    "d16-right-only": (1, 3, 3, 65, 65, 16, 16, {"window": (None, 3)}),
    "diagonal-only-dead-rows": (1, 2, 2, 90, 60, 64, 32, {"window": (0, 0)}),
    "d256-dv200": (1, 2, 1, 70, 80, 256, 200, {"causal": True}),
    "d3-dv5": (1, 2, 2, 33, 21, 3, 5, {}),
    "one-key-dv256": (2, 8, 2, 251, 1, 48, 256, {"window": (31, None)}),  # dq exactly 0: dS = P (dP - delta) = 0
}


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed):
    return random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed, upstream=True)  # q, k, v, upstream


def _check(q, k, v, up, kw, what):
    """nb.backward on (q, k, v) (any strides) against float64 and plain autograd of the reference."""
    dtype = q.dtype
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    exact = torch.autograd.grad(qkv.reference_attention(q64, k64, v64, **kw), (q64, k64, v64), up.double())
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    plain = torch.autograd.grad(qkv.reference_attention(qp, kp, vp, **kw), (qp, kp, vp), up)
    with torch.no_grad():
        out, lse = qkv.attention_with_lse(q, k, v, backend="reference", **kw)
    spec = build_spec(q, k, v, **kw)
    fast = nb.backward(q, k, v, out, lse, up, spec)
    for name, g, gp, ge in zip("qkv", fast, plain, exact):
        assert g.dtype == torch.float32 and g.is_contiguous()
        assert_within_rule(g.to(dtype), gp, ge, factor=GRAD_FACTOR, what=f"{what} d{name}")
    return fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_within_rule(case, dtype):
    B, Hq, Hkv, Lq, Lk, D, Dv, kw = CASES[case]
    q, k, v, up = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=zlib.crc32(case.encode()) % 1000)
    dq, dk, dv = _check(q, k, v, up, kw, f"{case} {dtype}")
    lo, hi = build_spec(q, k, v, **kw).band_edges(torch.arange(Lq))
    dead = lo == hi
    assert (dq[:, :, dead] == 0).all(), "a row that sees no key has gradient 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_large_logits_dv_is_exact_where_p_is_one(dtype):
    check_large_logit_gradients(dtype, f"native {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_non_contiguous_inputs(dtype):
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 70, 90, 64, 48
    q, k, v, up = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=7)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) storage: last stride 1
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride != 1: copied
    v = torch.cat([v, v], dim=-1)[..., :Dv]  # row stride 2 * Dv
    assert not q.is_contiguous() and k.stride(-1) != 1 and not v.is_contiguous()
    _check(q, k, v, up, {"causal": True}, f"non-contiguous {dtype}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_key_splits_and_thread_counts(threads):
    """One (batch, kv head) item and several threads: the keys are split, each split's dq summed."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for kw in ({}, {"causal": True}, {"window": (40, 0)}):
            q, k, v, up = _inputs(1, 3, 1, 300, 520, 32, 32, torch.float32, seed=threads)
            _check(q, k, v, up, kw, f"{threads} threads {kw}")
    finally:
        torch.set_num_threads(old)


def test_refusals(monkeypatch):
    q, k, v, up = _inputs(1, 2, 2, 8, 8, 16, 16, torch.float64, seed=0)
    spec = build_spec(q, k, v)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        nb.backward(q, k, v, q, torch.zeros(1, 2, 8), up, spec)
    f = [t.float() for t in (q, k, v, up)]
    with pytest.raises(ValueError, match="bands and BlockMasks only"):
        nb.backward(*f[:3], f[0], torch.zeros(1, 2, 8), f[3], build_spec(*f[:3], score_mod=lambda s, b, h, i, j: s))
    meta = [t.to("meta") for t in f]  # another device: refused by name before any pointer is taken
    with pytest.raises(ValueError, match="CPU kernel: q on meta"):
        nb.backward(*meta[:3], meta[0], torch.zeros(1, 2, 8), meta[3], build_spec(*f[:3]))
    with pytest.raises(ValueError, match="lse"):
        nb.backward(*f[:3], f[0], torch.zeros(1, 2, 7), f[3], build_spec(*f[:3]))
    monkeypatch.setattr(nb, "lib", lambda: None)
    monkeypatch.setattr(_kernels, "status", lambda name: "no compiler in this test")
    with pytest.raises(RuntimeError, match="no compiler in this test"):
        nb.backward(*f[:3], f[0], torch.zeros(1, 2, 8), f[3], build_spec(*f[:3]))


def test_long_rows_float32():
    """dk/dv of the first keys and dq of the last rows sum thousands of terms: per-block sums keep
    their float32 error within the rule (one running sum had 5x the plain reference's error)."""
    q, k, v, up = _inputs(1, 1, 1, 3072, 3072, 64, 64, torch.float32, seed=11)
    _check(q, k, v, up, {"causal": True}, "long rows float32")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 build flags")
def test_portable_build_without_avx512(tmp_path, monkeypatch):
    """The same source built for a CPU without AVX-512 (x86-64-v3: AVX2) gives the same gradients
    within the rule: the portable path (GCC vector extensions, no AVX-512 or bfloat16 dot product),
    built without OpenMP (the std::thread fallback)."""
    cxx = _kernels._compiler()
    assert cxx is not None  # the module's skip: the native build succeeded
    so = tmp_path / "portable.so"
    src = Path(_kernels.__file__).with_name("csrc") / f"{nb.NAME}.cpp"
    run = subprocess.run([cxx, "-O2", "-march=x86-64-v3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wno-psabi",
                          "-o", str(so), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    monkeypatch.setattr(nb, "lib", lambda: nb.typed(ctypes.CDLL(str(so))))
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, up = _inputs(1, 4, 2, 100, 130, 40, 24, dtype, seed=5)
        _check(q, k, v, up, {"causal": True}, f"portable {dtype}")


@pytest.mark.parametrize("Lq, Lk", [(0, 5), (5, 0)])
def test_empty_lengths(Lq, Lk):
    q, k, v = torch.randn(1, 2, Lq, 16), torch.randn(1, 1, Lk, 16), torch.randn(1, 1, Lk, 8)
    lse = torch.full((1, 2, Lq), float("-inf"))
    dq, dk, dv = nb.backward(q, k, v, torch.zeros(1, 2, Lq, 8), lse, torch.randn(1, 2, Lq, 8), build_spec(q, k, v))
    assert (dq.shape, dk.shape, dv.shape) == ((1, 2, Lq, 16), (1, 1, Lk, 16), (1, 1, Lk, 8))
    assert not dq.any() and not dk.any() and not dv.any()


def test_long_value_rows_that_see_few_keys():
    """Dv = 200 and rows that see one or two keys: dS = P (dP - delta) cancels almost exactly, so
    dP = dO . v must carry the error of short partial sums (one running sum of 200 products
    failed the rule on these inputs)."""
    q, k, v, up = _inputs(1, 6, 3, 143, 34, 48, 200, torch.float32, seed=3)
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # one split: the sums as they were when this failed
    try:
        _check(q, k, v, up, {"window": (None, 3)}, "Dv 200, few keys per row")
    finally:
        torch.set_num_threads(old)


def test_no_memory_is_a_return_code_not_an_abort():
    """Work buffers that cannot be allocated (2^40 query rows) give code 3, in a child process so that an
    abort (an exception escaping the library) would fail this test instead of the suite."""
    code = """
import ctypes, sys
from qkv.core.engines import native_flash_bwd as nb
kernel = nb.lib()
st = (ctypes.c_int64 * 4)(0, 0, 0, 1)
rc = kernel.qkv_flash_bwd(0, 1, 1, 1, 1 << 40, 16, 16, 16, None, st, None, st, None, st, None, None, None, None,
                          1.0, -1, -1, 0, None, None, None, 1, None, None)
print(rc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-800:]
    assert proc.stdout.strip() == "3", proc.stdout

"""The native decode kernel built without AVX-512: its narrow-vector tiles.

A build for a CPU without AVX-512 (csrc/decode_kernel.cpp, `VW` < 16) runs the scores and the
values on vectors of 8 floats (AVX2: x86-64-v3; AVX alone: sandybridge, whose bfloat16 widening is
the generic one) or 4 (SSE: x86-64-v2 and the x86-64 baseline; NEON on ARM), in tiles of its own
(scores_tile_narrow, values_tile_narrow), with its own softmax loops and, for bfloat16, its own
widening loads. The same source is built here for each of those targets (the machine running the
tests only needs to run x86-64 code, with AVX2 for the first), at -O3 as qkv builds it, and checked
against the float64 reference by the tolerance rule (qkv.testing), on shapes chosen around what
those tiles do differently:

- head sizes around 4 and 8 (the tiles' last dims one by one; D < VW: only them), and value
  sizes around the passes of 8 vectors (8 * VW dims), one vector, and the rest;
- 1 to 3 rows per kv head (tiles of one row), 4 (one tile of 4), 5 and more (a chunk of
  queries: rows in groups of 4 for the values, plus a row on its own);
- key counts around the tiles (4 and 16 keys) and blocks (64), causal rows, masks, a bias;
- float32 and bfloat16 caches, and a NaN or infinity in the cache (the step's flag and the
  guard's recompute), also in a key every row's mask drops (only the raw scores' check sees it);
- bfloat16 on pairs (scores_tile_pairs, values_tile_pairs: head and value sizes that are multiples
  of 2 VW), beside the sizes that keep the widening tiles;
- inputs that end right before an unreadable page (no load past a row's end), in a child process.

Each build reports its width (qkv_decode_vector_width), so a build that silently took another path
fails here.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
from pathlib import Path

import pytest
import torch
from decode_cases import check_last_query_poisoned, check_rule, constraint_cases
from random_qkv import random_qkv

import qkv
from qkv.core import _kernels
from qkv.core.engines import decode_native

pytestmark = [
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 build flags"),
    pytest.mark.skipif(decode_native.lib() is None,
                       reason=f"the native decode kernel is unavailable: {_kernels.status('decode_kernel')}"),
]

# build -> (compiler flags, the vector width and FMA it must report, the row of auto's rule it takes)
BUILDS = {
    "x86-64-v3": (["-march=x86-64-v3", "-fopenmp"], 8, True, 8),  # AVX2 and FMA: 8 floats
    # AVX without AVX2 or FMA: 8 floats, the generic bfloat16 widening, the rule of 4
    "sandybridge": (["-march=sandybridge", "-fopenmp"], 8, False, 4),
    "x86-64-v2": (["-march=x86-64-v2", "-fopenmp"], 4, False, 4),  # SSE4.2: 4 floats
    "x86-64": (["-march=x86-64"], 4, False, 4),  # the baseline (SSE2), std::thread instead of OpenMP
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """build name -> the compiled library (each compiled once for the module)."""
    cxx = _kernels._compiler()
    assert cxx is not None  # the module's skip: the native build succeeded
    src = Path(_kernels.__file__).with_name("csrc") / "decode_kernel.cpp"
    folder = tmp_path_factory.mktemp("narrow")
    libs = {}
    for name, (flags, *_) in BUILDS.items():
        so = folder / f"decode_{name}.so"
        run = subprocess.run([cxx, "-O3", *flags, "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wno-psabi",
                              "-o", str(so), str(src)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{name}: {run.stderr[-2000:]}"
        libs[name] = so
    return libs


class Calls(list):
    """The calls of the kernel's forward, and the name of the build that ran them."""

    name = ""


@pytest.fixture(params=list(BUILDS))
def build(request, built, monkeypatch):
    """Each narrow build in turn as the decode kernel (the other kernels as they are); the calls of
    its forward."""
    cdll = ctypes.CDLL(str(built[request.param]))
    load = _kernels.load
    monkeypatch.setattr(_kernels, "load", lambda name: cdll if name == "decode_kernel" else load(name))
    monkeypatch.setattr(decode_native, "_typed", set())
    kernel = decode_native.lib()
    assert kernel is cdll and not kernel.bf16_dot
    assert (kernel.vector_width, kernel.fma) == BUILDS[request.param][1:3], (request.param, kernel.vector_width)
    calls = Calls()
    calls.name = request.param
    original = decode_native.forward
    monkeypatch.setattr(decode_native, "forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


# (Hq, Hkv, Lq, Lk, D, Dv): rows per kv head M = Hq / Hkv * Lq from 1 to 24; head sizes below,
# at and around 4 and 8 and their multiples; value sizes around 32 and 64 (8 vectors of 4 or 8),
# a vector, and a rest.
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 1, 1, 70, 3, 5),
    (3, 1, 1, 129, 12, 17),
    (4, 1, 1, 4097, 128, 128),
    (4, 1, 1, 1001, 33, 72),
    (5, 1, 1, 300, 72, 40),
    (8, 2, 1, 777, 64, 200),
    (8, 1, 3, 2049, 96, 56),
    (4, 4, 2, 65, 7, 9),
    (2, 1, 3, 513, 40, 130),
    # bfloat16 pairs (D, Dv multiples of 2 VW): two tiles of 4 rows, a key left to dot1, the values'
    # passes of 4 chunks and then single chunks; 3 rows (the 16-key tiles) and single chunks only
    (4, 1, 2, 301, 48, 80),
    (3, 1, 1, 150, 32, 48),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,Dv", SHAPES)
def test_rule(Hq, Hkv, Lq, Lk, D, Dv, dtype, build):
    (q, k, v), _ = random_qkv(2 if Lk < 3000 else 1, Hq, Hkv, Lq, Lk, torch.float64, seed=Lk + 7 * D + Dv, D=D, Dv=Dv)
    v = v + torch.linspace(-3.0, 3.0, Dv, dtype=torch.float64)  # a dimension out of place shows
    q, k, v = (t.to(dtype) for t in (q * 2.0, k, v))
    check_rule(q, k, v, f"{dtype} {Hq}/{Hkv} Lq={Lq} Lk={Lk} D={D} Dv={Dv}", causal=Lq > 1)
    assert build, "the native kernel did not run"


PAIRS = [(40, 24), (48, 32)]  # head and value sizes: off and on the bfloat16 pairs (multiples of 16)


@pytest.mark.parametrize("D,Dv", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masks_bias_and_window(dtype, D, Dv, build):
    """A per-head bool mask, a float bias with -inf entries, a causal window."""
    Hq, Lk = 8, 1001
    (q, k, v), gen = random_qkv(2, Hq, 2, 2, Lk, dtype, seed=5, D=D, Dv=Dv)
    for what, kw in constraint_cases(gen, 2, Hq, 2, Lk, dtype):
        check_rule(q, k, v, f"{dtype} {what}", **kw)
    assert len(build) >= 3


@pytest.mark.parametrize("D,Dv", [(36, 20), (32, 16)])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_key(dtype, value, D, Dv, build):
    """A NaN or infinity in the last key, seen by the last query only, and one outside every
    query's window: the rows that see the bad key are NaN (the step's flag sends it to the
    guard), every other row equals the reference on the clean cache by the rule."""
    B, Hq, Hkv, Lq, Lk = 1, 8, 1, 3, 2049
    (q, k, v), _ = random_qkv(B, Hq, Hkv, Lq, Lk, dtype, seed=11, D=D, Dv=Dv)
    clean = k.clone()
    k[0, 0, Lk - 1, 5] = value
    k[0, 0, 10, 4] = value  # an even dim (the pairs' low halves), the last key's an odd one
    kw = {"causal": True, "window": (1000, 0)}
    with torch.no_grad():
        out = qkv.attention(q, k, v, backend="decode", **kw)
    assert build, "the native kernel did not run"
    check_last_query_poisoned(out, q, clean, v, f"{dtype} decode, {value} in k", **kw)


@pytest.mark.parametrize("D,Dv", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Lk", [70, 200])
def test_a_masked_non_finite_key_is_flagged(Lk, dtype, D, Dv, build):
    """A NaN key the kernel reads but every row's mask drops: no output shows it, so only the raw
    scores' check (before any mask) can flag it, at whatever place in a block it sits (the first
    lanes, a tile's tail, the last key). Flagged, the guard recomputes the step by the rule."""
    from qkv.core.spec import build_spec

    (q, k, v), _ = random_qkv(1, 8, 2, 2, Lk, dtype, seed=Lk, D=D, Dv=Dv)
    for j in (0, 3, 9, 33, Lk - 1):
        bad_k = k.clone()
        bad_k[0, 1, j, 7] = float("nan")
        allow = torch.ones(1, 1, 1, Lk, dtype=torch.bool)
        allow[..., j] = False
        for keys, flagged in ((k, False), (bad_k, True)):
            spec = build_spec(q, keys, v, mask=allow)
            _, _, bad = decode_native.forward(decode_native.lib(), q, keys, v, spec, 0, Lk)
            assert bool(bad) is flagged, (dtype, Lk, j, flagged)
    assert build, "the native kernel did not run"


# Run in a child process (a fault ends the child, not the test run): q, k and v each end at the
# last byte before a page that cannot be read (mprotect PROT_NONE), so a load past a row's end
# faults; then the result is checked by the rule.
_GUARDED = r"""
import ctypes, mmap, sys
import torch
import qkv
from qkv.core import _kernels
from qkv.core.engines import decode_native
from qkv.testing import FWD_FACTOR, assert_within_rule

lib = ctypes.CDLL(sys.argv[1])
load = _kernels.load
_kernels.load = lambda name: lib if name == "decode_kernel" else load(name)
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE, keep = mmap.PAGESIZE, []


def at_guard(t):
    nbytes = t.numel() * t.element_size()
    size = -(-nbytes // PAGE) * PAGE
    m = mmap.mmap(-1, size + PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(base + size, PAGE, 0) == 0  # PROT_NONE
    out = torch.frombuffer(m, dtype=t.dtype, count=t.numel(), offset=size - nbytes).view(t.shape)
    out.copy_(t)
    keep.append(m)
    return out


calls = 0
for dtype in (torch.float32, torch.bfloat16):
    for Hq, Hkv, Lq, Lk, D, Dv in [(4, 1, 1, 67, 7, 9), (8, 2, 3, 130, 33, 17), (5, 1, 1, 65, 12, 40),
                                   (2, 1, 2, 64, 1, 3), (8, 1, 1, 1001, 128, 130), (1, 1, 1, 5, 4, 8),
                                   (4, 1, 1, 67, 16, 48)]:
        gen = torch.Generator().manual_seed(Lk + D)
        q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
                   for shape in ((1, Hq, Lq, D), (1, Hkv, Lk, D), (1, Hkv, Lk, Dv)))
        gq, gk, gv = at_guard(q), at_guard(k), at_guard(v)
        with torch.no_grad():
            got = qkv.attention(gq, gk, gv, backend="decode", causal=Lq > 1)
        exact = qkv.reference_attention(q.double(), k.double(), v.double(), causal=Lq > 1)
        plain = qkv.reference_attention(q, k, v, causal=Lq > 1)
        assert_within_rule(got, plain, exact, factor=FWD_FACTOR, what=f"{dtype} {Hq}/{Hkv} {Lq} {Lk} {D} {Dv}")
        calls += 1
assert decode_native.lib() is lib and not lib.bf16_dot
print("checked", calls)
"""


@pytest.mark.parametrize("name", list(BUILDS))
def test_no_read_past_the_end(name, built):
    """Each narrow build reads nothing past the last element of q, k or v (the last row's tail dims,
    the widening loads of bfloat16): inputs that end right before an unreadable page."""
    import sys

    run = subprocess.run([sys.executable, "-c", _GUARDED, str(built[name])], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{name}: exit {run.returncode}\n{run.stdout[-1000:]}\n{run.stderr[-3000:]}"
    assert "checked 14" in run.stdout, run.stdout


def test_auto_claims_what_was_measured_for_the_width(build):
    """`auto` sends a step to a narrow build only from the bytes measured for its kind
    (NARROW_KERNEL_AUTO_MIN_BYTES): never a chunk of queries on 4 floats or on AVX without FMA, a
    float32 chunk on AVX2 only from 16 MiB (it lost to SDPA up to 8 MiB, where the AVX-512 build's
    2 MiB rule would send it)."""
    from qkv.core import choose_backend
    from qkv.core.backend import decode
    from qkv.core.spec import build_spec

    width = BUILDS[build.name][3]  # the row of the rule this build must take

    def picked(Lq, Lk, dtype):
        q = torch.zeros(1, 8, Lq, 16, dtype=dtype)
        k = torch.zeros(1, 2, Lk, 16, dtype=dtype)
        return choose_backend(build_spec(q, k, k, causal=True), q, False)

    for dtype in (torch.float32, torch.bfloat16):
        per_key = 2 * (16 + 16) * dtype.itemsize  # bytes of keys and values per cached token
        for Lq in (1, 8):
            wide = decode.KERNEL_AUTO_MIN_BYTES[dtype][0 if Lq == 1 else 1]
            least = decode.NARROW_KERNEL_AUTO_MIN_BYTES[width][dtype][0 if Lq == 1 else 1]
            assert least is None or least >= wide, "the AVX-512 build's bytes are checked first: the least"
            if least is None:
                assert picked(Lq, 1 << 16, dtype) != "decode", (dtype, Lq)
                continue
            first = -(-least // per_key)
            assert picked(Lq, first, dtype) == "decode", (dtype, Lq, first)
            assert picked(Lq, first - 1, dtype) != "decode", (dtype, Lq, first)
    assert decode.NARROW_KERNEL_AUTO_MIN_BYTES[8][torch.float32][1] > decode.KERNEL_AUTO_MIN_BYTES[torch.float32][1]


def test_the_decode_benchmark_builds_for_a_target():
    """`benchmarks/decode.py --march TARGET` runs its table on the kernel built for that target, says
    so in its header, and refuses an unknown target with the compiler's message, no traceback."""
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"
    run = subprocess.run([sys.executable, str(script), "--march", "x86-64-v3", "--lengths", "64", "--dtypes", "float32",
                          "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Decode kernel: -march=x86-64-v3, 8-float vectors, bfloat16 dot product: no." in run.stdout, run.stdout
    assert "| float32 | 1 | 64 |" in run.stdout, run.stdout
    bad = subprocess.run([sys.executable, str(script), "--march", "no-such-cpu", "--lengths", "64"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0
    assert "--march no-such-cpu: the decode kernel did not build" in bad.stderr and "Traceback" not in bad.stderr

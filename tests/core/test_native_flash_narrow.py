"""The native FlashAttention-2 kernels built without AVX-512: their narrow-vector tiles.

A build for a CPU without AVX-512 (`VW` < 16 in csrc/qkv_simd.h) runs the forward's scores and P V
(flash_fwd_kernel.cpp: scores_narrow, values_narrow, the softmax on vectors of VW keys) and the
backward's five products (flash_bwd_kernel.cpp: micro_narrow) and its probabilities on vectors of 8
floats (AVX2: x86-64-v3) or 4 (SSE: x86-64-v2 and the x86-64 baseline; NEON on ARM). Both kernels are
built here for those targets at -O3, as qkv builds them (the machine running the tests only needs to
run x86-64 code, with AVX2 for the first), made the kernels of the native backend, and checked
against the float64 reference by the tolerance rule (qkv.testing) on the cases of the AVX-512
build's own tests (tests/core/test_native_flash.py: head sizes 8 to 256 around the tiles' widths,
ragged lengths, GQA, causal and windowed bands, rows that see no key), float32 and bfloat16, with
gradients, and under BlockMasks (the block lists' bits, taken VW keys at a time).

Without fused multiply-adds (x86 CPUs without AVX2) the products miss the rule at large logits and
at head sizes near 256 (shown below): the native backend refuses such a build by name. The 4-float
tiles are still checked here (as an ARM build, which has FMA, runs them), on the other cases.
Each build reports its width and FMA (qkv_flash_vector_width, qkv_flash_has_fma), so a build that
silently took another path fails here; `auto` and the sparse backend never claim a narrow build.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from random_qkv import random_inputs
from test_native_flash import CASES, GRAD_CASES

import qkv
from native_checks import check_accumulation, check_forward, check_gradients, check_large_logit_gradients
from qkv import masks
from qkv.core import _kernels
from qkv.core.api import choose_backend
from qkv.core.backend import native, sparse
from qkv.core.engines import native_flash, native_flash_bwd
from qkv.core.spec import build_spec
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule, grads, within_rule

pytestmark = [
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 build flags"),
    pytest.mark.skipif(_kernels._compiler() is None or _kernels._turned_off(),
                       reason=f"no native kernel: {_kernels.status('flash_fwd_kernel')}"),
]

# build -> (compiler flags, the vector width and FMA it must report)
BUILDS = {
    "x86-64-v3": (["-march=x86-64-v3", "-fopenmp"], 8, True),  # AVX2 and FMA: 8 floats
    "x86-64-v2": (["-march=x86-64-v2", "-fopenmp"], 4, False),  # SSE4.2: 4 floats
    "x86-64": (["-march=x86-64"], 4, False),  # the baseline (SSE2), std::thread instead of OpenMP
}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """build name -> (forward, backward) libraries, typed (each compiled once for the module)."""
    cxx = _kernels._compiler()
    folder = tmp_path_factory.mktemp("narrow_flash")
    src = Path(_kernels.__file__).with_name("csrc")
    libs = {}
    for name, (flags, *_) in BUILDS.items():
        pair = []
        for kernel in ("flash_fwd_kernel", "flash_bwd_kernel"):
            so = folder / f"{kernel}_{name}.so"
            run = subprocess.run([cxx, "-O3", *flags, "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wno-psabi",
                                  "-o", str(so), str(src / f"{kernel}.cpp")], capture_output=True, text=True,
                                 timeout=300)
            assert run.returncode == 0, f"{kernel} for {name}: {run.stderr[-2000:]}"
            pair.append(ctypes.CDLL(str(so)))
        libs[name] = (native_flash.typed(pair[0]), native_flash_bwd.typed(pair[1]))
    return libs


def _use(monkeypatch, built, name, as_if_fma=False):
    """Make the `name` build the native backend's kernels (as_if_fma: run a build without FMA as
    if it had it, as an ARM build with the same 4-float tiles does). Returns the forward library."""
    fwd, bwd = built[name]
    monkeypatch.setattr(native_flash, "lib", lambda: fwd)
    monkeypatch.setattr(native_flash_bwd, "lib", lambda: bwd)
    if as_if_fma:
        monkeypatch.setattr(fwd, "fma", True)
    return fwd


@pytest.fixture(params=list(BUILDS))
def build(request, built, monkeypatch):
    """Each build in turn as the native backend's kernels (the ones without FMA as if they had it)."""
    name = request.param
    _use(monkeypatch, built, name, as_if_fma=True)
    return name


@pytest.mark.parametrize("name", list(BUILDS))
def test_each_build_reports_its_tiles(built, name):
    _, width, fma = BUILDS[name]
    fwd, _ = built[name]
    assert (fwd.vector_width, fwd.fma, fwd.bf16_dot) == (width, fma, False)


_check = check_forward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_out_and_lse_follow_the_reference(build, case, dtype):
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
    q, k, v = random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=zlib.crc32(repr(case).encode()))
    _check(q, k, v, f"{build} {case} {dtype}", causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES + [(1, 4, 2, 150, 150, 24, 72, True, (40, 0))],
                         ids=lambda c: "-".join(map(str, c)))
def test_gradients_follow_the_reference(build, case, dtype):
    check_gradients(case, dtype, f"{build} grad {case} {dtype}", seed=21)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_dv_is_exact_where_p_is_one(build, dtype):
    check_large_logit_gradients(dtype, f"{build} {dtype}")


def test_long_sums_in_blocks(build):
    """P V summed block by block in the narrow tiles too (native_checks.check_accumulation)."""
    check_accumulation(build)


def _per_head(b, h, q_idx, kv_idx):
    """Causal, every (3 + b + 2h)-th diagonal left out: bits that differ lane by lane and by head."""
    return (kv_idx <= q_idx) & ((q_idx - kv_idx) % (3 + b + 2 * h) != 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["window", "per-head"])
def test_block_masks_follow_the_reference(build, mask, dtype):
    """The block lists' bits, VW keys at a time in the forward's softmax and the backward's mask."""
    B, Hq, Lq = 2, 4, 300
    fn = masks.causal_sliding_window(37) if mask == "window" else _per_head
    bm = qkv.block_mask(fn, B if mask == "per-head" else None, Hq if mask == "per-head" else None, Lq, Lq)
    q, k, v = random_inputs(B, Hq, 2, Lq, Lq, 40, 24, dtype, seed=31)
    up = torch.randn(B, Hq, Lq, 24, generator=torch.Generator().manual_seed(32)).to(dtype)
    outs, gs = {}, {}
    for w, backend in (("exact", "reference"), ("plain", "reference"), ("fast", "native")):
        xs = [(t.double() if w == "exact" else t.clone()).requires_grad_() for t in (q, k, v)]
        outs[w] = qkv.attention(*xs, mask=bm, backend=backend)
        gs[w] = grads(outs[w], xs, up.double() if w == "exact" else up)
    what = f"{build} {mask} {dtype}"
    assert_within_rule(outs["fast"], outs["plain"], outs["exact"], factor=FWD_FACTOR, what=what + " out")
    for name, g, gp, ge in zip("qkv", gs["fast"], gs["plain"], gs["exact"]):
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"{what} d{name}")


def test_large_logits_and_head_size_256_with_fma(built, monkeypatch):
    """The AVX2 build passes the checks that builds without FMA miss (test_native_flash.py's)."""
    _use(monkeypatch, built, "x86-64-v3")
    q, k, v = random_inputs(1, 4, 2, 33, 130, 64, 24, torch.float32, seed=11)
    _check(q, k, v, "scale 1000", scale=1e3)
    one, _ = qkv.attention_with_lse(q[:, :, :1], k[:, :, :1], v[:, :, :1], backend="native", scale=1e3)
    assert torch.equal(one, v[:, :, :1].repeat_interleave(2, dim=1)), "one key: the output is its value exactly"
    q, k, v = random_inputs(1, 16, 1, 1, 130, 255, 256, torch.float32, seed=12)
    up = torch.randn(1, 16, 1, 256, generator=torch.Generator().manual_seed(13))
    res = {}
    for w in ("exact", "plain", "fast"):
        xs = [(t.double() if w == "exact" else t.clone()).requires_grad_() for t in (q, k, v)]
        out = qkv.attention(*xs, scale=3.0, backend="native" if w == "fast" else "reference")
        res[w] = grads(out, xs, up.double() if w == "exact" else up)
    for name, g, gp, ge in zip("qkv", res["fast"], res["plain"], res["exact"]):
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"d{name}")


@pytest.mark.parametrize("name", ["x86-64-v2", "x86-64"])
def test_builds_without_fma_are_refused_by_name(built, monkeypatch, name):
    """Why: at scale 1000 the build's error is twice the FMA build's (with GCC 12: 2.65e-4, outside the
    rule's 2.48e-4, where the AVX2 build's is 1.22e-4, the plain reference's); so backend='native'
    names the missing FMA and the backends that can, and auto passes it by."""
    q, k, v = random_inputs(1, 4, 2, 33, 130, 64, 24, torch.float32, seed=11)
    exact = qkv.attention(q.double(), k.double(), v.double(), scale=1e3, backend="reference")
    plain = qkv.attention(q, k, v, scale=1e3, backend="reference")
    errs = {}
    for build in ("x86-64-v3", name):
        fwd = _use(monkeypatch, built, build, as_if_fma=True)
        errs[build] = within_rule(qkv.attention(q, k, v, scale=1e3, backend="native"), plain, exact,
                                  factor=FWD_FACTOR)[1]
    assert errs[name] > 1.5 * errs["x86-64-v3"], errs
    monkeypatch.setattr(fwd, "fma", False)
    with pytest.raises(ValueError, match=r"fused multiply-add.*backend='sdpa' or 'tiled'"):
        qkv.attention(q, k, v, backend="native")
    spec = build_spec(q, k, v)
    assert native.unsupported(spec, q, False) is not None


@pytest.mark.parametrize("name", ["x86-64-v3", "x86-64-v2"])
def test_auto_and_the_sparse_backend_leave_narrow_builds_alone(built, monkeypatch, name):
    """auto's rules were measured on the AVX-512 build: on the same CPU kind (measured_cpu), a call the
    rule claims goes elsewhere when the kernels are narrow builds, and the sparse backend keeps the
    gathered engine."""
    q = torch.zeros(1, 8, 4096, 64, dtype=torch.bfloat16)
    k, v = torch.zeros_like(q), torch.zeros_like(q)
    spec = build_spec(q, k, v, causal=True)
    monkeypatch.setattr(native, "measured_cpu", lambda: True)
    monkeypatch.setattr(native, "zen5_cpu", lambda: False)  # the Zen 4 rule
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: True)
    bm = qkv.block_mask(masks.causal_sliding_window(256), None, None, 4096, 4096)
    sspec = sparse.sparse_spec(build_spec(q, k, v), bm)
    machine = native_flash.lib()
    if machine is not None and machine.vector_width == 16:  # the machine's own AVX-512 build: claimed
        assert native.auto(spec, q, False) and choose_backend(spec, q, False) == "native"
        assert sparse.native_pays(sspec, q, k, v, bm)
    _use(monkeypatch, built, name, as_if_fma=True)
    assert not native.auto(spec, q, False) and choose_backend(spec, q, False) != "native"
    assert not sparse.native_pays(sspec, q, k, v, bm)


def test_the_attention_benchmark_builds_for_a_target(tmp_path):
    """`benchmarks/attention.py --march TARGET` times the native backend on both kernels built for that
    target (each output checked by the rule first), names the build in its header, and refuses an
    unknown target with the compiler's message and a target without FMA by name, no traceback."""
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"
    run = subprocess.run([sys.executable, str(script), "--march", "x86-64-v3", "--backends", "native", "--backward",
                          "--lengths", "128", "--dtypes", "float32", "--repeats", "1", "--memory-lengths",
                          "--json", str(tmp_path / "a.json")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "native kernels: -march=x86-64-v3, 8-float vectors, FMA: yes, bfloat16 dot product: no" in run.stdout
    assert "| float32 | False | 128 |" in run.stdout and "outside the tolerance rule" not in run.stdout, run.stdout
    bad = subprocess.run([sys.executable, str(script), "--march", "no-such-cpu", "--lengths", "64"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0
    assert "--march no-such-cpu: the flash fwd kernel did not build" in bad.stderr and "Traceback" not in bad.stderr
    nofma = subprocess.run([sys.executable, str(script), "--march", "x86-64-v2", "--backends", "native", "--lengths",
                            "64"], capture_output=True, text=True, timeout=600)
    assert nofma.returncode != 0
    assert "no fused multiply-add (FMA)" in nofma.stderr and "Traceback" not in nofma.stderr, nofma.stderr


def test_the_kernel_ab_benchmark():
    """`benchmarks/kernels_ab.py` builds two revisions' FA-2 kernels (here the committed tree against itself
    with -DQKV_SC=32 on one side), checks both by the rule (the causal rows as a causal window of 16: a
    window check that saw the wrong keys would put them outside it) and prints one row per case; a
    revision that is not one exits naming it, without a traceback."""
    import shutil
    import sys

    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    script = root / "benchmarks" / "kernels_ab.py"
    run = subprocess.run([sys.executable, str(script), "--before", "HEAD", "--define-after", "QKV_SC=32",
                          "--lengths", "64", "--dtypes", "float32", "--repeats", "1", "--window", "16"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "before = HEAD, after = tree -DQKV_SC=32" in run.stdout, run.stdout
    assert "| float32 | 64 | no |" in run.stdout and "| float32 | 64 | window 16 |" in run.stdout, run.stdout
    assert "outside the tolerance rule" not in run.stdout, run.stdout
    bad = subprocess.run([sys.executable, str(script), "--before", "no-such-revision"], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "'no-such-revision' is not a revision" in bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr

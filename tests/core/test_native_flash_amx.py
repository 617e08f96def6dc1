"""The native FA-2 kernels' AMX tiles (csrc/qkv_amx.h): the forward's bfloat16 scores and P V
(flash_fwd_kernel.cpp's amx_scores and amx_values: tiles of 16 rows, 32 bfloat16 of the head, or 32 keys,
per step, the head padded to a multiple of 32, work-item rows to a multiple of 32, P V widened to whole
pairs of 16-key chunks), and the backward's five bfloat16 products (flash_bwd_kernel.cpp's gemm_amx: A
packed 32 rows at a time, transposed where P^T and dS^T are read, K padded to steps of 16 pairs).

Where the CPU has no AMX (every machine these tests were written on), the kernel is built with
-DQKV_AMX_EMULATE: the same tile walk on a software model of the five tile operations (TDPBF16PS as
the manual's pseudocode), made the native backend's kernels, and checked against the float64
reference by the tolerance rule on the native tests' own cases: head sizes 8 to 256 and odd ones
(padding inside a tile step), ragged lengths, GQA and multi-query (items of 5 to 64 rows: one or two
row tiles, the second part-filled), causal and windowed bands (chunk ranges of odd length, widened at
either end of the block), rows that see no key, BlockMasks' partial blocks, and the backward's
gradients on the backward tests' own cases (bands, BlockMasks, narrowed strips, d_lse). Each kernel
checks the tiles against plain loops once before it uses them; a model made to read the operands
otherwise shows that check catching it. A build where the CPU has AMX (-march=native
defines __AMX_BF16__) runs the processor's tiles in every native test of the suite; the last test here
makes sure it does. The real path's code is compiled here for a Sapphire Rapids target (not run).
"""

from __future__ import annotations

import platform
import subprocess
import zlib
from pathlib import Path

import pytest
import test_native_flash_bwd as bwd_tests
import test_native_flash_bwd_blocks as bwd_block_tests
import torch
from random_qkv import random_inputs
from test_native_flash import CASES, GRAD_CASES, WIDE_CASES
from test_native_flash_blocks import CASES as BLOCK_CASES
from test_native_flash_blocks import NARROW_CASES
from test_native_flash_blocks import _check as check_blocks
from test_native_flash_blocks import _inputs as block_inputs

import qkv
from native_checks import check_forward, check_large_logit_gradients
from qkv.bench.kernels import build_for
from qkv.core import _kernels
from qkv.core.engines import native_flash, native_flash_bwd
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule, grads

X86 = platform.machine().lower() in ("x86_64", "amd64")
pytestmark = [
    pytest.mark.skipif(not X86, reason="AMX is x86's"),
    pytest.mark.skipif(_kernels._compiler() is None or _kernels._turned_off(),
                       reason=f"no native kernel: {_kernels.status('flash_fwd_kernel')}"),
]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def _build(*defines):
    """(forward, backward) built -march=native with `defines`, typed."""
    return (native_flash.typed(build_for("flash_fwd_kernel", "native", defines=list(defines))),
            native_flash_bwd.typed(build_for("flash_bwd_kernel", "native", defines=list(defines))))


@pytest.fixture(scope="module")
def emulated():
    """(forward, backward) built -march=native -DQKV_AMX_EMULATE; skipped where the CPU has no
    AVX512-BF16 (the tiles replace the vdpbf16ps path, which such a build does not have)."""
    default = native_flash.lib()
    if default is None or not default.bf16_dot:
        pytest.skip("the AMX path replaces the AVX512-BF16 one, which this CPU's build does not have")
    return _build("QKV_AMX_EMULATE")


@pytest.fixture
def tiles(emulated, monkeypatch):
    """The emulated builds as the native backend's kernels; returns the forward."""
    monkeypatch.setattr(native_flash, "lib", lambda: emulated[0])
    monkeypatch.setattr(native_flash_bwd, "lib", lambda: emulated[1])
    return emulated[0]


def _default():
    """(forward, backward) of the build qkv makes here (-march=native, no tiles on this CPU)."""
    return (native_flash.typed(_kernels.load("flash_fwd_kernel")),
            native_flash_bwd.typed(_kernels.load("flash_bwd_kernel")))


def test_the_emulated_build_reports_its_tiles(emulated):
    fwd, bwd = emulated
    assert (fwd.amx, fwd.bf16_dot, fwd.vector_width, bwd.amx) == (1, True, 16, 1)


def _grads(q, k, v, up, **kw):
    """out, lse and the gradients of out . up through backend="native"."""
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = qkv.attention_with_lse(*xs, backend="native", **kw)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, xs, up))


def test_the_tiles_run(tiles):
    """The tiles, not the vdpbf16ps path, computed the emulated builds' bfloat16 results: the two sum in
    other orders (and other pairs), so lse's and each gradient's bits differ somewhere."""
    q, k, v, up = random_inputs(1, 4, 2, 130, 257, 64, 64, torch.bfloat16, seed=1, upstream=True)
    with_tiles = _grads(q, k, v, up, causal=True)
    fwd, bwd = _default()
    assert (fwd.amx, bwd.amx) == (0, 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native_flash, "lib", lambda: fwd)
        mp.setattr(native_flash_bwd, "lib", lambda: bwd)
        without = _grads(q, k, v, up, causal=True)
    for name, a, b in zip(("lse", "dq", "dk", "dv"), with_tiles[1:], without[1:]):
        assert not torch.equal(a, b), f"{name}: the same bits as the vdpbf16ps path"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_out_and_lse_follow_the_reference(tiles, case):
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
    q, k, v = random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=zlib.crc32(repr(case).encode()))
    check_forward(q, k, v, f"amx {case}", causal=causal, window=window)


# Head sizes inside a tile step (D, Dv): 1, 3 and 33 pad the head to 32 or 64 bfloat16; 255 and 250 to 256;
# Dv of 17 and 250 leave a single 16-column tile last. Rows: 12 grouped heads (items of 60 rows: two row
# tiles, the second of 28), 3 (a part-filled first tile of 15 or 48 rows), and one position.
ODD_CASES = [
    (1, 12, 1, 37, 300, 1, 17, False, None),
    (1, 3, 1, 5, 140, 3, 250, True, None),
    (2, 6, 2, 65, 65, 33, 40, False, (20, 3)),
    (1, 4, 4, 1, 129, 255, 250, False, None),
    (1, 2, 1, 100, 260, 96, 48, True, (None, 7)),
]


@pytest.mark.parametrize("case", ODD_CASES + [(1, 4, 2, 197, 300, *w) for w in WIDE_CASES],
                         ids=lambda c: "-".join(map(str, c)))
def test_head_sizes_and_rows_inside_a_tile(tiles, case):
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
    q, k, v = random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=zlib.crc32(repr(case).encode()))
    check_forward(q, k, v, f"amx {case}", causal=causal, window=window)


@pytest.mark.parametrize("case", BLOCK_CASES[:4] + NARROW_CASES[:6] + NARROW_CASES[-3:],
                         ids=lambda c: f"{getattr(c[0], '__name__', 'mask')}-{c[3:11]}-{c[11]}")
def test_block_lists_follow_the_reference(tiles, case):
    fn, mB, mH, B, Hq, Hkv, Lq, Lk, D, Dv, bq, band = case
    bm = qkv.block_mask(fn, mB, mH, Lq, Lk, block_size=(bq, 128))
    q, k, v = block_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=zlib.crc32(repr(case[1:]).encode()))
    check_blocks(q, k, v, bm, f"amx blocks {case[1:]}", **band)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradients_follow_the_reference(tiles, case):
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
    q, k, v = random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=11)
    up = torch.randn(B, Hq, Lq, Dv, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    kw = dict(causal=causal, window=window)
    ins = {w: [(t.double() if w == "exact" else t.clone()).requires_grad_() for t in (q, k, v)]
           for w in ("exact", "plain", "fast")}
    outs = {w: qkv.attention(*xs, backend="native" if w == "fast" else "reference", **kw) for w, xs in ins.items()}
    what = f"amx grad {case}"
    assert_within_rule(outs["fast"], outs["plain"], outs["exact"], factor=FWD_FACTOR, what=what + " out")
    gs = {w: grads(outs[w], ins[w], up.double() if w == "exact" else up) for w in ins}
    for name, g, gp, ge in zip("qkv", gs["fast"], gs["plain"], gs["exact"]):
        assert g.dtype == torch.bfloat16
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"{what} d{name}")


@pytest.mark.parametrize("case", list(bwd_tests.CASES))
def test_backward_follows_the_reference(tiles, case):
    """The backward tests' cases (GQA, bands, rows that see no key, head sizes 3 to 256, one key):
    gemm_amx with K of 1 to 128 pairs, M and N not multiples of 32, transposed A."""
    B, Hq, Hkv, Lq, Lk, D, Dv, kw = bwd_tests.CASES[case]
    q, k, v, up = bwd_tests._inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=zlib.crc32(case.encode()) % 1000)
    bwd_tests._check(q, k, v, up, kw, f"amx {case}")


@pytest.mark.parametrize("case", list(bwd_block_tests.NARROW_CASES)[:5])
def test_backward_under_block_masks_and_d_lse(tiles, case):
    q, k, v, d_out, d_lse, kw, control = bwd_block_tests._narrow_case(case, torch.bfloat16)
    bwd_block_tests._check(q, k, v, d_out, d_lse, kw, f"amx narrow {case}", control=control)


def test_float32_never_takes_the_tiles(tiles):
    """float32 runs its own tiles in the emulated builds too: bit for bit the default builds'."""
    q, k, v, up = random_inputs(1, 4, 2, 130, 257, 64, 64, torch.float32, seed=2, upstream=True)
    with_tiles = _grads(q, k, v, up, causal=True)
    fwd, bwd = _default()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native_flash, "lib", lambda: fwd)
        mp.setattr(native_flash_bwd, "lib", lambda: bwd)
        without = _grads(q, k, v, up, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(with_tiles, without))


def test_the_processors_tiles_compile(tmp_path):
    """The real path (the intrinsics, LDTILECFG's operand, the permission call) compiles for a Sapphire
    Rapids target, and the build says it has the processor's tiles (QKV_EXPECT_AMX stops the build
    otherwise). Compiled only: this CPU may not run it."""
    cxx = _kernels._compiler()
    src = Path(_kernels.__file__).with_name("csrc") / "flash_fwd_kernel.cpp"
    probe = subprocess.run([cxx, "-march=sapphirerapids", "-E", "-x", "c++", "/dev/null"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{cxx} does not know -march=sapphirerapids")
    run = subprocess.run([cxx, "-O2", "-march=sapphirerapids", "-std=c++17", "-shared", "-fPIC", "-pthread",
                          "-DQKV_EXPECT_AMX=2", "-o", str(tmp_path / "amx.so"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    off = subprocess.run([cxx, "-O2", "-march=sapphirerapids", "-std=c++17", "-shared", "-fPIC", "-pthread",
                          "-DQKV_NO_AMX", "-DQKV_EXPECT_AMX=2", "-o", str(tmp_path / "off.so"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert off.returncode != 0 and "QKV_EXPECT_AMX" in off.stderr, "QKV_NO_AMX must leave the tiles out"


@pytest.mark.skipif(not {"amx_tile", "amx_bf16", "avx512_bf16"} <= _cpu_flags(), reason="this CPU has no AMX-BF16")
def test_a_cpu_with_amx_runs_its_tiles():
    """On a CPU with AMX-BF16 the kernel qkv builds (-march=native) runs bfloat16 on the tiles, so the
    native tests above this one's module check the processor's tiles; -1 names Linux's refusal."""
    kernel = native_flash.lib()
    assert kernel is not None and kernel.amx in (2, -1)
    if kernel.amx == -1:
        pytest.skip("Linux refused this process the AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)")
    q, k, v = random_inputs(1, 4, 2, 130, 257, 64, 64, torch.bfloat16, seed=3)
    check_forward(q, k, v, "the processor's tiles", causal=True)


def test_tiles_unlike_the_model_are_caught_and_not_used(tiles):
    """Each kernel's self-check (amx_self_check, once per library) compares the tiles with plain loops before
    it uses them: builds whose tiles read B's pairs swapped (-DQKV_AMX_EMULATE_WRONG, as a processor unlike
    the model would) say so (-2), warn by name, and give the vdpbf16ps path's results, bit for bit."""
    with pytest.warns(RuntimeWarning, match="self-check") as caught:
        fwd, bwd = _build("QKV_AMX_EMULATE", "QKV_AMX_EMULATE_WRONG")
    assert (fwd.amx, bwd.amx) == (-2, -2)
    assert {str(w.message).split("; ")[1].split(" runs")[0] for w in caught} == \
        {"the native bfloat16 forward", "the native bfloat16 backward"}
    q, k, v, up = random_inputs(1, 4, 2, 130, 257, 64, 64, torch.bfloat16, seed=4, upstream=True)
    results = []
    for pair in ((fwd, bwd), _default()):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native_flash, "lib", lambda pair=pair: pair[0])
            mp.setattr(native_flash_bwd, "lib", lambda pair=pair: pair[1])
            results.append(_grads(q, k, v, up, causal=True))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_large_logits_dv_is_exact_where_p_is_one(tiles):
    """The backward recomputes the forward's scores on the same tiles (zero, then the same steps of 16
    pairs): at scale 1000 one key's P is 1 exactly, so dv is dO bit for bit."""
    check_large_logit_gradients(torch.bfloat16, "amx bfloat16")

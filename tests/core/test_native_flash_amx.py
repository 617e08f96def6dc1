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
defines __AMX_BF16__) runs the processor's tiles in every native test of the suite;
test_a_cpu_with_amx_runs_its_tiles makes sure it does. The processor's path itself is compiled for a
Sapphire Rapids target, and run on tiles emulated in asm behind stand-ins for GCC's AMX headers
(tests/core/amx_fake: the intrinsics' asm constraints as GCC's, so the optimizer treats the code as it
would for real tiles; test_the_real_path_on_stand_in_tiles).
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
import zlib
from functools import partial
from pathlib import Path

import pytest
import test_native_flash_bwd as bwd_tests
import test_native_flash_bwd_blocks as bwd_block_tests
import torch
from random_qkv import random_inputs
from test_native_flash import CASES, GRAD_CASES, LAYOUT_DIMS, WIDE_CASES, check_layouts_give_the_same_bits
from test_native_flash import test_the_kernel_reports_the_extremes_it_reads as check_extremes
from test_native_flash_blocks import CASES as BLOCK_CASES
from test_native_flash_blocks import NARROW_CASES
from test_native_flash_blocks import _check as check_blocks
from test_native_flash_blocks import _inputs as block_inputs

import qkv
from native_checks import check_forward, check_gradients, check_large_logit_gradients
from qkv.bench.kernels import build_for
from qkv.core import _kernels
from qkv.core.engines import native_flash, native_flash_bwd
from qkv.core.spec import build_spec
from qkv.testing import FWD_FACTOR, assert_within_rule

X86 = platform.machine().lower() in ("x86_64", "amd64")
pytestmark = [
    pytest.mark.skipif(not X86, reason="AMX is x86's"),
    pytest.mark.skipif(_kernels._compiler() is None or _kernels._turned_off(),
                       reason=f"no native kernel: {_kernels.status('flash_fwd_kernel')}"),
]


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


@pytest.fixture(scope="module")
def dot(emulated):
    """(forward, backward) built -march=native -DQKV_NO_AMX: the vdpbf16ps path, whatever the CPU (on a
    CPU with AMX the build qkv makes runs the tiles)."""
    return _build("QKV_NO_AMX")


def _with(pair, fn):
    """fn() with the (forward, backward) pair as the native backend's kernels."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native_flash, "lib", lambda: pair[0])
        mp.setattr(native_flash_bwd, "lib", lambda: pair[1])
        return fn()


def test_the_emulated_build_reports_its_tiles(emulated):
    fwd, bwd = emulated
    assert (fwd.amx, fwd.bf16_dot, fwd.vector_width, bwd.amx) == (1, True, 16, 1)


def _grads(q, k, v, up, **kw):
    """out, lse and the gradients of out . up through backend="native"."""
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = qkv.attention_with_lse(*xs, backend="native", **kw)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, xs, up))


def test_the_tiles_run(tiles, dot):
    """The tiles, not the vdpbf16ps path, computed the emulated builds' bfloat16 results: the two sum in
    other orders (and other pairs), so lse's and each gradient's bits differ somewhere."""
    q, k, v, up = random_inputs(1, 4, 2, 130, 257, 64, 64, torch.bfloat16, seed=1, upstream=True)
    with_tiles = _grads(q, k, v, up, causal=True)
    assert (dot[0].amx, dot[1].amx) == (0, 0)
    without = _with(dot, lambda: _grads(q, k, v, up, causal=True))
    for name, a, b in zip(("lse", "dq", "dk", "dv"), with_tiles[1:], without[1:]):
        assert not torch.equal(a, b), f"{name}: the same bits as the vdpbf16ps path"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_out_and_lse_follow_the_reference(tiles, case):
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
    q, k, v = random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=zlib.crc32(repr(case).encode()))
    check_forward(q, k, v, f"amx {case}", causal=causal, window=window)


# Head sizes inside a tile step (D, Dv): 1, 3 and 33 pad the head to 32 or 64 bfloat16; 255 and 250 to 256;
# Dv of 17 and 250 leave a single 16-column tile last. Rows: 12 grouped heads (items of 60 rows: two row
# tiles, the second of 28), 3 (a part-filled first tile of 15 or 48 rows), one position, and an item of 40 rows
# (a full group of 32, then one of 8).
ODD_CASES = [
    (1, 12, 1, 37, 300, 1, 17, False, None),
    (1, 3, 1, 5, 140, 3, 250, True, None),
    (2, 6, 2, 65, 65, 33, 40, False, (20, 3)),
    (1, 4, 4, 1, 129, 255, 250, False, None),
    (1, 2, 1, 100, 260, 96, 48, True, (None, 7)),
    (1, 8, 4, 84, 200, 64, 64, False, None),  # a last item of 40 rows: a second row group of 8
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
    check_gradients(case, torch.bfloat16, f"amx grad {case}", seed=11)


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


def test_float32_never_takes_the_tiles(tiles, dot):
    """float32 runs its own tiles in the emulated builds too: bit for bit the builds' without AMX."""
    q, k, v, up = random_inputs(1, 4, 2, 130, 257, 64, 64, torch.float32, seed=2, upstream=True)
    with_tiles = _grads(q, k, v, up, causal=True)
    without = _with(dot, lambda: _grads(q, k, v, up, causal=True))
    assert all(torch.equal(a, b) for a, b in zip(with_tiles, without))


@pytest.mark.parametrize("level", ["-O3", "-Os"])
@pytest.mark.parametrize("kernel", ["flash_fwd_kernel", "flash_bwd_kernel"])
def test_the_processors_tiles_compile(tmp_path, kernel, level):
    """The real path (the intrinsics, LDTILECFG's operand, the permission call) compiles for a Sapphire
    Rapids target, and the build says it has the processor's tiles (QKV_EXPECT_AMX stops the build
    otherwise); QKV_NO_AMX leaves them out. Compiled only here (test_the_real_path_on_stand_in_tiles runs it)."""
    cxx = _kernels._compiler()
    src = Path(_kernels.__file__).with_name("csrc") / f"{kernel}.cpp"
    probe = subprocess.run([cxx, "-march=sapphirerapids", "-E", "-x", "c++", "/dev/null"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{cxx} does not know -march=sapphirerapids")
    flags = [level, "-march=sapphirerapids", "-std=c++17", "-shared", "-fPIC", "-pthread", "-DQKV_EXPECT_AMX=2"]
    run = subprocess.run([cxx, *flags, "-o", str(tmp_path / "amx.so"), str(src)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    off = subprocess.run([cxx, *flags, "-DQKV_NO_AMX", "-o", str(tmp_path / "off.so"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert off.returncode != 0 and "QKV_EXPECT_AMX" in off.stderr, "QKV_NO_AMX must leave the tiles out"


def _native_defines() -> set[str]:
    """The macros -march=native defines for this compiler and CPU."""
    run = subprocess.run([_kernels._compiler(), "-march=native", "-dM", "-E", "-x", "c++", "/dev/null"],
                         capture_output=True, text=True)
    return {line.split()[1] for line in run.stdout.splitlines() if line.startswith("#define ")}


@pytest.mark.skipif(not {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(_kernels._cpuinfo()[1]),
                    reason="this CPU has no AMX-BF16")
def test_a_cpu_with_amx_runs_its_tiles():
    """On a CPU with AMX-BF16 the kernels qkv builds (-march=native) run bfloat16 on the tiles, so the
    suite's native bfloat16 tests check the processor's tiles; -1 names Linux's refusal (a skip), -2 (the
    tiles failed the self-check) fails."""
    if not {"__AMX_TILE__", "__AMX_BF16__"} <= _native_defines():
        pytest.skip(f"{_kernels._compiler()} -march=native does not target AMX here (GCC 11 or later does)")
    fwd, bwd = native_flash.lib(), native_flash_bwd.lib()
    assert fwd is not None and bwd is not None
    assert fwd.amx in (2, -1) and bwd.amx in (2, -1), (fwd.amx, bwd.amx)
    if -1 in (fwd.amx, bwd.amx):
        pytest.skip("Linux refused this process the AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)")
    q, k, v = random_inputs(1, 4, 2, 130, 257, 64, 64, torch.bfloat16, seed=3)
    check_forward(q, k, v, "the processor's tiles", causal=True)
    B, Hq, Hkv, Lq, Lk, D, Dv, kw = bwd_tests.CASES["gqa8/2-causal-longer-k"]
    q, k, v, up = bwd_tests._inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=5)
    bwd_tests._check(q, k, v, up, kw, "the processor's tiles, backward")


def test_tiles_unlike_the_model_are_caught_and_not_used(tiles, dot):
    """Each kernel's self-check (amx_self_check, once per library) compares the tiles with plain loops before
    it uses them: builds whose tiles read B's pairs swapped (-DQKV_AMX_EMULATE_WRONG, as a processor unlike
    the model would) say so (-2), warn by name, and give the vdpbf16ps path's results, bit for bit."""
    with pytest.warns(RuntimeWarning, match="self-check") as caught:
        fwd, bwd = _build("QKV_AMX_EMULATE", "QKV_AMX_EMULATE_WRONG")
    assert (fwd.amx, bwd.amx) == (-2, -2)
    assert {str(w.message).split("; ")[1].split(" runs")[0] for w in caught} == \
        {"the native bfloat16 forward", "the native bfloat16 backward"}
    q, k, v, up = random_inputs(1, 4, 2, 130, 257, 64, 64, torch.bfloat16, seed=4, upstream=True)
    results = [_with(pair, lambda: _grads(q, k, v, up, causal=True)) for pair in ((fwd, bwd), dot)]
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_large_logits_dv_is_exact_where_p_is_one(tiles):
    """The backward recomputes the forward's scores on the same tiles (zero, then the same steps of 16
    pairs): at scale 1000 one key's P is 1 exactly, so dv is dO bit for bit."""
    check_large_logit_gradients(torch.bfloat16, "amx bfloat16")


@pytest.fixture(scope="module")
def whole_blocks(emulated):
    """The emulated backward built with QKV_BWD_NARROW=0 (every partial block computed whole)."""
    return native_flash_bwd.typed(build_for("flash_bwd_kernel", "native",
                                            defines=["QKV_AMX_EMULATE", "QKV_BWD_NARROW=0"]))


@pytest.mark.parametrize("case", list(bwd_block_tests.NARROW_CASES))
def test_narrowed_blocks_are_the_whole_blocks_bits(tiles, whole_blocks, case, monkeypatch):
    """On the tiles too, narrowing leaves out only exact zeros: the narrowed strips and chunks start their
    steps of 16 pairs where a whole block's do, so dq, dk, dv are the whole blocks' bits (steps from the
    strip's own first pair grouped the sums otherwise: 7 of these 8 cases differed, a review found)."""
    bwd_block_tests.assert_narrowed_is_whole(case, torch.bfloat16, whole_blocks, monkeypatch)


def test_forward_bits_do_not_depend_on_the_thread_count(tiles):
    """P V's steps of 32 keys start at the block's first chunk, not at an item's: how the rows are cut into
    items (which follows the thread count) does not regroup the sums (it did in 1 of 60 draws, a review
    found)."""
    old = torch.get_num_threads()
    try:
        for seed, (Lq, kw) in enumerate([(300, {"causal": True}), (257, {"window": (37, 0)}),
                                         (200, {"window": (20, 45)}), (130, {})]):
            q, k, v = random_inputs(1, 6, 2, Lq, Lq, 64, 48, torch.bfloat16, seed=seed)
            runs = []
            for threads in (1, 8):
                torch.set_num_threads(threads)
                runs.append(qkv.attention_with_lse(q, k, v, backend="native", **kw))
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), (Lq, kw)
    finally:
        torch.set_num_threads(old)


# Keys over several spans of four 128-key blocks (flash_fwd_kernel.cpp's amx_span): 1100 keys are three
# spans, the last cut short at nine blocks; a causal window of 300 starts mid-span; a window of (100, 50)
# leaves rows that saw keys in one span nothing in the next (the items' keys reach it, their own do not);
# a query block past the keys' start (Lq < Lk, causal) begins in the second span.
SPAN_CASES = [
    (1, 2, 2, 1100, 1100, 64, 64, True, None),
    (1, 4, 2, 1100, 1100, 64, 64, True, (300, 0)),
    (1, 2, 1, 1100, 1100, 64, 32, False, (100, 50)),
    (1, 2, 2, 300, 1100, 64, 64, True, None),
    (1, 2, 2, 700, 1100, 16, 16, False, None),
]


@pytest.mark.parametrize("case", SPAN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_spans_of_key_blocks(tiles, case):
    """The forward over several spans against the reference, its bits the same at 1 and 8 threads (items
    of other rows), and the gradients through it (the lse the backward reads) by the tolerance rule."""
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
    q, k, v = random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=zlib.crc32(repr(case).encode()))
    check_forward(q, k, v, f"amx spans {case}", causal=causal, window=window)
    kw = {"causal": causal, "window": window}
    old = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 8):
            torch.set_num_threads(threads)
            runs.append(qkv.attention_with_lse(q, k, v, backend="native", **kw))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), case
    check_gradients(case, torch.bfloat16, f"amx span grad {case}", seed=3)


# Scores that rise or fall along the keys, for amx_span's step against a row's frame (its max so far). A
# rise of 100 per span of 512 keys (215 over the keys) passes the frame by more than the standing step
# allows (P at most 8, a max about 2.08 above the frame) in every span after a row's first, so each such
# step takes a new one: all 2400 without a band; causal 1286 of 1376, as a row that sees only the first few
# keys of its last span may stand there. (Without, P passes e^88 and overflows float32: a build that never
# leaves the frame fails the rise of 100.) At a rise of 10 most steps take one too (1419 of 2400 without a
# band), and the rest keep theirs; a rise of 1 keeps it in most steps (2363 of 2400, P above 1 against it); a fall of 30
# keeps it with P far below 1. Added to random scores of about unit size.
RAMP_SLOPES = [100.0, 10.0, 1.0, -30.0]


def _ramp_inputs(slope: float, causal: bool):
    """(case, (q, k, v)): 2 heads, 600 queries, 1100 keys (three spans), D=64, bfloat16, scores plus
    slope * j / 512 at key j (query dimension 0 set to 8, key dimension 0 to slope * j / 512: the scale
    is 1/8)."""
    case = (1, 2, 2, 600, 1100, 64, 64, causal, None)
    q, k, v = random_inputs(*case[:7], torch.bfloat16, seed=zlib.crc32(repr((slope, causal)).encode()))
    q[..., 0] = 8.0
    k[..., 0] = (slope * torch.arange(1100) / 512).to(torch.bfloat16)
    return case, (q, k, v)


@pytest.fixture(params=["model", "processor"])
def span_tiles(request, emulated, monkeypatch):
    """The tile model (the emulated builds), or the processor's tiles (the kernels qkv builds) where they run."""
    if request.param == "processor":
        fwd, bwd = native_flash.lib(), native_flash_bwd.lib()
        if fwd is None or bwd is None or (fwd.amx, bwd.amx) != (2, 2):
            pytest.skip("this CPU's kernels do not run AMX tiles")
    else:
        fwd, bwd = emulated
    monkeypatch.setattr(native_flash, "lib", lambda: fwd)
    monkeypatch.setattr(native_flash_bwd, "lib", lambda: bwd)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("slope", RAMP_SLOPES)
def test_rising_and_falling_scores_across_spans(span_tiles, slope, causal):
    """out and lse against the reference where rows take a new reference span after span, keep one with P
    above 1, or keep one far above their scores; the same bits at 1 and 8 threads; dk and dv (the backward
    reads this lse), and dq where the rise is 1 or a fall. Not dq at rises of 10 and 100: with keys sharing
    a large component (up to 215 here) the bfloat16 backward's dq misses the rule, with FA-2's step in the
    forward too (1.15x and 1.43x the bound at 10, 16x and 24x at 100; with this forward 1.18x and 2.33x at
    10, the same at 100). dq = scale dS K cancels that component (the sum of a row's dS is 0), and each
    bfloat16 rounding in the backward leaves a part of it: in a float64 model of the backward at a rise of
    10, D_i = rowsum(dO * O) from O rounded to bfloat16 (as FlashAttention-2 forms it) gives dq 0.021
    off, dS rounded to bfloat16 for its product with K 0.019, P rounded 0.022, against a bound of 0.024
    (the plain reference computes in float32 and rounds once). A D_i from O's low part as well (tried)
    took the kernel's error from 0.052 to 0.044 only; dS in two bfloat16 parts would double dq's product.
    """
    case, (q, k, v) = _ramp_inputs(slope, causal)
    check_forward(q, k, v, f"ramp {slope} causal={causal}", causal=causal)
    old = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 8):
            torch.set_num_threads(threads)
            runs.append(qkv.attention_with_lse(q, k, v, backend="native", causal=causal))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), (slope, causal)
    check_gradients(case, torch.bfloat16, f"ramp {slope} causal={causal} grad", seed=3, inputs=(q, k, v),
                    names="qkv" if slope in (1.0, -30.0) else "kv")


_STAND_IN = Path(__file__).with_name("amx_fake")  # GCC 12's AMX headers with the instructions emulated in asm


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory, emulated):
    """level -> (forward, backward): the processor's path (QKV_AMX 2) built -march=native -mamx-tile
    -mamx-bf16 against tests/core/amx_fake's stand-in headers (-DQKV_AMX_FAKE_TILES), at -O3 (as qkv
    builds) and -Os; GCC only (the stand-ins replace GCC's header names)."""
    cxx = _kernels._compiler()
    if "__clang__" in _native_defines() or "__GNUC__" not in _native_defines():
        pytest.skip(f"{cxx} is not GCC: the stand-in headers replace GCC's")
    folder = tmp_path_factory.mktemp("amx_stand_in")
    src = Path(_kernels.__file__).with_name("csrc")
    libs = {}
    for level in ("-O3", "-Os"):
        pair = []
        for kernel in ("flash_fwd_kernel", "flash_bwd_kernel"):
            so = folder / f"{kernel}{level}.so"
            run = subprocess.run([cxx, level, "-march=native", "-mamx-tile", "-mamx-bf16", "-mprefer-vector-width=512",
                                  f"-I{_STAND_IN}", "-DQKV_AMX_FAKE_TILES", "-DQKV_EXPECT_AMX=2", "-std=c++17",
                                  "-shared", "-fPIC", "-pthread", "-fopenmp", "-Wno-psabi", "-o", str(so),
                                  str(src / f"{kernel}.cpp")], capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, f"{kernel} {level}: {run.stderr[-3000:]}"
            pair.append(ctypes.CDLL(str(so)))
        for lib in pair:
            lib.qkv_fake_count.restype = ctypes.c_ulong
        libs[level] = (native_flash.typed(pair[0]), native_flash_bwd.typed(pair[1]))
    return libs


@pytest.mark.parametrize("level", ["-O3", "-Os"])
def test_the_real_path_on_stand_in_tiles(stand_in, level):
    """The processor's path itself, as GCC compiles it (the intrinsics' asm constraints as in GCC 12's
    headers), on tiles emulated in asm, one thread (the stand-ins' tiles are global): the self-checks pass
    (2), every LDTILECFG gets the right 64 bytes (a local configuration's stores past byte 8 were dropped at
    -Os: a review's finding, fixed by a constant), and forward, backward and BlockMask results follow the
    reference. Any tile operation without a configuration, or with a wrong one, is a SIGILL."""
    fwd, bwd = stand_in[level]
    assert (fwd.amx, bwd.amx) == (2, 2)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native_flash, "lib", lambda: fwd)
            mp.setattr(native_flash_bwd, "lib", lambda: bwd)
            for case in CASES[:4] + ODD_CASES[-2:]:
                B, Hq, Hkv, Lq, Lk, D, Dv, causal, window = case
                q, k, v = random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=zlib.crc32(repr(case).encode()))
                check_forward(q, k, v, f"stand-in {level} {case}", causal=causal, window=window)
            for case in ("gqa8/2-causal-longer-k", "d3-dv5", "d256-dv200"):
                B, Hq, Hkv, Lq, Lk, D, Dv, kw = bwd_tests.CASES[case]
                q, k, v, up = bwd_tests._inputs(B, Hq, Hkv, Lq, Lk, D, Dv, torch.bfloat16, seed=6)
                bwd_tests._check(q, k, v, up, kw, f"stand-in {level} {case}")
            q, k, v, d_out, d_lse, kw, control = bwd_block_tests._narrow_case("window37-mask-bq64", torch.bfloat16)
            bwd_block_tests._check(q, k, v, d_out, d_lse, kw, f"stand-in {level} narrow", control=control)
    finally:
        torch.set_num_threads(old)
    for lib in (fwd, bwd):
        assert lib.qkv_fake_count(0) > 0 and lib.qkv_fake_count(1) == 0  # configurations: made, and none wrong


@pytest.mark.parametrize("dims", LAYOUT_DIMS, ids=lambda d: f"D{d[0]}-Dv{d[1]}")
def test_key_and_value_layouts_on_the_tiles(span_tiles, dims):
    """The AMX builds pack keys and values as the others do (whole blocks by 16 x 16 transposes where the
    rows allow, else word by word): the same bits across layouts on the tile model and the processor's tiles."""
    check_layouts_give_the_same_bits(*dims)


@pytest.fixture(scope="module")
def unscaled_pair(emulated):
    """{"model": (fwd, bwd) of the tile model, "processor": the processor's (or None)} built with
    -DQKV_AMX_NO_PRESCALE: S's raw scores times the scale as read, the queries packed as given."""
    pairs = {"model": _build("QKV_AMX_EMULATE", "QKV_AMX_NO_PRESCALE")}
    fwd, bwd = native_flash.lib(), native_flash_bwd.lib()
    pairs["processor"] = _build("QKV_AMX_NO_PRESCALE") if (fwd.amx, bwd.amx) == (2, 2) else None
    return pairs


@pytest.mark.parametrize("where", ["model", "processor"])
@pytest.mark.parametrize("D, scale", [(64, None), (16, None), (64, 1.0), (64, 0.25), (32, 2.0 ** -8), (64, 0.3)],
                         ids=["D64", "D16", "D64-scale1", "D64-scale0.25", "D32-scale2^-8", "D64-scale0.3"])
def test_prescaled_queries_give_the_raw_scores_bits(emulated, unscaled_pair, where, D, scale):
    """On AMX spans a power-of-two scale from 2^-8 to 1 is applied to the queries as they are packed, not in
    the softmax pass's multiply-add (flash_fwd_kernel.cpp's prescaled and cx): out and lse bit for bit those of
    a build that scales in the pass (-DQKV_AMX_NO_PRESCALE), no band and causal, on the tile model and the
    processor's tiles; a scale that is not a power of two (0.3) takes the same path in both."""
    pair = emulated if where == "model" else (native_flash.lib(), native_flash_bwd.lib())
    other = unscaled_pair[where]
    if other is None:
        pytest.skip("this CPU's kernels do not run AMX tiles")
    q, k, v = random_inputs(1, 4, 2, 300, 700, D, D, torch.bfloat16, seed=D)
    for causal in (False, True):
        run = partial(qkv.attention_with_lse, q, k, v, causal=causal, scale=scale, backend="native")
        a, b = _with(pair, run), _with(other, run)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (where, D, scale, causal)
    _with(pair, lambda: check_forward(q, k, v, f"prescaled {where} D={D} scale={scale}", causal=True, scale=scale))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_nan_score_is_left_out_of_its_row(span_tiles, causal):
    """A score that is NaN in float32 (q . k of two products that overflow to +inf and -inf) gets P = 0 and
    stays out of the row's max on AMX spans, as on the other paths: in a row's first span (its max pass) and
    in a later one (the standing pass finds the NaN among P's words and runs FA-2's step again, clamped).
    The kernel is called without qkv's non-finite guard (which recomputes such inputs in float64); the rest
    of each row against the float64 reference with that key masked, by the tolerance rule."""
    B, H, Lq, Lk, D = 1, 1, 600, 1100, 64
    q, k, v = random_inputs(B, H, H, Lq, Lk, D, D, torch.bfloat16, seed=29)
    # spans 0, and 2 or 1; each key in lane 3 of its chunk of 16, the lane GCC's reduction of the max across
    # the vector would let a NaN through from (a max pass that let NaN into its vector fails here)
    rows_keys = [(590, 35), (595, 1027)] if not causal else [(590, 35), (595, 515)]
    q[..., :2] = 0.0
    k[..., :2] = 0.0
    for r, j in rows_keys:  # each such row's q times each such key: NaN
        q[0, 0, r, :2] = 3.0e38  # times the scale (1/8) and +-100: +inf and -inf in float32, NaN summed
        k[0, 0, j, :2] = torch.tensor([100.0, -100.0])
    spec = build_spec(q, k, v, causal=causal)
    out, lse = native_flash.forward(q, k, v, spec)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed, diagonal=Lk - Lq)
    for r, _ in rows_keys:
        for _, j in rows_keys:
            allowed[r, j] = False
    mask = allowed[None, None]
    exact, exact_lse = qkv.attention_with_lse(q.double(), k.double(), v.double(), mask=mask, backend="reference")
    plain, plain_lse = qkv.attention_with_lse(q, k, v, mask=mask, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_within_rule(out, plain, exact, factor=FWD_FACTOR, what=f"NaN score causal={causal} out")
    assert_within_rule(lse, plain_lse, exact_lse, factor=FWD_FACTOR, what=f"NaN score causal={causal} lse")


@pytest.mark.parametrize("scale", [3.0, 0.5], ids=["scale3", "scale0.5-prescaled"])
def test_the_lse_ends_at_the_top_score_the_backward_scales(span_tiles, scale):
    """amx_span keeps a row's frame as its top score times cx, rounded; its lse puts back the top score scaled
    as the backward scales it (float32(s * scale)) and that rounding, so a row with one key (P = 1) gets
    lse_lo, the part of the lse a float32 lse leaves out, of about the polynomial's error, not the rounding
    of the scaled score (up to half an ulp of the lse: 1.2e-4 at the logits here), so the backward's P there
    is within about 1e-7 of 1. Both the raw scores times the scale (3: aee075d's frames failed it with
    lse_lo 1.2e-4) and the queries packed times it (0.5: those frames passed it, as the power of two left
    nothing to round)."""
    B, H, Lq, D = 1, 4, 40, 64
    q, k, v = random_inputs(B, H, H, Lq, 1, D, D, torch.bfloat16, seed=31)
    q[..., 0], k[..., 0] = 64.0, 32.0 / scale  # logits about 2048
    spec = build_spec(q, k, v, scale=scale)
    _, lse, lo = native_flash.forward_for_backward(q, k, v, spec)
    assert float(lse.abs().min()) > 1024.0  # an ulp of 1.2e-4 or more
    assert float(lo.abs().max()) < 2e-6, float(lo.abs().max())


@pytest.mark.parametrize("value", [1000.0, float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("D,Dv,Lk", [(64, 64, 256), (128, 128, 300)], ids=str)
def test_the_spans_report_the_extremes_they_read(span_tiles, D, Dv, Lk, where, value):
    """On AMX spans the queries are packed times a power-of-two scale (D=64: 1/8) or as they are (D=128), 16 at
    a time; their extremes, and the keys' and values', are taken as they are read, as on the other paths."""
    check_extremes(torch.bfloat16, D, Dv, Lk, where, value)

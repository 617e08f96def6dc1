"""The native forward kernel (csrc/flash_fwd_kernel.cpp) on a BlockMask's block lists
(engines/native_blocks.py): out and lse of `native_flash.forward` against the float64 reference
under the tolerance rule (qkv.testing) on fresh random inputs, float32 and bfloat16; masks that
are the same for every (b, h) and masks that vary per batch row and query head (tiles of Bm = B,
Hm = Hq) under GQA (grouped heads as rows of one work item) and multi-query; query blocks of 64,
96, 100, 128 and 256 (other than the kernel's own items); a causal or window band on top;
Lq != Lk; rows that see no key (out 0, lse -inf); partial blocks narrowed per work item to the keys
its rows have bits for (odd windows, edges mid-chunk and at a chunk's first or last key, blocks
zero for some items, heads of one item seeing different keys); key blocks that are not listed are
never read (NaN there changes nothing); the portable (non-AVX-512) build; refusals by name."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

import qkv
from native_checks import assert_out_and_lse
from qkv import masks
from qkv.core import _kernels
from qkv.core.engines import native_blocks, native_flash
from qkv.core.spec import build_spec

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _kernel():
    if native_flash.lib() is None and (_kernels._compiler() is None or _kernels._turned_off()):
        pytest.skip(f"the native flash kernel is unavailable here: {_kernels.status('flash_fwd_kernel')}")


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)]


def _per_batch_and_head(b, h, q, k):
    """Differs per batch row and head: a band of width 50 (b + 1) (h + 1) under causal, and rows
    q % 9 == 4 of head 1 see nothing."""
    return (k <= q) & ((q - k) < 50 * (b + 1) * (h + 1)) & ~((h == 1) & (q % 9 == 4))


def _strided(b, h, q, k):
    """Every third key, and rows q % 5 == 0 see nothing: partial tiles everywhere, empty rows."""
    return (k % 3 == q % 3) & (q % 5 != 0)


def _check(q, k, v, bm, what, forward=None, **kw):
    """The kernel (native_flash.forward on the spec) vs the same-dtype and float64 references."""
    spec = build_spec(q, k, v, mask=bm, **kw)
    assert native_flash.why_not(q, k, v, spec) is None
    fast, fast_lse = (forward or native_flash.forward)(q, k, v, spec)
    exact, exact_lse = qkv.attention_with_lse(q.double(), k.double(), v.double(), mask=bm, backend="reference", **kw)
    plain, plain_lse = qkv.attention_with_lse(q, k, v, mask=bm, backend="reference", **kw)
    assert fast.dtype == q.dtype
    assert_out_and_lse(fast, fast_lse, plain, plain_lse, exact, exact_lse, what)
    return fast, fast_lse


# (mask function, mask B, mask H, B, Hq, Hkv, Lq, Lk, D, Dv, block_q, band keywords)
CASES = [
    (masks.causal_sliding_window(256), 1, 1, 1, 4, 4, 700, 700, 64, 64, 128, {}),
    (masks.document([300, 201, 199], causal=True), 1, 1, 2, 4, 2, 700, 700, 40, 24, 64, {}),
    (masks.longformer(100, 16), 1, 1, 1, 8, 2, 600, 600, 64, 64, 96, {}),
    (_per_batch_and_head, 2, 4, 2, 4, 2, 520, 520, 64, 48, 100, {}),  # Bm = B, Hm = Hq, GQA
    (_per_batch_and_head, 1, 4, 1, 4, 1, 300, 650, 16, 16, 256, {}),  # multi-query, Lq < Lk
    (_strided, 1, 1, 1, 2, 2, 333, 200, 128, 128, 64, {"causal": True}),  # band on top, Lq > Lk
    (masks.causal_sliding_window(300), 1, 1, 1, 4, 2, 640, 640, 64, 64, 128, {"window": (200, 0)}),
    (_strided, 1, 1, 1, 2, 1, 130, 390, 256, 200, 128, {"window": (None, 150)}),
    (_per_batch_and_head, 2, 4, 2, 4, 2, 520, 520, 129, 96, 100, {}),  # D > 64: scores in pieces of 64
    (masks.document([300, 201, 199], causal=True), 1, 1, 1, 4, 2, 700, 700, 200, 136, 64, {}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{getattr(c[0], '__name__', 'mask')}-{c[3:11]}-{c[11]}")
def test_block_lists_follow_the_reference(case, dtype):
    fn, mB, mH, B, Hq, Hkv, Lq, Lk, D, Dv, bq, band = case
    bm = qkv.block_mask(fn, mB, mH, Lq, Lk, block_size=(bq, 128))
    lists = native_blocks.block_lists(bm)
    assert lists.nnz < lists.nq * lists.nk or fn is _strided  # most cases leave blocks out
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=zlib.crc32(repr(case[1:]).encode()))
    _check(q, k, v, bm, f"blocks {case[1:]} {dtype}", **band)


def _off_diagonal(b, h, q, k):
    """Keys q - 81 .. q - 47: both edges move with the row, and for items of a multiple of 16 rows the
    item's first key is the last of a chunk of 16 and its last key the first of one; rows q < 47 see
    nothing."""
    return (k >= q - 81) & (k <= q - 47)


def _some_items(b, h, q, k):
    """Rows q % 128 < 40 see keys k % 256 >= 200 (bits from mid-chunk to the block's end); every row sees
    itself except q % 7 == 3 (those of them past row 40 of their block see nothing). With query blocks of
    128 the key blocks of the first kind are partial for the whole query block but zero for its items
    past row 40, which skip them."""
    return ((q % 128 < 40) & (k % 256 >= 200)) | ((k == q) & (q % 7 != 3))


def _per_head_window(b, h, q, k):
    """A causal window per batch row and head (23 + 61 h + 17 b keys): the grouped heads of one work item
    see different keys, so a block's keys are those of the widest; rows q % 11 == 5 of head 2 see nothing."""
    return (k <= q) & (q - k < 23 + 61 * h + 17 * b) & ~((h == 2) & (q % 11 == 5))


def _two_sided(b, h, q, k):
    """|q - k| <= 45: with causal=True on top, a causal window of 46."""
    return (q - k <= 45) & (k - q <= 45)


# Narrow partial blocks: the kernel computes, per work item, only the 16-key chunks of a partial block
# that some row of the item has a bit in (a block with none is skipped), and P V over exactly the keys
# from the first such bit to the last. (mask function, mask B, mask H, B, Hq, Hkv, Lq, Lk, D, Dv,
# block_q, band keywords)
NARROW_CASES = [
    (masks.causal_sliding_window(37), 1, 1, 1, 4, 4, 600, 600, 64, 64, 128, {}),
    (masks.causal_sliding_window(200), 1, 1, 1, 4, 2, 700, 700, 64, 64, 96, {}),  # GQA
    (masks.causal_sliding_window(37), 1, 1, 1, 8, 1, 500, 500, 32, 32, 64, {}),  # multi-query: 8 heads a row
    (_off_diagonal, 1, 1, 1, 2, 2, 640, 640, 40, 24, 128, {}),
    (_off_diagonal, 1, 1, 1, 4, 2, 450, 700, 64, 64, 64, {}),  # Lq < Lk
    (_off_diagonal, 1, 1, 1, 2, 2, 500, 500, 64, 64, 100, {}),  # items of 25 rows: edges at every offset
    (_some_items, 1, 1, 1, 2, 1, 700, 700, 64, 64, 128, {}),
    (_some_items, 1, 1, 2, 4, 2, 520, 520, 16, 16, 96, {}),
    (_per_head_window, 2, 4, 2, 4, 2, 600, 600, 64, 48, 128, {}),  # Bm = B, Hm = Hq, GQA
    (_per_head_window, 1, 4, 1, 4, 1, 400, 400, 64, 64, 64, {}),  # Hm = Hq, multi-query
    (_two_sided, 1, 1, 1, 4, 2, 600, 600, 64, 64, 96, {"causal": True}),  # the band on top
    (masks.causal_sliding_window(200), 1, 1, 1, 2, 2, 640, 640, 64, 64, 128, {"window": (37, 0)}),
    (_off_diagonal, 1, 1, 1, 2, 1, 500, 500, 48, 48, 128, {"window": (60, 10)}),
    (_off_diagonal, 1, 1, 1, 4, 2, 450, 700, 128, 128, 64, {}),  # D > 64
    (masks.causal_sliding_window(200), 1, 1, 1, 2, 2, 640, 640, 96, 160, 128, {"window": (37, 0)}),
    (_per_head_window, 2, 4, 2, 4, 2, 600, 600, 256, 65, 128, {}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NARROW_CASES,
                         ids=lambda c: f"{getattr(c[0], '__name__', 'mask')}-{c[3:11]}-{c[11]}")
def test_narrow_partial_blocks_follow_the_reference(case, dtype):
    fn, mB, mH, B, Hq, Hkv, Lq, Lk, D, Dv, bq, band = case
    bm = qkv.block_mask(fn, mB, mH, Lq, Lk, block_size=(bq, 128))
    lists = native_blocks.block_lists(bm)
    assert lists.ntiles > 0, "the case needs partial blocks"
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=zlib.crc32(repr(case[1:]).encode()))
    _check(q, k, v, bm, f"narrow {case[1:]} {dtype}", **band)


def test_some_items_skip_a_listed_block():
    """_some_items really has what its test is for: a partial block whose bits are zero for some
    32-row pieces of its query block and not for others, and rows that see no key."""
    bm = qkv.block_mask(_some_items, 1, 1, 700, 700, block_size=(128, 128))
    lists = native_blocks.block_lists(bm)
    allowed = native_blocks.dense(lists, 1, 1, 700, 700)[0, 0]
    pieces = allowed[:640, 128:256].reshape(5, 4, 32, 128).any(-1).any(-1)  # key block 1: (query block, piece)
    assert pieces[2].tolist() == [True, True, False, False]
    assert not allowed.any(-1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blocks_not_listed_are_never_read(dtype):
    """NaN in every key and value of the key blocks the lists leave out: nothing changes."""
    Lq = Lk = 1024
    bm = qkv.block_mask(masks.causal_sliding_window(200), 1, 1, Lq, Lk)
    q, k, v = _inputs(1, 4, 2, Lq, Lk, 64, 64, dtype, seed=7)
    lists = native_blocks.block_lists(bm)
    listed = torch.zeros(lists.nq, lists.nk, dtype=torch.bool)
    for i in range(lists.nq):
        listed[i, lists.q_kb[int(lists.q_ptr[i]):int(lists.q_ptr[i + 1])].long()] = True
    spec = build_spec(q, k, v, mask=bm)
    clean, clean_lse = native_flash.forward(q, k, v, spec)
    assert (~listed).any(), "the test needs blocks left out"
    # Per query block: unlisted blocks poisoned, listed ones clean; each row's result unchanged.
    for i in range(lists.nq):
        kp, vp = k.clone(), v.clone()
        for j in (~listed[i]).nonzero().flatten().tolist():
            kp[:, :, j * 128:(j + 1) * 128] = float("nan")
            vp[:, :, j * 128:(j + 1) * 128] = float("nan")
        out, lse = native_flash.forward(q, kp, vp, build_spec(q, kp, vp, mask=bm))
        rows = slice(i * 128, i * 128 + 128)
        assert torch.equal(out[:, :, rows], clean[:, :, rows]) and torch.equal(lse[:, :, rows], clean_lse[:, :, rows])


def test_threads_do_not_change_the_result():
    bm = qkv.block_mask(_per_batch_and_head, 2, 4, 400, 400, block_size=(96, 128))
    q, k, v = _inputs(2, 4, 2, 400, 400, 64, 64, torch.float32, seed=3)
    spec = build_spec(q, k, v, mask=bm)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_flash.forward(q, k, v, spec)
        torch.set_num_threads(2)
        two = native_flash.forward(q, k, v, spec)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_every_row_empty_and_no_block_listed():
    bm = qkv.block_mask(lambda b, h, q, k: q < 0, 1, 1, 200, 300)
    assert native_blocks.block_lists(bm).nnz == 0
    q, k, v = _inputs(1, 2, 1, 200, 300, 16, 8, torch.float32, seed=4)
    out, lse = native_flash.forward(q, k, v, build_spec(q, k, v, mask=bm))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_refusals_name_the_fix():
    q, k, v = _inputs(1, 2, 2, 256, 256, 16, 16, torch.float32, seed=1)
    bm = qkv.block_mask(masks.causal(), 1, 1, 256, 256, block_size=64)
    spec = build_spec(q, k, v, mask=bm)
    assert "block_size=128" in native_flash.why_not(q, k, v, spec)
    with pytest.raises(ValueError, match="native flash kernel cannot take a BlockMask with key blocks of 64"):
        native_flash.forward(q, k, v, spec)
    spec = build_spec(q, k, v, mask=torch.ones(256, 256, dtype=torch.bool))
    assert "mask" in native_flash.why_not(q, k, v, spec)


def test_kernel_refuses_lists_that_do_not_fit():
    """Return code 4 (key blocks other than 128, counts that do not match the lengths)."""
    kernel = native_flash.lib()
    q, k, v = _inputs(1, 1, 1, 256, 256, 16, 16, torch.float32, seed=2)
    lists = native_blocks.block_lists(qkv.block_mask(masks.causal(), 1, 1, 256, 256))
    out, lse = torch.empty(1, 1, 256, 16), torch.empty(1, 1, 256)
    st = (ctypes.c_int64 * 4)(*q.stride())

    def call(struct):
        return kernel.qkv_flash_fwd(0, 1, 1, 1, 256, 256, 16, 16, q.data_ptr(), st, k.data_ptr(), st, v.data_ptr(),
                                    st, 0.25, -1, -1, 0, out.data_ptr(), lse.data_ptr(), 1, ctypes.byref(struct),
                                    None, None)

    assert call(lists.struct()) == 0
    bad = lists.struct()
    bad.bk = 64
    assert call(bad) == 4
    bad = lists.struct()
    bad.nq = 3
    assert call(bad) == 4
    bad = lists.struct()
    bad.Hm = 2
    assert call(bad) == 4


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 build flags")
def test_portable_build_without_avx512(tmp_path):
    """The same source built for a CPU without AVX-512 (x86-64-v3: AVX2, no bfloat16 dot product,
    no OpenMP: std::thread) gives the same results within the rule, bands and block lists."""
    cxx = _kernels._compiler()
    assert cxx is not None
    so = tmp_path / "portable.so"
    src = Path(_kernels.__file__).with_name("csrc") / "flash_fwd_kernel.cpp"
    run = subprocess.run([cxx, "-O2", "-march=x86-64-v3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wno-psabi",
                          "-o", str(so), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    portable = native_flash.typed(ctypes.CDLL(str(so)))
    assert not portable.bf16_dot

    def forward(q, k, v, spec):
        original = native_flash.lib
        native_flash.lib = lambda: portable
        try:
            return native_flash.forward(q, k, v, spec)
        finally:
            native_flash.lib = original

    for dtype in DTYPES:
        bm = qkv.block_mask(_per_batch_and_head, 2, 4, 300, 330, block_size=(100, 128))
        q, k, v = _inputs(2, 4, 2, 300, 330, 40, 24, dtype, seed=5)
        _check(q, k, v, bm, f"portable blocks {dtype}", forward=forward)
        _check(q, k, v, None, f"portable causal {dtype}", forward=forward, causal=True)
        _check(q, k, v, None, f"portable window {dtype}", forward=forward, window=(70, 0))

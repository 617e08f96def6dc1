"""Block masks on the native kernels through the backends: `backend="native"` with a BlockMask or a
mask function, and `backend="sparse"` (and `auto`), which run their blocks and bands on the native
kernels on the CPU kind the rule was measured on and on the gathered engine elsewhere. Every result
against the float64 reference by the tolerance rule, gradients included."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import masks as M
from qkv.core import _kernels
from qkv.core.api import choose_backend
from qkv.core.backend import sparse
from qkv.core.engines import gathered, native_flash
from qkv.core.spec import build_spec
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule, grads

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _kernel():
    if native_flash.lib() is None:
        pytest.skip(f"the native kernel is unavailable: {_kernels.status('flash_fwd_kernel')}")


def _per_head(b, h, q, k):
    return (k <= q) & ((q - k) % (3 + h + b) != 1)


# (name, mask function, B, Hq, Hkv, Lq, Lk, D): 128-key blocks, ragged ends, GQA, per-head tiles.
CASES = [
    ("window", M.causal_sliding_window(100), 1, 4, 2, 300, 300, 32),
    ("documents", M.document([90, 0, 131, 79], causal=True), 1, 4, 4, 300, 300, 16),
    ("longformer", M.longformer(40, [0, 200]), 2, 2, 1, 257, 257, 64),
    ("per-head", _per_head, 2, 4, 2, 200, 330, 40),
]


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), (B, Hq, Lq, D))
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _against_reference(q, k, v, up, mask, backend, what):
    """out and (dq, dk, dv) of `backend` against the plain reference and float64, by the rule."""
    results = {}
    for name, dt, be in (("fast", q.dtype, backend), ("plain", q.dtype, "reference"),
                         ("exact", torch.float64, "reference")):
        xs = [t.to(dt).detach().requires_grad_() for t in (q, k, v)]
        out = qkv.attention(*xs, mask=mask, backend=be)
        results[name] = (out, *grads(out, xs, up.to(dt)))
    for i, part in enumerate(("out", "dq", "dk", "dv")):
        assert_within_rule(results["fast"][i], results["plain"][i], results["exact"][i],
                           factor=FWD_FACTOR if i == 0 else GRAD_FACTOR, what=f"{what} {part}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_native_backend_runs_block_masks(case, dtype):
    name, fn, B, Hq, Hkv, Lq, Lk, D = case
    q, k, v, up = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype)
    bm = qkv.block_mask(fn, B if name in ("per-head", "longformer") else None, Hq if name == "per-head" else None,
                        Lq, Lk)
    _against_reference(q, k, v, up, bm, "native", f"native {name} BlockMask")
    _against_reference(q, k, v, up, fn, "native", f"native {name} mask function")


# What the sparse backend's rule sends to the kernel: self-attention, one kv head per query head.
SPARSE_CASES = [
    ("window", M.causal_sliding_window(100), 1, 4, 4, 300, 300, 32),
    ("documents", M.document([90, 0, 131, 79], causal=True), 1, 4, 4, 300, 300, 16),
    ("longformer", M.longformer(40, [0, 200]), 2, 2, 2, 257, 257, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: c[0])
def test_sparse_backend_on_the_native_kernel(case, dtype, monkeypatch):
    name, fn, B, Hq, Hkv, Lq, Lk, D = case
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: True)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    ran = []
    run = native_flash.run
    monkeypatch.setattr(native_flash, "run", lambda *a, **kw: ran.append(1) or run(*a, **kw))
    q, k, v, up = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=1)
    bm = qkv.block_mask(fn, None, None, Lq, Lk)
    _against_reference(q, k, v, up, bm, "sparse", f"sparse {name}")
    assert ran, "the sparse backend should run a 128-key BlockMask on the native kernel on the CPU kind measured"


def test_sparse_backend_keeps_the_gathered_engine_elsewhere(monkeypatch):
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: False)
    monkeypatch.setattr(_kernels, "amx_cpu", lambda: False)
    monkeypatch.setattr(_kernels, "avx2_cpu", lambda: False)
    monkeypatch.setattr(native_flash, "run", lambda *a, **kw: pytest.fail("the native kernel ran off the measured CPU"))
    q, k, v, up = _inputs(1, 2, 2, 300, 300, 16, torch.float32)
    _against_reference(q, k, v, up, qkv.block_mask(M.causal_sliding_window(50), None, None, 300, 300), "sparse",
                       "sparse off the measured CPU")


def test_what_the_sparse_backend_leaves_to_the_gathered_engine(monkeypatch):
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: True)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    q, k, v, _ = _inputs(1, 2, 2, 256, 256, 16, torch.float32)
    small = qkv.block_mask(M.causal(), None, None, 256, 256, block_size=64)
    assert not sparse.native_pays(build_spec(q, k, v, mask=small), q, k, v, small)  # 64-key blocks
    bm = qkv.block_mask(M.causal(), None, None, 256, 256)
    assert sparse.native_pays(build_spec(q, k, v, mask=bm), q, k, v, bm)
    assert not sparse.native_pays(build_spec(q, k, v, mask=bm), q.double(), k.double(), v.double(), bm)
    wide = torch.randn(1, 2, 256, 128)  # D = Dv = 128: measured (the thirteenth part)
    assert sparse.native_pays(build_spec(wide, wide, wide, mask=bm), wide, wide, wide, bm)
    assert sparse.native_pays(build_spec(wide, wide[:, :1], wide[:, :1], mask=bm), wide, wide[:, :1], wide[:, :1], bm)
    band = build_spec(wide, wide, wide, causal=True, window=64)
    assert sparse.native_pays(band, wide.bfloat16(), wide.bfloat16(), wide.bfloat16(), None)
    odd = torch.randn(1, 2, 256, 96)
    assert not sparse.native_pays(build_spec(odd, odd, odd, mask=bm), odd, odd, odd, bm)  # D=96: not timed
    mixed = build_spec(q, q, wide, mask=bm)
    assert not sparse.native_pays(mixed, q, q, wide, bm)  # D=16, Dv=128: not timed
    huge = torch.randn(1, 2, 256, 256)
    assert not sparse.native_pays(build_spec(huge, huge, huge, mask=bm), huge, huge, huge, bm)  # D=256: not timed
    kv = torch.randn(1, 1, 256, 16)
    assert sparse.native_pays(build_spec(q, kv, kv, mask=bm), q, kv, kv, bm) == sparse.NATIVE_GQA  # grouped heads
    short = qkv.block_mask(M.causal(offset=128), None, None, 128, 256)
    assert not sparse.native_pays(build_spec(q[:, :, :128], k, v, mask=short), q[:, :, :128], k, v, short)  # Lq != Lk
    rows64 = qkv.block_mask(M.causal(), None, None, 256, 256, block_size=(64, 128))
    assert not sparse.native_pays(build_spec(q, k, v, mask=rows64), q, k, v, rows64)  # 64-row blocks: not measured
    scored = build_spec(q, k, v, mask=bm, score_mod=lambda s, b, h, i, j: s)
    assert not gathered.supports(scored) and not sparse.native_pays(scored, q, k, v, bm)


@pytest.mark.parametrize("backend, measured", [("native", True), ("sparse", True), ("sparse", False)],
                         ids=["native", "sparse-on-native", "sparse-gathered"])
def test_a_mask_function_that_tells_heads_apart_inside_shared_block_states(backend, measured, monkeypatch):
    """A FlexAttention BlockMask built with B=None, H=None shares its block states over heads, but its
    mask function decides per head inside the partial blocks: every engine follows it per head."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: measured)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    monkeypatch.setattr(_kernels, "amx_cpu", lambda: False)
    monkeypatch.setattr(_kernels, "avx2_cpu", lambda: False)

    def by_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx) % (h + 2) == 0)

    fbm = flex.create_block_mask(by_head, B=None, H=None, Q_LEN=256, KV_LEN=256, device="cpu", BLOCK_SIZE=128)
    q, k, v, up = _inputs(1, 4, 4, 256, 256, 32, torch.float32, seed=3)
    _against_reference(q, k, v, up, fbm, backend, f"{backend} per-head mask function")


def test_the_amx_kind_sends_bfloat16_and_training_to_the_kernel(monkeypatch):
    """The second CPU kind's rule (backend/sparse.py, above NATIVE_MAX_DIM: an Intel Xeon with AMX): bfloat16
    while the processor's tiles run, float32 when autograd records, not float32's forward alone (a causal
    window of 256 ran 0.79x-1.03x the gathered engine there); grouped heads too; head size 64 only."""
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: False)
    monkeypatch.setattr(_kernels, "amx_cpu", lambda: True)
    monkeypatch.setattr(_kernels, "avx2_cpu", lambda: False)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    bm = qkv.block_mask(M.causal_sliding_window(256), None, None, 1024, 1024)
    f32 = torch.randn(1, 2, 1024, 64)
    b16, grad = f32.bfloat16(), f32.clone().requires_grad_()

    def pays(q, kv=None):
        kv = q.detach() if kv is None else kv
        return sparse.native_pays(build_spec(q, kv, kv, mask=bm), q, kv, kv, bm)

    assert not pays(f32)
    assert pays(grad) and pays(grad, f32)
    for state in (2, 0, -1):  # the processor's tiles; none in the build; Linux refused them
        monkeypatch.setattr(native_flash.lib(), "amx", state)
        assert pays(b16) is (state == 2)
    monkeypatch.setattr(native_flash.lib(), "amx", 2)
    assert pays(b16, torch.randn(1, 1, 1024, 64).bfloat16())  # grouped heads
    small = torch.randn(1, 2, 1024, 32)
    assert not pays(small.bfloat16()) and not pays(small.requires_grad_())  # D=32: not measured there
    monkeypatch.setattr(_kernels, "amx_cpu", lambda: False)
    monkeypatch.setattr(_kernels, "avx2_cpu", lambda: False)
    assert not pays(grad) and not pays(b16)


def test_the_avx2_kind_sends_causal_bands_to_the_kernel(monkeypatch):
    """The third CPU kind's rule (backend/sparse.py: an AMD Zen 3 with AVX2 only): a causal band alone at
    head sizes 64 and 128 and a BlockMask of 128 x 128 blocks there, either dtype, forward or training,
    grouped heads too, where the kernels build AVX2's 8-float tiles with fused multiply-adds; other head
    sizes stay on the gathered engine."""
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: False)
    monkeypatch.setattr(_kernels, "avx2_cpu", lambda: True)
    kernel = native_flash.lib()
    monkeypatch.setattr(kernel, "vector_width", 8)
    monkeypatch.setattr(kernel, "fma", True)
    f32 = torch.randn(1, 2, 1024, 64)

    def pays(q, kv=None, bm=None, window=256):
        kv = q.detach() if kv is None else kv
        spec = build_spec(q, kv, kv, mask=bm) if bm is not None else build_spec(q, kv, kv, causal=True, window=window)
        return sparse.native_pays(spec, q, kv, kv, bm)

    assert pays(f32) and pays(f32.bfloat16()) and pays(f32.clone().requires_grad_())
    assert pays(f32, torch.randn(1, 1, 1024, 64))  # grouped heads
    assert not pays(torch.randn(1, 2, 1024, 32))  # D=32: not measured there
    wide = torch.randn(1, 2, 1024, 128)  # D=128: measured (the twelfth part)
    assert pays(wide) and pays(wide.bfloat16()) and pays(wide.clone().requires_grad_())
    assert pays(wide, torch.randn(1, 1, 1024, 128))  # grouped heads
    assert not pays(torch.randn(1, 2, 1024, 96))  # D=96: not measured there
    v128 = torch.randn(1, 2, 1024, 128)
    mixed = build_spec(f32, f32, v128, causal=True, window=256)
    assert not sparse.native_pays(mixed, f32, f32, v128, None)  # D=64, Dv=128: not measured there
    window = qkv.block_mask(M.causal_sliding_window(256), None, None, 1024, 1024)
    assert pays(f32, bm=window) and pays(f32.bfloat16(), bm=window)  # BlockMasks: the twelfth part
    assert pays(f32.clone().requires_grad_(), bm=window) and pays(f32, torch.randn(1, 1, 1024, 64), bm=window)
    assert pays(wide, bm=window) and pays(wide.bfloat16(), bm=window)  # and at 128
    assert not pays(torch.randn(1, 2, 1024, 96), bm=window)  # D=96: not timed there
    small_blocks = qkv.block_mask(M.causal_sliding_window(256), None, None, 1024, 1024, block_size=64)
    assert not pays(f32, bm=small_blocks)  # the kernels' block lists take 128 x 128 blocks only
    two_sided = build_spec(f32, f32, f32, window=256)
    assert not sparse.native_pays(two_sided, f32, f32, f32, None)
    monkeypatch.setattr(kernel, "vector_width", 16)  # not the build measured there
    assert not pays(f32)
    monkeypatch.setattr(kernel, "vector_width", 8)
    monkeypatch.setattr(_kernels, "avx2_cpu", lambda: False)
    monkeypatch.setattr(_kernels, "amx_cpu", lambda: False)
    assert not pays(f32)


def test_auto_sends_block_masks_and_narrow_bands_to_the_kernel(monkeypatch):
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: True)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    q = torch.randn(1, 2, 2048, 32)
    bm = qkv.block_mask(M.causal_sliding_window(256), None, None, 2048, 2048)
    spec = build_spec(q, q, q, mask=bm)
    assert choose_backend(spec, q, False) == "sparse" and sparse.native_pays(spec, q, q, q, bm)
    band = build_spec(q, q, q, causal=True, window=256)
    assert choose_backend(band, q, False) == "sparse" and sparse.native_pays(band, q, q, q, None)


def test_native_backend_refusals_name_the_fix():
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="not a tensor mask; use backend='tiled' or 'sdpa'"):
        qkv.attention(q, q, q, mask=torch.ones(1, 1, 64, 64, dtype=torch.bool), backend="native")
    with pytest.raises(ValueError, match=r"key blocks of 32 .*block_size=128.*or use backend='sparse'"):
        qkv.attention(q, q, q, mask=qkv.block_mask(M.causal(), None, None, 64, 64, block_size=32), backend="native")


def test_auto_claims_wide_causal_windows_on_the_measured_cpu(monkeypatch):
    """Causal windows wider than the sparse backend's quarter of the keys go to the native kernel (measured
    3.3x-9x faster than the SDPA-with-a-mask that auto chose before); windows open to the right do not."""
    from qkv.core.backend import native

    q = torch.zeros(1, 8, 2048, 64)
    wide = build_spec(q, q, q, causal=True, window=1024)
    narrow = build_spec(q, q, q, causal=True, window=256)
    both_sides = build_spec(q, q, q, window=(1024, 1024))
    monkeypatch.setattr(native, "measured_cpu", lambda: True)
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: True)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    assert native.auto(wide, q, False) and choose_backend(wide, q, False) == "native"
    assert choose_backend(narrow, q, False) == "sparse" and sparse.native_pays(narrow, q, q, q, None)
    assert not native.auto(both_sides, q, False)
    monkeypatch.setattr(native, "measured_cpu", lambda: False)
    monkeypatch.setattr(native, "amx_cpu", lambda: False)
    monkeypatch.setattr(_kernels, "avx2_cpu", lambda: False)
    assert choose_backend(wide, q, False) == "sdpa"


def test_tiles_are_shared_where_neither_states_nor_function_tell_heads_apart():
    """One tile per block, not one per batch row and head, for a mask that ignores them, whether a qkv
    pattern or FlexAttention's own mask built with B=None, H=None (read for a (2, 8) call)."""
    from qkv.core.engines import native_blocks as nb
    from qkv.core.flex_mask import from_flex

    bm = qkv.block_mask(M.causal_sliding_window(256), 4, 32, 4096, 4096)
    assert nb.block_lists(bm).tiles.shape[:2] == (1, 1)
    assert nb.tile_bytes(bm) == nb.block_lists(bm).tiles.numel()
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    fbm = flex.create_block_mask(lambda b, h, q, k: q >= k, B=None, H=None, Q_LEN=512, KV_LEN=512, device="cpu",
                                 BLOCK_SIZE=128)
    lists = nb.block_lists(from_flex(fbm, 2, 8, 512, 512))
    assert lists.tiles.shape[:2] == (1, 1) and lists.ntiles == 4


def test_windows_open_to_the_right_are_not_claimed(monkeypatch):
    from qkv.core.backend import native

    monkeypatch.setattr(native, "measured_cpu", lambda: True)
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: True)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    q = torch.zeros(1, 8, 2048, 64)
    for window in ((1024, None), (256, None), (1024, 1024)):
        spec = build_spec(q, q, q, window=window)
        assert not native.auto(spec, q, False), window
    two_sided = build_spec(q, q, q, window=256)
    assert not sparse.native_pays(two_sided, q, q, q, None)  # a two-sided band alone: not measured


def test_the_sparse_benchmark_forces_the_native_path(monkeypatch, capsys):
    """`benchmarks/sparse.py --force-native` runs the first CPU kind's rule with this machine's build (how the
    third kind's BlockMask rule was measured); without it a CPU of no kind measured runs the gathered engine."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse.py"
    loader = importlib.util.spec_from_file_location("sparse_benchmark", path)
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)
    for kind in ("measured_cpu", "amx_cpu", "avx2_cpu"):  # no kind measured (restored after the test)
        monkeypatch.setattr(_kernels, kind, lambda: False)
    monkeypatch.setattr(sparse, "_kernels_built", sparse._kernels_built)
    monkeypatch.setattr(sparse, "NATIVE_MAX_DIM", sparse.NATIVE_MAX_DIM)
    argv = ["--lengths", "1024", "--flex-at", "--bf16-at", "--sdpa-causal-at", "--sdpa-max", "0",
            "--sdpa-bwd-max", "0", "--reps", "1", "--patterns", "window"]
    bench.main(argv)
    out = capsys.readouterr().out
    assert "% | gathered |" in out and "% | native |" not in out, out
    bench.main([*argv, "--force-native"])
    out = capsys.readouterr().out
    assert "% | native |" in out and "--force-native: the first CPU kind's rule" in out, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_sparse_backend_on_the_kernel_checks_what_the_kernel_reads(dtype, monkeypatch):
    """On the native kernel the sparse backend is self-checking (the kernel takes the extremes of q, k and v as
    it reads them; core/finite.py sums q alone): a NaN key under a window BlockMask poisons exactly the rows
    that see it, leaving the others' bits as they were, and (float32) a key of float32's largest magnitude
    gives the float64 softmax where seen and the clean result elsewhere."""
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: True)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    L, W = 384, 64
    q, k, v = (torch.randn(1, 4, L, 32, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (1, 2, 3))
    bm = qkv.block_mask(M.causal_sliding_window(W), None, None, L, L)
    assert sparse.self_checking(build_spec(q, k, v, mask=bm), q, k, v)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None]
    sees = (j <= i) & (i - j <= W)  # the window's rows and keys (L, L)
    clean = qkv.attention(q, k, v, mask=bm, backend="sparse")
    k2 = k.clone()
    k2[0, 1, 200, 7] = float("nan")
    out = qkv.attention(q, k2, v, mask=bm, backend="sparse")
    want = torch.zeros(4, L, dtype=torch.bool)
    want[1] = sees[:, 200]
    assert torch.equal(torch.isnan(out[0]).all(-1), want) and torch.equal(torch.isnan(out[0]).any(-1), want)
    assert torch.equal(out[0][~want], clean[0][~want])
    if dtype == torch.float32:  # (bfloat16 rounds float32's largest to inf)
        k3 = k.clone()
        k3[0, 0, 300] = torch.finfo(torch.float32).max
        out = qkv.attention(q, k3, v, mask=bm, backend="sparse")
        exact = qkv.attention(q.double(), k3.double(), v.double(), mask=bm, backend="reference")
        assert torch.isfinite(out).all()
        assert float((out.double() - exact).abs().max()) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["native", "sparse"])
def test_a_query_that_sees_no_key_is_still_checked(backend, dtype, monkeypatch):
    """The guard scans nothing on the kernel (checks_queries: the kernel takes the extremes of every query row it
    loads), so a NaN query in a query block whose list is empty still poisons its row, and only it."""
    monkeypatch.setattr(_kernels, "measured_cpu", lambda: True)
    monkeypatch.setattr(native_flash.lib(), "vector_width", native_flash.MEASURED_WIDTH)  # the build measured
    L = 384
    q, k, v = (torch.randn(1, 2, L, 32, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (4, 5, 6))
    bm = qkv.block_mask(lambda b, h, i, j: (i < 128) | (i >= 256), None, None, L, L)  # query block 1 lists nothing
    q[0, 1, 200, 3] = float("nan")
    if backend == "sparse":  # on the kernel here, not the gathered engine (whose inputs the guard scans)
        assert sparse.self_checking(build_spec(q, k, v, mask=bm), q, k, v)
    out = qkv.attention(q, k, v, mask=bm, backend=backend)
    want = torch.zeros(2, L, dtype=torch.bool)
    want[1, 200] = True
    assert torch.equal(torch.isnan(out[0]).all(-1), want) and torch.equal(torch.isnan(out[0]).any(-1), want)

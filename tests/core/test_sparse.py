"""The sparse backend against the float64 reference (outputs and dq, dk, dv) by the tolerance
rule, against FlexAttention as a peer on forward outputs, and the count of blocks it visits."""

from __future__ import annotations

import warnings

import pytest
import torch

import qkv
from qkv import masks as M
from qkv.core import api
from qkv.core.backend import sparse
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule

# (B, Hq, Hkv, Lq, Lk, D): ragged lengths, Lq != Lk both ways, GQA and MQA
SHAPES = {
    "gqa-ragged": (2, 4, 2, 133, 133, 32),
    "mqa-short-q": (1, 4, 1, 70, 151, 16),
    "mha-short-k": (1, 2, 2, 151, 90, 16),
}
BLOCK = (32, 16)


def _patterns(Lq, Lk):
    off = Lk - Lq
    return {
        "causal": M.causal(offset=off),
        "window": M.sliding_window(20, offset=off),
        "causal-window": M.causal_sliding_window(24, offset=off),
        "dilated": M.dilated_sliding_window(6, 3),
        "strided": M.strided(16),
        "fixed": M.fixed(24, 3),
        "longformer": M.longformer(10, [0, 50]),
        "bigbird": M.bigbird(max(Lq, Lk), block=16, num_random_blocks=2, seed=7),
        "document-causal": M.document([40, 0, 23, 50], causal=True),
        "prefix-lm": M.prefix_lm(30),
        "window-or-global": M.or_masks(M.sliding_window(8), M.global_tokens(3)),
        "user-fn": lambda b, h, q, k: ((q + 2 * k + h) % 5 != 0) & (k <= q + 30),
    }


def _inputs(shape, dtype, seed=0):
    B, Hq, Hkv, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(*s, generator=g, dtype=torch.float64) for s in
          ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), (B, Hq, Lq, D))]
    return [t.to(dtype) for t in ts]


def _compare(shape, dtype, fast_kwargs, ref_kwargs, what, grads=True):
    """Sparse run vs plain same-dtype reference vs float64 reference; one shared upstream gradient."""
    q, k, v, up = _inputs(shape, dtype)
    runs = {}
    for name, xs, fn, kw in (
        ("fast", (q, k, v), lambda *a, **kw_: qkv.attention(*a, backend="sparse", **kw_), fast_kwargs),
        ("plain", (q, k, v), qkv.reference_attention, ref_kwargs),
        ("exact", tuple(t.double() for t in (q, k, v)), qkv.reference_attention, ref_kwargs),
    ):
        xs = [x.detach().clone().requires_grad_(grads) for x in xs]
        out = fn(*xs, **kw)
        g = torch.autograd.grad(out, xs, up.to(out.dtype)) if grads else ()
        runs[name] = (out, g)
    assert_within_rule(runs["fast"][0], runs["plain"][0], runs["exact"][0], factor=FWD_FACTOR, what=f"{what} out")
    for i, n in enumerate(("dq", "dk", "dv") if grads else ()):
        assert_within_rule(runs["fast"][1][i], runs["plain"][1][i], runs["exact"][1][i], factor=GRAD_FACTOR,
                           what=f"{what} {n}")


PATTERN_NAMES = sorted(_patterns(1, 1))


@pytest.mark.parametrize("pattern", PATTERN_NAMES)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_patterns_float32(pattern, shape):
    B, Hq, Hkv, Lq, Lk, D = SHAPES[shape]
    fn = _patterns(Lq, Lk)[pattern]
    bm = qkv.block_mask(fn, B, Hq, Lq, Lk, block_size=BLOCK)  # user-fn depends on h
    _compare(SHAPES[shape], torch.float32, {"mask": bm}, {"mask": fn}, f"{pattern}/{shape}")


@pytest.mark.parametrize("pattern", ["causal-window", "document-causal", "longformer", "user-fn"])
def test_patterns_bfloat16(pattern):
    shape = SHAPES["gqa-ragged"]
    fn = _patterns(shape[3], shape[4])[pattern]
    bm = qkv.block_mask(fn, shape[0], shape[1], shape[3], shape[4], block_size=BLOCK)
    _compare(shape, torch.bfloat16, {"mask": bm}, {"mask": fn}, f"{pattern}/bf16")


def test_mask_function_with_backend_sparse_builds_and_caches_block_mask():
    shape = SHAPES["gqa-ragged"]
    fn = M.sliding_window(12)
    _compare(shape, torch.float32, {"mask": fn}, {"mask": fn}, "mask_mod")
    spec = api.build_spec(*_inputs(shape, torch.float32)[:3], mask=fn)
    assert sparse.block_mask_for(spec) is sparse.block_mask_for(spec)


def test_layout_differs_per_batch_and_head():
    shape = (2, 4, 2, 100, 100, 16)
    fn = lambda b, h, q, k: (k <= q + 7 * h - 10) & ((b == 0) | (k >= q - 20))  # noqa: E731
    bm = qkv.block_mask(fn, 2, 4, 100, 100, block_size=16)
    assert bm.kv_num_blocks.shape[:2] == (2, 4)
    _compare(shape, torch.float32, {"mask": bm}, {"mask": fn}, "per-(b,h) layout")


_G = torch.Generator().manual_seed(2)
_TABLE = torch.randn(97, 113, generator=_G)  # (Lq, Lk) for the tensor-backed cases below

OTHER_ARGS = {
    "causal": {"causal": True},
    "window": {"window": (9, 4)},
    "alibi": {"score_mod": M.alibi(4)},
    "soft-cap": {"score_mod": M.soft_cap(0.5), "scale": 2.0},
    "relative-bias": {"score_mod": M.relative_position_bias(torch.randn(4, 9, generator=_G), 4)},
    # `mask=` takes one thing: a float mask rides along as a bias looked up by index
    "float-bias": {"score_mod": lambda s, b, h, q, k: s + _TABLE[q, k].to(s.dtype)},
}


@pytest.mark.parametrize("name", sorted(OTHER_ARGS))
def test_other_arguments_combine_with_block_mask(name):
    shape = (1, 4, 2, 97, 113, 16)
    fn = M.sliding_window(30, offset=16)
    bm = qkv.block_mask(fn, 1, 4, 97, 113, block_size=BLOCK)
    extra = OTHER_ARGS[name]
    _compare(shape, torch.float32, {"mask": bm, **extra}, {"mask": fn, **extra}, name)


def test_bool_tensor_mask_combined_through_and_masks():
    keep = _TABLE > -0.5  # (Lq, Lk), a bool mask indexed by the mask function
    fn = M.and_masks(M.sliding_window(30, offset=16), lambda b, h, q, k: keep[q, k])
    bm = qkv.block_mask(fn, 1, 1, 97, 113, block_size=BLOCK)
    _compare((1, 4, 2, 97, 113, 16), torch.float32, {"mask": bm}, {"mask": fn}, "bool table")


def test_lse_and_float64():
    shape = (1, 2, 2, 80, 80, 16)
    q, k, v, _ = _inputs(shape, torch.float64)
    fn = M.document([30, 50], causal=True)
    bm = qkv.block_mask(fn, 1, 1, 80, 80, block_size=16)
    out, lse = qkv.attention_with_lse(q, k, v, mask=bm, backend="sparse")
    ref, ref_lse = qkv.attention_with_lse(q, k, v, mask=fn, backend="reference")
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-6)


def test_empty_rows_give_zeros_and_finite_grads():
    fn = M.document([20, 20])  # rows 40.. see nothing
    bm = qkv.block_mask(fn, 1, 1, 64, 64, block_size=16)
    q, k, v, up = [t.requires_grad_() for t in _inputs((1, 2, 2, 64, 64, 8), torch.float32)]
    out, lse = qkv.attention_with_lse(q, k, v, mask=bm, backend="sparse")
    assert (out[:, :, 40:] == 0).all() and torch.isneginf(lse[:, :, 40:]).all()
    grads = torch.autograd.grad(out, (q, k, v), up.detach())
    assert all(torch.isfinite(g).all() for g in grads)


def test_dropout_runs_and_is_reproducible():
    q, k, v, _ = _inputs((1, 2, 2, 64, 64, 8), torch.float32)
    bm = qkv.block_mask(M.causal(), 1, 1, 64, 64, block_size=16)
    torch.manual_seed(5)
    a = qkv.attention(q, k, v, mask=bm, dropout_p=0.3, backend="sparse")
    torch.manual_seed(5)
    b = qkv.attention(q, k, v, mask=bm, dropout_p=0.3, backend="sparse")
    plain = qkv.attention(q, k, v, mask=bm, backend="sparse")
    assert torch.equal(a, b) and not torch.allclose(a, plain)


def test_auto_picks_sparse_for_block_masks_and_long_sparse_patterns():
    q, k, v, _ = _inputs((1, 2, 2, 64, 64, 8), torch.float32)
    bm = qkv.block_mask(M.causal(), 1, 1, 64, 64, block_size=16)
    assert api.choose_backend(api.build_spec(q, k, v, mask=bm), q, False) == "sparse"
    long_q = torch.zeros(1, 1, 2048, 8)
    spec = api.build_spec(long_q, long_q, long_q, mask=M.sliding_window(64))
    assert api.choose_backend(spec, long_q, False) == "sparse"
    short = api.build_spec(q, k, v, mask=M.sliding_window(4))
    assert api.choose_backend(short, q, False) != "sparse"


def test_sparse_without_a_mask_or_band_names_other_backends():
    q, k, v, _ = _inputs((1, 2, 2, 16, 16, 8), torch.float32)
    with pytest.raises(ValueError, match="backend='tiled'"):
        qkv.attention(q, k, v, backend="sparse")
    with pytest.raises(ValueError, match="backend='tiled'"):
        qkv.attention(q, k, v, mask=torch.ones(16, 16, dtype=torch.bool), causal=True, backend="sparse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("band", [{"causal": True, "window": 50}, {"window": (30, 7)}, {"causal": True}])
@pytest.mark.parametrize("shape", ["gqa-ragged", "mqa-short-q", "mha-short-k"])
def test_band_alone_runs_on_the_gathered_engine(band, shape, dtype):
    """causal/window without a mask: the gathered engine lays out the band by itself."""
    _compare(SHAPES[shape], dtype, band, band, f"band {band}")


def test_auto_sends_long_narrow_bands_to_the_gathered_engine():
    long_q = torch.zeros(1, 2, 2048, 8)
    pick = lambda **kw: api.choose_backend(api.build_spec(long_q, long_q, long_q, **kw), long_q, False)  # noqa: E731
    assert pick(causal=True, window=256) == "sparse"
    assert pick(window=(100, 100)) == "sparse"
    assert pick(causal=True) != "sparse"  # every earlier key: not narrow
    assert pick(causal=True, window=256, dropout_p=0.1) != "sparse"
    step = torch.zeros(1, 2, 1, 8)
    assert api.choose_backend(api.build_spec(step, long_q, long_q, causal=True, window=256), step, False) != "sparse"


def test_visits_only_non_empty_blocks():
    L = 512
    fn = M.sliding_window(32)
    bm = qkv.block_mask(fn, 1, 1, L, L, block_size=32)
    q, k, v, _ = _inputs((1, 2, 2, L, L, 8), torch.float32)
    spec = sparse.sparse_spec(api.build_spec(q, k, v, mask=bm), bm)
    plan = sparse.make_plan(spec, bm)
    visited = [(qb, j0, check) for qb, i0 in enumerate(range(0, L, 32))
               for j0, _, check in plan.kv_blocks(qb, i0, min(i0 + 32, L))]
    nq = L // 32
    # window 32 = one block: key blocks qb-1, qb, qb+1; the diagonal one full, its neighbours partial
    assert len(visited) == 3 * nq - 2 < nq * nq, f"visited {len(visited)} of {nq * nq} blocks"
    checked = sum(c for _, _, c in visited)
    assert checked == bm.counts()["partial"] == 2 * nq - 2, "the mask must be evaluated only in partial blocks"
    # the band of causal=True removes the upper blocks on top of the layout
    spec_c = sparse.sparse_spec(api.build_spec(q, k, v, mask=bm, causal=True), bm)
    plan_c = sparse.make_plan(spec_c, bm)
    n_c = sum(1 for qb, i0 in enumerate(range(0, L, 32)) for _ in plan_c.kv_blocks(qb, i0, i0 + 32))
    assert n_c == 2 * nq - 1


# ------------------------------------------------------------------ FlexAttention as a peer
flex = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("pattern", ["causal", "window", "document-causal", "prefix-lm", "longformer", "user-fn"])
def test_forward_matches_flex_attention(pattern):
    B, Hq, Hkv, L, D = 1, 4, 2, 200, 16
    fn = _patterns(L, L)[pattern]
    q, k, v, _ = _inputs((B, Hq, Hkv, L, L, D), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fbm = flex.create_block_mask(fn, B, Hq, L, L, device="cpu", _compile=False)
        ref = flex.flex_attention(q, k, v, block_mask=fbm, enable_gqa=True)
    ours = qkv.attention(q, k, v, mask=qkv.block_mask(fn, B, Hq, L, L, block_size=32), backend="sparse")
    err = (ours - ref).abs().max().item()
    assert err < 1e-5, f"{pattern}: differs from FlexAttention by {err:.2e}"


# ------------------------------------------------------------------ property tests
def _random_mask(kind: str, seed: int, L: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "band":
        lo = int(torch.randint(-30, 30, (1,), generator=g))
        width = int(torch.randint(0, 60, (1,), generator=g))
        return lambda b, h, q, k: (q - k >= lo) & (q - k <= lo + width)
    if kind == "blocks":
        cell = int(torch.randint(5, 40, (1,), generator=g))
        n = -(-L // cell)
        table = torch.rand(n, n, generator=g) < 0.3  # (n, n) random cells
        return lambda b, h, q, k: table[q // cell, k // cell]
    lengths = torch.randint(0, 50, (8,), generator=g).tolist()
    return M.document(lengths, causal=bool(seed % 2))


@pytest.mark.parametrize("kind", ["band", "blocks", "documents"])
@pytest.mark.parametrize("seed", range(4))
def test_random_masks_match_reference(kind, seed):
    g = torch.Generator().manual_seed(100 + seed)
    Lq = int(torch.randint(20, 160, (1,), generator=g))
    block = (int(torch.randint(4, 40, (1,), generator=g)), int(torch.randint(4, 40, (1,), generator=g)))
    fn = _random_mask(kind, seed, Lq)
    bm = qkv.block_mask(fn, 1, 1, Lq, Lq, block_size=block)
    _compare((1, 2, 1, Lq, Lq, 16), torch.float32, {"mask": bm}, {"mask": fn}, f"{kind}/{seed} L={Lq} block={block}")


def test_auto_leaves_patterns_that_need_element_evaluation():
    long_q = torch.zeros(1, 1, 2048, 8)
    user = M.or_masks(M.sliding_window(64), lambda b, h, q, k: (q * k) % 7 == 0)
    assert M.unknown_fraction(user, 1, 1, 2048, 2048) > 0.5
    assert api.choose_backend(api.build_spec(long_q, long_q, long_q, mask=user), long_q, False) != "sparse"
    assert M.unknown_fraction(M.sliding_window(64), 1, 1, 2048, 2048) == 0.0


# ------------------------------------------------------------------ the gathered-rows engine
from qkv.core.engines import gathered  # noqa: E402

ENGINE_CASES = {
    # name: (mask function of L, what the layout must contain)
    "window": (lambda L: M.causal_sliding_window(70), "strided"),
    "global+window": (lambda L: M.longformer(40, [0, 1, 2, 300]), "multi-run"),
    "documents": (lambda L: M.document([100, 37, 250, 213], causal=True), "by-heads"),
    "per-head": (lambda L: lambda b, h, q, k: (k <= q) & (k >= q - 30 - 20 * h), "strided"),
}


def _layout_kinds(fn, shape, block):
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v, _ = _inputs(shape, torch.float32)
    bm = qkv.block_mask(fn, B, Hq, Lq, Lk, block_size=block)
    spec = sparse.sparse_spec(api.build_spec(q, k, v, mask=bm), bm)
    assert gathered.supports(spec)
    lay = gathered.layout(spec, bm, q.device)
    return {
        "strided": any(not c.by_heads and c.n > 1 and c.runs[0][1] > 0 for c in lay.chunks),
        "multi-run": any(len(c.runs) > 1 and not c.by_heads for c in lay.chunks),
        "by-heads": any(c.by_heads for c in lay.chunks),
    }, bm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ENGINE_CASES))
def test_gathered_engine_paths_match_reference(name, dtype):
    """Each batching path of the engine (strided row groups, several key runs, one row group for
    all heads) is really taken, and gives the reference's outputs and gradients."""
    shape = (1, 4, 2, 600, 600, 16)
    make, kind = ENGINE_CASES[name]
    fn = make(600)
    kinds, bm = _layout_kinds(fn, shape, 32)
    assert kinds[kind], f"{name}: the layout has no {kind} chunk: {kinds}"
    _compare(shape, dtype, {"mask": bm}, {"mask": fn}, f"engine {name}")


def test_gathered_engine_lse_and_its_gradient():
    shape = (2, 4, 1, 300, 300, 16)
    fn = M.longformer(25, [0, 150])
    B, Hq, Hkv, L, _, D = shape
    bm = qkv.block_mask(fn, B, Hq, L, L, block_size=(64, 32))
    q, k, v, up = _inputs(shape, torch.float64)
    w = torch.randn(B, Hq, L, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    runs = []
    for kw in ({"mask": bm, "backend": "sparse"}, {"mask": fn, "backend": "reference"}):
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = qkv.attention_with_lse(*xs, **kw)
        loss = (out * up).sum() + (lse * w).sum()
        runs.append((out, lse, torch.autograd.grad(loss, xs)))
    (o1, l1, g1), (o2, l2, g2) = runs
    assert torch.allclose(o1, o2, atol=1e-12) and torch.allclose(l1, l2, atol=1e-12)
    for a, b, n in zip(g1, g2, "qkv"):
        assert torch.allclose(a, b, atol=1e-10), f"d{n} differs by {(a - b).abs().max():.2e}"


def test_gathered_engine_leaves_other_arguments_to_the_tiled_engine():
    q, k, v, _ = _inputs((1, 2, 2, 64, 64, 8), torch.float32)
    bm = qkv.block_mask(M.causal(), 1, 1, 64, 64, block_size=16)
    for extra, expect in (({}, True), ({"causal": True}, True), ({"score_mod": M.soft_cap(1.0)}, False),
                          ({"dropout_p": 0.1}, False)):
        spec = sparse.sparse_spec(api.build_spec(q, k, v, mask=bm, **extra), bm)
        assert gathered.supports(spec) is expect, extra


# ------------------------------------------------------------------ mask functions with state
@pytest.mark.parametrize("backend", ["sparse", "native", "auto"])
@pytest.mark.parametrize("combined", [False, True], ids=["plain", "and-causal"])
def test_a_mask_function_is_laid_out_again_on_each_call(backend, combined):
    """A plain mask function may read state that changes between calls: each call must see the state of
    its own time (the layout was cached by the function's identity, and the second call silently gave
    the first mask's result on native and sparse). The same inside a combination with a pattern."""
    if backend == "native":
        from qkv.core import _kernels
        from qkv.core.engines import native_flash

        if native_flash.lib() is None:
            pytest.skip(f"the native flash kernel is unavailable here: {_kernels.status('flash_fwd_kernel')}")
    q, k, v, _ = _inputs((1, 2, 2, 300, 300, 16), torch.float32)
    state = {"w": 400}

    def near(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= state["w"]

    fn = M.and_masks(near, M.causal()) if combined else near
    for w in (400, 3, 40):
        state["w"] = w
        want = qkv.attention(q, k, v, mask=fn, backend="reference")
        got = qkv.attention(q, k, v, mask=fn, backend=backend)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=f"{backend} w={w}")


def test_pure_patterns_keep_their_cached_layout():
    """qkv.masks patterns (and combinations of them alone) are laid out once and reused by identity."""
    q, k, v, _ = _inputs((1, 2, 2, 256, 256, 16), torch.float32)
    pure = M.and_masks(M.causal(), M.sliding_window(40))
    impure = M.and_masks(M.causal(), lambda b, h, q_idx, kv_idx: kv_idx % 2 == 0)
    assert pure.pure and not impure.pure

    def built(fn):
        return sparse.block_mask_for(api.build_spec(q, k, v, mask=fn))

    assert built(pure) is built(pure)
    assert built(impure) is not built(impure)


@pytest.mark.parametrize("backend", ["sparse", "native"])
def test_patterns_copy_the_tensors_they_are_given(backend):
    """A pure pattern's layout is cached by identity, so it must not read a tensor its caller can change:
    prefix_lm, position_set and block_table copy theirs (changing the caller's tensor in place gave the
    cached layout of the old values on sparse and native, and the new values on the reference)."""
    if backend == "native":
        from qkv.core import _kernels
        from qkv.core.engines import native_flash

        if native_flash.lib() is None:
            pytest.skip(f"the native flash kernel is unavailable here: {_kernels.status('flash_fwd_kernel')}")
    from qkv.masks import combinators as C

    q, k, v, _ = _inputs((1, 2, 2, 512, 512, 16), torch.float32)
    P = torch.tensor([10])
    lut = torch.zeros(512, dtype=torch.bool)
    lut[:3] = True
    table = torch.eye(4, dtype=torch.bool)
    made = [(M.prefix_lm(P), M.prefix_lm(torch.tensor([10]))),
            (M.or_masks(M.causal(), C.position_set(lut, "kv", "first3")),
             M.or_masks(M.causal(), C.position_set(lut.clone(), "kv", "first3"))),
            (C.block_table(table, 128, 128, "diag"), C.block_table(table.clone(), 128, 128, "diag"))]
    for fn, _ in made:
        assert fn.pure
        qkv.attention(q, k, v, mask=fn, backend=backend)  # laid out and cached
    P[0], lut[:] = 300, True
    table[:] = True
    for fn, same in made:
        want = qkv.attention(q, k, v, mask=same, backend="reference")
        for be in (backend, "reference"):
            torch.testing.assert_close(qkv.attention(q, k, v, mask=fn, backend=be), want, atol=2e-6, rtol=1e-5)

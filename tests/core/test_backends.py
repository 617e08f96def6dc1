"""Every backend against the float64 reference, outputs and gradients, by the tolerance rule.

The grid follows the Foundation issue: lengths 1, 97, 1023, 1025, Lq != Lk both ways,
head dims 32, 59, 64, 128, MHA/GQA/MQA, causal, windows, masks with fully masked rows,
and tiles forced small so that many blocks and ragged edges are exercised.
"""

from __future__ import annotations

import contextlib
import zlib
from functools import partial

import pytest
import torch

import qkv
from qkv.core.engines import flash
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule

# (B, Hq, Hkv, Lq, Lk, D, Dv)
SHAPES = {
    "tiny": (1, 2, 2, 1, 1, 32, 32),
    "mha97": (2, 4, 4, 97, 97, 59, 59),
    "gqa-short-q": (1, 4, 2, 113, 257, 64, 64),
    "mqa-short-k": (1, 4, 1, 257, 113, 128, 96),
    "gqa1023": (1, 4, 2, 1023, 1023, 32, 32),
    "mha1025": (1, 2, 2, 1025, 1025, 64, 64),
    "decode1025": (2, 8, 2, 1, 1025, 64, 64),
    "chunk16": (1, 4, 1, 16, 3000, 64, 64),
}


def _bool_mask_with_empty_rows(B, Hq, Lq, Lk, gen):
    m = torch.rand(B, Hq, Lq, Lk, generator=gen) > 0.3
    m[:, :, ::7] = False  # every seventh query row may attend to nothing
    return m


def _float_mask(B, Hq, Lq, Lk, gen):
    m = torch.randn(B, 1, Lq, Lk, generator=gen)
    m[torch.rand(B, 1, Lq, Lk, generator=gen) < 0.2] = float("-inf")
    return m


def _key_padding(B, Hq, Lq, Lk, gen):
    lengths = torch.randint(1, Lk + 1, (B,), generator=gen)
    return (torch.arange(Lk)[None, :] < lengths[:, None]).view(B, 1, 1, Lk)


def _alibi_like(score, b, h, q_idx, kv_idx):
    return score - 0.05 * (h + 1) * (q_idx - kv_idx).abs()


# name -> function (B, Hq, Lq, Lk, gen) -> keyword arguments
OPTIONS = {
    "dense": lambda *a: {},
    "causal": lambda *a: {"causal": True},
    "window": lambda *a: {"window": (7, 3)},
    "causal-window": lambda *a: {"causal": True, "window": 16},
    "bool-mask": lambda B, H, Lq, Lk, g: {"mask": _bool_mask_with_empty_rows(B, H, Lq, Lk, g)},
    "float-mask": lambda B, H, Lq, Lk, g: {"mask": _float_mask(B, H, Lq, Lk, g)},
    "key-padding-causal": lambda B, H, Lq, Lk, g: {"mask": _key_padding(B, H, Lq, Lk, g), "causal": True},
    "mask-mod": lambda *a: {"mask": lambda b, h, q, k: ((q + k + h) % 3 != 0) & (k <= q + 40)},
    "score-mod": lambda *a: {"score_mod": _alibi_like, "scale": 0.3},
}


def _inputs(shape, dtype, seed):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=gen, dtype=torch.float64)
    upstream = torch.randn(B, Hq, Lq, Dv, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, upstream)], gen


def _tiles(backend):
    if backend == "tiled-small":
        return flash.block_sizes(32, 64)
    if backend == "decode":  # small cache chunks, so that several are merged
        return _decode_chunks(256)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _decode_chunks(entries_per_row):
    from qkv.core.backend import decode

    old = decode._CHUNK_ENTRIES
    decode._CHUNK_ENTRIES = entries_per_row
    try:
        yield
    finally:
        decode._CHUNK_ENTRIES = old


def _run(backend, q, k, v, kw):
    name = "tiled" if backend.startswith("tiled") else backend
    with _tiles(backend):
        return qkv.attention(q, k, v, backend=name, **kw)


def _check(shape_name, option, backend, dtype, seed):
    shape = SHAPES[shape_name]
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    (q, k, v, up), gen = _inputs(shape, dtype, seed)
    kw = OPTIONS[option](B, Hq, Lq, Lk, gen)
    if backend == "sdpa" and "score_mod" in kw:
        pytest.skip("sdpa cannot apply score_mod (tested in test_errors)")
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    kw64 = {key: (val.double() if torch.is_tensor(val) and val.is_floating_point() else val) for key, val in kw.items()}
    exact = qkv.reference_attention(q64, k64, v64, **kw64)
    exact_grads = torch.autograd.grad(exact, (q64, k64, v64), up.double())

    qp, kp, vp = (t.clone().requires_grad_() for t in (q, k, v))
    plain = qkv.reference_attention(qp, kp, vp, **kw)
    plain_grads = torch.autograd.grad(plain, (qp, kp, vp), up)

    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    fast = _run(backend, qf, kf, vf, kw)
    assert fast.dtype == dtype
    fast_grads = torch.autograd.grad(fast, (qf, kf, vf), up)

    what = f"{backend} {shape_name} {option} {dtype}"
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=what + " out")
    for name, g, gp, ge in zip("qkv", fast_grads, plain_grads, exact_grads):
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"{what} d{name}")


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "tiled-small", "auto"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape_name", ["tiny", "mha97", "gqa-short-q", "mqa-short-k"])
def test_float32_grid(shape_name, option, backend):
    _check(shape_name, option, backend, torch.float32, seed=zlib.crc32(f"{shape_name}{option}".encode()) % 1000)


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "tiled-small"])
@pytest.mark.parametrize("option", ["dense", "causal", "causal-window", "bool-mask", "mask-mod"])
@pytest.mark.parametrize("shape_name", ["gqa1023", "mha1025", "decode1025"])
def test_float32_long(shape_name, option, backend):
    if backend == "tiled-small" and shape_name != "decode1025" and option in ("dense", "bool-mask"):
        pytest.skip("covered by the causal cases; small tiles at 1k are slow in pure Python")
    _check(shape_name, option, backend, torch.float32, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option", ["dense", "causal", "causal-window", "bool-mask", "key-padding-causal", "score-mod"])
@pytest.mark.parametrize("shape_name", ["tiny", "decode1025", "chunk16"])
def test_decode(shape_name, option, dtype):
    """A few queries against a long cache: one query block, the cache in chunks."""
    _check(shape_name, option, "decode", dtype, seed=13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "tiled", "tiled-small"])
@pytest.mark.parametrize("option", ["dense", "causal", "window", "bool-mask", "float-mask", "score-mod"])
@pytest.mark.parametrize("shape_name", ["mha97", "gqa-short-q", "mqa-short-k"])
def test_low_precision(shape_name, option, backend, dtype):
    _check(shape_name, option, backend, dtype, seed=11)


@pytest.mark.parametrize("backend", ["sdpa", "tiled-small"])
@pytest.mark.parametrize("option", ["dense", "causal-window", "bool-mask", "score-mod"])
@pytest.mark.parametrize("shape_name", ["mha97", "mqa-short-k"])
def test_float64(shape_name, option, backend):
    _check(shape_name, option, backend, torch.float64, seed=3)


@pytest.mark.parametrize("backend", ["reference", "tiled", "tiled-small"])
@pytest.mark.parametrize("option", ["dense", "causal", "bool-mask", "score-mod"])
def test_lse_matches_logsumexp(backend, option):
    shape = SHAPES["gqa-short-q"]
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    (q, k, v, _), gen = _inputs(shape, torch.float32, seed=5)
    kw = OPTIONS[option](B, Hq, Lq, Lk, gen)
    with _tiles(backend):
        out, lse = qkv.attention_with_lse(q, k, v, backend=backend.split("-")[0], **kw)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Lq)
    # The log of the softmax denominator, computed here from scratch in float64.
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    scores = q.double() @ kk.transpose(-1, -2) * kw.get("scale", D ** -0.5)
    if "score_mod" in kw:
        b, h = torch.arange(B).view(-1, 1, 1, 1), torch.arange(Hq).view(1, -1, 1, 1)
        scores = kw["score_mod"](scores, b, h, torch.arange(Lq).view(1, 1, -1, 1), torch.arange(Lk).view(1, 1, 1, -1))
    allowed = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
    if kw.get("causal"):
        allowed &= torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
    if "mask" in kw:
        allowed &= kw["mask"]
    expected = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isneginf(lse), ~finite), "lse must be -inf exactly on rows that see no key"
    err = (lse.double()[finite] - expected[finite]).abs().max().item()
    assert err < 1e-4, f"lse differs from logsumexp by {err:.2e}"


@pytest.mark.parametrize("backend", ["reference", "tiled-small"])
def test_lse_gradient(backend):
    """lse is differentiable: d(sum lse)/dq equals the float64 reference's."""
    (q, k, v, _), _ = _inputs(SHAPES["mha97"], torch.float32, seed=9)
    grads = []
    for dtype, be in ((torch.float64, "reference"), (torch.float32, backend)):
        qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
        with _tiles(be):
            out, lse = qkv.attention_with_lse(qq, kk, vv, causal=True, backend=be.split("-")[0])
        loss = lse.sum() + (out * out).sum()
        grads.append(torch.autograd.grad(loss, (qq, kk, vv)))
    for name, g64, g in zip("qkv", *grads):
        err = (g.double() - g64).abs().max().item()
        assert err < 1e-4 * max(1.0, g64.abs().max().item()), f"d{name} of lse+out: error {err:.2e}"


# ------------------------------------------------------------------ memory layouts
# What models hand the core: a batch of B > 1, grouped-query heads, and tensors that are not
# contiguous: (B, L, H, D).transpose(1, 2) from a projection, keys and values expanded along
# the batch with stride 0 (one shared prompt), a cache that is a slice of a larger buffer.
# (B, Hq, Hkv, Lq, Lk, D): lengths ragged and a multiple of the engines' row groups; Lq <= 16 for decode.
# "chunk": a causal chunk against a longer cache (sdpa's split_causal path).
LAYOUT_SHAPES = {"ragged": (2, 4, 2, 97, 97, 32), "aligned": (2, 4, 2, 128, 128, 32),
                 "chunk": (2, 4, 2, 40, 300, 32), "decode": (2, 4, 2, 9, 300, 32)}
LAYOUT_OPTIONS = {
    "causal": lambda Lq, Lk: {"causal": True},
    "window": lambda Lq, Lk: {"window": (20, 5)},
    "bool-mask": lambda Lq, Lk: {"mask": (torch.arange(Lk) % 3 != 1).expand(2, 1, Lq, Lk)},
    "mask-mod": lambda Lq, Lk: {"mask": lambda b, h, q, k: (k <= q + Lk - Lq) & ((k + b + h) % 4 != 0)},
    "score-mod": lambda Lq, Lk: {"score_mod": _alibi_like, "mask": lambda b, h, q, k: k <= q + Lk - Lq},
}
# What each backend honours (the others raise and name a backend that can: test_errors).
LAYOUT_SUPPORT = {
    "reference": set(LAYOUT_OPTIONS), "auto": set(LAYOUT_OPTIONS), "tiled": set(LAYOUT_OPTIONS),
    "sdpa": set(LAYOUT_OPTIONS) - {"score-mod"},
    "sparse": {"causal", "window", "mask-mod", "score-mod"},
    "decode": set(LAYOUT_OPTIONS),
}


def _laid_out(leaf: torch.Tensor, layout: str, B: int) -> torch.Tensor:
    """The leaf (B, L, H, D) or (1, H, L, D) as a (B, H, L, D) tensor in the given layout."""
    if layout == "transposed":  # (B, L, H, D) -> (B, H, L, D): heads are not contiguous
        return leaf.transpose(1, 2)
    if layout == "expanded":  # (1, H, L, D) -> (B, H, L, D) with batch stride 0
        return leaf.expand(B, -1, -1, -1)
    if layout == "strided":  # (B, H, L, 2D) -> (B, H, L, D): the last dimension at stride 2
        return leaf[..., ::2]
    if layout == "d-major":  # (B, H, D, L) -> (B, H, L, D): stored transposed, last-dimension stride L
        return leaf.transpose(-1, -2)
    if layout == "overlapping":  # (B, H, L+1, D/2) -> (B, H, L, D): row l is rows l and l+1 (as unfold makes)
        Bl, H, L1, half = leaf.shape
        return leaf.as_strided((Bl, H, L1 - 1, 2 * half), (H * L1 * half, L1 * half, half, 1))
    return leaf[..., 1:]  # "sliced": every row skips its first entry, as a view of a wider buffer


def _layout_leaves(shape, layout, dtype, seed):
    B, Hq, Hkv, Lq, Lk, D = shape
    gen = torch.Generator().manual_seed(seed)
    extra = 1 if layout == "sliced" else 0
    dims = {"transposed": lambda H, L: (B, L, H, D), "expanded": lambda H, L: (1, H, L, D),
            "sliced": lambda H, L: (B, H, L, D + extra), "strided": lambda H, L: (B, H, L, 2 * D),
            "d-major": lambda H, L: (B, H, D, L), "overlapping": lambda H, L: (B, H, L + 1, D // 2)}[layout]
    leaves = [torch.randn(*dims(H, L), generator=gen, dtype=torch.float64)
              for H, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk))]
    up = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in leaves], up.to(dtype)


@pytest.mark.parametrize("lengths", ["ragged", "aligned", "chunk"])
@pytest.mark.parametrize("layout", ["transposed", "expanded", "sliced", "strided", "d-major", "overlapping"])
@pytest.mark.parametrize("option", list(LAYOUT_OPTIONS))
@pytest.mark.parametrize("backend", list(LAYOUT_SUPPORT))
def test_layouts(backend, option, layout, lengths):
    """B = 2, GQA, non-contiguous and zero-stride inputs (a last dimension not at stride 1 too: sdpa's
    split_causal gave O(1)-wrong results there; rows that overlap, which oneDNN refuses deep inside):
    outputs and gradients by the rule."""
    if option not in LAYOUT_SUPPORT[backend]:
        pytest.skip(f"{backend} does not honour {option} (it raises: test_errors)")
    shape = LAYOUT_SHAPES["decode" if backend == "decode" else lengths]
    B, Hq, Hkv, Lq, Lk, D = shape
    leaves, up = _layout_leaves(shape, layout, torch.float32, seed=zlib.crc32(f"{option}{layout}".encode()) % 997)
    kw = LAYOUT_OPTIONS[option](Lq, Lk)
    results = {}
    for name, dtype, be in (("exact", torch.float64, "reference"), ("plain", torch.float32, "reference"),
                            ("fast", torch.float32, backend)):
        xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        q, k, v = (_laid_out(x, layout, B) for x in xs)
        assert q.shape == (B, Hq, Lq, D) and k.shape == (B, Hkv, Lk, D)
        if name != "exact":
            assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
        fn = qkv.reference_attention if be == "reference" else partial(qkv.attention, backend=be)
        out = fn(q, k, v, **kw)
        results[name] = (out, torch.autograd.grad(out, xs, up.to(dtype)))
    what = f"{backend} {option} {layout}"
    (fast, fg), (plain, pg), (exact, eg) = results["fast"], results["plain"], results["exact"]
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=what + " out")
    for n, g, gp, ge in zip("qkv", fg, pg, eg):
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"{what} d{n}")


def _overlapping(L: int, D: int, dtype, seed: int) -> torch.Tensor:
    """(1, 1, L, D) whose row l is the flat storage [l D/2, l D/2 + D): rows overlap by D/2 (unfold)."""
    base = torch.randn(L * (D // 2) + D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return base.as_strided((1, 1, L, D), (L * (D // 2), L * (D // 2), D // 2, 1))


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_overlapping_rows_with_gradients_on_sdpa(backend):
    """Keys whose rows overlap, bfloat16, a gradient for them: torch's SDPA backward raised from oneDNN
    ("could not construct a memory descriptor using strides"); the backend copies such tensors."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 16, 32, generator=g).bfloat16()
    v = torch.randn(1, 1, 16, 32, generator=g).bfloat16()
    k = _overlapping(16, 32, torch.bfloat16, 1).detach().requires_grad_()
    out = qkv.attention(q, k, v, window=(None, 4), backend=backend)
    (dk,) = torch.autograd.grad(out.float().sum(), [k])
    kr = k.detach().clone().requires_grad_()
    want = qkv.attention(q, kr, v, window=(None, 4), backend="reference")
    (dk_want,) = torch.autograd.grad(want.float().sum(), [kr])
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dk, dk_want, atol=5e-2, rtol=5e-2)


def test_overlapping_rows_on_the_decode_eager_engine():
    """Values whose rows overlap, a mask function (the decode backend's eager engine, whose oneDNN
    products refused such strides deep inside): the reference's output."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g)
    k = torch.randn(1, 1, 2048, 16, generator=g)
    v = _overlapping(2048, 100, torch.float32, 1)
    mask = qkv.masks.sliding_window(300)
    want = qkv.attention(q.double(), k.double(), v.double(), mask=mask, backend="reference")
    got = qkv.attention(q, k, v, mask=mask, backend="decode")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)

"""NaN and infinity in, NaN out, in exactly the rows that depend on them, on every backend.

The rule (core/finite.py, docs/errors.md): a query row is poisoned when its q holds a NaN or
an infinity, or when it may see a key whose k or v row holds one, or a float-mask entry of NaN
or +inf; its output, weights and lse are then NaN. A key a row may not see has no effect on it,
whatever it holds (NaN, inf, or a finite value so large that its scores overflow float32).

Expectations are computed here independently of qkv: a dense visibility matrix built from the
constraints by hand, and the float64 reference on inputs whose bad entries are replaced by 0
(the rows that are not poisoned cannot see them, so any replacement gives the same answer).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import qkv
from qkv import masks as M

NAN, INF = float("nan"), float("inf")
BIG = torch.finfo(torch.float32).max

# (B, Hq, Hkv, Lq, Lk, D): GQA; decode takes at most 16 queries.
SHAPE = (2, 4, 2, 40, 40, 16)
DECODE_SHAPE = (2, 4, 2, 5, 70, 16)


def _visibility(name, B, Hq, Lq, Lk):
    """(keyword arguments, bool (B, Hq, Lq, Lk) may-see matrix built by hand)."""
    i = torch.arange(Lq).view(-1, 1) + (Lk - Lq)  # each query's diagonal key
    j = torch.arange(Lk).view(1, -1)
    full = lambda m: m.expand(B, Hq, Lq, Lk).clone()  # noqa: E731
    if name == "causal":
        return {"causal": True}, full(j <= i)
    if name == "window":
        return {"window": (6, 2)}, full((j >= i - 6) & (j <= i + 2))
    if name == "bool-mask":
        m = ((torch.arange(Lk) + 2 * torch.arange(B).view(-1, 1)).view(B, 1, 1, Lk) % 3 != 0) & (j <= i)
        return {"mask": m}, full(m)
    if name == "float-mask":
        m = torch.zeros(B, 1, Lq, Lk).masked_fill(j > i, -INF)
        m[:, :, :, 1::4] += 0.5
        return {"mask": m}, full(m != -INF)
    if name == "mask-mod":
        fn = lambda b, h, q, k: (k <= q + (Lk - Lq)) & ((k + h + b) % 5 != 2)  # noqa: E731
        b, h = torch.arange(B).view(-1, 1, 1, 1), torch.arange(Hq).view(1, -1, 1, 1)
        return {"mask": fn}, full(fn(b, h, torch.arange(Lq).view(1, 1, -1, 1), j.view(1, 1, 1, -1)))
    if name == "block-mask":
        bm = qkv.block_mask(M.causal(offset=Lk - Lq), B, Hq, Lq, Lk, block_size=8)
        return {"mask": bm}, full(j <= i)
    raise AssertionError(name)


BACKENDS = {  # backend -> constraints it honours
    "reference": ["causal", "window", "bool-mask", "float-mask", "mask-mod"],
    "sdpa": ["causal", "window", "bool-mask", "float-mask", "mask-mod"],
    "tiled": ["causal", "window", "bool-mask", "float-mask", "mask-mod"],
    "sparse": ["causal", "window", "mask-mod", "block-mask"],
    "decode": ["causal", "window", "bool-mask", "float-mask", "mask-mod"],
    "native": ["causal", "window", "mask-mod"],  # self-checking: the kernel takes the extremes of q, k and v
    "auto": ["causal", "window", "bool-mask", "float-mask", "mask-mod", "block-mask"],
}
CASES = [(be, c) for be, cs in BACKENDS.items() for c in cs]


def _inputs(shape, dtype, seed):
    B, Hq, Hkv, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
            for s in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D))]


def _call(backend, q, k, v, kw, lse=False):
    if backend == "reference":
        assert not lse
        return qkv.reference_attention(q, k, v, **kw)
    if lse:
        return qkv.attention_with_lse(q, k, v, backend=backend, **kw)
    return qkv.attention(q, k, v, backend=backend, **kw)


def _poison(q, k, v, kw, where, value, row, key, head):
    """Put `value` into q's row, k's or v's key, or the float mask's entry; -> bad q rows
    (B, Hq, Lq), bad keys (B, Hkv, Lk), bad mask cells (B?, 1, Lq, Lk) or None."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bad_q = torch.zeros(B, Hq, Lq, dtype=torch.bool)
    bad_kv = torch.zeros(B, Hkv, Lk, dtype=torch.bool)
    bad_m = None
    if where == "q":
        q[1, head, row, 3] = value
        bad_q[1, head, row] = True
    elif where in "kv":
        (k if where == "k" else v)[1, head // (Hq // Hkv), key, 5] = value
        bad_kv[1, head // (Hq // Hkv), key] = True
    else:  # a float-mask entry
        m = kw["mask"]
        m[1, 0, row, key] = value
        bad_m = torch.zeros(m.shape, dtype=torch.bool)
        bad_m[1, 0, row, key] = True
    return bad_q, bad_kv, bad_m


def _expected(q, k, v, kw, vis, bad_q, bad_kv, bad_m):
    """(poisoned rows (B, Hq, Lq), the float64 reference on clean inputs)."""
    G = q.shape[1] // k.shape[1]
    seen_bad = vis & bad_kv.repeat_interleave(G, dim=1)[:, :, None, :]
    if bad_m is not None:
        seen_bad |= vis & bad_m
    poisoned = bad_q | seen_bad.any(-1)
    clean = [torch.nan_to_num(t.double(), nan=0.0, posinf=0.0, neginf=0.0) for t in (q, k, v)]
    ckw = dict(kw)
    if "mask" in kw and torch.is_tensor(kw["mask"]) and kw["mask"].is_floating_point():
        ckw["mask"] = kw["mask"].double() if bad_m is None else kw["mask"].double().masked_fill(bad_m, 0.0)
    return poisoned, qkv.reference_attention(*clean, **ckw)


def _check_rows(out, poisoned, expected, what, tol=1e-4):
    nan_rows = torch.isnan(out).all(-1)
    any_nan = torch.isnan(out).any(-1)
    assert torch.equal(nan_rows, poisoned), (
        f"{what}: NaN rows {nan_rows.nonzero().tolist()} but the rule poisons {poisoned.nonzero().tolist()}")
    assert torch.equal(any_nan, poisoned), f"{what}: a row is partly NaN"
    ok = ~poisoned
    assert torch.isfinite(out[ok]).all(), f"{what}: a row that cannot see the bad entry is not finite"
    err = (out[ok].double() - expected[ok]).abs().max().item() if ok.any() else 0.0
    assert err < tol, f"{what}: rows that cannot see the bad entry differ from the clean reference by {err:.2e}"


WHERE = [("q", NAN), ("q", INF), ("q", -INF), ("k", NAN), ("k", INF), ("k", -INF), ("v", NAN), ("v", -INF)]


@pytest.mark.parametrize("where,value", WHERE, ids=[f"{w}={v}" for w, v in WHERE])
@pytest.mark.parametrize("backend,constraint", CASES, ids=[f"{b}-{c}" for b, c in CASES])
def test_nonfinite_inputs_poison_exactly_the_rows_that_see_them(backend, constraint, where, value):
    shape = DECODE_SHAPE if backend == "decode" else SHAPE
    B, Hq, Hkv, Lq, Lk, D = shape
    seed = zlib.crc32(f"{backend}{constraint}{where}{value}".encode()) % 1000
    q, k, v = _inputs(shape, torch.float32, seed)
    kw, vis = _visibility(constraint, B, Hq, Lq, Lk)
    # key 3 is seen by some rows and hidden from others under every constraint here
    bad = _poison(q, k, v, kw, where, value, row=Lq - 2, key=Lk - Lq + 3, head=1)
    poisoned, expected = _expected(q, k, v, kw, vis, *bad)
    assert poisoned.any() and not poisoned.all()
    out = _call(backend, q, k, v, kw)
    _check_rows(out, poisoned, expected, f"{backend} {constraint} {where}={value}")
    if backend not in ("reference", "sdpa"):
        out, lse = _call(backend, q, k, v, kw, lse=True)
        assert torch.equal(torch.isnan(lse), poisoned), f"{backend}: lse must be NaN exactly on poisoned rows"


@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled", "decode", "auto"])
def test_float_mask_entries_of_nan_or_plus_inf_poison_their_row(backend, value):
    shape = DECODE_SHAPE if backend == "decode" else SHAPE
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = _inputs(shape, torch.float32, seed=4)
    kw, vis = _visibility("float-mask", B, Hq, Lq, Lk)
    visible_cell = _poison(q, k, v, kw, "mask", value, row=Lq - 1, key=Lk - 1, head=0)
    hidden_cell = kw["mask"][0, 0, 0, Lk - 1]  # row 0 cannot see the last key: the entry stays -inf
    assert hidden_cell == -INF
    poisoned, expected = _expected(q, k, v, kw, vis, *visible_cell)
    _check_rows(_call(backend, q, k, v, kw), poisoned, expected, f"{backend} mask={value}")


@pytest.mark.parametrize("value", [BIG, -BIG, 1e30])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("backend,constraint", CASES, ids=[f"{b}-{c}" for b, c in CASES])
def test_huge_finite_keys_never_leak_and_visible_ones_are_exact(backend, constraint, where, value):
    """A key of float32's largest magnitude: its scores overflow float32. Rows that cannot see
    it equal the clean reference; rows that can see it equal the float64 softmax."""
    shape = DECODE_SHAPE if backend == "decode" else SHAPE
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = _inputs(shape, torch.float32, seed=8)
    kw, vis = _visibility(constraint, B, Hq, Lq, Lk)
    key = Lk - Lq + 3
    (k if where == "k" else v)[:, :, key, :] = value
    out = _call(backend, q, k, v, kw)
    sees = vis[..., key]  # (B, Hq, Lq)
    assert sees.any() and not sees.all()
    assert torch.isfinite(out[~sees]).all(), f"{backend} {constraint}: a row that cannot see the key is not finite"
    kw64 = {n: (x.double() if torch.is_tensor(x) and x.is_floating_point() else x) for n, x in kw.items()}
    exact = qkv.reference_attention(q.double(), k.double(), v.double(), **kw64)  # no overflow in float64
    err = (out[~sees].double() - exact[~sees]).abs().max().item()
    assert err < 1e-4, f"{backend} {constraint}: rows that cannot see the key moved by {err:.2e}"
    if where == "k":  # visible: the float64 softmax (out may overflow float32 only through v)
        rel = ((out[sees].double() - exact[sees]).abs() / exact[sees].abs().clamp_min(1.0)).max().item()
        assert rel < 1e-4, f"{backend} {constraint}: rows that see the key differ from float64 by {rel:.2e}"


GRAD_BACKENDS = ["reference", "sdpa", "tiled", "sparse", "decode", "native", "auto"]


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_gradients_are_nan_where_the_rule_says(backend, where):
    """dq of poisoned rows and dk, dv of keys a poisoned row may see are NaN; the rest equals
    the gradient of the clean computation in which poisoned rows pass no gradient."""
    shape = DECODE_SHAPE if backend == "decode" else SHAPE
    B, Hq, Hkv, Lq, Lk, D = shape
    G = Hq // Hkv
    q, k, v = _inputs(shape, torch.float32, seed=21)
    kw, vis = _visibility("causal" if backend != "sparse" else "mask-mod", B, Hq, Lq, Lk)
    bad = _poison(q, k, v, kw, where, NAN, row=Lq - 3, key=Lk - Lq + 2, head=2)
    poisoned, _ = _expected(q, k, v, kw, vis, *bad)
    up = torch.randn(B, Hq, Lq, D, generator=torch.Generator().manual_seed(3))
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _call(backend, *xs, kw)
    grads = torch.autograd.grad(out, xs, up)
    seen = (vis & poisoned[..., None]).any(-2).view(B, Hkv, G, Lk).any(2)  # (B, Hkv, Lk)
    clean = [torch.nan_to_num(t.double(), nan=0.0).requires_grad_() for t in (q, k, v)]
    ref = qkv.reference_attention(*clean, **kw)
    ref_grads = torch.autograd.grad(ref, clean, up.double().masked_fill(poisoned[..., None], 0.0))
    for name, g, rg, nan_at in zip("qkv", grads, ref_grads, (poisoned, seen, seen)):
        rows_nan = torch.isnan(g).all(-1)
        assert torch.equal(rows_nan, nan_at), f"{backend} d{name}: NaN rows {rows_nan.nonzero().tolist()}"
        assert torch.isfinite(g[~nan_at]).all(), f"{backend} d{name}: a partly NaN row"
        err = (g[~nan_at].double() - rg[~nan_at]).abs().max().item()
        assert err < 1e-3, f"{backend} d{name}: finite part differs from the clean gradient by {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_decode_engines_in_every_dtype(dtype, where):
    """The native kernel (float32, bfloat16) and the eager segments (float16, float64) read the
    cache once and report what they saw; a NaN anywhere still poisons exactly its rows."""
    B, Hq, Hkv, Lq, Lk, D = 1, 4, 2, 3, 3000, 64
    q, k, v = _inputs((B, Hq, Hkv, Lq, Lk, D), dtype, seed=5)
    kw, vis = _visibility("causal", B, Hq, Lq, Lk)
    bad_q, bad_kv, _ = (torch.zeros(B, Hq, Lq, dtype=torch.bool), torch.zeros(B, Hkv, Lk, dtype=torch.bool), None)
    if where == "q":
        q[0, 1, 1, 0] = NAN
        bad_q[0, 1, 1] = True
    else:
        (k if where == "k" else v)[0, 1, Lk - 2, 0] = NAN  # seen by the last query only
        bad_kv[0, 1, Lk - 2] = True
    poisoned, expected = _expected(q, k, v, kw, vis, bad_q, bad_kv, None)
    out = qkv.attention(q, k, v, backend="decode", **kw)
    _check_rows(out, poisoned, expected, f"decode {dtype} {where}", tol=0.05 if dtype != torch.float64 else 1e-9)


@pytest.mark.parametrize("value", [NAN, INF])
def test_attention_weights_follow_the_rule(value):
    B, Hq, Hkv, Lq, Lk, D = SHAPE
    q, k, _ = _inputs(SHAPE, torch.float32, seed=9)
    k[0, 0, 10, 0] = value  # kv head 0 serves query heads 0 and 1; causal rows 10.. see key 10
    probs = qkv.attention_weights(q, k, causal=True)
    poisoned = torch.zeros(B, Hq, Lq, dtype=torch.bool)
    poisoned[0, :2, 10:] = True
    assert torch.equal(torch.isnan(probs).all(-1), poisoned)
    assert torch.isfinite(probs[~poisoned]).all()


def test_finite_inputs_take_the_fast_path_unchanged():
    """Without NaN, infinity or overflow, the guard adds a scan and nothing else: the backend's
    own result comes back bit for bit."""
    from qkv.core.backend import sdpa
    from qkv.core.spec import build_spec

    q, k, v = _inputs(SHAPE, torch.float32, seed=1)
    spec = build_spec(q, k, v, causal=True)
    direct, _ = sdpa.forward(q, k, v, spec, need_lse=False)
    assert torch.equal(qkv.attention(q, k, v, causal=True, backend="sdpa"), direct)


@pytest.fixture
def unchecked_backend(monkeypatch):
    """A backend registered as self-checking that checks nothing (the float64 reference, NaN
    turned into 0 as a fused kernel might): what it misses, only the guard's own checks of q and
    the float mask can catch. Its name is removed again after the test."""
    from qkv.core import api
    from qkv.core.backend import reference

    monkeypatch.setattr(api, "_BACKENDS", dict(api._BACKENDS))

    def forward(q, k, v, spec, need_lse):
        out, lse = reference.BACKEND.forward(q, k, v, spec, need_lse=need_lse)
        return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0), lse

    api.register_backend("unchecked", forward, lambda spec, q, need_lse: None,
                         self_checking=lambda spec, q, k, v: True)
    return "unchecked"


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_the_guard_checks_q_for_a_self_checking_backend(unchecked_backend, value):
    """Self-checking backends check the keys and values they read; q is the guard's: a non-finite
    query entry poisons its row (and only it) even where the backend would hide it."""
    q, k, v = _inputs(DECODE_SHAPE, torch.float32, seed=3)
    q[1, 2, 3, 5] = value
    with torch.no_grad():
        out = qkv.attention(q, k, v, causal=True, backend=unchecked_backend)
    poisoned = torch.zeros(out.shape[:3], dtype=torch.bool)
    poisoned[1, 2, 3] = True
    assert torch.equal(torch.isnan(out).all(-1), poisoned) and torch.isfinite(out[~poisoned]).all()


@pytest.mark.parametrize("value", [NAN, INF])
def test_the_guard_checks_the_float_mask_for_a_self_checking_backend(unchecked_backend, value):
    """A float-mask entry of NaN or +inf poisons the rows that see it, also behind a self-checking
    backend (the guard checks the mask as it checks q)."""
    q, k, v = _inputs(DECODE_SHAPE, torch.float32, seed=4)
    B, Hq, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mask = torch.zeros(B, Hq, Lq, Lk)
    mask[0, 1, 2, 7] = value
    with torch.no_grad():
        out = qkv.attention(q, k, v, mask=mask, backend=unchecked_backend)
    poisoned = torch.zeros(B, Hq, Lq, dtype=torch.bool)
    poisoned[0, 1, 2] = True
    assert torch.equal(torch.isnan(out).all(-1), poisoned) and torch.isfinite(out[~poisoned]).all()


def test_finite_q_whose_sum_overflows_still_gives_the_exact_result(unchecked_backend):
    """The guard's check of q for a self-checking backend is one sum: a finite q whose sum overflows
    float32 reads as suspect, and the exact path then gives the right answer (nothing is poisoned)."""
    q, k, v = _inputs(DECODE_SHAPE, torch.float32, seed=5)
    q[0, 0, 0, :] = BIG / 2  # finite; their sum is not
    with torch.no_grad():
        out = qkv.attention(q, k, v, backend=unchecked_backend)
        expected = qkv.reference_attention(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

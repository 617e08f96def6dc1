"""The native FlashAttention-2 backward under a BlockMask's block lists, and the gradient through lse.

`native_flash_bwd.backward` walks the key-major block lists of engines/native_blocks.py (the
BlockMask, with the call's causal/window band on top) and takes d_lse, the gradient through
the lse output. Its dq, dk, dv from the reference's out and lse are checked against float64
autograd of the reference under the tolerance rule (GRAD_FACTOR times the plain same-dtype
reference's error), on fresh random inputs, float32 and bfloat16: mask query blocks of 32, 64,
75, 96, 100, 128 and 256 rows (the kernel's own blocks are 64 rows), masks that vary by batch row and
head (Bm = B, Hm = Hq) or not, GQA, Lq != Lk, rows that see no key (zero dq, no NaN) and keys
that no row sees (zero dk, dv). Each check also shows that it can fail: the gradients without
the mask (or without d_lse) are outside the rule.

Partial blocks are narrowed (strips of 16 rows over the 16-key chunks some row of the strip sees):
odd windows as BlockMasks and as bands, bands on top of lists, strips that alternate between chunks
(a chunk's hull of strips holds strips that did not compute it), cells off the kernel's grid that
move with batch row and head; within the rule, through qkv.attention_with_lse end to end, and the same
bits as a build that computes every partial block whole (-DQKV_BWD_NARROW=0).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

import qkv
from qkv import masks
from qkv.core import _kernels
from qkv.core.engines import native_blocks
from qkv.core.engines import native_flash_bwd as nb
from qkv.core.spec import build_spec
from qkv.testing import GRAD_FACTOR, assert_within_rule, within_rule

pytestmark = pytest.mark.skipif(nb.lib() is None and (_kernels._compiler() is None or _kernels._turned_off()),
                                reason=f"no native kernel: {_kernels.status(nb.NAME)}")


def _per_head(b, h, q_idx, kv_idx):
    """Causal, every (3 + b + 2h)-th diagonal left out, and key 130 + 7h seen by no row: differs by b and h."""
    return (kv_idx <= q_idx) & ((q_idx - kv_idx) % (3 + b + 2 * h) != 0) & (kv_idx != 130 + 7 * h)


def _dead_rows_and_keys(b, h, q_idx, kv_idx):
    """Rows below 70 see nothing; keys 200..263 are seen by none; else a window of 150 keys back."""
    return (q_idx >= 70) & ((kv_idx < 200) | (kv_idx >= 264)) & (kv_idx <= q_idx) & (kv_idx > q_idx - 150)


def _longformer(Lq):
    return masks.longformer(40, [0, Lq // 2])


# name: (mask function or factory(Lq), mask B, mask H, B, Hq, Hkv, Lq, Lk, D, bq, extra band options)
CASES = {
    "per-head-bq64-gqa": (_per_head, 2, 4, 2, 4, 2, 300, 300, 32, 64, {}),
    "per-head-bq96": (_per_head, 2, 4, 2, 4, 4, 290, 300, 40, 96, {}),
    "per-head-bq100-gqa4/1": (_per_head, 2, 4, 2, 4, 1, 333, 300, 64, 100, {}),
    "per-head-bq128-batch-broadcast": (_per_head, 1, 4, 2, 4, 2, 260, 400, 16, 128, {}),  # Bm = 1, Hm = Hq
    "per-head-short-keys": (_per_head, 2, 2, 2, 2, 1, 130, 50, 16, 64, {}),  # one key block, 50 keys
    "per-head-bq256": (_per_head, 2, 2, 2, 2, 1, 520, 300, 48, 256, {}),
    "per-head-bq32-gqa": (_per_head, 2, 4, 2, 4, 2, 200, 330, 32, 32, {}),  # two mask blocks per kernel block
    "per-head-bq75-odd": (_per_head, 1, 2, 2, 2, 1, 310, 260, 20, 75, {"causal": True}),
    "dead-rows-and-keys-bq64": (_dead_rows_and_keys, 1, 1, 2, 4, 2, 300, 390, 32, 64, {}),
    "dead-rows-and-keys-bq96-causal": (_dead_rows_and_keys, 1, 1, 1, 2, 2, 300, 390, 24, 96, {"causal": True}),
    "sliding-window-bq128-band": (lambda L: masks.causal_sliding_window(100), 1, 1, 1, 4, 1, 520, 520, 64, 128,
                                  {"window": (300, 0)}),
    "document-bq64": (lambda L: masks.document([100, 37, 250, 60], causal=True), 1, 1, 2, 2, 1, 447, 447, 32, 64, {}),
    "longformer-bq100": (_longformer, 1, 1, 1, 2, 2, 410, 410, 32, 100, {}),
    "longformer-bq256-window": (_longformer, 1, 1, 1, 2, 1, 600, 600, 32, 256, {"window": (60, 20)}),
}


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    d_out = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    d_lse = torch.randn(B, Hq, Lq, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, d_out)] + [d_lse]


def _reference_grads(q, k, v, d_out, d_lse, kw):
    """Autograd of the reference in q's dtype (float64 for the exact ones) of out . d_out + lse . d_lse
    (d_lse None: out alone); rows with lse = -inf are left out of the lse term (their lse is constant)."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = qkv.attention_with_lse(qs, ks, vs, backend="reference", **kw)
    loss = (out * d_out.to(out.dtype)).sum()
    if d_lse is not None:
        loss = loss + torch.where(torch.isinf(lse), torch.zeros_like(lse), lse * d_lse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, (qs, ks, vs))


def _check(q, k, v, d_out, d_lse, kw, what, control=None):
    """nb.backward against float64 and plain autograd of the reference, within the rule. `control`:
    keyword changes (spec options or d_lse=None) whose gradients must NOT be within the rule."""
    exact = _reference_grads(q.double(), k.double(), v.double(), d_out.double(), d_lse, kw)
    plain = _reference_grads(q, k, v, d_out, d_lse, kw)
    with torch.no_grad():
        out, lse = qkv.attention_with_lse(q, k, v, backend="reference", **kw)
    dl = None if d_lse is None else d_lse.float()
    fast = nb.backward(q, k, v, out, lse, d_out, build_spec(q, k, v, **kw), d_lse=dl)
    for name, g, gp, ge in zip("qkv", fast, plain, exact):
        assert g.dtype == torch.float32 and g.is_contiguous()
        assert_within_rule(g.to(q.dtype), gp, ge, factor=GRAD_FACTOR, what=f"{what} d{name}")
    if control is not None:  # the test can fail: without the mask (or d_lse) the gradients are off
        ckw = {**kw, **{key: val for key, val in control.items() if key != "d_lse"}}
        cdl = None if "d_lse" in control else dl
        wrong = nb.backward(q, k, v, out, lse, d_out, build_spec(q, k, v, **ckw), d_lse=cdl)
        oks = [within_rule(g.to(q.dtype), gp, ge, factor=GRAD_FACTOR)[0] for g, gp, ge in zip(wrong, plain, exact)]
        assert not all(oks), f"{what}: the control {control} passes the rule too: the check cannot fail"
    return fast, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_block_mask_gradients_within_rule(case, dtype):
    fn, mB, mH, B, Hq, Hkv, Lq, Lk, D, bq, band = CASES[case]
    mask_fn = fn if fn in (_per_head, _dead_rows_and_keys) else fn(Lq)
    bm = qkv.block_mask(mask_fn, mB, mH, Lq, Lk, block_size=(bq, 128))
    lists = native_blocks.block_lists(bm)
    assert lists.bq == bq and lists.nnz > 0
    q, k, v, d_out, _ = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=zlib.crc32(case.encode()) % 1000)
    kw = {"mask": bm, **band}
    (dq, dk, dv), lse = _check(q, k, v, d_out, None, kw, f"{case} {dtype}", control=dict(mask=None))
    lo, hi = build_spec(q, k, v, **band).band_edges(torch.arange(Lq))  # (Lq,) each: row i sees [lo_i, hi_i)
    cols = torch.arange(Lk)
    allowed = bm.to_dense().expand(B, Hq, Lq, Lk) & (cols >= lo[:, None]) & (cols < hi[:, None])  # (B, Hq, Lq, Lk)
    dead_rows = ~allowed.any(-1)  # (B, Hq, Lq)
    assert torch.isinf(lse[dead_rows]).all()
    assert (dq[dead_rows] == 0).all(), "a row that sees no key has dq 0"
    unseen = ~allowed.unflatten(1, (Hkv, Hq // Hkv)).any(2).any(2)  # (B, Hkv, Lk): keys no query row sees
    assert (dk[unseen] == 0).all() and (dv[unseen] == 0).all(), "a key that no row sees has dk, dv 0"
    if case.startswith("dead"):
        assert dead_rows.any() and unseen.any()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_block_mask_key_splits_and_thread_counts(threads):
    """One (batch, kv head) item on several threads: the keys split by listed work, each split's dq summed."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fn in (_per_head, _dead_rows_and_keys):
            bm = qkv.block_mask(fn, 1, 3, 300, 520, block_size=(96, 128))
            q, k, v, d_out, d_lse = _inputs(1, 3, 1, 300, 520, 32, torch.float32, seed=threads)
            _check(q, k, v, d_out, d_lse, {"mask": bm}, f"{threads} threads {fn.__name__}")
    finally:
        torch.set_num_threads(old)


D_LSE_CASES = {
    "band-causal-dead-rows": (2, 4, 2, 130, 70, 40, {"causal": True}, None),  # rows 0..59 see no key
    "band-window": (1, 4, 1, 200, 200, 16, {"window": (32, 8)}, None),
    "no-band": (1, 2, 2, 100, 150, 64, {}, None),
    "block-mask-bq96-dead-rows-and-keys": (1, 2, 1, 300, 390, 32, {}, _dead_rows_and_keys),
    "block-mask-per-head-bq64": (2, 4, 2, 300, 300, 32, {"causal": True}, _per_head),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(D_LSE_CASES))
def test_gradient_through_lse_within_rule(case, dtype):
    """A loss of out and lse together (out . d_out + lse . d_lse): d_lse's rows that see no key hold
    random values and still give dq 0, no NaN; without d_lse the gradients are off (the control)."""
    B, Hq, Hkv, Lq, Lk, D, band, fn = D_LSE_CASES[case]
    kw = dict(band)
    if fn is not None:
        kw["mask"] = qkv.block_mask(fn, 1 if fn is _dead_rows_and_keys else B, 1 if fn is _dead_rows_and_keys else Hq,
                                    Lq, Lk, block_size=(96 if fn is _dead_rows_and_keys else 64, 128))
    q, k, v, d_out, d_lse = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=zlib.crc32(case.encode()) % 1000)
    (dq, _, _), lse = _check(q, k, v, d_out, d_lse, kw, f"d_lse {case} {dtype}", control={"d_lse": None})
    dead = torch.isinf(lse)
    if "dead" in case:
        assert dead.any()
    assert (dq[dead] == 0).all() and not torch.isnan(dq).any()


def test_only_d_lse():
    """d_out = 0 and d_lse alone: dS = P * dlse (the softmax's own lse gradient), within the rule."""
    q, k, v, _, d_lse = _inputs(1, 2, 1, 90, 140, 32, torch.float32, seed=4)
    _check(q, k, v, torch.zeros(1, 2, 90, 32), d_lse, {"causal": True}, "d_lse alone", control={"d_lse": None})


def test_block_mask_refusals():
    q, k, v, d_out, _ = _inputs(1, 2, 2, 200, 200, 16, torch.float32, seed=1)
    lse = torch.zeros(1, 2, 200)
    bm64 = qkv.block_mask(masks.causal(), 1, 1, 200, 200, block_size=64)  # key blocks of 64
    with pytest.raises(ValueError, match="key blocks of 64"):
        nb.backward(q, k, v, q, lse, d_out, build_spec(q, k, v, mask=bm64))
    with pytest.raises(ValueError, match="BlockMasks only"):
        nb.backward(q, k, v, q, lse, d_out, build_spec(q, k, v, mask=torch.ones(200, 200, dtype=torch.bool)))
    with pytest.raises(ValueError, match="d_lse"):
        nb.backward(q, k, v, q, lse, d_out, build_spec(q, k, v), d_lse=torch.zeros(1, 2, 199))


def test_block_lists_that_do_not_fit_are_code_4():
    """The kernel checks the struct against the call (bk 128, block counts): code 4, not a wild read."""
    bm = qkv.block_mask(masks.causal(), 1, 1, 200, 200)
    lists = native_blocks.block_lists(bm)
    q, k, v, d_out, _ = _inputs(1, 1, 1, 300, 200, 16, torch.float32, seed=2)  # Lq 300: 3 query blocks, not 2
    st = lambda t: nb._i64(t.stride())  # noqa: E731
    out = torch.zeros(1, 1, 300, 16)
    grads = [torch.empty(1, 1, 300, 16), torch.empty(1, 1, 200, 16), torch.empty(1, 1, 200, 16)]
    p = lambda t: t.data_ptr()  # noqa: E731
    struct = lists.struct()
    rc = nb.lib().qkv_flash_bwd(0, 1, 1, 1, 300, 200, 16, 16, p(q), st(q), p(k), st(k), p(v), st(v), p(out),
                                p(d_out), p(torch.zeros(1, 1, 300)), None, 0.25, -1, -1, 0,
                                *[p(g) for g in grads], 1, ctypes.byref(struct), None)
    assert rc == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_blocks_not_listed_are_never_touched(dtype):
    """NaN in the keys and values of a key block no query block lists, and in the queries and d_out of
    a query block that lists none: the gradients elsewhere are the same bits as with clean inputs
    (a product with a NaN key or query, even masked to P = 0, would spread it), and those keys' dk, dv
    and those rows' dq are 0."""
    def fn(b, h, q_idx, kv_idx):  # key block 2 (keys 256..383) and query block 0 (rows 0..63) unused
        return (q_idx >= 64) & ((kv_idx < 256) | (kv_idx >= 384)) & (kv_idx <= q_idx + 100)

    bm = qkv.block_mask(fn, 1, 1, 512, 512, block_size=(64, 128))
    q, k, v, d_out, d_lse = _inputs(1, 2, 1, 512, 512, 32, dtype, seed=9)
    with torch.no_grad():
        out, lse = qkv.attention_with_lse(q, k, v, mask=bm, backend="reference")
    spec = build_spec(q, k, v, mask=bm)
    clean = nb.backward(q, k, v, out, lse, d_out, spec, d_lse=d_lse.float())
    q2, k2, v2, d2 = q.clone(), k.clone(), v.clone(), d_out.clone()
    k2[:, :, 256:384] = float("nan")
    v2[:, :, 256:384] = float("nan")
    q2[:, :, :64] = float("nan")
    d2[:, :, :64] = float("nan")
    dirty = nb.backward(q2, k2, v2, out, lse, d2, spec, d_lse=d_lse.float())
    for name, a, b in zip("qkv", clean, dirty):
        assert torch.equal(a, b), f"d{name} changed with NaN in blocks that are not listed"
    assert not clean[0][:, :, :64].any() and not clean[1][:, :, 256:384].any() and not clean[2][:, :, 256:384].any()


# Partial blocks narrowed (the kernel's `tile`): strips of 16 rows compute only the 16-key chunks some
# row of the strip sees; dV and dK sum per chunk over the hull of the strips that computed it, dQ per
# strip over its chunks.
def _alternating(b, h, q_idx, kv_idx):
    """Strips of 16 rows that see alternately the first and the second 32 keys of each 64 (swapped by
    h), at most 64 keys ahead: a chunk's hull of strips holds strips that did not compute it."""
    return (((kv_idx // 32) + (q_idx // 16) + h) % 2 == 0) & (kv_idx <= q_idx + 64)


def _cells(b, h, q_idx, kv_idx):
    """Cells of 16 rows x 16 keys left out off the kernel's grid (rows + 5, keys + 7: edges mid-chunk)
    in a pattern that moves with b and h, whole strips of rows out (rows that see nothing among them),
    within keys [q - 150, q + 9]."""
    r, c = (q_idx + 5) // 16, (kv_idx + 7) // 16
    return ((r + c + b + h) % 3 != 0) & ((r + 2 * h) % 5 != 1) & (kv_idx <= q_idx + 9) & (kv_idx > q_idx - 150)


def _window(n):
    return lambda L: masks.causal_sliding_window(n)


# name: (mask function, factory(Lq) or None for the band alone, mask B, mask H, B, Hq, Hkv, Lq, Lk, D,
#        bq, band options, the control's options (gradients that must fail the rule))
NARROW_CASES = {
    "window37-mask-bq64": (_window(37), 1, 1, 1, 2, 1, 333, 333, 32, 64, {}, {"mask": None}),
    "window200-mask-bq128-gqa": (_window(200), 1, 1, 2, 4, 2, 530, 530, 48, 128, {}, {"mask": None}),
    "window200-mask-bq64-band-on-top": (_window(200), 1, 1, 1, 2, 2, 400, 400, 16, 64, {"window": (150, 0)},
                                        {"window": None}),
    "window37-band-gqa": (None, 1, 1, 1, 4, 2, 300, 300, 32, None, {"causal": True, "window": 37}, {"window": None}),
    "window200-band-longer-keys": (None, 1, 1, 1, 2, 1, 333, 470, 24, None, {"window": (200, 0)}, {"window": None}),
    "alternating-per-head-gqa-bq96": (_alternating, 1, 4, 2, 4, 2, 290, 310, 40, 96, {}, {"mask": None}),
    "cells-per-head-bq100": (_cells, 2, 4, 2, 4, 4, 310, 300, 32, 100, {}, {"mask": None}),
    "cells-bq256-band-on-top": (_cells, 2, 2, 2, 2, 1, 520, 540, 48, 256, {"window": (120, 5)}, {"mask": None}),
}


def _narrow_case(case, dtype):
    fn, mB, mH, B, Hq, Hkv, Lq, Lk, D, bq, band, control = NARROW_CASES[case]
    kw = dict(band)
    if fn is not None:
        mask_fn = fn if fn in (_alternating, _cells) else fn(Lq)
        kw["mask"] = qkv.block_mask(mask_fn, mB, mH, Lq, Lk, block_size=(bq, 128))
    q, k, v, d_out, d_lse = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=zlib.crc32(case.encode()) % 1000)
    return q, k, v, d_out, d_lse, kw, control


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(NARROW_CASES))
def test_narrowed_partial_blocks_within_rule(case, dtype):
    """Odd windows (37, 200: edges mid-chunk) as BlockMasks and as bands, bands on top of lists, masks
    by batch row and head with GQA, strips and whole blocks that some query ranges do not see, rows
    that see no key, and d_lse: within the rule, dq 0 for rows that see nothing, dk, dv 0 for keys
    that no row sees; the control (no mask, or no window) is outside it."""
    q, k, v, d_out, d_lse, kw, control = _narrow_case(case, dtype)
    (dq, dk, dv), lse = _check(q, k, v, d_out, d_lse, kw, f"narrow {case} {dtype}", control=control)
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    band = {key: val for key, val in kw.items() if key != "mask"}
    lo, hi = build_spec(q, k, v, **band).band_edges(torch.arange(Lq))
    cols = torch.arange(Lk)
    allowed = (cols >= lo[:, None]) & (cols < hi[:, None])  # (Lq, Lk)
    if "mask" in kw:
        allowed = kw["mask"].to_dense() & allowed
    allowed = allowed.expand(B, Hq, Lq, Lk)
    dead_rows = ~allowed.any(-1)
    assert torch.isinf(lse[dead_rows]).all() and (dq[dead_rows] == 0).all()
    unseen = ~allowed.unflatten(1, (Hkv, Hq // Hkv)).any(2).any(2)
    assert (dk[unseen] == 0).all() and (dv[unseen] == 0).all()
    if case.startswith("cells"):
        assert dead_rows.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_narrowed_d_lse_through_attention_with_lse(dtype):
    """The native backend end to end: a loss of qkv.attention_with_lse's out and lse under a BlockMask
    of a window of 37 with a band on top, gradients by autograd within the rule (float64 reference);
    without the lse term they are not."""
    bm = qkv.block_mask(masks.causal_sliding_window(37), None, None, 300, 300, block_size=(100, 128))
    kw = {"mask": bm, "window": (30, 0)}
    q, k, v, d_out, d_lse = _inputs(1, 4, 2, 300, 300, 32, dtype, seed=21)

    def grads(backend, x, with_lse=True):
        xs = [t.detach().clone().requires_grad_() for t in x]
        out, lse = qkv.attention_with_lse(*xs, backend=backend, **kw)
        loss = (out * d_out.to(out.dtype)).sum()
        if with_lse:
            loss = loss + (lse * d_lse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, xs)

    exact = grads("reference", [t.double() for t in (q, k, v)])
    plain = grads("reference", [q, k, v])
    for name, g, gp, ge in zip("qkv", grads("native", [q, k, v]), plain, exact):
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"attention_with_lse d{name} {dtype}")
    wrong = grads("native", [q, k, v], with_lse=False)
    assert not all(within_rule(g, gp, ge, factor=GRAD_FACTOR)[0] for g, gp, ge in zip(wrong, plain, exact))


@pytest.fixture(scope="module")
def whole_blocks():
    """The kernel built with QKV_BWD_NARROW=0 (every partial block computed whole), else as _kernels
    builds it (the same flags, so the same arithmetic)."""
    cxx = _kernels._compiler()
    assert cxx is not None  # the module's skip: the native build succeeded
    folder = Path(tempfile.mkdtemp(prefix="qkv-bwd-whole-"))
    so = folder / "whole.so"
    src = Path(_kernels.__file__).with_name("csrc") / f"{nb.NAME}.cpp"
    run = subprocess.run([cxx, *_kernels._FLAGS, _kernels._OPENMP, "-DQKV_BWD_NARROW=0", "-o", str(so), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    yield nb.typed(ctypes.CDLL(str(so)))
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(NARROW_CASES))
def test_narrowed_blocks_are_the_whole_blocks_bits(case, dtype, whole_blocks, monkeypatch):
    """Narrowing leaves out only exact zeros (masked P and dS) of sums that start from zero: dq, dk, dv
    are the same bits as the build that computes every partial block whole (a cell left out that some
    row sees, or garbage in one that was not computed, changes them)."""
    assert_narrowed_is_whole(case, dtype, whole_blocks, monkeypatch)


def assert_narrowed_is_whole(case, dtype, whole_blocks, monkeypatch) -> None:
    """nb.backward on NARROW_CASES[case] with the backend's kernel, then with `whole_blocks` (a build with
    QKV_BWD_NARROW=0): dq, dk, dv the same bits."""
    q, k, v, d_out, d_lse, kw, _ = _narrow_case(case, dtype)
    with torch.no_grad():
        out, lse = qkv.attention_with_lse(q, k, v, backend="reference", **kw)
    spec = build_spec(q, k, v, **kw)
    narrowed = nb.backward(q, k, v, out, lse, d_out, spec, d_lse=d_lse.float())
    monkeypatch.setattr(nb, "lib", lambda: whole_blocks)
    whole = nb.backward(q, k, v, out, lse, d_out, spec, d_lse=d_lse.float())
    for name, a, b in zip("qkv", narrowed, whole):
        assert torch.equal(a, b), f"{case} {dtype}: d{name} differs from the whole blocks' by {(a - b).abs().max()}"

"""qkv.masks: every named pattern against a dense construction written independently from
index formulas, the combinators, score functions, and BlockMask's exact classification of
blocks (full / partial / empty) against the dense mask."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import masks as M
from qkv.core import block_mask as BM


def _grid(Lq, Lk):
    i = torch.arange(Lq).view(-1, 1)  # (Lq, 1)
    j = torch.arange(Lk).view(1, -1)  # (1, Lk)
    return i, j


def _dense(fn, Lq, Lk, B=1, H=1):
    return M.dense_mask(fn, B, H, Lq, Lk)


# ------------------------------------------------------------------ patterns vs formulas
def _expected_doc(lengths, L, causal):
    doc = torch.full((L,), -1)
    start = 0
    for d, n in enumerate(lengths):
        doc[start : start + n] = d
        start += n
    i, j = _grid(L, L)
    out = (doc[i] == doc[j]) & (doc[i] >= 0)
    return out & (j <= i) if causal else out


def _expected_fixed(L, block, c):
    out = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(i + 1):
            out[i, j] = (i // block == j // block) or (j % block >= block - c)
    return out


PATTERNS = {
    # name: (mask function, expected (Lq, Lk) -> bool (Lq, Lk))
    "causal": (M.causal(), lambda i, j: j <= i),
    "causal-offset": (M.causal(offset=5), lambda i, j: j <= i + 5),
    "window": (M.sliding_window(7), lambda i, j: (j >= i - 7) & (j <= i + 7)),
    "window-asym": (M.sliding_window(9, 2), lambda i, j: (j >= i - 9) & (j <= i + 2)),
    "causal-window": (M.causal_sliding_window(11), lambda i, j: (j >= i - 11) & (j <= i)),
    "dilated": (M.dilated_sliding_window(4, 3), lambda i, j: ((i - j).abs() <= 12) & ((i - j) % 3 == 0)),
    "dilated-causal": (M.dilated_sliding_window(4, 3, causal=True),
                       lambda i, j: (i - j >= 0) & (i - j <= 12) & ((i - j) % 3 == 0)),
    "strided": (M.strided(8), lambda i, j: (j <= i) & ((i - j < 8) | ((i - j) % 8 == 0))),
    "global": (M.global_tokens([0, 3, 40]),
               lambda i, j: torch.isin(i, torch.tensor([0, 3, 40])) | torch.isin(j, torch.tensor([0, 3, 40]))),
    "global-first": (M.global_tokens(2), lambda i, j: (i < 2) | (j < 2)),
    "longformer": (M.longformer(5, [1, 60]),
                   lambda i, j: ((i - j).abs() <= 5) | torch.isin(i, torch.tensor([1, 60]))
                   | torch.isin(j, torch.tensor([1, 60]))),
    "prefix-lm": (M.prefix_lm(13), lambda i, j: (j < 13) | (j <= i)),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("Lq,Lk", [(77, 77), (50, 90), (90, 41)])
def test_pattern_matches_formula(name, Lq, Lk):
    fn, formula = PATTERNS[name]
    got = _dense(fn, Lq, Lk)[0, 0]
    want = formula(*_grid(Lq, Lk)).expand(Lq, Lk)
    assert torch.equal(got, want), f"{name}: {int((got != want).sum())} of {Lq * Lk} entries differ"


@pytest.mark.parametrize("block,c", [(8, 1), (10, 3), (16, 16)])
def test_fixed_pattern(block, c):
    got = _dense(M.fixed(block, c), 70, 70)[0, 0]
    assert torch.equal(got, _expected_fixed(70, block, c))


@pytest.mark.parametrize("lengths,causal", [([10, 25, 7, 30], False), ([10, 25, 7, 30], True),
                                            ([5, 0, 0, 40], True), ([80], False), ([0], False),
                                            ([0, 0], True)])
def test_document_pattern(lengths, causal):
    L = 80
    got = _dense(M.document(lengths, causal=causal), L, L)[0, 0]
    assert torch.equal(got, _expected_doc(lengths, L, causal))


@pytest.mark.parametrize("backend", ["reference", "tiled", "sparse", "native"])
def test_documents_all_empty_see_nothing(backend):
    """Only zero-length documents: every row sees nothing (out 0), on every backend; building the
    BlockMask indexed a table of width 0 (IndexError) before."""
    q = torch.randn(1, 1, 40, 8)
    bm = qkv.block_mask(M.document([0, 0]), None, None, 40, 40)
    assert bm.sparsity() == 100.0  # percent
    for mask in (M.document([0]), bm):
        assert torch.equal(qkv.attention(q, q, q, mask=mask, backend=backend), torch.zeros_like(q))


def test_document_per_batch_row():
    fn = M.document([[30, 50], [60, 20]])
    got = _dense(fn, 80, 80, B=2)
    assert torch.equal(got[0, 0], _expected_doc([30, 50], 80, False))
    assert torch.equal(got[1, 0], _expected_doc([60, 20], 80, False))


def test_prefix_lm_per_batch_row():
    got = _dense(M.prefix_lm(torch.tensor([4, 20])), 30, 30, B=2)
    i, j = _grid(30, 30)
    assert torch.equal(got[0, 0], (j < 4) | (j <= i))
    assert torch.equal(got[1, 0], (j < 20) | (j <= i))


def test_bigbird_structure():
    L, blk, g, w, r = 200, 10, 1, 3, 2
    m = _dense(M.bigbird(L, block=blk, num_global_blocks=g, num_window_blocks=w, num_random_blocks=r, seed=3),
               L, L)[0, 0]
    n = L // blk
    cells = m.view(n, blk, n, blk)  # (row block, row, col block, col)
    table = cells.all(3).all(1)  # (n, n)
    assert torch.equal(cells.any(3).any(1), table), "bigbird must be constant on each block"
    assert table[:g].all() and table[:, :g].all(), "global blocks see and are seen by all"
    idx = torch.arange(n)
    band = (idx.view(-1, 1) - idx.view(1, -1)).abs() <= w // 2
    assert table[band].all(), "window blocks missing"
    for row in range(g, n):
        extra = table[row] & ~band[row]
        extra[:g] = False
        assert int(extra.sum()) == r, f"row block {row}: {int(extra.sum())} random blocks, expected {r}"
    same = _dense(M.bigbird(L, block=blk, num_random_blocks=r, seed=3), L, L)
    other = _dense(M.bigbird(L, block=blk, num_random_blocks=r, seed=4), L, L)
    assert torch.equal(same[0, 0], m) and not torch.equal(other[0, 0], m)


def test_bigbird_ragged_length_sees_nothing_beyond():
    m = _dense(M.bigbird(95, block=10), 100, 100)[0, 0]
    assert not m[95:].any() and not m[:, 95:].any()


def test_combinators():
    a, b = M.causal(), M.sliding_window(4)
    i, j = _grid(40, 40)
    ca, cb = j <= i, (i - j).abs() <= 4
    assert torch.equal(_dense(M.and_masks(a, b), 40, 40)[0, 0], ca & cb)
    assert torch.equal(_dense(M.or_masks(a, b), 40, 40)[0, 0], ca | cb)
    assert torch.equal(_dense(M.not_mask(a), 40, 40)[0, 0], ~ca)
    assert _dense(M.and_masks(), 5, 5).all() and not _dense(M.or_masks(), 5, 5).any()
    user = lambda b_, h_, q, k: (q + k) % 3 == 0  # noqa: E731
    assert torch.equal(_dense(M.and_masks(a, user), 40, 40)[0, 0], ca & ((i + j) % 3 == 0))


def test_combinator_rejects_non_function():
    with pytest.raises(TypeError, match="mask functions"):
        M.and_masks(M.causal(), 3)


# ------------------------------------------------------------------ score functions
def test_alibi_slopes():
    assert torch.allclose(M.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s6 = M.alibi_slopes(6)  # 4 slopes of n=4, then every other of n=8
    want = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert torch.allclose(s6, torch.tensor(want))


def test_score_functions_match_formulas():
    H, Lq, Lk = 4, 9, 12
    score = torch.randn(1, H, Lq, Lk, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.arange(H).view(1, -1, 1, 1)
    q = torch.arange(Lq).view(1, 1, -1, 1)
    k = torch.arange(Lk).view(1, 1, 1, -1)
    slopes = M.alibi_slopes(H).double()
    for hh in range(H):
        for i in range(Lq):
            for j in range(Lk):
                want = score[0, hh, i, j] - slopes[hh] * abs(i - j)
                assert abs(M.alibi(H)(score, b, h, q, k)[0, hh, i, j] - want) < 1e-12
    cap = M.soft_cap(2.0)(score * 10, b, h, q, k)
    # at most the cap: tanh rounds to exactly 1 past |x| of about 19 in float64 (the unseeded draw here once
    # reached it and failed a strict "< 2.0")
    assert torch.allclose(cap, 2.0 * torch.tanh(score * 5)) and cap.abs().max() <= 2.0
    table = torch.randn(H, 2 * 3 + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rel = M.relative_position_bias(table, 3)(score, b, h, q, k)
    want = score.clone()
    for hh in range(H):
        for i in range(Lq):
            for j in range(Lk):
                want[0, hh, i, j] += table[hh, max(-3, min(3, j - i)) + 3]
    assert torch.allclose(rel, want)


def test_score_function_validation():
    with pytest.raises(ValueError, match="2\\*max_distance\\+1"):
        M.relative_position_bias(torch.zeros(2, 5), 3)
    with pytest.raises(ValueError, match="one slope per head"):
        M.alibi(4, slopes=torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        M.soft_cap(0)


# ------------------------------------------------------------------ BlockMask
def _dense_states(dense, bq, bk):
    """(B, H, nq, nk) 0 empty / 1 partial / 2 full, straight from a dense (B, H, Lq, Lk) mask."""
    B, H, Lq, Lk = dense.shape
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    out = torch.zeros(B, H, nq, nk, dtype=torch.int8)
    for a in range(nq):
        for c in range(nk):
            blk = dense[:, :, a * bq : (a + 1) * bq, c * bk : (c + 1) * bk]
            out[:, :, a, c] = torch.where(blk.all(-1).all(-1), 2, torch.where(blk.any(-1).any(-1), 1, 0)).to(torch.int8)
    return out


def _random_fn(seed):
    g = torch.Generator().manual_seed(seed)
    lo, width = int(torch.randint(-20, 20, (1,), generator=g)), int(torch.randint(0, 40, (1,), generator=g))
    return lambda b, h, q, k: (q - k >= lo) & (q - k <= lo + width)


CLASSIFY_CASES = {
    **{name: fn for name, (fn, _) in PATTERNS.items()},
    "fixed": M.fixed(10, 2),
    "bigbird": M.bigbird(150, block=12, num_random_blocks=2, seed=1),
    "document": M.document([17, 40, 3, 60]),
    "document-causal": M.document([17, 40, 3, 60], causal=True),
    "not-window": M.not_mask(M.sliding_window(20)),
    "window-and-user": M.and_masks(M.sliding_window(30), lambda b, h, q, k: (q * 7 + k) % 5 != 0),
    "user-random-band": _random_fn(0),
    "head-dependent": lambda b, h, q, k: (k <= q + 10 * h - 15) | (b == 1) & (k % 17 == 0),
}


@pytest.mark.parametrize("name", sorted(CLASSIFY_CASES))
@pytest.mark.parametrize("block", [(16, 16), (32, 8), (7, 13)])
def test_block_mask_classification_is_exact(name, block):
    fn, Lq, Lk = CLASSIFY_CASES[name], 150, 131
    B, H = (2, 3) if name == "head-dependent" else (1, 1)
    bm = qkv.block_mask(fn, B, H, Lq, Lk, block_size=block)
    dense = _dense(fn, Lq, Lk, B, H)
    want = _dense_states(dense, *block)
    got = bm.block_states().expand_as(want)
    assert torch.equal(got, want), f"{name}: {int((got != want).sum())} blocks misclassified"
    assert torch.equal(bm.to_dense(), dense), f"{name}: to_dense differs from the mask function"


@pytest.mark.parametrize("name", ["causal", "window", "causal-window", "global", "prefix-lm"])
def test_named_patterns_are_classified_without_evaluating_elements(name, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("evaluated elements although the pattern has an exact classifier")

    fn = PATTERNS[name][0]
    if name in ("prefix-lm",):  # OR of two partial blocks is evaluated: only on the diagonal
        calls = []
        real = BM._evaluate_unknown
        monkeypatch.setattr(BM, "_evaluate_unknown",
                            lambda mm, unknown, *a: calls.append(int(unknown.sum())) or real(mm, unknown, *a))
        M.block_mask(fn, 1, 1, 4096, block_size=128)
        assert sum(calls) <= 32, f"evaluated {sum(calls)} blocks, expected at most the 32 diagonal ones"
        return
    monkeypatch.setattr(BM, "_evaluate_unknown", fail)
    M.block_mask(fn, 1, 1, 4096, block_size=128)


def test_block_mask_128k_sliding_window_layout():
    bm = qkv.block_mask(M.sliding_window(256), None, None, 131072, block_size=128)
    assert bm.num_blocks == (1024, 1024)
    c = bm.counts()
    # each interior row: blocks kb with |kb - qb| <= 2 are non-empty; |kb - qb| <= 1 full
    assert c["full"] == 1024 * 3 - 2 and c["partial"] == 1024 * 2 - 4
    assert bm.sparsity() > 99.0


def test_block_mask_layout_tensors_and_broadcast():
    bm = qkv.block_mask(M.causal(), 4, 8, 100, block_size=32)
    assert bm.kv_num_blocks.shape == (1, 1, 4) and bm.full_kv_num_blocks.shape == (1, 1, 4)
    assert bm.full_kv_num_blocks.flatten().tolist() == [0, 1, 2, 3]
    assert bm.kv_num_blocks.flatten().tolist() == [1, 1, 1, 1]
    assert bm.kv_indices[0, 0, :, 0].tolist() == [0, 1, 2, 3]
    per_head = qkv.block_mask(lambda b, h, q, k: k <= q + h * 40, 1, 3, 100, block_size=32)
    assert per_head.kv_num_blocks.shape[:2] == (1, 3)


def test_block_mask_picture_and_repr():
    bm = qkv.block_mask(M.causal(), 1, 1, 64, block_size=16)
    assert bm.picture() == "░···\n█░··\n██░·\n███░"
    text = repr(bm)
    assert "sparsity=37.5%" in text and "full=6" in text and text.endswith(bm.picture())
    big = qkv.block_mask(M.causal(), 1, 1, 4096, block_size=16)  # 256 blocks a side, grouped
    assert len(big.picture(max_size=32).splitlines()) == 32


def test_check_compatible_messages():
    bm = qkv.block_mask(M.causal(), 2, 4, 64, 80, block_size=16)
    bm.check_compatible(2, 4, 64, 80)
    with pytest.raises(ValueError, match="heads 4 .*Hq=8"):
        bm.check_compatible(2, 8, 64, 80)
    with pytest.raises(ValueError, match="key length 80 .*Lk=81"):
        bm.check_compatible(2, 4, 64, 81)
    q = torch.randn(3, 4, 64, 8)
    k = torch.randn(3, 4, 80, 8)
    with pytest.raises(ValueError, match="batch 2 .*B=3"):
        qkv.attention(q, k, k, mask=bm)


def test_block_mask_validation():
    with pytest.raises(TypeError, match="mask functions"):
        qkv.block_mask("causal", 1, 1, 10)
    with pytest.raises(TypeError, match="block_size"):
        qkv.block_mask(M.causal(), 1, 1, 10, block_size=(4, 4, 4))
    with pytest.raises(ValueError, match="Lq must be >= 0"):
        qkv.block_mask(M.causal(), 1, 1, -3)
    with pytest.raises(TypeError, match="bool tensor"):
        qkv.block_mask(lambda b, h, q, k: q - k, 1, 1, 10)


def test_dense_block_reevaluates_the_function():
    fn = lambda b, h, q, k: (q * 3 + k) % 4 == 1  # noqa: E731
    bm = qkv.block_mask(fn, 1, 1, 50, 60, block_size=16)
    i, j = _grid(50, 60)
    assert torch.equal(bm.dense_block(16, 32, 48, 60).squeeze(0).squeeze(0), ((i * 3 + j) % 4 == 1)[16:32, 48:60])

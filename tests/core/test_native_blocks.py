"""The native kernels' block lists (core/engines/native_blocks.py) describe exactly the BlockMask's mask."""

import pytest
import torch

import qkv
from qkv import masks
from qkv.core.engines import native_blocks as nb


def _per_head(b, h, q, k):
    return (k <= q) & ((q - k) < 100 * (b + 1) * (h + 1))


@pytest.mark.parametrize("fn, B, H, Lq, Lk", [
    (masks.causal_sliding_window(256), 1, 1, 2000, 2000),
    (masks.document([300, 701, 999], causal=True), 1, 1, 2000, 2000),
    (masks.longformer(256, 16), 1, 1, 1500, 1500),
    (_per_head, 2, 3, 700, 600),
])
def test_lists_are_the_mask(fn, B, H, Lq, Lk):
    bm = qkv.block_mask(fn, B, H, Lq, Lk)
    lists = nb.block_lists(bm)
    assert torch.equal(nb.dense(lists, B, H, Lq, Lk), bm.to_dense().expand(B, H, Lq, Lk))
    # The key-major lists hold the same entries, query blocks ascending within each key block.
    q_entries = {(i, int(lists.q_kb[e]), int(lists.q_tile[e]))
                 for i in range(lists.nq) for e in range(int(lists.q_ptr[i]), int(lists.q_ptr[i + 1]))}
    k_entries = set()
    for j in range(lists.nk):
        span = range(int(lists.k_ptr[j]), int(lists.k_ptr[j + 1]))
        got = [int(lists.k_qb[e]) for e in span]
        assert got == sorted(got)
        k_entries |= {(int(lists.k_qb[e]), j, int(lists.k_tile[e])) for e in span}
    assert q_entries == k_entries and len(q_entries) == lists.nnz
    assert lists.struct().ntiles == lists.ntiles
    assert nb.block_lists(bm) is lists  # cached with the mask


def test_full_blocks_carry_no_tile():
    bm = qkv.block_mask(masks.causal(), 1, 1, 1024, 1024)
    lists = nb.block_lists(bm)
    assert lists.ntiles == 8  # the diagonal blocks only
    assert int((lists.q_tile < 0).sum()) == 8 * 7 // 2


def test_refusals_name_the_fix():
    bm = qkv.block_mask(masks.causal(), 1, 1, 512, 512, block_size=64)
    assert "block_size=128" in nb.why_not(bm)
    with pytest.raises(ValueError, match="key blocks of 64"):
        nb.block_lists(bm)

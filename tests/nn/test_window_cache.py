"""Sliding-window KV caches (`KVCache(windows=...)`): a windowed layer keeps only the tokens its
window reaches, and whatever attends over it gets what a full cache gives: chunks of every size
with bottom-right causal alignment, a key padding mask over all positions, mask and score
functions indexed by position, `stored`, `crop`; buffers stay window + chunk sized."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.nn import KVCache, MultiHeadAttention, RotaryEmbedding, alibi_score_mod, alibi_slopes

E, H, HKV, D = 32, 4, 2, 8


def _layer(seed=0):
    torch.manual_seed(seed)
    return MultiHeadAttention(E, H, num_kv_heads=HKV).double().eval()


def _run(mha, x, steps, cache, *, window, pad=None, score_mod=None, mask_fn=None):
    """Feed x (B, L, E) in chunks of `steps` through mha with `cache`; -> outputs (B, L, E).
    pad: (B, L) bool key padding (False = padding) over all positions, sliced per step as
    CausalLM.hidden does ((B, 1, 1, n + l))."""
    rope = RotaryEmbedding(D)
    outs, start = [], 0
    for n in steps:
        pos = torch.arange(start, start + n)
        mask = None
        if pad is not None:
            mask = pad[:, None, None, :start + n]  # (B, 1, 1, n + l)
        elif mask_fn is not None:
            mask = mask_fn
        outs.append(mha(x[:, start:start + n], causal=True, window=window, mask=mask, score_mod=score_mod,
                        rotary=rope(pos, torch.float64), cache=cache))
        start += n
    return torch.cat(outs, dim=1)


def _caches(windows, B=2, capacity=4):
    full = KVCache(len(windows), B, HKV, D, capacity=capacity, dtype=torch.float64)
    trimmed = KVCache(len(windows), B, HKV, D, capacity=capacity, dtype=torch.float64, windows=windows)
    return full, trimmed


STEPS = [5, 3, 1, 1, 4, 1, 1, 1, 6, 1, 1, 2, 1, 1, 1, 1]  # 30 tokens: chunks longer and shorter than the window


@pytest.mark.parametrize("keep", [0, 1, 3, 7])
def test_windowed_layer_equals_a_full_cache(keep):
    """Chunks of 1..6 tokens against a cache keeping `keep` tokens give the full cache's outputs;
    `stored` holds at least the last `keep` tokens, equal to the full cache's, and the buffer
    never holds more than keep + max(chunk, slack) tokens."""
    mha = _layer()
    x = torch.randn(2, sum(STEPS), E, dtype=torch.float64)
    full, trimmed = _caches([keep])
    want = _run(mha, x, STEPS, full, window=(keep, 0))
    peak = 0
    update = trimmed.update

    def watched(layer, k, v):
        nonlocal peak
        out = update(layer, k, v)
        peak = max(peak, trimmed.layer_capacity(layer))
        return out

    trimmed.update = watched
    got = _run(mha, x, STEPS, trimmed, window=(keep, 0))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert peak <= keep + max(max(STEPS), max(1, keep // 4)), peak
    assert trimmed.length == full.length == sum(STEPS)
    k_t, v_t = trimmed.stored(0)
    k_f, v_f = full.stored(0)
    m = k_t.shape[2]
    assert keep <= m < sum(STEPS) and trimmed.start(0) == sum(STEPS) - m
    torch.testing.assert_close(k_t, k_f[:, :, -m:], rtol=0, atol=0)
    torch.testing.assert_close(v_t, v_f[:, :, -m:], rtol=0, atol=0)


def test_padding_mask_over_all_positions_is_sliced():
    """A left-padded batch: the key padding mask covers every position, as CausalLM.hidden gives
    it; the windowed layer slices it to the positions it kept."""
    mha = _layer(1)
    L = sum(STEPS)
    x = torch.randn(2, L, E, dtype=torch.float64)
    pad = torch.ones(2, L, dtype=torch.bool)
    pad[1, :4] = False  # row 1: 4 slots of left padding
    full, trimmed = _caches([3])
    want = _run(mha, x, STEPS, full, window=(3, 0), pad=pad)
    got = _run(mha, x, STEPS, trimmed, window=(3, 0), pad=pad)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_score_and_mask_functions_see_full_positions():
    """A score_mod that reads kv_idx (ALiBi, offset for the full length) and a mask function of
    the positions give the same outputs with a trimmed cache: they see full-cache key indices."""
    mha = _layer(2)
    L = sum(STEPS)
    x = torch.randn(1, L, E, dtype=torch.float64)
    slopes = alibi_slopes(H)
    outs = []
    for cache in _caches([4], B=1):
        rope = RotaryEmbedding(D)
        parts, start = [], 0
        for n in STEPS:
            # ALiBi with bottom-right alignment: query row i (position start + i) sits at key i + start
            score = alibi_score_mod(slopes, n, start + n)

            def even(b, h, q, kv, start=start):  # even keys, and each query's own (odd) position
                return (kv % 2 == 0) | (kv >= q + start)

            parts.append(mha(x[:, start:start + n], causal=True, window=(4, 0), mask=even, score_mod=score,
                             rotary=rope(torch.arange(start, start + n), torch.float64), cache=cache))
            start += n
        outs.append(torch.cat(parts, dim=1))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)


def test_mixed_layers_windowed_and_global():
    """Layer 0 windowed, layer 1 global (Gemma 2/3 alternate them): the global layer keeps all."""
    layers = [_layer(3), _layer(4)]
    x = torch.randn(2, sum(STEPS), E, dtype=torch.float64)
    results = []
    for cache in _caches([3, None]):
        rope = RotaryEmbedding(D)
        outs, start = [], 0
        for n in STEPS:
            h = x[:, start:start + n]
            for i, (mha, window) in enumerate(zip(layers, [(3, 0), None])):
                h = h + mha(h, causal=True, window=window, rotary=rope(torch.arange(start, start + n), torch.float64),
                            cache=cache, layer=i)
            outs.append(h)
            start += n
        results.append((torch.cat(outs, dim=1), cache))
    (want, full), (got, trimmed) = results
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert trimmed.windows == (3, None)
    assert trimmed.stored(1)[0].shape[2] == sum(STEPS) and trimmed.start(1) == 0
    assert trimmed.stored(0)[0].shape[2] < sum(STEPS)
    assert trimmed.nbytes < full.nbytes


def test_crop_goes_back_as_far_as_the_window_allows():
    cache = KVCache(2, 1, HKV, D, windows=[3, None], slack=2)
    for _ in range(10):
        cache.update(0, torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D))
        cache.update(1, torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D))
    start = cache.start(0)
    assert start > 0 and cache.length == 10
    kept = cache.stored(0)[0].clone()
    with pytest.raises(ValueError, match=f"layer 0 keeps only its last 3 tokens .* back to position {start + 3}"):
        cache.crop(start + 2)
    assert cache.length == 10 and cache.layer_length(1) == 10  # a refused crop changes nothing
    cache.crop(start + 3)
    assert cache.length == start + 3 and cache.layer_length(1) == start + 3
    torch.testing.assert_close(cache.stored(0)[0], kept[:, :, :3])
    assert cache.stored(1)[0].shape[2] == start + 3
    cache.crop(0)  # emptying is always possible (Phi-3 runs the whole sequence again at its longrope switch)
    assert cache.length == 0 and cache.start(0) == 0 and cache.stored(0)[0].shape[2] == 0
    cache.update(0, torch.randn(1, HKV, 2, D), torch.randn(1, HKV, 2, D))
    assert cache.layer_length(0) == 2 and cache.start(0) == 0


def test_a_window_wider_than_the_cache_keeps_is_refused():
    mha = _layer()
    cache = KVCache(1, 1, HKV, D, windows=[3], dtype=torch.float64)
    x = torch.randn(1, 5, E, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"keeps only the 3 tokens before each new one, but this attention looks "
                                         r"back over every token"):
        mha(x, causal=True, cache=cache)
    with pytest.raises(ValueError, match="looks back 5 tokens"):
        mha(x, causal=True, window=(5, 0), cache=cache)


def test_block_mask_after_tokens_were_dropped_is_refused():
    mha = _layer()
    cache = KVCache(1, 1, HKV, D, windows=[2], slack=1, dtype=torch.float64)
    mha(torch.randn(1, 6, E, dtype=torch.float64), causal=True, window=(2, 0), cache=cache)
    bm = qkv.block_mask(lambda b, h, q, kv: kv <= q + 6, Lq=2, Lk=8, block_size=2)
    from torch.nn.attention.flex_attention import create_block_mask

    flex = create_block_mask(lambda b, h, q, kv: kv <= q + 6, 1, 1, 2, 8, device="cpu", BLOCK_SIZE=2)
    for mask in (bm, flex):  # qkv's own and FlexAttention's: both laid out for all 8 positions
        with pytest.raises(ValueError, match="is laid out for the full key length"):
            mha(torch.randn(1, 2, E, dtype=torch.float64), causal=True, window=(2, 0), mask=mask, cache=cache)


@pytest.mark.parametrize("windows, match", [([1], "one entry per layer"), ([-1, None], "windows\\[0\\]"),
                                            ([2.0, None], "windows\\[0\\]")])
def test_bad_windows_are_refused(windows, match):
    with pytest.raises(ValueError, match=match):
        KVCache(2, 1, HKV, D, windows=windows)


def test_a_long_chunk_then_decoding_shrinks_the_buffer():
    """One 200-token chunk needs a 200-token buffer; at the next compaction it shrinks back to
    keep + slack."""
    cache = KVCache(1, 1, HKV, D, windows=[8], capacity=512)
    assert cache.layer_capacity(0) == 8 + 2  # preallocated keep + slack, not capacity
    cache.update(0, torch.randn(1, HKV, 200, D), torch.randn(1, HKV, 200, D))
    assert cache.layer_capacity(0) == 200
    cache.update(0, torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D))
    assert cache.layer_capacity(0) == 10 and cache.start(0) == 192 and cache.length == 201

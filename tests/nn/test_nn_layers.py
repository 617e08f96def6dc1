"""qkv.nn against independent references: torch.nn.MultiheadAttention, an explicit GQA
computation, transformers' Llama rotary code, ALiBi's published slopes, and full recompute
for the KV cache."""

from __future__ import annotations

import math

import pytest
import torch

import qkv
from qkv.nn import (
    KVCache,
    LearnedPositions,
    MultiHeadAttention,
    RotaryEmbedding,
    alibi_bias,
    alibi_score_mod,
    alibi_slopes,
    apply_rotary,
)


def _close(a, b, what, tol=1e-5):
    err = (a - b).abs().max().item()
    assert err < tol, f"{what}: max error {err:.2e}"


@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_matches_torch_multihead(bias):
    torch.manual_seed(0)
    E, H = 24, 3
    ours = MultiHeadAttention(E, H, bias=bias)
    ref = torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=True)
    assert ours.fused
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv_proj.weight)  # both (3E, E), rows q | k | v
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        if bias:
            ref.in_proj_bias.copy_(ours.qkv_proj.bias)
            ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 7, E)
    pad = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # True = blocked, torch's convention
    want = ref(x, x, x, key_padding_mask=~pad, attn_mask=causal, need_weights=False)[0]
    got = ours(x, mask=pad[:, None, None, :], causal=True)
    _close(got, want, "self-attention vs torch.nn.MultiheadAttention")
    assert (ours.qkv_proj.bias is None) == (not bias)


def test_cross_attention_with_kdim_vdim_matches_torch():
    torch.manual_seed(1)
    E, H, kdim, vdim = 16, 4, 10, 6
    ours = MultiHeadAttention(E, H, kdim=kdim, vdim=vdim)
    assert not ours.fused
    ref = torch.nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=True)
    with torch.no_grad():
        ref.q_proj_weight.copy_(ours.q_proj.weight)
        ref.k_proj_weight.copy_(ours.k_proj.weight)
        ref.v_proj_weight.copy_(ours.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x, k, v = torch.randn(2, 5, E), torch.randn(2, 9, kdim), torch.randn(2, 9, vdim)
    _close(ours(x, k, v), ref(x, k, v, need_weights=False)[0], "cross-attention vs torch")


def test_fused_cross_attention_equals_separate_projections():
    torch.manual_seed(2)
    fused = MultiHeadAttention(16, 4)
    sep = MultiHeadAttention(16, 4, fused=False)
    with torch.no_grad():
        wq, wk, wv = fused.qkv_proj.weight.split(16)
        bq, bk, bv = fused.qkv_proj.bias.split(16)
        for lin, w, b in ((sep.q_proj, wq, bq), (sep.k_proj, wk, bk), (sep.v_proj, wv, bv)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        sep.out_proj.load_state_dict(fused.out_proj.state_dict())
    x, mem = torch.randn(1, 3, 16), torch.randn(1, 8, 16)
    _close(fused(x, mem), sep(x, mem), "fused vs separate cross-attention")
    _close(fused(x), sep(x), "fused vs separate self-attention")


@pytest.mark.parametrize("Hkv", [2, 1])
def test_grouped_and_multi_query_heads(Hkv):
    torch.manual_seed(3)
    E, H, D = 32, 4, 6
    m = MultiHeadAttention(E, H, num_kv_heads=Hkv, head_dim=D, bias=False)
    x = torch.randn(2, 5, E)
    q, k, v = m.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = q.view(2, 5, H, D).transpose(1, 2)
    k = k.view(2, 5, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # each kv head serves H/Hkv query heads
    v = v.view(2, 5, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D) + torch.full((5, 5), float("-inf")).triu(1)
    want = m.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, H * D))
    _close(m(x, causal=True), want, f"GQA Hkv={Hkv}")


def test_dropout_only_in_training():
    torch.manual_seed(4)
    m = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 6, 16)
    m.eval()
    assert torch.equal(m(x), m(x)), "eval mode is deterministic"
    m.train()
    assert not torch.allclose(m(x), m(x)), "training mode drops attention weights"


def test_bad_head_arguments():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MultiHeadAttention(12, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="pass head_dim"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="fused=False"):
        MultiHeadAttention(8, 2, kdim=4, fused=True)
    with pytest.raises(ValueError, match=r"x must be \(B, L, E=8\)"):
        MultiHeadAttention(8, 2)(torch.randn(2, 3, 5))


def test_rotary_matches_transformers_llama_convention():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(5)
    D = 16
    rope = RotaryEmbedding(D, theta=10000.0)
    pos = torch.arange(3, 10)
    cos, sin = rope(pos)  # (L, D)
    q, k = torch.randn(2, 4, 7, D), torch.randn(2, 2, 7, D)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    _close(apply_rotary(q, cos, sin), want_q, "rotated q vs transformers")
    _close(apply_rotary(k, cos, sin), want_k, "rotated k vs transformers")


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_scores_depend_only_on_distance(interleaved):
    torch.manual_seed(6)
    D = 8
    rope = RotaryEmbedding(D, interleaved=interleaved)
    q, k = torch.randn(D), torch.randn(D)

    def score(i, j):
        ci, si = rope(torch.tensor([i]))
        cj, sj = rope(torch.tensor([j]))
        return (apply_rotary(q.view(1, 1, 1, D), ci, si, interleaved=interleaved)
                * apply_rotary(k.view(1, 1, 1, D), cj, sj, interleaved=interleaved)).sum()

    assert abs(score(5, 2) - score(13, 10)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-4


def test_alibi_slopes_and_bias_equal_score_mod():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(12).shape == (12,)
    torch.manual_seed(7)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, 3, 6)  # (1, 4, 3, 6)
    assert slopes[0] == 0.25  # 2^(-8/4) for 4 heads
    assert bias[0, 0, 0].tolist() == [-0.75, -0.5, -0.25, 0.0, -0.25, -0.5]  # query 0 sits at key 3
    a = qkv.attention(q, k, v, mask=bias, causal=True)
    b = qkv.attention(q, k, v, score_mod=alibi_score_mod(slopes, 3, 6), causal=True)
    _close(a, b, "ALiBi as a float mask vs as a score_mod")


def test_kv_cache_chunks_equal_full_causal_run():
    """Prompt of 4, a chunk of 3, then single tokens, with RoPE and a cache that must grow."""
    torch.manual_seed(8)
    E, H, Hkv, D = 32, 4, 2, 8
    m = MultiHeadAttention(E, H, num_kv_heads=Hkv).eval()
    rope = RotaryEmbedding(D)
    x = torch.randn(2, 10, E)
    full = m(x, causal=True, rotary=rope(torch.arange(10)))
    cache = KVCache(1, 2, Hkv, D, capacity=3)
    outs, start = [], 0
    for n in (4, 3, 1, 1, 1):
        pos = torch.arange(start, start + n)
        outs.append(m(x[:, start:start + n], causal=True, rotary=rope(pos), cache=cache))
        start += n
    _close(torch.cat(outs, dim=1), full, "cached chunks vs full run")
    assert cache.length == 10 and cache.capacity >= 10
    cache.crop(7)
    assert cache.length == 7


def test_kv_cache_rejects_wrong_shapes():
    cache = KVCache(2, 1, 2, 4)
    with pytest.raises(ValueError, match="KVCache holds"):
        cache.update(0, torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))
    with pytest.raises(ValueError, match="layer must be in"):
        cache.update(2, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))


def test_learned_positions_name_the_limit():
    table = LearnedPositions(8, 4)
    assert table(torch.arange(8)).shape == (8, 4)
    with pytest.raises(ValueError, match="beyond this model's 8 learned positions"):
        table(torch.arange(9))


@pytest.mark.parametrize("scaling", [{"rope_type": "linear"},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}])
def test_rope_scaling_without_its_parameters_names_them(scaling):
    with pytest.raises(ValueError, match="needs .*factor"):
        RotaryEmbedding(16, rope_scaling=scaling)

"""Partial rotary embeddings (`apply_rotary` with tables narrower than the head) and the q/k
norms of `MultiHeadAttention`, each against the computation written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qkv
from qkv.nn import MultiHeadAttention, RotaryEmbedding, apply_rotary


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotation_rotates_the_first_features_only(interleaved):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64)  # (B, H, L, D)
    cos, sin = RotaryEmbedding(4, 100.0, interleaved=interleaved)(torch.arange(3, 8), dtype=torch.float64)  # (L, 4)
    out = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.equal(out[..., :4], apply_rotary(x[..., :4].contiguous(), cos, sin, interleaved=interleaved))
    assert (out[..., :4] - x[..., :4]).abs().max() > 1e-3, "the rotated part moved"


def test_rotary_wider_than_the_head_is_refused():
    cos, sin = RotaryEmbedding(32)(torch.arange(4))
    with pytest.raises(ValueError, match="do not fit heads of size 16"):
        apply_rotary(torch.randn(1, 1, 4, 16), cos, sin)


@pytest.mark.parametrize("per_head", [True, False])
def test_qk_norm_is_applied_before_attention(per_head):
    torch.manual_seed(0)
    E, H, Hkv, D = 32, 4, 2, 8
    q_norm = nn.LayerNorm(D if per_head else H * D)
    k_norm = nn.LayerNorm(D if per_head else Hkv * D)
    for p in [*q_norm.parameters(), *k_norm.parameters()]:
        nn.init.uniform_(p, 0.5, 1.5)
    mha = MultiHeadAttention(E, H, num_kv_heads=Hkv, q_norm=q_norm, k_norm=k_norm, qk_norm_per_head=per_head).double()
    x = torch.randn(2, 6, E, dtype=torch.float64)  # (B, L, E)
    q, k, v = mha.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)  # (B, L, *)
    if per_head:
        q, k = q_norm(q.unflatten(-1, (H, D))), k_norm(k.unflatten(-1, (Hkv, D)))  # (B, L, H|Hkv, D)
    else:
        q, k = q_norm(q).unflatten(-1, (H, D)), k_norm(k).unflatten(-1, (Hkv, D))
    v = v.unflatten(-1, (Hkv, D))
    ref = qkv.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, backend="reference")
    want = mha.out_proj(ref.transpose(1, 2).flatten(2))  # (B, L, E)
    assert (mha(x, causal=True) - want).abs().max().item() < 1e-12
    assert "q_norm.weight" in dict(mha.named_parameters())


@pytest.mark.parametrize("family", ["olmo2", "cohere"])
def test_rotation_in_float32_equals_olmo2_and_cohere(family):
    """bfloat16 queries and keys rotated as OLMo 2 (float32 tables, float32 arithmetic) and Cohere
    (bfloat16 tables, float32 arithmetic, interleaved pairs) rotate them: bit for bit equal to
    transformers' own apply_rotary_pos_emb; rotating in bfloat16 (Llama's way) is not."""
    if family == "olmo2":
        from transformers.models.olmo2.modeling_olmo2 import apply_rotary_pos_emb
    else:
        from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb
    torch.manual_seed(0)
    E, H, D, L = 64, 4, 16, 7
    table_dtype = torch.float32 if family == "olmo2" else torch.bfloat16
    cos, sin = RotaryEmbedding(D, 100.0, interleaved=family == "cohere")(torch.arange(L), dtype=table_dtype)  # (L, D)

    def rotated(rotary_dtype, tables):
        mha = MultiHeadAttention(E, H, interleaved_rotary=family == "cohere", rotary_dtype=rotary_dtype).bfloat16()
        mha.load_state_dict(reference.state_dict())
        seen = []
        mha.recorder = lambda module, q, k, v, **kw: seen.append((q, k))
        mha(x, causal=True, rotary=tables)
        return seen[0]  # (B, H, L, D) each

    reference = MultiHeadAttention(E, H).bfloat16()
    x = torch.randn(2, L, E).bfloat16()  # (B, L, E)
    q, k, _ = reference.qkv_proj(x).split(H * D, dim=-1)  # (B, L, H*D) each
    q, k = (t.view(2, L, H, D).transpose(1, 2) for t in (q, k))  # (B, H, L, D)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])  # cos (1, L, D) -> unsqueezed to (1, 1, L, D)
    got_q, got_k = rotated(torch.float32, (cos, sin))
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    plain_q, _ = rotated(None, (cos.bfloat16(), sin.bfloat16()))  # Llama's way: bfloat16 tables and arithmetic
    assert not torch.equal(plain_q, want_q), "rotating in bfloat16 gives the same bits: the test could not fail"

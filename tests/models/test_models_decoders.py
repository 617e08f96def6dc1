"""GPT-2, Llama and the Llama-like families (Mistral with a sliding window shorter than the
sequences, Qwen2 with q/k/v biases) against transformers on tiny random checkpoints: logits,
greedy generation, and KV-cache decoding against recomputing the whole sequence."""

from __future__ import annotations

import pytest
import torch
from hf_folders import build_folder, decode_in_steps

import qkv

KINDS = ["gpt2", "llama", "mistral", "qwen2"]


@pytest.fixture(params=KINDS)
def pair(request):
    folder, ref = request.getfixturevalue(f"{request.param}_folder")
    return qkv.load(folder), ref


def _ids(B=2, L=11, V=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, V, (B, L), generator=g)


def test_logits_match_transformers(pair):
    model, ref = pair
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    err = (got - want).abs().max().item()
    assert err < 1e-5, f"max |logits - transformers| = {err:.2e}"


def test_greedy_generation_matches_transformers(pair):
    model, ref = pair
    ids = _ids(B=1, L=5, seed=3)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    got = model.generate(ids, max_new_tokens=20)
    assert got.shape == (1, 25)
    assert torch.equal(got, want), f"qkv {got.tolist()} vs transformers {want.tolist()}"


def test_cache_decoding_equals_recompute(pair):
    """A prompt, then a chunk of 3, then single tokens, with a cache smaller than the total
    (so it grows): each step's logits equal those of the full sequence recomputed."""
    model, _ = pair
    stepped, full, cache = decode_in_steps(model, _ids(B=2, L=12, seed=5))
    assert cache.length == 12
    if cache.window(0) is None:
        assert cache.capacity >= 12  # grew
    else:  # Mistral's window cache (window 4) kept only the last tokens, in a bounded buffer
        assert cache.start(0) > 0 and cache.capacity <= cache.window(0) + 5
    err = (stepped - full).abs().max().item()
    assert err < 1e-5, f"max |cached - recomputed| = {err:.2e}"


def test_padding_mask_in_batch(pair):
    """A right-padded row gives the same logits at its real positions as when run alone."""
    model, _ = pair
    ids = _ids(B=2, L=9, seed=7)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        alone = model(ids[1:, :6])
    err = (batched[1, :6] - alone[0]).abs().max().item()
    assert err < 1e-5, f"padded row differs from the row alone by {err:.2e}"


def test_sampling_is_seeded_and_respects_top_k(pair):
    model, _ = pair
    ids = _ids(B=1, L=4, seed=9)
    a = model.generate(ids, max_new_tokens=8, temperature=0.8, top_k=5, top_p=0.9, seed=123)
    b = model.generate(ids, max_new_tokens=8, temperature=0.8, top_k=5, top_p=0.9, seed=123)
    assert torch.equal(a, b)
    one = model.generate(ids, max_new_tokens=6, temperature=1.0, top_k=1, seed=7)
    assert torch.equal(one, model.generate(ids, max_new_tokens=6)), "top_k=1 must equal greedy"


def test_generate_from_text_and_eos_stop(pair):
    model, _ = pair
    out = model.generate("the cat sat", max_new_tokens=4)
    assert out.shape == (1, 3 + 4)
    text = model.complete("the cat sat", max_new_tokens=3)
    assert isinstance(text, str)
    first = int(out[0, 3])
    stopped = model.generate(out[:, :3], max_new_tokens=4, eos_token_id=first)
    assert stopped.shape == (1, 4), "generation stops at the eos token"


@pytest.mark.parametrize("kind", KINDS)
def test_generate_beyond_positions_is_a_clear_error(kind, request):
    model = qkv.load(request.getfixturevalue(f"{kind}_folder")[0])
    limit = 48 if kind == "gpt2" else 64
    with pytest.raises(ValueError, match="positions"):
        model.generate(_ids(B=1, L=limit - 2), max_new_tokens=5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(_ids(B=1, L=3), temperature=-1.0)


@pytest.mark.parametrize("bad", [
    {"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": 1.0, "top_p": float("nan")},
    {"temperature": 1.0, "top_k": True}, {"max_new_tokens": True},
], ids=["temperature-nan", "temperature-inf", "top-p-nan", "top-k-bool", "max-new-tokens-bool"])
def test_sampling_settings_that_are_not_finite_numbers_are_refused(bad, gpt2_folder):
    """NaN passed `temperature < 0` and ended in a torch RuntimeError deep in sampling."""
    model = qkv.load(gpt2_folder[0])
    with pytest.raises(ValueError, match=list(bad)[-1]):
        model.generate(_ids(B=1, L=3), **{"max_new_tokens": 2, **bad})


def test_llama_variants_tied_bias_mqa(tmp_path):
    """Tied embeddings, attention/MLP biases, multi-query heads, head_dim != E/H, llama3 RoPE."""
    ref = build_folder(tmp_path, "llama", seed=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                       num_key_value_heads=1, head_dim=16,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16})
    model = qkv.load(tmp_path)
    ids = _ids(B=2, L=40)
    with torch.no_grad():
        err = (model(ids) - ref(ids).logits).abs().max().item()
    assert err < 1e-5, f"max |logits - transformers| = {err:.2e}"


def test_gpt2_inverse_layer_scaling(tmp_path):
    ref = build_folder(tmp_path, "gpt2", seed=4, scale_attn_by_inverse_layer_idx=True, activation_function="gelu")
    model = qkv.load(tmp_path)
    ids = _ids(B=1, L=10)
    with torch.no_grad():
        err = (model(ids) - ref(ids).logits).abs().max().item()
    assert err < 1e-5, f"max |logits - transformers| = {err:.2e}"


def test_batch_of_texts_of_different_lengths_is_left_padded(pair):
    """Each prompt of a padded batch continues exactly as it does alone."""
    model, _ = pair
    texts = ["the cat sat on the mat", "a dog", "attention is all you need"]
    together = model.generate(texts, max_new_tokens=6)
    assert together.shape[0] == 3
    for i, text in enumerate(texts):
        alone = model.generate(text, max_new_tokens=6)
        assert torch.equal(together[i, -6:], alone[0, -6:]), f"text {i} continues differently in a batch"


def test_several_eos_ids_and_long_text_prompt(llama_folder):
    model = qkv.load(llama_folder[0])
    ids = _ids(B=1, L=3, seed=11)
    out = model.generate(ids, max_new_tokens=5)
    stop = [int(out[0, 4]), 63]  # the second generated token, plus an id that may never come
    stopped = model.generate(ids, max_new_tokens=5, eos_token_id=stop)
    assert stopped.shape[1] <= 5 and int(stopped[0, -1]) in stop
    with pytest.raises(ValueError, match=r"prompt has 70 tokens.*64 positions"):
        model.generate(" ".join(["cat"] * 70), max_new_tokens=2)


def test_cli_similarity_rejects_a_decoder(gpt2_folder, capsys):
    from qkv.cli import main

    assert main(["similarity", "--model", str(gpt2_folder[0]), "a", "b"]) == 2
    assert "needs a BERT-family encoder" in capsys.readouterr().err

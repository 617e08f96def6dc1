"""Llama-like families (each a few lines over llama.py) against transformers on tiny random
checkpoints: Mistral (a sliding window shorter than the sequence) and Qwen2 (q/k/v biases)."""

from __future__ import annotations

import pytest
import torch
from hf_folders import decode_in_steps

import qkv

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=None, rope_theta=500.0)


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def pair(request, tmp_path_factory):
    import transformers

    if request.param == "mistral":
        ref = transformers.MistralForCausalLM(transformers.MistralConfig(**BASE, sliding_window=4))
    else:
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**BASE))
    torch.manual_seed(0)
    with torch.no_grad():  # random norms and biases, so a missing one cannot hide behind ones and zeros
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp(request.param)
    ref.eval().save_pretrained(folder, safe_serialization=True)
    return qkv.load(folder), ref


def _ids(B=2, L=13, seed=1):
    return torch.randint(4, 64, (B, L), generator=torch.Generator().manual_seed(seed))


def test_loads_as_its_family(pair):
    model, ref = pair
    assert type(model).__name__ == type(ref).__name__
    assert type(model.config).__name__ == type(ref.config).__name__


def test_logits_match_transformers(pair):
    model, ref = pair
    ids = _ids()
    with torch.no_grad():
        err = (model(ids) - ref(ids).logits).abs().max().item()
    assert err < 1e-5, f"max |logits - transformers| = {err:.2e}"


def test_greedy_generation_matches_transformers(pair):
    model, ref = pair
    ids = _ids(B=1, L=5, seed=3)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, max_new_tokens=20, prefill_chunk=2), want)


def test_cache_decoding_equals_recompute(pair):
    model, _ = pair
    stepped, full, _ = decode_in_steps(model, _ids(B=2, L=12, seed=5))
    err = (stepped - full).abs().max().item()
    assert err < 1e-5, f"max |cached - recomputed| = {err:.2e}"


def test_qwen2_sliding_window_is_refused(tmp_path):
    from qkv.models import ModelError
    from qkv.models.qwen2 import Qwen2Config

    with pytest.raises(ModelError, match="use_sliding_window=true is not supported"):
        Qwen2Config.from_hf({"use_sliding_window": True}, tmp_path / "config.json")

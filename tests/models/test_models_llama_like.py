"""What is particular to the Llama-like families (each a few lines over llama.py): they load as
their own classes, Mistral's sliding window really changes the result (so the logits test in
test_models_decoders.py, which covers them with GPT-2 and Llama, exercises it), generation with
chunked prefill under the window, and Qwen2's refusal of sliding-window layers."""

from __future__ import annotations

import pytest
import torch

import qkv


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def pair(request):
    folder, ref = request.getfixturevalue(f"{request.param}_folder")
    return qkv.load(folder), ref


def _ids(B=2, L=13, seed=1):
    return torch.randint(4, 64, (B, L), generator=torch.Generator().manual_seed(seed))


def test_loads_as_its_family(pair):
    model, ref = pair
    assert type(model).__name__ == type(ref).__name__
    assert type(model.config).__name__ == type(ref.config).__name__


def test_mistral_window_changes_the_logits(mistral_folder):
    """Without its window, the same weights give other logits: the window is honoured, not ignored."""
    import transformers

    folder, ref = mistral_folder
    ids = _ids()
    config = transformers.MistralConfig(**{**ref.config.to_dict(), "sliding_window": None})
    wide = transformers.MistralForCausalLM(config)
    wide.load_state_dict(ref.state_dict())
    with torch.no_grad():
        got = qkv.load(folder)(ids)
        gap = (got - wide.eval()(ids).logits).abs().max().item()
        err = (got - ref(ids).logits).abs().max().item()
    assert err < 1e-5, f"max |logits - transformers| = {err:.2e}"
    assert gap > 1e-3, f"the window of 4 over 13 tokens changed nothing ({gap:.2e})"


def test_greedy_generation_with_chunked_prefill(pair):
    model, ref = pair
    ids = _ids(B=1, L=5, seed=3)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, max_new_tokens=20, prefill_chunk=2), want)


def test_qwen2_sliding_layers_as_transformers_runs_them(tmp_path):
    """use_sliding_window with max_window_layers=1: layers 1.. slide over 4 tokens, layer 0 does not."""
    from family_checks import check_greedy, check_left_padded_logits
    from hf_folders import build_folder

    ref = build_folder(tmp_path, "qwen2", seed=4, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = qkv.load(tmp_path)
    assert [layer.window for layer in model.blocks] == [None, (3, 0)]
    check_left_padded_logits(model, ref, vocab=64)
    check_greedy(model, ref, vocab=64, window=4)


def test_qwen2_layer_types_without_a_window_are_refused(tmp_path):
    from qkv.models import ModelError
    from qkv.models.qwen2 import Qwen2Config

    with pytest.raises(ModelError, match="layer_types=.*is not supported: it names sliding_attention layers"):
        Qwen2Config.from_hf({"num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"]},
                            tmp_path / "config.json")


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_family_proof(kind, request):
    """The shared proof of issue 17 (family_checks.py) for the families that landed first."""
    from family_checks import check_greedy, check_left_padded_logits, check_tokenizer

    folder, ref = request.getfixturevalue(f"{kind}_folder")
    model = qkv.load(folder)
    check_left_padded_logits(model, ref, vocab=64)
    check_greedy(model, ref, vocab=64, window=4 if kind == "mistral" else None)
    check_tokenizer(folder, model)

"""Sliding-window KV caches in generation (issue 17): a Mistral whose window (4) is shorter than
its prompts, and a mixed Llama (layer 0 windowed by hand, layer 1 global, against transformers'
Ministral with those layer types), generate 40 greedy tokens, prompts longer than the window,
chunked prefill, left-padded batches, with the window cache: the same tokens as with a full
cache and as transformers, while the windowed layers' buffers never hold more than window +
chunk tokens and really drop the rest."""

from __future__ import annotations

import pytest
import torch
from family_checks import hf_greedy, left_padded, random_ids
from hf_folders import LLAMA_BASE

import qkv

NEW, CHUNK = 40, 4


def _watch_caches(model):
    """Record every cache `model.new_cache` makes, and each layer's peak buffer capacity."""
    made = []
    new_cache = model.new_cache

    def watched_new_cache(*args, **kwargs):
        cache = new_cache(*args, **kwargs)
        peaks = [cache.layer_capacity(i) for i in range(cache.num_layers)]
        update = cache.update

        def watched_update(layer, k, v):
            out = update(layer, k, v)
            peaks[layer] = max(peaks[layer], cache.layer_capacity(layer))
            return out

        cache.update = watched_update
        made.append((cache, peaks))
        return cache

    model.new_cache = watched_new_cache
    return made


def _prompts(seed):
    """(ids, mask) pairs: one prompt of 11 tokens, and a left-padded batch of 11 and 6 real tokens."""
    one = random_ids(1, 11, 64, seed)
    return [(one, torch.ones_like(one)), left_padded([11, 6], 64, seed + 1)]


def _check_generation(model, ref, windows, seed):
    """40 greedy tokens, prefill in chunks of 4: window cache == full cache == transformers;
    windowed buffers <= keep + chunk tokens, and tokens were dropped."""
    assert model.new_cache(1).windows == tuple(windows)
    made = _watch_caches(model)
    for ids, mask in _prompts(seed):
        got = model.generate(ids, attention_mask=mask.bool(), max_new_tokens=NEW, prefill_chunk=CHUNK,
                             eos_token_id=None)
        cache, peaks = made[-1]
        assert cache.windows == tuple(windows)
        for layer, keep in enumerate(windows):
            if keep is None:
                assert cache.start(layer) == 0 and cache.stored(layer)[0].shape[2] == cache.length
            else:
                assert peaks[layer] <= keep + CHUNK, (layer, peaks[layer])
                assert cache.start(layer) > 0, "the windowed layer kept every token"
        saved, model.window_cache = model.window_cache, False  # the same model, a full cache in every layer
        try:
            full = model.generate(ids, attention_mask=mask.bool(), max_new_tokens=NEW, prefill_chunk=CHUNK,
                                  eos_token_id=None)
            assert made[-1][0].windows == (None,) * len(windows)
        finally:
            model.window_cache = saved
        want = hf_greedy(ref, ids, mask, NEW).sequences
        assert torch.equal(got, full), f"window cache {got[:, -NEW:].tolist()} vs full cache {full[:, -NEW:].tolist()}"
        assert torch.equal(got[:, -NEW:], want[:, -NEW:]), \
            f"qkv {got[:, -NEW:].tolist()} vs transformers {want[:, -NEW:].tolist()}"


def test_mistral_generates_with_a_window_cache(mistral_folder):
    folder, ref = mistral_folder
    model = qkv.load(folder)
    assert type(model).window_cache is True
    _check_generation(model, ref, [3, 3], seed=11)


@pytest.fixture(scope="module")
def mixed(llama_folder):
    """(qkv Llama with layer 0 windowed (3, 0) and layer 1 global, opted in to window caches;
    transformers' MinistralForCausalLM with layer types sliding/full, window 4, same weights;
    the plain transformers Llama)."""
    import transformers

    folder, ref = llama_folder
    model = qkv.load(folder)
    model.model.layers[0].window = (3, 0)
    model.window_cache = True
    config = transformers.MinistralConfig(**{**LLAMA_BASE, "sliding_window": 4, "head_dim": 8,
                                             "layer_types": ["sliding_attention", "full_attention"]})
    mixed_ref = transformers.MinistralForCausalLM(config).eval()
    mixed_ref.load_state_dict(ref.state_dict(), strict=True)
    return model, mixed_ref, ref


def test_mixed_llama_generates_with_a_window_cache(mixed):
    model, mixed_ref, _ = mixed
    _check_generation(model, mixed_ref, [3, None], seed=21)


def test_mixed_llama_window_matters(mixed):
    """The hand-set window changes the logits (> 1e-3 from the plain Llama's) while qkv matches
    transformers' mixed model within 1e-4, left-padded."""
    model, mixed_ref, plain_ref = mixed
    ids, mask = left_padded([13, 9], 64, seed=3)
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        want = mixed_ref(input_ids=ids, attention_mask=mask).logits
        plain = plain_ref(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-4
    assert (got[real] - plain[real]).abs().max().item() > 1e-3


def test_a_model_without_windows_keeps_every_token(mistral_folder):
    """Mistral's layers run with window None (by hand): new_cache keeps everything."""
    folder, _ = mistral_folder
    model = qkv.load(folder)
    for block in model.blocks:
        block.window = None
    assert model.new_cache(1).windows == (None, None)
    assert qkv.load(folder).new_cache(1, windowed=False).windows == (None, None)


def test_decoding_past_a_windowed_cache_with_a_wider_window_is_refused(mistral_folder):
    folder, _ = mistral_folder
    model = qkv.load(folder)
    cache = model.new_cache(1)
    model.blocks[0].window = None
    with pytest.raises(ValueError, match="cache layer 0 keeps only the 3 tokens before each new one"):
        model(random_ids(1, 5, 64, 0), cache=cache)

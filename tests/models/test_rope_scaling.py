"""RoPE scaling types (nn/positions.py, read by llama.py's _read_rope): each against transformers
5.24. `rope_inv_freq` equals `ROPE_INIT_FUNCTIONS` for every type and length; `RotaryEmbedding`
follows transformers' `dynamic_rope_update` call by call; a tiny Llama per type gives
transformers' logits on sequences shorter and longer than original_max_position_embeddings
(max_position_embeddings for dynamic) and its greedy tokens when the prompt or the generation
crosses that length, with chunked prefill; the scaling changes the logits (so the comparison can
fail); and configs qkv cannot run are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import check_greedy, check_left_padded_logits, check_step_logits, check_tokenizer, random_ids
from hf_folders import LLAMA_BASE, save_random

import qkv
from qkv.models import ModelError
from qkv.models.llama import LlamaConfig
from qkv.nn import RotaryEmbedding, rope_inv_freq

ORIGINAL = 16  # original_max_position_embeddings of the tiny models (max_position_embeddings for dynamic)
# rope_parameters of each type for a head of 8 (4 rotated pairs); max_position_embeddings 64
ROPES = {
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 4.0},  # with max_position_embeddings 16: qkv runs up to 64
    "yarn": {"factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "longrope": {"short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 2.0, 4.0, 8.0],
                 "original_max_position_embeddings": ORIGINAL},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}


def _config(kind: str, **rope):
    from transformers import LlamaConfig as HFLlamaConfig

    max_pos = ORIGINAL if kind == "dynamic" else LLAMA_BASE["max_position_embeddings"]
    params = {"rope_type": kind, "rope_theta": 500.0, **ROPES.get(kind, {}), **rope}
    return HFLlamaConfig(**{**LLAMA_BASE, "max_position_embeddings": max_pos, "rope_parameters": params})


@pytest.fixture(scope="module", params=list(ROPES))
def scaled(request, tmp_path_factory):
    """(kind, folder, transformers model, qkv model) of a tiny Llama with this rope type."""
    folder = tmp_path_factory.mktemp(request.param)
    ref = save_random(folder, _config(request.param), "LlamaForCausalLM")
    return request.param, folder, ref, qkv.load(folder)


# ------------------------------------------------------------------ the frequencies themselves
def _hf_config(kind: str, params: dict, max_pos: int = 64):
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=max_pos,
                         rope_parameters={"rope_type": kind, "rope_theta": 500.0, **params})


UNIT = [  # (type, rope parameters): every option transformers reads
    ("linear", {"factor": 4.0}),
    ("dynamic", {"factor": 3.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0, "beta_slow": 2.0,
              "mscale": 0.7, "mscale_all_dim": 1.0, "truncate": False}),
    ("yarn", {"factor": None, "original_max_position_embeddings": 16, "attention_factor": 1.3}),
    ("longrope", {"short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [3.0, 4.0, 5.0, 6.0],
                  "original_max_position_embeddings": 16}),
    ("longrope", {"short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [3.0, 4.0, 5.0, 6.0],
                  "original_max_position_embeddings": 16, "factor": 8.0, "attention_factor": 1.1}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}),
]


@pytest.mark.parametrize("kind,params", UNIT, ids=[f"{k}-{i}" for i, (k, _) in enumerate(UNIT)])
def test_rope_inv_freq_equals_transformers(kind, params):
    """Frequencies and attention scaling equal ROPE_INIT_FUNCTIONS' at build time and for lengths
    below and above the original context (transformers passes a tensor length to dynamic)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = _hf_config(kind, dict(params))
    for seq_len in (None, 10, 17, 100):
        hf_len = torch.tensor(seq_len) if kind == "dynamic" and seq_len is not None else seq_len
        want, want_scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=hf_len)
        got, scaling = rope_inv_freq(8, 500.0, rope_scaling={"rope_type": kind, "max_position_embeddings": 64,
                                                             **params}, seq_len=seq_len)
        assert torch.equal(got, want), f"{kind} at {seq_len}: {got} vs {want}"
        assert scaling == pytest.approx(want_scaling, rel=1e-12)


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_rotary_follows_dynamic_rope_update_call_by_call(kind):
    """cos/sin equal transformers' LlamaRotaryEmbedding over a series of calls that grow past the
    original length, stay there, shrink below it and come back (dynamic keeps state, as there)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _hf_config(kind, dict(ROPES[kind]), max_pos=ORIGINAL if kind == "dynamic" else 64)
    ref = LlamaRotaryEmbedding(config)
    ours = qkv.models.llama.LlamaForCausalLM(LlamaConfig.from_hf(config.to_dict())).model.rotary_emb
    x = torch.zeros(1)
    for start, stop in [(0, 5), (5, 16), (16, 17), (17, 30), (30, 31), (3, 40), (0, 8), (8, 20), (20, 21), (0, 25)]:
        pos = torch.arange(start, stop)
        want_cos, want_sin = ref(x, pos[None])
        cos, sin = ours(pos)
        assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0]), f"positions {start}..{stop - 1}"


def test_rotary_of_a_pass_in_pieces_takes_the_whole_pass_frequencies():
    """With `reach`, the chunks of a 30-token pass get what one call over all 30 positions gets."""
    scaling = {"rope_type": "longrope", "max_position_embeddings": 64, **ROPES["longrope"]}
    whole = RotaryEmbedding(8, 500.0, rope_scaling=scaling)(torch.arange(30))[0]
    rope = RotaryEmbedding(8, 500.0, rope_scaling=scaling)
    alone = rope(torch.arange(0, 8))[0]
    rope.reach = 30
    pieces = torch.cat([rope(torch.arange(s, min(s + 8, 30)))[0] for s in range(0, 30, 8)])
    assert torch.equal(pieces, whole)
    assert (alone - whole[:8]).abs().max() > 1e-3, "the short and long factors give the same tables"


# ------------------------------------------------------------------ tiny Llamas against transformers
def test_loads_with_its_rope_type(scaled):
    kind, _, _, model = scaled
    assert model.config.rope_scaling["rope_type"] == kind


def test_shared_proof_below_and_past_the_original_length(scaled):
    """Logits within 1e-4 on left-padded batches shorter and longer than the original context,
    greedy tokens (a short prompt whose generation crosses it, a padded batch, a chunked prompt),
    and the tokenizer."""
    kind, folder, ref, model = scaled
    check_left_padded_logits(model, ref, vocab=64)
    check_left_padded_logits(model, ref, vocab=64, lengths=(40, 29, 17), seed=2)
    check_greedy(model, ref, vocab=64)
    check_tokenizer(folder, model)


@pytest.mark.parametrize("prompt", [30, 16, 15])
def test_greedy_with_chunked_prefill_across_the_original_length(scaled, prompt):
    """A prompt past, at or just below the original length, fed in chunks of 4 (the first chunks
    below the boundary), then 20 greedy tokens: transformers' tokens, and each step's logits
    within 1e-4 of transformers' (its one pass chooses the frequencies for the whole prompt;
    chunks choosing for themselves are off by ~5e-4 here, though the tokens may agree)."""
    _, _, ref, model = scaled
    check_step_logits(model, ref, random_ids(1, prompt, 64, seed=11))


def test_chunked_forward_equals_one_pass(scaled):
    """model(ids, chunk_size=4) over 30 tokens equals transformers' one pass."""
    _, _, ref, model = scaled
    ids = random_ids(2, 30, 64, seed=12)
    with torch.no_grad():
        err = (model(ids, chunk_size=4) - ref(ids).logits).abs().max().item()
    assert err < 1e-4, f"max |logits - transformers| = {err:.2e}"


def test_the_scaling_changes_the_logits(scaled):
    """The same weights with default RoPE (or, for longrope, the short factors only) give other
    logits past the original length: the scaling is run, not ignored."""
    import transformers

    kind, folder, ref, model = scaled
    config = (_config(kind, long_factor=ROPES["longrope"]["short_factor"]) if kind == "longrope"
              else transformers.LlamaConfig(**{**ref.config.to_dict(), "rope_parameters":
                                               {"rope_type": "default", "rope_theta": 500.0}}))
    plain = transformers.LlamaForCausalLM(config).eval()
    plain.load_state_dict(ref.state_dict())
    ids = random_ids(2, 40, 64, seed=13)
    with torch.no_grad():
        got = model(ids)
        gap = (got - plain(ids).logits).abs().max().item()
        err = (got - ref(ids).logits).abs().max().item()
    assert err < 1e-4, f"max |logits - transformers| = {err:.2e}"
    assert gap > 1e-3, f"{kind} scaling changed nothing over 40 tokens ({gap:.2e})"


def test_dynamic_runs_to_factor_times_max_positions(tmp_path):
    from qkv.models.generation import PREFILL_CHUNK

    save_random(tmp_path, _config("dynamic"), "LlamaForCausalLM")
    model = qkv.load(tmp_path)
    assert model.max_positions == 64 and PREFILL_CHUNK > 64
    model(random_ids(1, 64, 64, seed=0))
    with pytest.raises(ModelError, match=r"65 tokens exceeds this model's 64 positions \(max_position_embeddings=16 "
                                         r"times the dynamic rope factor 4\)"):
        model(random_ids(1, 65, 64, seed=0))


# ------------------------------------------------------------------ the two layouts, and refusals
def _read(rope: dict, **top):
    return LlamaConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64,
                                **top, "rope_parameters": rope}, "config.json")


def test_transformers_4_layout_and_defaults():
    """rope_scaling + rope_theta (transformers 4) reads as rope_parameters; a non-empty rope_scaling
    wins over rope_parameters, as in transformers; original_max_position_embeddings defaults to
    max_position_embeddings."""
    old = LlamaConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64,
                               "rope_theta": 300.0, "rope_scaling": {"type": "yarn", "factor": 4.0},
                               "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "config.json")
    assert old.rope_theta == 300.0
    assert old.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "max_position_embeddings": 64}
    new = _read({"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0})
    assert new.rope_theta == 100.0 and new.rope_scaling["original_max_position_embeddings"] == 64


REFUSALS = [  # (rope parameters, words of the message)
    ({"rope_type": "proportional"},
     ("rope_parameters.rope_type", "not supported", "default, linear, dynamic, yarn, longrope, llama3")),
    ({"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
     ("rope_parameters.type", "not supported", "longrope")),
    ({"rope_type": "yarn", "original_max_position_embeddings": 16}, ("rope_parameters.factor", "missing")),
    ({"rope_type": "dynamic"}, ("rope_parameters.factor", "missing")),
    ({"rope_type": "longrope", "short_factor": [1.0] * 4}, ("rope_parameters.long_factor", "missing")),
    ({"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 3},
     ("rope_parameters.long_factor", "not supported", "4 (the rotated head size / 2)", "holds 3")),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 4},
     ("rope_parameters.short_factor", "holds 8")),
    ({"rope_type": "longrope", "short_factor": [1.0, 1.0, "x", 1.0], "long_factor": [1.0] * 4},
     ("rope_parameters.short_factor[2]", "must be")),
    ({"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0, 0.0, 1.0, 1.0]},
     ("rope_parameters.long_factor[1]", "out of range")),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": -1.0}, ("rope_parameters.beta_fast", "out of range")),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "no"}, ("rope_parameters.truncate", "must be")),
    ({"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.5},
     ("rope_parameters.partial_rotary_factor", "not supported", "whole heads")),
]


@pytest.mark.parametrize("rope,words", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_refused_by_name(rope, words):
    with pytest.raises(ModelError) as exc:
        _read(rope)
    for w in words:
        assert w in str(exc.value), f"{w!r} not in: {exc.value}"


def test_refused_in_a_folder(tmp_path):
    """qkv.load refuses a folder whose longrope lists do not fit its heads, naming the file."""
    save_random(tmp_path, _config("linear"), "LlamaForCausalLM")
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 500.0, "short_factor": [1.0] * 8,
                                 "long_factor": [1.0] * 8, "original_max_position_embeddings": 16}
    path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"config\.json: rope_parameters\.short_factor=.* is not supported"):
        qkv.load(tmp_path)


def test_texts_of_different_lengths_generate_transformers_tokens(scaled):
    """Texts (21 and 4 tokens: one past the original length) through the tokenizer, left-padded
    and prefilled in chunks of 4: transformers' tokens on the same padded ids."""
    from qkv.models.generation import left_pad

    _, _, ref, model = scaled
    texts = ["the quick brown fox jumps over the lazy dog the cat sat on the mat a dog ran in the park",
             "queries keys and values"]
    batch = model.tokenizer(texts, max_length=10**9)
    ids, mask = left_pad(batch.input_ids, batch.attention_mask, model.tokenizer.pad_id)
    assert batch.lengths.tolist() == [21, 4]
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=12, min_new_tokens=12,
                            do_sample=False, pad_token_id=1, eos_token_id=None)
    got = model.generate(texts, max_new_tokens=12, prefill_chunk=4, eos_token_id=None)
    assert torch.equal(got[:, 21:], want[:, 21:])

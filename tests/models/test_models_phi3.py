"""Phi-3 (models/phi3.py) against transformers 5.24's Phi3ForCausalLM on tiny random checkpoints:
a Phi-3-mini-4k-like model (sliding window 4), a Phi-3-mini-128k-like one (longrope over an
original context of 16), and a Phi-4-mini-like one (partial rotary 0.5, longrope, tied
embeddings), each through the shared proof (family_checks.py); generation that crosses the
original context, where transformers recomputes its cache; what each addition changes (so the
comparisons can fail); and the refusals."""

from __future__ import annotations

import pytest
import torch
from family_checks import (
    check_greedy,
    check_left_padded_logits,
    check_step_logits,
    check_tokenizer,
    generate_with_logits,
    hf_greedy,
    random_ids,
)
from hf_folders import save_random

import qkv
from qkv.models import ModelError
from qkv.models.phi3 import Phi3Config

ORIGINAL = 16  # original_max_position_embeddings of the longrope models
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=None, pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0})
LONGROPE = {"rope_type": "longrope", "rope_theta": 500.0, "short_factor": [1.0, 1.2, 1.5, 2.0],
            "long_factor": [1.0, 2.0, 4.0, 8.0]}
KINDS = {
    "mini-4k": dict(sliding_window=4),
    "mini-128k": dict(original_max_position_embeddings=ORIGINAL, rope_parameters=LONGROPE),
    "partial": dict(original_max_position_embeddings=ORIGINAL, partial_rotary_factor=0.5, tie_word_embeddings=True,
                    rope_parameters={**LONGROPE, "short_factor": [1.0, 1.5], "long_factor": [2.0, 6.0]}),
    # longrope and a window: the rerun at the switch empties a cache whose windowed layers dropped tokens
    "windowed-longrope": dict(original_max_position_embeddings=ORIGINAL, rope_parameters=LONGROPE, sliding_window=4),
}


def _config(**kw):
    import transformers

    return transformers.Phi3Config(**{**BASE, **kw})


@pytest.fixture(scope="module", params=list(KINDS))
def phi3(request, tmp_path_factory):
    """(kind, folder, transformers model, qkv model)."""
    folder = tmp_path_factory.mktemp(request.param)
    ref = save_random(folder, _config(**KINDS[request.param]), "Phi3ForCausalLM")
    return request.param, folder, ref, qkv.load(folder)


# ------------------------------------------------------------------ the shared proof
def test_loads_as_phi3_with_the_fused_checkpoint_names(phi3):
    kind, folder, ref, model = phi3
    assert type(model).__name__ == "Phi3ForCausalLM" and type(model.config).__name__ == "Phi3Config"
    assert "model.layers.0.self_attn.qkv_proj.weight" in ref.state_dict()
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, ref.model.layers[0].self_attn.qkv_proj.weight)
    assert torch.equal(model.model.layers[1].mlp.gate_up_proj.weight, ref.model.layers[1].mlp.gate_up_proj.weight)
    assert model.model.rotary_emb.head_dim == (4 if kind == "partial" else 8)


def test_shared_proof(phi3):
    """Logits within 1e-4 on left-padded batches below and past the original context, 20 greedy
    tokens (short prompt, padded batch, chunked prompt past the window), the tokenizer."""
    kind, folder, ref, model = phi3
    check_left_padded_logits(model, ref, vocab=64)
    check_left_padded_logits(model, ref, vocab=64, lengths=(40, 29, 17), seed=2)
    check_greedy(model, ref, vocab=64, window=KINDS[kind].get("sliding_window"))
    check_tokenizer(folder, model)


@pytest.mark.parametrize("prompt", [30, 16, 9])
def test_generation_across_the_original_context(phi3, prompt):
    """A prompt past, at or below the original context, in chunks of 4, then 20 greedy tokens:
    transformers' tokens and each step's logits within 1e-4. From 9 the generation crosses 16,
    where transformers drops its cache and runs the sequence again with the long factors."""
    _, _, ref, model = phi3
    check_step_logits(model, ref, random_ids(1, prompt, 64, seed=21))


def test_padded_batch_generation_across_the_original_context(phi3):
    """Two left-padded prompts (10 and 6 tokens) and 20 greedy tokens each, crossing 16."""
    _, _, ref, model = phi3
    ids = random_ids(2, 10, 64, seed=22)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids = ids.masked_fill(mask == 0, 1)
    check_step_logits(model, ref, ids, mask)


# ------------------------------------------------------------------ what each addition changes
def _gap(ref, model, changed: dict, L: int = 40) -> tuple[float, float]:
    """(max |qkv - transformers|, max |qkv - transformers with `changed`|) of the logits on L tokens."""
    import transformers

    other = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**ref.config.to_dict(), **changed})).eval()
    other.load_state_dict(ref.state_dict())
    ids = random_ids(2, L, 64, seed=23)
    with torch.no_grad():
        got = model(ids)
        return (got - ref(ids).logits).abs().max().item(), (got - other(ids).logits).abs().max().item()


# per tiny model, what its addition is switched off to: no window; the short factors past 16 too;
# whole heads rotated, with the same factor for both features of each former pair
WITHOUT = {
    "mini-4k": {"sliding_window": None},
    "mini-128k": {"rope_parameters": {**LONGROPE, "long_factor": LONGROPE["short_factor"]}},
    "windowed-longrope": {"sliding_window": None},
    "partial": {"rope_parameters": {**KINDS["partial"]["rope_parameters"], "partial_rotary_factor": 1.0,
                                    "short_factor": [1.0, 1.0, 1.5, 1.5], "long_factor": [2.0, 2.0, 6.0, 6.0]}},
}


def test_each_addition_changes_the_logits(phi3):
    """Without its sliding window, long factors or partial rotation (WITHOUT), the same weights
    give other logits on 40 tokens, while qkv matches the original: qkv runs each addition."""
    kind, _, ref, model = phi3
    err, gap = _gap(ref, model, WITHOUT[kind])
    assert err < 1e-4, f"max |logits - transformers| = {err:.2e}"
    assert gap > 1e-3, f"{WITHOUT[kind]} changed nothing ({gap:.2e})"


def test_the_recomputed_cache_matters(tmp_path):
    """Continuing the short-factor cache past 16 (what a Llama with longrope does) gives other
    step logits than transformers' Phi-3, which qkv's Phi-3 matches."""
    import transformers

    ref = save_random(tmp_path, _config(**KINDS["mini-128k"]), "Phi3ForCausalLM")
    model = qkv.load(tmp_path)
    sizes = {k: v for k, v in BASE.items() if k != "rope_parameters"}
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **sizes, rms_norm_eps=ref.config.rms_norm_eps,
        rope_parameters={**LONGROPE, "original_max_position_embeddings": ORIGINAL})).eval()
    state = dict(ref.state_dict())
    for i in range(BASE["num_hidden_layers"]):  # Phi-3's fused matrices as Llama's separate ones
        p = f"model.layers.{i}."
        q, k, v = state.pop(p + "self_attn.qkv_proj.weight").split([32, 16, 16])  # rows q | k | v
        gate, up = state.pop(p + "mlp.gate_up_proj.weight").chunk(2)  # rows gate | up
        state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v, p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
    llama.load_state_dict(state)
    ids = random_ids(1, 9, 64, seed=21)
    phi, plain = hf_greedy(ref, ids), hf_greedy(llama, ids)
    _, logits = generate_with_logits(model, ids, max_new_tokens=20, prefill_chunk=4, eos_token_id=None)
    assert (logits - torch.stack(phi.logits, dim=1)).abs().max() < 1e-4
    before = ORIGINAL - 9  # steps before the switch agree; from it on the caches differ
    assert (torch.stack(plain.logits, 1)[:, :before] - torch.stack(phi.logits, 1)[:, :before]).abs().max() < 1e-4
    assert (torch.stack(plain.logits, 1) - torch.stack(phi.logits, 1)).abs().max() > 1e-3


# ------------------------------------------------------------------ config.json: read and refused
def _read(**fields):
    return Phi3Config.from_hf({"hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64,
                               **fields}, "config.json")


def test_phi3_128k_layout_reads_as_transformers_does():
    """transformers 4's rope_scaling with type longrope (or yarn, its older name) takes the
    top-level original_max_position_embeddings; partial_rotary_factor from the top level."""
    for name in ("longrope", "yarn"):
        c = _read(original_max_position_embeddings=16, partial_rotary_factor=0.5, rope_theta=250.0,
                  rope_scaling={"type": name, "short_factor": [1.0, 1.0], "long_factor": [2.0, 3.0],
                                "original_max_position_embeddings": 8})
        assert c.rope_theta == 250.0 and c.rotary_dim == 4
        assert c.rope_scaling == {"rope_type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [2.0, 3.0],
                                  "original_max_position_embeddings": 16, "max_position_embeddings": 64}
    assert _read().rope_scaling is None and _read().original_max_position_embeddings == 4096


REFUSALS = [  # (config.json fields, words of the message)
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     ("rope_parameters.rope_type", "not supported", "default, longrope", "su as longrope")),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ("rope_scaling.type", "not supported")),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}},
     ("rope_scaling.original_max_position_embeddings", "missing")),
    ({"partial_rotary_factor": 0.5, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4,
                                                      "long_factor": [1.0] * 4}},
     ("rope_scaling.short_factor", "2 (the rotated head size / 2)", "holds 4")),
    ({"partial_rotary_factor": 0.125}, ("partial_rotary_factor=0.125", "rotates 1 of the 8", "correct")),
    ({"partial_rotary_factor": 0.1}, ("partial_rotary_factor=0.1", "rotates 0 of the 8", "even and positive")),
    ({"partial_rotary_factor": 0.0}, ("partial_rotary_factor", "out of range")),
    ({"sliding_window": 0}, ("sliding_window", "out of range")),
    ({"resid_pdrop": 1.0}, ("resid_pdrop", "out of range")),
    ({"original_max_position_embeddings": "4k"}, ("original_max_position_embeddings", "must be")),
]


@pytest.mark.parametrize("fields,words", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_refused_by_name(fields, words):
    with pytest.raises(ModelError) as exc:
        _read(**fields)
    for w in words:
        assert w in str(exc.value), f"{w!r} not in: {exc.value}"


def test_dropout_is_training_only(tmp_path):
    """resid_pdrop and attention_dropout act in training mode only: eval logits are transformers'
    (in eval mode), training-mode logits are not."""
    ref = save_random(tmp_path, _config(resid_pdrop=0.5, attention_dropout=0.5, embd_pdrop=0.5), "Phi3ForCausalLM")
    model = qkv.load(tmp_path)
    ids = random_ids(1, 12, 64, seed=24)
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() < 1e-4
        model.train()
        torch.manual_seed(0)
        assert (model(ids) - ref(ids).logits).abs().max() > 1e-3

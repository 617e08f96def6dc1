"""Mixtral, StarCoder2, StableLM and Cohere (issue 17) against transformers 5.24: tiny random
checkpoints saved by transformers load with `qkv.load` and pass the shared proof
(family_checks.py); what each family adds over Llama really changes the logits (switched off in
transformers, the logits move, and qkv still matches the original); the fields qkv refuses are
refused with a message naming them. Mixtral loads both expert layouts: per expert (the Hub's,
and what `save_pretrained` writes) and transformers 5's stacked tensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from family_checks import check_greedy, check_left_padded_logits, check_tokenizer, random_ids
from hf_folders import randomise_norms, save_folder

import qkv
from qkv.models import ModelError

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=None)

# kind -> (transformers class names, config fields over BASE, sliding window for check_greedy)
KINDS = {
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4), 4),
    "starcoder2": ("Starcoder2", dict(sliding_window=4), 4),  # biases, tied head (its defaults)
    "starcoder2_plain": ("Starcoder2", dict(use_bias=False, tie_word_embeddings=False, hidden_act="gelu"), None),
    "stablelm": ("StableLm", dict(partial_rotary_factor=0.5, qk_layernorm=True, use_qkv_bias=True), None),
    "stablelm_parallel": ("StableLm", dict(use_parallel_residual=True, qk_layernorm=True, tie_word_embeddings=True,
                                           hidden_act="gelu_pytorch_tanh"), None),  # default factor 0.25: R = 2
    "cohere": ("Cohere", dict(use_qk_norm=True, logit_scale=0.5, pad_token_id=1), None),
    "cohere_plain": ("Cohere", dict(attention_bias=True, tie_word_embeddings=False, pad_token_id=1), None),
}


def hf_model(kind: str, seed: int = 0, **over):
    """A tiny random transformers model of `kind` (KINDS) with random norm weights and biases."""
    import transformers

    name, fields, _ = KINDS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{name}Config")(**{**BASE, **fields, **over})
    return randomise_norms(getattr(transformers, f"{name}ForCausalLM")(config), biases=True)


def save_stacked_folder(folder, model, source):
    """The Mixtral `model` with transformers 5's own module names and stacked experts (its state
    dict as it is: `mlp.gate.weight`, `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`),
    config and tokenizer copied from `source`."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> (folder, the transformers model saved in it), each built once; "mixtral_stacked"
    is the Mixtral model again, saved with stacked experts."""
    built = {}

    def get(kind):
        if kind not in built:
            if kind == "mixtral_stacked":
                folder, ref = get("mixtral")
                built[kind] = save_stacked_folder(tmp_path_factory.mktemp(kind), ref, folder), ref
            else:
                folder = tmp_path_factory.mktemp(kind)
                built[kind] = folder, save_folder(folder, hf_model(kind))
        return built[kind]

    return get


def _ids(B=2, L=13, seed=1):
    return random_ids(B, L, 64, seed)


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _matters(folder, ref, other, ids=None):
    """(qkv vs `ref`, `other` vs `ref`): qkv matches the original while the switched-off
    transformers model moves."""
    ids = _ids() if ids is None else ids
    want = _logits(ref, ids)
    err = (_logits(qkv.load(folder), ids) - want).abs().max().item()
    gap = (_logits(other.eval(), ids) - want).abs().max().item()
    assert err < 1e-4, f"max |logits - transformers| = {err:.2e}"
    assert gap > 1e-3, f"switching the feature off changed the logits by only {gap:.2e}"
    return err, gap


def _switched(kind, ref, **over):
    """A transformers model of `kind` with `over` in its config and `ref`'s weights."""
    import transformers

    name = KINDS[kind][0]
    fields = ref.config.to_dict()
    if "partial_rotary_factor" in over:  # transformers reads it from rope_parameters first
        fields["rope_parameters"] = {**fields["rope_parameters"],
                                     "partial_rotary_factor": over["partial_rotary_factor"]}
    config = getattr(transformers, f"{name}Config")(**{**fields, **over})
    other = getattr(transformers, f"{name}ForCausalLM")(config)
    other.load_state_dict(ref.state_dict(), strict=False)
    return other


# ------------------------------------------------------------------------------ the proof
PROOF = [*KINDS, "mixtral_stacked"]


@pytest.mark.parametrize("kind", PROOF)
def test_family_proof(kind, folders):
    """The shared proof of issue 17: left-padded logits, greedy tokens (short, padded, chunked
    past the window), tokenizer ids."""
    folder, ref = folders(kind)
    model = qkv.load(folder)
    assert type(model).__name__ == type(ref).__name__
    check_left_padded_logits(model, ref, vocab=64)
    check_greedy(model, ref, vocab=64, window=KINDS[kind.replace("_stacked", "")][2])
    check_tokenizer(folder, model)


# ------------------------------------------------------------------------------ Mixtral
def test_mixtral_loads_both_expert_layouts(folders):
    """save_pretrained writes the Hub's per-expert keys; the stacked folder holds transformers 5's
    module names, which transformers itself reads back to the same model; qkv loads both into
    the same parameters (the Hub's names) and gives the same logits."""
    from safetensors import safe_open
    from transformers import MixtralForCausalLM

    per_expert, ref = folders("mixtral")
    stacked, _ = folders("mixtral_stacked")
    with safe_open(str(per_expert / "model.safetensors"), "pt") as f:
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in f.keys()
    with safe_open(str(stacked / "model.safetensors"), "pt") as f:
        assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.gate.weight"} <= set(f.keys())
    ids = _ids()
    again = MixtralForCausalLM.from_pretrained(stacked).eval()
    assert torch.equal(_logits(again, ids), _logits(ref, ids))
    a, b = qkv.load(per_expert), qkv.load(stacked)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in dict(a.named_parameters())
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(_logits(a, ids), _logits(b, ids))


@pytest.mark.parametrize("over", [dict(num_experts_per_tok=1), dict(num_experts_per_tok=4), dict(sliding_window=None)],
                         ids=["top1", "all_experts", "no_window"])
def test_mixtral_routing_and_window_matter(over, folders):
    """Routing each token to 1 or to all 4 experts instead of 2, or dropping the window, moves the logits."""
    folder, ref = folders("mixtral")
    _matters(folder, ref, _switched("mixtral", ref, **over))


def test_mixtral_top_k_beyond_the_experts_is_refused(tmp_path):
    from qkv.models.mixtral import MixtralConfig

    with pytest.raises(ModelError, match="num_experts_per_tok=3 is more than num_local_experts=2"):
        MixtralConfig.from_hf({"num_local_experts": 2, "num_experts_per_tok": 3}, tmp_path / "config.json")


@pytest.mark.parametrize("kind", ["mixtral", "mixtral_stacked"])
def test_mixtral_expert_count_is_checked_against_the_weights(kind, folders, tmp_path):
    """A config asking for more experts than the weights hold names num_local_experts and the
    count the weights hold, in either layout, before a plan per expert is built."""
    folder, _ = folders(kind)
    copy = tmp_path / kind
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_local_experts": 10**8}))
    with pytest.raises(ModelError, match=r"num_local_experts=100000000, but the checkpoint holds 4 experts.*"
                                         r"set num_local_experts to 4"):
        qkv.load(copy)


# ------------------------------------------------------------------------------ StarCoder2
def test_starcoder2_window_matters(folders):
    folder, ref = folders("starcoder2")
    _matters(folder, ref, _switched("starcoder2", ref, sliding_window=None))


@pytest.mark.parametrize("fields, message", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({"rope_parameters": {"rope_type": "proportional", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type=\"proportional\" is not supported"),
])
def test_starcoder2_refusals(fields, message, tmp_path):
    from qkv.models.starcoder2 import Starcoder2Config

    with pytest.raises(ModelError, match=message):
        Starcoder2Config.from_hf(fields, tmp_path / "config.json")


# ------------------------------------------------------------------------------ StableLM
@pytest.mark.parametrize("kind, over", [
    ("stablelm", dict(partial_rotary_factor=1.0)),  # the whole head rotated instead of its first half
    ("stablelm", dict(qk_layernorm=False)),
    ("stablelm_parallel", dict(partial_rotary_factor=0.5)),  # R = 4 instead of 2
], ids=["partial_rotary", "qk_layernorm", "parallel_rotary"])
def test_stablelm_features_matter(kind, over, folders):
    folder, ref = folders(kind)
    _matters(folder, ref, _switched(kind, ref, **over), ids=_ids(L=20))


def test_stablelm_reads_partial_rotary_factor_where_transformers_does(tmp_path):
    """transformers reads the factor from rope_parameters first, then the top level (older
    folders), else 0.25; qkv rotates that many features."""
    from qkv.models.stablelm import StableLmConfig

    src = tmp_path / "config.json"
    sizes = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}  # head_dim 32
    assert StableLmConfig.from_hf(sizes, src).rotary_dim == 8
    assert StableLmConfig.from_hf({**sizes, "partial_rotary_factor": 0.5, "rope_theta": 1e4}, src).rotary_dim == 16
    both = {**sizes, "partial_rotary_factor": 0.5, "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 1.0}}
    assert StableLmConfig.from_hf(both, src).rotary_dim == 32


@pytest.mark.parametrize("fields, message", [
    ({"partial_rotary_factor": 0.375}, r"rotates int\(8 \* 0.375\) = 3 features of each head"),
    ({"partial_rotary_factor": 0.1}, r"= 0 features of each head"),
    ({"partial_rotary_factor": 1.5}, r"partial_rotary_factor=1.5 is out of range; it must be in \(0, 1\]"),
    ({"rope_parameters": {"rope_type": "proportional", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type=\"proportional\" is not supported"),
    ({"hidden_size": 30}, "hidden_size=30 is not divisible by num_attention_heads=4"),
])
def test_stablelm_refusals(fields, message, tmp_path):
    from qkv.models.stablelm import StableLmConfig

    with pytest.raises(ModelError, match=message):
        StableLmConfig.from_hf({**BASE, **fields}, tmp_path / "config.json")


# ------------------------------------------------------------------------------ Cohere
def test_cohere_interleaved_rotary_matters(folders, monkeypatch):
    """transformers' Cohere with Llama's half-split RoPE instead of interleaved pairs moves the logits."""
    from transformers.models.cohere import modeling_cohere
    from transformers.models.llama import modeling_llama

    folder, ref = folders("cohere")
    want = _logits(ref, _ids())
    monkeypatch.setattr(modeling_cohere, "rotate_half", modeling_llama.rotate_half)
    monkeypatch.setattr(modeling_cohere.CohereRotaryEmbedding, "forward", modeling_llama.LlamaRotaryEmbedding.forward)
    gap = (_logits(ref, _ids()) - want).abs().max().item()
    monkeypatch.undo()
    err = (_logits(qkv.load(folder), _ids()) - want).abs().max().item()
    assert err < 1e-4 and gap > 1e-3, (err, gap)


@pytest.mark.parametrize("over", [dict(use_qk_norm=False), dict(logit_scale=1.0)], ids=["qk_norm", "logit_scale"])
def test_cohere_features_matter(over, folders):
    folder, ref = folders("cohere")
    _matters(folder, ref, _switched("cohere", ref, **over))


@pytest.mark.parametrize("fields, message", [
    ({"logit_scale": None}, "logit_scale=null is null; it must be a finite number"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
])
def test_cohere_refusals(fields, message, tmp_path):
    from qkv.models.cohere import CohereConfig

    with pytest.raises(ModelError, match=message):
        CohereConfig.from_hf({**BASE, **fields}, tmp_path / "config.json")

"""Qwen3, OLMo 2, SmolLM3, Helium, Granite, GLM and GLM-4 (issue 17), each a few lines over
llama.py, against transformers on tiny random checkpoints built here: the shared proof
(family_checks.py), a test per family showing that what it adds changes transformers' logits
(switched off there, the logits move by > 1e-3 while qkv still matches the original), and the
refusals.

Each tiny config reaches what its family adds: Qwen3 and SmolLM3 slide (window 4, shorter than
the test sequences) on some layers only; SmolLM3 skips RoPE on one layer; Helium and GLM have
q/k/v biases (Helium's MLP too); Granite's four multipliers are far from 1; GLM rotates half of
each head. Every norm weight and bias is random, so a missing one cannot hide behind ones and
zeros.
"""

from __future__ import annotations

import copy

import pytest
import torch
from family_checks import TOLERANCE, check_greedy, check_left_padded_logits, check_tokenizer, random_ids
from hf_folders import save_folder

import qkv
from qkv.models import ModelError

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=None, pad_token_id=None,
            rope_theta=500.0)

# kind -> (transformers model class, config class, config fields beyond BASE, sliding window or None)
SPECS = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config",
              dict(head_dim=8, attention_bias=True, use_sliding_window=True, sliding_window=4, max_window_layers=1), 4),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(attention_bias=True), None),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config",
                dict(no_rope_layers=[1, 0, 1], use_sliding_window=True, sliding_window=4), 4),
    "helium": ("HeliumForCausalLM", "HeliumConfig", dict(head_dim=8, attention_bias=True, mlp_bias=True), None),
    "granite": ("GraniteForCausalLM", "GraniteConfig",
                dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=4.0),
                None),
    "glm": ("GlmForCausalLM", "GlmConfig", dict(head_dim=8), None),
    "glm4": ("Glm4ForCausalLM", "Glm4Config", dict(head_dim=8), None),
}


def _hf(kind: str, **changes):
    """A transformers model of `kind` from its tiny config (with `changes`), random, in eval mode."""
    import transformers

    model_class, config_class, extra, _ = SPECS[kind]
    config = getattr(transformers, config_class)(**{**BASE, **extra, **changes})
    return getattr(transformers, model_class)(config).eval()


def _build(folder, kind: str):
    torch.manual_seed(0)
    model = _hf(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
            elif any(proj in name for proj in ("q_proj", "k_proj", "v_proj")):
                p.normal_(0.0, 0.3)  # sharp scores, values beyond their biases: what changes attention shows
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)  # OLMo 2's first layer reads embeddings without a norm: beyond the biases
    return save_folder(folder, model)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """kind -> (folder, the transformers model saved there, qkv's model loaded from it), each built once."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(kind)
            ref = _build(folder, kind)
            cache[kind] = folder, ref, qkv.load(folder)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", list(SPECS))
def test_family_proof(kind, built):
    """The shared proof of issue 17: left-padded logits, greedy tokens (short, padded, chunked past
    the window), tokenizer ids; and the model and config load as the family's own classes."""
    folder, ref, model = built(kind)
    assert type(model).__name__ == type(ref).__name__
    assert type(model.config).__name__ == type(ref.config).__name__
    check_left_padded_logits(model, ref, vocab=64)
    check_greedy(model, ref, vocab=64, window=SPECS[kind][3])
    check_tokenizer(folder, model)


@pytest.mark.parametrize("kind", list(SPECS))
def test_model_type_alone_names_the_family(kind, built):
    from qkv.models.loading import architecture_of

    folder, ref, _ = built(kind)
    assert architecture_of({"model_type": ref.config.model_type}, folder) == SPECS[kind][0]


IDS = random_ids(2, 13, 64, seed=11)  # longer than the sliding window of 4


def _logits(model) -> torch.Tensor:
    """transformers' logits (2, 13, V) on IDS."""
    with torch.no_grad():
        return model(IDS).logits


def _moves(built, kind: str, variant: torch.Tensor) -> None:
    """qkv matches transformers' model of `kind`, and `variant` (logits of that model with the
    family's addition switched off) is more than 1e-3 away: the addition is run, not ignored."""
    _, ref, model = built(kind)
    with torch.no_grad():
        got = model(IDS)
    err = (got - _logits(ref)).abs().max().item()
    gap = (got - variant).abs().max().item()
    assert err < TOLERANCE, f"max |logits - transformers| = {err:.2e}"
    assert gap > 1e-3, f"switching it off changed nothing ({gap:.2e})"


def _same_weights(built, kind: str, **changes):
    """Logits of transformers' model of `kind` with config `changes`, holding the saved model's weights."""
    _, ref, _ = built(kind)
    variant = _hf(kind, **changes)
    variant.load_state_dict(ref.state_dict())
    return _logits(variant)


def _without(built, kind: str, *names: str):
    """Logits of a copy of the saved transformers model with the modules `names` of every layer identities."""
    _, ref, _ = built(kind)
    variant = copy.deepcopy(ref)
    for layer in variant.model.layers:
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(owner) if owner else layer, attr, torch.nn.Identity())
    return _logits(variant)


# ---------------------------------------------------------------- what each family adds
def test_qwen3_qk_norms_matter(built):
    _moves(built, "qwen3", _without(built, "qwen3", "self_attn.q_norm", "self_attn.k_norm"))


def test_qwen3_sliding_layers_matter(built):
    _, _, model = built("qwen3")
    assert [layer.window for layer in model.model.layers] == [None, (3, 0), (3, 0)]  # layers 1.. slide
    _moves(built, "qwen3", _same_weights(built, "qwen3", use_sliding_window=False))


def test_olmo2_post_norms_and_qk_norms_matter(built):
    _moves(built, "olmo2", _without(built, "olmo2", "post_feedforward_layernorm"))
    _moves(built, "olmo2", _without(built, "olmo2", "post_attention_layernorm"))
    _moves(built, "olmo2", _without(built, "olmo2", "self_attn.q_norm", "self_attn.k_norm"))


def test_smollm3_nope_layer_matters(built):
    _, _, model = built("smollm3")
    assert [layer.use_rope for layer in model.model.layers] == [True, False, True]
    _moves(built, "smollm3", _same_weights(built, "smollm3", no_rope_layers=[1, 1, 1], layer_types=None,
                                           use_sliding_window=False))


def test_smollm3_sliding_layers_matter(built):
    _, _, model = built("smollm3")
    assert [layer.window for layer in model.model.layers] == [None, (3, 0), None]  # the NoPE layer slides
    _moves(built, "smollm3", _same_weights(built, "smollm3", use_sliding_window=False, layer_types=None))


@pytest.mark.parametrize("kind,halves", [("helium", "llama"), ("glm", "phi3")])
def test_interleaved_rotary_matters(kind, halves, built, monkeypatch):
    """transformers' Helium (GLM) with Llama's (Phi-3's partial) half-split rotation instead of its pairs."""
    import importlib

    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    split = importlib.import_module(f"transformers.models.{halves}.modeling_{halves}").apply_rotary_pos_emb
    _, ref, _ = built(kind)
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", split)
    rotated_by_halves = _logits(ref)
    monkeypatch.undo()
    _moves(built, kind, rotated_by_halves)


@pytest.mark.parametrize("field", ["embedding_multiplier", "residual_multiplier", "attention_multiplier",
                                   "logits_scaling"])
def test_granite_multipliers_matter(field, built):
    _moves(built, "granite", _same_weights(built, "granite", **{field: 1.0}))


def test_glm_partial_rotary_matters(built):
    """Rotating whole heads instead of half of each gives other logits."""
    _, _, model = built("glm")
    assert model.config.rotary_dim == 4 and model.config.dim_per_head == 8
    _moves(built, "glm", _same_weights(built, "glm", partial_rotary_factor=1.0))


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8}])
def test_glm_scaled_rope_on_the_rotated_part(rope, built, tmp_path):
    """Linear and llama3 scaling of the partial rotation's frequencies (R = 4 of each head of 8)."""
    _, ref, _ = built("glm")
    scaled = _hf("glm", rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 0.5, **rope})
    scaled.load_state_dict(ref.state_dict())
    scaled.save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        err = (qkv.load(tmp_path)(IDS) - scaled(IDS).logits).abs().max().item()
    assert err < TOLERANCE, f"max |logits - transformers| = {err:.2e}"
    assert (_logits(scaled) - _logits(ref)).abs().max().item() > 1e-3  # the scaling changes the result


def test_glm4_post_norms_matter(built):
    _moves(built, "glm4", _without(built, "glm4", "post_self_attn_layernorm"))
    _moves(built, "glm4", _without(built, "glm4", "post_mlp_layernorm"))


# ------------------------------------------------------------------------- config reading
def test_qwen3_layer_kinds_follow_transformers():
    from qkv.models.qwen3 import Qwen3Config

    def kinds(**fields):
        return Qwen3Config.from_hf({"num_hidden_layers": 4, **fields}).kinds

    assert kinds(use_sliding_window=True, sliding_window=8, max_window_layers=2) == ["full_attention"] * 2 + [
        "sliding_attention"] * 2
    assert kinds(sliding_window=8, max_window_layers=2) == ["full_attention"] * 4  # use_sliding_window false
    assert kinds(use_sliding_window=True, sliding_window=8,
                 layer_types=["attention", "sliding_attention"] * 2)[:2] == ["full_attention", "sliding_attention"]


def test_smollm3_nope_layers_follow_the_interval():
    from qkv.models.smollm3 import SmolLM3Config

    c = SmolLM3Config.from_hf({"num_hidden_layers": 8, "use_sliding_window": True, "sliding_window": 16})
    assert [c.rope(i) for i in range(8)] == [True, True, True, False] * 2
    assert c.kinds == (["full_attention"] * 3 + ["sliding_attention"]) * 2


def test_glm_partial_rotary_factor_as_transformers_reads_it():
    """rope_parameters' own factor, else the top-level field, else 0.5; eos null = GLM's three stop ids."""
    from qkv.models.glm import GlmConfig

    assert GlmConfig.from_hf({}).partial_rotary_factor == 0.5
    assert GlmConfig.from_hf({}).eos_token_id == [151329, 151336, 151338]
    assert GlmConfig.from_hf({"partial_rotary_factor": 0.25}).rotary_dim == 32
    rope = {"rope_type": "default", "rope_theta": 5.0, "partial_rotary_factor": 1.0}
    c = GlmConfig.from_hf({"partial_rotary_factor": 0.25, "rope_parameters": rope})
    assert (c.rotary_dim, c.rope_theta) == (128, 5.0)


@pytest.mark.parametrize("module, name", [("qwen3", "Qwen3Config"), ("olmo2", "Olmo2Config"), ("glm", "GlmConfig")])
def test_mlp_bias_has_no_effect_where_the_family_has_none(module, name):
    """transformers' Qwen3, OLMo 2 and GLM MLPs never have biases, whatever config.json says."""
    import importlib

    config = getattr(importlib.import_module(f"qkv.models.{module}"), name)
    assert config.from_hf({"mlp_bias": True}).mlp_bias is False


# -------------------------------------------------------------------------------- refusals
def _refused(config_class, fields: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        config_class.from_hf(fields, "config.json")


def test_qwen3_refuses_sliding_layers_without_a_window():
    from qkv.models.qwen3 import Qwen3Config

    _refused(Qwen3Config, {"num_hidden_layers": 2, "use_sliding_window": False, "sliding_window": 4,
                           "layer_types": ["full_attention", "sliding_attention"]},
             r"layer_types=.* is not supported: it names sliding_attention layers, but use_sliding_window is false")


def test_qwen3_refuses_layer_types_of_another_length():
    from qkv.models.qwen3 import Qwen3Config

    _refused(Qwen3Config, {"num_hidden_layers": 3, "layer_types": ["full_attention"] * 2},
             "it has 2 entries for num_hidden_layers=3")


def test_qwen3_refuses_layer_kinds_it_does_not_run():
    from qkv.models.qwen3 import Qwen3Config

    _refused(Qwen3Config, {"num_hidden_layers": 1, "layer_types": ["chunked_attention"]},
             r'layer_types\[0\]="chunked_attention" is not supported; it must be one of "full_attention"')


def test_smollm3_refuses_sliding_layers_without_use_sliding_window():
    from qkv.models.smollm3 import SmolLM3Config

    _refused(SmolLM3Config, {"num_hidden_layers": 2, "sliding_window": 4,
                             "layer_types": ["full_attention", "sliding_attention"]},
             "while use_sliding_window is false, on which transformers' attention implementations disagree")


def test_smollm3_refuses_sliding_layers_without_sliding_window():
    from qkv.models.smollm3 import SmolLM3Config

    _refused(SmolLM3Config, {"num_hidden_layers": 2, "use_sliding_window": True,
                             "layer_types": ["full_attention", "sliding_attention"]},
             "it names sliding_attention layers, but sliding_window is null")


def test_smollm3_refuses_too_few_no_rope_layers():
    from qkv.models.smollm3 import SmolLM3Config

    _refused(SmolLM3Config, {"num_hidden_layers": 3, "no_rope_layers": [1, 0]},
             r"no_rope_layers=\[1, 0\] is not supported: it has 2 entries for num_hidden_layers=3")
    _refused(SmolLM3Config, {"no_rope_layers": [1, 2]},
             r"no_rope_layers\[1\]=2 is not supported; it must be one of 0, 1")
    _refused(SmolLM3Config, {"no_rope_layer_interval": 0}, "no_rope_layer_interval=0 is out of range; it must be >= 1")


def test_helium_refuses_heads_that_do_not_fill_the_hidden_size():
    from qkv.models.helium import HeliumConfig

    _refused(HeliumConfig, {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
             "Helium's output projection is \\(hidden_size, hidden_size\\)")


@pytest.mark.parametrize("value", [0, -2.0])
def test_granite_refuses_a_logits_scaling_that_is_not_positive(value):
    from qkv.models.granite import GraniteConfig

    _refused(GraniteConfig, {"logits_scaling": value}, "logits_scaling=.* is out of range; it must be > 0")


def test_glm_refuses_an_odd_rotated_part():
    from qkv.models.glm import GlmConfig

    _refused(GlmConfig, {"head_dim": 8, "hidden_size": 32, "num_attention_heads": 4, "partial_rotary_factor": 0.375},
             r"rotates int\(8 \* 0.375\) = 3 features")


@pytest.mark.parametrize("value", [0, 1.5])
def test_glm_refuses_a_partial_rotary_factor_out_of_range(value):
    from qkv.models.glm import GlmConfig

    _refused(GlmConfig, {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": value}},
             r"rope_parameters.partial_rotary_factor=.* is out of range; it must be in \(0, 1\]")


def test_glm_refuses_rope_types_qkv_does_not_compute():
    from qkv.models.glm import GlmConfig

    _refused(GlmConfig, {"rope_parameters": {"rope_type": "proportional", "factor": 4.0, "partial_rotary_factor": 0.5}},
             "rope_parameters.rope_type=\"proportional\" is not supported")


@pytest.mark.parametrize("module, name", [("qwen3", "Qwen3Config"), ("olmo2", "Olmo2Config"),
                                          ("smollm3", "SmolLM3Config"), ("helium", "HeliumConfig"),
                                          ("granite", "GraniteConfig")])
def test_whole_head_families_refuse_a_partial_rotation(module, name):
    """Like Llama, these rotate whole heads (transformers' modules cannot run a partial rotation either)."""
    import importlib

    config = getattr(importlib.import_module(f"qkv.models.{module}"), name)
    _refused(config, {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported")

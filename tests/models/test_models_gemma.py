"""Gemma, Gemma 2 and Gemma 3 (text) against transformers (issue 17): the shared proof
(family_checks.py) on a tiny random checkpoint of each; one test per thing a family adds, switched
off in the transformers model, showing the logits move while qkv still matches the original (so
each comparison can fail); how the configs are read (transformers 4 and 5 layouts); refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from family_checks import check_greedy, check_left_padded_logits, check_tokenizer
from hf_folders import save_folder

import qkv
from qkv.models import ModelError
from qkv.models.gemma import GemmaConfig
from qkv.models.gemma2 import Gemma2Config
from qkv.models.gemma3 import Gemma3TextConfig

transformers = pytest.importorskip("transformers")

# Tiny configs: head_dim 16 is not hidden_size / heads (8); initializer_range 0.2 gives scores and
# logits large enough for caps of 2 and 3 to bend them; windows of 4 are shorter than the 13-token
# test sequences, and the layers go local, global, local.
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=2, eos_token_id=None,
            pad_token_id=1, initializer_range=0.2)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
ROPE3 = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 400.0},
         "sliding_attention": {"rope_type": "default", "rope_theta": 20.0}}
KINDS = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(rope_theta=500.0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(rope_theta=500.0, sliding_window=4, layer_types=LAYER_TYPES, query_pre_attn_scalar=24,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(sliding_window=4, layer_types=LAYER_TYPES, query_pre_attn_scalar=24, rope_parameters=ROPE3,
                    final_logit_softcapping=3.0)),
}


def _hf_model(kind: str, **overrides):
    config_name, model_name, extra = KINDS[kind]
    config = getattr(transformers, config_name)(**copy.deepcopy({**BASE, **extra, **overrides}))
    return getattr(transformers, model_name)(config).eval()


def _build(kind: str, folder):
    """A random transformers model of `kind` with random norm weights (Gemma's are offsets from 1,
    so zeros would hide a norm read as Llama's), saved with a word tokenizer; returns it."""
    torch.manual_seed(0)
    ref = _hf_model(kind)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    return save_folder(folder, ref)


def _pair_fixture(kind: str):
    @pytest.fixture(scope="module", name=f"{kind}_pair")
    def pair(tmp_path_factory):
        folder = tmp_path_factory.mktemp(kind)
        ref = _build(kind, folder)
        return folder, ref, qkv.load(folder)

    return pair


gemma_pair, gemma2_pair, gemma3_pair = map(_pair_fixture, KINDS)


def _ids(B=2, L=13, seed=1):
    return torch.randint(4, 64, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(KINDS))
def test_family_proof(kind, request):
    """The shared proof of issue 17: left-padded logits, greedy generation (past the window of 4,
    in prefill chunks), tokenizer ids."""
    folder, ref, model = request.getfixturevalue(f"{kind}_pair")
    assert type(model).__name__ == type(ref).__name__
    check_left_padded_logits(model, ref, vocab=64)
    check_greedy(model, ref, vocab=64, window=None if kind == "gemma" else 4)
    check_tokenizer(folder, model)


def test_layers_show_window_and_soft_capping(gemma2_pair, gemma3_pair):
    """Each layer holds its window and soft-capping as attributes (for a sliding-window cache and
    explain): local layers (3, 0), global None; Gemma 3 has no attention cap."""
    _, _, g2 = gemma2_pair
    _, _, g3 = gemma3_pair
    assert [layer.window for layer in g2.blocks] == [(3, 0), None, (3, 0)]
    assert [layer.attn_logit_softcapping for layer in g2.blocks] == [2.0] * 3
    assert all(layer.score_mod is not None for layer in g2.blocks)
    assert [layer.window for layer in g3.blocks] == [(3, 0), None, (3, 0)]
    assert [(layer.attn_logit_softcapping, layer.score_mod) for layer in g3.blocks] == [(None, None)] * 3


def test_soft_capping_never_runs_on_a_backend_without_score_mod(gemma2_pair):
    """sdpa cannot apply a score_mod: asked for by name it refuses; `auto` (what the layers run)
    picks a backend that applies it, and the tiled and reference backends agree with it."""
    _, _, model = gemma2_pair
    ids = _ids()
    model = copy.deepcopy(model)
    with torch.no_grad():
        auto = model(ids)
        for backend in ("tiled", "reference"):
            for layer in model.blocks:
                layer.self_attn.backend = backend
            assert (model(ids) - auto).abs().max().item() < 1e-5, backend
        for layer in model.blocks:
            layer.self_attn.backend = "sdpa"
        with pytest.raises(ValueError, match="sdpa backend cannot apply a score_mod"):
            model(ids)


# -- what each family adds matters ---------------------------------------------------------------
def _with_config(kind: str, **overrides):
    def switch(ref):
        other = _hf_model(kind, **overrides)
        other.load_state_dict(ref.state_dict())
        return other

    return switch


def _unit_embedding_scale(ref):
    other = copy.deepcopy(ref)
    other.model.embed_tokens.embed_scale.fill_(1.0)
    return other


def _norms_as_llama(ref):
    """x * w instead of x * (1 + w) with the stored weights: subtract 1 from every norm weight."""
    other = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "norm" in name:
                p.sub_(1.0)
    return other


def _without(*names):
    def switch(ref):
        other = copy.deepcopy(ref)
        for module in list(other.modules()):
            for name in names:
                if hasattr(module, name) and isinstance(getattr(module, name), torch.nn.Module):
                    setattr(module, name, torch.nn.Identity())
        return other

    return switch


ALL_GLOBAL = ["full_attention"] * 3
SWITCHES = {
    ("gemma", "embedding scale sqrt(E)"): _unit_embedding_scale,
    ("gemma", "(1 + w) norms"): _norms_as_llama,
    ("gemma2", "attention soft-capping"): _with_config("gemma2", attn_logit_softcapping=None),
    ("gemma2", "final soft-capping"): _with_config("gemma2", final_logit_softcapping=None),
    ("gemma2", "sliding window"): _with_config("gemma2", layer_types=ALL_GLOBAL),
    ("gemma2", "query_pre_attn_scalar"): _with_config("gemma2", query_pre_attn_scalar=16),
    ("gemma2", "sandwich norms"): _without("post_attention_layernorm", "pre_feedforward_layernorm",
                                           "post_feedforward_layernorm"),
    ("gemma3", "q/k norms"): _without("q_norm", "k_norm"),
    ("gemma3", "local RoPE base"): _with_config("gemma3", rope_parameters={
        **ROPE3, "sliding_attention": {"rope_type": "default", "rope_theta": 400.0}}),
    ("gemma3", "linear RoPE scaling on global layers"): _with_config("gemma3", rope_parameters={
        **ROPE3, "full_attention": {"rope_type": "default", "rope_theta": 400.0}}),
    ("gemma3", "sliding window"): _with_config("gemma3", layer_types=ALL_GLOBAL),
    ("gemma3", "final soft-capping"): _with_config("gemma3", final_logit_softcapping=None),
}


@pytest.mark.parametrize("kind,feature", list(SWITCHES), ids=[f"{k}-{f}" for k, f in SWITCHES])
def test_feature_matters(kind, feature, request):
    """Without the feature the same weights give other logits (> 1e-3), and qkv matches the original."""
    _, ref, model = request.getfixturevalue(f"{kind}_pair")
    other = SWITCHES[kind, feature](ref)
    ids = _ids()
    with torch.no_grad():
        got = model(ids)
        err = (got - ref(ids).logits).abs().max().item()
        gap = (got - other(ids).logits).abs().max().item()
    assert err < 1e-4, f"max |logits - transformers| = {err:.2e}"
    assert gap > 1e-3, f"switching off {feature} changed nothing ({gap:.2e})"


def test_embedding_scale_is_rounded_to_the_dtype(gemma_pair):
    """In bfloat16, transformers multiplies by sqrt(E) rounded to bfloat16 (5.65625 for E = 32);
    qkv's embeddings are bit-identical, and differ from scaling by the exact sqrt(E)."""
    folder, ref, _ = gemma_pair
    model = qkv.load(folder, dtype=torch.bfloat16)
    ids = torch.arange(64).view(2, 32)
    with torch.no_grad():
        want = copy.deepcopy(ref).to(torch.bfloat16).model.embed_tokens(ids)
        got, _ = model.embed(ids, torch.arange(32))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    exact = (model.model.embed_tokens.weight[ids].float() * 32 ** 0.5).to(torch.bfloat16)
    assert not torch.equal(got, exact)


def test_gemma3_attn_logit_softcapping_has_no_effect(gemma3_pair):
    """transformers' Gemma 3 attention never applies attn_logit_softcapping, so qkv reads it and
    does not apply it either: the transformers model with a cap of 1 gives the same logits."""
    _, ref, model = gemma3_pair
    capped = _with_config("gemma3", attn_logit_softcapping=1.0, attn_implementation="eager")(ref)
    ids = _ids()
    with torch.no_grad():
        assert (capped(ids).logits - model(ids)).abs().max().item() < 1e-4
    config = Gemma3TextConfig.from_hf({**ref.config.to_dict(), "attn_logit_softcapping": 1.0})
    assert config.attn_logit_softcapping == 1.0 and config.attn_softcap is None


# -- reading configs as transformers does ---------------------------------------------------------
def test_gemma_gelu_means_the_tanh_approximation():
    assert transformers.GemmaConfig(hidden_act="gelu").hidden_act == "gelu_pytorch_tanh"
    assert GemmaConfig.from_hf({"hidden_act": "gelu"}).mlp_activation == "gelu_pytorch_tanh"
    assert GemmaConfig.from_hf({"hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"}).mlp_activation \
        == "gelu_pytorch_tanh"
    assert Gemma2Config.from_hf({"hidden_act": "relu", "hidden_activation": "gelu"}).mlp_activation == "gelu"


@pytest.mark.parametrize("cls,hf,extra", [
    (Gemma2Config, "Gemma2Config", {}),
    (Gemma3TextConfig, "Gemma3TextConfig", {"sliding_window_pattern": 3}),
    (Gemma3TextConfig, "Gemma3TextConfig", {}),
])
def test_default_layer_types_as_transformers(cls, hf, extra):
    want = getattr(transformers, hf)(num_hidden_layers=7, **extra).layer_types
    assert cls.from_hf({"num_hidden_layers": 7, **extra}).types == want
    config = cls.from_hf({"num_hidden_layers": 7, "sliding_window": 9, **extra})
    assert [config.window(i) for i in range(7)] == [(8, 0) if t == "sliding_attention" else None for t in want]


LEGACY3 = [  # transformers 4 layouts of Gemma 3's RoPE (released config.json files)
    {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": None},
    {"rope_theta": 1e5, "rope_local_base_freq": 1e3, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0, "rope_theta": 7e4}},
    {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 3e5}}, "rope_local_base_freq": 50.0},
    {"rope_parameters": ROPE3, "rope_theta": 9.0, "rope_local_base_freq": 9.0},
]


@pytest.mark.parametrize("layout", LEGACY3)
def test_gemma3_rope_read_as_transformers(layout):
    """Each layer type's base and scaling as transformers 5 merges them (rope_parameters first,
    then rope_scaling over the global layers, then the old top-level bases, then defaults)."""
    want = transformers.Gemma3TextConfig(**copy.deepcopy(layout)).rope_parameters
    got = Gemma3TextConfig.from_hf(copy.deepcopy(layout))
    for kind, theta, scaling in (("full_attention", got.rope_theta, got.rope_scaling),
                                 ("sliding_attention", got.rope_local_base_freq, got.local_rope_scaling)):
        assert theta == want[kind]["rope_theta"], kind
        if want[kind]["rope_type"] == "default":
            assert scaling is None, kind
        else:
            assert scaling == {"rope_type": want[kind]["rope_type"], "factor": want[kind]["factor"]}, kind


# -- refusals ------------------------------------------------------------------------------------
REFUSED = [
    (GemmaConfig, {"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
    (Gemma2Config, {"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
    (Gemma3TextConfig, {"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
    (GemmaConfig, {"hidden_act": "gelu", "hidden_activation": "gelu"},
     "hidden_activation=\"gelu\" is not supported: it disagrees with hidden_act"),
    (Gemma2Config, {"num_hidden_layers": 2, "layer_types": ["chunked_attention", "full_attention"]},
     "layer_types\\[0\\]=\"chunked_attention\" is not supported; it must be one of"),
    (Gemma2Config, {"num_hidden_layers": 3, "layer_types": ["full_attention"]},
     "layer_types has 1 entries but num_hidden_layers=3"),
    (Gemma2Config, {"sliding_window": None}, "sliding_window is null but layer_types has sliding_attention"),
    (Gemma2Config, {"attn_logit_softcapping": 0}, "attn_logit_softcapping=0 is out of range"),
    (Gemma2Config, {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type=\"yarn\" is not supported"),
    (Gemma3TextConfig, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     "rope_parameters=.* is not supported: Gemma 3 has one RoPE per layer type"),
    (Gemma3TextConfig, {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}},
     "rope_parameters.full_attention.rope_type=\"yarn\" is not supported"),
    (Gemma3TextConfig, {"rope_scaling": {"type": "linear", "factor": 8.0}},
     "rope_scaling.type=\"linear\" is not supported: transformers 5 merges"),
    (Gemma3TextConfig, {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
]


@pytest.mark.parametrize("cls,fields,message", REFUSED, ids=[f"{c.__name__}-{next(iter(f))}" for c, f, _ in REFUSED])
def test_refused(cls, fields, message):
    with pytest.raises(ModelError, match=message):
        cls.from_hf(fields)


def test_multimodal_gemma3_is_refused_naming_the_text_decoder(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["Gemma3ForConditionalGeneration"], '
                                          '"model_type": "gemma3", "text_config": {}, "vision_config": {}}')
    with pytest.raises(ModelError, match="architectures=.*Gemma3ForConditionalGeneration.*is not supported: .*"
                                         "Gemma3ForCausalLM"):
        qkv.load(tmp_path)

"""Every architecture `qkv.load` runs, end to end (issue 17): a tiny random transformers model of
each, saved as safetensors, loads; `qkv.explain` on it records one map per attention layer whose
weights equal transformers' own (`attn_implementation="eager"`, `output_attentions=True`: windows,
soft-caps, q/k norms and partial rotary included); `qkv explain --json` and `qkv serve
--model-dir` answer for it. The per-family comparisons of logits and generation live in each
family's test module; this one makes sure no family is left out of the views."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from family_checks import random_ids
from hf_folders import save_folder

import qkv
from qkv.models.loading import FAMILIES

TEXT = "the cat sat on the mat and the dog ran in the park"
# sizes every tiny model gets where its config has the field (transformers' attribute_map turns
# hidden_size into GPT-2's n_embd and DistilBERT's dim)
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=64, head_dim=8, sliding_window=4, use_sliding_window=True,
            max_window_layers=1, no_rope_layer_interval=2,
            num_local_experts=4, num_experts_per_tok=2, hidden_dim=48, ffn_dim=48, word_embed_proj_dim=32,
            n_positions=64, attn_logit_softcapping=5.0, final_logit_softcapping=8.0, query_pre_attn_scalar=16,
            use_qk_norm=True, qk_layernorm=True, bos_token_id=2, eos_token_id=None, pad_token_id=1)
NOT_HF = {"QkvSeq2Seq"}  # qkv's own translator: explained in tests/inspect
# image models take pixels, not text: tested in tests/models/test_vit.py (explain for images is issue 20's next part)
IMAGE = {"ViTModel", "ViTForImageClassification"}


def _config(arch: str, **changes):
    import transformers

    cls = getattr(transformers, arch).config_class
    accepted = set(inspect.signature(cls.__init__).parameters) | set(cls.attribute_map)
    return cls(**{k: v for k, v in {**TINY, **changes}.items() if k in accepted})


def _build(folder, arch: str, config=None):
    """A tiny random `arch` with eager attention, saved in `folder`; norm weights and biases
    re-randomised so none hides behind ones and zeros."""
    import transformers

    torch.manual_seed(0)
    config = _config(arch) if config is None else config
    model = getattr(transformers, arch)._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.3)
    return save_folder(folder, model)


ARCHS = sorted(a for a in FAMILIES if a not in NOT_HF | IMAGE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return root, {}


def _folder(folders, arch):
    root, built = folders
    if arch not in built:
        built[arch] = (root / arch, _build(root / arch, arch))
    return built[arch]


def test_every_family_is_listed_here():
    """A family added to loading.py without a tiny model here would escape the views' tests."""
    import transformers

    missing = [a for a in ARCHS if not hasattr(transformers, a)]
    assert not missing, f"architectures transformers does not know: {missing}"


@pytest.mark.parametrize("arch", ARCHS)
def test_explain_weights_equal_transformers(arch, folders):
    folder, ref = _folder(folders, arch)
    model = qkv.load(folder)
    result = qkv.explain(TEXT, model=model)
    ids = model.tokenizer(TEXT).input_ids  # (1, T)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    want = torch.stack([a[0] for a in out.attentions])  # (layers, heads, T, T)
    got = result.attentions
    assert got.shape == want.shape, f"{arch}: explain recorded {tuple(got.shape)}, transformers {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"{arch}: max |explain weights - transformers eager attentions| = {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_explain_json(arch, folders, tmp_path, capsys):
    from qkv.cli import main

    folder, _ = _folder(folders, arch)
    out = tmp_path / "e.json"
    assert main(["explain", TEXT, "--model", str(folder), "--focus", "cat", "--json", str(out)]) == 0, \
        capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["format"].startswith("qkv.explain/")
    assert data["labels"] == TEXT.split() and data["layers"] == 3 and len(data["maps"]) == 3


DECODERS = [a for a in ARCHS if a.endswith("ForCausalLM") or a == "GPT2LMHeadModel"]  # transformers can generate


@pytest.mark.parametrize("arch", DECODERS)
def test_generation_of_every_decoder(arch, folders):
    """The shared greedy proof on every decoder, with the sliding-window caches its windowed
    layers get (window 4: the long prompt runs past it)."""
    from family_checks import check_greedy

    folder, ref = _folder(folders, arch)
    model = qkv.load(folder)
    windows = [getattr(block, "window", None) for block in model.blocks]
    cache = model.new_cache(1)
    assert [cache.window(i) for i in range(len(windows))] == [None if w is None else w[0] for w in windows]
    check_greedy(model, ref, vocab=64, window=4)


def test_windowed_families_are_tested_with_windows(folders):
    """Every family with sliding windows gets some here (so the window caches above are exercised)."""
    windowed = set()
    for arch in DECODERS:
        model = qkv.load(_folder(folders, arch)[0])
        if any(getattr(block, "window", None) for block in model.blocks):
            windowed.add(arch)
    assert {"MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "Starcoder2ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
            "SmolLM3ForCausalLM"} <= windowed, sorted(windowed)


def test_serve_model_dir_explains_every_family(folders):
    from starlette.testclient import TestClient

    from qkv.web.app import create_app

    root, _ = folders
    for arch in ARCHS:
        _folder(folders, arch)
    with TestClient(create_app(model_dir=str(root))) as client:
        offered = {m["name"] for m in client.get("/api/models").json()["models"]}
        assert set(ARCHS) <= offered, f"not offered: {sorted(set(ARCHS) - offered)}"
        for arch in ARCHS:
            r = client.post("/api/explain", json={"text": TEXT, "model": arch})
            assert r.status_code == 200, f"{arch}: {r.status_code} {r.text[:300]}"


# RoPE scaling on every rotary family: yarn (static: original context 16 of 64 positions) and
# dynamic (grows past max_position_embeddings=16 while generating, up to 4 x 16). Families whose
# rotary tables do not follow the length reached refuse both by name; Phi-3 reads yarn as
# longrope and has its own tests (test_models_phi3.py).
ROPE = {"yarn": (dict(max_position_embeddings=64), {"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 16}),
        "dynamic": (dict(max_position_embeddings=16), {"rope_type": "dynamic", "factor": 4.0})}
REFUSES_ROPE_SCALING = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GPTNeoXForCausalLM"}


def _rotary_archs() -> list[str]:
    return sorted(a for a in ARCHS if isinstance(getattr(_config(a), "rope_parameters", None), dict)
                  and a != "Phi3ForCausalLM")


@pytest.mark.parametrize("kind", sorted(ROPE))
@pytest.mark.parametrize("arch", _rotary_archs())
def test_rope_scaling_on_every_rotary_family(arch, kind, tmp_path):
    from family_checks import TOLERANCE, check_greedy, check_left_padded_logits, random_ids

    from qkv.models import ModelError

    sizes, scaling = ROPE[kind]
    # heads of 16, so a quarter rotation (GPT-NeoX, StableLM) still rotates 4 features: transformers'
    # dynamic scaling divides by (rotated - 2)
    config = _config(arch, hidden_size=64, head_dim=16, **sizes)
    rope = config.rope_parameters
    nested = "rope_type" not in rope  # Gemma 3: one entry per layer type
    config.rope_parameters = ({t: {**r, **scaling} for t, r in rope.items()} if nested else {**rope, **scaling})
    ref = _build(tmp_path, arch, config)
    if arch in REFUSES_ROPE_SCALING:
        with pytest.raises(ModelError, match=f'rope_type="{kind}" is not supported'):
            qkv.load(tmp_path)
        return
    model = qkv.load(tmp_path)
    check_left_padded_logits(model, ref, vocab=64)
    check_greedy(model, ref, vocab=64)
    ids = random_ids(1, 40, 64, seed=11)  # one pass past max_position_embeddings (dynamic grows)
    with torch.no_grad():
        err = (model(ids) - ref(input_ids=ids).logits).abs().max().item()
    assert err < TOLERANCE, f"{arch} {kind}: max |logits - transformers| = {err:.2e} over 40 tokens"


@pytest.mark.parametrize("arch", DECODERS)
def test_every_decoder_on_every_backend(arch, folders):
    """Each decoder with every layer forced onto each backend (`MultiHeadAttention.backend`): the
    logits equal `auto`'s within 1e-4, or the backend refuses the call by name (a ValueError:
    e.g. sdpa and a soft-cap score_mod, decode and more than one query). reference and tiled,
    which take every mask, window and score_mod, never refuse."""
    from qkv.core.api import backends
    from qkv.nn import MultiHeadAttention

    folder, _ = _folder(folders, arch)
    model = qkv.load(folder)
    ids = random_ids(2, 13, 64, seed=2)
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    with torch.no_grad():
        want = model(ids)
        ran = []
        for name in backends():
            for m in layers:
                m.backend = name
            try:
                got = model(ids)
            except ValueError as exc:
                assert name in str(exc) or "backend" in str(exc), f"{arch} on {name}: unclear refusal: {exc}"
                continue
            finally:
                for m in layers:
                    m.backend = "auto"
            err = (got - want).abs().max().item()
            assert err < 1e-4, f"{arch} on {name}: max |logits - auto| = {err:.2e}"
            ran.append(name)
    print(arch, "ran on", ran)
    assert {"reference", "tiled"} <= set(ran), f"{arch} ran on {ran} only"


@pytest.mark.parametrize("arch", [a for a in _rotary_archs() if a not in REFUSES_ROPE_SCALING])
def test_rope_dict_defaults_are_the_familys(arch):
    """A yarn dict without original_max_position_embeddings, in a config.json without
    max_position_embeddings: transformers fills it from the family's own default (Qwen2 32768,
    Mistral 131072, ...), and so does qkv (it used to take Llama's 2048 for every family)."""
    import transformers

    config = getattr(transformers, arch).config_class(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                      "rope_theta": 10000.0})
    want = config.rope_parameters["original_max_position_embeddings"]
    got = FAMILIES[arch].config.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                             "rope_theta": 10000.0}})
    assert got.rope_scaling["original_max_position_embeddings"] == want
    assert got.rope_scaling["max_position_embeddings"] == config.max_position_embeddings


@pytest.mark.parametrize("arch", ["GlmForCausalLM", "StableLmForCausalLM"])
def test_partial_rotation_read_as_transformers_reads_it(arch):
    """The rotated fraction comes from the rope dict transformers uses (a non-empty rope_scaling
    wins over rope_parameters), and longrope's lists hold one factor per rotated pair."""
    import transformers

    fields = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 64, "partial_rotary_factor": 0.25,
              "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0},
              "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0, "partial_rotary_factor": 0.5}}
    hf = getattr(transformers, arch).config_class(**fields)
    got = FAMILIES[arch].config.from_hf(fields)
    assert got.partial_rotary_factor == hf.rope_parameters["partial_rotary_factor"] == 0.5
    assert got.rope_scaling["rope_type"] == "linear"
    longrope = {"rope_type": "longrope", "rope_theta": 500.0, "partial_rotary_factor": 0.5,
                "original_max_position_embeddings": 16, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    got = FAMILIES[arch].config.from_hf({**fields, "rope_scaling": None, "rope_parameters": longrope})
    assert got.rotary_dim == 8 and len(got.rope_scaling["long_factor"]) == got.rotary_dim // 2

"""attn_implementation="qkv" (qkv.integrations.transformers) against transformers' eager attention.

Every model is a tiny random one built from transformers' config classes (no network). The
eager implementation in float64 is the exact answer; qkv in float32 must be within the tolerance
rule of `qkv.testing` of it, measured against eager in float32 (the plain run).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qkv.integrations import transformers as qkv_hf  # noqa: E402

VOCAB = 64


def tiny(family: str, **over):
    """A tiny random transformers model of `family` in eval mode, float32, seeded."""
    t = transformers
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    if family == "llama":
        cfg, cls = t.LlamaConfig(**{**decoder, **over}), t.LlamaForCausalLM
    elif family == "mistral":
        cfg, cls = t.MistralConfig(**{**decoder, "sliding_window": 5, **over}), t.MistralForCausalLM
    elif family == "qwen2":
        cfg = t.Qwen2Config(**{**decoder, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1,
                               **over})
        cls = t.Qwen2ForCausalLM
    elif family == "gemma2":
        cfg = t.Gemma2Config(**{**decoder, "head_dim": 8, "sliding_window": 5, "attn_logit_softcapping": 0.5,
                                "query_pre_attn_scalar": 12, **over})
        cls = t.Gemma2ForCausalLM
    elif family == "gpt2":
        cfg = t.GPT2Config(**{"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 128,
                              "bos_token_id": 0, "eos_token_id": 0, **over})
        cls = t.GPT2LMHeadModel
    elif family in ("bert", "roberta"):
        base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=VOCAB, max_position_embeddings=128)
        if family == "bert":
            cfg, cls = t.BertConfig(**{**base, **over}), t.BertModel
        else:
            cfg, cls = t.RobertaConfig(**{**base, "pad_token_id": 1, **over}), t.RobertaModel
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def registered():
    qkv_hf.register()


def test_register_is_idempotent():
    qkv_hf.register()
    qkv_hf.register()
    assert qkv_hf.is_registered()
    assert transformers.AttentionInterface._global_mapping["qkv"] is qkv_hf.attention_forward
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionMaskInterface._global_mapping["qkv"] is qkv_hf.qkv_mask


EXPECTED_MODULES = {
    "llama": (["model.layers.0.self_attn", "model.layers.1.self_attn"], "LlamaAttention"),
    "mistral": (["model.layers.0.self_attn", "model.layers.1.self_attn"], "MistralAttention"),
    "qwen2": (["model.layers.0.self_attn", "model.layers.1.self_attn"], "Qwen2Attention"),
    "gemma2": (["model.layers.0.self_attn", "model.layers.1.self_attn"], "Gemma2Attention"),
    "gpt2": (["transformer.h.0.attn", "transformer.h.1.attn"], "GPT2Attention"),
    "bert": (["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"], "BertSelfAttention"),
    "roberta": (["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"], "RobertaSelfAttention"),
}


@pytest.mark.parametrize("family", sorted(EXPECTED_MODULES))
def test_attention_modules_are_the_ones_that_call_the_attention_function(family):
    model = tiny(family, attn_implementation="qkv")
    names, cls = EXPECTED_MODULES[family]
    found = qkv_hf.attention_modules(model)
    assert [n for n, _ in found] == names
    assert all(type(m).__name__ == cls for _, m in found)
    # exactly these modules call it: count the calls of one forward
    called = []
    original = qkv_hf.attention_forward

    def spy(module, *args, **kwargs):
        called.append(module)
        return original(module, *args, **kwargs)

    transformers.AttentionInterface.register("qkv", spy)
    try:
        with torch.no_grad():
            model(torch.randint(2, VOCAB, (1, 6)))
    finally:
        transformers.AttentionInterface.register("qkv", original)
    assert [id(m) for m in called] == [id(m) for _, m in found]


def test_attention_modules_of_bert_with_cross_attention_in_layer_order():
    model = tiny("bert", is_decoder=True, add_cross_attention=True)
    names = [n for n, _ in qkv_hf.attention_modules(model)]
    assert names == ["encoder.layer.0.attention.self", "encoder.layer.0.crossattention.self",
                     "encoder.layer.1.attention.self", "encoder.layer.1.crossattention.self"]


def test_attention_modules_refuses_a_model_without_them():
    with pytest.raises(ValueError, match="no attention modules"):
        qkv_hf.attention_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


class Calls:
    """A recorder: keeps what each module was about to pass to qkv.attention."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, q, k, v, *, mask=None, causal=False, window=None, scale=None, score_mod=None):
        self.calls.append(dict(module=module, q=q, k=k, v=v, mask=mask, causal=causal, window=window, scale=scale,
                               score_mod=score_mod))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_recorder_sees_exactly_what_qkv_attention_gets(family, monkeypatch):
    model = tiny(family, attn_implementation="qkv")
    rec = Calls()
    modules = [m for _, m in qkv_hf.attention_modules(model)]
    for m in modules:
        m.recorder = rec
    seen = []
    real = qkv_hf.attention

    def spy(q, k, v, **kw):
        seen.append((q, k, v, kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(qkv_hf, "attention", spy)
    ids = torch.randint(2, VOCAB, (2, 7))
    with torch.no_grad():
        model(ids)
    assert [c["module"] for c in rec.calls] == modules
    cfg = model.config
    for call, (q, k, v, kw) in zip(rec.calls, seen):
        assert call["q"] is q and call["k"] is k and call["v"] is v
        for name in ("mask", "causal", "window", "scale", "score_mod"):
            assert call[name] is kw[name] or call[name] == kw[name], name
        assert q.shape == (2, cfg.num_attention_heads, 7, cfg.head_dim)
        assert k.shape == v.shape == (2, cfg.num_key_value_heads, 7, cfg.head_dim)
        assert call["causal"] is True
    if family == "gemma2":  # the window (5) binds at 7 tokens: the sliding layer gets the mask, tagged
        kinds = cfg.layer_types
        assert [c["window"] for c in rec.calls] == [None if t == "full_attention" else cfg.sliding_window - 1
                                                   for t in kinds]
        for call, kind in zip(rec.calls, kinds):
            if kind == "full_attention":
                assert call["mask"] is None  # no padding: the causal flag alone
            else:
                band = torch.ones(7, 7, dtype=torch.bool).tril() & ~torch.ones(7, 7, dtype=torch.bool).tril(-5)
                assert call["mask"].dtype == torch.bool and torch.equal(call["mask"][0, 0], band)
        assert all(c["score_mod"] is not None for c in rec.calls)
        assert rec.calls[0]["scale"] == pytest.approx(cfg.query_pre_attn_scalar ** -0.5)
    else:
        assert all(c["mask"] is None and c["window"] is None and c["score_mod"] is None for c in rec.calls)
    for m in modules:
        m.recorder = None

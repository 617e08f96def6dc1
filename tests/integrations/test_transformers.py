"""attn_implementation="qkv" (qkv.integrations.transformers) against transformers' eager attention.

Every model is a tiny random one built from transformers' config classes (no network). The
eager implementation in float64 is the exact answer; qkv in float32 must be within the tolerance
rule of `qkv.testing` of it, measured against eager in float32 (the plain run).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qkv.integrations import transformers as qkv_hf  # noqa: E402
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule  # noqa: E402

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
    cfg.initializer_range = 0.3  # well-separated logits: greedy tokens do not hinge on rounding
    torch.manual_seed(0)
    return cls(cfg).eval()


def as_impl(model, impl: str, dtype=torch.float32):
    """A copy of `model` in `dtype` running attention `impl`."""
    other = copy.deepcopy(model).to(dtype)
    other.set_attn_implementation(impl)
    return other


DECODERS = ["llama", "mistral", "qwen2", "gemma2", "gpt2"]
ENCODERS = ["bert", "roberta"]
L = 12  # longer than every tiny window (5)


def batch(family: str, length: int = L):
    """ids (2, length), the padding mask and `valid` (2, length), True at real tokens: the second sequence is
    padded by 4, on the left for decoders (as generation pads; on the right it would change nothing the real
    tokens see) and on the right for encoders, so padding, causal and windows all meet."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, length), generator=g)
    valid = torch.ones(2, length, dtype=torch.bool)
    if family in ENCODERS:
        valid[1, -4:] = False
    else:
        valid[1, :4] = False
    ids = ids.masked_fill(~valid, 1 if family == "roberta" else 0)
    return ids, valid.long(), valid


@pytest.fixture
def float64_softmax(monkeypatch):
    """Eager's softmax in float64 for float64 inputs: transformers' eager attention takes the softmax with
    dtype=torch.float32 whatever the input, which would make its float64 run no better than float32."""
    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


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


# ----------------------------------------------------------------------------- outputs vs eager
@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_outputs_and_attentions_match_eager_on_a_padded_batch(family, float64_softmax):
    model = tiny(family)
    ids, mask, valid = batch(family)
    kw = dict(attention_mask=mask, output_attentions=True)
    with torch.no_grad():
        exact = as_impl(model, "eager", torch.float64)(ids, **kw)
        plain = as_impl(model, "eager")(ids, **kw)
        fast = as_impl(model, "qkv")(ids, **kw)
        fast64 = as_impl(model, "qkv", torch.float64)(ids, **kw)
    rows = valid  # padded query rows may see nothing in decoders: zeros in qkv, uniform in eager; not compared
    assert_within_rule(main_output(fast)[rows], main_output(plain)[rows], main_output(exact)[rows],
                       factor=FWD_FACTOR, what=f"{family} float32 outputs")
    assert_within_rule(main_output(fast64)[rows], main_output(exact)[rows], main_output(exact)[rows],
                       factor=FWD_FACTOR, what=f"{family} float64 outputs")
    assert len(fast.attentions) == len(exact.attentions) == model.config.num_hidden_layers
    for layer, (f, p, e) in enumerate(zip(fast.attentions, plain.attentions, exact.attentions)):
        assert f.shape == e.shape and f.dtype == torch.float32
        r = rows[:, None, :].expand(-1, f.shape[1], -1)  # (B, H, Lq) real query rows
        assert_within_rule(f[r], p[r], e[r], factor=FWD_FACTOR, what=f"{family} attentions of layer {layer}")


def test_the_features_matter():
    """The comparisons above would catch a dropped window, soft-cap or padding: each changes eager's answer."""
    ids, mask, valid = batch("gemma2")
    base = tiny("gemma2")
    with torch.no_grad():
        ref = as_impl(base, "eager")(ids, attention_mask=mask).logits
        no_cap = as_impl(tiny("gemma2", attn_logit_softcapping=None), "qkv")(ids, attention_mask=mask).logits
        no_window = as_impl(tiny("gemma2", sliding_window=64), "qkv")(ids, attention_mask=mask).logits
        no_padding = as_impl(base, "qkv")(ids).logits
    for other in (no_cap, no_window, no_padding):
        assert (other[valid] - ref[valid]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_gradients_match_eager(family, float64_softmax):
    model = tiny(family)
    ids, mask, valid = batch(family)

    def param_grads(m):
        m.zero_grad()
        out = main_output(m(ids, attention_mask=mask))
        torch.manual_seed(3)
        weights = torch.randn(out.shape, dtype=out.dtype)
        (out[valid] * weights[valid]).sum().backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    exact = param_grads(as_impl(model, "eager", torch.float64))
    plain = param_grads(as_impl(model, "eager"))
    fast = param_grads(as_impl(model, "qkv"))
    assert fast.shape == exact.shape and exact.abs().max() > 0
    assert_within_rule(fast, plain, exact, factor=GRAD_FACTOR, what=f"{family} parameter gradients")


# ----------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gpt2"])
def test_greedy_generation_matches_eager_past_the_window(family):
    model = tiny(family)
    ids, mask, _ = batch(family, length=6)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)  # 16 tokens > window 5
    with torch.no_grad():
        eager = as_impl(model, "eager").generate(ids, **kw)
        fast = as_impl(model, "qkv").generate(ids, **kw)
    assert eager.shape == (2, 16)
    assert torch.equal(fast, eager)


def test_greedy_generation_with_a_static_cache_matches_eager():
    """StaticCache keeps empty future slots: the mask function must hand qkv the whole mask."""
    model = tiny("llama")
    ids, mask, _ = batch("llama", length=6)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        eager = as_impl(model, "eager").generate(ids, **kw)
        fast = as_impl(model, "qkv").generate(ids, **kw)
    assert torch.equal(fast, eager)


def test_generation_returns_attentions_like_eager(float64_softmax):
    model = tiny("mistral")
    ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_attentions=True, return_dict_in_generate=True)
    with torch.no_grad():
        eager = as_impl(model, "eager").generate(ids, **kw)
        fast = as_impl(model, "qkv").generate(ids, **kw)
        exact = as_impl(model, "eager", torch.float64).generate(ids, **kw)
    assert torch.equal(fast.sequences, eager.sequences)
    assert len(fast.attentions) == 8
    for step, (f, p, e) in enumerate(zip(fast.attentions, eager.attentions, exact.attentions)):
        for layer in range(2):
            assert_within_rule(f[layer], p[layer], e[layer], factor=FWD_FACTOR, what=f"step {step} layer {layer}")
    assert fast.attentions[0][0].shape == (1, 4, 6, 6)
    assert fast.attentions[-1][0].shape == (1, 4, 1, 5)  # the last step: one query, the window's 5 cached keys


# ------------------------------------------------------------------------------------- selection
def test_selected_layers_heads_rows_are_slices_of_eager_weights(float64_softmax):
    model = tiny("qwen2", num_hidden_layers=3)
    ids, mask, valid = batch("qwen2")
    kw = dict(attention_mask=mask, output_attentions=True)
    with torch.no_grad():
        plain = as_impl(model, "eager")(ids, **kw).attentions
        exact = as_impl(model, "eager", torch.float64)(ids, **kw).attentions
        fast_model = as_impl(model, "qkv")
        with qkv_hf.attentions(fast_model, layers=[-1, 0], heads=[3, 1], rows=[-1, 4, 9]) as sel:
            out = fast_model(ids, **kw)
    assert sel.layers == [0, 2]
    assert len(out.attentions) == 2
    heads, rows = torch.tensor([3, 1]), torch.tensor([L - 1, 4, 9])
    for got, layer in zip(out.attentions, sel.layers):
        assert got.shape == (2, 2, 3, L)
        want_p = plain[layer][:, heads][:, :, rows]
        want_e = exact[layer][:, heads][:, :, rows]
        assert_within_rule(got, want_p, want_e, factor=FWD_FACTOR, what=f"selected weights of layer {layer}")
    # outside the context every layer is back, in full
    with torch.no_grad():
        again = fast_model(ids, **kw).attentions
    assert len(again) == 3 and again[1].shape == (2, 4, L, L)


def test_selection_keeps_gemma2_softcap_and_window(float64_softmax):
    model = tiny("gemma2")
    ids, mask, _ = batch("gemma2")
    kw = dict(attention_mask=mask, output_attentions=True)
    with torch.no_grad():
        plain = as_impl(model, "eager")(ids, **kw).attentions
        exact = as_impl(model, "eager", torch.float64)(ids, **kw).attentions
        fast_model = as_impl(model, "qkv")
        with qkv_hf.attentions(fast_model, heads=[2], rows=[L - 1, 7]):
            got = fast_model(ids, **kw).attentions
    for layer in range(2):
        assert_within_rule(got[layer], plain[layer][:, [2]][:, :, [L - 1, 7]], exact[layer][:, [2]][:, :, [L - 1, 7]],
                           factor=FWD_FACTOR, what=f"gemma2 selected weights of layer {layer}")


def test_selection_during_generation_gives_the_newest_row():
    model = tiny("llama")
    ids = torch.randint(2, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_attentions=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = as_impl(model, "eager").generate(ids, **kw).attentions
        fast_model = as_impl(model, "qkv")
        with qkv_hf.attentions(fast_model, layers=[1], rows=[-1]):
            got = fast_model.generate(ids, **kw).attentions
    assert len(got) == 4
    for step in range(4):
        (only,) = got[step]
        want = full[step][1][:, :, -1:]
        assert only.shape == want.shape == (1, 4, 1, 5 + step)
        torch.testing.assert_close(only, want)


def test_selection_errors_name_the_valid_range():
    model = as_impl(tiny("llama"), "qkv")
    with pytest.raises(ValueError, match="layer 2 does not exist.*2 attention layers"):
        with qkv_hf.attentions(model, layers=[2]):
            pass
    with pytest.raises(ValueError, match="selects nothing"):
        with qkv_hf.attentions(model, rows=[]):
            pass
    with pytest.raises(TypeError, match="must be ints"):
        with qkv_hf.attentions(model, heads=[1.5]):
            pass
    ids = torch.randint(2, VOCAB, (1, 5))
    with qkv_hf.attentions(model, heads=[4]), pytest.raises(ValueError, match="head 4 does not exist.*has 4"):
        model(ids, output_attentions=True)
    with qkv_hf.attentions(model, rows=[5]), pytest.raises(ValueError, match="row 5 does not exist.*has 5"):
        model(ids, output_attentions=True)


def test_no_weights_without_output_attentions():
    model = as_impl(tiny("llama"), "qkv")
    called = []
    real = qkv_hf.attention_weights
    qkv_hf.attention_weights = lambda *a, **k: called.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            out = model(torch.randint(2, VOCAB, (1, 5)))
    finally:
        qkv_hf.attention_weights = real
    assert out.attentions is None and called == []


# --------------------------------------------------------------------------------- masks and flags
def test_mask_function_skips_only_what_bottom_right_causal_expresses():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    assert qkv_hf.qkv_mask(2, 6, 6) is None  # prefill
    assert qkv_hf.qkv_mask(2, 1, 9, q_offset=8) is None  # a KV-cache step
    assert qkv_hf.qkv_mask(2, 3, 9, q_offset=6) is None  # a chunk of prefill after a cache
    # StaticCache: 16 slots, 9 filled; not aligned -> the whole mask, exactly sdpa's
    got = qkv_hf.qkv_mask(2, 1, 16, q_offset=8)
    assert torch.equal(got, sdpa_mask(2, 1, 16, q_offset=8, allow_is_causal_skip=False))
    assert not getattr(got, "_qkv_causal_bottom_right", False)
    # padding -> a mask (tagged: causal and aligned)
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[1, 0] = False
    got = qkv_hf.qkv_mask(2, 6, 6, attention_mask=pad)
    assert torch.equal(got, sdpa_mask(2, 6, 6, attention_mask=pad, allow_is_causal_skip=False))
    assert got._qkv_causal_bottom_right
    # a sliding window that binds -> a mask
    fn = sliding_window_causal_mask_function(3)
    got = qkv_hf.qkv_mask(1, 6, 6, mask_function=fn, local_size=3)
    assert torch.equal(got, sdpa_mask(1, 6, 6, mask_function=fn, local_size=3, allow_is_causal_skip=False))
    # bidirectional: None only when the caller allows it and nothing is padded
    bidi = dict(allow_is_causal_skip=False, allow_is_bidirectional_skip=True)
    assert qkv_hf.qkv_mask(2, 6, 6, **bidi) is None
    assert qkv_hf.qkv_mask(2, 6, 6, attention_mask=pad, **bidi).shape == (2, 1, 6, 6)


def test_dropout_in_training_mode():
    model = tiny("llama", attention_dropout=0.5)
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    fast = as_impl(model, "qkv")
    with torch.no_grad():
        eval_out = fast(ids).logits
        eager_eval = as_impl(model, "eager")(ids).logits
    torch.testing.assert_close(eval_out, eager_eval)  # eval mode: no dropout at all
    fast.train()
    torch.manual_seed(6)
    a = fast(ids).logits
    a.sum().backward()
    torch.manual_seed(7)
    with torch.no_grad():
        b = fast(ids).logits
    assert a.shape == b.shape == eval_out.shape
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-3 and (a - eval_out).abs().max() > 1e-3
    grads = [p.grad for p in fast.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_attention_sinks_are_refused():
    class Module(torch.nn.Module):
        is_causal = True

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="attention sinks.*attn_implementation='eager'"):
        qkv_hf.attention_forward(Module(), q, q, q, None, s_aux=torch.zeros(2))


def test_register_without_transformers_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'qkv\[hf\]'"):
        qkv_hf.register()
    assert not qkv_hf.is_registered()


def test_generation_without_padding_runs_on_the_causal_flag_alone():
    """The fast path: no mask tensor at any step, prefill or cache step, so backends need no mask."""
    model = as_impl(tiny("llama"), "qkv")
    rec = Calls()
    for _, m in qkv_hf.attention_modules(model):
        m.recorder = rec
    with torch.no_grad():
        model.generate(torch.randint(2, VOCAB, (1, 6)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert [c["q"].shape[2] for c in rec.calls] == [6, 6, 1, 1, 1, 1]
    assert all(c["mask"] is None for c in rec.calls)
    assert [c["causal"] for c in rec.calls] == [True, True, False, False, False, False]  # one query sees all


def test_from_pretrained_with_attn_implementation_qkv(tmp_path):
    tiny("mistral").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="qkv")
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.config._attn_implementation == "qkv"
    ids, mask, valid = batch("mistral")
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)

"""`qkv.explain(text, model=hf_model, tokenizer=hf_tokenizer)` on tiny random transformers models
(BERT, Llama with grouped-query heads, Mistral with a sliding window, Gemma 2 with soft-capping and
sliding layers, GPT-2 with its Conv1D projections): the recorded weights against transformers' own
eager `output_attentions=True` under the tolerance rule (float64 eager as the exact answer), value
norms against their formula, the attention implementation restored (also on error), the subsets
(layers, heads, rows="focus") equal to slices of the whole, every renderer, and the refusals."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import qkv
from qkv.inspect.schema import check_data
from qkv.inspect.terminal import render_focus, render_overview
from qkv.testing import assert_within_rule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXT = "the quick brown fox jumps over the lazy dog"  # 9 words, one token each; longer than the windows (4)
KINDS = ("bert", "llama", "mistral", "gemma2", "gpt2")
# scores large enough to make the weights far from uniform (random init's 0.02 gives near-uniform rows)
INIT = 0.3


def build(kind: str, folder):
    """(a random tiny transformers model of `kind` in eval mode, its fast tokenizer), saved in `folder`."""
    import transformers

    from models.hf_folders import LLAMA_BASE, build_bert_folder, randomise_norms, save_word_tokenizer, tiny_gpt2_config

    torch.manual_seed(0)
    if kind == "bert":
        model = build_bert_folder(folder, initializer_range=INIT)
        with open(folder / "vocab.txt", "a") as f:
            f.write("##s\n")  # a word piece: "cats" is cat ##s
        return model.eval(), transformers.AutoTokenizer.from_pretrained(str(folder))
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(tiny_gpt2_config(initializer_range=INIT))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_BASE, initializer_range=INIT))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            **LLAMA_BASE, sliding_window=4, initializer_range=INIT))
    else:
        config = transformers.Gemma2Config(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, query_pre_attn_scalar=8, sliding_window=4,
            attn_logit_softcapping=2.0, final_logit_softcapping=None, initializer_range=INIT, pad_token_id=1,
            bos_token_id=2, eos_token_id=None)
        model = transformers.Gemma2ForCausalLM(config)
    randomise_norms(model)
    model.save_pretrained(folder)
    save_word_tokenizer(folder)
    # the word-level tokenizer as it is (AutoTokenizer would pick Gemma's own class and its pipeline)
    return model.eval(), transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    models = {}

    def get(kind):
        if kind not in models:
            models[kind] = build(kind, tmp_path_factory.mktemp(kind))
        return models[kind]

    return get


def eager_attentions(model, tok, text: str, dtype) -> torch.Tensor:
    """transformers' own weights: a copy of `model` in `dtype` with attn_implementation "eager",
    output_attentions=True -> (layers, heads, n, n)."""
    ref = copy.deepcopy(model).to(dtype)
    ref.set_attn_implementation("eager")
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = ref(**enc, output_attentions=True)
    return torch.stack([a[0] for a in out.attentions])


@pytest.mark.parametrize("kind", KINDS)
def test_weights_equal_transformers_eager_attentions(tiny, kind):
    """The proof: what explain records through qkv's attention equals transformers' eager weights."""
    model, tok = tiny(kind)
    before = model.config._attn_implementation
    r = qkv.explain(TEXT, model=model, tokenizer=tok)
    assert model.config._attn_implementation == before  # switched to "qkv" for the run only
    plain = eager_attentions(model, tok, TEXT, torch.float32)
    exact = eager_attentions(model, tok, TEXT, torch.float64)
    n = 11 if kind == "bert" else 9  # BERT adds [CLS] and [SEP]
    assert r.attentions.shape == exact.shape == (2, 4, n, n)
    assert_within_rule(r.attentions, plain, exact, factor=2, what=f"{kind} explain weights vs eager")
    rows = r.attentions.max(dim=-1).values
    assert rows.min() > 1.5 / n, "the weights are near uniform: the comparison would prove little"
    assert r.tokens == tok.convert_ids_to_tokens(tok(TEXT)["input_ids"])
    assert r.words == TEXT.split()
    assert r.special == [t in ("[CLS]", "[SEP]") for t in r.tokens]


def test_the_layers_say_how_they_attended(tiny):
    """Mistral's window and Gemma 2's alternating sliding layers and soft-cap, read from the run."""
    m, tok = tiny("mistral")
    assert [a["window"] for a in qkv.explain(TEXT, model=m, tokenizer=tok).layer_attention()] == [[3, 0], [3, 0]]
    g, tok = tiny("gemma2")
    attention = qkv.explain(TEXT, model=g, tokenizer=tok).layer_attention()
    assert [a["window"] for a in attention] == [[3, 0], None]  # sliding, then full
    assert all(a["causal"] and a["score_mod"] == "soft_cap(cap=2.0)" for a in attention)
    b, tok = tiny("bert")
    assert [a["causal"] for a in qkv.explain(TEXT, model=b, tokenizer=tok).layer_attention()] == [False, False]


def _value_parts(kind: str, model, layer: int):
    """(the module whose output holds the values, a function output -> v (B, Hkv, n, D), W_O (E, Hq * D))."""
    if kind == "bert":
        block = model.encoder.layer[layer].attention
        H = model.config.num_attention_heads
        return block.self.value, lambda o: o.unflatten(-1, (H, -1)).transpose(1, 2), block.output.dense.weight
    if kind == "gpt2":
        attn = model.transformer.h[layer].attn
        E, H = model.config.n_embd, model.config.n_head
        return attn.c_attn, lambda o: o[..., 2 * E:].unflatten(-1, (H, -1)).transpose(1, 2), attn.c_proj.weight.t()
    attn = model.model.layers[layer].self_attn
    Hkv = model.config.num_key_value_heads
    return attn.v_proj, lambda o: o.unflatten(-1, (Hkv, -1)).transpose(1, 2), attn.o_proj.weight


def value_norms(kind: str, model, tok, text: str, dtype) -> torch.Tensor:
    """Kobayashi et al.'s ||alpha_ij v_j W_O^h|| from transformers' eager run in `dtype`: (layers, heads, n, n)."""
    ref = copy.deepcopy(model).to(dtype)
    ref.set_attn_implementation("eager")
    seen, hooks, parts = {}, [], []
    for layer in range(2):
        module, to_heads, w_o = _value_parts(kind, ref, layer)
        parts.append((to_heads, w_o))
        hooks.append(module.register_forward_hook(lambda m, i, o, layer=layer: seen.__setitem__(layer, o)))
    with torch.no_grad():
        out = ref(**tok(text, return_tensors="pt"), output_attentions=True)
    for h in hooks:
        h.remove()
    maps = []
    for layer, (to_heads, w_o) in enumerate(parts):
        alpha = out.attentions[layer][0]  # (Hq, n, n)
        v = to_heads(seen[layer])[0]  # (Hkv, n, D)
        Hq, D = alpha.shape[0], v.shape[-1]
        v = v.repeat_interleave(Hq // v.shape[0], dim=0)  # (Hq, n, D): the value head each query head reads
        w = w_o.detach().reshape(w_o.shape[0], Hq, D).transpose(0, 1)  # (Hq, E, D)
        norms = torch.linalg.vector_norm(v @ w.transpose(-1, -2), dim=-1)  # (Hq, n)
        maps.append(alpha * norms[:, None, :])
    return torch.stack(maps)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_value_norms_use_the_output_projection(tiny, kind):
    """o_proj (Llama), GPT-2's transposed Conv1D c_proj, and BERT's sibling output.dense."""
    model, tok = tiny(kind)
    r = qkv.explain(TEXT, model=model, tokenizer=tok)
    got = r.maps("value-norm", "token")
    plain, exact = (value_norms(kind, model, tok, TEXT, d) for d in (torch.float32, torch.float64))
    assert_within_rule(got, plain, exact, factor=2, what=f"{kind} value norms")


def test_value_norm_without_an_output_projection_is_a_clear_error(tiny, monkeypatch):
    from qkv.inspect import capture

    model, tok = tiny("llama")
    monkeypatch.setattr(capture, "_OUT_NAMES", ())
    r = qkv.explain(TEXT, model=model, tokenizer=tok)
    with pytest.raises(ValueError, match=r"no output projection for layer 0 \(model.layers.0.self_attn\)"):
        r.maps("value-norm")
    assert r.maps("rollout").shape == (2, 1, 9, 9)


def test_subsets_are_slices_of_the_whole(tiny):
    model, tok = tiny("llama")
    whole = qkv.explain(TEXT, model=model, tokenizer=tok)
    part = qkv.explain(TEXT, model=model, tokenizer=tok, layers=[1], heads=[3, 0])
    assert part.num_layers == 1 and part.records[0].layer == 1
    assert torch.equal(part.attentions[0], whole.attentions[1][[3, 0]])
    focus = qkv.explain(TEXT, model=model, tokenizer=tok, focus="fox", rows="focus")
    assert focus.rows == [3]
    torch.testing.assert_close(focus.focus_rows("fox"), whole.focus_rows("fox"), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="heads \\[4\\] do not exist"):
        qkv.explain(TEXT, model=model, tokenizer=tok, heads=[4])
    with pytest.raises(ValueError, match="layers \\[2\\] do not exist"):
        qkv.explain(TEXT, model=model, tokenizer=tok, layers=[2])


def test_recording_leaves_the_output_alone_and_restores_on_error(tiny, monkeypatch):
    from qkv.integrations.transformers import attention_modules

    model, tok = tiny("llama")
    enc = tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
    qkv.explain(TEXT, model=model, tokenizer=tok)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, before)
    assert all(getattr(m, "recorder", None) is None for _, m in attention_modules(model))

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the final norm")

    monkeypatch.setattr(model.model.norm, "forward", broken)
    impl = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        qkv.explain(TEXT, model=model, tokenizer=tok)
    assert model.config._attn_implementation == impl
    assert all(getattr(m, "recorder", None) is None for _, m in attention_modules(model))


def test_every_renderer_draws_a_transformers_result(tiny, tmp_path):
    import json

    model, tok = tiny("bert")
    r = qkv.explain(TEXT, model=model, tokenizer=tok, focus="fox")
    data = r.to_dict(focus="fox", hide_special=True)
    assert check_data(data) == (9, 2, 4)
    assert data["model"] == r.model_name
    r.save_json(tmp_path / "r.json", focus="fox")
    assert check_data(json.loads((tmp_path / "r.json").read_text()))[0] == 11
    r.save_html(tmp_path / "r.html", focus="fox")
    assert "fox" in (tmp_path / "r.html").read_text()
    pytest.importorskip("matplotlib")
    r.save_png(tmp_path / "r.png", focus="fox", layer=1, head=2)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fox" in render_focus(r, "fox") and "layer" in render_overview(r, layer=0)
    steps = r.steps("fox", 1, 2)
    torch.testing.assert_close(steps.weights, r.attentions[1, 2, r._first_token("fox")])
    torch.testing.assert_close(steps.output, steps.weights @ steps.values)
    other = qkv.explain(TEXT.replace("fox", "dog"), model=model, tokenizer=tok)
    cmp = r.compare(other, focus="fox")
    assert cmp["difference"].shape == (2, 4, 11, 11) and cmp["jsd"].shape == (2, 4)
    assert r.maps("rollout", hide_special=True).shape == (2, 1, 9, 9)


def test_words_join_sub_word_tokens(tiny):
    """A word the WordPiece vocabulary splits ("cats" -> cat ##s) is one word of two tokens."""
    model, tok = tiny("bert")
    r = qkv.explain("The cats sat, on the mat", model=model, tokenizer=tok, focus="cats")
    assert r.tokens == ["[CLS]", "the", "cat", "##s", "sat", "[UNK]", "on", "the", "mat", "[SEP]"]
    assert r.words == ["The", "cats", "sat", ",", "on", "the", "mat"]
    assert r.word_of_token == [None, 0, 1, 1, 2, 3, 4, 5, 6, None]
    assert r.maps("raw", "word").shape == (2, 4, 9, 9)
    whole = r.attentions  # (L, H, 10, 10)
    torch.testing.assert_close(r.maps("raw", "word")[:, :, 2, 1], whole[:, :, 2:4, 1].mean(-1))


def test_byte_level_words_drop_the_space_their_tokens_carry():
    """GPT-2's byte-level BPE: a word's tokens cover the space before it (offsets untrimmed), and
    the word is the text without it."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from models.hf_folders import SENTENCES, tiny_gpt2_config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(tiny_gpt2_config(vocab_size=300, n_positions=64)).eval()
    text = "the quick brown fox jumps over the lazy dogs"
    r = qkv.explain(text, model=model, tokenizer=tok, focus="dogs")
    assert r.words == text.split() and not any(r.special)
    assert r.tokens[-2:] == ["Ġdog", "s"] and r.word_of_token[-2:] == [8, 8]
    n = len(r.tokens)
    assert r.attentions.shape == (2, 4, n, n) and r.maps("raw", "word").shape == (2, 4, 9, 9)
    assert_within_rule(r.attentions, eager_attentions(model, tok, text, torch.float32),
                       eager_attentions(model, tok, text, torch.float64), factor=2, what="GPT-2 byte-level")


def test_length_is_checked_and_truncate_cuts(tiny):
    model, tok = tiny("bert")  # 40 positions (build_bert_folder)
    long = " ".join(["the cat"] * 30)
    with pytest.raises(ValueError, match="has 62 tokens but .* takes at most 40; shorten it, or pass truncate=True"):
        qkv.explain(long, model=model, tokenizer=tok)
    r = qkv.explain(long, model=model, tokenizer=tok, truncate=True)
    assert len(r.tokens) == 40 and r.tokens[-1] == "[SEP]"


def test_refusals_are_clear(tiny, tmp_path):
    import transformers

    model, tok = tiny("llama")
    with pytest.raises(TypeError, match="pass tokenizer="):
        qkv.explain(TEXT, model=model)
    with pytest.raises(TypeError, match="fast tokenizer"):
        qkv.explain(TEXT, model=model, tokenizer=object())
    with pytest.raises(TypeError, match="tokenizer= is for transformers models"):
        qkv.explain(TEXT, model=qkv.load("recall"), tokenizer=tok)
    torch.manual_seed(0)
    bart = transformers.BartModel(transformers.BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32)).eval()
    with pytest.raises(ValueError, match="is an encoder-decoder; explain runs transformers' encoder-only"):
        qkv.explain(TEXT, model=bart, tokenizer=tok)
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).eval()
    with pytest.raises(ValueError, match="computes its attention in its own code"):
        qkv.explain(TEXT, model=falcon, tokenizer=tok)


def test_load_transformers_attaches_the_tokenizer(tmp_path):
    """A folder qkv does not run natively (ELECTRA), loaded by transformers, explained without tokenizer=."""
    from models.foreign_folders import electra_folder
    from qkv.models.loading import ForeignArchitecture, load_transformers

    folder = electra_folder(tmp_path / "electra")
    with pytest.raises(ForeignArchitecture, match="ElectraModel") as info:
        qkv.load(folder)
    assert info.value.architecture == "ElectraModel" and "load_transformers" in str(info.value)
    model = load_transformers(folder)
    r = qkv.explain(TEXT, model)
    assert r.tokens[0] == "[CLS]" and r.attentions.shape == (2, 4, 11, 11)
    assert r.model_name == str(folder)
    plain = eager_attentions(model, model.tokenizer, TEXT, torch.float32)
    exact = eager_attentions(model, model.tokenizer, TEXT, torch.float64)
    assert_within_rule(r.attentions, plain, exact, factor=2, what="ELECTRA explain weights vs eager")


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    from models.foreign_folders import electra_folder, falcon_folder

    root = tmp_path_factory.mktemp("foreign")
    return {"electra": electra_folder(root / "electra"), "falcon": falcon_folder(root / "falcon")}


def test_the_cli_explains_a_foreign_architecture_through_transformers(foreign, capsys, tmp_path):
    from qkv import cli
    from qkv.models import load_transformers

    folder = str(foreign["electra"])
    out_json = tmp_path / "e.json"
    code = cli.main(["explain", TEXT, "--model", folder, "--focus", "fox", "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.splitlines() == ["qkv runs ElectraModel through transformers (qkv has no native implementation)"]
    assert "from 'fox' to each word" in out and f"wrote {out_json}" in out
    import json

    data = json.loads(out_json.read_text())
    expected = qkv.explain(TEXT, load_transformers(folder), focus="fox").to_dict(focus="fox")
    assert data["labels"] == expected["labels"] and data["maps"] == expected["maps"]


def test_the_cli_checks_a_foreign_model_before_it_runs(foreign, capsys):
    from qkv import cli

    folder = str(foreign["electra"])
    for argv, words in ((["--layer", "2"], "--layer 2 does not exist: the model has layers 0..1"),
                        (["--head", "4"], "--head 4 does not exist: the model has heads 0..3"),
                        (["--focus", "zebra"], "focus word 'zebra' is not in the text"),
                        (["--focus", "fox", "--compare", "the fox"], "--compare needs a sentence as long as")):
        code = cli.main(["explain", TEXT, "--model", folder, *argv])
        _, err = capsys.readouterr()
        assert code == 2 and words in err.splitlines()[-1], err
    code = cli.main(["explain", " ".join(["the cat"] * 30), "--model", folder])
    _, err = capsys.readouterr()
    assert code == 2 and "takes at most 40; shorten it, or add --truncate" in err


def test_a_model_whose_attention_transformers_cannot_switch_is_refused(foreign, capsys):
    from qkv import cli

    code = cli.main(["explain", TEXT, "--model", str(foreign["falcon"])])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("qkv runs FalconForCausalLM through transformers")
    assert "FalconForCausalLM computes its attention in its own code" in lines[-1]


def test_without_transformers_the_cli_says_how_to_install_it(foreign, capsys, monkeypatch):
    import sys

    from qkv import cli

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    code = cli.main(["explain", TEXT, "--model", str(foreign["electra"])])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines() == ["qkv explain: error: qkv has no native implementation of ElectraModel, and running "
                                "it through transformers needs transformers: pip install 'qkv[hf]'"]


def test_native_architectures_keep_qkv_s_own_models(capsys, tmp_path):
    from models.hf_folders import build_folder
    from qkv import cli

    build_folder(tmp_path, "llama")
    code = cli.main(["explain", TEXT, "--model", str(tmp_path), "--focus", "fox"])
    out, err = capsys.readouterr()
    assert code == 0 and "through transformers" not in err and "LlamaForCausalLM" not in err
    assert "from 'fox' to each word" in out

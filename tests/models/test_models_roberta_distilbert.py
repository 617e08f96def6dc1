"""RoBERTa, XLM-RoBERTa and DistilBERT checkpoints (qkv/models/roberta.py, distilbert.py)
against transformers, offline: tiny random models built from configs written here (every
LayerNorm weight and every bias re-randomised, so a missing one cannot hide behind ones and
zeros), saved as safetensors with the family's tokenizer files (RoBERTa: a byte-level BPE
vocab.json + merges.txt trained here; DistilBERT: a WordPiece vocab.txt), loaded by qkv.load."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import (
    LABELS,
    TEXTS,
    check_fill_mask,
    check_labels,
    check_left_padded_logits,
    left_padded,
    masked_err,
    padded_texts,
)
from hf_folders import edit_config
from safetensors.torch import load_file

import qkv
from qkv.models import (
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertModel,
    EncoderModel,
    ModelError,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

V = 64
TOL = 1e-4
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as in roberta-base
COMMON = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
ROBERTA = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=64, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
               id2label=LABELS, **COMMON)
DISTILBERT = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64,
                  dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, initializer_range=0.2,
                  id2label=LABELS)


# -- folders ----------------------------------------------------------------------------------

def write_bpe_tokenizer(folder) -> None:
    """A byte-level BPE vocab.json + merges.txt of exactly V tokens trained on TEXTS, with
    RoBERTa's special tokens first (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=V, special_tokens=ROBERTA_SPECIALS,
                                                       show_progress=False))
    assert tok.get_vocab_size() == V
    tok.model.save(str(folder))


def write_wordpiece_vocab(folder) -> None:
    words = sorted({w for t in TEXTS for w in t.split()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokens += [f"[unused{i}]" for i in range(V - len(tokens))]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))


def write_sentence_transformers(folder, hidden: int, mode: str = "mean", normalize: bool = True) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": mode == "mean",
         "pooling_mode_cls_token": mode == "cls"}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))


def randomise(model) -> None:
    """Every LayerNorm weight in [0.5, 1.5], every bias in [-0.5, 0.5]."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)


def centre_classifier(linear, features) -> None:
    """Spread the classifier's logits around 0 over `features` (B, E), so texts get different labels."""
    with torch.no_grad():
        linear.weight.normal_(0.0, 3.0)
        linear.bias.copy_(-linear.weight @ features.mean(dim=0))


def build_roberta(folder, arch: str = "RobertaModel", seed: int = 0, sentence: bool = False, **kw):
    """A random transformers `arch` (Roberta... or XLMRoberta...) saved with the BPE tokenizer files."""
    import transformers

    torch.manual_seed(seed)
    config_class = transformers.XLMRobertaConfig if arch.startswith("XLM") else transformers.RobertaConfig
    model = getattr(transformers, arch)(config_class(**{**ROBERTA, **kw})).eval()
    randomise(model)
    write_bpe_tokenizer(folder)
    if arch.endswith("ForSequenceClassification"):
        batch = transformers.RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))(
            TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model.roberta(**batch).last_hidden_state[:, 0]  # (B, E)
            centre_classifier(model.classifier.out_proj, torch.tanh(model.classifier.dense(h)))
    if sentence:
        write_sentence_transformers(folder, ROBERTA["hidden_size"])
    model.save_pretrained(folder, safe_serialization=True)
    return model


def build_distilbert(folder, arch: str = "DistilBertModel", seed: int = 0, sentence: bool = False, **kw):
    """A random transformers `arch` (DistilBert...) saved with a WordPiece vocab.txt."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, arch)(transformers.DistilBertConfig(**{**DISTILBERT, **kw})).eval()
    randomise(model)
    write_wordpiece_vocab(folder)
    if arch == "DistilBertForSequenceClassification":
        batch = transformers.DistilBertTokenizer(str(folder / "vocab.txt"))(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model.distilbert(**batch).last_hidden_state[:, 0]  # (B, E)
            centre_classifier(model.classifier, torch.relu(model.pre_classifier(h)))
    if sentence:
        write_sentence_transformers(folder, DISTILBERT["dim"], mode="cls", normalize=False)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _fixture(build, arch: str, **kw):
    @pytest.fixture(scope="module")
    def folder_and_ref(tmp_path_factory):
        folder = tmp_path_factory.mktemp(arch)
        return folder, build(folder, arch, **kw)

    return folder_and_ref


roberta = _fixture(build_roberta, "RobertaModel", sentence=True)
roberta_mlm = _fixture(build_roberta, "RobertaForMaskedLM", seed=1)
roberta_clf = _fixture(build_roberta, "RobertaForSequenceClassification", seed=2)
distilbert = _fixture(build_distilbert, "DistilBertModel", sentence=True)
distilbert_mlm = _fixture(build_distilbert, "DistilBertForMaskedLM", seed=1)
distilbert_clf = _fixture(build_distilbert, "DistilBertForSequenceClassification", seed=2)


@pytest.fixture(scope="module")
def loaded():
    """qkv.load, once per folder."""
    cache = {}

    def load(folder):
        if folder not in cache:
            cache[folder] = qkv.load(folder)
        return cache[folder]

    return load


# -- helpers ----------------------------------------------------------------------------------

def _base(ref):
    return getattr(ref, "roberta", None) or getattr(ref, "distilbert", None) or ref


def _hidden(ref, ids, mask, **kw):
    with torch.no_grad():
        return _base(ref)(input_ids=ids, attention_mask=mask.long(), **kw).last_hidden_state


def _check_masked_lm_logits(model, ref) -> None:
    """qkv's masked-LM logits (B, L, V) within TOL of transformers' on the padded TEXTS and on a left-padded batch."""
    ids, mask = padded_texts(model)
    with torch.no_grad():
        got, want = model.logits(ids, mask), ref(input_ids=ids, attention_mask=mask.long()).logits
    assert got.shape == (len(TEXTS), ids.shape[1], V) and masked_err(got, want, mask) < TOL
    check_left_padded_logits(lambda ids, attention_mask: model.logits(ids, attention_mask), ref, V)


# -- RoBERTa: the encoder ---------------------------------------------------------------------

def test_roberta_hidden_states_match_transformers_right_and_left_padded(roberta, loaded):
    folder, ref = roberta
    model = loaded(folder)
    assert type(model) is RobertaModel and model.head is None
    ids, mask = padded_texts(model)
    with torch.no_grad():
        err = masked_err(model(ids, mask), _hidden(ref, ids, mask), mask)
    assert err < TOL, f"right-padded: max |qkv - transformers| = {err:.2e}"
    ids, mask = left_padded([13, 9, 5], V, seed=1, pad_id=1)  # pad_token_id: its positions are the padding's
    with torch.no_grad():
        err = masked_err(model(ids, mask), _hidden(ref, ids, mask), mask.bool())
    assert err < TOL, f"left-padded: max |qkv - transformers| = {err:.2e}"


def test_roberta_position_offset_matters(roberta, loaded):
    """Positions count real tokens from pad_token_id + 1: with BERT's positions (0, 1, ...)
    transformers' own states move by far more than the tolerance, while qkv matches the original."""
    folder, ref = roberta
    model = loaded(folder)
    ids, mask = left_padded([13, 9, 5], V, seed=2, pad_id=1)
    bert_positions = torch.arange(ids.shape[1]).expand_as(ids)
    want = _hidden(ref, ids, mask)
    moved = masked_err(_hidden(ref, ids, mask, position_ids=bert_positions), want, mask.bool())
    assert moved > 1e-3, f"BERT's positions should change RoBERTa's states; they moved {moved:.2e}"
    with torch.no_grad():
        got = model(ids, mask)
        assert masked_err(got, want, mask.bool()) < TOL
        # a left-padded text gets the states it has alone
        alone = model(ids[2:, -5:])[0]
    assert (got[2, -5:] - alone).abs().max().item() < TOL


def test_roberta_tokenizer_ids_match_roberta_tokenizer(roberta, loaded):
    from transformers import RobertaTokenizer

    folder, _ = roberta
    model = loaded(folder)
    hf = RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert model.tokenizer.pad_id == 1 == hf.pad_token_id
    for text in [*TEXTS, "the <mask> sat on the<mask> .", " a dog", "queries </s> keys<s>"]:
        got = model.tokenizer([text]).input_ids[0].tolist()
        assert got == hf(text)["input_ids"], f"{text!r}: qkv {got} vs transformers {hf(text)['input_ids']}"
    assert model.tokenizer([TEXTS[0]]).tokens[0][0] == "<s>"


def test_roberta_tokenizer_class_named_in_tokenizer_config(tmp_path):
    """tokenizer_config.json's tokenizer_class decides, as for AutoTokenizer; its add_prefix_space is read."""
    from transformers import RobertaTokenizer

    from qkv.models import Tokenizer

    write_bpe_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "RobertaTokenizer", "add_prefix_space": True}))
    hf = RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), add_prefix_space=True)
    got = Tokenizer.from_folder(tmp_path)([TEXTS[1]]).input_ids[0].tolist()
    assert got == hf(TEXTS[1])["input_ids"] and got[0] == 0 and got[-1] == 2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    assert Tokenizer.from_folder(tmp_path)([TEXTS[1]]).input_ids[0].tolist()[0] != 0, "GPT-2's BPE adds no <s>"


def test_roberta_encode_pools_as_the_folder_prescribes(roberta, loaded):
    folder, ref = roberta
    model = loaded(folder)
    assert model.pooling.mode == "mean" and model.pooling.normalize
    ids, mask = padded_texts(model)
    m = mask.unsqueeze(-1).float()
    want = torch.nn.functional.normalize((_hidden(ref, ids, mask) * m).sum(dim=1) / m.sum(dim=1), dim=1)
    got = model.encode(TEXTS, batch_size=3)
    assert got.shape == (len(TEXTS), 32) and (got - want).abs().max().item() < TOL
    sims = model.similarity(TEXTS[0], TEXTS[1:])
    assert torch.allclose(sims, want[1:] @ want[0], atol=TOL)


def test_roberta_length_limit_leaves_out_the_reserved_positions(roberta, loaded):
    model = loaded(roberta[0])
    assert model.config.max_tokens == 64 - 2 == model.tokenizer.max_length
    with pytest.raises(ModelError, match="input has 63 tokens but this model has 62 positions"):
        model(torch.full((1, 63), 7))
    assert model(torch.full((1, 62), 7)).shape == (1, 62, 32)


def test_roberta_is_decoder_runs_causally_as_transformers(tmp_path):
    ref = build_roberta(tmp_path, seed=3, is_decoder=True)
    model = qkv.load(tmp_path)
    ids, mask = left_padded([9, 6], V, seed=3, pad_id=1)
    with torch.no_grad():
        assert masked_err(model(ids, mask), _hidden(ref, ids, mask), mask.bool()) < TOL


# -- RoBERTa: heads ---------------------------------------------------------------------------

def test_roberta_masked_lm_logits_match_transformers(roberta_mlm, loaded):
    folder, ref = roberta_mlm
    model = loaded(folder)
    assert isinstance(model, RobertaForMaskedLM) and "fill_mask" in model.head
    _check_masked_lm_logits(model, ref)


def test_roberta_masked_lm_bias_matters(tmp_path):
    ref = build_roberta(tmp_path, "RobertaForMaskedLM", seed=4)
    model = qkv.load(tmp_path)
    ids, mask = padded_texts(model)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).logits
        model.lm_head.bias.zero_()
        assert masked_err(model.logits(ids, mask), want, mask) > 1e-2


def test_roberta_fill_mask_gives_transformers_top_tokens(roberta_mlm, loaded):
    folder, ref = roberta_mlm
    model = loaded(folder)
    check_fill_mask(model, ref, "the <mask> sat on the<mask> .", top_k=5)
    with pytest.raises(ModelError, match="no <mask> token"):
        model.fill_mask("the cat sat")


def test_roberta_untied_decoder_adds_its_own_bias(tmp_path):
    ref = build_roberta(tmp_path, "RobertaForMaskedLM", seed=5, tie_word_embeddings=False)
    assert {"lm_head.decoder.weight", "lm_head.decoder.bias"} <= set(load_file(tmp_path / "model.safetensors"))
    assert not torch.equal(ref.lm_head.decoder.bias, ref.lm_head.bias)
    model = qkv.load(tmp_path)
    assert model.lm_head.decoder is not None and model.config.mlm_bias == "lm_head.decoder.bias"
    ids, mask = padded_texts(model)
    with torch.no_grad():
        assert masked_err(model.logits(ids, mask), ref(input_ids=ids, attention_mask=mask.long()).logits, mask) < TOL


def test_roberta_masked_lm_folder_with_pooler_and_stored_decoder_loads(tmp_path):
    """roberta-base's shape: a RobertaForMaskedLM checkpoint that also holds the pooler and
    stores the tied decoder (weight and bias)."""
    from safetensors.torch import save_file

    ref = build_roberta(tmp_path, "RobertaForMaskedLM", seed=10)
    sd = load_file(tmp_path / "model.safetensors")
    sd.update({"roberta.pooler.dense.weight": torch.randn(32, 32), "roberta.pooler.dense.bias": torch.randn(32),
               "lm_head.decoder.weight": sd["roberta.embeddings.word_embeddings.weight"].clone(),
               "lm_head.decoder.bias": sd["lm_head.bias"].clone()})
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = qkv.load(tmp_path)
    assert model.pooler is not None and model.lm_head.decoder is None
    ids, mask = padded_texts(model)
    with torch.no_grad():
        assert masked_err(model.logits(ids, mask), ref(input_ids=ids, attention_mask=mask.long()).logits, mask) < TOL
    sd["lm_head.decoder.bias"] = torch.zeros(V + 1)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"lm_head.decoder.bias: checkpoint \(65\), model expects \(64\)"):
        qkv.load(tmp_path)


def test_roberta_classification_logits_and_labels_match_transformers(roberta_clf, loaded):
    folder, ref = roberta_clf
    model = loaded(folder)
    assert isinstance(model, RobertaForSequenceClassification) and "3 labels" in model.head
    assert model.config.id2label == tuple(LABELS.values())
    ids, mask = padded_texts(model)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).logits  # (B, 3)
        got = model.logits(ids, mask)
    assert got.shape == want.shape == (len(TEXTS), 3) and (got - want).abs().max().item() < TOL
    check_labels(model, want)
    with torch.no_grad():  # the comparison can fail: without the dense layer's bias the logits move
        model.classifier.dense.bias.zero_()
        assert (model.logits(ids, mask) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch, head_key, words", [
    ("RobertaForTokenClassification", "classifier.weight", "token classifier (3 labels) is not run"),
    ("RobertaForQuestionAnswering", "qa_outputs.weight", "span head (qa_outputs) is not run"),
])
def test_roberta_report_only_heads_load_the_encoder(tmp_path, arch, head_key, words):
    ref = build_roberta(tmp_path, arch, seed=6)
    assert head_key in load_file(tmp_path / "model.safetensors")
    model = qkv.load(tmp_path)
    assert type(model) is RobertaModel and model.head.startswith(arch) and words in model.head
    ids, mask = padded_texts(model)
    with torch.no_grad():
        assert masked_err(model(ids, mask), _hidden(ref, ids, mask), mask) < TOL


@pytest.mark.parametrize("arch", ["XLMRobertaModel", "XLMRobertaForMaskedLM"])
def test_xlm_roberta_is_roberta_by_another_name(tmp_path, arch):
    ref = build_roberta(tmp_path, arch, seed=7)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "xlm-roberta"
    model = qkv.load(tmp_path)
    assert isinstance(model, RobertaModel) and (arch == "XLMRobertaModel") == (model.head is None)
    ids, mask = left_padded([11, 7], V, seed=4, pad_id=1)
    with torch.no_grad():
        if arch == "XLMRobertaModel":
            assert masked_err(model(ids, mask), _hidden(ref, ids, mask), mask.bool()) < TOL
        else:
            want = ref(input_ids=ids, attention_mask=mask).logits
            assert masked_err(model.logits(ids, mask), want, mask.bool()) < TOL


@pytest.mark.parametrize("arch, fields, match", [
    ("RobertaModel", {"pad_token_id": None}, "pad_token_id=null is not supported: RobertaModel numbers positions"),
    ("RobertaModel", {"max_position_embeddings": 2}, "max_position_embeddings=2 leaves no position"),
    ("RobertaModel", {"add_cross_attention": True}, "add_cross_attention=true is not supported: qkv's RobertaModel"),
    ("RobertaModel", {"position_embedding_type": "relative_key"}, "position_embedding_type=.*learned absolute"),
    ("XLMRobertaModel", {"pad_token_id": None}, "pad_token_id=null is not supported: XLMRobertaModel"),
    ("RobertaForSequenceClassification", {"problem_type": "regression"}, "problem_type=.*single-label"),
    ("RobertaForMaskedLM", {"architectures": ["RobertaForCausalLM"]}, "RobertaForCausalLM.*qkv runs.*RobertaModel"),
])
def test_roberta_refusals(tmp_path, arch, fields, match):
    build_roberta(tmp_path, arch, seed=8)
    edit_config(tmp_path, **fields)
    with pytest.raises(ModelError, match=match):
        qkv.load(tmp_path)


def test_roberta_vocab_without_its_special_tokens_is_named(tmp_path):
    build_roberta(tmp_path, seed=9)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab["<maskx>"] = vocab.pop("<mask>")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ModelError, match=r"vocab.json has no <mask>: a RoBERTa vocabulary holds its special tokens"):
        qkv.load(tmp_path)


# -- DistilBERT -------------------------------------------------------------------------------

def test_distilbert_hidden_states_match_transformers_on_a_padded_batch(distilbert, loaded):
    folder, ref = distilbert
    model = loaded(folder)
    assert type(model) is DistilBertModel and isinstance(model, EncoderModel) and model.head is None
    ids, mask = padded_texts(model)
    with torch.no_grad():
        err = masked_err(model(ids, mask), _hidden(ref, ids, mask), mask)
    assert err < TOL, f"max |qkv - transformers| = {err:.2e}"
    ids, mask = left_padded([13, 9, 5], V, seed=1, pad_id=0)
    with torch.no_grad():
        assert masked_err(model(ids, mask), _hidden(ref, ids, mask), mask.bool()) < TOL


def test_distilbert_tokenizer_and_encode(distilbert, loaded):
    from transformers import DistilBertTokenizer

    folder, ref = distilbert
    model = loaded(folder)
    hf = DistilBertTokenizer(str(folder / "vocab.txt"))
    for text in [*TEXTS, "the [MASK] sat ."]:
        assert model.tokenizer([text]).input_ids[0].tolist() == hf(text)["input_ids"]
    assert model.pooling.mode == "cls" and not model.pooling.normalize
    ids, mask = padded_texts(model)
    got = model.encode(TEXTS, batch_size=3)
    assert (got - _hidden(ref, ids, mask)[:, 0]).abs().max().item() < TOL
    assert model.similarity(TEXTS[0], TEXTS[1:]).shape == (3,)
    with pytest.raises(ValueError, match="DistilBERT has no token type"):
        model(ids, mask, torch.zeros_like(ids))


def test_distilbert_activation_matters(distilbert, loaded, tmp_path):
    """`activation` is honoured: a relu DistilBERT differs from the gelu one built from the same
    seed by far more than the tolerance, and qkv matches each."""
    folder, ref_gelu = distilbert
    ref_relu = build_distilbert(tmp_path, seed=0, activation="relu")
    ids, mask = padded_texts(loaded(folder))
    want = _hidden(ref_relu, ids, mask)
    assert masked_err(_hidden(ref_gelu, ids, mask), want, mask) > 1e-3
    with torch.no_grad():
        assert masked_err(qkv.load(tmp_path)(ids, mask), want, mask) < TOL


def test_distilbert_sinusoidal_positions_are_loaded_as_stored(tmp_path):
    ref = build_distilbert(tmp_path, seed=3, sinusoidal_pos_embds=True)
    table = load_file(tmp_path / "model.safetensors")["embeddings.position_embeddings.weight"]
    assert abs(table[1, 0].item() - torch.sin(torch.tensor(1.0)).item()) < 1e-6, "transformers stores the table"
    model = qkv.load(tmp_path)
    assert torch.equal(model.embeddings.position_embeddings.weight, table)
    ids, mask = padded_texts(model)
    with torch.no_grad():
        assert masked_err(model(ids, mask), _hidden(ref, ids, mask), mask) < TOL


def test_distilbert_bert_names_of_its_fields_are_read(tmp_path):
    """transformers' attribute_map: hidden_size, num_attention_heads, num_hidden_layers name dim, n_heads, n_layers."""
    build_distilbert(tmp_path, seed=4)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"] = cfg.pop("dim"), 4, cfg.pop("n_layers")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = qkv.load(tmp_path)
    assert (model.config.dim, model.config.n_heads, model.config.n_layers) == (32, 4, 2)


def test_distilbert_masked_lm_logits_and_fill_mask(distilbert_mlm, loaded):
    folder, ref = distilbert_mlm
    model = loaded(folder)
    assert isinstance(model, DistilBertForMaskedLM) and "fill_mask" in model.head
    _check_masked_lm_logits(model, ref)
    ids, _ = check_fill_mask(model, ref, "the [MASK] sat on the [MASK] .", top_k=3)
    with torch.no_grad():  # the comparison can fail: without the projector's bias the logits move
        saved = model.vocab_projector.bias.clone()
        model.vocab_projector.bias.zero_()
        every = torch.ones_like(ids)
        moved = masked_err(model.logits(ids, every), ref(input_ids=ids).logits, every.bool())
        model.vocab_projector.bias.copy_(saved)
    assert moved > 1e-2


def test_distilbert_untied_projector(tmp_path):
    ref = build_distilbert(tmp_path, "DistilBertForMaskedLM", seed=5, tie_word_embeddings=False)
    assert "vocab_projector.weight" in load_file(tmp_path / "model.safetensors")
    model = qkv.load(tmp_path)
    assert model.vocab_projector.weight is not None
    ids, mask = padded_texts(model)
    with torch.no_grad():
        assert masked_err(model.logits(ids, mask), ref(input_ids=ids, attention_mask=mask.long()).logits, mask) < TOL


def test_distilbert_classification_logits_and_labels(distilbert_clf, loaded):
    folder, ref = distilbert_clf
    model = loaded(folder)
    assert isinstance(model, DistilBertForSequenceClassification) and "3 labels" in model.head
    ids, mask = padded_texts(model)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).logits
        got = model.logits(ids, mask)
    assert got.shape == (len(TEXTS), 3) and (got - want).abs().max().item() < TOL
    check_labels(model, want)
    with torch.no_grad():
        model.pre_classifier.bias.zero_()
        assert (model.logits(ids, mask) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch, head_key, words", [
    ("DistilBertForTokenClassification", "classifier.weight", "token classifier (3 labels) is not run"),
    ("DistilBertForQuestionAnswering", "qa_outputs.weight", "span head (qa_outputs) is not run"),
])
def test_distilbert_report_only_heads_load_the_encoder(tmp_path, arch, head_key, words):
    kw = {"id2label": {0: "start", 1: "end"}} if arch.endswith("QuestionAnswering") else {}
    if kw:
        words = words.replace("(3 labels) ", "")
    ref = build_distilbert(tmp_path, arch, seed=6, **kw)
    assert head_key in load_file(tmp_path / "model.safetensors")
    model = qkv.load(tmp_path)
    assert type(model) is DistilBertModel and model.head.startswith(arch) and words in model.head
    ids, mask = padded_texts(model)
    with torch.no_grad():
        assert masked_err(model(ids, mask), _hidden(ref, ids, mask), mask) < TOL


@pytest.mark.parametrize("arch, fields, match", [
    ("DistilBertModel", {"n_heads": 5}, "dim=32 is not divisible by n_heads=5"),
    ("DistilBertModel", {"hidden_size": 48}, "hidden_size=48 is not supported: it is DistilBERT's dim by another"),
    ("DistilBertModel", {"activation": "prelu"}, "activation=\"prelu\" is not supported"),
    ("DistilBertModel", {"dim": 48}, "dim=48 but the weights hold 32"),
    ("DistilBertModel", {"n_layers": 3}, "n_layers=3, but the checkpoint holds 2 layer"),
    ("DistilBertForSequenceClassification", {"problem_type": "multi_label_classification"},
     "problem_type=.*single-label"),
])
def test_distilbert_refusals(tmp_path, arch, fields, match):
    build_distilbert(tmp_path, arch, seed=8)
    edit_config(tmp_path, **fields)
    with pytest.raises(ModelError, match=match):
        qkv.load(tmp_path)


def test_cli_similarity_takes_any_encoder(roberta, distilbert, capsys):
    from qkv.cli import main

    for folder, _ in (roberta, distilbert):
        assert main(["similarity", TEXTS[0], TEXTS[1], "--model", str(folder)]) == 0
        assert "similarity to: the cat sat on the mat ." in capsys.readouterr().out


def test_explain_runs_on_roberta_and_distilbert(roberta_mlm, distilbert, loaded):
    for folder, n_tokens in ((roberta_mlm[0], None), (distilbert[0], 8)):
        model = loaded(folder)
        result = qkv.explain("the cat sat on the mat", model)
        assert result.tokens[0] in ("<s>", "[CLS]") and result.tokens[-1] in ("</s>", "[SEP]")
        assert n_tokens is None or len(result.tokens) == n_tokens

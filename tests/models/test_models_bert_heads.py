"""BERT checkpoints that declare a head (qkv/models/bert_heads.py) against transformers, offline:
tiny random BertForMaskedLM, BertForPreTraining, BertForSequenceClassification,
BertForTokenClassification and BertForQuestionAnswering built from a config written here,
saved as safetensors with a WordPiece vocab.txt, loaded by qkv.load."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import LABELS, TEXTS, check_fill_mask, check_labels, masked_err, padded_texts
from hf_folders import SENTENCES, edit_config
from safetensors.torch import load_file, save_file

import qkv
from qkv.models import BertForMaskedLM, BertForSequenceClassification, BertModel, CheckpointError, ModelError

V = 64


def build_head_folder(folder, arch: str, seed: int = 0, **kw):
    """A random transformers `arch` (a BertFor... class name) saved into folder with a WordPiece
    vocab.txt of exactly V tokens; LayerNorm weights and every bias random (ones and zeros would
    hide a missing one). Returns the transformers model (the referee)."""
    import transformers

    torch.manual_seed(seed)
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                initializer_range=0.2, id2label=LABELS)
    base.update(kw)
    model = getattr(transformers, arch)(transformers.BertConfig(**base)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    words = sorted({w for s in SENTENCES for w in s.split()} | {".", ","})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokens += [f"[unused{i}]" for i in range(V - len(tokens))]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    if arch == "BertForSequenceClassification":  # centre the logits on TEXTS, so that they get different labels
        batch = transformers.BertTokenizer(str(folder / "vocab.txt"))(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 3.0)
            pooled = model.bert(**batch).pooler_output  # (B, E)
            model.classifier.bias.copy_(-model.classifier.weight @ pooled.mean(dim=0))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _fixture(arch: str, **kw):
    @pytest.fixture(scope="module")
    def folder_and_ref(tmp_path_factory):
        folder = tmp_path_factory.mktemp(arch)
        return folder, build_head_folder(folder, arch, **kw)

    return folder_and_ref


mlm = _fixture("BertForMaskedLM")
pretraining = _fixture("BertForPreTraining", seed=1)
classifier = _fixture("BertForSequenceClassification", seed=2)


def test_masked_lm_logits_match_transformers_on_a_padded_batch(mlm):
    folder, ref = mlm
    model = qkv.load(folder)
    assert isinstance(model, BertForMaskedLM) and "fill_mask" in model.head
    ids, mask = padded_texts(model)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long())
        hidden = ref.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = model.logits(ids, mask)
        err = masked_err(got, want.logits, mask)
        assert got.shape == (len(TEXTS), ids.shape[1], V)
        assert err < 1e-4, f"max |qkv - transformers| masked-LM logits over real tokens = {err:.2e}"
        assert masked_err(model(ids, mask), hidden, mask) < 1e-4, "the encoder's hidden states"
        # The comparison can fail: without the head's bias the logits are off by far more than 1e-4.
        model.cls.predictions.bias.zero_()
        assert masked_err(model.logits(ids, mask), want.logits, mask) > 1e-2


def test_fill_mask_gives_transformers_top_tokens_and_probabilities(mlm):
    folder, ref = mlm
    model = qkv.load(folder)
    text = "the [MASK] sat on the [MASK] ."
    ids = model.tokenizer([text]).input_ids
    from transformers import BertTokenizer

    assert ids[0].tolist() == BertTokenizer(str(folder / "vocab.txt"))(text)["input_ids"], "tokenizer ids"
    _, got = check_fill_mask(model, ref, text, top_k=5)
    assert model.fill_mask(text, top_k=1)[0][0][0] == got[0][0][0]


def test_fill_mask_errors(mlm):
    model = qkv.load(mlm[0])
    with pytest.raises(ModelError, match=r"no \[MASK\] token"):
        model.fill_mask("the cat sat")
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        model.fill_mask("the [MASK]", top_k=0)


def test_head_models_still_encode(mlm):
    folder, ref = mlm
    model = qkv.load(folder)
    batch = model.tokenizer(TEXTS)
    with torch.no_grad():
        hidden = ref.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).last_hidden_state
    m = batch.attention_mask.unsqueeze(-1).float()
    want = (hidden * m).sum(dim=1) / m.sum(dim=1)  # mean pooling, a folder without sentence-transformers files
    assert (model.encode(TEXTS, batch_size=3) - want).abs().max().item() < 1e-4


def test_pretraining_checkpoint_runs_its_masked_lm_head(pretraining):
    folder, ref = pretraining
    model = qkv.load(folder)
    assert isinstance(model, BertForMaskedLM) and "seq_relationship is not run" in model.head
    ids, mask = padded_texts(model)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).prediction_logits
        assert masked_err(model.logits(ids, mask), want, mask) < 1e-4


def test_untied_decoder_is_loaded_as_its_own_weight(tmp_path):
    ref = build_head_folder(tmp_path, "BertForMaskedLM", seed=3, tie_word_embeddings=False)
    assert "cls.predictions.decoder.weight" in load_file(tmp_path / "model.safetensors")
    model = qkv.load(tmp_path)
    assert model.cls.predictions.decoder is not None
    ids, mask = padded_texts(model)
    with torch.no_grad():
        assert masked_err(model.logits(ids, mask), ref(input_ids=ids, attention_mask=mask.long()).logits, mask) < 1e-4


def test_classification_logits_and_labels_match_transformers(classifier):
    folder, ref = classifier
    model = qkv.load(folder)
    assert isinstance(model, BertForSequenceClassification) and model.config.id2label == tuple(LABELS.values())
    assert "3 labels" in model.head
    ids, mask = padded_texts(model)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).logits  # (B, 3)
        got = model.logits(ids, mask)
        assert got.shape == want.shape == (len(TEXTS), 3)
        err = (got - want).abs().max().item()
        assert err < 1e-4, f"max |qkv - transformers| classifier logits = {err:.2e}"
    check_labels(model, want)
    (one,) = model.classify(TEXTS[0])  # one string, no padding
    (first, *_) = model.classify(TEXTS, batch_size=3)
    assert one[0] == first[0] and abs(one[1] - first[1]) < 1e-5
    with torch.no_grad():  # the comparison can fail: without the classifier's bias the logits move
        model.classifier.bias.zero_()
        assert (model.logits(ids, mask) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch, head_key, words", [
    ("BertForTokenClassification", "classifier.weight", "token classifier (3 labels) is not run"),
    ("BertForQuestionAnswering", "qa_outputs.weight", "span head (qa_outputs) is not run"),
])
def test_report_only_heads_load_the_encoder(tmp_path, arch, head_key, words):
    ref = build_head_folder(tmp_path, arch, seed=4)
    assert head_key in load_file(tmp_path / "model.safetensors")
    model = qkv.load(tmp_path)
    assert type(model) is BertModel and model.head.startswith(arch) and words in model.head
    ids, mask = padded_texts(model)
    with torch.no_grad():
        want = ref.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        assert masked_err(model(ids, mask), want, mask) < 1e-4


def _edit(folder, change):
    path = folder / "model.safetensors"
    sd = load_file(path)
    change(sd)
    save_file(sd, path)


def test_missing_or_misshapen_head_weights_are_named(tmp_path):
    build_head_folder(tmp_path, "BertForMaskedLM", seed=5)
    _edit(tmp_path, lambda sd: sd.pop("cls.predictions.bias"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) cls.predictions.bias"):
        qkv.load(tmp_path)


def test_classifier_without_its_pooler_is_refused(tmp_path):
    build_head_folder(tmp_path, "BertForSequenceClassification", seed=6)
    _edit(tmp_path, lambda sd: [sd.pop(k) for k in ("bert.pooler.dense.weight", "bert.pooler.dense.bias")])
    with pytest.raises(CheckpointError, match=r"missing key\(s\) bert.pooler.dense.weight"):
        qkv.load(tmp_path)


def test_classifier_with_more_labels_than_id2label_is_refused(tmp_path):
    build_head_folder(tmp_path, "BertForSequenceClassification", seed=7)
    edit_config(tmp_path, id2label={"0": "a", "1": "b"})
    with pytest.raises(CheckpointError, match=r"classifier.weight: checkpoint \(3, 32\), model expects \(2, 32\)"):
        qkv.load(tmp_path)


@pytest.mark.parametrize("fields, match", [
    ({"problem_type": "multi_label_classification"}, "problem_type=.*single-label classification"),
    ({"problem_type": "regression"}, "problem_type=.*not supported"),
    ({"id2label": {"0": "a", "2": "b"}}, r"id2label=.*ids must be 0, 1, \.\.\., num_labels - 1"),
    ({"id2label": {"zero": "a"}}, "id2label=.*is not a label id"),
])
def test_classifier_config_refusals(tmp_path, fields, match):
    build_head_folder(tmp_path, "BertForSequenceClassification", seed=8)
    edit_config(tmp_path, **fields)
    with pytest.raises(ModelError, match=match):
        qkv.load(tmp_path)


def test_masked_lm_folder_with_pooler_and_next_sentence_head_loads(tmp_path):
    """bert-base-uncased's shape: config.json says BertForMaskedLM, the weights are
    BertForPreTraining's (pooler, cls.seq_relationship) and store the tied decoder."""
    ref = build_head_folder(tmp_path, "BertForPreTraining", seed=9)
    edit_config(tmp_path, architectures=["BertForMaskedLM"])
    _edit(tmp_path, lambda sd: sd.update({
        "cls.predictions.decoder.weight": sd["bert.embeddings.word_embeddings.weight"].clone(),
        "cls.predictions.decoder.bias": sd["cls.predictions.bias"].clone()}))
    model = qkv.load(tmp_path)
    assert isinstance(model, BertForMaskedLM) and model.pooler is not None
    ids, mask = padded_texts(model)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).prediction_logits
        assert masked_err(model.logits(ids, mask), want, mask) < 1e-4
    _edit(tmp_path, lambda sd: sd.update({"cls.seq_relationship.weight": torch.zeros(3, 32)}))
    with pytest.raises(CheckpointError, match=r"cls.seq_relationship.weight: checkpoint \(3, 32\)"):
        qkv.load(tmp_path)


def test_explain_runs_on_a_head_model(mlm):
    model = qkv.load(mlm[0])
    result = qkv.explain("the cat sat on the mat", model)
    assert len(result.tokens) == 8

"""BERT on the bundled all-MiniLM-L6-v2 against transformers' BertModel and
sentence-transformers (the referees), plus the text-input errors."""

from __future__ import annotations

import pytest
import torch
from hf_folders import build_bert_folder

import qkv
from qkv.models import ModelError

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Attention weighs every word against every other word, over and over, in twelve heads at once.",
]


def test_last_hidden_states_match_transformers_with_padding(minilm, minilm_folder):
    from transformers import BertModel

    ref = BertModel.from_pretrained(str(minilm_folder), attn_implementation="sdpa").eval()
    batch = minilm.tokenizer(SENTENCES)
    assert not bool(batch.attention_mask.all()), "the batch must contain padding"
    with torch.no_grad():
        want = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).last_hidden_state
        got = minilm(batch.input_ids, batch.attention_mask)
    real = batch.attention_mask  # compare real tokens only
    err = (got[real] - want[real]).abs().max().item()
    assert err < 1e-4, f"max |qkv - transformers| over real tokens = {err:.2e}"


def test_sentence_embeddings_match_sentence_transformers(minilm, minilm_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_folder), device="cpu")
    want = torch.as_tensor(st.encode(SENTENCES, convert_to_numpy=True))
    got = minilm.encode(SENTENCES, batch_size=2)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert bool((cos >= 0.99999).all()), f"cosine with sentence-transformers: {cos.tolist()}"
    assert torch.allclose(got.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5), "embeddings are normalised"


def test_similarity_orders_the_classic_example(minilm):
    sims = minilm.similarity(SENTENCES[0], SENTENCES[1:3])
    assert sims.shape == (2,)
    assert sims[0] > 0.5 > sims[1], f"bread should be close, baby far: {sims.tolist()}"


def test_word_ids_map_tokens_to_words(minilm):
    batch = minilm.tokenizer(["Tokenization keeps words"])
    toks, words = batch.tokens[0], batch.word_ids[0]
    assert toks[0] == "[CLS]" and words[0] is None and words[-1] is None
    # "tokenization" splits into several word pieces that all point at word 0
    pieces = [t for t, w in zip(toks, words) if w == 0]
    assert len(pieces) >= 2 and "".join(p.removeprefix("##") for p in pieces) == "tokenization"
    assert max(w for w in words if w is not None) == 2


def test_empty_text_is_a_clear_error(minilm):
    with pytest.raises(ModelError, match="text 1 is empty"):
        minilm.encode(["fine", "   "])
    with pytest.raises(ModelError, match="no texts"):
        minilm.encode([])
    with pytest.raises(TypeError, match="text 0 must be a string"):
        minilm.encode([3])


def test_too_long_text_errors_or_truncates(minilm):
    long = "word " * 300  # > 256 tokens, the folder's max_seq_length
    with pytest.raises(ModelError, match=r"at most 256.*truncate=True"):
        minilm.encode([long])
    emb = minilm.encode(["short one", long], truncate=True)
    assert emb.shape == (2, 384) and bool(torch.isfinite(emb).all())
    batch = minilm.tokenizer([long], truncate=True, max_length=256)
    assert batch.input_ids.shape == (1, 256) and batch.tokens[0][-1] == "[SEP]" and batch.truncated == [True]


def test_batch_of_different_lengths_equals_one_by_one(minilm):
    together = minilm.encode(SENTENCES, batch_size=8)
    alone = torch.cat([minilm.encode([s]) for s in SENTENCES])
    err = (together - alone).abs().max().item()
    assert err < 1e-5, f"padding changed an embedding by {err:.2e}"


def test_model_forward_beyond_positions_is_a_clear_error(minilm):
    ids = torch.full((1, 513), 1000)
    with pytest.raises(ModelError, match="512 positions"):
        minilm(ids)


def test_cli_similarity(capsys):
    from qkv.cli import main

    code = main(["similarity", *SENTENCES[:3]])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 3 and "A man is eating a piece of bread." in lines[1]
    values = [float(line.split()[0]) for line in lines[1:]]
    assert values[0] > 0.5 > values[1]


def test_cli_similarity_needs_two_sentences(capsys):
    from qkv.cli import main

    assert main(["similarity", "only one"]) == 2
    assert "at least two" in capsys.readouterr().err


def _bert_ids():
    ids = torch.tensor([[2, 7, 9, 11, 13, 15, 3], [2, 8, 10, 3, 0, 0, 0]])
    return ids, ids != 0


def test_bert_is_decoder_runs_causally_as_transformers(tmp_path):
    """A BertModel saved with is_decoder=true is causal in transformers; qkv used to run it
    bidirectionally. Real tokens of a padded batch are compared."""
    ref = build_bert_folder(tmp_path, seed=3, is_decoder=True)
    model = qkv.load(tmp_path)
    ids, mask = _bert_ids()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = model(ids, mask)
        alone = model(ids[1:, :4])
    err = (got[mask] - want[mask]).abs().max().item()
    assert err < 1e-5, f"max |qkv - transformers| over real tokens = {err:.2e}"
    assert torch.allclose(got[1, :4], alone[0], atol=1e-5), "a padded row equals the row alone"
    assert model.config.is_decoder

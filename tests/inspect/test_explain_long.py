"""Explaining one word of a long input records only its rows; on a causal decoder the rows
match the full maps (bottom-right alignment survives the row selection)."""

from __future__ import annotations

import os

import pytest
import torch

import qkv

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    from models.hf_folders import build_folder

    folder = tmp_path_factory.mktemp("llama-long")
    build_folder(folder, "llama", max_position_embeddings=8192)
    return qkv.load(folder)


def test_a_4000_token_input_is_explained_for_one_word(long_llama):
    text = "the cat sat on the mat " * 700  # 4,200 word-level tokens
    result = qkv.explain(text.strip() + " queries", long_llama, focus="queries", rows="focus")
    n = len(result.tokens)
    assert n == 4201
    for rec in result.records:
        assert rec.q.shape[2] == 1 and rec.mask.shape[-2:] == (1, n), "only the focus row is recorded"
    rows = result.focus_rows("queries", level="token")  # (layers, heads, n)
    assert rows.shape == (2, 4, n)
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 4))
    with pytest.raises(ValueError, match="rows='focus'"):
        _ = result.attentions


def test_causal_focus_rows_equal_the_full_maps(long_llama):
    text = "the quick brown fox jumps over the lazy dog " * 20
    full = qkv.explain(text, long_llama)
    causal_zero = full.attentions.triu(diagonal=1)
    assert torch.all(causal_zero == 0), "a decoder's weights above the diagonal must be 0"
    partial = qkv.explain(text, long_llama, focus="fox", rows="focus")
    torch.testing.assert_close(partial.focus_rows("fox", level="token"), full.focus_rows("fox", level="token"))
    row = full.focus_index("fox", "token")
    assert torch.all(full.attentions[:, :, row, row + 1:] == 0)

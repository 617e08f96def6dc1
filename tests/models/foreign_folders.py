"""Tiny random Hugging Face folders of architectures qkv has no native implementation of, for the
tests of explain through transformers (the CLI, `qkv serve --model-dir`, load_transformers): an
ELECTRA discriminator (its attention goes through transformers' attention interface) and a Falcon
(its attention does not). Built offline with transformers' config classes."""

from __future__ import annotations

import json

import torch

from models.hf_folders import SENTENCES, save_word_tokenizer

# scores large enough to make the weights far from uniform (random init's 0.02 gives near-uniform rows)
INIT = 0.3


def electra_folder(folder):
    """A tiny random ElectraModel with a WordPiece vocab.txt; returns the folder."""
    import transformers

    torch.manual_seed(0)
    words = sorted({w for s in SENTENCES for w in s.split()})
    config = transformers.ElectraConfig(vocab_size=64, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
                                        initializer_range=INIT)
    transformers.ElectraModel(config).eval().save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                              "tokenizer_class": "ElectraTokenizer"}))
    return folder


def falcon_folder(folder):
    """A tiny random FalconForCausalLM with the word-level tokenizer; returns the folder."""
    import transformers

    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       max_position_embeddings=64)
    transformers.FalconForCausalLM(config).eval().save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder

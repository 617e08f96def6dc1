"""Tiny Hugging Face folders built offline for the model tests: random GPT-2 and Llama folders
saved by transformers (the referee) with a word-level tokenizer trained on a few sentences, and
random BERT folders with a WordPiece vocab.txt and sentence-transformers files. Shared by the
fixtures in conftest.py and the tests that build folders of their own."""

from __future__ import annotations

import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "attention is all you need",
    "queries keys and values",
    "the quick brown fox jumps over the lazy dog",
]


def save_word_tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    tok.save(str(folder / "tokenizer.json"))


def randomise_norms(model, *, biases: bool = False):
    """Every norm weight of a transformers model (and with `biases` every bias) drawn from
    U(0.5, 1.5), so a missing or misread one cannot hide behind ones and zeros; returns the model
    in eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or (biases and name.endswith(".bias")):
                p.uniform_(0.5, 1.5)
    return model.eval()


def save_folder(folder, model):
    """model saved into folder as safetensors, with the word-level tokenizer; returns the model."""
    model.save_pretrained(folder, safe_serialization=True)
    save_word_tokenizer(folder)
    return model


def save_random(folder, config, architecture: str, seed: int = 0):
    """A random transformers `architecture` (a class name) of `config`, seeded, its norms
    randomised (`randomise_norms`), saved into folder (`save_folder`); returns it."""
    import transformers

    torch.manual_seed(seed)
    return save_folder(folder, randomise_norms(getattr(transformers, architecture)(config)))


def edit_config(folder, **fields) -> None:
    """Set `fields` in the folder's config.json."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


def tiny_gpt2_config(**kw):
    from transformers import GPT2Config

    base = dict(vocab_size=64, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=2, eos_token_id=None,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base.update(kw)
    return GPT2Config(**base)


LLAMA_BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=None,
                  rope_theta=500.0)


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA_BASE, **kw})


def build_folder(folder, kind: str, seed: int = 0, **kw):
    """Save a random transformers model of `kind` into folder; return it. "gpt2", "llama", and
    the Llama-like "mistral" (sliding window 4, shorter than the test sequences) and "qwen2"
    (q/k/v biases). Norm weights and biases are random, so a missing or wrong one cannot hide
    behind ones and zeros."""
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(tiny_gpt2_config(**kw))
    else:
        llama = {**LLAMA_BASE, **kw}
        if kind == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama))
        elif kind == "mistral":
            model = transformers.MistralForCausalLM(transformers.MistralConfig(**{"sliding_window": 4, **llama}))
        else:
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama))
        randomise_norms(model, biases=kind != "llama")
    return save_folder(folder, model.eval())


def build_bert_folder(folder, seed: int = 0, **kw):
    """A tiny random transformers BertModel with a WordPiece vocab.txt and sentence-transformers
    files (modules.json, 1_Pooling/config.json, sentence_bert_config.json); returns the model."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    model = BertModel(BertConfig(**base)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    words = sorted({w for s in SENTENCES for w in s.split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": base["hidden_size"], "pooling_mode_mean_tokens": True,
         "pooling_mode_cls_token": False}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return model


def decode_in_steps(model, ids):
    """ids (B, 12) through `model` as a prompt of 5, a chunk of 3, then single tokens, with a
    cache of capacity 4 (so it grows) -> (logits of the steps (B, 12, V), logits of the whole
    sequence at once (B, 12, V), the cache)."""
    with torch.no_grad():
        full = model(ids)  # (B, 12, V)
        cache = model.new_cache(ids.shape[0], capacity=4)
        parts = [model(ids[:, :5], cache=cache), model(ids[:, 5:8], cache=cache)]
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(8, 12)]
    return torch.cat(parts, dim=1), full, cache

"""Real models on qkv's attention: BERT-family encoders, GPT-2 and Llama-family decoders,
loaded from Hugging Face safetensors folders (models -> nn -> core).

    model = qkv.load("minilm")            # bundled all-MiniLM-L6-v2
    emb = model.encode(["A sentence."])   # (1, 384), normalised
    model = qkv.load("path/to/llama")     # any HF folder with a supported architecture
    ids = model.generate("Once upon a time", max_new_tokens=20)
    qkv.load("recall"), qkv.load("translate")   # qkv's own small models (qkv.train)
"""

from .bert import BertConfig, BertModel, SentencePooling
from .checkpoint import CheckpointError, ModelError
from .gpt2 import GPT2Config, GPT2LMHeadModel
from .llama import LlamaConfig, LlamaForCausalLM
from .loading import ARCHITECTURES, BUNDLED, bundled_path, load
from .seq2seq import QkvSeq2Seq, Seq2SeqConfig
from .tokenizer import Batch, Tokenizer

__all__ = [
    "load",
    "bundled_path",
    "ARCHITECTURES",
    "BUNDLED",
    "BertConfig",
    "BertModel",
    "SentencePooling",
    "GPT2Config",
    "GPT2LMHeadModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Seq2SeqConfig",
    "QkvSeq2Seq",
    "Tokenizer",
    "Batch",
    "ModelError",
    "CheckpointError",
]

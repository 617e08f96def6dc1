"""Real models on qkv's attention: BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa, DistilBERT),
GPT-2, Llama, Mistral and Qwen2 decoders, the vision transformer (ViT), loaded from Hugging Face safetensors folders
(models -> nn -> core).

    model = qkv.load("minilm")            # bundled all-MiniLM-L6-v2
    emb = model.encode(["A sentence."])   # (1, 384), normalised
    model = qkv.load("path/to/llama")     # any HF folder with a supported architecture
    ids = model.generate("Once upon a time", max_new_tokens=20)
    qkv.load("recall"), qkv.load("translate")   # qkv's own small models (qkv.train)

The decoders are `CausalLM`s (decoder.py: one decoder skeleton with generation); each family
module ends in a `Family` record (common.py) through which `load` reads its folders.
"""

from .bert import BertConfig, BertModel, EncoderModel, SentencePooling
from .bert_heads import BertForMaskedLM, BertForSequenceClassification, BertHeadConfig, MaskedLM, SequenceClassifier
from .checkpoint import CheckpointError, ModelError
from .common import Family
from .decoder import CausalLM
from .distilbert import (
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertHeadConfig,
    DistilBertModel,
)
from .gpt2 import GPT2Config, GPT2LMHeadModel
from .llama import LlamaConfig, LlamaForCausalLM
from .loading import BUNDLED, FAMILIES, bundled_path, load, load_transformers
from .mistral import MistralConfig, MistralForCausalLM
from .qwen2 import Qwen2Config, Qwen2ForCausalLM
from .roberta import (
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaHeadConfig,
    RobertaModel,
    XLMRobertaConfig,
)
from .seq2seq import QkvSeq2Seq, Seq2SeqConfig
from .tokenizer import Batch, Tokenizer
from .vit import ViTConfig, ViTForImageClassification, ViTModel

__all__ = [
    "load",
    "load_transformers",
    "bundled_path",
    "BUNDLED",
    "FAMILIES",
    "Family",
    "CausalLM",
    "EncoderModel",
    "MaskedLM",
    "SequenceClassifier",
    "BertConfig",
    "BertModel",
    "SentencePooling",
    "BertHeadConfig",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "RobertaConfig",
    "XLMRobertaConfig",
    "RobertaModel",
    "RobertaHeadConfig",
    "RobertaForMaskedLM",
    "RobertaForSequenceClassification",
    "DistilBertConfig",
    "DistilBertModel",
    "DistilBertHeadConfig",
    "DistilBertForMaskedLM",
    "DistilBertForSequenceClassification",
    "GPT2Config",
    "GPT2LMHeadModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MistralConfig",
    "MistralForCausalLM",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "Seq2SeqConfig",
    "QkvSeq2Seq",
    "ViTConfig",
    "ViTModel",
    "ViTForImageClassification",
    "Tokenizer",
    "Batch",
    "ModelError",
    "CheckpointError",
]

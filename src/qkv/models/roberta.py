"""RoBERTa encoder (Liu et al. 2019, "RoBERTa: A Robustly Optimized BERT Pretraining
Approach") and XLM-RoBERTa (Conneau et al. 2020, "Unsupervised Cross-lingual Representation
Learning at Scale"), loading Hugging Face `RobertaModel` / `XLMRobertaModel` folders and their
masked-LM and classification heads.

The encoder is BERT's (bert.py: the same blocks, the same weight names) except for the
positions, numbered as fairseq numbers them: real tokens count from pad_token_id + 1 and
padding sits at pad_token_id, so

    ids       = [<s>, a, b, </s>, <pad>, <pad>]      (pad_token_id = 1)
    positions = [  2, 3, 4,    5,     1,     1]      (BERT: 0, 1, 2, 3, 4, 5)

A real token is any id other than pad_token_id (transformers' `create_position_ids_from_input_ids`),
so a left-padded text gets the positions it has alone, and the longest input is
max_position_embeddings - pad_token_id - 1 tokens (512 for roberta-base's 514). Token types
are BERT's (`type_vocab_size` is 1 in the released checkpoints). XLM-RoBERTa is the same
architecture with another vocabulary.

Heads (the encoder under "roberta."):

    masked LM:       logits = layer_norm(gelu(lm_head.dense(x))) @ word_embeddings.T + lm_head.bias
    classification:  logits = classifier.out_proj(tanh(classifier.dense(x[:, 0])))   (no pooler)

RobertaForTokenClassification and RobertaForQuestionAnswering load the encoder and report the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert import BertConfig, BertEmbeddings, BertModel, hf_ignored, hf_layers, hf_plan, pooling_extras
from .bert import _adapt as _base_adapt
from .bert_heads import (
    HEAD_BY_HAND,
    HEAD_LIMITS,
    SPAN_HEAD,
    TOKEN_HEAD,
    HeadConfig,
    MaskedLM,
    SequenceClassifier,
    encoder_adapt,
    head_family,
    mlm_adapt,
    mlm_ignored,
    mlm_plan,
    reported,
    with_head,
)
from .checkpoint import Dim, ModelError, Plan
from .common import Family
from .fields import Fields


@dataclass(frozen=True)
class RobertaConfig(BertConfig):
    # transformers' RobertaConfig defaults where they differ from BertConfig's
    vocab_size: int = 50265  # tokens in the (byte-level BPE) vocabulary
    pad_token_id: Optional[int] = 1  # <pad>; positions count real tokens from pad_token_id + 1

    ARCH: ClassVar[str] = "RobertaModel"

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        kw = super().read_fields(f)
        if "pad_token_id" in kw and kw["pad_token_id"] is None:
            raise f.unsupported("pad_token_id", f"{cls.ARCH} numbers positions from pad_token_id + 1 and tells "
                                "padding by it, so it needs one; set it to the id of <pad> (1 in the released models)")
        return kw

    def check(self, source) -> None:
        super().check(source)
        if self.max_tokens < 1:
            raise ModelError(f"{source}: max_position_embeddings={self.max_position_embeddings} leaves no position "
                             f"for a token after pad_token_id={self.pad_token_id} (tokens take positions "
                             f"pad_token_id + 1 onwards); correct one of them")

    @property
    def max_tokens(self) -> int:
        """The longest input: positions 0..pad_token_id are not a real token's."""
        return self.max_position_embeddings - self.pad_token_id - 1


@dataclass(frozen=True)
class XLMRobertaConfig(RobertaConfig):
    vocab_size: int = 30522  # transformers' XLMRobertaConfig default (the released models have 250002)

    ARCH: ClassVar[str] = "XLMRobertaModel"


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, c: RobertaConfig):
        super().__init__(c)
        self.padding_idx = c.pad_token_id

    def positions(self, input_ids: Tensor) -> Tensor:
        """(B, L): real tokens (ids other than pad_token_id) count from pad_token_id + 1, padding
        stays at pad_token_id (fairseq's make_positions)."""
        real = input_ids.ne(self.padding_idx).long()  # (B, L) 1 = real token
        return torch.cumsum(real, dim=1) * real + self.padding_idx  # (B, L)


class RobertaModel(BertModel):
    """The RoBERTa (and XLM-RoBERTa) encoder: BertModel with RoBERTa's positions."""

    EMBEDDINGS = RobertaEmbeddings


# -- heads ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RobertaHeadConfig(HeadConfig, RobertaConfig):
    mlm_bias: str = "lm_head.bias"

    LIMITS = {**RobertaConfig.LIMITS, **HEAD_LIMITS}
    READ_BY_HAND: ClassVar[tuple[str, ...]] = RobertaConfig.READ_BY_HAND + HEAD_BY_HAND


@dataclass(frozen=True)
class XLMRobertaHeadConfig(HeadConfig, XLMRobertaConfig):
    mlm_bias: str = "lm_head.bias"

    LIMITS = {**XLMRobertaConfig.LIMITS, **HEAD_LIMITS}
    READ_BY_HAND: ClassVar[tuple[str, ...]] = XLMRobertaConfig.READ_BY_HAND + HEAD_BY_HAND


class RobertaLMHead(nn.Module):
    """dense, gelu (the erf form, whatever hidden_act says), layer_norm, then the decoder: the
    word embeddings (tied) or a weight of its own, plus `bias`."""

    def __init__(self, c: RobertaHeadConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.decoder = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.empty(c.vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        """x (..., E), word_embeddings (V, E) -> logits (..., V)."""
        weight = word_embeddings if self.decoder is None else self.decoder.weight
        return F.linear(self.layer_norm(F.gelu(self.dense(x))), weight, self.bias)


class RobertaForMaskedLM(MaskedLM, RobertaModel):
    """RoBERTa with its masked-LM head (`lm_head`): `logits` over the vocabulary, `fill_mask` with <mask>."""

    MASK = "<mask>"

    def __init__(self, config: RobertaHeadConfig):
        super().__init__(config)
        self.lm_head = RobertaLMHead(config)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden, self.embeddings.word_embeddings.weight)  # (..., V)


class RobertaClassificationHead(nn.Module):
    """out_proj(tanh(dense(x[:, 0]))) over the first token (<s>), dropout before each linear."""

    def __init__(self, c: RobertaHeadConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout)
        self.out_proj = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (B, L, E) -> (B, num_labels)."""
        x = torch.tanh(self.dense(self.dropout(hidden[:, 0])))  # (B, E)
        return self.out_proj(self.dropout(x))


class RobertaForSequenceClassification(SequenceClassifier, RobertaModel):
    """RoBERTa with its classifier over `config.id2label` (no pooler): `logits`, `classify`."""

    def __init__(self, config: RobertaHeadConfig):
        super().__init__(config)
        self.classifier = RobertaClassificationHead(config)

    def classifier_logits(self, hidden: Tensor) -> Tensor:
        return self.classifier(hidden)  # (B, num_labels)


# -- checkpoints ------------------------------------------------------------------------------
# The encoder's names are BERT's (bert.hf_plan), after "roberta." in head checkpoints.

_adapt = encoder_adapt("roberta.")
_mlm_adapt = mlm_adapt(_adapt, "lm_head.decoder.bias")


def _mlm_plan(c: RobertaHeadConfig, prefix: str = "") -> Plan:
    return mlm_plan(c, hf_plan(c, prefix), "lm_head.", "dense", "layer_norm")


def _mlm_ignored(c: RobertaHeadConfig, prefix: str = "") -> dict:
    return mlm_ignored(c, hf_ignored(c, prefix), "lm_head.")


def _classifier_plan(c: RobertaHeadConfig, prefix: str = "") -> Plan:
    E, N = Dim(c.hidden_size, "hidden_size"), c.num_labels
    return with_head(hf_plan(c, prefix), {"classifier.dense.weight": (E, E), "classifier.dense.bias": (E,),
                                          "classifier.out_proj.weight": (N, E), "classifier.out_proj.bias": (N,)})


def _families(name: str, config: type, head_config: type, model_type: str) -> tuple[Family, ...]:
    """The base encoder and the four head architectures of `name` ("Roberta", "XLMRoberta")."""
    base = Family(architectures=(f"{name}Model",), model_type=model_type, config=config, model=RobertaModel,
                  plan=hf_plan, layers=hf_layers, ignored=hf_ignored, adapt=_base_adapt, needs_tokenizer=True,
                  extras=pooling_extras)

    def head(arch: str, model, plan, ignored, says: str, adapt=_adapt) -> Family:
        return head_family(f"{name}{arch}", head_config, model, plan, hf_layers, ignored,
                           f"{name}{arch}: {says}", adapt)

    return (
        base,
        head("ForMaskedLM", RobertaForMaskedLM, _mlm_plan, _mlm_ignored,
             "masked-LM head (model.logits, model.fill_mask)", _mlm_adapt),
        head("ForSequenceClassification", RobertaForSequenceClassification, _classifier_plan, hf_ignored,
             "classifier over {n} labels (model.logits, model.classify)"),
        head("ForTokenClassification", RobertaModel, hf_plan, reported(TOKEN_HEAD),
             "its token classifier ({n} labels) is not run by qkv; the model is the encoder "
             "(model(...) hidden states, model.encode)"),
        head("ForQuestionAnswering", RobertaModel, hf_plan, reported(SPAN_HEAD),
             "its span head (qa_outputs) is not run by qkv; the model is the encoder "
             "(model(...) hidden states, model.encode)"),
    )


FAMILIES = (*_families("Roberta", RobertaConfig, RobertaHeadConfig, "roberta"),
            *_families("XLMRoberta", XLMRobertaConfig, XLMRobertaHeadConfig, "xlm-roberta"))


"""DistilBERT encoder (Sanh et al. 2019, "DistilBERT, a distilled version of BERT: smaller,
faster, cheaper and lighter"), loading Hugging Face `DistilBertModel` folders and their
masked-LM and classification heads.

The math is BERT's (bert.py) with half the layers and no token types: post-LayerNorm blocks

    x = sa_layer_norm(x + attention(x));  x = output_layer_norm(x + ffn.lin2(act(ffn.lin1(x))))

over word + learned absolute position embeddings, every LayerNorm with eps 1e-12 (fixed, not a
config field). What differs is the naming: config fields `dim`, `hidden_dim`, `n_layers`,
`n_heads`, `activation`, `dropout`, `attention_dropout`, and checkpoint keys
`transformer.layer.{i}.attention.{q,k,v,out}_lin`, `sa_layer_norm`, `ffn.lin1/lin2`,
`output_layer_norm` (the attention projections become qkv's fused `qkv_proj` and `out_proj`).
`sinusoidal_pos_embds` only chooses how transformers initialises the position table; the
checkpoint stores the table either way, and it is loaded as stored.

Heads (the encoder under "distilbert."):

    masked LM:       logits = vocab_layer_norm(act(vocab_transform(x))) @ word_embeddings.T + vocab_projector.bias
    classification:  logits = classifier(relu(pre_classifier(x[:, 0])))

DistilBertForTokenClassification and DistilBertForQuestionAnswering load the encoder and
report the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import LearnedPositions, MultiHeadAttention
from .bert import EncoderModel, pooling_extras, self_attention
from .bert_heads import (
    HEAD_BY_HAND,
    HEAD_LIMITS,
    SPAN_HEAD,
    TOKEN_HEAD,
    HeadConfig,
    MaskedLM,
    SequenceClassifier,
    head_family,
    reported,
    with_head,
)
from .checkpoint import Dim, Piece, Plan
from .common import ACTIVATION, Family, activation
from .fields import NON_NEGATIVE, POSITIVE, PROBABILITY, Fields, HFConfig, check_divisible, read_dataclass

LAYER_NORM_EPS = 1e-12  # every DistilBERT LayerNorm (transformers hard-codes it)


@dataclass(frozen=True)
class DistilBertConfig(HFConfig):
    vocab_size: int = 30522  # tokens in the vocabulary
    max_position_embeddings: int = 512  # learned absolute positions
    sinusoidal_pos_embds: bool = False  # how the position table was initialised; the checkpoint stores it
    n_layers: int = 6  # encoder blocks
    n_heads: int = 12  # heads, D = dim / heads
    dim: int = 768  # E
    hidden_dim: int = 4 * 768  # feed-forward inner size
    dropout: float = 0.1  # active only in training mode
    attention_dropout: float = 0.1  # active only in training mode
    activation: str = "gelu"  # feed-forward (and masked-LM transform) activation
    qa_dropout: float = 0.1  # the question-answering head's (not run)
    seq_classif_dropout: float = 0.2  # the sequence classifier's; active only in training mode
    pad_token_id: Optional[int] = 0  # [PAD]; the tokenizer pads, so it does not enter the math

    LIMITS = {
        "vocab_size": POSITIVE, "max_position_embeddings": POSITIVE, "n_layers": POSITIVE, "n_heads": POSITIVE,
        "dim": POSITIVE, "hidden_dim": POSITIVE, "dropout": PROBABILITY, "attention_dropout": PROBABILITY,
        "activation": ACTIVATION, "qa_dropout": PROBABILITY, "seq_classif_dropout": PROBABILITY,
        "pad_token_id": NON_NEGATIVE,
    }
    READ_BY_HAND: ClassVar[tuple[str, ...]] = ()
    # transformers' attribute_map: a config.json may name these fields by BERT's names
    ALIASES: ClassVar[dict[str, str]] = {"hidden_size": "dim", "num_attention_heads": "n_heads",
                                         "num_hidden_layers": "n_layers"}

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        kw = read_dataclass(cls, f, limits=cls.LIMITS, skip=cls.READ_BY_HAND)
        for alias, name in cls.ALIASES.items():
            if alias not in f:
                continue
            value = f.get(alias, int, limit=POSITIVE)
            if name in kw and kw[name] != value:
                raise f.unsupported(alias, f"it is DistilBERT's {name} by another name, and {name}={kw[name]}; "
                                    f"keep one of the two")
            kw[name] = value
        return kw

    def check(self, source) -> None:
        check_divisible(source, "dim", self.dim, "n_heads", self.n_heads)

    @property
    def hidden_size(self) -> int:
        return self.dim

    @property
    def max_tokens(self) -> int:
        """The longest input, in tokens: one learned position each."""
        return self.max_position_embeddings


class Embeddings(nn.Module):
    def __init__(self, c: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.position_embeddings = LearnedPositions(c.max_position_embeddings, c.dim)
        self.LayerNorm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) -> (B, L, E)."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)  # (B, L, E)
        return self.dropout(self.LayerNorm(x))


class FFN(nn.Module):
    def __init__(self, c: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(c.dim, c.hidden_dim)
        self.lin2 = nn.Linear(c.hidden_dim, c.dim)
        self.dropout = nn.Dropout(c.dropout)
        self._act = activation(c.activation)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., E) -> (..., E)."""
        return self.dropout(self.lin2(self._act(self.lin1(x))))


class TransformerBlock(nn.Module):
    def __init__(self, c: DistilBertConfig):
        super().__init__()
        # HF's attention.{q_lin,k_lin,v_lin} and attention.out_lin, fused
        self.attention = MultiHeadAttention(c.dim, c.n_heads, dropout=c.attention_dropout)
        self.sa_layer_norm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)
        self.ffn = FFN(c)
        self.output_layer_norm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor, mask: Optional[Tensor], real: Optional[Tensor] = None,
                padded_shape: tuple[int, int] = (0, 0)) -> Tensor:
        """x (B, L, E), or (N, E) real tokens only when `real` is given (see bert.self_attention)."""
        x = self.sa_layer_norm(x + self_attention(self.attention, x, mask, real, padded_shape))
        return self.output_layer_norm(x + self.ffn(x))


class Transformer(nn.Module):
    def __init__(self, c: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layers))


class DistilBertModel(EncoderModel):
    """The DistilBERT encoder (see bert.EncoderModel: hidden states, `encode`, `similarity`)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)

    def embed(self, input_ids: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
        if token_type_ids is not None:
            raise ValueError("DistilBERT has no token type (segment) embeddings; pass token_type_ids=None")
        return self.embeddings(input_ids)  # (B, L, E)

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.transformer.layer


# -- heads ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistilBertHeadConfig(HeadConfig, DistilBertConfig):
    LIMITS = {**DistilBertConfig.LIMITS, **HEAD_LIMITS}
    READ_BY_HAND: ClassVar[tuple[str, ...]] = DistilBertConfig.READ_BY_HAND + HEAD_BY_HAND


class VocabProjector(nn.Module):
    """The masked-LM decoder: the word embeddings (tied) or a `weight` of its own, plus `bias`."""

    def __init__(self, c: DistilBertHeadConfig):
        super().__init__()
        self.weight = None if c.tie_word_embeddings else nn.Parameter(torch.empty(c.vocab_size, c.dim))
        self.bias = nn.Parameter(torch.empty(c.vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        """x (..., E), word_embeddings (V, E) -> logits (..., V)."""
        return F.linear(x, word_embeddings if self.weight is None else self.weight, self.bias)


class DistilBertForMaskedLM(MaskedLM, DistilBertModel):
    """DistilBERT with its masked-LM head: `logits` over the vocabulary, `fill_mask` with [MASK]."""

    def __init__(self, config: DistilBertHeadConfig):
        super().__init__(config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.vocab_projector = VocabProjector(config)
        self._act = activation(config.activation)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        x = self.vocab_layer_norm(self._act(self.vocab_transform(hidden)))  # (..., E)
        return self.vocab_projector(x, self.embeddings.word_embeddings.weight)  # (..., V)


class DistilBertForSequenceClassification(SequenceClassifier, DistilBertModel):
    """DistilBERT with its classifier over `config.id2label`: `logits`, `classify`."""

    def __init__(self, config: DistilBertHeadConfig):
        super().__init__(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)

    def classifier_logits(self, hidden: Tensor) -> Tensor:
        x = F.relu(self.pre_classifier(hidden[:, 0]))  # (B, E) over [CLS]
        return self.classifier(self.dropout(x))  # (B, num_labels)


# -- checkpoints ------------------------------------------------------------------------------

def hf_plan(c: DistilBertConfig, prefix: str = "") -> Plan:
    """Checkpoint names of a Hugging Face DistilBertModel -> qkv parameter names (pure).

    q_lin/k_lin/v_lin are concatenated into `attention.qkv_proj`; `out_lin` becomes
    `attention.out_proj`. Everything else keeps its name, after `prefix` ("distilbert." in
    the heads' checkpoints).
    """
    E, H = Dim(c.dim, "dim"), Dim(c.hidden_dim, "hidden_dim")
    plan: dict[str, tuple[Piece, ...]] = {}

    def same(name: str, shape: tuple) -> None:
        plan[name] = (Piece(prefix + name, shape),)

    same("embeddings.word_embeddings.weight", (Dim(c.vocab_size, "vocab_size"), E))
    same("embeddings.position_embeddings.weight", (Dim(c.max_position_embeddings, "max_position_embeddings"), E))
    same("embeddings.LayerNorm.weight", (E,))
    same("embeddings.LayerNorm.bias", (E,))
    for i in range(c.n_layers):
        p = f"transformer.layer.{i}."
        for kind, shape in (("weight", (E, E)), ("bias", (E,))):
            plan[p + f"attention.qkv_proj.{kind}"] = tuple(
                Piece(prefix + p + f"attention.{n}_lin.{kind}", shape) for n in ("q", "k", "v"))
            plan[p + f"attention.out_proj.{kind}"] = (Piece(prefix + p + f"attention.out_lin.{kind}", shape),)
            same(p + f"sa_layer_norm.{kind}", (E,))
            same(p + f"output_layer_norm.{kind}", (E,))
        same(p + "ffn.lin1.weight", (H, E))
        same(p + "ffn.lin1.bias", (H,))
        same(p + "ffn.lin2.weight", (E, H))
        same(p + "ffn.lin2.bias", (E,))
    return plan


def hf_layers(c: DistilBertConfig, prefix: str = "") -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer)."""
    return [("n_layers", c.n_layers, prefix + "transformer.layer.")]


def hf_ignored(c: DistilBertConfig, prefix: str = "") -> dict:
    """Checkpoint buffers that are not weights: older checkpoints store position_ids."""
    return {prefix + "embeddings.position_ids": (1, c.max_position_embeddings)}


def _adapt(c: DistilBertHeadConfig, keys) -> tuple[DistilBertHeadConfig, tuple]:
    """The encoder's prefix: "distilbert.", or none for a bare encoder's names."""
    return c, ("distilbert." if any(k.startswith("distilbert.") for k in keys) else "",)


def _mlm_plan(c: DistilBertHeadConfig, prefix: str = "") -> Plan:
    E, V = Dim(c.dim, "dim"), Dim(c.vocab_size, "vocab_size")
    head = {"vocab_transform.weight": (E, E), "vocab_transform.bias": (E,), "vocab_layer_norm.weight": (E,),
            "vocab_layer_norm.bias": (E,), "vocab_projector.bias": (V,)}
    if not c.tie_word_embeddings:
        head["vocab_projector.weight"] = (V, E)
    return with_head(hf_plan(c, prefix), head)


def _mlm_ignored(c: DistilBertHeadConfig, prefix: str = "") -> dict:
    """Accepted, shape-checked, not copied: the tied decoder's weight (the word embeddings are it)."""
    out = hf_ignored(c, prefix)
    if c.tie_word_embeddings:
        out["vocab_projector.weight"] = (c.vocab_size, c.dim)
    return out


def _classifier_plan(c: DistilBertHeadConfig, prefix: str = "") -> Plan:
    E, N = Dim(c.dim, "dim"), c.num_labels
    return with_head(hf_plan(c, prefix), {"pre_classifier.weight": (E, E), "pre_classifier.bias": (E,),
                                          "classifier.weight": (N, E), "classifier.bias": (N,)})


def _family(arch: str, model, plan, ignored, says: str) -> Family:
    return head_family(arch, DistilBertHeadConfig, model, plan, hf_layers, ignored, f"{arch}: {says}", _adapt)


FAMILIES = (
    Family(architectures=("DistilBertModel",), model_type="distilbert", config=DistilBertConfig,
           model=DistilBertModel, plan=hf_plan, layers=hf_layers, ignored=hf_ignored, needs_tokenizer=True,
           extras=pooling_extras),
    _family("DistilBertForMaskedLM", DistilBertForMaskedLM, _mlm_plan, _mlm_ignored,
            "masked-LM head (model.logits, model.fill_mask)"),
    _family("DistilBertForSequenceClassification", DistilBertForSequenceClassification, _classifier_plan,
            hf_ignored, "pre_classifier and classifier over {n} labels (model.logits, model.classify)"),
    _family("DistilBertForTokenClassification", DistilBertModel, hf_plan, reported(TOKEN_HEAD, hf_ignored),
            "its token classifier ({n} labels) is not run by qkv; the model is the encoder "
            "(model(...) hidden states, model.encode)"),
    _family("DistilBertForQuestionAnswering", DistilBertModel, hf_plan, reported(SPAN_HEAD, hf_ignored),
            "its span head (qa_outputs) is not run by qkv; the model is the encoder "
            "(model(...) hidden states, model.encode)"),
)

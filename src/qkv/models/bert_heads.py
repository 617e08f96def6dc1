"""BERT checkpoints that declare a head: `BertForMaskedLM` (and `BertForPreTraining`, whose
masked-LM head is the same), `BertForSequenceClassification`, and, as "load the encoder,
report the head", `BertForTokenClassification` and `BertForQuestionAnswering`.

Each model is a `BertModel` (bert.py: the encoder runs through qkv's attention as before, and
`model(...)`, `encode`, `similarity` keep working) plus its head under Hugging Face's names:

    masked LM:       h = LN(act(cls.predictions.transform.dense(x)))
                     logits = h @ word_embeddings.T + cls.predictions.bias   (decoder tied)
    classification:  logits = classifier(tanh(pooler.dense(x[:, 0])))      (softmax, single label)

The checkpoints hold the encoder under "bert." (`_adapt` reads the prefix from the keys).
Head weights qkv does not run (next-sentence prediction, token classifiers, span heads) are
accepted with their shapes checked, not copied; `model.head` says what the checkpoint's head
is and which methods run it.

What the heads of every BERT-like encoder share is here too, and roberta.py and distilbert.py
use it: `HeadConfig` (the head fields of config.json), `MaskedLM` (`logits`, `fill_mask`),
`SequenceClassifier` (`logits`, `classify`), `reported` and `head_family` (the `Family` record
of a head checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert import BertConfig, BertModel, EncoderModel, hf_ignored, hf_layers, hf_plan, pooling_extras
from .checkpoint import Dim, ModelError, Piece, Plan
from .common import Family, activation
from .fields import POSITIVE, PROBABILITY, Fields

PROBLEM_TYPES = (None, "single_label_classification")  # what `classify` computes (softmax over labels)


@dataclass(frozen=True)
class HeadConfig:
    """The fields a checkpoint with a head adds to its encoder's config: a mixin put first,
    `class BertHeadConfig(HeadConfig, BertConfig)`, whose class sets
    `LIMITS = {**Encoder.LIMITS, **HEAD_LIMITS}` and `READ_BY_HAND = Encoder.READ_BY_HAND + HEAD_BY_HAND`."""

    id2label: tuple[str, ...] = ("LABEL_0", "LABEL_1")  # label names by id (config.json's id2label)
    problem_type: Optional[str] = None  # only single-label classification (softmax) is run
    classifier_dropout: Optional[float] = None  # active only in training mode; None = hidden_dropout_prob
    tie_word_embeddings: bool = True  # the masked-LM decoder is the word embeddings (transformers' default)
    # checkpoint key of the bias the masked-LM decoder adds; set from the keys: an untied decoder
    # that stores its own (e.g. cls.predictions.decoder.bias) adds that one, as transformers does
    mlm_bias: str = ""

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        kw = super().read_fields(f)  # type: ignore[misc]  # the encoder's config, next in the MRO
        kw["id2label"] = _read_labels(f)
        problem = f.get("problem_type", Optional[str], None)
        if problem not in PROBLEM_TYPES:
            raise f.unsupported("problem_type", "qkv runs single-label classification (softmax over id2label); "
                                "regression and multi-label heads are not run; remove the field or set it to "
                                "\"single_label_classification\" if that is what the model was trained for")
        kw["problem_type"] = problem
        return kw

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


HEAD_LIMITS = {"classifier_dropout": PROBABILITY}
HEAD_BY_HAND = ("id2label", "problem_type", "mlm_bias")  # read by HeadConfig.read_fields, or set from the keys


@dataclass(frozen=True)
class BertHeadConfig(HeadConfig, BertConfig):
    mlm_bias: str = "cls.predictions.bias"

    LIMITS = {**BertConfig.LIMITS, **HEAD_LIMITS}
    READ_BY_HAND: ClassVar[tuple[str, ...]] = BertConfig.READ_BY_HAND + HEAD_BY_HAND


def _read_labels(f: Fields) -> tuple[str, ...]:
    """id2label ({"0": "NEGATIVE", "1": "POSITIVE"}) as a tuple by id; without it, num_labels
    LABEL_i names (transformers' defaults), two if neither is given."""
    table = f.get("id2label", Optional[dict], None)
    if table is None:
        n = f.get("num_labels", int, 2, POSITIVE)
        return tuple(f"LABEL_{i}" for i in range(n))
    ids = {}
    for key, name in table.items():
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(name, str):
            raise f.unsupported("id2label", f"its entry {key!r}: {name!r} is not a label id (a string of digits) "
                                "mapped to a label name (a string); restore config.json from the model's source")
        ids[int(key)] = name
    if not ids or sorted(ids) != list(range(len(ids))):
        raise f.unsupported("id2label", "its ids must be 0, 1, ..., num_labels - 1, each once; "
                            "restore config.json from the model's source")
    return tuple(ids[i] for i in range(len(ids)))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, c: BertHeadConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self._act = activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self._act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """transform, then the decoder: the word embeddings (tied) or a weight of its own, plus `bias`."""

    def __init__(self, c: BertHeadConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(c)
        self.bias = nn.Parameter(torch.empty(c.vocab_size))
        self.decoder = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        """x (..., E), word_embeddings (V, E) -> logits (..., V)."""
        weight = word_embeddings if self.decoder is None else self.decoder.weight
        return F.linear(self.transform(x), weight, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, c: BertHeadConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(c)


class MaskedLM(EncoderModel):
    """An encoder with a masked-LM head: `logits` over the vocabulary, `fill_mask`. A subclass
    supplies `mlm_logits(hidden)` and names its mask token in `MASK`."""

    MASK = "[MASK]"

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., E) -> masked-LM logits (..., V)."""
        raise NotImplementedError

    def logits(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None) -> Tensor:
        """(B, L) ids (and mask, segments, as `forward` takes them) -> (B, L, V) masked-LM logits.
        Padded positions hold the head applied to zeros; read real tokens only."""
        return self.mlm_logits(self(input_ids, attention_mask, token_type_ids))  # (B, L, V)

    @torch.inference_mode()
    def fill_mask(self, text: str, *, top_k: int = 5, truncate: bool = False) -> list[list[tuple[str, float]]]:
        """The most likely tokens for each mask token ([MASK], RoBERTa's <mask>) of `text`.

        Returns:
            one list per mask, in order, of `top_k` (token, probability) pairs, most likely
            first; the token as the vocabulary spells it ("##s" for a word piece, "Ġcat" for
            a byte-level BPE token after a space).
        """
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer; load it with qkv.load(folder)")
        if not isinstance(text, str):
            raise TypeError(f"fill_mask takes one string; got {type(text).__name__}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive integer; got {top_k!r}")
        mask_token = self.mask_token
        mask_id = self.tokenizer.token_to_id(mask_token)
        batch = self.tokenizer([text], truncate=truncate, max_length=self.config.max_tokens)
        ids = batch.input_ids[:, : int(batch.lengths[0])]  # (1, L)
        where = (ids[0] == mask_id).nonzero().squeeze(1)  # (M,)
        if where.numel() == 0:
            raise ModelError(f"the text has no {mask_token} token; put {mask_token} where a word should be "
                             f"filled in, e.g. \"The cat sat on the {mask_token}.\"")
        hidden = self(ids.to(self.device))[0, where.to(self.device)]  # (M, E): the head runs on the masks only
        probs = self.mlm_logits(hidden).float().softmax(dim=-1)  # (M, V)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        vocab = self.tokenizer.backend
        return [[(vocab.id_to_token(int(i)), float(p)) for p, i in zip(ps, ix)]
                for ps, ix in zip(top.values.cpu(), top.indices.cpu())]

    @property
    def mask_token(self) -> str:
        """The tokenizer's mask token (`MASK`: "[MASK]", RoBERTa's "<mask>"); an error if it has none."""
        if self.tokenizer is None or self.tokenizer.token_to_id(self.MASK) is None:
            raise ModelError(f"this model's tokenizer has no {self.MASK} token, so fill_mask cannot mark a blank; "
                             "use the tokenizer files saved with the model")
        return self.MASK


class BertForMaskedLM(MaskedLM, BertModel):
    """BERT with its masked-LM head (`cls.predictions`): `logits` over the vocabulary, `fill_mask`."""

    def __init__(self, config: BertHeadConfig):
        super().__init__(config)
        self.cls = BertOnlyMLMHead(config)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        return self.cls.predictions(hidden, self.embeddings.word_embeddings.weight)  # (..., V)


class SequenceClassifier(EncoderModel):
    """An encoder with a classifier over `config.id2label`: `logits`, `classify`. A subclass
    supplies `classifier_logits(hidden)`."""

    def classifier_logits(self, hidden: Tensor) -> Tensor:
        """hidden (B, L, E) -> (B, num_labels)."""
        raise NotImplementedError

    def logits(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None) -> Tensor:
        """(B, L) ids (and mask, segments) -> (B, num_labels) classifier logits."""
        return self.classifier_logits(self(input_ids, attention_mask, token_type_ids))

    @torch.inference_mode()
    def classify(self, texts: Sequence[str], *, batch_size: int = 32,
                 truncate: bool = False) -> list[tuple[str, float]]:
        """The most likely label of each text -> [(label from id2label, its probability)], in order."""
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer; load it with qkv.load(folder)")
        if self.config.num_labels < 2:
            raise ModelError("this classifier has one output (a regression head); softmax over one label says "
                             "nothing; read model.logits instead")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        batch = self.tokenizer(texts, truncate=truncate, max_length=self.config.max_tokens)
        device = self.device
        out: list[tuple[str, float]] = []
        for start in range(0, len(texts), batch_size):
            ids = batch.input_ids[start:start + batch_size]
            mask = batch.attention_mask[start:start + batch_size]
            n = int(mask.sum(dim=1).max())
            probs = self.logits(ids[:, :n].to(device), mask[:, :n].to(device)).float().softmax(dim=-1)
            best = probs.max(dim=-1)
            out += [(self.config.id2label[int(i)], float(p)) for p, i in zip(best.values.cpu(), best.indices.cpu())]
        return out


class BertForSequenceClassification(SequenceClassifier, BertModel):
    """BERT with the pooler and a classifier over `config.id2label`: `logits`, `classify`."""

    def __init__(self, config: BertHeadConfig):
        super().__init__(replace(config, add_pooling_layer=True))
        self.dropout = nn.Dropout(config.hidden_dropout_prob if config.classifier_dropout is None
                                  else config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def classifier_logits(self, hidden: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pooler_output(hidden)))  # over [CLS]


# -- checkpoints ------------------------------------------------------------------------------

def encoder_adapt(name: str):
    """`adapt` of a head checkpoint whose encoder is stored under `name` ("bert.", "roberta."):
    the prefix (`name`, or none for a bare encoder's names) and the pooler, from the keys."""

    def adapt(c, keys) -> tuple:
        prefix = name if any(k.startswith(name) for k in keys) else ""
        return replace(c, add_pooling_layer=any(k.startswith(prefix + "pooler.") for k in keys)), (prefix,)

    return adapt


_adapt = encoder_adapt("bert.")


def mlm_adapt(adapt, decoder_bias: str):
    """As `adapt`, and which stored bias the masked-LM decoder adds (`HeadConfig.mlm_bias`): an
    untied decoder that stores a bias of its own (`decoder_bias`) adds that one."""

    def with_bias(c, keys) -> tuple:
        c, args = adapt(c, keys)
        if not c.tie_word_embeddings and decoder_bias in keys:
            c = replace(c, mlm_bias=decoder_bias)
        return c, args

    return with_bias


_mlm_adapt = mlm_adapt(_adapt, "cls.predictions.decoder.bias")


def with_head(encoder_plan: Plan, head: dict[str, tuple]) -> Plan:
    """A head checkpoint's plan: the encoder's, and the head's weights (key -> shape) under their own names."""
    return {**encoder_plan, **{name: (Piece(name, shape),) for name, shape in head.items()}}


def mlm_plan(c: HeadConfig, encoder_plan: Plan, head: str, dense: str, norm: str) -> Plan:
    """A masked-LM checkpoint's plan (BERT's, RoBERTa's): the encoder's, and under `head` the
    transform (`dense`, then `norm`), the decoder unless it is tied to the word embeddings, and as
    `{head}bias` the decoder bias it adds (`c.mlm_bias`)."""
    E, V = Dim(c.hidden_size, "hidden_size"), Dim(c.vocab_size, "vocab_size")
    shapes = {f"{dense}.weight": (E, E), f"{dense}.bias": (E,), f"{norm}.weight": (E,), f"{norm}.bias": (E,)}
    if not c.tie_word_embeddings:
        shapes["decoder.weight"] = (V, E)
    plan = with_head(encoder_plan, {head + name: shape for name, shape in shapes.items()})
    return {**plan, head + "bias": (Piece(c.mlm_bias, (V,)),)}


def mlm_ignored(c: HeadConfig, encoder_ignored: dict, head: str, others: Optional[dict] = None) -> dict:
    """Accepted, shape-checked, not copied, besides the encoder's buffers: the decoder bias not
    added (a tied decoder's is `{head}bias`; an untied decoder with a bias of its own leaves
    `{head}bias` unused, as in transformers), `others` (key -> shape), and a tied decoder's
    weight (the word embeddings are it)."""
    V = c.vocab_size
    unused_bias = ({head + "bias", head + "decoder.bias"} - {c.mlm_bias}).pop()
    out = {**encoder_ignored, unused_bias: (V,), **(others or {})}
    if c.tie_word_embeddings:
        out[head + "decoder.weight"] = (V, c.hidden_size)
    return out


def _mlm_plan(c: BertHeadConfig, prefix: str = "") -> Plan:
    return mlm_plan(c, hf_plan(c, prefix), "cls.predictions.", "transform.dense", "transform.LayerNorm")


def _mlm_ignored(c: BertHeadConfig, prefix: str = "") -> dict:
    """`mlm_ignored`, and the next-sentence head of pre-training checkpoints (bert-base-uncased
    declares BertForMaskedLM and holds it)."""
    E = c.hidden_size
    return mlm_ignored(c, hf_ignored(c, prefix), "cls.predictions.",
                       {"cls.seq_relationship.weight": (2, E), "cls.seq_relationship.bias": (2,)})


def _classifier_plan(c: BertHeadConfig, prefix: str = "") -> Plan:
    E, N = Dim(c.hidden_size, "hidden_size"), c.num_labels
    encoder = hf_plan(replace(c, add_pooling_layer=True), prefix)
    return with_head(encoder, {"classifier.weight": (N, E), "classifier.bias": (N,)})


def reported(head: dict, encoder_ignored=hf_ignored):
    """`ignored` of a report-only head: the encoder's buffers (`encoder_ignored`) and the head's
    keys -> shapes (`head`: key -> config -> shape)."""

    def ignored(c, prefix: str = "") -> dict:
        return {**encoder_ignored(c, prefix), **{k: shape(c) for k, shape in head.items()}}

    return ignored


def _extras(head: str):
    def extras(folder, c) -> dict:
        return {**pooling_extras(folder, c), "head": head.format(n=c.num_labels)}

    return extras


def head_family(arch: str, config: type, model, plan, layers, ignored, head: str, adapt) -> Family:
    """The `Family` of a checkpoint with a head: `head` ("{n}" = the number of labels) becomes
    `model.head`; the folder's sentence-transformers files its `pooling`."""
    return Family(architectures=(arch,), model_type=None, config=config, model=model, plan=plan,
                  layers=layers, ignored=ignored, adapt=adapt, needs_tokenizer=True, extras=_extras(head))


def _family(arch: str, model, plan, ignored, head: str, adapt=_adapt) -> Family:
    return head_family(arch, BertHeadConfig, model, plan, hf_layers, ignored, head, adapt)


# the heads loaded as "the encoder, head reported": key -> config -> shape
TOKEN_HEAD = {"classifier.weight": lambda c: (c.num_labels, c.hidden_size),
              "classifier.bias": lambda c: (c.num_labels,)}
SPAN_HEAD = {"qa_outputs.weight": lambda c: (c.num_labels, c.hidden_size),
             "qa_outputs.bias": lambda c: (c.num_labels,)}

FAMILIES = (
    _family("BertForMaskedLM", BertForMaskedLM, _mlm_plan, _mlm_ignored,
            "BertForMaskedLM: masked-LM head (model.logits, model.fill_mask)", _mlm_adapt),
    _family("BertForPreTraining", BertForMaskedLM, _mlm_plan, _mlm_ignored,
            "BertForPreTraining: masked-LM head run (model.logits, model.fill_mask); the next-sentence head "
            "cls.seq_relationship is not run", _mlm_adapt),
    _family("BertForSequenceClassification", BertForSequenceClassification, _classifier_plan, hf_ignored,
            "BertForSequenceClassification: pooler and classifier over {n} labels (model.logits, model.classify)"),
    _family("BertForTokenClassification", BertModel, hf_plan, reported(TOKEN_HEAD),
            "BertForTokenClassification: its token classifier ({n} labels) is not run by qkv; the model is "
            "the encoder (model(...) hidden states, model.encode)"),
    _family("BertForQuestionAnswering", BertModel, hf_plan, reported(SPAN_HEAD),
            "BertForQuestionAnswering: its span head (qa_outputs) is not run by qkv; the model is the encoder "
            "(model(...) hidden states, model.encode)"),
)

"""BERT-family encoder (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding"), loading Hugging Face `BertModel` folders, and
sentence embeddings as Sentence-BERT (Reimers & Gurevych 2019) computes them.

Post-LayerNorm blocks: x = LN(x + Attn(x)); x = LN(x + FFN(x)); learned absolute and
token-type embeddings. Module names are Hugging Face's except the attention projections,
which are one fused `qkv_proj` in `attention.self` (plus its `out_proj`); `hf_plan` is the
one pure function that maps checkpoint names onto them.

`EncoderModel` is what the BERT-like encoders share (BERT here, RoBERTa in roberta.py,
DistilBERT in distilbert.py): the forward pass that runs everything but attention on the real
tokens only, and sentence embeddings (`encode`, `similarity`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import LearnedPositions, MultiHeadAttention
from .checkpoint import Dim, ModelError, Piece, Plan, inside_folder, json_type, read_json
from .common import ACTIVATION, Family, activation
from .fields import (
    EPS,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    Fields,
    HFConfig,
    check_divisible,
    read_dataclass,
    refuse_cross_attention,
)
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class BertConfig(HFConfig):
    vocab_size: int = 30522  # tokens in the vocabulary
    hidden_size: int = 768  # E
    num_hidden_layers: int = 12  # encoder blocks
    num_attention_heads: int = 12  # heads, D = hidden_size / heads
    intermediate_size: int = 3072  # feed-forward inner size
    hidden_act: str = "gelu"  # "gelu" (erf), "gelu_new"/"gelu_pytorch_tanh" (tanh), "relu", "silu"
    max_position_embeddings: int = 512  # learned absolute positions
    type_vocab_size: int = 2  # segment (token type) embeddings
    layer_norm_eps: float = 1e-12  # LayerNorm eps (BERT's tiny value)
    hidden_dropout_prob: float = 0.1  # active only in training mode
    attention_probs_dropout_prob: float = 0.1  # active only in training mode
    pad_token_id: Optional[int] = 0  # [PAD]; the tokenizer pads, so it does not enter the math
    position_embedding_type: str = "absolute"  # only "absolute" is supported
    is_decoder: bool = False  # causal self-attention, as transformers runs a BertModel saved as a decoder
    add_pooling_layer: bool = True  # BertModel's tanh pooler over [CLS]; set from the checkpoint's keys

    LIMITS = {  # config.json ranges; a field not listed has no range beyond its type
        "vocab_size": POSITIVE, "hidden_size": POSITIVE, "num_hidden_layers": POSITIVE, "num_attention_heads": POSITIVE,
        "intermediate_size": POSITIVE, "hidden_act": ACTIVATION, "max_position_embeddings": POSITIVE,
        "type_vocab_size": POSITIVE, "layer_norm_eps": EPS, "hidden_dropout_prob": PROBABILITY,
        "attention_probs_dropout_prob": PROBABILITY, "pad_token_id": NON_NEGATIVE,
    }
    READ_BY_HAND: ClassVar[tuple[str, ...]] = ("add_pooling_layer",)  # fields read_dataclass leaves alone
    ARCH: ClassVar[str] = "BertModel"  # the encoder's name in messages

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        refuse_cross_attention(f, cls.ARCH, cls.ARCH)
        kw = read_dataclass(cls, f, limits=cls.LIMITS, skip=cls.READ_BY_HAND)
        if kw.get("position_embedding_type", "absolute") != "absolute":
            raise f.unsupported("position_embedding_type", f"qkv's {cls.ARCH} has learned absolute positions only "
                                "(relative_key and relative_key_query add distance embeddings it does not run)")
        return kw

    def check(self, source) -> None:
        check_divisible(source, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)

    @property
    def max_tokens(self) -> int:
        """The longest input, in tokens: one learned position each."""
        return self.max_position_embeddings


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = LearnedPositions(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def positions(self, input_ids: Tensor) -> Tensor:
        """The position of each token: (L,) 0, 1, ..., L - 1 for BERT (RoBERTa's count real tokens only)."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
        """input_ids (B, L), token_type_ids (B, L) or None (all 0) -> (B, L, E)."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.positions(input_ids))  # (B, L, E)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


def self_attention(attn: MultiHeadAttention, x: Tensor, mask: Optional[Tensor], real: Optional[Tensor],
                   padded_shape: tuple[int, int], causal: bool = False) -> Tensor:
    """`attn` over x (B, L, E) -> (B, L, E); or, when `real` is given, over the N real tokens
    x (N, E) of a padded (B, L) batch (`real`: their flat indices in B*L): scattered into the
    padded layout for attention only, gathered back -> (N, E)."""
    if real is None:
        return attn(x, mask=mask, causal=causal)
    B, L = padded_shape
    padded = x.new_zeros(B * L, x.shape[-1])  # (B*L, E)
    padded[real] = x
    a = attn(padded.view(B, L, -1), mask=mask, causal=causal)  # (B, L, E)
    return a.view(B * L, -1)[real]  # (N, E)


class BertAttentionOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        # HF's attention.self.{query,key,value} and attention.output.dense live here, fused.
        self.self = MultiHeadAttention(c.hidden_size, c.num_attention_heads, dropout=c.attention_probs_dropout_prob)
        self.output = BertAttentionOutput(c)
        self.causal = c.is_decoder

    def forward(self, x: Tensor, mask: Optional[Tensor], real: Optional[Tensor] = None,
                padded_shape: tuple[int, int] = (0, 0)) -> Tensor:
        """x (B, L, E), or (N, E) real tokens (see `self_attention`) -> the same shape."""
        a = self_attention(self.self, x, mask, real, padded_shape, self.causal)
        return self.output.LayerNorm(x + self.output.dropout(a))


class BertDense(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)


class BertOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertDense(c.hidden_size, c.intermediate_size)
        self.output = BertOutput(c)
        self._act = activation(c.hidden_act)

    def forward(self, x: Tensor, mask: Optional[Tensor], real: Optional[Tensor] = None,
                padded_shape: tuple[int, int] = (0, 0)) -> Tensor:
        """x (B, L, E), or (N, E) real tokens only when `real` is given.

        real: (N,) flat indices of the real tokens in (B*L); attention runs on the padded
        (B, L, E) layout, everything else only on the N real tokens (no work on padding).
        """
        x = self.attention(x, mask, real, padded_shape)  # (B, L, E) | (N, E)
        h = self.output.dense(self._act(self.intermediate.dense(x)))  # (B, L, E) | (N, E)
        return self.output.LayerNorm(x + self.output.dropout(h))


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))


class EncoderModel(nn.Module):
    """A BERT-like encoder (BertModel, RobertaModel, DistilBertModel). `forward` gives the last
    hidden states; `encode` sentence embeddings; `similarity` cosine similarities.

    A subclass builds `embeddings` (with `word_embeddings`) and its layers, and supplies
    `embed(input_ids, token_type_ids) -> (B, L, E)` and `layers`, each layer called as
    `layer(x, mask, real, padded_shape)` (see `BertLayer`); its config has `hidden_size` and
    `max_tokens`.

    Attributes set by `qkv.load`: `tokenizer` (a qkv Tokenizer) and `pooling` (a
    `SentencePooling` read from the folder's sentence-transformers files, or mean pooling).
    `head` names the checkpoint's head (bert_heads.py); None for a plain encoder folder.
    """

    head: Optional[str] = None

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tokenizer: Optional[Tokenizer] = None
        self.pooling = SentencePooling()

    def embed(self, input_ids: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
        """input_ids (B, L), token_type_ids (B, L) or None -> embeddings (B, L, E)."""
        raise NotImplementedError

    @property
    def layers(self) -> Sequence[nn.Module]:
        """The encoder blocks, in order."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> Tensor:
        """Last hidden states.

        Args:
            input_ids: (B, L) int64 token ids.
            attention_mask: (B, L) bool or 0/1, True/1 for real tokens, False/0 for padding.
            token_type_ids: (B, L) segment ids (default all 0).

        Returns:
            (B, L, E); zeros at padded positions (padding is skipped outside attention).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L); got shape {tuple(input_ids.shape)}")
        L = input_ids.shape[1]
        if L > self.config.max_tokens:
            raise ModelError(f"input has {L} tokens but this model has {self.config.max_tokens} positions; "
                             f"shorten or truncate it")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}; "
                                 f"got {tuple(attention_mask.shape)}")
            keep = attention_mask.bool()
            if not bool(keep.all()):
                mask = keep[:, None, None, :]  # (B, 1, 1, L): key padding, True = may attend
        x = self.embed(input_ids, token_type_ids)  # (B, L, E)
        if mask is None:
            for layer in self.layers:
                x = layer(x, None)
            return x
        # Unpadded: projections, feed-forward and norms see only the N real tokens.
        B, L, E = x.shape
        real = keep.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices into B*L
        h = x.reshape(B * L, E)[real]  # (N, E)
        for layer in self.layers:
            h = layer(h, mask, real, (B, L))
        out = h.new_zeros(B * L, E)
        out[real] = h
        return out.view(B, L, E)

    @property
    def device(self) -> torch.device:
        """Where the parameters live (inputs are moved there)."""
        return self.embeddings.word_embeddings.weight.device

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, batch_size: int = 32, truncate: bool = False,
               normalize: Optional[bool] = None) -> Tensor:
        """Sentence embeddings with the pooling (and normalisation) the folder prescribes.

        Args:
            texts: N non-empty strings (or one string).
            batch_size: texts per forward pass (texts are sorted by length to pad little).
            truncate: cut texts longer than the model's limit instead of raising.
            normalize: override the folder's normalisation (None = as prescribed).

        Returns:
            (N, E) float32 embeddings, in the order of `texts`.
        """
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer; load it with qkv.load(folder)")
        if isinstance(texts, str):
            texts = [texts]
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        batch = self.tokenizer(texts, truncate=truncate, max_length=self.pooling.max_length(self))
        order = torch.argsort(batch.lengths, descending=True, stable=True)
        out = torch.empty(len(texts), self.config.hidden_size, dtype=torch.float32)
        device = self.device
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            n = int(batch.lengths[idx].max())
            ids = batch.input_ids[idx, :n].to(device)  # (b, n)
            mask = batch.attention_mask[idx, :n].to(device)  # (b, n)
            hidden = self(ids, mask)  # (b, n, E)
            out[idx] = self.pooling(hidden, mask, normalize=normalize).float().cpu()
        return out

    def similarity(self, first: str, others: Sequence[str], *, truncate: bool = False) -> Tensor:
        """Cosine similarity of `first` with each of `others` -> (len(others),) float32."""
        if isinstance(others, str):
            others = [others]
        emb = self.encode([first, *others], truncate=truncate, normalize=True)  # (1 + M, E)
        return emb[1:] @ emb[0]


class BertModel(EncoderModel):
    """The BERT encoder (see `EncoderModel`), with BertModel's pooler when the checkpoint has one."""

    EMBEDDINGS: ClassVar[type] = BertEmbeddings  # RoBERTa's number positions differently

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.embeddings = self.EMBEDDINGS(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertDense(config.hidden_size, config.hidden_size) if config.add_pooling_layer else None

    def embed(self, input_ids: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
        return self.embeddings(input_ids, token_type_ids)  # (B, L, E)

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.encoder.layer

    def pooler_output(self, hidden: Tensor) -> Tensor:
        """BertModel's pooler: tanh(dense(hidden[:, 0])). hidden (B, L, E) -> (B, E)."""
        if self.pooler is None:
            raise ModelError("this checkpoint has no pooler weights (pooler.dense); use sentence pooling (encode)")
        return torch.tanh(self.pooler.dense(hidden[:, 0]))


@dataclass(frozen=True)
class SentencePooling:
    """Sentence-BERT pooling read from modules.json and 1_Pooling/config.json.

    mode: "mean" (default for a plain BERT folder), "cls", "max", "mean_sqrt_len", "lasttoken".
    normalize: L2-normalise (a `Normalize` module in modules.json).
    max_seq_length: from sentence_bert_config.json, the length the model was trained with.
    """

    mode: str = "mean"
    normalize: bool = False
    max_seq_length: Optional[int] = None

    def max_length(self, model: EncoderModel) -> int:
        limit = model.config.max_tokens
        return min(limit, self.max_seq_length) if self.max_seq_length else limit

    def __call__(self, hidden: Tensor, mask: Tensor, *, normalize: Optional[bool] = None) -> Tensor:
        """hidden (B, L, E), mask (B, L) bool -> (B, E)."""
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        if self.mode == "mean" or self.mode == "mean_sqrt_len":
            count = m.sum(dim=1).clamp(min=1e-9)  # (B, 1)
            pooled = (hidden * m).sum(dim=1) / (count if self.mode == "mean" else count.sqrt())
        elif self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "max":
            pooled = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values
        elif self.mode == "lasttoken":
            last = mask.long().sum(dim=1) - 1  # (B,)
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        else:  # rejected by from_folder; kept for direct construction
            raise ModelError(f"unknown pooling mode {self.mode!r}")
        if self.normalize if normalize is None else normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled

    @classmethod
    def from_folder(cls, folder: Path, *, hidden_size: Optional[int] = None) -> "SentencePooling":
        """Read the sentence-transformers description of a folder; mean pooling if there is none.

        Every file is read with `read_json` and its fields typed, so a broken one is a ModelError
        naming it. `hidden_size`, if given, must equal the pooling config's word_embedding_dimension.
        """
        max_seq = None
        sbert = folder / "sentence_bert_config.json"
        if sbert.is_file():
            max_seq = Fields(read_json(sbert), sbert).get("max_seq_length", Optional[int], None, POSITIVE)
        modules_path = folder / "modules.json"
        if not modules_path.is_file():
            return cls(max_seq_length=max_seq)
        modules = read_json(modules_path, list)
        mode, normalize = "mean", False
        for i, m in enumerate(modules):
            if not isinstance(m, dict):
                raise ModelError(f"{modules_path}: entry {i} is {json_type(m)}; each entry must be an object with "
                                 f"\"type\" and \"path\"; restore the file from the model's source")
            entry = Fields(m, modules_path, prefix=f"[{i}].")
            kind = entry.get("type", str, "").rsplit(".", 1)[-1]
            if kind == "Transformer":
                continue
            if kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                sub = entry.get("path", str, "")
                if not inside_folder(sub):
                    raise entry.unsupported("path", "a module's path must be a folder inside the model folder, "
                                            "such as \"1_Pooling\"; qkv did not open it")
                cfg_path = folder / sub / "config.json"
                if not cfg_path.is_file():
                    raise FileNotFoundError(f"modules.json names a Pooling module but {cfg_path} is missing; "
                                            "copy it from the model's source")
                cfg = Fields(read_json(cfg_path), cfg_path)
                dim = cfg.get("word_embedding_dimension", Optional[int], None, POSITIVE)
                if hidden_size is not None and dim is not None and dim != hidden_size:
                    raise cfg.unsupported("word_embedding_dimension", f"the model's hidden_size is {hidden_size}; "
                                          f"this pooling config belongs to another model")
                on = [k[len("pooling_mode_"):] for k in _mode_keys(cfg) if cfg.get(k, bool)]
                on = ["mean" if k == "mean_tokens" else "max" if k == "max_tokens" else
                      "cls" if k == "cls_token" else "mean_sqrt_len" if k == "mean_sqrt_len_tokens" else k for k in on]
                if len(on) != 1 or on[0] not in ("mean", "max", "cls", "mean_sqrt_len", "lasttoken"):
                    raise ModelError(
                        f"{cfg_path} asks for pooling {on}; qkv supports exactly one of mean, max, cls, "
                        f"mean_sqrt_len, lasttoken"
                    )
                mode = on[0]
            else:
                raise ModelError(
                    f"modules.json in {str(folder)!r} lists a {m.get('type')} module, which qkv does not run; "
                    f"qkv supports Transformer, Pooling and Normalize"
                )
        return cls(mode=mode, normalize=normalize, max_seq_length=max_seq)


def _mode_keys(cfg: Fields) -> list[str]:
    """The pooling_mode_* fields of a sentence-transformers pooling config."""
    return [k for k in cfg.data if k.startswith("pooling_mode_")]


def hf_plan(c: BertConfig, prefix: str = "") -> Plan:
    """Checkpoint names of a Hugging Face BertModel -> qkv parameter names (pure).

    query/key/value are concatenated into `attention.self.qkv_proj`; `attention.output.dense`
    becomes `attention.self.out_proj`. Everything else keeps its name, after `prefix` (the
    heads' checkpoints, bert_heads.py, hold the encoder under "bert.").
    """
    E, FF = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size")
    plan: dict[str, tuple[Piece, ...]] = {}

    def same(name: str, shape: tuple) -> None:
        plan[name] = (Piece(prefix + name, shape),)

    same("embeddings.word_embeddings.weight", (Dim(c.vocab_size, "vocab_size"), E))
    same("embeddings.position_embeddings.weight", (Dim(c.max_position_embeddings, "max_position_embeddings"), E))
    same("embeddings.token_type_embeddings.weight", (Dim(c.type_vocab_size, "type_vocab_size"), E))
    same("embeddings.LayerNorm.weight", (E,))
    same("embeddings.LayerNorm.bias", (E,))
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for kind, shape in (("weight", (E, E)), ("bias", (E,))):
            plan[p + f"attention.self.qkv_proj.{kind}"] = tuple(
                Piece(prefix + p + f"attention.self.{n}.{kind}", shape) for n in ("query", "key", "value"))
            plan[p + f"attention.self.out_proj.{kind}"] = (Piece(prefix + p + f"attention.output.dense.{kind}", shape),)
            same(p + f"attention.output.LayerNorm.{kind}", (E,))
            same(p + f"output.LayerNorm.{kind}", (E,))
        same(p + "intermediate.dense.weight", (FF, E))
        same(p + "intermediate.dense.bias", (FF,))
        same(p + "output.dense.weight", (E, FF))
        same(p + "output.dense.bias", (E,))
    if c.add_pooling_layer:
        same("pooler.dense.weight", (E, E))
        same("pooler.dense.bias", (E,))
    return plan


def hf_layers(c: BertConfig, prefix: str = "") -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning."""
    return [("num_hidden_layers", c.num_hidden_layers, prefix + "encoder.layer.")]


def hf_ignored(c: BertConfig, prefix: str = "") -> dict:
    """Checkpoint buffers that are not weights: older BertModel checkpoints store position_ids."""
    return {prefix + "embeddings.position_ids": (1, c.max_position_embeddings)}


def _adapt(c: BertConfig, keys) -> tuple[BertConfig, tuple]:
    """A checkpoint with `pooler.*` weights has BertModel's pooler."""
    return replace(c, add_pooling_layer=any(k.startswith("pooler.") for k in keys)), ()


def pooling_extras(folder: Path, c) -> dict:
    """`extras` of an encoder folder: the sentence pooling its sentence-transformers files prescribe."""
    return {"pooling": SentencePooling.from_folder(folder, hidden_size=c.hidden_size)}


FAMILY = Family(
    architectures=("BertModel",), model_type="bert", config=BertConfig, model=BertModel,
    plan=hf_plan, layers=hf_layers, ignored=hf_ignored, adapt=_adapt, needs_tokenizer=True, extras=pooling_extras,
)

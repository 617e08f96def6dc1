"""A small encoder-decoder transformer with cross-attention (Vaswani et al. 2017, "Attention Is
All You Need"), qkv's own architecture "QkvSeq2Seq" for the bundled translation model.

Encoder: pre-LayerNorm blocks of bidirectional self-attention and an MLP over the source.
Decoder: pre-LayerNorm blocks of causal self-attention (with a KV cache when generating),
cross-attention whose queries come from the target and whose keys and values come from the
encoder's output (the "alignment" of Bahdanau et al. 2015), and an MLP. Learned absolute
positions; one embedding table shared by source, target and the output head. Every
attention is a qkv `MultiHeadAttention`, so `qkv.inspect` records all three kinds.

Checkpoint keys are the module's own parameter names (`hf_plan` is the identity, checked
key by key like every other architecture); config.json says
`"architectures": ["QkvSeq2Seq"]`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import KVCache, LearnedPositions, MultiHeadAttention
from .checkpoint import ModelError, Piece, Plan
from .common import Family, key_padding_mask
from .fields import EPS, NON_NEGATIVE, POSITIVE, PROBABILITY, HFConfig, check_divisible
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Seq2SeqConfig(HFConfig):
    vocab_size: int = 64  # one vocabulary for source and target words
    d_model: int = 64  # E
    encoder_layers: int = 2  # encoder blocks
    decoder_layers: int = 2  # decoder blocks
    attention_heads: int = 4  # heads in every attention, D = d_model / attention_heads
    ffn_dim: int = 256  # MLP inner size
    max_position_embeddings: int = 16  # the longest source, in tokens
    max_target_positions: int = 16  # the longest target, [BOS] and [EOS] included
    layer_norm_eps: float = 1e-5  # LayerNorm eps
    dropout: float = 0.0  # residual and attention dropout, training mode only
    pad_token_id: int = 0  # padding (masked out)
    bos_token_id: int = 2  # the decoder's first input
    eos_token_id: int = 3  # the decoder stops here
    tie_word_embeddings: bool = True  # lm_head shares embed_tokens' weight

    LIMITS = {  # config.json ranges; a field not listed has no range beyond its type
        "vocab_size": POSITIVE, "d_model": POSITIVE, "encoder_layers": POSITIVE, "decoder_layers": POSITIVE,
        "attention_heads": POSITIVE, "ffn_dim": POSITIVE, "max_position_embeddings": POSITIVE,
        "max_target_positions": POSITIVE, "layer_norm_eps": EPS, "dropout": PROBABILITY,
        "pad_token_id": NON_NEGATIVE, "bos_token_id": NON_NEGATIVE, "eos_token_id": NON_NEGATIVE,
    }

    def check(self, source) -> None:
        check_divisible(source, "d_model", self.d_model, "attention_heads", self.attention_heads)

    def to_hf(self) -> dict:
        return {"architectures": ["QkvSeq2Seq"], "model_type": "qkv_seq2seq", "is_encoder_decoder": True,
                **dataclasses.asdict(self)}


class _MLP(nn.Module):
    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.d_model, c.ffn_dim)
        self.fc2 = nn.Linear(c.ffn_dim, c.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.self_attn = MultiHeadAttention(c.d_model, c.attention_heads, dropout=c.dropout)
        self.final_layer_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.mlp = _MLP(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        x = x + self.drop(self.self_attn(self.self_attn_layer_norm(x), mask=mask))
        return x + self.drop(self.mlp(self.final_layer_norm(x)))


class DecoderLayer(nn.Module):
    def __init__(self, c: Seq2SeqConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.self_attn = MultiHeadAttention(c.d_model, c.attention_heads, dropout=c.dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        # separate q/k/v projections: queries read the target, keys and values the source
        self.encoder_attn = MultiHeadAttention(c.d_model, c.attention_heads, dropout=c.dropout, fused=False)
        self.final_layer_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.mlp = _MLP(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Optional[Tensor], cache: Optional[KVCache]) -> Tensor:
        x = x + self.drop(self.self_attn(self.self_attn_layer_norm(x), causal=True, cache=cache, layer=self.layer_idx))
        x = x + self.drop(self.encoder_attn(self.encoder_attn_layer_norm(x), memory, mask=memory_mask))
        return x + self.drop(self.mlp(self.final_layer_norm(x)))


class _Stack(nn.Module):
    def __init__(self, c: Seq2SeqConfig, layers: list, positions: int):
        super().__init__()
        self.embed_positions = LearnedPositions(positions, c.d_model)
        self.layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)


class QkvSeq2Seq(nn.Module):
    """Encoder-decoder with cross-attention; `translate` and `generate` decode greedily with a KV cache."""

    is_encoder_decoder = True

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = _Stack(c, [EncoderLayer(c) for _ in range(c.encoder_layers)], c.max_position_embeddings)
        self.decoder = _Stack(c, [DecoderLayer(c, i) for i in range(c.decoder_layers)], c.max_target_positions)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.tie_weights()
        self.tokenizer: Optional[Tokenizer] = None

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def attention_role(name: str) -> str:
        """"encoder", "decoder" (self-attention) or "cross" for an attention module's name."""
        if name.endswith("encoder_attn"):
            return "cross"
        return "encoder" if name.startswith("encoder.") else "decoder"

    def new_cache(self, batch: int, capacity: int = 16) -> KVCache:
        """An empty KV cache for the decoder's self-attention."""
        c = self.config
        w = self.embed_tokens.weight
        return KVCache(c.decoder_layers, batch, c.attention_heads, c.d_model // c.attention_heads,
                       capacity=capacity, dtype=w.dtype, device=w.device)

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Source ids (B, Ls) and mask (B, Ls) (True = real token) -> encoder output (B, Ls, E)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L); got shape {tuple(input_ids.shape)}")
        Ls = input_ids.shape[1]
        if Ls > self.config.max_position_embeddings:
            raise ModelError(f"the source has {Ls} tokens but this model takes at most "
                             f"{self.config.max_position_embeddings}; shorten it")
        mask = key_padding_mask(attention_mask)  # (B, 1, 1, Ls) | None
        e = self.encoder
        x = self.embed_tokens(input_ids) + e.embed_positions(torch.arange(Ls, device=input_ids.device))  # (B, Ls, E)
        for layer in e.layers:
            x = layer(x, mask)
        return e.layer_norm(x)

    def decode(self, decoder_input_ids: Tensor, memory: Tensor, attention_mask: Optional[Tensor] = None,
               cache: Optional[KVCache] = None) -> Tensor:
        """Target ids (B, Lt) (new ones only with a cache) over the encoder output -> hidden (B, Lt, E)."""
        start = cache.length if cache is not None else 0
        Lt = decoder_input_ids.shape[1]
        if start + Lt > self.config.max_target_positions:
            raise ModelError(f"the target would reach {start + Lt} tokens; this model writes at most "
                             f"{self.config.max_target_positions}")
        d = self.decoder
        pos = torch.arange(start, start + Lt, device=decoder_input_ids.device)  # (Lt,)
        x = self.embed_tokens(decoder_input_ids) + d.embed_positions(pos)  # (B, Lt, E)
        mask = key_padding_mask(attention_mask)  # (B, 1, 1, Ls) | None
        for layer in d.layers:
            x = layer(x, memory, mask, cache)
        return d.layer_norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, *,
                attention_mask: Optional[Tensor] = None) -> Tensor:
        """Source (B, Ls), target inputs (B, Lt) starting with [BOS] -> logits (B, Lt, V) (teacher forcing)."""
        memory = self.encode(input_ids, attention_mask)
        return self.logits(self.decode(decoder_input_ids, memory, attention_mask))

    @torch.inference_mode()
    def generate(self, source: Union[str, list, Tensor], *, max_new_tokens: Optional[int] = None,
                 attention_mask: Optional[Tensor] = None) -> Tensor:
        """Greedy decoding with a KV cache for the decoder's self-attention.

        Args:
            source: a text, a list of texts, or ids (B, Ls) / (Ls,).
            max_new_tokens: default: as many as the target positions allow.
            attention_mask: (B, Ls) for padded ids (True = real token).

        Returns:
            (B, 1 + T) ids: [BOS], then the target, ending with [EOS] (finished rows padded with it).
        """
        ids, attention_mask = self._source(source, attention_mask)
        c = self.config
        limit = c.max_target_positions - 1
        T = limit if max_new_tokens is None else max_new_tokens
        if not 0 <= T <= limit:
            raise ValueError(f"max_new_tokens must be in 0..{limit} (this model's target positions); got {T}")
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(ids, attention_mask)  # (B, Ls, E)
            B = ids.shape[0]
            cache = self.new_cache(B, capacity=T + 1)
            out = torch.full((B, 1), c.bos_token_id, dtype=torch.int64, device=ids.device)  # (B, 1)
            finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
            step = out
            for _ in range(T):
                h = self.decode(step, memory, attention_mask, cache)  # (B, 1, E)
                nxt = self.logits(h[:, -1]).argmax(-1)  # (B,)
                nxt = torch.where(finished, torch.full_like(nxt, c.eos_token_id), nxt)
                finished |= nxt == c.eos_token_id
                out = torch.cat([out, nxt[:, None]], dim=1)
                if bool(finished.all()):
                    break
                step = nxt[:, None]
            return out
        finally:
            self.train(was_training)

    def translate(self, text: Union[str, list]) -> Union[str, list]:
        """A text (or a list of texts) -> its translation(s)."""
        out = self.generate(text)
        words = [self.tokenizer.decode(row) for row in out]
        return words[0] if isinstance(text, str) else words

    def _source(self, source, attention_mask):
        if isinstance(source, (str, list, tuple)):
            if self.tokenizer is None:
                raise ModelError("this model has no tokenizer; pass token ids, or load it with qkv.load(folder)")
            batch = self.tokenizer(source)
            return batch.input_ids, batch.attention_mask
        if isinstance(source, Tensor):
            ids = source.unsqueeze(0) if source.dim() == 1 else source
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
            return ids, attention_mask
        raise TypeError(f"source must be a string, a list of strings or a tensor of ids; got {type(source).__name__}")


def hf_plan(c: Seq2SeqConfig) -> Plan:
    """Checkpoint keys = parameter names (pure: the module is built on the meta device)."""
    with torch.device("meta"):
        model = QkvSeq2Seq(c)
    return {name: (Piece(name, tuple(p.shape)),) for name, p in model.named_parameters()}


def hf_layers(c: Seq2SeqConfig) -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer), checked against the
    checkpoint's keys before planning (which builds the module on the meta device)."""
    return [("encoder_layers", c.encoder_layers, "encoder.layers."),
            ("decoder_layers", c.decoder_layers, "decoder.layers.")]


def hf_ignored(c: Seq2SeqConfig) -> dict:
    """A tied lm_head.weight may be saved as a copy of embed_tokens."""
    return {"lm_head.weight": (c.vocab_size, c.d_model)} if c.tie_word_embeddings else {}


FAMILY = Family(architectures=("QkvSeq2Seq",), model_type=None, config=Seq2SeqConfig, model=QkvSeq2Seq,
                plan=hf_plan, layers=hf_layers, ignored=hf_ignored)

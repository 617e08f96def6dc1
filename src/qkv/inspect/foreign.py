"""`qkv.explain` for transformers models: any encoder-only or decoder-only `PreTrainedModel`
whose attention goes through transformers' attention interface.

The model runs once with its attention implementation switched to qkv's ("qkv", registered by
`qkv.integrations.transformers`) and restored afterwards, even on error. qkv's attention
function hands every layer's queries, keys and values to the same `Recorder` that observes
qkv's own `MultiHeadAttention`, with the constraints it passes to `qkv.attention` (padding,
causal band, sliding window, Gemma 2's soft-cap), so the weights are recomputed exactly as for
qkv's models and every analysis and renderer of `ExplainResult` applies. Tokens, special tokens
and words come from the fast tokenizer's own encoding (its `word_ids` and character offsets,
as `transformers`' `BatchEncoding` gives them).

Value-weighted norms (Kobayashi et al., 2020) need each layer's output projection W_O; it is
found by the names transformers' models give it (`o_proj`, `out_proj`, `c_proj`, `dense`,
`out_lin`, or BERT's sibling `output.dense`), see `qkv.inspect.capture.output_projection`.

Nothing here imports transformers at module import; `qkv.explain` comes here only when it is
given a transformers model.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from .capture import Recorder, is_transformers_model

__all__ = ["is_transformers_model", "tokenizer_for", "max_tokens", "shape_of", "check_model", "encode",
           "model_inputs", "record"]


def tokenizer_for(model, tokenizer):
    """The fast tokenizer to use: `tokenizer`, else the one `qkv.models.load_transformers` set on
    the model; a clear TypeError otherwise."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise TypeError(f"explain needs the tokenizer of a transformers model: pass tokenizer=, e.g. "
                        f"qkv.explain(text, model=model, tokenizer=AutoTokenizer.from_pretrained(path)) "
                        f"({type(model).__name__} has none attached)")
    if not getattr(tok, "is_fast", False) or not callable(tok):
        raise TypeError(f"tokenizer must be a transformers fast tokenizer (is_fast, from tokenizer.json), whose "
                        f"offsets map tokens to words; got {type(tok).__name__}")
    return tok


def _text_config(model):
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def max_tokens(model, tok) -> Optional[int]:
    """The most tokens the model takes: its positions (config), and the tokenizer's model_max_length
    where it sets one; None when neither says."""
    config = _text_config(model)
    limits = [getattr(config, f, None) for f in ("max_position_embeddings", "n_positions", "max_seq_len")]
    limits.append(getattr(tok, "model_max_length", None))
    found = [int(v) for v in limits if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**7]
    return min(found) if found else None


def shape_of(model) -> tuple[int, int]:
    """(attention layers, query heads) of a transformers model, as explain's indices count them."""
    from ..integrations.transformers import attention_modules

    modules = attention_modules(model)
    heads = getattr(_text_config(model), "num_attention_heads", None)
    if not isinstance(heads, int):
        heads = min((getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", 0) for _, m in modules),
                    default=0)
    return len(modules), int(heads)


def check_model(model, name: str) -> None:
    """What explain refuses before anything runs: encoder-decoders, and models whose attention
    transformers cannot switch to qkv's."""
    from ..integrations.transformers import attention_modules

    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name!r} ({type(model).__name__}) is an encoder-decoder; explain runs transformers' "
                         "encoder-only and decoder-only models (BERT-like, GPT-like), and encoder-decoders that qkv "
                         "runs natively (qkv's own 'translate')")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        from ..models.loading import own_attention_refusal

        raise ValueError(own_attention_refusal(type(model).__name__))
    attention_modules(model)  # a ValueError when there are none


def encode(text: str, model, tok, name: str, *, truncate: bool):
    """(model inputs (1, n) tensors, tokens, special flags, words, word_of_token) of `text`."""
    limit = max_tokens(model, tok)
    enc = tok(text, return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True,
              truncation=bool(truncate and limit), max_length=limit if truncate else None)
    n = int(enc["input_ids"].shape[1])
    if limit is not None and n > limit:
        raise ValueError(f"the text has {n} tokens but {name!r} takes at most {limit}; shorten it, or pass "
                         f"truncate=True to keep the first {limit} tokens")
    if n == 0:
        raise ValueError("the text gives no tokens at all; pass text the tokenizer can represent")
    offsets = enc.pop("offset_mapping")[0].tolist()  # (n, 2) character spans
    special_mask = enc.pop("special_tokens_mask")[0].tolist()  # (n,) 1 = added by the tokenizer
    word_ids = enc.word_ids(0)
    tokens = enc.tokens(0)
    word_of_token = [None if (s or w is None) else w for w, s in zip(word_ids, special_mask)]
    # word ids as the tokenizer numbers them may skip numbers (a word dropped by truncation); renumber densely
    order = {w: i for i, w in enumerate(sorted({w for w in word_of_token if w is not None}))}
    word_of_token = [None if w is None else order[w] for w in word_of_token]
    spans: dict[int, list[int]] = {}
    for w, (start, end) in zip(word_of_token, offsets):
        if w is not None:
            span = spans.setdefault(w, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
    words = []
    for w in sorted(spans):
        piece = text[spans[w][0]:spans[w][1]]
        words.append(piece.strip() or piece)  # byte-level BPE spans may carry the space before a word
    special = [w is None for w in word_of_token]
    return enc, tokens, special, words, word_of_token


def model_inputs(model, enc) -> dict:
    """The encoding's tensors that the model's forward takes, on the model's device."""
    params = inspect.signature(model.forward).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in enc.items() if k in params or (takes_all and k == "attention_mask")}
    if "use_cache" in params:
        inputs["use_cache"] = False  # one forward pass: no KV cache to keep
    return inputs


def record(model, inputs: dict, *, layers, heads, rows) -> Recorder:
    """Run `model` once on `inputs` with qkv's attention and a Recorder on its attention modules;
    the attention implementation it had is restored afterwards, even on error."""
    from ..integrations.transformers import register

    register()
    before = model.config._attn_implementation
    recorder = Recorder(layers=layers, heads=heads, rows=rows).attach(model)
    try:
        model.set_attn_implementation("qkv")
        if model.config._attn_implementation != "qkv":
            raise ValueError(f"{type(model).__name__} did not switch to attn_implementation='qkv' (it stayed "
                             f"{model.config._attn_implementation!r}); qkv cannot record its attention")
        with torch.no_grad():
            model(**inputs)
    finally:
        recorder.detach()
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)
    return recorder

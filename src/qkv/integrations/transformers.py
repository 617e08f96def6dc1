"""qkv inside transformers: the attention implementation "qkv".

    from qkv.integrations import transformers as qkv_hf
    qkv_hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="qkv")

`register()` adds two functions to transformers (>= 5): `attention_forward` to
`transformers.AttentionInterface` (what each attention module calls with its projected
queries, keys and values) and `qkv_mask` to `transformers.masking_utils.AttentionMaskInterface`
(what the model calls once per forward to build its masks; without a mask function of the
same name transformers passes no mask at all to an unknown implementation). It follows the
peer `transformers/integrations/sdpa_attention.py` and `masking_utils.sdpa_mask`, with qkv's
conventions:

- Masks. `qkv_mask` returns None (no tensor) when the constraint is the plain causal or
  bidirectional one, there is no padding, no sliding window or chunk can bind
  (kv_length < local size, sdpa's rule) and, for causal, the queries are the last q_length
  of the keys (q_offset + q_length == kv_offset + kv_length: a prefill or a KV-cache step).
  qkv's causal is aligned bottom right, which is then exactly right, so `attention_forward`
  calls `qkv.attention(causal=True)` and the backend needs no mask. Otherwise it returns
  sdpa_mask's bool mask (B, 1, Lq, Lk), True = may attend, which is the whole truth
  (padding, windows, StaticCache's empty future slots, packed sequences). When that mask is
  a causal pattern aligned bottom right, it carries a tag (an attribute of the tensor) and
  `attention_forward` passes causal=True and the layer's window with it: an AND that
  changes nothing, lets backends skip blocks above the diagonal and tells a recorder how the
  layer attended. An untagged mask (a user's 4-D mask, a copy) is passed alone, so top-left
  or bottom-right alignment never matters.
- Arguments. GQA natively (key/value heads are not repeated); `scaling` -> scale;
  `sliding_window` s -> window=s - 1 keys to the left under causal (transformers'
  `kv_idx > q_idx - s`), passed only with the causal flag, where the mask function already
  guaranteed it (so it changes nothing);
  `softcap` c -> `qkv.masks.soft_cap(c)` as score_mod (Gemma 2); `dropout` -> dropout_p when
  `module.training` (as eager's `F.dropout(training=module.training)`); `position_bias`
  (T5-style additive bias) -> a float mask. Attention sinks (`s_aux`, `sinks`), a
  FlexAttention BlockMask and packed `cu_seq_lens` without a mask are refused with a
  ValueError naming them: qkv has no such feature.
- Weights. With `output_attentions=True` at call time (`model(ids, output_attentions=True)`,
  `generate(..., output_attentions=True, return_dict_in_generate=True)`) each layer's output
  still comes from the fast path, and its weights are recomputed from the same queries and
  keys by `qkv.attention_weights` (the way `qkv.inspect.capture` does for explain): (B, H, Lq,
  Lk), equal to eager's within the tolerance rule of `qkv.testing`, except that rows that may
  attend to nothing are zeros (eager: uniform over every key) and that in training mode they
  are the probabilities before dropout. transformers refuses `output_attentions=True` in a
  non-eager *config* (from_pretrained(..., output_attentions=True)); pass it at call time.
- Selection. `with qkv_hf.attentions(model, layers=[...], heads=[...], rows=[...]) as sel:`
  narrows what `output_attentions=True` computes, so long inputs do not materialise every
  matrix: a selected layer's tensor is (B, nh, nr, Lk) for the nh selected heads (in the
  order given) and the nr selected query rows of that call (negative rows count from the
  end: rows=[-1] is the newest token at every step of `generate`); layers not selected return
  None, which transformers drops, so `outputs.attentions` holds one tensor per selected layer
  in layer order and `sel.layers` says which layer each is.
- Recorder. If an attention module has a `recorder` attribute that is not None,
  `attention_forward` calls `module.recorder(module, q, k, v, mask=, causal=, window=,
  scale=, score_mod=)` with exactly what it is about to pass to `qkv.attention`, as
  `qkv.nn.MultiHeadAttention` does (the hook `qkv.inspect` observes through).
  `attention_modules(model)` lists the modules that call the attention function.

docs/integrations.md ("Inside transformers") shows it in use; benchmarks/integrations.py
measures it against attn_implementation="sdpa" and "eager" on the same model.
"""

from __future__ import annotations

import contextvars
import inspect
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..core import attention, attention_weights
from ..core.spec import build_spec

__all__ = ["NAME", "register", "is_registered", "attention_forward", "qkv_mask", "attention_modules",
           "attentions", "Selection"]

NAME = "qkv"
_INSTALL = "pip install 'qkv[hf]'"


def _transformers():
    """transformers' AttentionInterface and masking_utils, or an ImportError saying how to install them."""
    try:
        import transformers
        from transformers import AttentionInterface, masking_utils
    except ImportError as e:  # not installed, or too old to have the interfaces
        raise ImportError(
            f"qkv.integrations.transformers needs transformers >= 5 (AttentionInterface, masking_utils): {_INSTALL}"
            f" ({e})"
        ) from e
    if not hasattr(masking_utils, "AttentionMaskInterface"):
        raise ImportError(f"transformers {transformers.__version__} has no AttentionMaskInterface; qkv needs "
                          f"transformers >= 5: {_INSTALL}")
    return AttentionInterface, masking_utils


def register() -> None:
    """Register the attention implementation "qkv" with transformers (idempotent and cheap).

    Afterwards `from_pretrained(path, attn_implementation="qkv")` (or `model.set_attn_implementation("qkv")`)
    runs the model's attention through `qkv.attention`. Raises ImportError naming `pip install 'qkv[hf]'` when
    transformers >= 5 is missing.
    """
    interface, masking_utils = _transformers()
    if interface._global_mapping.get(NAME) is not attention_forward:
        interface.register(NAME, attention_forward)
    masks = masking_utils.AttentionMaskInterface
    if masks._global_mapping.get(NAME) is not qkv_mask:
        masks.register(NAME, qkv_mask)


def is_registered() -> bool:
    """True when both of qkv's functions are registered with transformers under "qkv"."""
    try:
        interface, masking_utils = _transformers()
    except ImportError:
        return False
    return (interface._global_mapping.get(NAME) is attention_forward
            and masking_utils.AttentionMaskInterface._global_mapping.get(NAME) is qkv_mask)


# ------------------------------------------------------------------------------------------ masks
_CAUSAL_TAG = "_qkv_causal_bottom_right"  # set on a mask tensor that is causal and aligned bottom right


def _int_or_none(x) -> Optional[int]:
    """An offset as an int, or None when it is a tensor being traced (its value cannot be read)."""
    if isinstance(x, Tensor):
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        return int(x.item())
    return int(x)


def qkv_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
             mask_function=None, attention_mask: Optional[Tensor] = None, local_size: Optional[int] = None,
             allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
             **kwargs) -> Optional[Tensor]:
    """The mask function of "qkv" (transformers' AttentionMaskInterface): None or sdpa_mask's bool mask.

    Args (as transformers' `sdpa_mask`): batch_size, q_length, kv_length; q_offset, kv_offset: the position of
    the first query and first key; mask_function: transformers' mask_mod (causal by default); attention_mask:
    (B, past + q_length) bool padding mask, True = a real token; local_size: the sliding window or chunk size;
    allow_is_causal_skip / allow_is_bidirectional_skip: whether the caller allows returning None for the plain
    causal / bidirectional pattern; other keyword arguments go to sdpa_mask.

    Returns None when qkv's bottom-right causal flag (or no constraint) expresses the mask exactly (see the
    module docstring), else a bool tensor (B, 1, q_length, kv_length), True = may attend.
    """
    _, masking_utils = _transformers()
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, kv_length) or None
    no_padding = padding is None or bool(masking_utils.fast_all(padding))
    window_free = local_size is None or kv_length < local_size  # sdpa's rule: a window/chunk that cannot bind
    q0 = _int_or_none(q_offset)
    aligned = q0 is not None and q0 + q_length == int(kv_offset) + kv_length  # queries are the last keys
    if allow_is_causal_skip and no_padding and window_free and aligned:
        return None
    if allow_is_bidirectional_skip and no_padding and window_free:
        return None
    kwargs.pop("dtype", None)  # eager's argument; the mask stays bool
    mask = masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                   q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                   attention_mask=attention_mask, local_size=local_size,
                                   allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
    if allow_is_causal_skip and aligned and isinstance(mask, Tensor):
        # a causal pattern (transformers allows the causal skip only for one) placed bottom right: qkv's causal
        # flag and the layer's window are implied by the mask, so attention_forward may add them (an AND that
        # changes nothing) and backends skip the blocks above the diagonal
        setattr(mask, _CAUSAL_TAG, True)
    return mask


# ---------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """What `attentions(...)` computes for `output_attentions=True`: layers, heads, rows (None = all).

    layers: the attention layers selected (indices into `attention_modules(model)`), in layer order;
    the entries of `outputs.attentions` are these layers' tensors, each (B, nh, nr, Lk).
    """

    layers: list[int]
    heads: Optional[list[int]]
    rows: Optional[list[int]]
    _index: dict = field(default_factory=dict, repr=False)  # id(module) -> layer index

    def layer_of(self, module) -> Optional[int]:
        return self._index.get(id(module))


_SELECTION: contextvars.ContextVar[Optional[Selection]] = contextvars.ContextVar("qkv_hf_selection", default=None)


def _indices(name: str, values) -> Optional[list[int]]:
    if values is None:
        return None
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"attentions: {name} must be ints (or None for all); got {v!r}")
        out.append(int(v))
    if not out:
        raise ValueError(f"attentions: {name}=[] selects nothing; give at least one index, or None for all")
    return out


@contextmanager
def attentions(model: torch.nn.Module, *, layers: Optional[Sequence[int]] = None,
               heads: Optional[Sequence[int]] = None, rows: Optional[Sequence[int]] = None) -> Iterator[Selection]:
    """Compute `output_attentions=True` weights for selected layers, heads and query rows only.

        with qkv_hf.attentions(model, layers=[0, 3], heads=[1], rows=[-1]) as sel:
            out = model(ids, output_attentions=True)
        # out.attentions: one (B, 1, 1, Lk) tensor per layer in sel.layers == [0, 3]

    Args:
        model: the transformers model (loaded with attn_implementation="qkv"); layer i is
            `attention_modules(model)[i]`.
        layers: layer indices (negative count from the end); None = every layer. Layers not selected return
            no weights (None), so they are absent from `outputs.attentions`.
        heads: query head indices (negative count from the end), in the order wanted; None = all.
        rows: query row indices of each call (negative count from the end: -1 is the last token, also at each
            step of `generate`); None = all.

    Yields the `Selection`; its `layers` lists the selected layers in order. Nested uses replace the outer one
    until they exit. Bad indices raise ValueError naming the valid range (heads and rows when the layer runs).
    """
    found = attention_modules(model)
    n = len(found)
    chosen = _indices("layers", layers)
    if chosen is None:
        chosen = list(range(n))
    resolved = []
    for i in chosen:
        if not -n <= i < n:
            raise ValueError(f"attentions: layer {i} does not exist; {type(model).__name__} has {n} attention layers "
                             f"(0..{n - 1}, or -{n}..-1)")
        resolved.append(i % n)
    resolved = sorted(set(resolved))
    sel = Selection(layers=resolved, heads=_indices("heads", heads), rows=_indices("rows", rows))
    sel._index = {id(m): i for i, (_, m) in enumerate(found) if i in resolved}
    # unselected layers are known too, so they can return None rather than full weights
    for _, m in found:
        sel._index.setdefault(id(m), None)
    token = _SELECTION.set(sel)
    try:
        yield sel
    finally:
        _SELECTION.reset(token)


def _resolve(name: str, values: Optional[list[int]], size: int, what: str) -> Optional[Tensor]:
    if values is None:
        return None
    for v in values:
        if not -size <= v < size:
            raise ValueError(f"attentions: {name[:-1]} {v} does not exist; {what} has {size} (0..{size - 1}, "
                             f"or -{size}..-1)")
    return torch.tensor([v % size for v in values], dtype=torch.long)


def _weights(module, q: Tensor, k: Tensor, *, mask, causal: bool, window, scale, score_mod) -> Optional[Tensor]:
    """Attention weights of one call, restricted to the active selection: (B, H or nh, Lq or nr, Lk), or None."""
    sel = _SELECTION.get()
    if sel is None or (sel.heads is None and sel.rows is None and id(module) not in sel._index):
        # no selection, or a module the selection does not know (another model): every weight
        return attention_weights(q, k, mask=mask, causal=causal, window=window, scale=scale, score_mod=score_mod)
    if sel._index.get(id(module)) is None:
        return None  # a layer not selected
    Hq, Lq, Hkv = q.shape[1], q.shape[2], k.shape[1]
    heads = _resolve("heads", sel.heads, Hq, f"layer {sel._index[id(module)]} (query heads)")
    rows = _resolve("rows", sel.rows, Lq, "this call's queries (rows)")
    if heads is None and rows is None:
        return attention_weights(q, k, mask=mask, causal=causal, window=window, scale=scale, score_mod=score_mod)
    heads = torch.arange(Hq) if heads is None else heads
    rows = torch.arange(Lq) if rows is None else rows
    heads_d, rows_d = heads.to(q.device), rows.to(q.device)
    q_sel = q.index_select(1, heads_d).index_select(2, rows_d)  # (B, nh, nr, D)
    k_sel = k.index_select(1, heads_d // (Hq // Hkv))  # (B, nh, Lk, D): the key head each query head reads
    # The selected rows lose their place in the band, so the constraints become one explicit mask.
    spec = build_spec(q, k, None, mask=mask, causal=causal, window=window, scale=scale, score_mod=score_mod)
    sel_mask = spec.rows_mask(rows_d, heads_d, q.device).to(q.dtype)  # (B|1, nh|1, nr, Lk)
    mod = None
    if score_mod is not None:
        def mod(s, b, h, qi, kj):  # the score function seen from the selected heads and rows
            return score_mod(s, b, heads_d[h], rows_d[qi], kj)
    return attention_weights(q_sel, k_sel, mask=sel_mask, scale=scale, score_mod=mod)


# ------------------------------------------------------------------------------ the attention
def _weights_wanted(kwargs) -> bool:
    """True when the caller asked for attention weights: `output_attentions` reached the attention function, or
    transformers' output collector is gathering attentions (models such as GPT-2 keep the flag to themselves)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without the collector passes the flag down
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


_REFUSED = {
    "s_aux": "attention sinks (s_aux, a learned logit per head that takes part in the softmax)",
    "sinks": "attention sinks (sinks, a learned logit per head that takes part in the softmax)",
    "block_indices": "block-sparse indices (block_indices)",
}


def _soft_cap(cap: float):
    from ..masks import soft_cap

    return soft_cap(cap)


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, position_bias: Optional[Tensor] = None,
                      **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' attention function for "qkv": `qkv.attention` on the module's projected heads.

    Args:
        module: the calling attention module (its `training`, `is_causal`, and `recorder` if set).
        query: (B, Hq, Lq, D); key: (B, Hkv, Lk, D); value: (B, Hkv, Lk, Dv), Hq a multiple of Hkv.
        attention_mask: None (causal or no constraint, see `qkv_mask`), a bool mask broadcastable to
            (B, Hq, Lq, Lk), True = may attend, or a float mask of that shape added to the scores.
        dropout: probability of dropping a weight, applied when `module.training`.
        scaling: multiplies the scores (default 1/sqrt(D)).
        is_causal: overrides `module.is_causal` when no mask is given.
        sliding_window: the layer's window s (a query sees the s most recent keys, itself included).
        softcap: tanh soft-capping of the scores, cap * tanh(score / cap) (Gemma 2).
        position_bias: (B or 1, Hq, Lq, Lk) additive bias (T5-style), combined with the mask.
        kwargs: `output_attentions` (weights wanted); the rest of transformers' keyword arguments are not needed.

    Returns:
        (out (B, Lq, Hq, Dv) contiguous, weights (B, Hq, Lq, Lk) (or the selection's (B, nh, nr, Lk)) when
        `output_attentions` is set, else None).
    """
    for name, what in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{type(module).__name__} uses {what}, which qkv's attention does not compute; load "
                             "this model with attn_implementation='eager' or 'sdpa'")
    Lq = query.shape[2]
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise ValueError(f"{type(module).__name__} got a {type(attention_mask).__name__} as attention mask (a "
                         "FlexAttention BlockMask?); attn_implementation='qkv' takes bool or float tensors, built by "
                         "its own mask function: load the model with attn_implementation='qkv' rather than "
                         "switching only the attention function")
    cu_q = kwargs.get("cu_seq_lens_q")
    if attention_mask is None and isinstance(cu_q, Tensor) and cu_q.numel() > 2:
        raise ValueError(f"{type(module).__name__} got {cu_q.numel() - 1} packed sequences (cu_seq_lens_q) and no "
                         "mask: qkv has no varlen attention inside transformers; pass position_ids (the mask function "
                         "then separates the sequences) or use attn_implementation='sdpa'")
    if attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and Lq > 1
    else:  # the mask is the whole truth; qkv_mask tags one that is also causal and aligned bottom right
        causal = getattr(attention_mask, _CAUSAL_TAG, False) and Lq > 1
    mask = attention_mask
    window = int(sliding_window) - 1 if (causal and sliding_window is not None) else None
    if position_bias is not None:  # an additive float bias (B or 1, Hq, Lq, Lk); -inf where the mask forbids
        bias = position_bias.to(query.dtype)
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = bias + mask
    score_mod = None if softcap is None else _soft_cap(softcap)
    scale = None if scaling is None else float(scaling)
    dropout_p = float(dropout) if module.training else 0.0

    recorder = getattr(module, "recorder", None)
    if recorder is not None:  # qkv.inspect observes what attention is about to see
        recorder(module, query, key, value, mask=mask, causal=causal, window=window, scale=scale, score_mod=score_mod)
    out = attention(query, key, value, mask=mask, causal=causal, window=window, scale=scale, score_mod=score_mod,
                    dropout_p=dropout_p)  # (B, Hq, Lq, Dv)
    weights = None
    if _weights_wanted(kwargs):
        weights = _weights(module, query, key, mask=mask, causal=causal, window=window, scale=scale,
                           score_mod=score_mod)
    return out.transpose(1, 2).contiguous(), weights  # (B, Lq, Hq, Dv)


# ------------------------------------------------------------------------------ the modules
_CALLS: dict[type, bool] = {}


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _dispatches(cls: type) -> bool:
    """True if a method of `cls` (its forward, or a helper it defines) looks up ALL_ATTENTION_FUNCTIONS."""
    hit = _CALLS.get(cls)
    if hit is None:
        hit = False
        for klass in cls.__mro__:
            if klass is torch.nn.Module or klass is object:
                continue
            for value in vars(klass).values():
                fn = inspect.unwrap(value) if callable(value) else None
                code = getattr(fn, "__code__", None)
                if code is not None and "ALL_ATTENTION_FUNCTIONS" in _code_names(code):
                    hit = True
                    break
            if hit:
                break
        _CALLS[cls] = hit
    return hit


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The attention modules of a transformers model that call the attention function, in layer order.

    A module qualifies when its class (or a base class) has a method that looks up transformers'
    `ALL_ATTENTION_FUNCTIONS` (the attention dispatch every transformers 5 model uses) and it carries the
    model's `config`; wrappers around it (BertAttention around BertSelfAttention) do not. Order is
    `model.named_modules()` order, which is layer order (in BERT with cross-attention: self, then cross,
    per layer). Returns [(qualified name, module)]; raises ValueError when there is none.
    """
    from transformers import PreTrainedModel  # a transformers model is given, so transformers is there

    found = [(name, m) for name, m in model.named_modules()
             if hasattr(m, "config") and not isinstance(m, PreTrainedModel) and _dispatches(type(m))]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules that dispatch through transformers' "
                         "ALL_ATTENTION_FUNCTIONS; is it a transformers >= 5 model?")
    return found

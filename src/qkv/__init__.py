"""qkv: transformer attention, exactly.

The functional core (README.md, "The attention core"; docs/architecture.md):

    out = qkv.attention(q, k, v, *, mask=None, causal=False, window=None, scale=None,
                        score_mod=None, dropout_p=0.0, backend="auto")
    out, lse = qkv.attention_with_lse(q, k, v, ...)
    probs = qkv.attention_weights(q, k, ...)
    out = qkv.reference_attention(q, k, v, ...)

The call shapes people already write (docs/integrations.md):

    out = qkv.sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False)                  # torch's SDPA, exactly
    out = qkv.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, causal=True)        # FlashAttention's varlen
    out, lse = qkv.merge_attention([(out_1, lse_1), (out_2, lse_2)])  # disjoint keys -> union
    out = qkv.attention(q, k, v, mask=create_block_mask(...))   # FlexAttention's BlockMask

Models and views of their attention:

    model = qkv.load("minilm")                       # the bundled all-MiniLM-L6-v2
    result = qkv.explain("The cat sat on the mat.", focus="cat")

`import qkv` loads the core only; the layers above it (models, inspect, masks) load on
first use of one of their names (PEP 562 module `__getattr__`), so the core never pulls
them in and `import qkv` stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .core import attention, attention_weights, attention_with_lse, reference_attention

try:
    __version__ = _version("qkv")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

# name -> (module, attribute or None for the module itself), loaded on first use
_LAZY = {
    "load": ("qkv.models", "load"),
    "masks": ("qkv.masks", None),
    "BlockMask": ("qkv.masks", "BlockMask"),
    "block_mask": ("qkv.masks", "block_mask"),
    "explain": ("qkv.inspect", "explain"),
    "ExplainResult": ("qkv.inspect", "ExplainResult"),
    # the call shapes people already write (torch SDPA, FlashAttention varlen, partial merges)
    "sdpa": ("qkv.core.calls", "sdpa"),
    "varlen_attention": ("qkv.core.calls", "varlen_attention"),
    "merge_attention": ("qkv.core.calls", "merge_attention"),
}

__all__ = [
    "attention",
    "attention_with_lse",
    "attention_weights",
    "reference_attention",
    "load",
    "BlockMask",
    "block_mask",
    "masks",
    "explain",
    "ExplainResult",
    "sdpa",
    "varlen_attention",
    "merge_attention",
    "__version__",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'qkv' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

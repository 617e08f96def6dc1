"""qkv: transformer attention, exactly.

The functional core (README.md, "The attention core"):

    out = qkv.attention(q, k, v, *, mask=None, causal=False, window=None, scale=None,
                        score_mod=None, dropout_p=0.0, backend="auto")
    out, lse = qkv.attention_with_lse(q, k, v, ...)
    probs = qkv.attention_weights(q, k, ...)
    out = qkv.reference_attention(q, k, v, ...)

Models and views of their attention:

    model = qkv.load("minilm")                       # the bundled all-MiniLM-L6-v2
    result = qkv.explain("The cat sat on the mat.", focus="cat")
"""

from .core import attention, attention_weights, attention_with_lse, reference_attention
from .models import load  # models -> nn -> core; cheap: tokenizers/safetensors load lazily
from . import masks
from .masks import BlockMask, block_mask
from .inspect import ExplainResult, explain  # inspect observes models through the attention layer

__version__ = "0.1.0"

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
    "__version__",
]

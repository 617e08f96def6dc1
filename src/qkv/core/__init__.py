"""The functional core: exact attention with one signature and several backends.

Nothing here imports from models, inspect or web (README.md, "Layout": models -> nn -> core).
"""

from .api import (
    attention,
    attention_weights,
    attention_with_lse,
    backends,
    choose_backend,
    reference_attention,
    register_backend,
)

__all__ = [
    "attention",
    "attention_with_lse",
    "attention_weights",
    "reference_attention",
    "backends",
    "choose_backend",
    "register_backend",
]

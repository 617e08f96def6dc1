"""The functional core: exact attention with one signature and several backends.

Nothing here imports from the layers above it (masks, nn, models, inspect, web, distributed;
tests/core/test_layering.py checks it). Layout: docs/architecture.md.
"""

from .api import (
    attention,
    attention_weights,
    attention_with_lse,
    backends,
    check_memory,
    choose_backend,
    get_backend,
    reference_attention,
    register_backend,
)
from .backend import Backend
from .calls import merge_attention, sdpa, varlen_attention

__all__ = [
    "attention",
    "attention_with_lse",
    "attention_weights",
    "reference_attention",
    "backends",
    "choose_backend",
    "register_backend",
    "get_backend",
    "check_memory",
    "Backend",
    "sdpa",
    "varlen_attention",
    "merge_attention",
]

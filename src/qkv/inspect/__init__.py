"""See attention: capture of Q/K/V and weights, analyses, and renderers.

`qkv.explain(text, model="minilm", ...)` runs a model with a `Recorder` on its attention
layers and returns an `ExplainResult`. Inspect observes models through the attention layer
and never changes their outputs (README.md, "Layout": inspect observes).
"""

from . import analysis
from .capture import Record, Recorder
from .explain import ExplainResult, Steps, explain

__all__ = ["explain", "ExplainResult", "Steps", "Recorder", "Record", "analysis"]

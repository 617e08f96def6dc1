"""What every model family shares: the activations of Hugging Face configs and the `Family`
record through which `qkv.load` finds an architecture (one record per family, no branches on
the family in the loader; docs/architecture.md, "Adding a model family").

A family module (bert.py, gpt2.py, llama.py, mistral.py, qwen2.py, seq2seq.py) defines its config dataclass (an
`HFConfig`, fields.py), its module, the pure weight-name plan of its checkpoints
(`hf_plan`, `hf_layers`, `hf_ignored`) and one `FAMILY = Family(...)` that names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import ModelError, Plan
from .fields import HFConfig, Limit


def _laplace(x: Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> Tensor:
    return 0.5 * (1.0 + torch.erf((x - mu) / (sigma * math.sqrt(2.0))))


# transformers' ACT2FN names, each the same function (the formulas of transformers/activations.py);
# prelu and xielu have learned parameters and are not offered.
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10.0, 10.0),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_accurate": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3)))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "laplace": _laplace,
    "hardswish": F.hardswish,
    "leaky_relu": F.leaky_relu,
    "linear": lambda x: x,
    "mish": F.mish,
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "swish": F.silu,
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "tanh": torch.tanh,
}
ACTIVATION = Limit(choices=tuple(sorted(_ACTIVATIONS)))  # the activation field of every family


def activation(name: str):
    """The activation function named in a Hugging Face config."""
    if name not in _ACTIVATIONS:
        raise ModelError(f"activation {name!r} in config.json is not supported; "
                         f"qkv supports {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def key_padding_mask(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """attention_mask (B, Lk) bool or 0/1 (False/0 = padding) -> (B, 1, 1, Lk) bool for
    `qkv.attention` (True = may attend); None when there is no mask or no padding."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)


def _as_is(config, keys) -> tuple[Any, tuple]:
    return config, ()


def _nothing(folder: Path, config) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    """How `qkv.load` reads one architecture family.

    Args:
        architectures: config.json `architectures` names this family runs (the first is the
            one a bare `model_type` stands for).
        model_type: config.json `model_type` that, without an `architectures` list, means this family.
        config: the config dataclass (`from_hf(dict, source)`).
        model: the module class (`model(config)`, built on the meta device).
        plan, layers, ignored: `hf_plan`, `hf_layers`, `hf_ignored` of the family module, each
            called as f(config, *plan_args).
        adapt: (config, checkpoint keys) -> (config, plan_args): what the checkpoint's key
            names say about the model (BERT: a pooler or not; GPT-2: the "transformer." prefix).
        extras: (folder, config) -> {attribute: value} read from the folder's other files
            before the weights and set on the loaded model (BERT: `pooling`).
        needs_tokenizer: a folder without tokenizer files is an error (encoders), instead of a
            model whose `tokenizer` is None (decoders take token ids).
    """

    architectures: tuple[str, ...]
    model_type: Optional[str]
    config: type[HFConfig]
    model: type
    plan: Callable[..., Plan]
    layers: Callable[..., list]
    ignored: Callable[..., Mapping]
    adapt: Callable[[Any, Any], tuple[Any, tuple]] = _as_is
    extras: Callable[[Path, Any], dict] = _nothing
    needs_tokenizer: bool = False

"""Every activation name qkv accepts computes what transformers' ACT2FN computes under that name."""

from __future__ import annotations

import pytest
import torch

from qkv.models.checkpoint import ModelError
from qkv.models.common import _ACTIVATIONS, activation


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_activation_equals_transformers(name):
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    want = ACT2FN[name](x)
    got = activation(name)(x)
    assert (got - want).abs().max().item() < 1e-12, name


def test_every_parameter_free_transformers_activation_is_offered():
    from transformers.activations import ACT2CLS

    assert set(ACT2CLS) - set(_ACTIVATIONS) == {"prelu", "xielu"}


def test_unknown_activation_is_named():
    with pytest.raises(ModelError, match="activation 'prelu' in config.json is not supported"):
        activation("prelu")

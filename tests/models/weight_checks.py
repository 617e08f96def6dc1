"""Bit-for-bit comparison of trained weights, shared by the trainers' tests (test_trained_training.py,
test_digits.py): a model's state as detached copies, and equality with the largest difference named."""

from __future__ import annotations

import torch


def state_copy(model) -> dict:
    """{name: a detached copy of the tensor} of `model.state_dict()`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    """The same names and bit-identical tensors; a mismatch names the tensor and its largest difference."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max difference {(a[k] - b[k]).abs().max().item():.3g}"

"""Tiny random Hugging Face ViT folders (transformers' ViTForImageClassification / ViTModel), built
and saved by the tests that compare qkv's vision transformer and its explain with transformers."""

from __future__ import annotations

import torch
import transformers

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
            patch_size=4, num_labels=5)
LABELS = {str(i): name for i, name in enumerate(["zero", "one", "two", "three", "four"])}


def _random(model, seed: int = 0):
    """Every parameter redrawn (LayerNorm weights and biases in U(0.5, 1.5), so none hides behind ones
    and zeros; the rest N(0, 0.3)); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def build(folder, arch: str = "ViTForImageClassification", processor: dict | None = None, seed: int = 0, **changes):
    """A tiny random transformers `arch` saved in `folder` (with a preprocessor_config.json when
    `processor` gives ViTImageProcessor's arguments); returns the transformers model."""
    config = transformers.ViTConfig(**{**TINY, "id2label": LABELS, **changes})
    model = _random(getattr(transformers, arch)(config), seed)
    model.save_pretrained(folder)
    if processor is not None:
        transformers.ViTImageProcessor(**processor).save_pretrained(folder)
    return model

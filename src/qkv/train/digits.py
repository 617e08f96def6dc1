"""Handwritten digits: a small vision transformer reads 8x8 images of the digits 0-9.

The images are scikit-learn's `load_digits()` (1,797 8x8 grey images, values 0..16, from the
UCI "Optical Recognition of Handwritten Digits" set, Alpaydin & Kaynak 1998), shipped inside
scikit-learn, so nothing is downloaded. Values are scaled to [0, 1]. The split is fixed and
stratified: 36 images of each digit (360 in all) are held out, the first 36 of a permutation of
that digit's images drawn from torch.Generator().manual_seed(0); the other 1,437 train. No
training step ever sees a held-out image.

The model is qkv's own `ViTForImageClassification` (the Vision Transformer of Dosovitskiy et al.
2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"): the 8x8
image cut into 2x2 patches gives 16 patch tokens plus a class token, pre-norm encoder blocks
whose attention is `qkv.nn.MultiHeadAttention`, and a linear classifier on the class token. It
saves as an ordinary Hugging Face ViTForImageClassification folder (config.json,
model.safetensors, preprocessor_config.json), which transformers loads too.

1,437 images are few for a transformer, which has no convolution's bias towards local shapes:
each training batch is augmented by a random affine map per image (rotation up to 12 degrees,
scale 0.9-1.1, shift up to one pixel; bilinear, zeros outside), drawn from the step's own
generator, so a resumed run sees exactly the images an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._files import write_bytes, write_text
from ..models.images import Preprocessor, png_bytes
from ..models.vit import ViTConfig, ViTForImageClassification, hf_weights
from ._loop import Size, TrainingError, claim_folder, save_tensors, train_task

IMAGE = 8  # the images are IMAGE x IMAGE pixels
PATCH = 2  # 2x2 patches: (8 / 2)^2 = 16 patch tokens
PER_DIGIT = 36  # held out: 36 images of each digit, 360 in all
SPLIT_SEED = 0  # the seed of the held-out choice
LABELS = [str(d) for d in range(10)]
# the augmentation of a training image: rotation (degrees), scale (+-), shift (pixels)
ROTATE, SCALE, SHIFT = 12.0, 0.1, 1.0
LABEL_SMOOTHING = 0.1
# The saved folder's preprocessor_config.json: the identity on images in [0, 1]. qkv's Preprocessor
# (like transformers' ViTImageProcessor on a PIL image) starts from 0..255 samples, so rescaling by
# 1/255 gives the [0, 1] pixels the model was trained on; no resize (8x8 already), no normalisation
# (mean 0, std 1 written out all the same).
PREPROCESSOR = Preprocessor(do_resize=False, height=IMAGE, width=IMAGE, do_rescale=True, rescale_factor=1 / 255,
                            do_normalize=False, image_mean=(0.0,), image_std=(1.0,))
# "shipped": the bundled weights (qkv.load("digits")); "tiny": the test suite's run of the same code
SIZES = {"shipped": Size(width=64, layers=4, heads=4, ffn=128, steps=8000, batch=64, lr=2e-3),
         "tiny": Size(width=32, layers=1, heads=2, ffn=64, steps=300, batch=32, lr=1e-2)}
INSTALL = "pip install scikit-learn"


@functools.lru_cache(maxsize=1)
def _dataset() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TrainingError(f"the digits data set ships inside scikit-learn, which is not installed; run "
                            f"`{INSTALL}`") from None
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = torch.tensor(data.target, dtype=torch.long)  # (1797,) digits 0..9
    return images, labels


@functools.lru_cache(maxsize=1)
def _split() -> tuple[Tensor, Tensor]:
    """The fixed split: (train indices (1437,), held-out indices (360,)) into load_digits(),
    each ascending. The held-out set is `PER_DIGIT` images of each digit, the first of a seeded
    permutation (torch.Generator seed `SPLIT_SEED`) of that digit's images."""
    _, labels = _dataset()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    held = torch.zeros(labels.shape[0], dtype=torch.bool)  # (1797,)
    for digit in range(len(LABELS)):
        idx = (labels == digit).nonzero().flatten()  # (n_digit,) this digit's images
        held[idx[torch.randperm(idx.shape[0], generator=g)[:PER_DIGIT]]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def train_set() -> tuple[Tensor, Tensor]:
    """The 1,437 training images (1437, 8, 8) in [0, 1] and their digits (1437,)."""
    images, labels = _dataset()
    idx, _ = _split()
    return images[idx], labels[idx]


def held_out() -> tuple[Tensor, Tensor]:
    """The 360 held-out images (36 of each digit, never trained on): (360, 8, 8) in [0, 1], digits (360,)."""
    images, labels = _dataset()
    _, idx = _split()
    return images[idx], labels[idx]


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """A random affine map per image (rotation, scale, shift; `ROTATE`, `SCALE`, `SHIFT`).

    Args:
        images: (N, H, W) floats.
        generator: the step's generator (every draw comes from it).

    Returns:
        (N, H, W): the images resampled bilinearly, zeros where the map leaves the image.
    """
    n, h, w = images.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(ROTATE)  # (N,)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * SCALE  # (N,)
    # shifts in affine_grid's coordinates, where the image spans [-1, 1]: one pixel = 2 / size
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * SHIFT * 2 / torch.tensor([w, h])  # (N, 2) x, y
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # (N,)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], dim=1),
                         torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1)  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)  # (N, H, W, 2)
    out = F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # (N, 1, H, W)
    return out[:, 0]  # (N, H, W)


def model_config(size: Size = SIZES["shipped"]) -> ViTConfig:
    """The ViTConfig of `size`: 8x8 grey images (one channel), 2x2 patches, the ten digits as labels."""
    return ViTConfig(
        hidden_size=size.width, num_hidden_layers=size.layers, num_attention_heads=size.heads,
        intermediate_size=size.ffn, hidden_act="gelu", layer_norm_eps=1e-12, image_size=IMAGE,
        patch_size=PATCH, num_channels=1, qkv_bias=True, num_labels=len(LABELS),
        id2label={str(i): name for i, name in enumerate(LABELS)},
        label2id={name: i for i, name in enumerate(LABELS)},
    )


def build(size: Size) -> ViTForImageClassification:
    """A fresh model of `size` (its class token and position embeddings drawn as transformers
    draws them, truncated normal with std 0.02, by the model; `init_weights` then draws the
    linear layers and resets the norms), with the folder's identity preprocessor."""
    model = ViTForImageClassification(model_config(size))
    model.preprocessor = PREPROCESSOR
    return model


def step_loss(model: nn.Module, g: torch.Generator, batch: int) -> tuple[Tensor, float]:
    """The loss of one training step.

    Args:
        model: the ViTForImageClassification being trained (pixels (N, 1, 8, 8) -> logits (N, 10)).
        g: the step's generator: which `batch` training images (with replacement) and their augmentation.
        batch: images per step.

    Returns:
        (cross-entropy with label smoothing `LABEL_SMOOTHING`, a 0-dim tensor; the batch's accuracy in [0, 1]).
    """
    images, labels = train_set()
    idx = torch.randint(0, images.shape[0], (batch,), generator=g)  # (B,)
    x = augment(images[idx], g)  # (B, 8, 8)
    logits = model(x[:, None])  # (B, 1, 8, 8) -> (B, 10)
    loss = F.cross_entropy(logits, labels[idx], label_smoothing=LABEL_SMOOTHING)
    acc = (logits.argmax(-1) == labels[idx]).float().mean().item()
    return loss, acc


def train(out: Union[str, Path], **options) -> ViTForImageClassification:
    """Train the digits model and save it to `out` as a Hugging Face ViTForImageClassification
    folder, resuming from out/checkpoint.safetensors: `size` ("shipped", "tiny" or a `Size`),
    `seed`, `steps`, `batch`, `lr`, `progress`, `stop_after`, `checkpoint_every`, `history` as
    `qkv.train._loop.train_task` says. Returns the model (eval mode)."""
    train_set()  # scikit-learn missing: refused before the output folder is touched
    return cast(ViTForImageClassification, train_task("digits", out, SIZES, build, step_loss, save, **options))


def save(model: nn.Module, out: Path) -> None:
    """Write the digits model as a Hugging Face ViTForImageClassification folder `out`:
    config.json, model.safetensors and preprocessor_config.json (the marker .qkv-train first)."""
    out = Path(out)
    claim_folder(out, "digits")
    config = {**cast(ViTForImageClassification, model).config.to_hf(), "qkv_task": "digits"}
    save_tensors(out / "model.safetensors", hf_weights(model), {"format": "pt"})
    write_text(out / "config.json", json.dumps(config, indent=2) + "\n", what="the config.json")
    write_text(out / "preprocessor_config.json", json.dumps(PREPROCESSOR.to_hf(), indent=2) + "\n",
               what="the preprocessor_config.json")
    write_samples(out / "samples")


def write_samples(folder: Path) -> None:
    """samples/digit-0.png .. digit-9.png: the first held-out image of each digit (8x8 grey PNG, never
    trained on), which `qkv serve` offers and docs/images.md draws (qkv.inspect.image.samples)."""
    images, digits = held_out()  # (360, 8, 8), (360,)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(len(LABELS)):
        i = int((digits == d).nonzero()[0, 0])
        write_bytes(folder / f"digit-{d}.png", png_bytes(images[i][None]), what="a sample image")  # (1, 8, 8)


@torch.no_grad()
def accuracy(model: ViTForImageClassification, images: Tensor, labels: Tensor) -> float:
    """Fraction of `images` (N, 8, 8) in [0, 1] whose most likely label (`model.classify`) is `labels` (N,)."""
    probs = model.classify(images)  # (N, 10)
    predicted = torch.tensor([int(model.labels[i]) for i in probs.argmax(-1).tolist()])  # (N,)
    return (predicted == labels).float().mean().item()


METRIC = f"accuracy ({PER_DIGIT * len(LABELS)} images, {PER_DIGIT} per digit)"


def evaluate(model: ViTForImageClassification) -> float:
    """Held-out accuracy: the 360 held-out images (`held_out`), never trained on."""
    return accuracy(model, *held_out())

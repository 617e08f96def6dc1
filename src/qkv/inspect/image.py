"""Explain for images: a vision transformer's patches as the units of `qkv.explain`.

A ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"; `qkv.models.vit`) reads an image
as a class token followed by its P x P patches, row by row. Explain records its attention as it
does a sentence's, with one token per unit: the class token "[CLS]" (special, so `hide_special`
hides it and renormalises the patches' share) and the patches "r{row}c{col}" (a focus word like
"r3c4"; "cls" names the class token). Every analysis of `ExplainResult` then applies unchanged:
raw weights, attention rollout (Abnar & Zuidema, 2020; the class token's rollout row is the
usual "what the model looked at" picture of Dosovitskiy et al., fig. 6), value-norm, summaries,
the compact view and the step-through. `ImageInfo` keeps what the pictures need: the image as
the model saw it (resized, before normalisation), the patch grid and the prediction.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..models.images import ImageError, png_bytes

CLASS_TOKEN = "[CLS]"
CLASS_NAMES = ("cls", "[cls]", "class", "class token")  # focus words naming the class token
PREDICTIONS = 5  # classes kept in the result


@dataclass
class ImageInfo:
    """An explained image.

    name: the file name, or "image" for a tensor or PIL image; pixels: (C, H, W) float32 in [0, 1],
    the image at the model's size before rescaling and normalisation (what it saw); grid: (rows,
    columns) of patches; patch: P, the side of a patch in pixels; labels: the model's class names
    (empty for a ViTModel without a classifier); probabilities: (num_labels,) float32 softmax of the
    logits, or None without a classifier.
    """

    name: str
    pixels: Tensor
    grid: tuple[int, int]
    patch: int
    labels: list[str]
    probabilities: Optional[Tensor] = None

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def prediction(self, k: int = PREDICTIONS) -> list[dict]:
        """The k most probable classes, [{"label", "probability"}], most probable first ([] without a
        classifier)."""
        if self.probabilities is None:
            return []
        values, idx = self.probabilities.topk(max(1, min(k, self.probabilities.numel())))  # (k,)
        return [{"label": self.labels[i], "probability": round(float(v), 6)}
                for v, i in zip(values.tolist(), idx.tolist())]

    def to_dict(self, first_patch: int, class_token: Optional[int]) -> dict:
        """The JSON "image" block: first_patch is the label index of patch (0, 0) (patch (r, c) is
        first_patch + r * columns + c); class_token the class token's label index (None: hidden)."""
        C, H, W = self.pixels.shape
        return {"name": self.name, "grid": list(self.grid), "patch": self.patch, "size": [H, W], "channels": C,
                "pixels": png_data_url(self.pixels), "first_patch": first_patch, "class_token": class_token,
                "prediction": self.prediction()}


def is_image_model(model) -> bool:
    """Whether `model` is qkv's vision transformer (ViTModel or ViTForImageClassification)."""
    from ..models.vit import ViTConfig

    return isinstance(getattr(model, "config", None), ViTConfig)


def patch_labels(rows: int, columns: int) -> list[str]:
    """["r0c0", "r0c1", ..., f"r{rows-1}c{columns-1}"]: the patches row by row, as the model reads them."""
    return [f"r{r}c{c}" for r in range(rows) for c in range(columns)]


def read_image(image, model, name: str, interpolate: bool) -> tuple[Tensor, Tensor, str]:
    """One image -> (shown (1, C, H, W) in [0, 1] at the model's size, pixel values (1, C, H, W) the
    model reads, its name). Accepts what `model.classify` does, one image: a path, a PIL image, or a
    float tensor (H, W), (C, H, W) or (1, C, H, W) in [0, 1]."""
    from ..models.images import Preprocessor, resized

    config = model.config
    if isinstance(image, Tensor):
        if image.dim() == 2:
            image = image[None, None]  # (H, W) -> (1, 1, H, W)
        elif image.dim() == 3:
            image = image[None]  # (C, H, W) -> (1, C, H, W)
        if image.dim() != 4 or image.shape[0] != 1:
            raise ImageError(f"explain takes one image; got a tensor of shape {tuple(image.shape)} (pass one image "
                             f"(H, W), (C, H, W) or (1, C, H, W); explain each image of a batch in turn)")
        label = "image"
    elif isinstance(image, (list, tuple)):
        raise ImageError("explain takes one image, not a list; call it once per image")
    elif isinstance(image, (str, Path)):
        label = Path(image).name
    else:
        label = "image"
    pre = getattr(model, "preprocessor", None) or Preprocessor.identity(config)
    shown = resized(image, pre, config, interpolate=interpolate)  # (1, C, H, W)
    P = config.patch_size
    H, W = shown.shape[-2:]
    if H < P or W < P:
        raise ImageError(f"the image is {W}x{H} pixels, smaller than one {P}x{P} patch of {name!r}; "
                         f"pass a larger image")
    return shown, pre.normalise(shown), label


def attention_distance(result) -> Tensor:
    """(layers, heads) mean attention distance in pixels, as Dosovitskiy et al. (2021, fig. 7) measure
    it: for each query patch, the distance between patch centres weighted by its attention over the
    other patches (the class token's share left out, the patches' weights renormalised to 1), averaged
    over the query patches. Small: a local head; near the image's mean patch distance: a global one.
    result: an image `ExplainResult` with every row recorded (rows "auto" or "all")."""
    if getattr(result, "image", None) is None:
        raise ValueError("attention_distance is for image results (qkv.explain(image=...))")
    if result.rows is not None:
        raise ValueError("attention_distance needs every patch's row; explain with rows='auto' or 'all'")
    rows, cols = result.image.grid
    P = result.image.patch
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)  # (M,) patch rows
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)  # (M,) patch columns
    dist = torch.sqrt((r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2) * P  # (M, M) pixels
    out = []
    for rec in result.records:  # one layer at a time: (H, n, n) with n = 1 + M
        w = rec.weights()[0].double()[:, 1:, 1:]  # (H, M, M): patch queries over patch keys
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
        out.append((w * dist).sum(-1).mean(-1))  # (H,)
    return torch.stack(out).float()  # (layers, heads)


def samples(folder) -> list[Path]:
    """The sample images a model folder ships in its `samples/` folder (PNG files, sorted by name;
    [] when there are none). The bundled digits model ships one held-out image of each digit,
    samples/digit-0.png .. digit-9.png (8x8 grey, from scikit-learn's digits test split, never trained on)."""
    root = Path(folder) / "samples"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.suffix.lower() == ".png" and p.is_file() and not p.name.startswith("."))


def png_data_url(pixels: Tensor) -> str:
    """(C, H, W) in [0, 1] (C = 1 or 3) -> "data:image/png;base64,..." (an 8-bit grey or RGB PNG written
    with zlib by `qkv.models.images.png_bytes`, so the HTML page needs no imaging library and loads nothing)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")

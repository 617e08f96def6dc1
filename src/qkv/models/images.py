"""Image input for the vision transformer (vit.py; Dosovitskiy et al. 2021, "An Image is Worth
16x16 Words"): what `classify` accepts, how it becomes the model's pixel values, and what it refuses.

Accepted, each giving float pixels (C, H, W) in [0, 1]:

- a float tensor (N, H, W) (one channel) or (N, C, H, W), values in [0, 1]. A 3-D tensor is
  always a batch of grayscale images, never one (C, H, W) image; a 2-D one is refused (pass
  x[None]). Tensors are taken as they are: their channel count must be the model's.
- a PIL image, or a path to an image file Pillow reads (PNG, JPEG, BMP, GIF, ...), 8 bits per
  sample. A file is turned upright as its EXIF Orientation tag says (`upright`, as
  transformers' `load_image` does); a PIL image is taken as it is. Decoded as the model reads
  them: a grayscale image for an RGB model is repeated over the three channels (as PIL's
  convert("RGB") and transformers' processors do, nothing is lost); a colour image for a
  grayscale model is refused (which grey is the user's choice: Image.open(p).convert("L")). A
  palette image (every GIF) whose palette is all greys is read as grayscale. A fully opaque
  alpha channel is dropped; one with any transparency is refused (flatten it onto the
  background you mean). 16-bit images are refused (a 16-bit colour PNG Pillow itself opens as
  8-bit RGB).
- a list of those, all the same size after preprocessing.

Then the folder's `Preprocessor` (preprocessor_config.json, transformers' ViTImageProcessor
fields) resizes (bilinear with antialiasing, as PIL's resample=2 does; close to but not bit-equal
with transformers' uint8 path), rescales and normalises; other processors' steps (center crop,
another resample, shortest-edge sizes) are refused by name. Without that file the preprocessor is
the identity (qkv's own digits ships one that says so): pixels in [0, 1], no resizing, so an
image of another size than the model's is refused with one line.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import read_json
from .fields import POSITIVE, Fields

PILLOW_INSTALL = "pip install 'qkv[viz]'"  # matplotlib brings Pillow


class ImageError(ValueError):
    """An image qkv cannot use as it is; the message names it, what is wrong and the fix."""


@dataclass(frozen=True)
class Preprocessor:
    """What transformers' ViTImageProcessor does to an image, in qkv's terms.

    Args:
        do_resize: resize to (height, width) (bilinear, antialiased).
        height, width: the size the model takes (config.image_size for qkv's models).
        do_rescale: multiply 0..255 samples by rescale_factor (1/255 gives [0, 1]); False feeds
            0..255 values on, as transformers does.
        rescale_factor: see do_rescale.
        do_normalize: (x - image_mean) / image_std per channel.
        image_mean, image_std: per channel (C,) lists.
    """

    do_resize: bool = False
    height: int = 224
    width: int = 224
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def identity(cls, config) -> "Preprocessor":
        """qkv's own models: pixels in [0, 1] as they are, the model's size, no normalisation."""
        C = config.num_channels
        return cls(do_resize=False, height=config.image_size, width=config.image_size, image_mean=(0.0,) * C,
                   image_std=(1.0,) * C)

    @classmethod
    def from_folder(cls, folder: Path, config) -> "Preprocessor":
        """preprocessor_config.json of `folder`, typed; `identity` when there is none."""
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return cls.identity(config)
        return cls.from_dict(read_json(path), config, path)

    @classmethod
    def from_dict(cls, data: dict, config, source: Any = "preprocessor_config.json") -> "Preprocessor":
        """A preprocessor_config.json dict (ViTImageProcessor's fields) checked against `config`
        (its num_channels); anything wrong is a ModelError naming the file and field."""
        f = Fields(data, source)
        # what ViTImageProcessor does and qkv does too; other processors' steps are refused by name
        if f.get("do_center_crop", bool, False):
            raise f.unsupported("do_center_crop", "qkv resizes to the model's size without cropping "
                                "(ViTImageProcessor's steps: resize, rescale, normalize)")
        resample = f.get("resample", Any, 2)
        if resample not in (2, None):
            raise f.unsupported("resample", "qkv resizes bilinearly (resample 2, ViTImageProcessor's default)")
        size = f.get("size", Any, None)
        height = width = config.image_size
        if isinstance(size, dict):
            s = f.sub("size")
            assert s is not None
            if "height" in s or "width" in s:
                height, width = s.get("height", int, limit=POSITIVE), s.get("width", int, limit=POSITIVE)
            else:
                raise f.unsupported("size", "qkv resizes to {\"height\": H, \"width\": W}")
        elif isinstance(size, int) and not isinstance(size, bool):
            height = width = f.get("size", int, limit=POSITIVE)
        elif size is not None:
            raise f.unsupported("size", "it must be an integer or {\"height\": H, \"width\": W}")
        C = config.num_channels
        kw: dict[str, Any] = dict(
            do_resize=f.get("do_resize", bool, True), height=height, width=width,
            do_rescale=f.get("do_rescale", bool, True), rescale_factor=f.get("rescale_factor", float, 1 / 255),
            do_normalize=f.get("do_normalize", bool, True))
        for name, default in (("image_mean", 0.5), ("image_std", 0.5)):
            v = f.get(name, Any, [default] * C)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = [v] * C
            values = f.check(name, v, list[float])
            if len(values) != C and kw["do_normalize"]:
                raise f.unsupported(name, f"it must have one number per channel (num_channels={C} in config.json)")
            if name == "image_std" and any(x == 0 for x in values):
                raise f.unsupported(name, "a standard deviation of 0 would divide by zero")
            kw[name] = tuple(float(x) for x in values)
        return cls(**kw)

    def to_hf(self) -> dict:
        """A preprocessor_config.json dict transformers' ViTImageProcessor reads."""
        return {"image_processor_type": "ViTImageProcessor", "do_resize": self.do_resize,
                "size": {"height": self.height, "width": self.width}, "resample": 2,
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std)}

    def __call__(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) float in [0, 1] -> the model's pixel values (N, C, height, width) when
        resizing, else (N, C, H, W)."""
        return self.normalise(self.resize(x))

    def resize(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) float in [0, 1] -> (N, C, height, width) in [0, 1] when resizing, else x:
        the image as the model sees it, before rescaling and normalisation (what explain draws)."""
        if self.do_resize and tuple(x.shape[-2:]) != (self.height, self.width):
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False,
                              antialias=True).clamp(0, 1)  # (N, C, height, width)
        return x

    def normalise(self, x: Tensor) -> Tensor:
        """x (N, C, h, w) in [0, 1], already resized -> the model's pixel values (same shape)."""
        x = x * 255.0  # the 0..255 samples transformers' processors start from
        if self.do_rescale:
            x = x * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)  # (1, C, 1, 1)
            std = torch.tensor(self.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)  # (1, C, 1, 1)
            x = (x - mean) / std
        return x


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(f"reading images needs Pillow, which qkv's viz extra brings: {PILLOW_INSTALL}") from None
    return Image


def _is_pil(x) -> bool:
    cls = type(x)
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in cls.__mro__)


def open_image(path) -> Any:
    """A path -> its PIL image, loaded; one ImageError line for a file Pillow cannot read."""
    Image = _pil()
    if not str(path).strip():
        raise ImageError("the image path is empty; pass the path of an image file (PNG, JPEG, ...)")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist; pass the path of an image file (PNG, JPEG, ...)")
    if p.is_dir():
        raise ImageError(f"{str(p)!r} is a folder; pass the path of an image file (PNG, JPEG, ...)")
    try:
        img = Image.open(p)
        img.load()
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ... per format
        why = "is not an image Pillow can read" if isinstance(exc, Image.UnidentifiedImageError) \
            else f"could not be decoded ({str(exc).strip() or type(exc).__name__})"
        raise ImageError(f"{str(p)!r} {why}; pass a PNG, JPEG, BMP or GIF file") from None
    return upright(img)


def upright(img) -> Any:
    """A PIL image turned as its EXIF Orientation tag says (a phone's photo stored on its side), as
    transformers' `load_image` and image viewers show it; the image itself when the tag is absent or 1."""
    try:
        orientation = img.getexif().get(0x0112, 1)  # 0x0112: EXIF Orientation
    except Exception:  # an unreadable EXIF block: the image as stored
        return img
    if orientation in (None, 1):
        return img
    from PIL import ImageOps

    return ImageOps.exif_transpose(img)


def _grey(img) -> bool:
    """Whether an RGB or RGBA image's three colour bands are equal everywhere (a grey image)."""
    r, g, b = (img.getchannel(band).tobytes() for band in "RGB")
    return r == g == b


def pil_to_tensor(img, channels: int, name: str = "the image") -> Tensor:
    """A PIL image -> (C, H, W) float32 in [0, 1] with `channels` channels, or one ImageError line
    (16-bit samples, transparency, a colour image for a grayscale model, an unusual mode)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        raise ImageError(f"{name} has {'16-bit' if mode.startswith('I;16') else '32-bit'} samples (PIL mode "
                         f"{mode}); qkv reads 8-bit images: save it with 8 bits per sample "
                         f"(e.g. Image.open(p).point(lambda v: v / 256).convert('L'))")
    if mode in ("P", "PA"):  # a palette: its transparency, if any, becomes an alpha channel
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        mode = img.mode
        if _grey(img):  # a grey palette (every GIF is a palette image): grey it stays
            img = img.convert("LA" if mode == "RGBA" else "L")
            mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = img.getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise ImageError(f"{name} has transparent pixels (an alpha channel, PIL mode {mode}); qkv does not guess "
                             f"the background: flatten it first (e.g. Image.alpha_composite onto a white or black "
                             f"image, then .convert('RGB'))")
        img = img.convert("RGB" if mode.startswith("RGB") else "L")  # fully opaque: the alpha says nothing
        mode = img.mode
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img, mode = img.convert("RGB"), "RGB"
    if mode not in ("L", "RGB"):
        raise ImageError(f"{name} has PIL mode {mode}, which qkv does not read; convert it to 'RGB' or 'L'")
    if channels == 3 and mode == "L":
        img = img.convert("RGB")  # grayscale to an RGB model: the grey repeated, nothing lost
    elif channels == 1 and mode == "RGB":
        raise ImageError(f"{name} is a colour (RGB) image but this model reads grayscale images (num_channels=1); "
                         f"convert it to the grey you mean first (e.g. Image.open(p).convert('L'))")
    elif channels not in (1, 3):
        raise ImageError(f"this model reads {channels}-channel images; image files give 1 (grayscale) or 3 (RGB); "
                         f"pass a (N, {channels}, H, W) tensor instead")
    W, H = img.size
    C = len(img.getbands())
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)  # (H * W * C,)
    return data.view(H, W, C).permute(2, 0, 1).float() / 255.0  # (H, W, C) -> (C, H, W)


def _tensor_batch(x: Tensor, channels: int) -> Tensor:
    """A tensor (N, H, W) or (N, C, H, W) in [0, 1] -> (N, C, H, W) float32, checked."""
    if not x.is_floating_point():
        raise ImageError(f"an image tensor must be floating point with values in [0, 1]; got {x.dtype} "
                         f"(for 0..255 integers pass x.float() / 255)")
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    elif x.dim() != 4:
        raise ImageError(f"an image tensor must be (N, H, W) or (N, C, H, W); got shape {tuple(x.shape)} "
                         f"(one image (H, W): pass x[None])")
    if x.shape[1] != channels:
        fix = "pass x.expand(-1, 3, -1, -1) to repeat the grey" if x.shape[1] == 1 and channels == 3 \
            else f"pass {channels}-channel images"
        raise ImageError(f"the image tensor has {x.shape[1]} channel(s) (shape {tuple(x.shape)}) but this model reads "
                         f"{channels} (num_channels={channels}); {fix}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ImageError("the image tensor holds NaN or infinite values; pixels must be finite, in [0, 1]")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            fix = "divide by 255" if lo >= 0 and hi <= 255 else "rescale it to [0, 1]"
            raise ImageError(f"image values must be in [0, 1]; this tensor holds values from {lo:g} to {hi:g}; {fix}")
    return x.float()


def to_pixels(images, pre: Preprocessor, config, *, interpolate: bool = False) -> Tensor:
    """What `classify` takes -> the model's pixel values (N, C, H, W), preprocessed."""
    return pre.normalise(resized(images, pre, config, interpolate=interpolate))


def resized(images, pre: Preprocessor, config, *, interpolate: bool = False) -> Tensor:
    """What `classify` takes -> (N, C, H, W) in [0, 1] at the model's size: the preprocessor's
    resize alone (`to_pixels` then rescales and normalises).

    Args:
        images: see the module docstring (a tensor, a PIL image, a path, or a list of those).
        pre: the model's Preprocessor.
        config: the model's ViTConfig (num_channels, image_size).
        interpolate: the model will resample its positions, so another size is not refused.
    """
    C = config.num_channels
    items: Sequence = images if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ImageError("no images given; pass a tensor, a PIL image, a path, or a non-empty list of those")
    batches = []
    for i, item in enumerate(items):
        name = f"image {i}" if len(items) > 1 else "the image"
        if isinstance(item, Tensor):
            batch = _tensor_batch(item, C)
        elif isinstance(item, (str, Path)):
            img = open_image(item)
            name = repr(str(item))  # a file is named by its path in every message
            batch = pil_to_tensor(img, C, name)[None]  # (1, C, H, W)
        elif _is_pil(item):
            batch = pil_to_tensor(item, C, name)[None]  # (1, C, H, W)
        else:
            raise ImageError(f"{name} is a {type(item).__name__}; pass a float tensor (N, H, W) or (N, C, H, W) in "
                             f"[0, 1], a PIL image or the path of an image file")
        batch = pre.resize(batch)  # (n, C, h, w)
        size = tuple(batch.shape[-2:])
        if not interpolate and size != (config.image_size, config.image_size):
            # width x height, as image viewers say it
            what = f"{name} is {size[1]}x{size[0]} pixels" + (" after resizing" if pre.do_resize else "")
            raise ImageError(f"{what} but this model takes {config.image_size}x{config.image_size}; resize it "
                             f"first (this model's preprocessor does not), or pass interpolate_pos_encoding=True")
        batches.append(batch)
    sizes = {tuple(b.shape[-2:]) for b in batches}
    if len(sizes) > 1:
        raise ImageError(f"the images have different sizes {sorted(sizes)}; classify them one call each or resize")
    return torch.cat(batches)  # (N, C, H, W)


def png_bytes(pixels: Tensor) -> bytes:
    """(C, H, W) float in [0, 1], C = 1 (grey) or 3 (RGB) -> the bytes of an 8-bit PNG file (one IDAT
    chunk, filter 0 on every row; written with zlib, so no imaging library is needed)."""
    C, H, W = pixels.shape
    if C not in (1, 3):
        raise ValueError(f"a PNG of {C} channels; pass 1 (grey) or 3 (RGB)")
    data = (pixels.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)  # (H, W, C)
    raw = b"".join(b"\x00" + data[y].contiguous().numpy().tobytes() for y in range(H))  # filter byte 0, then a row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", W, H, 8, 0 if C == 1 else 2, 0, 0, 0)  # 8 bits, grey or RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


__all__ = ["ImageError", "Preprocessor", "png_bytes", "resized", "to_pixels", "open_image", "pil_to_tensor",
           "upright", "PILLOW_INSTALL"]

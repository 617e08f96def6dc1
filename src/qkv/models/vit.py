"""Vision transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for
Image Recognition at Scale"), loading Hugging Face `ViTModel` and `ViTForImageClassification`
folders.

An image (N, C, H, W) is cut into P x P patches; each patch becomes a token through one strided
convolution (kernel = stride = P, the linear projection of flattened patches); a learned class
token goes first and learned positions are added. Pre-norm blocks follow: x = x + Attn(LN(x));
x = x + MLP(LN(x)), then a final LayerNorm. The classifier reads the class token.

Module names are Hugging Face's (`embeddings.patch_embeddings.projection`, `encoder.layer.{i}.
layernorm_before`, ...) except the attention projections, which are one fused `qkv_proj` in
`attention.attention` (a `qkv.nn.MultiHeadAttention`, so `qkv.inspect`'s Recorder sees it) plus
its `out_proj`; `hf_plan` is the one pure function that maps checkpoint names onto them, and
`hf_weights` the inverse (a qkv model -> the tensors of a Hugging Face checkpoint).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MultiHeadAttention
from .checkpoint import Dim, ModelError, Piece, Plan
from .common import ACTIVATION, Family, activation
from .fields import EPS, POSITIVE, PROBABILITY, Fields, HFConfig, check_divisible, read_dataclass

if TYPE_CHECKING:
    from .images import Preprocessor


@dataclass(frozen=True)
class ViTConfig(HFConfig):
    hidden_size: int = 768  # E
    num_hidden_layers: int = 12  # encoder blocks
    num_attention_heads: int = 12  # heads, D = hidden_size / heads
    intermediate_size: int = 3072  # MLP inner size
    hidden_act: str = "gelu"  # MLP activation (transformers' names)
    hidden_dropout_prob: float = 0.0  # training mode only
    attention_probs_dropout_prob: float = 0.0  # training mode only
    layer_norm_eps: float = 1e-12  # LayerNorm eps
    image_size: int = 224  # the side of the square image the positions were learned for
    patch_size: int = 16  # P: the side of a square patch
    num_channels: int = 3  # C: 3 for RGB, 1 for grayscale
    qkv_bias: bool = True  # bias on the query/key/value projections
    pooler_act: str = "tanh"  # ViTModel's pooler activation
    pooler_output_size: Optional[int] = None  # ViTModel's pooler width (None = hidden_size)
    add_pooling_layer: bool = False  # ViTModel's pooler; set from the checkpoint's keys
    num_labels: int = 2  # classes of ViTForImageClassification
    id2label: dict[str, str] = field(default_factory=dict)  # "0" -> "cat"; empty = LABEL_i
    label2id: dict[str, int] = field(default_factory=dict)  # "cat" -> 0

    LIMITS = {  # config.json ranges; a field not listed has no range beyond its type
        "hidden_size": POSITIVE, "num_hidden_layers": POSITIVE, "num_attention_heads": POSITIVE,
        "intermediate_size": POSITIVE, "hidden_act": ACTIVATION, "hidden_dropout_prob": PROBABILITY,
        "attention_probs_dropout_prob": PROBABILITY, "layer_norm_eps": EPS, "image_size": POSITIVE,
        "patch_size": POSITIVE, "num_channels": POSITIVE, "pooler_act": ACTIVATION, "pooler_output_size": POSITIVE,
    }

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        for name in ("image_size", "patch_size"):
            if isinstance(f.data.get(name), list):
                raise f.unsupported(name, "qkv's ViT takes square images and patches (one integer); "
                                    "use a checkpoint with a single image_size and patch_size")
        kw = read_dataclass(cls, f, limits=cls.LIMITS, skip=("id2label", "label2id", "num_labels",
                                                              "add_pooling_layer"))
        id2label = f.get("id2label", Optional[dict], None) or {}
        for k, v in id2label.items():
            if not (isinstance(k, str) and k.isdigit() and isinstance(v, str)):
                raise f.unsupported("id2label", "it must map class indices (\"0\", \"1\", ...) to label strings")
        num_labels = f.get("num_labels", Optional[int], None, POSITIVE)
        if num_labels is None:
            num_labels = len(id2label) if id2label else cls.num_labels
        if id2label and sorted(int(k) for k in id2label) != list(range(num_labels)):
            raise f.unsupported("id2label", f"it must name each class 0 to {num_labels - 1} once "
                                f"(num_labels={num_labels})")
        kw.update(num_labels=num_labels, id2label={str(k): v for k, v in id2label.items()},
                  label2id={v: int(k) for k, v in id2label.items()})
        return kw

    def check(self, source) -> None:
        check_divisible(source, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        if self.image_size % self.patch_size:
            raise ModelError(f"{source}: image_size={self.image_size} is not divisible by patch_size="
                             f"{self.patch_size}; correct one of them (the patch grid is their quotient)")

    @property
    def grid(self) -> int:
        """Patches per side: image_size // patch_size."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def labels(self) -> list[str]:
        """The class names, index order (transformers' LABEL_i where config.json names none)."""
        return [self.id2label.get(str(i), f"LABEL_{i}") for i in range(self.num_labels)]

    def to_hf(self, architecture: str = "ViTForImageClassification") -> dict:
        """A config.json dict that transformers' ViTConfig reads (architectures, model_type "vit")."""
        d: dict[str, Any] = {k: v for k, v in dataclasses.asdict(self).items() if k != "add_pooling_layer"}
        d["pooler_output_size"] = self.pooler_output_size or self.hidden_size
        labels = self.labels
        d["id2label"] = {str(i): name for i, name in enumerate(labels)}
        d["label2id"] = {name: i for i, name in enumerate(labels)}
        return {"architectures": [architecture], "model_type": "vit", **d}


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.patch_size = c.patch_size
        self.projection = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (N, C, H, W) -> patch tokens (N, (H/P) * (W/P), E), row by row."""
        x = self.projection(pixel_values)  # (N, E, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (N, E, H/P * W/P) -> (N, H/P * W/P, E)


class ViTEmbeddings(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.config = c
        # transformers' initialisation (truncated normal, std 0.02), for models trained from scratch
        self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, c.hidden_size), std=0.02))  # (1, 1, E)
        self.patch_embeddings = ViTPatchEmbeddings(c)
        self.position_embeddings = nn.Parameter(  # (1, 1 + M, E)
            nn.init.trunc_normal_(torch.empty(1, c.num_patches + 1, c.hidden_size), std=0.02))
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def positions(self, height: int, width: int, interpolate: bool) -> Tensor:
        """The position embeddings for an image of height x width -> (1, 1 + h * w, E), h = height // P.

        The learned grid unchanged for the trained size; otherwise, with `interpolate`, resampled
        bicubically to the new grid as transformers' `interpolate_pos_encoding=True` does (DINO's way);
        without it, a ValueError."""
        c = self.config
        pos = self.position_embeddings  # (1, 1 + g*g, E)
        if height == c.image_size and width == c.image_size:
            return pos
        if not interpolate:
            raise ValueError(
                f"the image is {width}x{height} pixels (width x height) but this model was trained on "
                f"{c.image_size}x{c.image_size}; "
                f"resize it (model.classify resizes when the folder's preprocessor_config.json says do_resize), or "
                f"pass interpolate_pos_encoding=True to resample the position embeddings")
        if height < c.patch_size or width < c.patch_size:
            raise ValueError(f"the image is {width}x{height} pixels, smaller than one {c.patch_size}x{c.patch_size} "
                             f"patch; enlarge it")
        E, g = pos.shape[-1], c.grid
        grid = pos[:, 1:].reshape(1, g, g, E).permute(0, 3, 1, 2)  # (1, g*g, E) -> (1, g, g, E) -> (1, E, g, g)
        grid = F.interpolate(grid, size=(height // c.patch_size, width // c.patch_size), mode="bicubic",
                             align_corners=False)  # (1, E, h, w)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, E)  # (1, h, w, E) -> (1, h*w, E)
        return torch.cat([pos[:, :1], grid], dim=1)  # (1, 1 + h*w, E)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """pixel_values (N, C, H, W) -> tokens (N, 1 + (H/P) * (W/P), E): class token first."""
        N, _, H, W = pixel_values.shape
        if N == 0:
            raise ValueError("the batch is empty: pass at least one image")
        pos = self.positions(H, W, interpolate_pos_encoding)  # (1, 1 + M, E); checks the size first
        patches = self.patch_embeddings(pixel_values)  # (N, M, E)
        cls = self.cls_token.expand(N, -1, -1)  # (N, 1, E)
        x = torch.cat([cls, patches], dim=1)  # (N, 1 + M, E)
        return self.dropout(x + pos)


class ViTAttentionOutput(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.dropout = nn.Dropout(c.hidden_dropout_prob)


class ViTAttention(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        # HF's attention.attention.{query,key,value} (fused here) and attention.output.dense (out_proj).
        self.attention = MultiHeadAttention(c.hidden_size, c.num_attention_heads, bias=c.qkv_bias, out_bias=True,
                                            dropout=c.attention_probs_dropout_prob)
        self.output = ViTAttentionOutput(c)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, L, E) -> (N, L, E): bidirectional, every token sees every token."""
        return self.output.dropout(self.attention(x))


class ViTDense(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)


class ViTLayer(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = ViTAttention(c)
        self.layernorm_after = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.intermediate = ViTDense(c.hidden_size, c.intermediate_size)
        self.output = ViTDense(c.intermediate_size, c.hidden_size)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self._act = activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, L, E) -> (N, L, E), pre-norm."""
        x = x + self.attention(self.layernorm_before(x))  # (N, L, E)
        h = self.output.dense(self._act(self.intermediate.dense(self.layernorm_after(x))))  # (N, L, E)
        return x + self.dropout(h)


class ViTEncoder(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(c) for _ in range(c.num_hidden_layers))


class ViTModel(nn.Module):
    """The ViT encoder: `forward(pixel_values)` gives the last hidden states after the final
    LayerNorm, the class token first. With a checkpoint's pooler (`add_pooling_layer`),
    `pooler_output` gives ViTModel's pooled class token.

    Attributes set by `qkv.load`: `preprocessor` (images.Preprocessor, from preprocessor_config.json).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTDense(config.hidden_size, config.pooler_output_size or config.hidden_size) \
            if config.add_pooling_layer else None
        self.preprocessor: Optional["Preprocessor"] = None

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder blocks, in order."""
        return self.encoder.layer

    @property
    def device(self) -> torch.device:
        return self.embeddings.cls_token.device

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """Last hidden states.

        Args:
            pixel_values: (N, C, H, W) float, already preprocessed (resized and normalised as
                the model was trained); H = W = config.image_size unless `interpolate_pos_encoding`.
            interpolate_pos_encoding: resample the position embeddings to another image size, as
                transformers does (H and W multiples of patch_size are used whole; the rest is cut).

        Returns:
            (N, 1 + (H/P) * (W/P), E): the class token, then the patches row by row.
        """
        check_pixels(pixel_values, self.config)
        x = self.embeddings(pixel_values.to(self.embeddings.cls_token.dtype), interpolate_pos_encoding)
        for layer in self.encoder.layer:
            x = layer(x)  # (N, L, E)
        return self.layernorm(x)

    def pooler_output(self, hidden: Tensor) -> Tensor:
        """ViTModel's pooler: act(dense(hidden[:, 0])). hidden (N, L, E) -> (N, pooler_output_size)."""
        if self.pooler is None:
            raise ModelError("this checkpoint has no pooler weights (pooler.dense); use hidden[:, 0]")
        return activation(self.config.pooler_act)(self.pooler.dense(hidden[:, 0]))


def check_pixels(pixel_values: Tensor, c: ViTConfig) -> None:
    """pixel_values must be a floating (N, C, H, W) tensor with the model's C; else one ValueError line."""
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor (N, C, H, W); got {type(pixel_values).__name__}; "
                        f"for images, files or PIL images use model.classify")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != c.num_channels:
        raise ValueError(f"pixel_values must be (N, {c.num_channels}, H, W) for this model "
                         f"(num_channels={c.num_channels}); got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be floating point (preprocessed); got {pixel_values.dtype}")


class ViTForImageClassification(nn.Module):
    """A ViT (`vit`) with a linear `classifier` on the class token after the final LayerNorm.

    `forward(pixel_values) -> logits (N, num_labels)`; `classify(images) -> probabilities`;
    `labels` the class names. Attributes set by `qkv.load`: `preprocessor`.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.vit = ViTModel(replace(config, add_pooling_layer=False))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @property
    def preprocessor(self) -> Optional["Preprocessor"]:
        return self.vit.preprocessor

    @preprocessor.setter
    def preprocessor(self, value: Optional["Preprocessor"]) -> None:
        self.vit.preprocessor = value

    @property
    def labels(self) -> list[str]:
        """The class names in index order (config.json's id2label; LABEL_i where it names none)."""
        return self.config.labels

    @property
    def layers(self) -> nn.ModuleList:
        return self.vit.layers

    @property
    def device(self) -> torch.device:
        return self.vit.device

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """pixel_values (N, C, H, W) float, preprocessed -> logits (N, num_labels) (see ViTModel.forward)."""
        hidden = self.vit(pixel_values, interpolate_pos_encoding)  # (N, L, E)
        return self.classifier(hidden[:, 0])  # (N, num_labels)

    @torch.inference_mode()
    def classify(self, images, *, interpolate_pos_encoding: bool = False) -> Tensor:
        """Class probabilities of images.

        Args:
            images: a float tensor (N, H, W) or (N, C, H, W) with values in [0, 1], a PIL image, a
                path (PNG, JPEG, ... through Pillow), or a list of those (images.py says what is
                accepted and refused). Each is resized and normalised by `preprocessor`.
            interpolate_pos_encoding: run images of another size than the model's on resampled
                position embeddings instead of refusing them (when the preprocessor does not resize).

        Returns:
            (N, num_labels) float32 probabilities (softmax of the logits), rows in input order.
        """
        from .images import Preprocessor, to_pixels

        pre = self.preprocessor or Preprocessor.identity(self.config)
        pixels = to_pixels(images, pre, self.config, interpolate=interpolate_pos_encoding)  # (N, C, H, W)
        logits = self(pixels.to(self.device), interpolate_pos_encoding)  # (N, num_labels)
        return logits.float().softmax(-1).cpu()

    def top(self, images, k: int = 5, **kw) -> list[list[tuple[str, float]]]:
        """The k most probable classes of each image: [[(label, probability), ...], ...]."""
        probs = self.classify(images, **kw)  # (N, num_labels)
        k = max(1, min(k, probs.shape[1]))
        values, idx = probs.topk(k, dim=-1)  # (N, k)
        names = self.labels
        return [[(names[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, idx)]


def hf_plan(c: ViTConfig, prefix: str = "", head: bool = False) -> Plan:
    """Checkpoint names of a Hugging Face ViTModel (`prefix` "") or ViTForImageClassification
    (`prefix` "vit.", `head` True) -> qkv parameter names (pure).

    query/key/value are concatenated into `attention.attention.qkv_proj`; `attention.output.dense`
    becomes `attention.attention.out_proj`. Everything else keeps its name.
    """
    E, FF = Dim(c.hidden_size, "hidden_size"), Dim(c.intermediate_size, "intermediate_size")
    C, P = Dim(c.num_channels, "num_channels"), Dim(c.patch_size, "patch_size")
    ours = prefix  # qkv's module tree matches HF's: the classifier's encoder is `vit.` in both
    plan: dict[str, tuple[Piece, ...]] = {}

    def same(name: str, shape: tuple) -> None:
        plan[ours + name] = (Piece(prefix + name, shape),)

    same("embeddings.cls_token", (1, 1, E))
    same("embeddings.position_embeddings", (1, c.num_patches + 1, E))
    same("embeddings.patch_embeddings.projection.weight", (E, C, P, P))
    same("embeddings.patch_embeddings.projection.bias", (E,))
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        kinds = ("weight", "bias") if c.qkv_bias else ("weight",)
        for kind in kinds:
            shape = (E, E) if kind == "weight" else (E,)
            plan[ours + p + f"attention.attention.qkv_proj.{kind}"] = tuple(
                Piece(prefix + p + f"attention.attention.{n}.{kind}", shape) for n in ("query", "key", "value"))
        for kind, shape in (("weight", (E, E)), ("bias", (E,))):
            plan[ours + p + f"attention.attention.out_proj.{kind}"] = (
                Piece(prefix + p + f"attention.output.dense.{kind}", shape),)
            same(p + f"layernorm_before.{kind}", (E,))
            same(p + f"layernorm_after.{kind}", (E,))
        same(p + "intermediate.dense.weight", (FF, E))
        same(p + "intermediate.dense.bias", (FF,))
        same(p + "output.dense.weight", (E, FF))
        same(p + "output.dense.bias", (E,))
    same("layernorm.weight", (E,))
    same("layernorm.bias", (E,))
    if c.add_pooling_layer and not head:
        out = Dim(c.pooler_output_size or c.hidden_size, "pooler_output_size")
        same("pooler.dense.weight", (out, E))
        same("pooler.dense.bias", (out,))
    if head:
        plan["classifier.weight"] = (Piece("classifier.weight", (Dim(c.num_labels, "num_labels"), E)),)
        plan["classifier.bias"] = (Piece("classifier.bias", (Dim(c.num_labels, "num_labels"),)),)
    return plan


def hf_weights(model: nn.Module) -> dict[str, Tensor]:
    """The inverse of loading: a qkv ViTModel or ViTForImageClassification -> the tensors of the
    Hugging Face checkpoint (key -> tensor, detached), ready for safetensors."""
    head = isinstance(model, ViTForImageClassification)
    plan = _plan(model.config, head)
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for name, pieces in plan.items():
        value = params[name].detach()
        parts = value.split([p.shape[0] for p in pieces], dim=0) if len(pieces) > 1 else (value,)
        for piece, part in zip(pieces, parts):
            out[piece.key] = part.contiguous()
    return out


def _plan(c: ViTConfig, head: bool = False) -> Plan:
    return hf_plan(c, "vit.", head=True) if head else hf_plan(c)


def hf_layers(c: ViTConfig, head: bool = False) -> list[tuple[str, int, str]]:
    """(config field, layer count, checkpoint key prefix of each layer)."""
    return [("num_hidden_layers", c.num_hidden_layers, ("vit." if head else "") + "encoder.layer.")]


def hf_ignored(c: ViTConfig, head: bool = False) -> dict:
    """Checkpoint keys that are not used: a ViTForImageClassification checkpoint may carry the
    pooler of the ViTModel it was fine-tuned from (transformers loads it and ignores them too)."""
    if not head:
        return {}
    width = c.pooler_output_size or c.hidden_size
    return {"vit.pooler.dense.weight": (width, c.hidden_size), "vit.pooler.dense.bias": (width,)}


def _adapt_model(c: ViTConfig, keys) -> tuple[ViTConfig, tuple]:
    """A ViTModel checkpoint with `pooler.*` weights has ViTModel's pooler."""
    return replace(c, add_pooling_layer=any(k.startswith("pooler.") for k in keys)), (False,)


def _adapt_head(c: ViTConfig, keys) -> tuple[ViTConfig, tuple]:
    return replace(c, add_pooling_layer=False), (True,)


def preprocessor_extras(folder: Path, c: ViTConfig) -> dict:
    """`extras` of a ViT folder: its preprocessor_config.json as a Preprocessor (identity without one)."""
    from .images import Preprocessor

    return {"preprocessor": Preprocessor.from_folder(folder, c)}


FAMILIES = (
    Family(architectures=("ViTModel",), model_type="vit", config=ViTConfig, model=ViTModel, plan=_plan,
           layers=hf_layers, ignored=hf_ignored, adapt=_adapt_model, extras=preprocessor_extras),
    Family(architectures=("ViTForImageClassification",), model_type=None, config=ViTConfig,
           model=ViTForImageClassification, plan=_plan, layers=hf_layers, ignored=hf_ignored,
           adapt=_adapt_head, extras=preprocessor_extras),
)

"""The "qkv.explain/1" JSON format, defined once as pydantic models.

`ExplainResult.to_dict()` produces it; the HTML page (`qkv.inspect.html`) and the PNG picture
(`qkv.inspect.png`) check what they are given with `check_data`; the web API (`qkv serve`)
documents its /api/explain answer with `ExplainData`, so the OpenAPI document, the renderers'
check and the producer agree on one definition (docs/architecture.md, "Inspect, web, and
the rest").

    from qkv.inspect.schema import ExplainData, check_data
    n, layers, heads = check_data(result.to_dict())   # ValueError: one line naming the field

Shapes: n labels; maps[layer][head][query][key] is (layers, heads, n, n); entropy[layer][head]
is (layers, heads); focus.per_layer[layer][key] is (layers, n); cross.maps is (cross layers,
heads, len(target), len(source)); attention is one entry per layer of maps. Numpy arrays and
tensors are accepted wherever a list is.

Compatibility: the format name stays "qkv.explain/1" while fields are only added, each optional
(a reader of an older file finds it absent, an older reader ignores it): `attention`, how each
layer attended (causal, sliding window, score_mod), was added with issue 17. Issue 19 added the
compact view for long inputs: `view` ("full", or "rows": then `maps` is absent and `rows`,
`summary`, `minimap` and `omitted` say what the view holds; docs/explain.md, "Long inputs").
Shapes there: rows.top[layer][head][row] is one `TopKeys`; summary.* (layers, heads); minimap.*
(layers, n). Issue 20 added images: `modality` ("text" or "image") and, for an image, `image`
(the picture as a PNG data URL, the patch grid, the prediction); labels are then "[CLS]" and the
patches "r{row}c{col}" row by row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

FORMAT = "qkv.explain/1"
METHODS = ("raw", "rollout", "value-norm")  # how a row of weights is computed (qkv.explain's `method`)
LEVELS = ("word", "token")  # what a label is: a word (subword pieces joined) or a token

__all__ = ["FORMAT", "LEVELS", "METHODS", "Cross", "ExplainData", "Focus", "Image", "LayerAttention", "Minimap",
           "Omitted", "Prediction", "Rows", "Summary", "TopKeys", "as_list", "check_data"]

T = TypeVar("T")


def as_list(x: Any) -> Any:
    """Lists pass through; numpy arrays and tensors become nested lists."""
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (list, tuple)) else x


Array = Annotated[list[T], BeforeValidator(as_list)]  # a list, or an array that becomes one
Matrix = Array[Array[float]]  # (rows, columns)


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class TopKey(_Part):
    label: str
    weight: float


class TopKeys(_Part):
    keys: list[int] = Field(description="indices of the keys given the most weight, largest first")
    weights: Array[float] = Field(description="their weights")
    rest: float = Field(description="the exact total weight of the keys left out")
    left_out: int = Field(description="how many keys left out have a weight above 0")


class Rows(_Part):
    index: list[int] = Field(description="the query rows shipped (label indices)")
    k: int = Field(description="keys kept per row")
    top: list[list[list[TopKeys]]] = Field(description="(layers, heads, rows): each row's top keys")


class Summary(_Part):
    entropy: Matrix = Field(description="(layers, heads): mean row entropy in nats (raw weights of every head)")
    distance: Matrix = Field(description="(layers, heads): mean over rows of sum_j w_ij |i - j|, in labels")
    sink: Matrix = Field(description="(layers, heads): mean weight on the first label")


class Minimap(_Part):
    received: Matrix = Field(description="(layers, n): mean over heads and rows of the weight each label receives")
    entropy: Matrix = Field(description="(layers, n): each row's entropy, mean over heads")


class Omitted(_Part):
    weights: int = Field(description="weights (layer, head, query, key) not shipped")
    rows: int = Field(description="query rows not shipped")


class SharpHead(_Part):
    layer: int
    head: int
    entropy: float = Field(description="bits of the focus row in this head")
    top: list[TopKey] = Field(description="the keys it attends to most, largest first")


class Focus(_Part):
    index: int = Field(strict=True, description="the focus word's index among the labels")
    label: str | None = None
    per_layer: Matrix | None = Field(None, description="(layers, n): the focus row, mean of heads")
    sharpest_heads: list[SharpHead] | None = None


class Cross(_Part):
    layers: list[int] = Field(description="indices of the cross-attention layers")
    source: list[str]
    target: list[str]
    maps: Array[Array[Matrix]] = Field(description="(cross layers, heads, target, source)")

    @model_validator(mode="after")
    def _shapes(self) -> Cross:
        t, s = len(self.target), len(self.source)
        if any(len(amap) != t or any(len(row) != s for row in amap) for layer in self.maps for amap in layer):
            raise ValueError("data['cross'] must hold maps of shape (cross layers, heads, len(target), len(source))")
        return self


class LayerAttention(_Part):
    """How one layer attended (added to qkv.explain/1 as the optional `attention` list)."""

    layer: int = Field(strict=True, description="the model's attention layer (entry i describes maps[i])")
    name: str | None = Field(None, description="the attention module's name in the model")
    causal: bool | None = Field(None, description="queries see only keys at or before their position")
    window: list[int | None] | None = Field(None, min_length=2, max_length=2, description=(
        "[left, right]: keys a query may see before and after its position (null = unbounded); "
        "null = no window"))
    score_mod: str | None = Field(None, description="the score function applied before the softmax, e.g. "
                                  "'soft_cap(cap=50.0)'; null = none")


class Prediction(_Part):
    label: str
    probability: float


class Image(_Part):
    """An image result's picture and patch grid (added to qkv.explain/1 with issue 20)."""

    name: str = Field(description="the image's file name, or 'image'")
    grid: list[Annotated[int, Field(gt=0)]] = Field(min_length=2, max_length=2, description="[rows, columns] of "
                                                    "patches")
    patch: int = Field(gt=0, description="the side of a patch in pixels")
    size: list[Annotated[int, Field(gt=0)]] = Field(min_length=2, max_length=2, description="[height, width] in "
                                                    "pixels as the model saw it")
    channels: Literal[1, 3] = Field(description="1 (grey) or 3 (RGB)")
    pixels: str = Field(pattern=r"^data:image/png;base64,[A-Za-z0-9+/=]*$",
                        description="the image at the model's size, before normalisation, as a PNG data URL")
    first_patch: int = Field(ge=0, description="the label index of patch (0, 0); patch (r, c) is "
                             "first_patch + r * columns + c")
    class_token: int | None = Field(None, description="the class token's label index (null: hidden)")
    prediction: list[Prediction] = Field(default_factory=list, description="the most probable classes, "
                                         "most probable first (empty without a classifier)")


class Selected(_Part):
    layer: int | None = None
    head: int | None = None


class ExplainData(_Part):
    """A `qkv explain` result as JSON: what `ExplainResult.to_dict()` returns."""

    format: Literal[FORMAT]
    model: str = Field(description="the model's name")
    text: str
    method: Literal[METHODS]
    level: Literal[LEVELS]
    labels: list[str] = Field(min_length=1, description="the n words (or tokens) shown, specials included")
    special: Array[bool] | None = Field(None, description="one per label: [CLS], [SEP], BOS, ...")
    layers: int | None = None
    heads: int | None = None
    head_names: list[str] = Field(description="one per head in maps (['rollout'] for rollout)")
    view: Literal["full", "rows"] | None = Field(None, description=(
        "full: every map; rows: the compact view of a long input, without maps (absent in older files: full)"))
    maps: Array[Array[Matrix]] | None = Field(None, description="(layers, heads, n, n): maps[layer][head][query][key]")
    rows: Rows | None = Field(None, description="the compact view's shipped rows and their top keys")
    summary: Summary | None = None
    minimap: Minimap | None = None
    omitted: Omitted | None = None
    normalised: bool | None = Field(None, description="rows sum to 1 (false for value-norm)")
    focus: Focus | None = None
    entropy: Matrix | None = Field(None, description="(layers, heads): mean row entropy")
    selected: Selected | None = None
    cross: Cross | None = Field(None, description="encoder-decoder models: target words over source words")
    attention: list[LayerAttention] | None = Field(None, description=(
        "one per layer of maps: its causal flag, sliding window and score_mod (absent in older files)"))
    modality: Literal["text", "image"] | None = Field(None, description="what the labels are: words or "
                                                      "tokens of a text, or an image's patches (absent: text)")
    image: Image | None = Field(None, description="modality 'image': the picture, its patch grid, the prediction")

    @model_validator(mode="after")
    def _shapes(self) -> ExplainData:
        n, maps = len(self.labels), self.maps
        if self.special is not None and len(self.special) != n:
            raise ValueError(f"data['special'] has {len(self.special)} entries for {n} labels; give one bool per label")
        if self.modality == "image" and self.image is None:
            raise ValueError("data['modality'] is 'image' but data['image'] (the picture and patch grid) is absent")
        if self.image is not None:
            img = self.image
            rows, cols = img.grid
            if img.first_patch + rows * cols != n:
                raise ValueError(f"data['image'] has a {rows}x{cols} patch grid from label {img.first_patch}, "
                                 f"but there are {n} labels")
            if rows * img.patch > img.size[0] or cols * img.patch > img.size[1]:
                raise ValueError(f"data['image']: {cols}x{rows} patches of {img.patch} pixels do not fit in a "
                                 f"{img.size[1]}x{img.size[0]} image (width x height)")
            if img.class_token is not None and not 0 <= img.class_token < img.first_patch:
                raise ValueError(f"data['image']['class_token'] must be a label before the patches (0..."
                                 f"{img.first_patch - 1}) or null; got {img.class_token}")
        if self.view == "rows":
            self._compact_shapes(n)
            return self
        if not maps:
            raise ValueError("data['maps'] is empty or absent; expected maps[layer][head][query][key] "
                             "(or view 'rows' with data['rows'])")
        heads = len(maps[0])
        if heads == 0 or len(self.head_names) != heads:
            raise ValueError(f"data['maps'][0] has {heads} heads but data['head_names'] has {len(self.head_names)}; "
                             "give one name per head in maps")
        for layer, per_layer in enumerate(maps):
            if len(per_layer) != heads:
                raise ValueError(f"data['maps'][{layer}] has {len(per_layer)} heads, expected {heads} (as maps[0])")
            for head, amap in enumerate(per_layer):
                if len(amap) != n or any(len(row) != n for row in amap):
                    raise ValueError(f"data['maps'][{layer}][{head}] must be {n} x {n} (one row and column per "
                                     f"label), got {len(amap)} rows of lengths {sorted({len(r) for r in amap})[:4]}")
        if self.attention is not None and len(self.attention) != len(maps):
            raise ValueError(f"data['attention'] has {len(self.attention)} entries for the {len(maps)} layers of "
                             "maps; give one per layer, in the order of maps")
        focus = self.focus
        if focus is not None:
            if not 0 <= focus.index < n:
                raise ValueError(f"data['focus']['index'] must be a label index in 0..{n - 1}, got {focus.index!r}")
            rows = focus.per_layer
            if rows is not None and (len(rows) != len(maps) or any(len(r) != n for r in rows)):
                raise ValueError(f"data['focus']['per_layer'] must be {len(maps)} rows of {n} weights")
        return self


    def _compact_shapes(self, n: int) -> None:
        if self.maps is not None:
            raise ValueError("data['maps'] must be absent in the compact view (view 'rows')")
        if self.rows is None:
            raise ValueError("the compact view (view 'rows') needs data['rows'] (the shipped rows and their top keys)")
        layers, heads, count = len(self.rows.top), len(self.head_names), len(self.rows.index)
        if not layers or any(len(per) != heads or any(len(h) != count for h in per) for per in self.rows.top):
            raise ValueError(f"data['rows']['top'] must be (layers, {heads} heads, {count} rows)")
        if any(not 0 <= i < n for i in self.rows.index):
            raise ValueError(f"data['rows']['index'] must hold label indices in 0..{n - 1}")
        # the summaries are of the raw weights of every recorded head, even when the view shows rollout's one
        recorded = len(self.summary.entropy[0]) if self.summary is not None and self.summary.entropy else heads
        parts: list[tuple[str, BaseModel | None, int]] = [("summary", self.summary, recorded),
                                                          ("minimap", self.minimap, n)]
        for name, part, width in parts:
            if part is None:
                continue
            for field in type(part).model_fields:
                matrix = getattr(part, field)
                if len(matrix) != layers or any(len(r) != width for r in matrix):
                    raise ValueError(f"data['{name}']['{field}'] must be {layers} rows of {width}")
        if self.attention is not None and len(self.attention) != layers:
            raise ValueError(f"data['attention'] has {len(self.attention)} entries for {layers} layers")
        focus = self.focus
        if focus is not None:
            if not 0 <= focus.index < n:
                raise ValueError(f"data['focus']['index'] must be a label index in 0..{n - 1}, got {focus.index!r}")
            if focus.per_layer is not None and (len(focus.per_layer) != layers
                                                or any(len(r) != n for r in focus.per_layer)):
                raise ValueError(f"data['focus']['per_layer'] must be {layers} rows of {n} weights")


def check_data(data: Any) -> tuple[int, int, int]:
    """Check a "qkv.explain/1" dict against `ExplainData`.

    Args:
        data: the dict of `ExplainResult.to_dict()`; maps (layers, heads, n, n) may be lists,
            numpy arrays or tensors.

    Returns:
        (n labels, layers in maps, heads in maps).

    Raises:
        TypeError: `data` is not a mapping.
        ValueError: one line naming the field, what was found and what was expected.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"expected the dict of a qkv explain result (to_dict()), got {type(data).__name__}")
    try:
        checked = ExplainData.model_validate(dict(data))
    except ValidationError as exc:
        raise ValueError(_one_line(exc.errors()[0])) from None
    if checked.maps is None:  # the compact view
        assert checked.rows is not None
        return len(checked.labels), len(checked.rows.top), len(checked.head_names)
    return len(checked.labels), len(checked.maps), len(checked.maps[0])


def _one_line(err: Mapping[str, Any]) -> str:
    """pydantic's first error as one sentence; a shape check's own message as it is."""
    if err["type"] == "value_error":
        return str(err["ctx"]["error"])
    if err["type"] == "missing" and len(err["loc"]) == 1:
        return f"the explain data has no {err['loc'][0]!r} field (format {FORMAT})"
    where = "data" + "".join(f"[{part!r}]" for part in err["loc"])
    return f"{where}: {err['msg']}; got {err['input']!r:.80}"

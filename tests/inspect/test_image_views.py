"""The terminal and PNG views of an image result (`qkv.explain(image=...)`, issue 20).

Every number is compared with the result's own tensors (`image_maps`, `focus_rows`) or with
`qkv.inspect.analysis.rollout`, never with hard-coded answers."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch

import qkv
from qkv.inspect import analysis
from qkv.inspect.terminal import _SHADES, render_image, shade
from qkv.models import bundled_path

SAMPLES = bundled_path("digits") / "samples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digit():
    """digit-3 explained by the bundled digits model: 4x4 patches + class token, 4 layers x 4 heads."""
    return qkv.explain(image=SAMPLES / "digit-3.png", model="digits")


@pytest.fixture(scope="module")
def big():
    """A random qkv ViT on a 64x64 image, patch 4: 257 units, 8 layers x 8 heads, so that
    layers x heads x n^2 = 4,227,136 > 4,194,304 and to_dict gives the compact view."""
    from qkv.models.vit import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=8, num_attention_heads=8, intermediate_size=48,
                       image_size=64, patch_size=4, num_channels=1, num_labels=3,
                       id2label={"0": "a", "1": "b", "2": "c"})
    model = ViTForImageClassification(config).eval()
    image = torch.rand(64, 64, generator=torch.Generator().manual_seed(1))  # (H, W) in [0, 1]
    return qkv.explain(image=image, model=model, name="tiny-vit")


# --------------------------------------------------------------------------- terminal


def _blocks(text: str, rows: int, cols: int) -> dict[str, tuple[list[str], list[str]]]:
    """The grids of render_image's output: title -> (the `rows` grid lines, each 2 * cols characters;
    the legend lines under it)."""
    lines = text.splitlines()
    out: dict = {}
    title_re = re.compile(r"(layer \d+ (?:mean|max|h\d+|rollout)|rollout L\d+)")
    for i, line in enumerate(lines):
        for m in title_re.finditer(line):
            at = m.start()
            grid = [lines[i + 1 + r][at:at + 2 * cols].ljust(2 * cols) for r in range(rows)]
            legend = [lines[i + 1 + rows + k][at:].split("  ")[0] for k in range(3)
                      if i + 1 + rows + k < len(lines)]
            out[m.group(1)] = (grid, legend)
    return out


def _check_shading(grid_lines: list[str], weights: torch.Tensor) -> None:
    """Each patch is two equal shade characters, the shade of its weight over the grid's max: the
    largest patch is '██', and a larger weight never gets a lighter shade."""
    top = float(weights.max())
    flat = weights.flatten().tolist()
    cells = [line[2 * c:2 * c + 2] for line in grid_lines for c in range(weights.shape[1])]
    assert all(cell[0] == cell[1] for cell in cells), cells
    levels = [_SHADES.index(cell[0]) for cell in cells]
    assert levels == [_SHADES.index(shade(x, top)) for x in flat]
    assert levels[int(np.argmax(flat))] == len(_SHADES) - 1
    order = np.argsort(flat)
    assert all(levels[a] <= levels[b] for a, b in zip(order[:-1], order[1:])), "a larger weight is lighter"


def test_terminal_default_grids_follow_image_maps(digit):
    text = render_image(digit, columns=200)
    rows, cols = digit.image.grid
    blocks = _blocks(text, rows, cols)
    L = digit.num_layers
    assert set(blocks) == {f"layer {i} mean" for i in range(L)} | {f"rollout L{L - 1}"}
    maps = digit.image_maps()  # (L, H, rows, cols)
    cls = digit.focus_rows("cls", "raw", "token")[..., 0].mean(dim=1)  # (L,)
    for lay in range(L):
        grid, legend = blocks[f"layer {lay} mean"]
        mean = maps[lay].mean(dim=0)  # (rows, cols)
        _check_shading(grid, mean)
        r, c = divmod(int(mean.argmax()), cols)
        assert legend[0] == f"max r{r}c{c} {float(mean[r, c]):.3f}"
        assert legend[1] == f"cls {float(cls[lay]):.3f}"
    rollout = digit.image_maps(method="rollout")[L - 1, 0]  # (rows, cols)
    grid, legend = blocks[f"rollout L{L - 1}"]
    _check_shading(grid, rollout)
    # the rollout is the class token's row of analysis.rollout on the mean of heads (Abnar & Zuidema)
    reference = analysis.rollout(digit.attentions.double().mean(dim=1))[L - 1, 0, 1:].reshape(rows, cols)
    torch.testing.assert_close(rollout.double(), reference, rtol=1e-5, atol=1e-6)
    assert "prediction: " + digit.image.prediction(1)[0]["label"] in text


def test_terminal_layer_heads_and_patch_focus(digit):
    rows, cols = digit.image.grid
    text = render_image(digit, "r1c2", layer=2, columns=200)
    blocks = _blocks(text, rows, cols)
    assert set(blocks) == {f"layer 2 h{h}" for h in range(digit.num_heads)}
    maps = digit.image_maps("r1c2")  # (L, H, rows, cols)
    own = digit.focus_rows("r1c2", "raw", "token")[2, :, 0]  # (H,): the weight on the class token
    for h in range(digit.num_heads):
        grid, legend = blocks[f"layer 2 h{h}"]
        _check_shading(grid, maps[2, h])
        assert legend[1] == f"cls {float(own[h]):.3f}"
        assert legend[2] == f"self {float(maps[2, h, 1, 2]):.3f}"
    assert "from patch r1c2" in text
    one = _blocks(render_image(digit, "r1c2", layer=2, head=3, columns=200), rows, cols)
    assert set(one) == {"layer 2 h3"}


def test_terminal_methods_head_and_hidden_class_token(digit):
    rows, cols = digit.image.grid
    # one head per layer
    blocks = _blocks(render_image(digit, head=1, columns=200), rows, cols)
    maps = digit.image_maps()
    for lay in range(digit.num_layers):
        _check_shading(blocks[f"layer {lay} h1"][0], maps[lay, 1])
    # rollout per layer: one grid each, no extra rollout grid
    blocks = _blocks(render_image(digit, method="rollout", columns=200), rows, cols)
    ro = digit.image_maps(method="rollout")
    assert set(blocks) == {f"layer {i} rollout" for i in range(digit.num_layers)}
    for lay in range(digit.num_layers):
        _check_shading(blocks[f"layer {lay} rollout"][0], ro[lay, 0])
    # value norms over the patches with the class token hidden
    text = render_image(digit, "r0c1", method="value-norm", hide_special=True, aggregate="max", columns=200)
    vn = digit.image_maps("r0c1", "value-norm", hide_special=True)
    blocks = _blocks(text, rows, cols)
    for lay in range(digit.num_layers):
        grid, legend = blocks[f"layer {lay} max"]
        _check_shading(grid, vn[lay].amax(dim=0))
        assert legend[1] == "cls hidden"


def test_terminal_fits_the_width_and_colours(digit):
    for columns in (40, 60, 80, 120):
        text = render_image(digit, columns=columns)
        assert max(len(line) for line in text.splitlines()) <= columns, columns
    narrow = render_image(digit, columns=40).splitlines()
    wide = render_image(digit, columns=200).splitlines()
    assert len(narrow) > len(wide), "narrow terminals should stack the grids"
    coloured = render_image(digit, color=True, columns=200)
    assert "\x1b[48;5;" in coloured and "█" not in coloured.split("\n\n", 1)[1].split("max")[0]


def test_terminal_refusals(digit, minilm):
    with pytest.raises(ValueError, match="rollout averages the heads"):
        render_image(digit, method="rollout", head=1)
    with pytest.raises(ValueError, match="class token is hidden"):
        render_image(digit, hide_special=True)
    with pytest.raises(ValueError, match="not a patch"):
        render_image(digit, "r9c9")
    with pytest.raises(ValueError, match="image results"):
        render_image(qkv.explain("The cat sat.", minilm))


def test_terminal_compact_view_of_a_big_vit(big):
    assert big.compact_view()
    rows, cols = big.image.grid
    assert (rows, cols) == (16, 16)
    text = render_image(big, columns=200)
    blocks = _blocks(text, rows, cols)
    maps = big.image_maps()  # (8, 8, 16, 16)
    for lay in range(big.num_layers):
        _check_shading(blocks[f"layer {lay} mean"][0], maps[lay].mean(dim=0))


# --------------------------------------------------------------------------- PNG

pytest.importorskip("matplotlib", reason="PNG output needs matplotlib (the viz/test extras)")


def save_png(result, path, **options):
    from qkv.inspect.png import save_png as save

    return save(result, path, **options)


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _figure_titles(data, layer=None, head=None, rollout=None) -> list[str]:
    from qkv.inspect.png import _png

    titles: list[str] = []
    png = _png(data, layer, head, rollout=rollout,
               on_figure=lambda fig: titles.extend(ax.get_title() for ax in fig.axes))
    assert png.startswith(PNG_MAGIC)
    return titles


def test_png_full_view(digit, tmp_path):
    path = save_png(digit, tmp_path / "digit.png")
    width, height = png_size(path)
    assert 600 <= width <= 2400 and 500 <= height <= 2400, (width, height)
    from matplotlib.image import imread

    img = imread(path)
    coloured = (img[..., :3].max(-1) - img[..., :3].min(-1) > 0.15).mean()
    assert coloured > 0.05, f"only {coloured:.1%} of the picture is coloured: no heat map"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digit.png"]


def test_png_panels_are_the_result_maps(digit):
    from qkv.inspect.png import image_rows

    data = digit.to_dict()
    maps = digit.image_maps()  # (L, H, rows, cols)
    rollout = digit.image_maps(method="rollout")[:, 0]  # (L, rows, cols)
    titles = _figure_titles(data)  # from the dict alone: the rollout column is computed from the maps
    L, H = maps.shape[:2]
    assert len(titles) == L * (H + 1)
    for lay in range(L):
        for h in range(H):
            assert f"L{lay} h{h} · max {float(maps[lay, h].max()):.3g}" in titles
        assert f"rollout to L{lay} · max {float(rollout[lay].max()):.3g}" in titles
    rows, index, whole = image_rows(np, data)
    assert index == 0 and whole
    np.testing.assert_allclose(rows[:, :, 1:].reshape(maps.shape), maps.numpy(), atol=1e-5)
    # --layer and --head narrow the grid to one row, one head column (+ rollout)
    titles = _figure_titles(data, layer=2, head=1)
    assert titles == [f"L2 h1 · max {float(maps[2, 1].max()):.3g}",
                      f"rollout to L2 · max {float(rollout[2].max()):.3g}"]


def test_png_patch_focus_and_methods(digit, tmp_path):
    data = digit.to_dict(focus="r2c1")
    maps = digit.image_maps("r2c1")
    titles = _figure_titles(data, layer=3)
    assert f"L3 h0 · max {float(maps[3, 0].max()):.3g}" in titles
    ro = digit.to_dict(method="rollout")
    titles = _figure_titles(ro)
    assert len(titles) == digit.num_layers  # one rollout column, no extra
    hidden = digit.to_dict(hide_special=True, focus="r0c0")
    hm = digit.image_maps("r0c0", hide_special=True)
    assert f"L0 h2 · max {float(hm[0, 2].max()):.3g}" in _figure_titles(hidden)
    assert png_size(save_png(digit, tmp_path / "vn.png", method="value-norm", focus="r1c1", layer=1))[0] > 300
    with pytest.raises(ValueError, match="give a patch"):
        save_png(digit, tmp_path / "x.png", hide_special=True)


def test_png_compact_views(digit, big, tmp_path):
    # digits forced into the compact view: the shipped class-token row holds every patch
    compact = digit.to_dict(rows=[0])
    assert compact["view"] == "rows"
    maps = digit.image_maps()
    titles = _figure_titles(compact)
    assert f"L1 h3 · max {float(maps[1, 3].max()):.3g}" in titles
    assert png_size(save_png(digit, tmp_path / "compact.png", rows=[0]))[0] > 300
    # a ViT whose full maps are too big: compact by default, drawn from the shipped row and image_maps' rollout
    data = big.to_dict()
    assert data["view"] == "rows" and data["rows"]["index"] == [0]
    path = save_png(big, tmp_path / "big.png")
    width, height = png_size(path)
    assert width <= 2400 and height <= 2400
    bm = big.image_maps()
    bro = big.image_maps(method="rollout")[:, 0].double().numpy()
    titles = _figure_titles(data, rollout=bro)
    assert len(titles) == 8 * 9
    assert f"L7 h5 · max {float(bm[7, 5].max()):.3g}" in titles
    assert f"rollout to L7 · max {float(bro[7].max()):.3g}" in titles


def test_png_render_from_json_round_trip(digit, tmp_path):
    import json

    from qkv.inspect.png import render_png

    digit.save_json(tmp_path / "d.json")
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["modality"] == "image"
    path = render_png(data, tmp_path / "from-json.png", layer=-1)
    assert png_size(path)[0] > 300
    broken = dict(data, image=dict(data["image"], pixels="data:image/png;base64,AAAA"))
    with pytest.raises(ValueError, match="pixels"):
        render_png(broken, tmp_path / "broken.png")


def test_png_panel_draws_the_picture_the_overlay_and_the_outline(digit):
    """Each panel: the picture at the model's size (from the dict's data URL), the focus row over
    the patches scaled to its max on top, and the focus patch outlined."""
    from matplotlib.patches import Rectangle

    from qkv.inspect.png import _png

    axes: list = []
    _png(digit.to_dict(focus="r2c3"), 1, 0, on_figure=lambda fig: axes.extend(fig.axes))
    assert len(axes) == 2  # head 0 and the rollout column
    ax = axes[0]
    picture, overlay = (np.asarray(im.get_array()) for im in ax.images)
    np.testing.assert_allclose(picture, digit.image.pixels[0].numpy(), atol=1 / 255)  # (8, 8) grey
    grid = digit.image_maps("r2c3")[1, 0].numpy()  # (4, 4)
    np.testing.assert_allclose(overlay, grid / grid.max(), atol=1e-4)
    P = digit.image.patch
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [(b.get_x(), b.get_y(), b.get_width()) for b in boxes] == [(3 * P, 2 * P, P)]
    # the class token as focus: no patch outlined
    axes.clear()
    _png(digit.to_dict(), 1, 0, on_figure=lambda fig: axes.extend(fig.axes))
    assert not [p for p in axes[0].patches if isinstance(p, Rectangle)]

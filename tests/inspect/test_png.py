"""The PNG picture of `qkv explain`: a valid PNG of sensible size, atomic writes, clear errors.

Built from the synthetic "qkv.explain/1" dict of test_html (no model). With QKV_UPDATE_DOCS=1
the docs picture docs/images/explain.png is rewritten.
"""

from __future__ import annotations

import builtins
import os
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="PNG output needs matplotlib (the viz/test extras)")

from synthetic_explain import make_data  # noqa: E402

from qkv.inspect.png import render_png  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOCS_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "explain.png"


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def small_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("png") / "explain.png"
    assert render_png(make_data(n_words=8, layers=3, heads=4), path) == path
    return path


def test_png_is_valid_and_sensible(small_png):
    width, height = png_size(small_png)
    assert 600 <= width <= 6000 and 400 <= height <= 6000, f"odd picture size {width}x{height}"
    assert small_png.stat().st_size > 10_000
    assert sorted(p.name for p in small_png.parent.iterdir()) == ["explain.png"], "a temporary file was left"


def test_png_draws_what_it_claims(small_png):
    from matplotlib.image import imread

    img = imread(small_png)  # (H, W, 4) floats
    assert img.shape[2] in (3, 4)
    # Not blank: a good share of the pixels are coloured (the Blues heatmaps).
    rgb = img[..., :3]
    coloured = (rgb.max(-1) - rgb.min(-1) > 0.15).mean()
    assert coloured > 0.05, f"only {coloured:.1%} of the picture is coloured"


@pytest.mark.parametrize(
    "kwargs",
    [dict(layer=0, head=1), dict(layer=-1, head="mean"), dict(layer=1, head="2"), dict(head=None)],
)
def test_layer_and_head_choices(tmp_path, kwargs):
    path = render_png(make_data(n_words=5, layers=2, heads=3), tmp_path / "x.png", **kwargs)
    assert png_size(path)[0] > 300


def test_without_focus_and_other_methods(tmp_path):
    vn = make_data(n_words=6, layers=2, heads=2, method="value-norm", focus=None)
    png_size(render_png(vn, tmp_path / "vn.png"))
    roll = make_data(n_words=6, layers=2, heads=2, focus=1)
    roll.update(method="rollout", head_names=["rollout"], entropy=[[0.4], [0.3]],
                maps=[[np.mean(layer, axis=0).tolist()] for layer in roll["maps"]])
    png_size(render_png(roll, tmp_path / "rollout.png"))


def test_awkward_labels(tmp_path):
    data = make_data(n_words=6, layers=1, heads=2)
    data["labels"][1:6] = ["$x$", "$", "猫", "", "a\nb"]  # mathtext, CJK (no glyph), empty, newline
    png_size(render_png(data, tmp_path / "odd.png"))


def test_two_hundred_labels(tmp_path):
    width, height = png_size(render_png(make_data(n_words=198, layers=2, heads=2, focus=3), tmp_path / "big.png"))
    assert width <= 6000 and height <= 6000


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(layer=3), r"layer 3 is out of range.*0\.\.2"), (dict(head=9), r"head 9 is out of range.*0\.\.3"),
     (dict(head="nope"), "unknown head"), (dict(layer="1"), "layer must be an int")],
)
def test_bad_layer_or_head(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_png(make_data(n_words=4, layers=3, heads=4), tmp_path / "x.png", **kwargs)
    assert not list(tmp_path.iterdir())


def test_unwritable_path(tmp_path):
    target = tmp_path / "missing" / "x.png"
    with pytest.raises(OSError, match="missing/x.png"):
        render_png(make_data(n_words=4), target)
    with pytest.raises(OSError, match="directory"):
        render_png(make_data(n_words=4), tmp_path)


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"pip install 'qkv\[viz\]'"):
        render_png(make_data(n_words=4), tmp_path / "x.png")


def test_docs_picture(tmp_path):
    from synthetic_explain import docs_data

    path = render_png(docs_data(), tmp_path / "explain.png")
    png_size(path)
    if os.environ.get("QKV_UPDATE_DOCS") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        DOCS_IMAGE.write_bytes(path.read_bytes())


def test_png_through_a_symlink_and_never_over_a_fifo(tmp_path):
    """A link is written through (it stays a link); a FIFO is refused before any drawing."""
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    render_png(make_data(n_words=4), link)
    assert link.is_symlink() and png_size(real)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=f"cannot write PNG to '{fifo}': it is a FIFO"):
        render_png(make_data(n_words=4), fifo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.png", "link.png", "real.png"]

"""The offline HTML page of an image result (`qkv.explain(image=...)`): the picture travels as a
data: URL, the page names no network address, and the image's file name (user text) is escaped.

The bundled digits model explains its sample digit-3.png (8x8 grey, a 4x4 patch grid + class token).
"""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest
import torch

import qkv
from qkv.inspect.html import render_html, write_html

SAMPLE = qkv.models.bundled_path("digits") / "samples" / "digit-3.png"
MALICIOUS_NAME = "<img src=x onerror=alert(1)>.png"


def embedded_json(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', page, re.S)
    assert m, "the page has no embedded JSON block"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def digit():
    return qkv.explain(image=SAMPLE, model="digits")


def assert_offline(page: str) -> None:
    low = page.lower()
    assert "http://" not in low and "https://" not in low, "the page names a network address"
    assert not re.search(r"<script[^>]*\bsrc\s*=", low), "the page loads an external script"
    assert "<link" not in low and "@import" not in low and "url(" not in low
    assert "<img" not in low and "<iframe" not in low, "the page holds markup for an image outside its script"
    assert len(re.findall(r"<script\b", low)) == 2
    assert "img-src data: blob:" in page and "default-src 'none'" in page


def test_page_holds_the_picture_as_a_data_url(digit, tmp_path):
    data = digit.to_dict()
    path = write_html(data, tmp_path / "digit.html")
    page = path.read_text(encoding="utf-8")
    assert_offline(page)
    got = embedded_json(page)
    assert got["modality"] == "image"
    assert got["image"]["pixels"] == data["image"]["pixels"]
    assert got["image"]["pixels"].startswith("data:image/png;base64,")
    assert data["image"]["pixels"] in page, "the picture's data URL is not in the page verbatim"
    for key in ("name", "grid", "patch", "size", "first_patch", "class_token", "prediction"):
        assert got["image"][key] == data["image"][key], key
    assert got["labels"] == data["labels"]
    assert "<title>qkv explain: image digit-3.png</title>" in page


def test_compact_and_rollout_pages_are_offline_too(digit):
    for data in (digit.to_dict(rows=[0]), digit.to_dict(method="rollout"), digit.to_dict(hide_special=True)):
        page = render_html(data)
        assert_offline(page)
        got = embedded_json(page)
        assert got["image"] == data["image"]
        assert got.get("view") == data.get("view")


def test_malicious_file_name_is_escaped(tmp_path):
    bad = tmp_path / MALICIOUS_NAME
    shutil.copyfile(SAMPLE, bad)
    r = qkv.explain(image=bad, model="digits")
    data = r.to_dict()
    assert data["text"] == data["image"]["name"] == MALICIOUS_NAME
    page = render_html(data)
    assert MALICIOUS_NAME not in page
    assert "<img src=x" not in page.lower()
    assert f"<title>qkv explain: image {html.escape(MALICIOUS_NAME, quote=False)}</title>" in page
    assert "\\u003cimg src=x onerror=alert(1)\\u003e.png" in page  # in the JSON block
    got = embedded_json(page)
    assert got["text"] == got["image"]["name"] == MALICIOUS_NAME  # the page shows it back as text
    assert_offline(page)


def test_a_tensor_image_is_named_image():
    pixels = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))  # (H, W) in [0, 1]
    data = qkv.explain(image=pixels, model="digits").to_dict()
    page = render_html(data)
    assert embedded_json(page)["image"]["name"] == "image"
    assert_offline(page)


@pytest.mark.parametrize("pixels", [
    "http://example.com/x.png",
    "data:text/html;base64,PHNjcmlwdD4=",
    'data:image/png;base64,AAAA" onerror="alert(1)',
    "file:///etc/passwd",
])
def test_a_picture_that_is_not_a_png_data_url_is_refused(digit, pixels):
    data = digit.to_dict()
    data["image"] = dict(data["image"], pixels=pixels)
    with pytest.raises(ValueError, match="pixels"):
        render_html(data)


def test_text_pages_have_no_image_panel(minilm):
    data = qkv.explain("the cat sat", model=minilm).to_dict()
    assert data["modality"] == "text" and "image" not in data
    page = render_html(data)
    assert_offline(page)
    assert "image" not in embedded_json(page)

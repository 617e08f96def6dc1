"""Cross-attention of the bundled translate model as pictures: target words over source words,
in the PNG and in the HTML page (checked in headless Chromium against the data)."""

from __future__ import annotations

import numpy as np
import pytest

import qkv
from qkv.inspect.html import write_html
from qkv.inspect.png import render_png

TEXT = "the red cat sees the big dog"


@pytest.fixture(scope="module")
def data():
    return qkv.explain(TEXT, "translate").to_dict()


def test_cross_field_is_target_over_source(data):
    cross = data["cross"]
    maps = np.asarray(cross["maps"])  # (cross layers, heads, target, source)
    assert cross["source"] == TEXT.split()
    assert maps.shape[2:] == (len(cross["target"]), len(cross["source"]))
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-4)


def test_png_draws_the_alignment(data, tmp_path):
    out = render_png(data, tmp_path / "align.png")
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(head[16:20], "big")
    assert width > 600


def test_html_shows_the_alignment_table(browser, data, tmp_path):  # noqa: F811
    path = tmp_path / "align.html"
    write_html(data, path)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    table = page.locator("table.cross-table")
    cross = data["cross"]
    maps = np.asarray(cross["maps"])
    last = maps[-1].mean(0)  # (target, source): the layer shown first, mean of heads
    assert table.locator("tr").count() == len(cross["target"]) + 1
    for t in range(len(cross["target"])):
        cells = table.locator("tr").nth(t + 1).locator("td")
        shown = np.array([float(cells.nth(j).get_attribute("data-weight")) for j in range(len(cross["source"]))])
        np.testing.assert_allclose(shown, last[t], atol=1e-5)
    page.select_option("section.cross select", "0")
    first = maps[0].mean(0)
    cell = table.locator("tr").nth(1).locator("td").nth(0)
    assert abs(float(cell.get_attribute("data-weight")) - first[0, 0]) < 1e-5
    assert not errors, errors
    page.close()

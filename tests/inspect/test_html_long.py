"""The offline page of a long input: `qkv explain --html` on thousands of tokens draws the compact
view ("view": "rows": summaries, a minimap of the whole sequence, the focus row per layer, the
shipped rows' top keys), stays small, makes no request and never builds one element per word.

The model is a tiny random Llama with 8,192 positions (tests/models/hf_folders.py), so the
weights are what the core computes for it; the page's numbers are checked against the dict the
page was made from (`ExplainResult.to_dict`), which tests/inspect/test_explain_long.py checks
against the full maps.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

import qkv
from qkv.inspect.explain import answer_bytes
from qkv.inspect.html import render_html, write_html

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALLOWED_SCHEMES = {"file", "data", "blob", "about"}
MB = 1 << 20


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    from models.hf_folders import build_folder

    folder = tmp_path_factory.mktemp("llama-long")
    build_folder(folder, "llama", max_position_embeddings=8192)
    return qkv.load(folder)


def long_text(words: int) -> str:
    return " ".join(["the cat sat on the mat"] * (words // 6)) + " queries"


@pytest.fixture(scope="module")
def page_8k(long_llama, tmp_path_factory):
    """(the compact dict of an 8k-token text with the focus "queries", the page written from it)."""
    result = qkv.explain(long_text(8000), long_llama)
    assert len(result.tokens) > 7900 and result.compact_view()
    data = result.to_dict(focus="queries")
    path = write_html(data, tmp_path_factory.mktemp("page") / "long.html")
    return data, path


def embedded(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', page, re.S)
    assert block is not None
    return json.loads(block.group(1))


def test_an_8k_token_page_is_small_and_holds_the_compact_view(page_8k):
    data, path = page_8k
    size = path.stat().st_size
    print(f"the page of {len(data['labels'])} words: {size:,} bytes")
    assert size < 10 * MB, f"the HTML of 8k tokens is {size / MB:.1f} MB (bound: 10 MB)"
    n, L, H = len(data["labels"]), len(data["rows"]["top"]), len(data["head_names"])
    # Linear in n: labels, minimap (received, entropy) and the focus row are 3 x L x n numbers.
    assert size < 2 * answer_bytes(n, L, H, "rows") + 200_000
    back = embedded(path.read_text(encoding="utf-8"))
    assert "maps" not in back and back["view"] == "rows"
    assert back == json.loads(json.dumps(data)), "the page's data is not the dict it was made from"


def test_a_compact_dict_of_a_short_text_renders(minilm):
    """Any compact dict renders (rows given explicitly), and the full view is unchanged."""
    result = qkv.explain("The cat sat on the mat.", minilm)
    compact = result.to_dict(rows=[2, 3], focus="cat")
    assert compact["view"] == "rows" and "maps" not in compact
    back = embedded(render_html(compact))
    assert back == json.loads(json.dumps(compact))
    full = embedded(render_html(result.to_dict()))
    assert full["view"] == "full" and len(full["maps"]) == result.num_layers


class Page:
    """The page opened from disk, with its requests, dialogs and script errors recorded."""

    def __init__(self, browser, path: Path):
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.errors.append("dialog " + d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_selector("body[data-ready=true]", timeout=60_000)
        self.page.wait_for_selector("body[data-thumbs=ready]", timeout=60_000)

    def blocks(self) -> list[dict]:
        """Each drawn row: its dataset and its top keys' (index, weight)."""
        return self.page.eval_on_selector_all("#row-view .row-block", """els => els.map(b => ({
            data: Object.assign({}, b.dataset),
            keys: Array.from(b.querySelectorAll('.chip')).map(c => [Number(c.dataset.index), Number(c.dataset.weight)])
        }))""")

    def check_clean(self):
        bad = [u for u in self.requests if urlparse(u).scheme not in ALLOWED_SCHEMES]
        assert not bad, f"the page made network requests: {bad}"
        assert not self.errors, f"script errors or dialogs: {self.errors}"


def assert_block(block: dict, top: dict, layer: int, head: int, row: int):
    assert (block["data"]["layer"], block["data"]["head"], block["data"]["row"]) == (str(layer), str(head), str(row))
    assert block["data"]["source"] == "shipped"
    assert block["keys"] == [list(kw) for kw in zip(top["keys"], top["weights"])], \
        f"layer {layer} head {head} row {row}: shown {block['keys']}, the data {top}"
    assert float(block["data"]["rest"]) == top["rest"] and int(block["data"]["leftOut"]) == top["left_out"]


def test_the_8k_page_in_the_browser(browser, page_8k):
    data, path = page_8k
    page = Page(browser, path)
    p = page.page
    n, L = len(data["labels"]), len(data["rows"]["top"])
    focus = data["focus"]["index"]
    assert data["rows"]["index"] == [focus]

    # No element per word: the whole document stays a few hundred elements for 8k words.
    count = p.evaluate("document.getElementsByTagName('*').length")
    assert count < 600, f"{count} elements for {n} words"
    assert p.locator("#minimap canvas.strip").count() == L
    assert p.locator("#focus canvas.strip").count() == L

    # The summary table: one cell per layer and head, the data's numbers.
    for metric in ("entropy", "distance", "sink"):
        p.select_option("#summary-metric", metric)
        cells = p.eval_on_selector_all("#summary-table td.cell", "els => els.map(e => Number(e.dataset.value))")
        assert cells == [v for row in data["summary"][metric] for v in row], metric

    # It opens on the focus row, last layer, head 0: the shipped top keys.
    blocks = page.blocks()
    assert len(blocks) == 1
    assert_block(blocks[0], data["rows"]["top"][L - 1][0][0], L - 1, 0, focus)

    # A head button, then a cell of the summary table.
    p.click("#head-2")
    assert_block(page.blocks()[0], data["rows"]["top"][L - 1][2][0], L - 1, 2, focus)
    p.click("#cell-0-3")
    assert_block(page.blocks()[0], data["rows"]["top"][0][3][0], 0, 3, focus)

    # Focus rows: the focus word in every layer, for the chosen head.
    p.check("#mode-focus")
    blocks = page.blocks()
    assert [b["data"]["layer"] for b in blocks] == [str(lay) for lay in range(L)]
    for lay, b in enumerate(blocks):
        assert_block(b, data["rows"]["top"][lay][3][0], lay, 3, focus)

    # A click on the minimap picks the word under the mouse; this file does not hold its row.
    strip = p.locator("#minimap-1")
    box = strip.bounding_box()
    strip.click(position={"x": box["width"] * 0.25, "y": box["height"] / 2})
    row = int(p.get_attribute("#row-view", "data-row"))
    assert abs(row - n // 4) <= n / box["width"] + 1, f"clicked a quarter in, got row {row} of {n}"
    assert p.get_attribute("#row-view", "data-layer") == "1"
    assert [b["data"]["source"] for b in page.blocks()] == ["none"]
    assert "not in this file" in p.text_content("#row-status")
    assert p.text_content("#row-context b") == data["labels"][row]

    # Typing the focus word's number shows its row again.
    p.fill("#row-input", str(focus))
    p.press("#row-input", "Enter")
    assert_block(page.blocks()[0], data["rows"]["top"][1][3][0], 1, 3, focus)
    page.check_clean()

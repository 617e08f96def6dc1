"""The HTML page of `qkv explain` in a real browser: headless Chromium driven by Playwright.

It opens the file from disk, records every request the page makes (only file:, data:, blob:
and about: are allowed), clicks words, heads, layers and thumbnails and checks that the shown
weights are the data's row, and checks that the malicious label fires no dialog.

The browser is Debian's chromium at /usr/bin/chromium (scripts/install-test-browser.sh);
Playwright's own browser download is never used. Without it this test FAILS, telling how to
install it, unless QKV_SKIP_BROWSER=1 is set. With QKV_UPDATE_DOCS=1 it also rewrites
docs/images/explain-html.png.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from synthetic_explain import MALICIOUS_LABEL, docs_data, make_data

from qkv.inspect.html import write_html

ALLOWED_SCHEMES = {"file", "data", "blob", "about"}
DOCS_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "explain-html.png"


class Page:
    """A page opened from disk, with its requests, dialogs and script errors recorded."""

    def __init__(self, browser, path: Path, viewport=(1280, 800)):
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_selector("body[data-ready=true]", timeout=60_000)
        self.page.wait_for_selector("body[data-thumbs=ready]", timeout=60_000)

    def shown(self) -> tuple[list[str], list[float]]:
        """The `.w` texts and the data-weight attributes of the key column."""
        texts = self.page.eval_on_selector_all("#keys .word.k .w", "els => els.map(e => e.textContent)")
        weights = self.page.eval_on_selector_all("#keys .word.k", "els => els.map(e => Number(e.dataset.weight))")
        return texts, weights

    def state(self) -> dict:
        return self.page.eval_on_selector("#head-view", "e => Object.assign({}, e.dataset)")

    def check_clean(self):
        bad = [u for u in self.requests if urlparse(u).scheme not in ALLOWED_SCHEMES]
        assert not bad, f"the page made network requests: {bad}"
        assert not self.dialogs, f"a dialog fired: {self.dialogs}"
        assert not self.errors, f"script errors: {self.errors}"


def assert_row(page: Page, expected: np.ndarray, what: str):
    texts, weights = page.shown()
    assert texts == [f"{w:.3f}" for w in np.round(expected, 3)] or np.allclose(
        [float(t) for t in texts], expected, atol=5e-4 + 1e-9, rtol=0
    ), f"{what}: shown {texts}, data {np.round(expected, 3).tolist()}"
    err = np.abs(np.asarray(weights) - expected).max()
    assert err <= 5e-6 * max(1.0, expected.max()), f"{what}: data-weight differs from the data by {err:.3g}"


def test_clicks_show_the_data_rows_offline(browser, tmp_path):
    data = make_data(n_words=8, layers=3, heads=4, seed=1, focus=2)
    maps = np.asarray(data["maps"])  # (L, H, n, n)
    L = maps.shape[0]  # maps: (L, H, n, n)
    page = Page(browser, write_html(data, tmp_path / "explain.html"))

    # Starts on the focus word, last layer, mean of heads.
    st = page.state()
    assert (st["selected"], st["layer"], st["head"]) == ("2", str(L - 1), "mean")
    assert_row(page, maps[L - 1].mean(0)[2], "focus row at start")
    before = page.shown()[0]

    # A click on another query word shows its row.
    page.page.click('#queries .word.q[data-index="5"]')
    assert page.state()["selected"] == "5"
    after = page.shown()[0]
    assert after != before, "clicking a word did not change the highlighted weights"
    assert_row(page, maps[L - 1].mean(0)[5], "row 5, mean of heads")

    # Hovering another word previews its row; leaving it shows the selected row again.
    page.page.hover('#queries .word.q[data-index="4"]')
    assert (page.state()["shown"], page.state()["selected"]) == ("4", "5")
    assert_row(page, maps[L - 1].mean(0)[4], "hovered row 4")
    page.page.hover("#head-h")
    assert page.state()["shown"] == "5"
    assert_row(page, maps[L - 1].mean(0)[5], "row 5 after the hover")

    # One head, then another layer, then a thumbnail of the model view.
    page.page.click("#head-1")
    assert page.state()["head"] == "1"
    assert_row(page, maps[L - 1, 1, 5], "row 5, head 1")
    page.page.select_option("#layer-select", "0")
    assert page.state()["layer"] == "0"
    assert_row(page, maps[0, 1, 5], "row 5, layer 0 head 1")
    page.page.click("#thumb-1-3")
    st = page.state()
    assert (st["layer"], st["head"], st["selected"]) == ("1", "3", "5")
    assert_row(page, maps[1, 3, 5], "row 5 after a thumbnail click")

    # Keyboard: arrow down moves the selection.
    page.page.focus('#queries .word.q[data-index="5"]')
    page.page.keyboard.press("ArrowDown")
    assert page.state()["selected"] == "6"
    assert_row(page, maps[1, 3, 6], "row 6 after ArrowDown")

    # The malicious label is shown as text, and the title text did not become markup.
    bad = data["labels"].index(MALICIOUS_LABEL)
    assert page.page.text_content(f'#queries .word.q[data-index="{bad}"]') == MALICIOUS_LABEL
    page.page.click(f'#queries .word.q[data-index="{bad}"]')
    assert page.page.text_content("#title-text") == "\u201c" + data["text"] + "\u201d"
    assert page.page.eval_on_selector(
        "body", "b => b.querySelectorAll('h1 b, #keys script, #queries script').length") == 0
    page.check_clean()


def test_value_norm_and_rollout_pages(browser, tmp_path):
    data = make_data(n_words=6, layers=2, heads=3, seed=2, method="value-norm", focus=None)
    page = Page(browser, write_html(data, tmp_path / "vn.html"))
    assert page.state()["selected"] == "-1"
    assert page.shown()[0] == [""] * len(data["labels"]), "weights shown with no word selected"
    first = page.page.locator('#queries .word.q[data-index="0"]')
    y0 = first.bounding_box()["y"]
    page.page.click('#queries .word.q[data-index="3"]')
    # Hovering and clicking rewrite the status line; the words must not move under the mouse.
    assert first.bounding_box()["y"] == y0, "the head view moved when a word was selected"
    assert_row(page, np.asarray(data["maps"])[1].mean(0)[3], "value-norm row 3")
    page.check_clean()

    roll = make_data(n_words=6, layers=2, heads=3, seed=3, focus=1)
    roll["method"] = "rollout"
    roll["maps"] = [[np.mean(layer, axis=0).tolist()] for layer in roll["maps"]]
    roll["head_names"] = ["rollout"]
    roll["entropy"] = [[0.5], [0.4]]
    page = Page(browser, write_html(roll, tmp_path / "rollout.html"))
    assert page.state()["head"] == "0"
    assert page.page.locator("#head-picker button").count() == 1
    assert_row(page, np.asarray(roll["maps"])[1, 0, 1], "rollout focus row")
    page.check_clean()


def test_two_hundred_labels_do_not_freeze(browser, tmp_path):
    data = make_data(n_words=198, layers=2, heads=4, seed=4, focus=10)
    path = write_html(data, tmp_path / "big.html")
    t0 = time.perf_counter()
    page = Page(browser, path)
    loaded = time.perf_counter() - t0
    # Generous bounds: the machine may be shared; a frozen page takes minutes, not seconds.
    assert loaded < 30, f"200 labels took {loaded:.1f} s to load and draw"
    t0 = time.perf_counter()
    page.page.click('#queries .word.q[data-index="150"]')
    clicked = time.perf_counter() - t0
    assert page.state()["selected"] == "150"
    assert_row(page, np.asarray(data["maps"])[1].mean(0)[150], "row 150 of 200")
    assert clicked < 10, f"a click took {clicked:.1f} s with 200 labels"
    page.check_clean()


def test_docs_screenshot(browser, tmp_path):
    page = Page(browser, write_html(docs_data(), tmp_path / "docs.html"), viewport=(1360, 900))
    page.check_clean()
    shot = page.page.screenshot(full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
    if os.environ.get("QKV_UPDATE_DOCS") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        DOCS_IMAGE.write_bytes(shot)

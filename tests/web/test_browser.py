"""The explorer end to end in headless Chromium: the real server (uvicorn) on a free 127.0.0.1
port, the real MiniLM, a person's clicks; the page must show the API's numbers and never send a
request anywhere but the server.

The browser is Debian's chromium at /usr/bin/chromium (scripts/install-test-browser.sh);
Playwright's own browser download is never used. Without it this test FAILS, telling how to
install it, unless QKV_SKIP_BROWSER=1 is set. With QKV_UPDATE_DOCS=1 it also rewrites
docs/images/web.png.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from qkv.web.app import create_app

from .web_helpers import TEXT, running_server

DOCS_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "web.png"
MALICIOUS = '<img src=x onerror=alert(1)> </script><script>alert(2)</script> "cat"'


@pytest.fixture(scope="module")
def server(registry):
    app = create_app(registry=registry, max_chars=1000)  # the error shown below is a text over the limit
    with running_server(app) as url:
        yield url, app
    assert app.state.internal_errors == 0


class Explorer:
    """The page, with its requests, dialogs and script errors recorded."""

    def __init__(self, browser, url: str):
        self.url = url
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1360, "height": 900})
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # A 4xx answer is logged by the browser as a console error; the page shows it (tested).
        self.page.on("console", lambda m: m.type == "error" and not m.text.startswith(
            "Failed to load resource: the server responded with a status of 4") and self.errors.append(m.text))
        self.page.goto(url + "/")
        self.page.wait_for_selector("body[data-models=ready]", timeout=30_000)

    def explain(self, text: str, other: str = "", focus: str = ""):
        self.page.fill("#text", text)
        self.page.fill("#other", other)
        self.page.fill("#focus", focus)
        self.page.click("#go")
        self.wait_ready()

    def wait_ready(self):
        self.page.wait_for_selector("body[data-ready=true][data-busy=false]", timeout=30_000)
        self.page.wait_for_selector("#view-a[data-thumbs=ready]", timeout=30_000)

    def word_index(self, word: str) -> int:
        texts = self.page.eval_on_selector_all("#queries .word.q", "els => els.map(e => e.textContent)")
        return texts.index(word)

    def shown(self) -> np.ndarray:
        return np.asarray(self.page.eval_on_selector_all(
            "#keys .word.k", "els => els.map(e => e.dataset.weight === undefined ? NaN : Number(e.dataset.weight))"))

    def shown_texts(self) -> list[str]:
        return self.page.eval_on_selector_all("#keys .word.k .w", "els => els.map(e => e.textContent)")

    def attended(self) -> np.ndarray:
        return np.asarray(self.page.eval_on_selector_all(
            "#attended .chip", "els => els.map(e => Number(e.dataset.weight))"))

    def state(self) -> dict:
        return self.page.eval_on_selector("#head-view", "e => Object.assign({}, e.dataset)")

    def check_clean(self):
        host = urlparse(self.url)
        bad = [u for u in self.requests
               if not (urlparse(u).scheme == "data" or
                       (urlparse(u).scheme == "http" and urlparse(u).hostname == "127.0.0.1"
                        and urlparse(u).port == host.port))]
        assert not bad, f"the page made requests beyond 127.0.0.1:{host.port}: {bad}"
        assert not self.dialogs, f"a dialog fired: {self.dialogs}"
        assert not self.errors, f"script errors: {self.errors}"


def api(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def close(shown, expected, what):
    err = np.abs(np.asarray(shown) - np.asarray(expected)).max()
    assert err <= 1e-6, \
        f"{what}: the page shows {np.round(shown, 4).tolist()}, the API {np.round(expected, 4).tolist()}"


def test_click_cat_shows_the_api_numbers(browser, server):
    url, _ = server
    page = Explorer(browser, url)
    page.explain(TEXT)
    data = api(url, "/api/explain", {"text": TEXT})
    maps = np.asarray(data["maps"])  # (L, H, n, n)
    L = maps.shape[0]
    assert page.state()["selected"] == "-1" and np.isnan(page.shown()).all(), "weights shown before any click"
    assert page.page.text_content("#title-text") == "\u201c" + TEXT + "\u201d"

    cat = page.word_index("cat")
    page.page.click(f'#queries .word.q[data-index="{cat}"]')
    st = page.state()
    assert (st["selected"], st["layer"], st["head"]) == (str(cat), str(L - 1), "mean")
    close(page.shown(), maps[L - 1].mean(0)[cat], "cat, last layer, mean of heads")
    assert page.shown_texts() == [f"{w:.3f}" for w in maps[L - 1].mean(0)[cat]]
    close(page.attended(), maps[L - 1].mean(0)[:, cat], "what attends to cat")
    mean_row = page.shown()

    # one head: the highlighted weights change, and are that head's row
    page.page.click("#head-11")
    close(page.shown(), maps[L - 1, 11, cat], "cat, last layer, head 11")
    assert np.abs(page.shown() - mean_row).max() > 0.05, "choosing a head did not change the weights"

    # the step-through of that word in that head: the API's numbers
    page.page.wait_for_selector(f'#steps[data-ready=true][data-layer="{L - 1}"][data-head="11"]', timeout=30_000)
    steps = api(url, "/api/steps", {"text": TEXT, "word": cat, "layer": L - 1, "head": 11})
    rows = page.page.eval_on_selector_all(
        "#steps-table tbody tr", "els => els.map(e => [Number(e.dataset.weight), Number(e.dataset.score)])")
    close([w for w, _ in rows], steps["weights"], "softmax weights of the step-through")
    close([s for _, s in rows], steps["scores"], "scaled scores of the step-through")
    # explain's maps are rounded to 5 decimals; the steps keep full precision
    np.testing.assert_allclose(steps["weights"], maps[L - 1, 11, cat], rtol=0, atol=5e-6 + 1e-9)
    assert page.page.text_content("#steps-word").startswith("query token \u201ccat\u201d")
    if os.environ.get("QKV_UPDATE_DOCS") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        page.page.screenshot(path=str(DOCS_IMAGE), full_page=True)

    # another layer from the model view
    page.page.click("#thumb-1-3")
    close(page.shown(), maps[1, 3, cat], "cat, layer 1, head 3")

    # rollout: the page asks again and keeps the selected word
    page.page.check("#method-rollout")
    page.page.wait_for_selector("#meta b:text-is('rollout')", timeout=30_000)
    page.wait_ready()
    roll = np.asarray(api(url, "/api/explain", {"text": TEXT, "method": "rollout"})["maps"])
    st = page.state()
    assert st["selected"] == str(cat) and st["head"] == "0"
    close(page.shown(), roll[int(st["layer"]), 0, cat], "cat, rollout")

    # value-norm: not normalised, numbers as the API gives them
    page.page.check("#method-value-norm")
    page.page.wait_for_selector("#meta b:text-is('value-norm')", timeout=30_000)
    page.wait_ready()
    vn = np.asarray(api(url, "/api/explain", {"text": TEXT, "method": "value-norm"})["maps"])
    st = page.state()
    assert (st["selected"], st["head"]) == (str(cat), "0")  # kept from the rollout view
    close(page.shown(), vn[int(st["layer"]), 0, cat], "cat, value-norm, head 0")
    page.check_clean()


def test_compare_and_escaping(browser, server):
    url, _ = server
    page = Explorer(browser, url)
    page.explain(TEXT, other="The dog sat on the mat.", focus="sat")
    page.page.wait_for_selector("#view-b[data-ready=true]", timeout=30_000)
    assert page.page.text_content("#b-title-text") == "\u201cThe dog sat on the mat.\u201d"
    res = api(url, "/api/compare", {"text": TEXT, "other": "The dog sat on the mat.", "focus": "sat"})
    cells = page.page.eval_on_selector_all("#jsd-table tbody td", "els => els.map(e => e.textContent)")
    assert cells == [f"{v:.2f}" for row in res["jsd"] for v in row]
    assert "largest change" in page.page.text_content("#compare-note")

    # markup in the sentence is shown as text, never run
    page.explain(MALICIOUS)
    assert page.page.text_content("#title-text") == "\u201c" + MALICIOUS + "\u201d"
    assert page.page.eval_on_selector("body", "b => b.querySelectorAll('#view-a img, #view-a script').length") == 0
    assert not page.page.is_visible("#view-b")

    # an error from the API is shown as a message (the input's maxlength is bypassed here)
    page.page.evaluate("document.getElementById('text').value = 'y'.repeat(1500)")
    page.page.click("#go")
    page.page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "at most 1000" in page.page.text_content("#error")
    page.check_clean()

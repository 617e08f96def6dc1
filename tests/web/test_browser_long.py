"""The explorer on a long text, end to end in headless Chromium: a 4k-token text on a tiny random
long-context decoder (tests/models/hf_folders.py, 8,192 positions) served from --model-dir by
the real server (uvicorn on 127.0.0.1). /api/explain answers the compact view with a session;
the page draws the minimap, and each row a person picks (a click on the minimap, a typed number,
a head, the focus rows) is fetched from /api/weights and drawn. The drawn numbers must be
`ExplainResult.weights_dict` of the same model for that row, and no request may leave the server.

Chromium as in tests/web/test_browser.py (QKV_SKIP_BROWSER=1 skips it).
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlparse

import numpy as np
import pytest

import qkv
from qkv.web.app import create_app

from .web_helpers import running_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL = "long-llama"
TEXT = " ".join(["the cat sat on the mat"] * 666) + " queries"  # 3,997 words
OTHER = " ".join(["a dog ran in the park"] * 333) + " queries"
WAIT = 240_000  # ms: explaining 4k tokens computes every row's summaries (n^2 work) on a shared CPU


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from models.hf_folders import build_folder

    root = tmp_path_factory.mktemp("models")
    build_folder(root / MODEL, "llama", max_position_embeddings=8192)
    app = create_app(model_dir=str(root))
    with running_server(app) as url:
        yield url, qkv.load(root / MODEL)
    assert app.state.internal_errors == 0


class Explorer:
    def __init__(self, browser, url: str):
        self.url = url
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1360, "height": 900})
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.errors.append("dialog " + d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.goto(url + "/")
        self.page.wait_for_selector("body[data-models=ready]", timeout=30_000)

    def explain(self, text: str, other: str = "", focus: str = ""):
        p = self.page
        p.select_option("#model", MODEL)
        p.fill("#text", text)
        p.fill("#other", other)
        p.fill("#focus", focus)
        p.click("#go")
        p.wait_for_selector("body[data-ready=true][data-busy=false]", timeout=WAIT)
        p.wait_for_selector("#view-a[data-view=rows][data-thumbs=ready]", timeout=30_000)

    def drawn(self, prefix: str = "") -> list[dict]:
        """The rows drawn once their fetch answered: dataset and top keys (index, weight)."""
        self.page.wait_for_selector(f"#{prefix}row-view[data-state=ready]", timeout=30_000)
        return self.page.eval_on_selector_all(f"#{prefix}row-view .row-block", """els => els.map(b => ({
            data: Object.assign({}, b.dataset),
            keys: Array.from(b.querySelectorAll('.chip')).map(c => [Number(c.dataset.index), Number(c.dataset.weight)])
        }))""")

    def click_minimap(self, layer: int, at: float, prefix: str = "") -> int:
        strip = self.page.locator(f"#{prefix}minimap-{layer}")
        box = strip.bounding_box()
        strip.click(position={"x": box["width"] * at, "y": box["height"] / 2})  # scrolled into view
        return int(self.page.get_attribute(f"#{prefix}row-view", "data-row"))

    def check_clean(self):
        port = urlparse(self.url).port
        bad = [u for u in self.requests if not (urlparse(u).scheme == "data" or (
            urlparse(u).scheme == "http" and urlparse(u).hostname == "127.0.0.1" and urlparse(u).port == port))]
        assert not bad, f"the page made requests beyond 127.0.0.1:{port}: {bad}"
        assert not self.errors, f"script errors or dialogs: {self.errors}"


def assert_drawn(block: dict, expected: np.ndarray, layer: int, head: int, row: int, k: int):
    """The drawn row is `expected` (weights_dict's row): its top keys are the k largest weights
    with their values, and the rest and the total are the row's."""
    d = block["data"]
    assert (d["layer"], d["head"], d["row"], d["source"]) == (str(layer), str(head), str(row), "fetched")
    keys = [j for j, _ in block["keys"]]
    shown = np.asarray([w for _, w in block["keys"]])
    assert len(keys) == min(k, int((expected > 0).sum()))
    np.testing.assert_array_equal(shown, expected[keys], err_msg=f"layer {layer} head {head} row {row}")
    others = np.delete(expected, keys)
    assert shown.min() >= others.max(), "the drawn keys are not the row's largest"
    assert list(shown) == sorted(shown, reverse=True)
    np.testing.assert_allclose(float(d["sum"]), expected.sum(), atol=1e-6)
    np.testing.assert_allclose(float(d["rest"]), others.sum(), atol=1e-6)
    assert int(d["leftOut"]) == int((others > 0).sum())


def test_a_4k_token_text_fetches_the_rows_it_shows(browser, served):
    url, model = served
    page = Explorer(browser, url)
    p = page.page
    page.explain(TEXT, focus="queries")
    reference = qkv.explain(TEXT, model)
    n = len(reference.labels())
    assert n > 3900 and reference.compact_view()
    L = reference.num_layers
    k = int(p.evaluate("document.querySelectorAll('#row-view .row-block .chip').length"))
    assert p.evaluate("document.getElementsByTagName('*').length") < 1000, "an element per word was drawn"
    assert p.locator("#minimap canvas.strip").count() == L
    assert p.is_hidden("#steps")

    def ref(rows, layers, head):  # (layers, n) the reference rows of one head
        w = reference.weights_dict(rows, layers=layers, heads=[head])
        return np.asarray(w["weights"])[:, 0, 0]

    # It opens on the focus word ("queries", the last word), last layer, head 0, fetched whole.
    focus = n - 1
    assert_drawn(page.drawn()[0], ref([focus], [L - 1], 0)[0], L - 1, 0, focus, k)

    # Clicks on the minimap: the row under the mouse, in that strip's layer.
    for layer, at in ((0, 0.3), (1, 0.62), (L - 1, 0.05)):
        row = page.click_minimap(layer, at)
        assert abs(row - at * n) <= 8, f"clicked {at:.0%} along, got row {row} of {n}"
        assert_drawn(page.drawn()[0], ref([row], [layer], 0)[0], layer, 0, row, k)

    # Another head; then a row typed by number.
    p.click("#head-3")
    assert_drawn(page.drawn()[0], ref([row], [L - 1], 3)[0], L - 1, 3, row, k)
    p.fill("#row-input", "1234")
    p.press("#row-input", "Enter")
    assert_drawn(page.drawn()[0], ref([1234], [L - 1], 3)[0], L - 1, 3, 1234, k)

    # Focus rows: the focus word in every layer for head 3, one request.
    p.check("#mode-focus")
    blocks = page.drawn()
    expected = ref([focus], list(range(L)), 3)
    assert len(blocks) == L
    for layer, block in enumerate(blocks):
        assert_drawn(block, expected[layer], layer, 3, focus, k)
    assert sum("/api/weights" in u for u in page.requests) >= 6
    page.check_clean()


def test_compare_two_long_texts_fetches_each_side(browser, served):
    url, model = served
    page = Explorer(browser, url)
    p = page.page
    page.explain(TEXT, other=OTHER, focus="queries")
    p.wait_for_selector("#view-b[data-view=rows]", timeout=30_000)
    a, b = qkv.explain(TEXT, model), qkv.explain(OTHER, model)
    k = int(p.evaluate("document.querySelectorAll('#row-view .row-block .chip').length"))
    row_a = page.click_minimap(1, 0.5)
    w = np.asarray(a.weights_dict([row_a], layers=[1], heads=[0])["weights"])[0, 0, 0]
    assert_drawn(page.drawn()[0], w, 1, 0, row_a, k)
    row_b = page.click_minimap(0, 0.5, prefix="b-")
    w = np.asarray(b.weights_dict([row_b], layers=[0], heads=[0])["weights"])[0, 0, 0]
    assert abs(row_b - len(b.labels()) / 2) <= 8
    assert_drawn(page.drawn("b-")[0], w, 0, 0, row_b, k)
    page.check_clean()


def test_focus_rows_of_more_layers_than_a_request_may_name(browser, tmp_path):
    """A server that sends one layer a request (max_pick=1), a model of 3 layers: the focus rows of
    every layer are asked in parts, each naming one layer, and joined in order."""
    from models.hf_folders import build_folder

    root = tmp_path / "models"
    build_folder(root / MODEL, "llama", max_position_embeddings=8192, num_hidden_layers=3)
    app = create_app(model_dir=str(root), max_pick=1)
    text = " ".join(TEXT.split()[-1200:])  # ends with "queries"
    with running_server(app) as url:
        page = Explorer(browser, url)
        p = page.page
        bodies: list[dict] = []
        p.on("request", lambda r: "/api/weights" in r.url and bodies.append(json.loads(r.post_data)))
        page.explain(text, focus="queries")
        k = int(p.evaluate("document.querySelectorAll('#row-view .row-block .chip').length"))
        reference = qkv.explain(text, qkv.load(root / MODEL))
        L, focus = reference.num_layers, len(reference.labels()) - 1
        assert L == 3
        p.check("#mode-focus")
        blocks = page.drawn()
        expected = np.asarray(reference.weights_dict([focus], layers=list(range(L)), heads=[0])["weights"])[:, 0, 0]
        assert len(blocks) == L
        for layer, block in enumerate(blocks):
            assert_drawn(block, expected[layer], layer, 0, focus, k)
        assert bodies and all(len(b["layers"]) == 1 for b in bodies), bodies
        assert {b["layers"][0] for b in bodies} == set(range(L)), "every layer was fetched, one a request"
        page.check_clean()
    assert app.state.internal_errors == 0

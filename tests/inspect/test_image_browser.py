"""The offline HTML page of an image result in a real browser (headless Chromium via Playwright).

The bundled digits model explains its sample digit-3.png (a 4x4 patch grid + class token, 4 layers x
4 heads). The page is opened from disk with every request routed: an http(s) request fails the test.
The weights the overlay draws on each patch (`.qkv-patch[data-weight]`, 4 decimals) are compared
with the result's own numbers: `to_dict()`'s maps (head mean taken here), `to_dict(method=
"rollout")` and `image_maps` (which also checks the patch layout: data-row, data-col).

The browser is /usr/bin/chromium (tests/conftest.py's `browser` fixture).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

import qkv
from qkv.inspect.html import write_html

SAMPLE = qkv.models.bundled_path("digits") / "samples" / "digit-3.png"
MALICIOUS_NAME = "<img src=x onerror=alert(1)>.png"
ALLOWED_SCHEMES = {"file", "data", "blob", "about"}
TOL = 0.5e-4 + 2e-6  # data-weight has 4 decimals; the page's weights carry 6 significant digits


@pytest.fixture(scope="module")
def digit():
    return qkv.explain(image=SAMPLE, model="digits")


class ImagePage:
    """A page opened from disk; requests, dialogs and script errors recorded, http(s) refused."""

    def __init__(self, browser, path: Path):
        self.requests: list[str] = []
        self.refused: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_selector("body[data-ready=true]", timeout=60_000)
        self.page.wait_for_selector(".qkv-image .qkv-patch", timeout=60_000)

    def _route(self, route):
        url = route.request.url
        if urlparse(url).scheme in ("http", "https"):
            self.refused.append(url)
            route.abort()
        else:
            route.continue_()

    def patches(self) -> list[dict]:
        return self.page.eval_on_selector_all(".qkv-image .qkv-patch",
                                              "els => els.map(e => Object.assign({}, e.dataset))")

    def weights(self, first: int, n_patches: int) -> np.ndarray:
        """data-weight of every patch in unit order: (n_patches,); NaN where absent."""
        out = np.full(n_patches, np.nan)
        for p in self.patches():
            w = p.get("weight")
            out[int(p["unit"]) - first] = float(w) if w is not None else np.nan
        return out

    def focus_text(self) -> str:
        return self.page.text_content(".qkv-image-focus") or ""

    def state(self) -> dict:
        return self.page.eval_on_selector(".qkv-image", "e => Object.assign({}, e.dataset)")

    def close(self):
        self.context.close()

    def check_clean(self):
        bad = [u for u in self.requests if urlparse(u).scheme not in ALLOWED_SCHEMES]
        assert not self.refused and not bad, f"the page made network requests: {self.refused + bad}"
        assert not self.dialogs, f"a dialog fired: {self.dialogs}"
        assert not self.errors, f"script errors: {self.errors}"


def assert_weights(page: ImagePage, first: int, expected: np.ndarray, what: str):
    got = page.weights(first, expected.size)
    assert not np.isnan(got).any(), f"{what}: some patches have no data-weight: {got.tolist()}"
    err = np.abs(got - expected).max()
    assert err <= TOL, f"{what}: drawn {got.tolist()}, data {np.round(expected, 4).tolist()} (off by {err:.3g})"


def test_hover_a_patch_shows_its_row(browser, digit, tmp_path):
    data = digit.to_dict()
    maps = np.asarray(data["maps"])  # (L, H, n, n)
    L, H, n, _ = maps.shape
    im = data["image"]
    first, (gr, gc) = im["first_patch"], im["grid"]
    cls = im["class_token"]
    patches = slice(first, first + gr * gc)
    path = tmp_path / "digit.html"
    digit.save_html(path)
    page = ImagePage(browser, path)
    try:
        # One patch element per patch, laid out as the result's grid.
        cells = page.patches()
        assert len(cells) == gr * gc
        assert {(int(c["row"]), int(c["col"])) for c in cells} == {(r, c) for r in range(gr) for c in range(gc)}
        for c in cells:
            assert int(c["unit"]) == first + int(c["row"]) * gc + int(c["col"])
        assert page.page.eval_on_selector("img.qkv-image-picture", "e => e.getAttribute('src')") == im["pixels"]
        assert page.page.eval_on_selector("img.qkv-image-picture", "e => e.complete && e.naturalWidth") == im["size"][1]

        # Default: the class token's row, last layer, mean of heads.
        st = page.state()
        assert (st["layer"], st["head"], st["focus"]) == (str(L - 1), "mean", str(cls))
        assert "[CLS]" in page.focus_text()
        assert_weights(page, first, maps[L - 1].mean(0)[cls, patches], "class token, last layer, mean of heads")
        # The same through image_maps, by data-row/data-col: (L, H, rows, cols)
        grid = digit.image_maps(focus="cls").mean(1)[L - 1]  # (rows, cols)
        for c in page.patches():
            assert abs(float(c["weight"]) - float(grid[int(c["row"]), int(c["col"])])) <= TOL

        # Hover patch r1c2: it becomes the focus.
        unit = data["labels"].index("r1c2")
        page.page.hover(f'.qkv-patch[data-unit="{unit}"]')
        assert "r1c2" in page.focus_text()
        assert page.state()["focus"] == str(unit)
        assert_weights(page, first, maps[L - 1].mean(0)[unit, patches], "hovered r1c2, mean of heads")
        caption = page.page.text_content(".qkv-image-caption")
        assert "r1c2" in caption and "class token" in caption
        # It stays the focus when the mouse leaves the picture.
        page.page.hover("#image-h")
        assert "r1c2" in page.focus_text()

        # One head, then another layer, through the image panel's controls.
        page.page.click("#image-head-2")
        assert page.state()["head"] == "2"
        assert_weights(page, first, maps[L - 1, 2, unit, patches], "r1c2, head 2")
        page.page.select_option("#image-layer", "0")
        assert page.state()["layer"] == "0"
        assert_weights(page, first, maps[0, 2, unit, patches], "r1c2, layer 0 head 2")
        # The head view below follows.
        hv = page.page.eval_on_selector("#head-view", "e => Object.assign({}, e.dataset)")
        assert (hv["layer"], hv["head"]) == ("0", "2")
        # And the image follows the head view's controls.
        page.page.click("#head-1")
        assert page.state()["head"] == "1"
        assert_weights(page, first, maps[0, 1, unit, patches], "r1c2, layer 0 head 1 (from the head view)")
        # A thumbnail of the focus's grid picks its layer and head.
        page.page.click("#image-thumb-2-3")
        assert (page.state()["layer"], page.state()["head"]) == ("2", "3")
        assert_weights(page, first, maps[2, 3, unit, patches], "r1c2, layer 2 head 3 (thumbnail)")

        # Another patch, by hover, and the class token again by its button.
        other = data["labels"].index("r3c0")
        page.page.hover(f'.qkv-patch[data-unit="{other}"]')
        assert "r3c0" in page.focus_text()
        assert_weights(page, first, maps[2, 3, other, patches], "r3c0, layer 2 head 3")
        page.page.click(".qkv-image-cls")
        assert "[CLS]" in page.focus_text() and page.state()["focus"] == str(cls)
        assert_weights(page, first, maps[2, 3, cls, patches], "class token, layer 2 head 3")

        # Method: rollout, computed by the page from the raw maps, against the core's rollout.
        roll = np.asarray(digit.to_dict(method="rollout")["maps"])[:, 0]  # (L, n, n)
        page.page.select_option("#image-method", "rollout")
        assert page.state()["method"] == "rollout"
        assert_weights(page, first, roll[2, cls, patches], "rollout, class token, layer 2")
        page.page.select_option("#image-layer", str(L - 1))
        assert_weights(page, first, roll[L - 1, cls, patches], "rollout, class token, last layer")
        page.page.hover(f'.qkv-patch[data-unit="{unit}"]')
        assert_weights(page, first, roll[L - 1, unit, patches], "rollout, r1c2, last layer")
        page.page.select_option("#image-method", "raw")
        assert_weights(page, first, maps[L - 1, 3, unit, patches], "raw again, r1c2, last layer head 3")

        # The prediction table: the result's classes in order.
        rows = page.page.eval_on_selector_all(
            ".qkv-image-prediction tbody tr",
            "els => els.map(e => [e.cells[0].textContent, e.cells[1].dataset.probability])")
        assert [(lab, float(p)) for lab, p in rows] == [(p["label"], p["probability"]) for p in im["prediction"]]
        page.check_clean()
    finally:
        page.close()


def test_value_norm_and_rollout_pages(browser, digit, tmp_path):
    for method in ("value-norm", "rollout"):
        data = digit.to_dict(method=method)
        maps = np.asarray(data["maps"])  # (L, H', n, n)
        first, (gr, gc), cls = data["image"]["first_patch"], data["image"]["grid"], data["image"]["class_token"]
        patches = slice(first, first + gr * gc)
        page = ImagePage(browser, write_html(data, tmp_path / f"{method}.html"))
        try:
            L = maps.shape[0]
            expected = maps[L - 1].mean(0)[cls, patches]  # rollout: one "head"
            assert_weights(page, first, expected, f"{method}: class token, last layer")
            assert page.page.locator("#image-method option").count() == 1
            unit = data["labels"].index("r2c1")
            page.page.hover(f'.qkv-patch[data-unit="{unit}"]')
            assert_weights(page, first, maps[L - 1].mean(0)[unit, patches], f"{method}: r2c1")
            page.check_clean()
        finally:
            page.close()


def test_hidden_class_token(browser, digit, tmp_path):
    data = digit.to_dict(hide_special=True)
    maps = np.asarray(data["maps"])  # (L, H, n, n), the patches only
    assert data["image"]["class_token"] is None and data["image"]["first_patch"] == 0
    page = ImagePage(browser, write_html(data, tmp_path / "hidden.html"))
    try:
        assert page.page.is_disabled(".qkv-image-cls")
        L = maps.shape[0]
        assert_weights(page, 0, maps[L - 1].mean(0)[0], "first patch, hidden class token")
        page.page.hover('.qkv-patch[data-unit="5"]')
        assert_weights(page, 0, maps[L - 1].mean(0)[5], "patch 5, hidden class token")
        page.check_clean()
    finally:
        page.close()
    # The compact view ships another row than the first patch's: the page starts on it.
    compact = digit.to_dict(rows="focus", hide_special=True)
    (shipped,) = compact["rows"]["index"]
    page = ImagePage(browser, write_html(compact, tmp_path / "hidden-compact.html"))
    try:
        assert compact["labels"][shipped] in page.focus_text()
        assert_weights(page, 0, maps[L - 1].mean(0)[shipped], "the shipped patch, hidden class token, compact")
        page.check_clean()
    finally:
        page.close()


def test_compact_view_draws_the_class_token_row(browser, digit, tmp_path):
    full = np.asarray(digit.to_dict()["maps"])  # (L, H, n, n)
    data = digit.to_dict(rows=[0])
    assert data["view"] == "rows"
    L = full.shape[0]
    first, (gr, gc), cls = data["image"]["first_patch"], data["image"]["grid"], data["image"]["class_token"]
    patches = slice(first, first + gr * gc)
    page = ImagePage(browser, write_html(data, tmp_path / "compact.html"))
    try:
        assert page.state()["view"] == "rows"
        assert_weights(page, first, full[L - 1].mean(0)[cls, patches], "compact: class token, mean of heads")
        page.page.click("#image-head-1")
        assert_weights(page, first, full[L - 1, 1, cls, patches], "compact: class token, head 1")
        # A patch whose row is not in the file: no weights drawn, and the caption says how to get it.
        unit = data["labels"].index("r2c2")
        page.page.hover(f'.qkv-patch[data-unit="{unit}"]')
        assert "r2c2" in page.focus_text()
        assert all(p.get("weight") is None for p in page.patches())
        caption = page.page.text_content(".qkv-image-caption")
        assert "rows='all'" in caption and "qkv explain --rows all" in caption
        page.page.click(".qkv-image-cls")
        assert_weights(page, first, full[L - 1, 1, cls, patches], "compact: the class token again")
        page.check_clean()
    finally:
        page.close()


def test_compact_view_fetches_a_patch_row(browser, digit, tmp_path):
    """options.fetchRows (qkv serve's mechanism): a patch whose row is not shipped is asked for, one
    call per head for the mean, and drawn when it comes. The fake server answers from the full maps."""
    full = digit.to_dict()["maps"]  # (L, H, n, n) nested lists
    data = digit.to_dict(rows=[0])
    L = len(full)
    first, (gr, gc) = data["image"]["first_patch"], data["image"]["grid"]
    patches = slice(first, first + gr * gc)
    page = ImagePage(browser, write_html(data, tmp_path / "fetch.html"))
    try:
        page.page.evaluate("""([data, full]) => {
            window.asked = [];
            const root = document.getElementById("qkv-root");
            window.view = QKV.mount(root, data, { fetchRows: (q) => {
                window.asked.push(q);
                // "qkv.weights/1": weights (layers, 1 head, 1 row, n)
                return Promise.resolve({ weights: q.layers.map(l => [[full[l][q.head][q.rows[0]]]]) });
            }});
        }""", [data, full])
        unit = data["labels"].index("r0c3")
        page.page.hover(f'.qkv-patch[data-unit="{unit}"]')
        page.page.wait_for_selector('.qkv-image[data-state="ready"]')
        assert "r0c3" in page.focus_text()
        assert_weights(page, first, np.asarray(full)[L - 1].mean(0)[unit, patches], "fetched r0c3, mean of heads")
        # (the compact view's own row panel asks for its row, the class token's, too)
        asked = [q for q in page.page.evaluate("window.asked") if q["rows"] == [unit]]
        assert sorted(q["head"] for q in asked) == list(range(len(full[0])))
        assert all(q["layers"] == list(range(L)) for q in asked)
        # Every layer came with it: another layer needs no request for this patch.
        page.page.select_option("#image-layer", "1")
        assert_weights(page, first, np.asarray(full)[1].mean(0)[unit, patches], "fetched r0c3, layer 1")
        assert len([q for q in page.page.evaluate("window.asked") if q["rows"] == [unit]]) == len(asked)
        page.check_clean()
    finally:
        page.close()


def test_malicious_file_name_stays_text(browser, tmp_path):
    bad = tmp_path / MALICIOUS_NAME
    shutil.copyfile(SAMPLE, bad)
    r = qkv.explain(image=bad, model="digits")
    path = tmp_path / "bad.html"
    r.save_html(path)
    page = ImagePage(browser, path)
    try:
        assert page.page.text_content("#title-text") == "\u201c" + MALICIOUS_NAME + "\u201d"
        assert page.page.eval_on_selector("img.qkv-image-picture", "e => e.title") == MALICIOUS_NAME
        assert page.page.eval_on_selector_all("img", "els => els.length") == 1  # only the picture
        page.check_clean()
    finally:
        page.close()


def test_keyboard_and_the_head_view_share_the_focus(browser, digit, tmp_path):
    data = digit.to_dict()
    maps = np.asarray(data["maps"])  # (L, H, n, n)
    L = maps.shape[0]
    first, (gr, gc), cls = data["image"]["first_patch"], data["image"]["grid"], data["image"]["class_token"]
    patches = slice(first, first + gr * gc)
    page = ImagePage(browser, write_html(data, tmp_path / "keys.html"))
    try:
        # A click on a patch selects it in the head view too.
        unit = data["labels"].index("r1c1")
        page.page.click(f'.qkv-patch[data-unit="{unit}"]')
        assert page.page.eval_on_selector("#head-view", "e => e.dataset.selected") == str(unit)
        # Arrow keys move the focus over the grid.
        page.page.keyboard.press("ArrowRight")
        assert "r1c2" in page.focus_text()
        page.page.keyboard.press("ArrowDown")
        assert "r2c2" in page.focus_text()
        assert_weights(page, first, maps[L - 1].mean(0)[data["labels"].index("r2c2"), patches], "r2c2 by the keyboard")
        page.page.keyboard.press("Escape")
        assert "[CLS]" in page.focus_text()
        # One patch is in the tab order (the focus's, or the first when the class token is the focus).
        tabbable = page.page.eval_on_selector_all(".qkv-patch", "els => els.filter(e => e.tabIndex === 0).length")
        assert tabbable == 1
        # A word picked in the head view becomes the image's focus.
        other = data["labels"].index("r3c3")
        page.page.click(f'#queries .word.q[data-index="{other}"]')
        assert "r3c3" in page.focus_text()
        assert_weights(page, first, maps[L - 1].mean(0)[other, patches], "r3c3 from the head view")
        page.page.click(f'#queries .word.q[data-index="{cls}"]')
        assert "[CLS]" in page.focus_text()
        # The overlay slider fades the colours, not the numbers.
        before = page.patches()
        colour = "e => getComputedStyle(e).backgroundColor"
        top = int(np.argmax(maps[L - 1].mean(0)[cls, patches])) + first
        assert page.page.eval_on_selector(f'.qkv-patch[data-unit="{top}"]', colour) == "rgba(255, 96, 24, 0.78)"
        page.page.fill("#image-opacity", "0")
        assert page.page.eval_on_selector(f'.qkv-patch[data-unit="{top}"]', colour).endswith(", 0)")
        assert page.patches() == before
        page.check_clean()
    finally:
        page.close()


def test_a_wide_image_keeps_rows_and_columns_apart(browser, tmp_path):
    """A 8x12 picture (interpolated positions): a 4x6 grid, so a row/column mix-up shows."""
    import torch

    pixels = torch.rand(8, 12, generator=torch.Generator().manual_seed(3))  # (H, W) in [0, 1]
    r = qkv.explain(image=pixels, model="digits", interpolate_pos_encoding=True)
    data = r.to_dict()
    assert data["image"]["grid"] == [4, 6]
    grids = r.image_maps(focus="cls").mean(1)  # (L, rows, cols)
    L = grids.shape[0]
    page = ImagePage(browser, write_html(data, tmp_path / "wide.html"))
    try:
        box = page.page.eval_on_selector("img.qkv-image-picture", "e => [e.clientWidth, e.clientHeight]")
        assert abs(box[0] / box[1] - 12 / 8) < 0.02, f"the picture is drawn {box}, not 12:8"
        cells = page.patches()
        assert len(cells) == 24
        for c in cells:
            assert abs(float(c["weight"]) - float(grids[L - 1, int(c["row"]), int(c["col"])])) <= TOL
        # A patch's position on screen follows its row and column.
        x, y = page.page.eval_on_selector('.qkv-patch[data-row="3"][data-col="5"]',
                                          "e => [e.offsetLeft, e.offsetTop]")
        assert x > 4 * y / 3 > 0
        unit = data["labels"].index("r3c5")
        page.page.hover(f'.qkv-patch[data-unit="{unit}"]')
        grid = r.image_maps(focus="r3c5").mean(1)[L - 1]  # (rows, cols)
        for c in page.patches():
            assert abs(float(c["weight"]) - float(grid[int(c["row"]), int(c["col"])])) <= TOL
        page.check_clean()
    finally:
        page.close()


def test_a_big_rgb_vit_gives_the_compact_view(browser, tmp_path):
    """A random RGB ViT without a classifier (transformers' ViTModel saved to a folder, as
    tests/models/test_vit.py builds them), 2 layers x 32 heads over 16x16 patches: its result is
    too big for full maps, so the page gets the compact view with the class token's whole row."""
    import torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=32,
                                    intermediate_size=64, image_size=64, patch_size=4, num_channels=3)
    transformers.ViTModel(config).eval().save_pretrained(tmp_path / "vit")
    pixels = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))  # (C, H, W) in [0, 1]
    r = qkv.explain(image=pixels, model=str(tmp_path / "vit"))
    data = r.to_dict()
    assert data["view"] == "rows" and data["image"]["channels"] == 3 and data["image"]["prediction"] == []
    grid = r.image_maps(focus="cls").mean(1)[-1]  # (16, 16): last layer, mean of heads
    page = ImagePage(browser, write_html(data, tmp_path / "big.html"))
    try:
        assert page.state()["view"] == "rows"
        cells = page.patches()
        assert len(cells) == 256
        for c in cells:
            assert abs(float(c["weight"]) - float(grid[int(c["row"]), int(c["col"])])) <= TOL
        assert page.page.eval_on_selector("img.qkv-image-picture", "e => e.complete && e.naturalWidth") == 64
        assert "No prediction" in page.page.text_content(".qkv-image")
        page.page.hover('.qkv-patch[data-row="5"][data-col="9"]')
        assert "r5c9" in page.focus_text()
        assert "qkv explain --rows all" in page.page.text_content(".qkv-image-caption")
        page.check_clean()
    finally:
        page.close()


def test_a_failed_fetch_is_said_and_a_click_asks_again(browser, digit, tmp_path):
    full = digit.to_dict()["maps"]  # (L, H, n, n) nested lists
    data = digit.to_dict(rows=[0])
    L = len(full)
    first, (gr, gc) = data["image"]["first_patch"], data["image"]["grid"]
    patches = slice(first, first + gr * gc)
    page = ImagePage(browser, write_html(data, tmp_path / "fail.html"))
    try:
        page.page.evaluate("""([data, full]) => {
            window.down = true;
            QKV.mount(document.getElementById("qkv-root"), data, { fetchRows: (q) => window.down
                ? Promise.reject(new Error("the session was evicted; explain the image again"))
                : Promise.resolve({ weights: q.layers.map(l => [[full[l][q.head][q.rows[0]]]]) }) });
        }""", [data, full])
        unit = data["labels"].index("r1c0")
        page.page.hover(f'.qkv-patch[data-unit="{unit}"]')
        page.page.wait_for_function("document.querySelector('.qkv-image-caption').textContent.includes('evicted')")
        assert all(p.get("weight") is None for p in page.patches())
        page.page.evaluate("window.down = false")
        page.page.click(f'.qkv-patch[data-unit="{unit}"]')
        page.page.wait_for_selector('.qkv-image[data-state="ready"]')
        assert_weights(page, first, np.asarray(full)[L - 1].mean(0)[unit, patches], "r1c0 after a retry")
        page.check_clean()
    finally:
        page.close()

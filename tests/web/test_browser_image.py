"""The explorer with an image model, end to end in headless Chromium (as tests/web/test_browser.py:
the real server on a free 127.0.0.1 port, /usr/bin/chromium, a person's clicks): pick the digits
model, click a sample, hover a patch, and the page shows the API's numbers; upload a file through
the file input; no request leaves for any host but the server.

The picture is drawn by explain.js (QKV.mount): `.qkv-image`, `img.qkv-image-picture`, one
`.qkv-patch` per patch (data-unit, data-row, data-col, data-weight: the weight drawn, 4
decimals), `.qkv-image-focus` naming the focused unit, `.qkv-image-cls` back to the class token.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from qkv.models import bundled_path
from qkv.web.app import create_app

from .test_browser import Explorer
from .web_helpers import running_server

Image = pytest.importorskip("PIL.Image")

SAMPLE = "digit-3.png"
DIGITS = bundled_path("digits")


@pytest.fixture(scope="module")
def server():
    app = create_app()
    with running_server(app) as url:
        yield url, app
    assert app.state.internal_errors == 0


class ImagePage(Explorer):
    def wait_ready(self):
        self.page.wait_for_selector("body[data-ready=true][data-busy=false]", timeout=30_000)
        self.page.wait_for_selector("#view-a .qkv-image img.qkv-image-picture", timeout=30_000)

    def pick_model(self, name: str):
        self.page.select_option("#model", name)
        self.page.wait_for_selector("#samples[data-ready=true]", timeout=30_000)

    def patches(self) -> list[dict]:
        return self.page.eval_on_selector_all("#view-a .qkv-patch", "els => els.map(e => Object.assign({}, e.dataset))")

    def picture_state(self) -> tuple[int, str, int]:
        """(layer, head or "mean", focus unit) of the picture's overlay."""
        d = self.page.eval_on_selector("#view-a .qkv-image", "e => Object.assign({}, e.dataset)")
        assert d["method"] == "raw", d
        return int(d["layer"]), d["head"], int(d["focus"])

    def selected(self) -> str:
        return self.page.eval_on_selector("#views", "e => e.dataset.selected")


def api(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def drawn_row(data: dict, layer: int, head: str, unit: int, maps=None) -> np.ndarray:
    """The row the picture should draw: unit's weights over the patches (the class token's column
    dropped), at that layer, in that head or the mean of the heads; (rows, cols). maps: (L, H, n, n),
    default the answer's."""
    maps = np.asarray(data["maps"] if maps is None else maps)  # (L, H, n, n)
    at = maps[layer].mean(0) if head == "mean" else maps[layer, int(head)]
    first, (rows, cols) = data["image"]["first_patch"], data["image"]["grid"]
    return at[unit, first:first + rows * cols].reshape(rows, cols)  # (n_patches,) -> (rows, cols)


def check_patches(page: ImagePage, data: dict, maps=None) -> int:
    """Every .qkv-patch's data-weight is the API's weight for the unit the picture shows; returns that unit."""
    layer, head, unit = page.picture_state()
    want = drawn_row(data, layer, head, unit, maps)
    patches = page.patches()
    rows, cols = data["image"]["grid"]
    assert len(patches) == rows * cols
    first = data["image"]["first_patch"]
    for p in patches:
        r, c = int(p["row"]), int(p["col"])
        assert int(p["unit"]) == first + r * cols + c
        # drawn to 4 decimals, from weights the answer rounds to 5: within 5e-5 + 5e-6
        assert abs(float(p["weight"]) - want[r, c]) <= 5.5e-5 + 1e-9, (p, want[r, c])
    return unit


def test_pick_a_sample_and_hover_a_patch(browser, server):
    url, _ = server
    page = ImagePage(browser, url)
    page.pick_model("digits")
    assert not page.page.is_visible("#text") and not page.page.is_visible("#other")
    assert page.page.is_visible("#image-file")
    listed = httpx.get(url + "/api/samples", params={"model": "digits"}).json()["samples"]
    thumbs = page.page.eval_on_selector_all("#samples button.sample img", "els => els.map(e => [e.alt, e.src])")
    assert thumbs == [[s["name"], s["pixels"]] for s in listed]

    page.page.click(f'#samples button.sample[data-name="{SAMPLE}"]')
    page.wait_ready()
    assert page.page.get_attribute(f'#samples button.sample[data-name="{SAMPLE}"]', "aria-pressed") == "true"
    data = api(url, "/api/explain", {"model": "digits", "sample": SAMPLE})
    assert page.page.get_attribute("#view-a img.qkv-image-picture", "src") == data["image"]["pixels"]

    assert check_patches(page, data) == 0  # the class token's row first
    assert "[CLS]" in page.page.text_content("#view-a .qkv-image-focus")

    # hover the patch in row 1, column 2: it is focused, named, and the weights drawn are its row
    unit = data["labels"].index("r1c2")
    page.page.hover('#view-a .qkv-patch[data-row="1"][data-col="2"]')
    page.page.wait_for_selector(f'#view-a .qkv-image[data-focus="{unit}"]', timeout=10_000)
    assert "r1c2" in page.page.text_content("#view-a .qkv-image-focus")
    assert check_patches(page, data) == unit

    # the step-through follows the hovered patch: the API's numbers for it
    page.page.wait_for_selector(f'#steps[data-ready=true][data-word="{unit}"]', timeout=30_000)
    shown_layer, shown_head = (int(page.page.get_attribute("#steps", k) or "") for k in ("data-layer", "data-head"))
    steps = api(url, "/api/steps", {"model": "digits", "sample": SAMPLE, "word": unit, "layer": shown_layer,
                                    "head": shown_head})
    weights = page.page.eval_on_selector_all("#steps-table tbody tr", "els => els.map(e => Number(e.dataset.weight))")
    np.testing.assert_allclose(weights, steps["weights"], atol=1e-6)
    assert steps["token_label"] == "r1c2"

    # a click selects the patch in the view below too; another layer and head from the picture's controls
    other = data["labels"].index("r3c1")
    page.page.click('#view-a .qkv-patch[data-row="3"][data-col="1"]')
    page.page.wait_for_function(f"() => document.getElementById('views').dataset.selected === '{other}'",
                                timeout=10_000)
    page.page.wait_for_selector(f'#steps[data-ready=true][data-word="{other}"]', timeout=30_000)
    assert check_patches(page, data) == other

    # back to the class token
    page.page.click("#view-a .qkv-image-cls")
    page.page.wait_for_selector('#view-a .qkv-image[data-focus="0"]', timeout=10_000)
    assert check_patches(page, data) == 0
    page.check_clean()


def test_upload_through_the_file_input(browser, server, tmp_path):
    url, _ = server
    page = ImagePage(browser, url)
    page.pick_model("digits")
    rng = np.random.default_rng(7)
    name = '<img src=x onerror=alert(1)><b>seven "x".png'  # a file name is user text: shown as text, never markup
    path = tmp_path / name
    Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), "L").save(path)
    page.page.set_input_files("#image-file", str(path))
    page.wait_ready()
    raw = path.read_bytes()
    data = api(url, "/api/explain", {"model": "digits", "image": "data:image/png;base64," +
                                     base64.b64encode(raw).decode(), "image_name": name})
    assert page.page.get_attribute("#view-a img.qkv-image-picture", "src") == data["image"]["pixels"]
    assert page.page.text_content("#image-chosen") == name
    assert page.page.eval_on_selector("body", "b => b.querySelectorAll('img[src=x], [onerror]').length") == 0
    assert page.page.eval_on_selector("#image-chosen", "e => e.children.length") == 0
    unit = data["labels"].index("r3c0")
    page.page.hover('#view-a .qkv-patch[data-row="3"][data-col="0"]')
    page.page.wait_for_selector(f'#view-a .qkv-image[data-focus="{unit}"]', timeout=10_000)
    assert check_patches(page, data) == unit

    # a colour picture for the grey digits: the server's one line, shown
    colour = tmp_path / "colour.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(colour)
    page.page.set_input_files("#image-file", str(colour))
    page.page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "colour (RGB) image but this model reads grayscale" in page.page.text_content("#error")

    # another size: refused, then read on resampled positions once the box is ticked
    wide = tmp_path / "wide.png"
    Image.fromarray((rng.random((12, 10)) * 255).astype(np.uint8), "L").save(wide)
    page.page.set_input_files("#image-file", str(wide))
    page.page.wait_for_function("() => document.getElementById('error').textContent.indexOf('10x12 pixels') >= 0",
                                timeout=30_000)
    page.page.check("#interpolate")
    page.page.wait_for_selector('#view-a .qkv-patch[data-row="5"][data-col="4"]', timeout=30_000)
    assert page.page.is_hidden("#error") and len(page.patches()) == 30

    # a text model again: the sentence box is back
    page.page.select_option("#model", "minilm")
    assert page.page.is_visible("#text") and not page.page.is_visible("#image-file")
    page.check_clean()


def test_a_big_vit_fetches_a_hovered_patch_s_rows_from_the_server(browser, tmp_path):
    """A ViT of 32 x 32 patches answers the compact view (the class token's row shipped); hovering a
    patch makes the picture ask /api/weights for that patch's rows, and draws the server's numbers."""
    import qkv
    from models.test_vit import build

    build(tmp_path / "big", "ViTModel", image_size=128, patch_size=4, num_channels=1, seed=3)
    img = Image.fromarray((np.random.default_rng(1).random((128, 128)) * 255).astype(np.uint8), "L")
    path = tmp_path / "noise.png"
    img.save(path)
    maps = qkv.explain(image=img, model=qkv.load(tmp_path / "big")).maps().numpy()  # (L, H, n, n)
    app = create_app(model_dir=str(tmp_path))
    with running_server(app) as url:
        page = ImagePage(browser, url)
        page.pick_model("big")
        assert "no samples" in page.page.text_content("#samples")
        page.page.set_input_files("#image-file", str(path))
        page.wait_ready()
        data = api(url, "/api/explain", {"model": "big", "image": "data:image/png;base64," +
                                         base64.b64encode(path.read_bytes()).decode(), "image_name": "noise.png"})
        assert data["view"] == "rows"
        page.page.wait_for_selector("#view-a .qkv-patch[data-weight]", timeout=30_000)
        assert check_patches(page, data, maps) == 0
        unit = data["labels"].index("r9c20")
        page.page.hover('#view-a .qkv-patch[data-row="9"][data-col="20"]')
        page.page.wait_for_selector(f'#view-a .qkv-image[data-focus="{unit}"]', timeout=10_000)
        page.page.wait_for_selector(f'#view-a .qkv-patch[data-unit="{unit}"][data-weight]', timeout=30_000)
        assert check_patches(page, data, maps) == unit
        assert any(u.endswith("/api/weights") for u in page.requests)
        page.check_clean()
    assert app.state.internal_errors == 0


def test_the_step_through_keeps_its_patch_when_the_class_token_is_hidden(browser, server):
    """Hiding the class token shifts every patch's index by one: the step-through follows its patch by
    name (r1c2 stays r1c2), not by its old index (which would be r1c3 now)."""
    url, _ = server
    page = ImagePage(browser, url)
    page.pick_model("digits")
    page.page.click(f'#samples button.sample[data-name="{SAMPLE}"]')
    page.wait_ready()
    page.page.hover('#view-a .qkv-patch[data-row="1"][data-col="2"]')
    page.page.wait_for_selector('#steps[data-ready=true][data-word="7"]', timeout=30_000)
    page.page.mouse.move(0, 0)
    page.page.check("#hide-special")
    page.wait_ready()
    page.page.wait_for_function("() => document.getElementById('steps').dataset.word === '6'", timeout=10_000)
    layer = page.page.eval_on_selector_all("#steps-layer option", "els => els.map(e => e.value)")[0]
    page.page.select_option("#steps-layer", layer)
    page.page.wait_for_selector(f'#steps[data-ready=true][data-word="6"][data-layer="{layer}"]', timeout=30_000)
    assert "r1c2" in page.page.text_content("#steps-word")
    head = int(page.page.get_attribute("#steps", "data-head") or "")
    steps = api(url, "/api/steps", {"model": "digits", "sample": SAMPLE, "word": "r1c2", "layer": int(layer),
                                    "head": head, "hide_special": True})
    weights = page.page.eval_on_selector_all("#steps-table tbody tr", "els => els.map(e => Number(e.dataset.weight))")
    np.testing.assert_allclose(weights, steps["weights"], atol=1e-6)
    page.check_clean()
